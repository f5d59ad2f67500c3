"""What the runner hands a stage's `run(params, inputs, out, ctx)` besides its params and inputs.

Nothing here shapes an artifact's bytes: where the process sits in a launch (rank, world size),
a folder that outlives a killed run (checkpoints), and where to report (progress bars, messages).
The runner fills it in (stages/ui.py draws the bars); a stage called directly gets `QUIET`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager


@contextmanager
def _no_bar(description: str, total: int):
    yield lambda n=1: None


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    # per key, kept until the artifact is committed (None: the stage was called outside a runner)
    checkpoints: Path | None = None
    # progress(description, total) is a context manager yielding advance(n=1)
    progress: Callable[[str, int], ContextManager[Callable[..., None]]] = _no_bar
    log: Callable[[str], None] = field(default=lambda message: None)


QUIET = Context()
