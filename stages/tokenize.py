"""tokenize: one dataset's formatted text turned into `input_ids` and `labels`.

Reads `formatted.arrow` and the tokenizer (`tokenizer.json`, through the `tokenizers` library, so
no model code is loaded). Each row's segments are joined and encoded in one call with character
offsets; a token is trained when it covers a trained character, otherwise its label is -100
(`train_on_inputs` trains every token). Rows longer than `sequence_len` are dropped, truncated
or refused (`excess_length_strategy`); rows under 2 tokens or with nothing to train are dropped
and counted. Writes `tokenized.arrow` (input_ids, labels, length, row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel

from stages.store import DataError, read_table, write_table
from stages.ui import progress

SCHEMA = 1
LIBRARIES = ("tokenizers", "pyarrow", "numpy")
BATCH = 1024
IGNORE = -100


class Params(BaseModel, frozen=True):
    sequence_len: int
    train_on_inputs: bool = False
    excess_length_strategy: Literal["drop", "truncate", "raise"] | None = None


def labels_for(segments: list[dict], offsets: list[tuple[int, int]], ids: list[int], train_all: bool) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if train_all:
        return ids.copy()
    trained = np.concatenate([np.full(len(s["text"]), s["train"], dtype=np.int32) for s in segments] + [np.zeros(1, np.int32)])
    covered = np.concatenate([[0], np.cumsum(trained)])
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    ends = np.maximum(spans[:, 1], spans[:, 0] + 1)
    hit = covered[ends] - covered[spans[:, 0]] > 0
    return np.where(hit, ids, IGNORE)


def run(params: Params, inputs: dict[str, Path], out: Path) -> dict:
    import pyarrow as pa
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(inputs["tokenizer"] / "tokenizer.json"))
    table = read_table(inputs["formatted"] / "formatted.arrow")
    strategy = params.excess_length_strategy or "drop"
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "row": []}
    dropped = {"too_long": 0, "too_short": 0, "nothing_trained": 0}
    truncated = 0
    with progress("tokenize", table.num_rows) as advance:
        for offset in range(0, table.num_rows, BATCH):
            batch = table.slice(offset, BATCH)
            rows = batch.column("row").to_pylist()
            all_segments = batch.column("segments").to_pylist()
            encodings = tokenizer.encode_batch(["".join(s["text"] for s in segs) for segs in all_segments], add_special_tokens=False)
            for source_row, segments, enc in zip(rows, all_segments, encodings):
                ids = enc.ids
                labels = labels_for(segments, enc.offsets, ids, params.train_on_inputs)
                if len(ids) > params.sequence_len:
                    if strategy == "raise":
                        raise DataError(f"row {source_row}: {len(ids)} tokens, over sequence_len {params.sequence_len} (excess_length_strategy: raise)")
                    if strategy == "drop":
                        dropped["too_long"] += 1
                        continue
                    ids, labels = ids[: params.sequence_len], labels[: params.sequence_len]
                    truncated += 1
                if len(ids) < 2:
                    dropped["too_short"] += 1
                    continue
                if not (labels != IGNORE).any():
                    dropped["nothing_trained"] += 1
                    continue
                columns["input_ids"].append(ids)
                columns["labels"].append(labels)
                columns["length"].append(len(ids))
                columns["row"].append(source_row)
            advance(batch.num_rows)
    result = pa.table(
        {
            "input_ids": pa.array(columns["input_ids"], type=pa.list_(pa.int32())),
            "labels": pa.array(columns["labels"], type=pa.list_(pa.int32())),
            "length": pa.array(columns["length"], type=pa.int32()),
            "row": pa.array(columns["row"], type=pa.int64()),
        }
    )
    if result.num_rows == 0:
        raise DataError(f"no rows left after tokenizing (dropped: {dropped}); check sequence_len and the dataset's trained turns")
    write_table(result, out / "tokenized.arrow")
    return {"rows": result.num_rows, "dropped": dropped, "truncated": truncated, "tokens": int(sum(columns["length"]))}
