"""The ``pmeta`` command line: parses, calls the library, prints. No logic of its own.

Every input error prints one line on stderr and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from functools import wraps
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

#: click's base exception, found through typer's own BadParameter: recent typer versions vendor click.
CLICK_ERROR = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")

#: :data:`pmeta.config.MAX_SEED`, not imported so that `pmeta --help` does not load the pydantic models (0.3 s; a test checks they agree).
MAX_SEED = 2**32 - 1
#: :data:`pmeta.config.MAX_INNER_STEPS`, likewise not imported (a test checks they agree).
MAX_INNER_STEPS = 50
#: Most torch CPU threads ``--threads`` accepts (torch crashes on a huge count instead of refusing it).
MAX_THREADS = 1024

class OneLineErrors(TyperGroup):
    """Usage errors found by the option parser (a value out of range, a missing option, a typo in a
    flag) print one ``pmeta: error:`` line and exit 2, like every error pmeta itself detects, instead
    of typer's boxed panel. Everything else keeps typer's standalone behaviour."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except CLICK_ERROR as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `pmeta` alone: the help is already printed
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            message = " ".join(exc.format_message().split())
            typer.echo(f"pmeta: error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("pmeta: error: aborted", err=True)
            sys.exit(1)
        # commands return None (``friendly`` drops return values), so an int is an exit code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, help="pmeta: cold-start personalization from a bank of meta-learned adapters.")
bank_app = typer.Typer(no_args_is_help=True, help="Build, inspect and verify banks.")
app.add_typer(bank_app, name="bank")

_DEBUG = {"on": False}


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"pmeta {__version__}")
        raise typer.Exit()


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."), threads: int = typer.Option(0, "--threads", min=0, max=MAX_THREADS, help=f"torch CPU threads, 0 to {MAX_THREADS} (0 = torch's default)."), version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print pmeta's version and exit.")) -> None:
    _DEBUG["on"] = debug
    if sys.stdout is None:  # `pmeta ... >&-`: results would vanish with exit 0
        fail("standard output is closed: nowhere to print the result")
    if not debug:  # a data warning (dropped ratings, ...) is one line, not Python's file:line + source
        import warnings

        warnings.showwarning = _one_line_warning
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    try:
        (file or sys.stderr).write(f"pmeta: warning: {text}\n")
    except (OSError, AttributeError):  # stderr closed: the warning has nowhere to go
        pass


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"pmeta: error: {message}", err=True)
    raise typer.Exit(code)


def friendly(command):
    """Turn pmeta's typed errors (and OS errors on user paths) into one line and exit code 2."""

    @wraps(command)
    def run(*args, **kwargs):
        from ..errors import PmetaError

        try:
            command(*args, **kwargs)
        except (typer.Exit, BrokenPipeError):  # a closed pipe (`pmeta adapt ... | head -1`): typer exits 1 quietly
            raise
        except (PmetaError, OSError) as exc:
            if _DEBUG["on"]:
                raise
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            fail(text)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return run


def _progress(quiet: bool):
    from ..progress import Progress

    return Progress(False) if quiet else Progress(True if sys.stderr.isatty() or os.environ.get("PMETA_PROGRESS") == "1" else None)


def _check_format(data: Optional[Path], format: str) -> None:
    """Refuse an unknown --format, or one the shipped sample is not in, before any work starts."""
    from ..data.movielens import check_format
    from ..errors import InvalidConfig

    if check_format(format) not in ("auto", "ml-latest") and data is None:
        raise InvalidConfig(f"--format {format} needs --data DIR: without it pmeta reads the shipped ml-latest-small sample")


def _load_dataset(data: Optional[Path], format: str):
    from ..data import load_sample, read_movielens

    if data is None:
        return load_sample()
    return read_movielens(data, format)


