"""Fuzz targets for pmeta's readers, runnable as a script (hypothesis drives them).

    python -m pmeta.fuzz history                  # 10,000 generated inputs, seed 0
    python -m pmeta.fuzz history --examples 200000 --seed 7
    python -m pmeta.fuzz --list

A target takes one generated input and must either return normally (a valid result) or raise
the reader's typed error; anything else is a bug, reported with the smallest input hypothesis
finds. Targets register themselves in :data:`TARGETS` with :func:`target` (other readers add
theirs the same way). hypothesis is a test dependency: ``pip install hypothesis``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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
    counts: dict[str, int] = field(default_factory=dict)


TARGETS: dict[str, Target] = {}


def target(name: str, strategy: Callable[[], Any], description: str):
    """Register ``function(input) -> outcome label`` as the fuzz target ``name``."""

    def register(function: Callable[[Any], str]) -> Callable[[Any], str]:
        TARGETS[name] = Target(name, function, strategy, description)
        return function

    return register


# --------------------------------------------------------------------------------------- history
HISTORY_KEYS = ["user_id", "items", "item_id", "text", "rating", "timestamp", "extra"]


def history_inputs():
    """Arbitrary JSON values, history-shaped objects with hostile field values, their JSON text
    (with NaN/Infinity), and arbitrary bytes (binary, truncated, non-UTF-8)."""
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    json_values = st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=5) | st.dictionaries(st.sampled_from(HISTORY_KEYS) | st.text(max_size=5), children, max_size=6),
        max_leaves=30,
    )
    item = st.fixed_dictionaries(
        {},
        optional={
            "item_id": st.one_of(st.text(max_size=140), st.integers(), st.booleans(), st.floats(), st.none(), st.lists(st.integers(), max_size=2)),
            "text": st.one_of(st.text(max_size=30), st.integers(), st.none()),
            "rating": st.one_of(st.floats(), st.integers(-10, 10), st.booleans(), st.text(max_size=3), st.none()),
            "timestamp": st.one_of(st.integers(), st.floats(), st.booleans(), st.none()),
        },
    )
    user_ids = st.one_of(st.text(max_size=140), st.integers(), st.sampled_from([".", "..", "a/b", "a\\b", "\x00", "é", "\u2028"]))
    shaped = st.fixed_dictionaries({"user_id": user_ids}, optional={"items": st.lists(item, max_size=8)})
    as_text = st.one_of(json_values, shaped).map(lambda value: json.dumps(value).encode("utf-8"))
    truncated = st.tuples(as_text, st.integers(min_value=0)).map(lambda pair: pair[0][: pair[1] % (len(pair[0]) + 1)])
    return st.one_of(json_values, shaped, as_text, truncated, st.binary(max_size=300))


@target("history", history_inputs, "history.json: parse_history on values, load_history on bytes")
def fuzz_history(value: Any) -> str:
    from pmeta.data.history import UserHistory, load_history, parse_history
    from pmeta.errors import InvalidHistory

    try:
        if isinstance(value, bytes):
            handle, name = tempfile.mkstemp(suffix=".json")
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(value)
                result = load_history(name)
            finally:
                os.unlink(name)
        else:
            result = parse_history(value)
    except InvalidHistory as error:
        message = str(error)
        if not message or "\n" in message:
            raise AssertionError(f"InvalidHistory message is not one line: {message!r}") from None
        return "rejected"
    if not isinstance(result, UserHistory):
        raise AssertionError(f"returned {type(result).__name__}, not a UserHistory")
    return "valid"


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
    parser.add_argument("--examples", type=int, default=10_000, help="inputs to generate (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the targets")
    args = parser.parse_args(argv)
    _load_other_targets()
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
    report = run(args.target, args.examples, args.seed)
    print(json.dumps(report))
    return 0


#: Modules that register further targets with :func:`target` when imported.
TARGET_MODULES: tuple[str, ...] = ()


def _load_other_targets() -> None:
    import importlib

    for module in TARGET_MODULES:
        importlib.import_module(module)


if __name__ == "__main__":
    sys.exit(main())
