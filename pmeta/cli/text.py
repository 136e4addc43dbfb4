"""Text-bank commands (LaMP-format tasks on a causal LM): ``pmeta eval lamp``, ``pmeta export``, and
the text branches of ``pmeta bank build --format lamp`` and ``pmeta adapt`` (called from app.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .app import MAX_INNER_STEPS, MAX_SEED, _progress, app, eval_app, fail, friendly


def is_text_bank(bank: Path, db: Optional[str]) -> bool:
    """True when ``bank``'s active version is a text bank (False for anything else: the caller's own
    open then reports a missing or broken bank as usual)."""
    from ..errors import PmetaError
    from ..storage import bank_kind

    try:
        return bank_kind(bank, db) == "text"
    except (PmetaError, OSError):
        return False


def build_lamp_bank(out: Path, data: Optional[Path], task: Optional[str], config: Optional[Path], preset: str, anchors, meta, seed, db, quiet: bool, device, lm) -> None:
    from ..data.lamp import task_spec
    from ..text.config import load_text_config

    if data is None or not data.is_dir():
        fail(f"--format lamp needs --data DIR (a folder with train/dev/test *_questions.json and *_outputs.json){'' if data is None else f'; {data} is not a folder'}")
    if task is None:
        fail("--format lamp needs --task (LaMP-1, 2, 3, 4, 5 or 7)")
    spec = task_spec(task)
    cfg = load_text_config(preset, config, {"task": spec.name, "anchors": anchors, "meta": meta, "seed": seed, "device": device, "lm": lm})  # before torch loads

    from ..bank import distributed
    from ..models.device import cpu_only

    if distributed.requested():  # text meta-training has no multi-process path: N ranks would race for the bank
        fail("--format lamp builds run in one process; torchrun splits MovieLens bank builds only (run it without torchrun)")
    cpu_only(cfg.device, "text banks")  # before the bank folder is created
    from ..text.build import build_text_bank  # transformers: after every check above

    result = build_text_bank(data, out, cfg, db_url=db, progress=_progress(quiet))
    val = result.validation
    typer.echo(
        f"built text bank version {result.version} ({spec.name}) in {result.seconds:.0f}s: {result.train_users} train users, "
        f"{result.validation_users} validation users; validation query loss {val.get('start', float('nan')):.3f} -> {val.get('final', float('nan')):.3f}"
    )


def adapt_text(bank: Path, history: Path, input: Optional[str], retrieve: Optional[int], steps: Optional[int], as_json: bool, user: Optional[str], db: Optional[str], device: str = "cpu") -> None:
    from ..storage import BankStore
    from ..text.history import load_text_history, parse_text_history

    if input is None or not input.strip():
        fail("a text bank needs --input TEXT (the input to predict for)")
    task = BankStore(bank, db).record()["config"].get("task", "")
    parsed, _ = load_text_history(history, task)  # validated before the model loads
    if user is not None:
        parsed, _ = parse_text_history({**parsed.model_dump(), "user_id": user}, task, "--user")
    from ..text.bank import TextBank  # torch and transformers: after the history is checked

    opened = TextBank.open(bank, db, device=device)
    personalization = opened.personalize(parsed, steps=steps)
    k = opened.config.retrieve if retrieve is None else retrieve
    prediction = personalization.predict(input, retrieve=k)
    if as_json:
        typer.echo(json.dumps({**personalization.to_dict(), "task": opened.task, "retrieve": k, "prediction": prediction}))
        return
    anchors = ", ".join(f"#{a['anchor']} ({a['weight']:.2f})" for a in personalization.anchors) or "none (zero-history prior)"
    typer.echo(f"user {personalization.user_id}: anchors {anchors}; personalized in {personalization.timing_ms['total_ms']:.0f} ms")
    typer.echo(prediction)


@app.command("export")
@friendly
def export(
    bank: Path = typer.Option(..., "--bank", help="Text bank directory."),
    history: Path = typer.Option(..., "--history", help="profile JSON of the user: {\"user_id\", \"profile\": [...]}"),
    out: Path = typer.Option(..., "--out", help="Folder for the PEFT adapter (adapter_config.json + adapter_model.safetensors)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=0, max=MAX_INNER_STEPS, help=f"Inner steps, 0 to {MAX_INNER_STEPS} (default: the bank's)."),
    db: Optional[str] = typer.Option(None, "--db"),
) -> None:
    """Write one user's fused + stacked LoRA as a standard PEFT adapter folder (soft prompt beside it)."""
    from ..storage import BankStore
    from ..text.history import load_text_history

    if not is_text_bank(bank, db):
        BankStore(bank, db).open()  # a missing or broken bank reports itself
        fail(f"bank {bank} is not a text bank; only text banks export PEFT adapters")
    task = BankStore(bank, db).record()["config"].get("task", "")
    load_text_history(history, task)
    from ..text.bank import TextBank  # torch and transformers: after the history is checked

    opened = TextBank.open(bank, db)
    path = opened.personalize(history, steps=steps).export_peft(out)
    typer.echo(f"wrote PEFT adapter to {path}")


