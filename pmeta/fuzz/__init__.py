"""Fuzz targets for what users hand pmeta, runnable as a script (hypothesis drives them).

    python -m pmeta.fuzz history                  # 10,000 generated inputs, seed 0
    python -m pmeta.fuzz history --examples 200000 --seed 7
    python -m pmeta.fuzz evaluation               # 200 inputs: each builds a bank (seconds)
    python -m pmeta.fuzz serving                  # 300 inputs through one bank (built first, a minute)
    python -m pmeta.fuzz text                     # 300 LaMP profiles through one text bank
    python -m pmeta.fuzz --list

A target takes one generated input and must either return normally (a valid result) or raise
the reader's typed error; anything else is a bug, reported with the smallest input hypothesis
finds. Targets register themselves in :data:`TARGETS` with :func:`target`, one module each
(``history``: history.json; ``movielens``: a MovieLens folder through ``pmeta eval movielens``'s
reader and classical evaluation; ``evaluation``: a small dataset through the rest of that command,
the bank build and every method; ``serving``: histories through an opened bank's personalization
and ranking, batched and one by one; ``text``: LaMP profiles through an opened text bank's
personalization, prompts and predictions). hypothesis is a test dependency: ``pip install hypothesis``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Target:
    name: str
    run: Callable[[Any], str]  # returns an outcome label ("valid", "rejected", ...)
    strategy: Callable[[], Any]  # builds the hypothesis strategy (imported lazily)
    description: str
    examples: int = 10_000  # inputs a run generates unless told
    counts: dict[str, int] = field(default_factory=dict)


TARGETS: dict[str, Target] = {}


def target(name: str, strategy: Callable[[], Any], description: str, examples: int = 10_000):
    """Register ``function(input) -> outcome label`` as the fuzz target ``name``."""

    def register(function: Callable[[Any], str]) -> Callable[[Any], str]:
        TARGETS[name] = Target(name, function, strategy, description, examples)
        return function

    return register


def one_line(error: BaseException) -> None:
    """Fail the target unless ``error``'s message is one non-empty line (what the CLI prints)."""
    message = str(error)
    if not message or "\n" in message or "\r" in message:
        raise AssertionError(f"{type(error).__name__} message is not one line: {message!r}") from None


def in_advised_modes(evaluate: Callable[[tuple[str, ...]], Any], modes: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
    """``(evaluate(modes), modes)``, retried with what a :class:`~pmeta.errors.ModesUnavailable`
    advises (the requested modes it names) until ``evaluate`` returns: what a user does with the
    message. Re-raises it when it names no requested mode or no fewer of them; its message must be
    one line and end with the advice its ``modes`` hold."""
    from pmeta.errors import ModesUnavailable

    while True:
        try:
            return evaluate(modes), modes
        except ModesUnavailable as error:
            one_line(error)
            assert str(error).endswith(f"--mode {','.join(error.modes)}") and "full" in error.modes, f"advice {error.modes} vs message {error}"
            usable = tuple(mode for mode in modes if mode in error.modes)
            if not usable or usable == modes:
                raise
            modes = usable


# ------------------------------------------------------------------------------------------ runner
def run(name: str, examples: int, seed: int) -> dict[str, Any]:
    """Run target ``name`` on ``examples`` generated inputs; return counts. Raises the first bug."""
    from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings

    chosen = TARGETS[name]
    chosen.counts = {}

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=False)
    @given(chosen.strategy())
    def check(value: Any) -> None:
        outcome = chosen.run(value)
        chosen.counts[outcome] = chosen.counts.get(outcome, 0) + 1

    started = time.perf_counter()
    check()
    return {"target": name, "examples": sum(chosen.counts.values()), "outcomes": dict(chosen.counts), "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pmeta.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", help="target name (see --list)")
    parser.add_argument("--examples", type=int, default=None, help="inputs to generate (default: the target's, 10000 for the readers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the targets")
    args = parser.parse_args(argv)
    if args.list or not args.target:
        for entry in TARGETS.values():
            print(f"{entry.name:12} {entry.description}")
        return 0
    if args.target not in TARGETS:
        print(f"pmeta.fuzz: error: unknown target {args.target!r}; choose one of {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        print("pmeta.fuzz: error: the fuzz targets need hypothesis (pip install hypothesis)", file=sys.stderr)
        return 2
    report = run(args.target, TARGETS[args.target].examples if args.examples is None else args.examples, args.seed)
    print(json.dumps(report))
    return 0


# The targets register themselves in TARGETS when their modules are imported.
from . import evaluation, history, movielens, serving, text  # noqa: E402, F401
from .history import fuzz_history, history_inputs  # noqa: E402, F401  (the names the tests use)
