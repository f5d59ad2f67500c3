"""mix: all tokenized datasets merged into one train split and one validation split.

Reads every `tokenized.arrow` (inputs `train.N`, and `test.N` from `test_datasets`). Concatenates
in config order, optionally drops exact duplicates (`dataset_exact_deduplication`), shuffles with
`seed` (`shuffle_merged_datasets`) and holds out `val_set_size` (a fraction, or a row count when
>= 1) unless test datasets are given. Writes `train.arrow` and `val.arrow`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel

from stages.store import DataError, hash_text, read_table, write_table
from stages.context import QUIET, Context

SCHEMA = 1
LIBRARIES = ("pyarrow", "numpy")
INPUTS = {"tokenized": "tokenize"}  # every dataset's: roles train.N and test.N
COLUMNS = ["input_ids", "labels", "length"]


class Params(BaseModel, frozen=True):
    val_set_size: float = 0.0
    seed: int = 42
    shuffle_merged_datasets: bool = True
    dataset_exact_deduplication: bool = False


def _concat(paths: list[Path]):
    import pyarrow as pa

    tables = []
    for i, path in enumerate(paths):
        t = read_table(path / "tokenized.arrow").select(COLUMNS)
        tables.append(t.append_column("dataset", pa.array(np.full(t.num_rows, i, dtype=np.int32))))
    return pa.concat_tables(tables)


def _dedup(table):
    seen, keep = set(), []
    for i, (ids, labels) in enumerate(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist())):
        digest = hash_text(f"{ids}|{labels}")
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    return table.take(keep), table.num_rows - len(keep)


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    order = sorted(inputs, key=lambda k: (k.split(".")[0] != "train", int(k.split(".")[1])))
    train = _concat([inputs[k] for k in order if k.startswith("train.")])
    tests = [inputs[k] for k in order if k.startswith("test.")]
    val = _concat(tests) if tests else train.slice(0, 0)
    duplicates = 0
    if params.dataset_exact_deduplication:
        train, duplicates = _dedup(train)
    rng = np.random.default_rng(params.seed)
    if params.shuffle_merged_datasets:
        train = train.take(rng.permutation(train.num_rows))
    if not tests and params.val_set_size > 0:
        n_val = int(params.val_set_size) if params.val_set_size >= 1 else int(round(train.num_rows * params.val_set_size))
        if not 0 < n_val < train.num_rows:
            raise DataError(f"val_set_size {params.val_set_size} gives {n_val} validation rows out of {train.num_rows}; need at least 1 and fewer than all")
        val, train = train.slice(train.num_rows - n_val), train.slice(0, train.num_rows - n_val)
    write_table(train, out / "train.arrow")
    write_table(val, out / "val.arrow")
    return {"rows": train.num_rows, "val_rows": val.num_rows, "duplicates_dropped": duplicates}
