"""tokenize: one dataset's formatted text turned into `input_ids` and `labels`.

Reads `formatted.arrow` and the tokenizer (`tokenizer.json`, through the `tokenizers` library, so
no model code is loaded). Each row's segments are joined and encoded in one call with character
offsets; a token is trained when it covers a trained character, otherwise its label is -100
(`train_on_inputs` trains every token; a message_field_training_detail span trains the tokens
Axolotl's rule picks, see _detail_tokens). Rows longer than `sequence_len` are dropped, truncated
or refused (`excess_length_strategy`); rows under `min_sample_len` tokens (2) or with nothing to train are dropped
and counted. The format stage says per row how to encode (`mode`): joined as above; `separate`
encodes each segment on its own (input_output); `prefix` as separate, but an untrained segment
and the trained one after it are encoded in one piece, and as many leading tokens masked as the
untrained text has alone (reflection, pygmalion); `chunk` splits a long text into `sequence_len`
pieces instead of dropping it (completion); `tokens` takes the row's own input_ids / labels
(pretokenized), checked against the vocabulary. Writes `tokenized.arrow` (input_ids, labels,
length, row). `dataset_processes` worker processes share the rows (same bytes for any number).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages import origin, workers
from stages.config import stage_params
from stages.store import DataError, read_table, write_table
from stages.context import QUIET, Context

SCHEMA = 1
LIBRARIES = ("tokenizers", "pyarrow", "numpy")
PER_DATASET = True
INPUTS = {"formatted": "format", "tokenizer": "tokenizer"}
BATCH = 1024
IGNORE = -100


# dataset_processes: how many worker processes; the output is the same for any number, so it is not in the key
Params = stage_params("sequence_len", "train_on_inputs", "excess_length_strategy", "min_sample_len", unkeyed=("dataset_processes",))


def labels_for(segments: list[dict], offsets: list[tuple[int, int]], ids: list[int], train_all: bool) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if train_all:
        return ids.copy()
    by_coverage = [s["train"] and not s.get("detail") for s in segments]
    trained = np.concatenate([np.full(len(s["text"]), t, dtype=np.int32) for s, t in zip(segments, by_coverage)] + [np.zeros(1, np.int32)])
    covered = np.concatenate([[0], np.cumsum(trained)])
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    ends = np.maximum(spans[:, 1], spans[:, 0] + 1)
    hit = covered[ends] - covered[spans[:, 0]] > 0
    start = 0
    for s in segments:
        if s["train"] and s.get("detail") and s["text"] and len(spans):
            hit |= _detail_tokens(spans, start, start + len(s["text"]) - 1)
        start += len(s["text"])
    return np.where(hit, ids, IGNORE)


def _detail_tokens(spans: np.ndarray, begin: int, end: int) -> np.ndarray:
    """Tokens a training-detail span [begin, end] (inclusive) trains, by Axolotl's rule: each token
    reaches up to the next token's start; the span grows to the token holding `begin` unless
    `begin` is that token's last character, and to the token holding `end` unless `end` is that
    token's first character."""
    starts = spans[:, 0]
    last = np.append(starts[1:] - 1, spans[-1, 1] - 1)  # each token's last character
    n = len(starts)
    first = int(np.argmax(starts >= begin)) if (starts >= begin).any() else n
    if first > 0 and last[first - 1] > begin:
        first -= 1
    within = np.nonzero(last <= end)[0]
    final = int(within[-1]) if len(within) else -1
    if final < n - 1 and starts[final + 1] < end:
        final += 1
    hit = np.zeros(n, dtype=bool)
    hit[first : final + 1] = True
    return hit


