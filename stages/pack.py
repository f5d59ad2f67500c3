"""pack: training rows laid out as model inputs, several samples per row when `sample_packing`.

Reads `train.arrow` / `val.arrow` from mix. With packing, samples are placed first-fit-decreasing
into rows of `sequence_len` tokens; `position_ids` restart at 0 for each sample, which is how the
model tells samples apart (transformers builds a block-diagonal mask from them), and each
sample's first label is masked so no token is trained to predict across a boundary. Writes
`train.arrow` and `val.arrow` with input_ids, labels, position_ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel

from stages.store import read_table, write_table

SCHEMA = 1
LIBRARIES = ("pyarrow", "numpy")
IGNORE = -100


class Params(BaseModel, frozen=True):
    sample_packing: bool = False
    sequence_len: int


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order.tolist():
        n = int(lengths[i])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def _layout(table, bins: list[list[int]]):
    import pyarrow as pa

    ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    out = {"input_ids": [], "labels": [], "position_ids": []}
    for members in bins:
        row_ids, row_labels, row_pos = [], [], []
        for i in members:
            row_ids += ids[i]
            row_labels += [IGNORE] + labels[i][1:]
            row_pos += range(len(ids[i]))
        out["input_ids"].append(row_ids)
        out["labels"].append(row_labels)
        out["position_ids"].append(row_pos)
    return pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in out.items()})


def run(params: Params, inputs: dict[str, Path], out: Path) -> dict:
    stats = {}
    for split in ("train", "val"):
        table = read_table(inputs["dataset"] / f"{split}.arrow")
        lengths = table.column("length").to_numpy()
        if params.sample_packing:
            bins = first_fit_decreasing(lengths, params.sequence_len)
        else:
            bins = [[i] for i in range(table.num_rows)]
        write_table(_layout(table, bins), out / f"{split}.arrow")
        slots = len(bins) * params.sequence_len
        stats[split] = {"samples": int(table.num_rows), "rows": len(bins), "tokens": int(lengths.sum()), "efficiency": round(float(lengths.sum()) / slots, 4) if slots else None}
    return {"rows": stats["train"]["rows"], "packing": stats}
