"""`dataset_processes`: a stage's rows split into contiguous ranges, each handled by a worker
process, the results kept in row order.

Each range is computed exactly as a single process computes it, so an artifact's bytes do not
depend on the number of processes (the setting is no part of any key). Workers are spawned, not
forked, unless the stage says its workers never touch the tokenizer library: the parent may hold
the tokenizer's threads, which a fork would copy in an unknown state (and the library turns its
parallelism off in a forked child).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Callable

# Below this many rows per process, a worker's start-up (its imports) costs more than it saves.
MIN_ROWS_PER_PROCESS = 4096
# With `dataset_processes` unset, a stage first does this many rows itself and starts workers only
# if the rest, at that pace, would take longer than their start-up (spawning, importing pyarrow,
# pandas and the stage) saves. Rows differ tenfold in cost between formats: measured on 2 cores,
# workers made 20,000 alpaca rows 5x slower to format and 20,000 chats 1.3x slower.
PROBE_ROWS = 2048
WORKER_START_SECONDS = 1.5
FORKED_WORKER_START_SECONDS = 0.1  # a fork shares the parent's imports


def processes_for(rows: int, setting: int | None) -> int:
    """How many processes to use: `dataset_processes` (default: the CPU count, as Axolotl's, for
    the rows a probe finds worth it: `map_ranges`), never more than the rows keep busy."""
    wanted = setting or os.cpu_count() or 1
    return max(1, min(wanted, rows // MIN_ROWS_PER_PROCESS))


def ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    size, extra = divmod(rows, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def map_ranges(fn: Callable, rows: int, processes: int, args: tuple, advance: Callable[[int], None], probe: bool = False,
               forkable: bool = False) -> list:
    """[fn(start, stop, *args) for each range], in row order. In one process `fn` gets `advance`
    for its progress; with workers the parent advances as each range comes back. A worker's error
    is raised for the first failing range, so the message names the same row as one process would.
    `probe`: time the first PROBE_ROWS here, then start workers only if they pay for the rest.
    `forkable`: `fn` never uses the tokenizer library, so workers may be forked (on Linux)."""
    if processes <= 1:
        return [fn(0, rows, *args, advance=advance)]
    fork = forkable and sys.platform == "linux"
    start_seconds = FORKED_WORKER_START_SECONDS if fork else WORKER_START_SECONDS
    results, first = [], 0
    if probe:
        first = min(rows, PROBE_ROWS)
        began = time.perf_counter()
        results.append(fn(0, first, *args, advance=advance))
        rest = (time.perf_counter() - began) / first * (rows - first)
        if rest - rest / processes <= start_seconds:  # p workers: start-up + rest / p
            return results + ([fn(first, rows, *args, advance=advance)] if rows > first else [])
    pool = ProcessPoolExecutor(processes, mp_context=get_context("fork" if fork else "spawn"))
    try:
        futures = [(pool.submit(fn, first + start, first + stop, *args), stop - start) for start, stop in ranges(rows - first, processes)]
        for future, size in futures:
            results.append(future.result())
            advance(size)
        return results
    finally:
        pool.shutdown(cancel_futures=True)
