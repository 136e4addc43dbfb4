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

app = typer.Typer(add_completion=False, no_args_is_help=True, help="pmeta: cold-start personalization from a bank of meta-learned adapters.")
bank_app = typer.Typer(no_args_is_help=True, help="Build, inspect and verify banks.")
app.add_typer(bank_app, name="bank")

_DEBUG = {"on": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."), threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = torch's default).")) -> None:
    _DEBUG["on"] = debug
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"pmeta: error: {message}", err=True)
    raise typer.Exit(code)


def friendly(command):
    """Turn pmeta's typed errors (and OS errors on user paths) into one line and exit code 2."""

    @wraps(command)
    def run(*args, **kwargs):
        from ..errors import PmetaError

        try:
            return command(*args, **kwargs)
        except typer.Exit:
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
    format: str = typer.Option("auto", "--format", help="auto, ml-100k, ml-1m or ml-latest."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with bank settings (top level or a [bank] table)."),
    preset: str = typer.Option("default", "--preset", help="tiny (seconds, for tests), small (a few minutes) or default."),
    anchors: Optional[int] = typer.Option(None, "--anchors", help="Number of anchors."),
    meta: Optional[str] = typer.Option(None, "--meta", help="maml, fomaml or reptile."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (also selects the held-out test users)."),
    db: Optional[str] = typer.Option(None, "--db", help="SQLAlchemy URL of the metadata DB (default: SQLite inside the bank)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Meta-train a bank on a dataset's train users and publish it as a new version."""
    from ..bank.build import build_bank
    from ..config import load_config

    cfg = load_config(preset, config, {"anchors": anchors, "meta": meta, "seed": seed})
    dataset = _load_dataset(data, format)
    result = build_bank(dataset, out, cfg, db_url=db, progress=_progress(quiet))
    final = result.validation.get("final", {})
    typer.echo(
        f"built bank version {result.version} in {result.seconds:.0f}s: {result.train_users} train users, "
        f"{result.test_users} held-out test users; validation HR@10 (full ranking, K=5) {final.get('hr@10', float('nan')):.3f}"
    )


@bank_app.command("info")
@friendly
def bank_info(bank: Path = typer.Argument(..., help="Bank directory."), db: Optional[str] = typer.Option(None, "--db"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Versions, the active one, sizes and the active version's settings."""
    from ..storage import BankStore

    info = BankStore(bank, db).info()
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
    problems = [f"{version['id']}: {error}" for version in report["versions"] for error in version["errors"]]
    if problems or not report["ok"]:
        for line in problems:
            typer.echo(line, err=True)
        fail(f"bank {bank} failed verification ({len(problems)} problem(s))")
    checked = sum(len(v["files"]) for v in report["versions"])
    typer.echo(f"bank {bank} ok: {len(report['versions'])} version(s), {checked} file(s) match their checksums")


@app.command("adapt")
@friendly
def adapt(
    bank: Path = typer.Option(..., "--bank", help="Bank directory."),
    history: Path = typer.Option(..., "--history", help="history.json of the user."),
    user: Optional[str] = typer.Option(None, "--user", help="User id (overrides the file's user_id)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=0, help="Inner steps (default: the bank's)."),
    top: int = typer.Option(10, "--top", min=1, help="How many recommendations."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ignore_unknown: bool = typer.Option(False, "--ignore-unknown", help="Skip catalogue ids the bank does not know (instead of failing)."),
    db: Optional[str] = typer.Option(None, "--db"),
) -> None:
    """Personalize one user from their history and print the top items not in it."""
    from ..bank.bank import Bank
    from ..data.history import load_history, parse_history

    parsed = load_history(history)
    if user is not None:  # validated like the file's own user_id
        parsed = parse_history({**parsed.model_dump(), "user_id": user})
    opened = Bank.open(bank, db)
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
    out: Path = typer.Option(..., "--out", help="Directory for report.json and report.md."),
    data: Optional[Path] = typer.Option(None, "--data", help="MovieLens directory (default: the shipped sample)."),
    format: str = typer.Option("auto", "--format"),
    bank: Optional[Path] = typer.Option(None, "--bank", help="A bank built on this dataset's train users; without it one is built with --preset."),
    preset: str = typer.Option("tiny", "--preset", help="Preset of the bank built when --bank is not given."),
    k: str = typer.Option("1,3,5", "--k", help="Support sizes K."),
    mode: str = typer.Option("uni99,pop99,full", "--mode", help="Candidate modes."),
    methods: str = typer.Option("random,popularity,itemknn,ease,pmeta-no-steps,pmeta", "--methods"),
    seed: int = typer.Option(0, "--seed"),
    users: Optional[int] = typer.Option(None, "--users", min=1, help="Evaluate only the first N test users (quick runs)."),
    db: Optional[str] = typer.Option(None, "--db"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Run the cold-start protocol for pmeta and the baselines on held-out users."""
    from ..bank.bank import Bank
    from ..bank.build import build_bank
    from ..config import load_config
    from ..errors import InvalidConfig
    from ..eval.runner import run_movielens, write_report

    try:
        ks = tuple(int(x) for x in k.split(","))
    except ValueError:
        raise InvalidConfig(f"--k must be comma-separated integers, got {k!r}") from None
    modes = tuple(m.strip() for m in mode.split(",") if m.strip())
    dataset = _load_dataset(data, format)
    if bank is None:
        bank = out / "bank"
        build_bank(dataset, bank, load_config(preset, overrides={"seed": seed}), db_url=db, progress=_progress(quiet))
    opened = Bank.open(bank, db)
    progress = _progress(quiet)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    with progress.task("evaluating", None) as bar:
        report = run_movielens(dataset, opened, method_list, ks, modes, seed=seed, max_users=users, progress=lambda done, total: bar.advance(1))
    write_report(report, out)
    typer.echo((out / "report.md").read_text())


@app.command("bench")
@friendly
def bench(
    bank: Path = typer.Option(..., "--bank", help="Bank directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    quick: bool = typer.Option(False, "--quick", help="Fewer repetitions."),
    db: Optional[str] = typer.Option(None, "--db"),
) -> None:
    """Latency, throughput, memory and storage of a bank on this machine."""
    from .. import bench as benchmark

    report = benchmark.run(bank, quick=quick, db_url=db)
    typer.echo(json.dumps(report, indent=2) if as_json else benchmark.format_table(report))