def _encode(tokenizer, segments_batch: list[list[dict]], modes: list[str], train_all: bool) -> list[tuple[list[int], np.ndarray]]:
    """(ids, labels) per row, batched encode calls per mode: joined rows (and chunked ones)
    encode their whole text with character offsets; separate rows encode each segment alone;
    prefix rows as _encode_prefixed says."""
    out: list = [None] * len(modes)
    joined = [i for i, m in enumerate(modes) if m in ("joined", "chunk")]
    encodings = tokenizer.encode_batch(["".join(s["text"] for s in segments_batch[i]) for i in joined], add_special_tokens=False)
    for i, enc in zip(joined, encodings):
        out[i] = (enc.ids, labels_for(segments_batch[i], enc.offsets, enc.ids, train_all))
    prefixed = [i for i, m in enumerate(modes) if m == "prefix"]
    if prefixed:
        _encode_prefixed(tokenizer, segments_batch, prefixed, train_all, out)
    separate = [i for i, m in enumerate(modes) if m == "separate"]
    pieces = [s for i in separate for s in segments_batch[i]]
    encoded = iter(tokenizer.encode_batch([s["text"] for s in pieces], add_special_tokens=False) if pieces else [])
    for i in separate:
        ids, labels = [], []
        for segment in segments_batch[i]:
            piece = next(encoded).ids
            ids += piece
            labels += piece if segment["train"] or train_all else [IGNORE] * len(piece)
        out[i] = (ids, np.asarray(labels, dtype=np.int64))
    return out


def _encode_prefixed(tokenizer, segments_batch: list[list[dict]], rows: list[int], train_all: bool, out: list) -> None:
    """`prefix` rows: each piece (an untrained segment with the trained one after it, or a lone
    segment) encoded alone; the first as many tokens as its untrained text has alone are masked."""
    pieces: list[tuple[int, str, str]] = []  # (row, text, its masked head)
    for i in rows:
        segments, k = segments_batch[i], 0
        while k < len(segments):
            head = segments[k]
            if not head["train"] and k + 1 < len(segments) and segments[k + 1]["train"]:
                pieces.append((i, head["text"] + segments[k + 1]["text"], head["text"]))
                k += 2
            else:
                pieces.append((i, head["text"], "" if head["train"] else head["text"]))
                k += 1
    texts = tokenizer.encode_batch([p[1] for p in pieces], add_special_tokens=False)
    heads = tokenizer.encode_batch([p[2] for p in pieces], add_special_tokens=False)
    built: dict[int, tuple[list, list]] = {i: ([], []) for i in rows}
    for (i, _, _), text, head in zip(pieces, texts, heads):
        ids, labels = built[i]
        masked = 0 if train_all else min(len(head.ids), len(text.ids))
        ids += text.ids
        labels += [IGNORE] * masked + text.ids[masked:]
    for i, (ids, labels) in built.items():
        out[i] = (ids, np.asarray(labels, dtype=np.int64))


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401  (pa.compute below)

    rows = read_table(inputs["formatted"] / "formatted.arrow").num_rows
    with ctx.progress("tokenize", rows) as advance:
        parts = workers.map_ranges(_tokenize_rows, rows, workers.processes_for(rows, params.dataset_processes),
                                   (params, inputs["formatted"], inputs["tokenizer"]), advance)
    result = pa.concat_tables([table for table, _ in parts])
    dropped = {k: sum(counts["dropped"][k] for _, counts in parts) for k in ("too_long", "too_short", "nothing_trained")}
    truncated, chunked = (sum(counts[k] for _, counts in parts) for k in ("truncated", "chunked"))
    _say_dropped(ctx, dropped, [counts["first"] for _, counts in parts], rows, params, inputs["formatted"])
    if result.num_rows == 0:
        raise DataError(f"no rows left after tokenizing (dropped: {dropped}); check sequence_len and the dataset's trained turns")
    write_table(result, out / "tokenized.arrow")
    stats = {"rows": result.num_rows, "dropped": dropped, "truncated": truncated, "tokens": int(pa.compute.sum(result.column("length")).as_py() or 0)}
    if chunked:
        stats["chunked"] = chunked
    return stats


WHY_DROPPED = {
    "too_long": "longer than sequence_len {sequence_len} tokens (excess_length_strategy: drop; raise sequence_len or set "
                "excess_length_strategy: truncate to keep them)",
    "too_short": "under {min_sample_len} tokens (min_sample_len)",
    "nothing_trained": "with no trained token (check roles_to_train / train_on_inputs)",
}