@bank_app.command("build")
@friendly
def bank_build(
    out: Path = typer.Option(..., "--out", help="Bank directory (created if missing; a new version is added if it is a bank)."),
    data: Optional[Path] = typer.Option(None, "--data", help="MovieLens directory (ml-100k, ml-1m or ml-latest layout). Default: the shipped ml-latest-small."),
    format: str = typer.Option("auto", "--format", help="auto, ml-100k, ml-1m, ml-latest, or lamp (a text bank on LaMP-format files; needs --task)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with bank settings (top level or a \\[bank] table)."),
    preset: str = typer.Option("default", "--preset", help="tiny (for tests: about a minute on MovieLens), small (a few minutes) or default."),
    anchors: Optional[int] = typer.Option(None, "--anchors", help="Number of anchors."),
    meta: Optional[str] = typer.Option(None, "--meta", help="maml, fomaml or reptile."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=MAX_SEED, help="Random seed (also selects the held-out test users)."),
    db: Optional[str] = typer.Option(None, "--db", help="SQLAlchemy URL of the metadata DB (default: SQLite inside the bank)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    device: Optional[str] = typer.Option(None, "--device", help="torch device: cpu, cuda or cuda:N (default: the config's, cpu)."),
    task: Optional[str] = typer.Option(None, "--task", help="LaMP task of a text bank (with --format lamp), e.g. LaMP-3."),
    lm: Optional[str] = typer.Option(None, "--lm", help="Causal LM of a text bank (with --format lamp); default bundled:SmolLM2-135M-Instruct."),
) -> None:
    """Meta-train a bank on a dataset's train users and publish it as a new version.

    Under ``torchrun --nproc_per_node N -m pmeta bank build ...`` the meta-training is split across
    the N processes (gradients all-reduced); rank 0 writes the bank."""
    if not out.parent.is_dir():  # a typo in the parent path must not create a tree of folders
        fail(f"cannot create bank {out}: {out.parent} {'is not a directory' if out.parent.exists() else 'does not exist'}")
    if format != "lamp" and (task is not None or lm is not None):
        fail(f"{'--task' if task is not None else '--lm'} applies to text banks (--format lamp); --format {format} builds a MovieLens bank")
    if format == "lamp":  # text bank on LaMP-format files (pmeta/cli/text.py)
        from .text import build_lamp_bank

        return build_lamp_bank(out, data, task, config, preset, anchors, meta, seed, db, quiet, device, lm)
    from ..config import load_config

    _check_format(data, format)
    cfg = load_config(preset, config, {"anchors": anchors, "meta": meta, "seed": seed, "device": device})  # before torch loads

    from ..bank import distributed
    from ..bank.build import build_bank
    from ..models.device import resolve_device

    resolve_device(cfg.device)  # before the bank folder is created
    dataset = _load_dataset(data, format)
    other_rank = distributed.requested() and os.environ.get("RANK", "0") != "0"  # torchrun rank > 0
    result = build_bank(dataset, out, cfg, db_url=db, progress=_progress(quiet or other_rank))
    if other_rank:
        return
    final = result.validation.get("final", {})
    typer.echo(
        f"built bank version {result.version} in {result.seconds:.0f}s: {result.train_users} train users, "
        f"{result.test_users} held-out test users; validation HR@10 (full ranking, K=5) {final.get('hr@10', float('nan')):.3f}"
    )
    if "time_prior_served" in result.validation:  # BankConfig.time_prior_weight_served
        from ..bank.calibrate import describe

        typer.echo(describe(result.validation["time_prior_served"]))


@bank_app.command("info")
@friendly
def bank_info(bank: Path = typer.Argument(..., help="Bank directory."), db: Optional[str] = typer.Option(None, "--db"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Versions, the active one, the size on disk, and each version's dataset, anchors and notes."""
    from ..storage import BankStore

    store = BankStore(bank, db)
    info = store.info()
    active = info.get("active")
    if active is not None and not (store.versions_dir / str(active)).is_dir():  # a size of 0 MB would look like a healthy bank
        fail(f"bank {bank}: the folder of the active version {active} is missing (pmeta bank verify {bank} lists every problem)")
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    typer.echo(f"bank {bank}: active version {info.get('active')}, {len(info.get('versions', []))} version(s), {info.get('bytes', 0) / 1e6:.1f} MB on disk")
    for version in info.get("versions", []):
        mark = "*" if version.get("id") == info.get("active") else " "
        typer.echo(f" {mark} {version.get('id')}  {version.get('created_at')}  {version.get('dataset_name')}  anchors={version.get('n_anchors')}  {version.get('notes', '')}")


@bank_app.command("verify")
@friendly
def bank_verify(bank: Path = typer.Argument(..., help="Bank directory."), db: Optional[str] = typer.Option(None, "--db"), all_versions: bool = typer.Option(False, "--all", help="Check every version, not only the active one.")) -> None:
    """Check every file of the bank against its recorded sha256."""
    from ..storage import BankStore

    report = BankStore(bank, db).verify(all_versions=all_versions)
    problems = list(report.get("database", {}).get("errors", []))
    problems += [f"{version['id']}: {error}" for version in report["versions"] for error in version["errors"]]
    if problems or not report["ok"]:
        for line in problems:  # the report goes to stdout; stderr gets one line
            typer.echo(line)
        fail(f"bank {bank} failed verification: {problems[0] if problems else 'see above'}" + (f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""))
    checked = sum(len(v["files"]) for v in report["versions"])
    typer.echo(f"bank {bank} ok: {len(report['versions'])} version(s), {checked} file(s) match their checksums")


@app.command("adapt")
@friendly
def adapt(
    bank: Path = typer.Option(..., "--bank", help="Bank directory."),
    history: Path = typer.Option(..., "--history", help="history.json of the user."),
    user: Optional[str] = typer.Option(None, "--user", help="User id (overrides the file's user_id)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=0, max=MAX_INNER_STEPS, help=f"Inner steps, 0 to {MAX_INNER_STEPS} (default: the bank's)."),
    top: Optional[int] = typer.Option(None, "--top", min=1, help="How many recommendations (default 10; ranking banks)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ignore_unknown: bool = typer.Option(False, "--ignore-unknown", help="Ranking banks: skip catalogue ids the bank does not know (instead of failing)."),
    db: Optional[str] = typer.Option(None, "--db"),
    input: Optional[str] = typer.Option(None, "--input", help="Text bank: the input to predict for."),
    retrieve: Optional[int] = typer.Option(None, "--retrieve", min=0, help="Text bank: BM25 profile items put in the prompt (default: the bank's)."),
    precision: str = typer.Option("float32", "--precision", help="float32, or bfloat16 (encoder passes under bf16 autocast: ~1.7x the batched throughput measured on a CPU with AVX512-BF16; slower on CPUs without bf16 instructions)."),
    device: str = typer.Option("cpu", "--device", help="torch device for serving: cpu, cuda or cuda:N."),
) -> None:
    """Personalize one user from their history and print the top items not in it (a text bank: the prediction for --input)."""
    from ..config import check_precision
    from ..data.history import load_history, parse_history
    from ..errors import InvalidHistory, InvalidRequest
    from .text import adapt_text, is_text_bank

    check_precision(precision)  # before torch and the bank load
    if is_text_bank(bank, db):
        if precision != "float32":
            raise InvalidRequest("--precision applies to ranking banks; a text bank runs its causal LM in float32")
        if top is not None or ignore_unknown:
            raise InvalidRequest(f"{'--top' if top is not None else '--ignore-unknown'} applies to ranking banks; {bank} is a text bank (it predicts for --input)")
        return adapt_text(bank, history, input, retrieve, steps, as_json, user, db, device)
    if input is not None or retrieve is not None:
        from ..storage import BankStore

        BankStore(bank, db).open()  # a missing or broken bank reports itself (it is no ranking bank either)
        raise InvalidRequest(f"{'--input' if input is not None else '--retrieve'} applies to text banks; {bank} is a ranking bank (it ranks its catalogue)")
    top = 10 if top is None else top

    if user is not None:  # validated like a file's user_id, and named as the option
        try:
            parse_history({"user_id": user})
        except InvalidHistory as error:
            raise InvalidRequest(f"--user: {str(error).split('user_id: ', 1)[-1]}") from None
    parsed = load_history(history, user_id=user)  # a bad history is reported before torch and the bank load
    from ..bank.bank import Bank

    opened = Bank.open(bank, db, device=device, precision=precision)
    personalization = opened.personalize(parsed, steps=steps, ignore_unknown=ignore_unknown)
    if as_json:
        typer.echo(json.dumps(personalization.to_dict(top)))
        return
    anchors = ", ".join(f"#{a['anchor']} ({a['weight']:.2f})" for a in personalization.anchors) or "none (zero-history prior)"
    typer.echo(f"user {personalization.user_id}: anchors {anchors}; personalized in {personalization.timing_ms['total_ms']:.0f} ms")
    for rank, rec in enumerate(personalization.rank(top), 1):
        typer.echo(f"{rank:>3}. {rec.item_id:>8}  {rec.score:7.3f}  {rec.title}")


eval_app = typer.Typer(no_args_is_help=True, help="Quality evaluations (coldstart-v1 on MovieLens).")
app.add_typer(eval_app, name="eval")


@eval_app.command("movielens")
@friendly
def eval_movielens(
    out: Path = typer.Option(..., "--out", help="Directory for report.json, report.md and the PNG plots."),
    data: Optional[Path] = typer.Option(None, "--data", help="MovieLens directory (default: the shipped sample)."),
    format: str = typer.Option("auto", "--format"),
    bank: Optional[Path] = typer.Option(None, "--bank", help="A bank built on this dataset's train users, or on another MovieLens release (transfer: items matched by title or its other names); without it one is built with --preset when --methods holds a bank-based method (the classical baselines need none)."),
    reptile_bank: Optional[Path] = typer.Option(None, "--reptile-bank", help="Bank meta-trained with Reptile for pmeta-reptile; without it one is built with the --bank's config (or --preset) and meta=reptile into OUT/bank-reptile."),
    preset: str = typer.Option("tiny", "--preset", help="Preset of the banks built when --bank / --reptile-bank are not given."),
    k: str = typer.Option("1,3,5", "--k", help="Support sizes K."),
    mode: str = typer.Option("uni99,pop99,full", "--mode", help="Candidate modes, or auto: every mode all test users can draw (a small catalogue may not hold 99 sampled negatives; full ranking always works)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods; default: every method of a full report (pmeta.eval.runner.DEFAULT_METHODS)."),
    method_option: list[str] = typer.Option([], "--method-option", help="METHOD.KEY=VALUE passed to a method's class, e.g. per-user-lora.steps=10 (repeatable)."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the test-user split (the bank's), candidates and bootstrap."),
    users: Optional[int] = typer.Option(None, "--users", min=1, help="Evaluate only the first N test users (quick runs)."),
    resamples: Optional[int] = typer.Option(None, "--resamples", min=1, help="Bootstrap resamples of the users for the paired CIs and p-values (default 2000)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG plots."),
    transfer_prior: str = typer.Option("source", "--transfer-prior", help="A bank on another catalogue: source reads its time prior through the title match; target counts it again on --data's train users (those the ID baselines train on), with the bank's h and β; tuned also chooses h and β on a tenth of those users held out as validation users. Both need a bank with an exact time prior."),
    db: Optional[str] = typer.Option(None, "--db"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Run the cold-start protocol for pmeta and every baseline on held-out users."""
    from ..bank.bank import Bank
    from ..bank.build import build_bank
    from ..config import BankConfig, check_preset, load_config
    from ..data import load_sample
    from ..errors import InvalidConfig
    from ..eval.output import check_out_dir
    from ..eval.protocol import MODES
    from ..eval.runner import BANK_METHODS, DEFAULT_METHODS, REPTILE_METHODS, TRANSFER_PRIORS, check_request, drawable_run_modes, evaluation_users, run_movielens, write_report
    from ..eval.significance import BOOTSTRAP_RESAMPLES

    try:
        ks = tuple(int(x) for x in k.split(",") if x.strip())
    except ValueError:
        raise InvalidConfig(f"--k must be comma-separated integers, got {k!r}") from None
    modes = tuple(m.strip() for m in mode.split(",") if m.strip())
    auto = modes == ("auto",)
    if "auto" in modes and not auto:
        raise InvalidConfig(f"--mode auto chooses the modes itself; give it alone, got {mode!r}")
    unknown = [m for m in modes if m not in MODES and m != "auto"]
    if unknown:
        raise InvalidConfig(f"unknown candidate mode {unknown[0]!r}; expected one of {', '.join(MODES)}, or auto alone")
    modes = MODES if auto else modes
    method_list = list(DEFAULT_METHODS) if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
    if not method_list:
        raise InvalidConfig("--methods names no method")
    # everything checkable is checked before the dataset is read or a bank built
    options = check_request(method_list, ks, modes, _method_options(method_option), seed, BOOTSTRAP_RESAMPLES if resamples is None else resamples)
    check_preset(preset)  # also with --bank (then it is not used), so that a typo is never silently ignored
    if transfer_prior not in TRANSFER_PRIORS:
        raise InvalidConfig(f"--transfer-prior must be one of {', '.join(TRANSFER_PRIORS)}, got {transfer_prior!r}")
    _check_format(data, format)
    check_out_dir(out)
    dataset = _load_dataset(data, format)
    progress = _progress(quiet)
    opened = None if bank is None else Bank.open(bank, db)
    opened_reptile = None if reptile_bank is None else Bank.open(reptile_bank, db)
    if transfer_prior != "source" and (opened is None or opened.catalog.item_ids == dataset.catalog.item_ids):
        raise InvalidConfig(f"--transfer-prior {transfer_prior} needs a --bank built on another catalogue than --data's (a transfer)")
    # a given bank's held-out fraction is the run's (run_movielens), also for a bank built here
    held_out = {} if opened_reptile is None else {"test_fraction": opened_reptile.config.test_fraction}
    config = load_config(preset, overrides={"seed": seed, **held_out}) if opened is None else opened.config
    test_fraction = config.test_fraction
    # a dataset with nothing to evaluate fails before a bank is built
    if auto:
        modes, reason = drawable_run_modes(dataset, seed, test_fraction, users)
        if reason is not None:
            left_out = ", ".join(m for m in MODES if m not in modes)
            typer.echo(f"pmeta: --mode auto evaluates {','.join(modes)}, not {left_out}: {reason}", err=True)
    else:
        evaluation_users(dataset, modes, seed, test_fraction, users)
    needs_bank = bool(BANK_METHODS & set(method_list)) or (bool(REPTILE_METHODS & set(method_list)) and opened_reptile is None)
    if opened is None and needs_bank:  # the classical baselines need none (a build takes minutes)
        bank = out / "bank"
        build_bank(dataset, bank, config, db_url=db, progress=progress)
        opened = Bank.open(bank, db)
    if REPTILE_METHODS & set(method_list):
        if opened_reptile is None:
            # Same config as the MAML bank, only meta=reptile, on the dataset the MAML bank was built on.
            source = dataset
            if opened.record.get("dataset_fingerprint") != dataset.fingerprint:
                source = load_sample()
                if opened.record.get("dataset_fingerprint") != source.fingerprint:
                    raise InvalidConfig("pmeta-reptile needs --reptile-bank: the --bank was built on neither --data nor the shipped sample")
            reptile_bank = out / "bank-reptile"
            config = BankConfig(**{**opened.config.model_dump(), "meta": "reptile"})
            build_bank(source, reptile_bank, config, db_url=db, progress=progress)
            opened_reptile = Bank.open(reptile_bank, db)
    else:
        opened_reptile = None
    bootstrap = {} if resamples is None else {"resamples": resamples}
    report = run_movielens(dataset, opened, method_list, ks, modes, seed=seed, max_users=users, progress=progress, reptile_bank=opened_reptile, options=options, transfer_prior=transfer_prior, **bootstrap)
    write_report(report, out, plots=not no_plots)
    typer.echo((out / "report.md").read_text())


def _method_options(pairs: list[str]) -> dict[str, dict]:
    """``["per-user-lora.steps=10"]`` -> ``{"per-user-lora": {"steps": 10}}`` (values parsed as JSON when they are JSON)."""
    from ..errors import InvalidConfig

    options: dict[str, dict] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        method, _, key = name.partition(".")
        if not method or not key or not _:
            raise InvalidConfig(f"--method-option must look like METHOD.KEY=VALUE, got {pair!r}")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        options.setdefault(method, {})[key] = parsed
    return options


@app.command("bench")
@friendly
def bench(
    bank: Optional[list[Path]] = typer.Option(None, "--bank", help="Bank directory; give it twice (e.g. a MAML- and a Reptile-trained bank) to compare."),
    reptile_bank: Optional[Path] = typer.Option(None, "--reptile-bank", help="A second (Reptile-trained) bank, same as a second --bank."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    quick: bool = typer.Option(False, "--quick", help="Fewer repetitions and smaller sizes (no 1M-key retrieval); without --bank, builds two tiny banks."),
    db: Optional[str] = typer.Option(None, "--db"),
    device: str = typer.Option("cpu", "--device", help="torch device for serving: cpu, cuda or cuda:N."),
) -> None:
    """Latency, throughput, memory, retrieval at scale and the per-user-LoRA comparison on this machine."""
    from .. import bench as benchmark
    from ..models.device import resolve_device

    from ..errors import InvalidRequest
    from .text import is_text_bank

    resolve_device(device)
    banks = list(bank or []) + ([reptile_bank] if reptile_bank is not None else [])
    for path in banks:
        if is_text_bank(path, db):
            raise InvalidRequest(f"{path} is a text bank; pmeta bench measures ranking (MovieLens) banks")
    report = benchmark.run(banks, quick=quick, db_url=db, device=device)
    typer.echo(json.dumps(report, indent=2) if as_json else benchmark.format_table(report))