@eval_app.command("lamp")
@friendly
def eval_lamp(
    data: Path = typer.Option(..., "--data", help="LaMP-format folder (train/dev/test *_questions.json, *_outputs.json)."),
    task: str = typer.Option(..., "--task", help="LaMP-1, 2, 3, 4, 5 or 7."),
    out: Path = typer.Option(..., "--out", help="Folder for report.json, report.md, plots and predictions."),
    k_profile: str = typer.Option("1,3,5", "--k-profile", help="Profile sizes K (the K most recent items)."),
    bank: Optional[Path] = typer.Option(None, "--bank", help="A text bank built on this data's train split; without it one is built with --preset."),
    preset: str = typer.Option("tiny", "--preset", help="Preset of the bank built when --bank is not given: tiny, small or default."),
    lm: Optional[str] = typer.Option(None, "--lm", help="Causal LM of the bank built when --bank is not given."),
    users: Optional[int] = typer.Option(None, "--users", min=1, help="Evaluate N test users (a seeded choice)."),
    methods: str = typer.Option("backbone,retrieval-k1,retrieval-k2,retrieval-k3,retrieval-k4,per-user-lora,pmeta,pmeta+retrieval", "--methods"),
    split: str = typer.Option("test", "--split"),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED),
    db: Optional[str] = typer.Option(None, "--db"),
    quiet: bool = typer.Option(False, "--quiet"),
    allow_id_overlap: bool = typer.Option(False, "--allow-id-overlap", help="Evaluate questions whose ids name users the bank trained on, when the data files differ from the bank's (other users that share ids)."),
) -> None:
    """Evaluate the backbone, retrieval, per-user LoRA and pmeta on a LaMP-format split."""
    from ..data.lamp import load_split, task_spec
    from ..errors import InvalidConfig
    from ..eval.output import check_out_dir
    from ..config import check_preset
    from ..text.config import TEXT_PRESETS, load_text_config

    spec = task_spec(task)
    try:
        ks = sorted({int(x) for x in k_profile.split(",") if x.strip()})
    except ValueError:
        raise InvalidConfig(f"--k-profile must be comma-separated integers, got {k_profile!r}") from None
    if not ks or min(ks) < 0:
        raise InvalidConfig(f"--k-profile must be non-negative integers, got {k_profile!r}")
    from ..text.history import MAX_PROFILE_ITEMS

    if max(ks) > MAX_PROFILE_ITEMS:  # a huge K ran the whole evaluation, then broke the plots
        raise InvalidConfig(f"--k-profile values are at most {MAX_PROFILE_ITEMS:,} (a profile's item limit), got {max(ks)}")
    check_preset(preset, TEXT_PRESETS)  # also with --bank (then it is not used), so that a typo is never silently ignored
    if bank is not None and lm is not None:
        raise InvalidConfig("--lm names the LM of the bank built when --bank is not given; --bank serves with its own LM: leave --lm out")
    build_config = load_text_config(preset, overrides={"task": spec.name, "seed": seed, "lm": lm}) if bank is None else None  # before torch loads
    from ..text.bank import TextBank  # torch, and transformers on first use: after the checks above
    from ..text.build import build_text_bank, dataset_fingerprint
    from ..text.evaluate import choose_users, parse_methods, run_lamp, write_lamp_report

    method_list = parse_methods(methods)
    check_out_dir(out)
    if bank is None and split in ("train", "dev"):
        raise InvalidConfig(f"--split {split} needs --bank: the bank built here would train on train and validate on dev")
    examples = choose_users(load_split(data, spec.name, split), users, seed)
    if not examples:
        raise InvalidConfig(f"{data}: the {split} split has no question with a gold output to evaluate")
    from ..eval.lamp_metrics import score

    golds = {e.id: e.output for e in examples}
    score(spec.name, dict(golds), golds)  # a gold the metrics refuse fails here, before a bank is built or a prediction made
    if bank is None:
        bank = out / "bank"
        build_text_bank(data, bank, build_config, db_url=db, progress=_progress(quiet))
    opened = TextBank.open(bank, db)
    if opened.task != spec.name:
        raise InvalidConfig(f"bank {bank} serves {opened.task}, not {spec.name}")
    built = opened.record.get("build", {})
    seen = set(built.get("train_users", [])) | set(built.get("validation_users", []))
    used = sum(1 for e in examples if e.id in seen)
    if used and opened.record.get("dataset_fingerprint") == dataset_fingerprint(data):
        raise InvalidConfig(f"{used} of the {len(examples)} questions of the {split} split trained or validated bank {bank}: evaluate a split it never saw (--split test)")
    if used and not allow_id_overlap:  # other files (another conversion, a re-indented copy) with the bank's users in them
        raise InvalidConfig(
            f"{used} of the {len(examples)} questions of the {split} split have the ids of users that trained or validated bank {bank} "
            f"(built on {opened.record.get('dataset_name')}, other files than {data}): if they are other users that only share ids, "
            "pass --allow-id-overlap"
        )
    longest = max(len(e.profile) for e in examples)
    if max(ks) > longest:
        typer.echo(f"note: K = {max(ks)} is above every evaluated profile's length (at most {longest}): it keeps whole profiles, as K = {longest} does", err=True)
    progress = _progress(quiet)
    with progress.task("evaluating", len(examples)) as bar:
        report = run_lamp(opened.model, examples, method_list, ks, seed=seed, on_user=lambda: bar.advance(1), out=out)
    report["bank"] = {"path": str(bank), "version": opened.version}
    report["data"] = {"path": str(data), "split": split, "fingerprint": dataset_fingerprint(data), "user_ids": [e.id for e in examples]}
    write_lamp_report(report, out)
    typer.echo((out / "report.md").read_text())