def _say_dropped(ctx: Context, dropped: dict[str, int], firsts: list[dict[str, int]], rows: int, params: Params, formatted: Path) -> None:
    """One line per kind of dropped row, as Axolotl says how many long samples it dropped."""
    for kind, count in dropped.items():
        if count:
            row = min(f[kind] for f in firsts if kind in f)
            why = WHY_DROPPED[kind].format(sequence_len=params.sequence_len, min_sample_len=params.min_sample_len)
            ctx.log(f"tokenize: dropped {count} of {rows} rows {why}; the first is {origin.where(formatted, row)}")


def _tokenize_rows(start: int, stop: int, params: Params, formatted: Path, tokenizer_dir: Path, advance=None):
    """Rows [start, stop) of the formatted table tokenized (in a worker process or in the stage's
    own): the Arrow table of kept rows and the counts of dropped, truncated and chunked ones."""
    import pyarrow as pa
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    table = read_table(formatted / "formatted.arrow").slice(start, stop - start)
    strategy = params.excess_length_strategy or "drop"
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("length", pa.int32()), ("row", pa.int64())])
    columns: dict[str, list] = {name: [] for name in schema.names}
    batches: list = []

    def flush() -> None:  # one Arrow batch per input batch: Python lists never hold the whole dataset
        batches.append(pa.record_batch([pa.array(columns[f.name], type=f.type) for f in schema], schema=schema))
        for values in columns.values():
            values.clear()

    counts = {"dropped": {"too_long": 0, "too_short": 0, "nothing_trained": 0}, "truncated": 0, "chunked": 0, "first": {}}
    dropped = counts["dropped"]
    first: dict[str, int] = counts["first"]  # the first dropped row of each kind, for the message

    def keep(source_row: int, ids, labels) -> None:
        if len(ids) < params.min_sample_len:
            dropped["too_short"] += 1
            first.setdefault("too_short", source_row)
        elif not (np.asarray(labels) != IGNORE).any():
            dropped["nothing_trained"] += 1
            first.setdefault("nothing_trained", source_row)
        else:
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
            columns["length"].append(len(ids))
            columns["row"].append(source_row)

    for offset in range(0, table.num_rows, BATCH):
        batch = table.slice(offset, BATCH)
        rows = batch.column("row").to_pylist()
        modes = batch.column("mode").to_pylist()
        all_segments = batch.column("segments").to_pylist()
        encoded = _encode(tokenizer, all_segments, modes, params.train_on_inputs)
        given_ids = batch.column("input_ids").to_pylist() if "tokens" in modes else None
        given_labels = batch.column("labels").to_pylist() if "tokens" in modes else None
        for k, (source_row, mode) in enumerate(zip(rows, modes)):
            if mode == "tokens":
                ids = given_ids[k]
                if max(ids) >= vocab:
                    raise DataError(f"{origin.where(formatted, source_row)}: field 'input_ids': token id {max(ids)} is outside the tokenizer's vocabulary of {vocab}")
                labels = np.asarray(ids if params.train_on_inputs else given_labels[k], dtype=np.int64)
            else:
                ids, labels = encoded[k]
            if mode == "chunk":  # completion: every piece of sequence_len tokens becomes a row
                counts["chunked"] += len(ids) > params.sequence_len
                for c in range(0, len(ids), params.sequence_len):
                    keep(source_row, ids[c : c + params.sequence_len], labels[c : c + params.sequence_len])
                continue
            if len(ids) > params.sequence_len:
                if strategy == "raise":
                    raise DataError(f"{origin.where(formatted, source_row)}: {len(ids)} tokens, over sequence_len {params.sequence_len} (excess_length_strategy: raise)")
                if strategy == "drop":
                    dropped["too_long"] += 1
                    first.setdefault("too_long", source_row)
                    continue
                ids, labels = ids[: params.sequence_len], labels[: params.sequence_len]
                counts["truncated"] += 1
            keep(source_row, ids, labels)
        flush()
        if advance:
            advance(batch.num_rows)
    return pa.Table.from_batches(batches, schema=schema), counts
