"""Console output shared by the CLI and stages: one rich console on stderr, progress bars."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


@contextmanager
def progress(description: str, total: int):
    """Yields `advance(n)`; the bar disappears when done so logs stay short."""
    bar = Progress(
        TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=not console.is_terminal,  # no bar frames in logs
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
