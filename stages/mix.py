"""mix: all tokenized datasets merged into one train split and one validation split.

Reads every `tokenized.arrow` (inputs `train.N`, and `test.N` from `test_datasets`). Concatenates
in config order, optionally drops exact duplicates (`dataset_exact_deduplication`), shuffles with
`seed` (`shuffle_merged_datasets`) and holds out `val_set_size` (a fraction, its row count rounded
up as `datasets`' train_test_split does, or a row count when >= 1) unless test datasets are given.
Writes `train.arrow` and `val.arrow`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stages.config import stage_params
from stages.store import DataError, hash_text, read_table, write_table
from stages.context import QUIET, Context

SCHEMA = 1
LIBRARIES = ("pyarrow", "numpy")
INPUTS = {"tokenized": ("tokenize", "tokenize_preference")}  # every dataset's: roles train.N and test.N


Params = stage_params("val_set_size", "seed", "shuffle_merged_datasets", "dataset_exact_deduplication")


def _concat(paths: list[Path], names: list[str]):
    """The datasets' rows one after another, with the dataset's position in a `dataset` column.
    Any columns pass (supervised ids and labels, preference pairs, ...), the same in every dataset."""
    import pyarrow as pa

    # `row` (the row's number in its source file) says where a row came from, not what it is
    tables = [_without(read_table(path / "tokenized.arrow"), "row") for path in paths]
    for name, t in zip(names, tables):
        if t.schema != tables[0].schema:
            raise DataError(f"{name} has the columns {t.schema.names} ({t.schema.types}), {names[0]} has {tables[0].schema.names} ({tables[0].schema.types}): datasets mixed into one training set must have the same shape of rows")
    return pa.concat_tables([t.append_column("dataset", pa.array(np.full(t.num_rows, i, dtype=np.int32))) for i, t in enumerate(tables)])


def _without(table, column: str):
    return table.drop_columns([column]) if column in table.column_names else table


def _dedup(table):
    columns = [c for c in table.column_names if c != "dataset"]
    seen, keep = set(), []
    for i, row in enumerate(zip(*(table.column(c).to_pylist() for c in columns))):
        digest = hash_text(repr(row))
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    return table.take(keep), table.num_rows - len(keep)


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    order = sorted(inputs, key=lambda k: (k.split(".")[0] != "train", int(k.split(".")[1])))
    train_roles, test_roles = [k for k in order if k.startswith("train.")], [k for k in order if k.startswith("test.")]
    train = _concat([inputs[k] for k in train_roles], [f"datasets[{k.split('.')[1]}]" for k in train_roles])
    val = _concat([inputs[k] for k in test_roles], [f"test_datasets[{k.split('.')[1]}]" for k in test_roles]) if test_roles else train.slice(0, 0)
    duplicates = 0
    if params.dataset_exact_deduplication:
        train, duplicates = _dedup(train)
    rng = np.random.default_rng(params.seed)
    if params.shuffle_merged_datasets:
        train = train.take(rng.permutation(train.num_rows))
    if not test_roles and params.val_set_size > 0:
        # a fraction's count as datasets' train_test_split takes it: the test share rounded up, the rest trains
        n_val = int(params.val_set_size) if params.val_set_size >= 1 else math.ceil(params.val_set_size * train.num_rows)
        if not 0 < n_val < train.num_rows:
            raise DataError(f"val_set_size {params.val_set_size} gives {n_val} validation rows out of {train.num_rows}; need at least 1 and fewer than all")
        val, train = train.slice(train.num_rows - n_val), train.slice(0, train.num_rows - n_val)
    write_table(train, out / "train.arrow")
    write_table(val, out / "val.arrow")
    return {"rows": train.num_rows, "val_rows": val.num_rows, "duplicates_dropped": duplicates}
