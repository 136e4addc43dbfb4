"""``pmeta data ...``: dataset conversions (Amazon reviews into LaMP-format tasks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .app import MAX_SEED, app, friendly

data_app = typer.Typer(no_args_is_help=True, help="Convert datasets into the formats pmeta reads.")
app.add_typer(data_app, name="data")


@data_app.command("reviews-to-lamp")
@friendly
def reviews_to_lamp_command(
    input: Path = typer.Option(..., "--input", help="Amazon 2014 review JSON lines: a .json, .json.gz or a .zip holding one .json file."),
    task: str = typer.Option(..., "--task", help="rating (LaMP-3 style: review text -> stars) or title (LaMP-4/5 style: review text -> the user's summary line)."),
    out: Path = typer.Option(..., "--out", help="Output directory (created; replaced only if empty or an earlier output of this command)."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the user split."),
    k_max: int = typer.Option(5, "--k-max", help="Profile items kept for dev and test (cold-start) users."),
    max_users: Optional[int] = typer.Option(None, "--max-users", help="Keep only the first N users of the seeded order."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of users held out as test users."),
    dev_fraction: float = typer.Option(0.1, "--dev-fraction", help="Share of users held out as dev users."),
    max_text_chars: int = typer.Option(2000, "--max-text-chars", help="Clip review texts to this many characters (at a word boundary)."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
) -> None:
    """Turn Amazon review JSON lines into LaMP-format train/dev/test files, split by user."""
    from ..data.reviews import reviews_to_lamp

    counts = reviews_to_lamp(
        input, task, out, seed=seed, k_max=k_max, max_users=max_users, test_fraction=test_fraction,
        dev_fraction=dev_fraction, max_text_chars=max_text_chars,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(counts, indent=2))
        return
    parts = ", ".join(f"{split} {c['users']} users (avg profile {c['avg_profile']:.2f})" for split, c in counts["splits"].items())
    typer.echo(f"wrote {counts['lamp_task']}-style {task} task to {out} in {counts['seconds']:.1f}s: {parts}; {counts['reviews_read']} reviews read, {counts['reviews_unusable']} unusable")
