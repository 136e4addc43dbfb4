"""Progress bars (rich) for long steps; silent when disabled or when stderr is not a terminal and
``PMETA_PROGRESS`` is unset. Library code calls ``progress.task(...)`` and never prints itself."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator


class _Silent:
    def advance(self, amount: float = 1, **info) -> None:
        pass


class _Bar:
    def __init__(self, bar, task_id) -> None:
        self.bar, self.task_id = bar, task_id

    def advance(self, amount: float = 1, **info) -> None:
        status = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        self.bar.update(self.task_id, advance=amount, status=status)


class Progress:
    def __init__(self, enabled: bool | None = None) -> None:
        if enabled is None:
            enabled = os.environ.get("PMETA_PROGRESS", "auto") == "1" or (os.environ.get("PMETA_PROGRESS", "auto") == "auto" and sys.stderr.isatty())
        self.enabled = enabled

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[_Bar | _Silent]:
        if not self.enabled:
            yield _Silent()
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        columns = [TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
        with RichProgress(*columns, console=Console(stderr=True)) as bar:
            yield _Bar(bar, bar.add_task(description, total=total, status=""))

    def log(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr)
