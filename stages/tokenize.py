"""tokenize: one dataset's formatted text turned into `input_ids` and `labels`.

Reads `formatted.arrow` and the tokenizer (`tokenizer.json`, through the `tokenizers` library, so
no model code is loaded). Each row's segments are joined and encoded in one call; a token is
trained when its characters (at least one) include a trained character, otherwise its label is -100
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

from itertools import chain
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
BATCH = 4096  # rows an encode_batch call: larger batches keep both of the tokenizer's threads busy
IGNORE = -100


# dataset_processes: how many worker processes; the output is the same for any number, so it is not in the key
Params = stage_params("sequence_len", "train_on_inputs", "excess_length_strategy", "min_sample_len", unkeyed=("dataset_processes",))


def labels_for(seg_chars: np.ndarray, seg_trained: np.ndarray, row_segments: np.ndarray, spans: np.ndarray,
               row_tokens: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Labels of a batch of joined rows at once: a token is trained when its span of characters
    (at least one wide) covers a trained character of its row. Segments and tokens come flat, in
    row order: each segment's length in characters and whether it trains by coverage (0 / 1), each
    row's number of segments and of tokens, each token's (start, end) in its row's text."""
    seg_cum = np.concatenate([[0], np.cumsum(seg_chars)])
    seg_bounds = np.concatenate([[0], np.cumsum(row_segments)])
    row_start, row_end = seg_cum[seg_bounds[:-1]], seg_cum[seg_bounds[1:]]
    trained_cum = np.concatenate([[0], np.cumsum(seg_chars * seg_trained)])
    token_row = np.repeat(np.arange(len(row_tokens)), row_tokens)
    first = row_start[token_row] + spans[:, 0]
    last = np.minimum(row_start[token_row] + np.maximum(spans[:, 1], spans[:, 0] + 1), row_end[token_row])

    def trained_before(x: np.ndarray) -> np.ndarray:  # trained characters before position x of the batch's text
        k = np.searchsorted(seg_cum[:-1], x, side="right") - 1
        return trained_cum[k] + seg_trained[k] * np.minimum(x - seg_cum[k], seg_chars[k])

    return np.where(trained_before(last) - trained_before(first) > 0, ids, IGNORE)


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


def _token_range(encoding, begin: int, end: int) -> tuple[int, int] | None:
    """The first and last token of `encoding` whose span (at least one wide) meets the characters
    [begin, end) of its text, found from the tokens at the two ends (spans run in text order, so
    the tokens between are the ones that meet it); None where a character there has no token."""
    first, last = encoding.char_to_token(begin), encoding.char_to_token(end - 1)
    if first is None or last is None:
        return None
    while first > 0:  # an earlier token may end on `begin` too: a zero-width one, or a character split in bytes
        span = encoding.token_to_chars(first - 1)
        if span is None:
            return None
        if max(span[1], span[0] + 1) <= begin:
            break
        first -= 1
    while last + 1 < len(encoding):
        span = encoding.token_to_chars(last + 1)
        if span is None:
            return None
        if span[0] >= end:
            break
        last += 1
    return first, last


def _encode_joined(tokenizer, segments, train_all: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joined rows: each row's segments joined and encoded in one call, the labels of the whole
    batch computed at once. A row's trained characters come in runs (neighbouring trained
    segments); the tokens a run covers are found from its two ends, so the tokens' offsets are
    only read for rows with training-detail spans, or where an end has no token. Flat ids and
    labels, and each row's number of tokens."""
    import pyarrow as pa
    import pyarrow.compute as pc

    row_segments = pc.list_value_length(segments).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = segments.flatten()
    texts = pc.struct_field(flat, "text")
    seg_bounds = np.concatenate([[0], np.cumsum(row_segments)])
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(seg_bounds, pa.int32()), texts), "")
    encodings = tokenizer.encode_batch(joined.to_pylist(), add_special_tokens=False)
    row_tokens = np.fromiter(map(len, encodings), np.int64, len(encodings))
    tokens = int(row_tokens.sum())
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int64, tokens)
    if train_all:
        return ids, ids.copy(), row_tokens
    seg_chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    train = pc.fill_null(pc.struct_field(flat, "train"), False).to_numpy(zero_copy_only=False)
    detail = pc.fill_null(pc.struct_field(flat, "detail"), False).to_numpy(zero_copy_only=False)
    seg_row = np.repeat(np.arange(len(row_segments)), row_segments)
    seg_cum = np.concatenate([[0], np.cumsum(seg_chars)])
    seg_begin = seg_cum[:-1] - seg_cum[seg_bounds[:-1]][seg_row]  # each segment's first character in its row
    token_bounds = np.concatenate([[0], np.cumsum(row_tokens)])
    coverage, detailed = train & ~detail, train & detail & (seg_chars > 0)

    runs = np.nonzero(coverage & (seg_chars > 0))[0]
    starts_run = np.ones(len(runs), dtype=bool)
    starts_run[1:] = (seg_row[runs[1:]] != seg_row[runs[:-1]]) | (seg_begin[runs[1:]] != seg_begin[runs[:-1]] + seg_chars[runs[:-1]])
    ends_run = np.append(starts_run[1:], True)
    run_rows = seg_row[runs[starts_run]].tolist()
    run_begin, run_end = seg_begin[runs[starts_run]].tolist(), (seg_begin + seg_chars)[runs[ends_run]].tolist()
    by_offsets = set(seg_row[detailed].tolist())
    edges = np.zeros(tokens + 1, dtype=np.int64)
    for row, begin, end in zip(run_rows, run_begin, run_end):
        found = _token_range(encodings[row], begin, end)
        if found is None:
            by_offsets.add(row)
        else:
            edges[token_bounds[row] + found[0]] += 1
            edges[token_bounds[row] + found[1] + 1] -= 1
    labels = np.where(np.cumsum(edges[:-1]) > 0, ids, IGNORE)
    for row in sorted(by_offsets):
        if token_bounds[row] == token_bounds[row + 1]:
            continue
        within = slice(token_bounds[row], token_bounds[row + 1])
        spans = np.array(encodings[row].offsets, dtype=np.int64).reshape(-1, 2)
        segs = slice(seg_bounds[row], seg_bounds[row + 1])
        labels[within] = labels_for(seg_chars[segs], coverage[segs].astype(np.int64), row_segments[row : row + 1], spans,
                                    row_tokens[row : row + 1], ids[within])
        for k in np.nonzero(detailed[segs])[0]:
            begin = int(seg_begin[seg_bounds[row] + k])
            hit = _detail_tokens(spans, begin, begin + int(seg_chars[seg_bounds[row] + k]) - 1)
            labels[within] = np.where(hit, ids[within], labels[within])
    return ids, labels, row_tokens


def _encode_separate(tokenizer, segments, train_all: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Separate rows (input_output, alpaca and the like): each segment encoded alone, its tokens
    trained or not as a whole."""
    import pyarrow.compute as pc

    flat = segments.flatten()
    # no offsets needed: encode_batch_fast leaves them out (they cost about a tenth of the encode)
    encodings = tokenizer.encode_batch_fast(pc.struct_field(flat, "text").to_pylist(), add_special_tokens=False)
    seg_tokens = np.fromiter(map(len, encodings), np.int64, len(encodings))
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int64, int(seg_tokens.sum()))
    trained = train_all | pc.fill_null(pc.struct_field(flat, "train"), False).to_numpy(zero_copy_only=False)
    row_segments = pc.list_value_length(segments).to_numpy(zero_copy_only=False).astype(np.int64)
    seg_row = np.repeat(np.arange(len(row_segments)), row_segments)
    labels = np.where(np.repeat(trained, seg_tokens), ids, IGNORE)
    return ids, labels, np.bincount(seg_row, seg_tokens, len(row_segments)).astype(np.int64)


def _encode_prefixed(tokenizer, segments, train_all: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefix rows (reflection, pygmalion): each piece (an untrained segment with the trained one
    after it, or a lone segment) encoded alone; the first as many tokens as its untrained text has
    alone are masked."""
    pieces: list[tuple[int, str, str]] = []  # (row, text, its masked head)
    for i, row in enumerate(segments.to_pylist()):
        k = 0
        while k < len(row):
            head = row[k]
            if not head["train"] and k + 1 < len(row) and row[k + 1]["train"]:
                pieces.append((i, head["text"] + row[k + 1]["text"], head["text"]))
                k += 2
            else:
                pieces.append((i, head["text"], "" if head["train"] else head["text"]))
                k += 1
    texts = tokenizer.encode_batch([p[1] for p in pieces], add_special_tokens=False)
    heads = tokenizer.encode_batch([p[2] for p in pieces], add_special_tokens=False)
    ids, labels, row_tokens = [], [], np.zeros(len(segments), dtype=np.int64)
    for (i, _, _), text, head in zip(pieces, texts, heads):
        masked = 0 if train_all else min(len(head.ids), len(text.ids))
        ids += text.ids
        labels += [IGNORE] * masked + text.ids[masked:]
        row_tokens[i] += len(text.ids)
    return np.array(ids, dtype=np.int64), np.array(labels, dtype=np.int64), row_tokens


def _given_tokens(batch, rows: list[int], train_all: bool, vocab: int, formatted: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pretokenized rows: their own input_ids and labels, the ids checked against the vocabulary."""
    given_ids, given_labels = batch.column("input_ids").take(rows).to_pylist(), batch.column("labels").take(rows).to_pylist()
    for i, row_ids in zip(rows, given_ids):
        if row_ids and max(row_ids) >= vocab:
            where = origin.where(formatted, batch.column("row")[i].as_py())
            raise DataError(f"{where}: field 'input_ids': token id {max(row_ids)} is outside the tokenizer's vocabulary of {vocab}")
    ids = np.fromiter(chain.from_iterable(given_ids), np.int64)
    labels = ids.copy() if train_all else np.fromiter(chain.from_iterable(given_labels), np.int64)
    return ids, labels, np.array([len(r) for r in given_ids], dtype=np.int64)


def _encode(tokenizer, batch, modes: list[str], train_all: bool, vocab: int, formatted: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat ids and labels of a batch of rows, in row order, and each row's number of tokens: the
    rows of each encoding mode encoded together, then put back in order where modes mix."""
    segments = batch.column("segments").combine_chunks()
    encoders = {"joined": _encode_joined, "separate": _encode_separate, "prefix": _encode_prefixed}
    by_mode: dict[str, list[int]] = {}
    for i, mode in enumerate(modes):
        by_mode.setdefault("joined" if mode == "chunk" else mode, []).append(i)
    parts = {}
    for mode, rows in by_mode.items():
        if mode == "tokens":
            parts[mode] = _given_tokens(batch, rows, train_all, vocab, formatted)
        else:
            parts[mode] = encoders[mode](tokenizer, segments if len(rows) == len(modes) else segments.take(rows), train_all)
    if len(parts) == 1:
        return next(iter(parts.values()))
    per_row: list = [None] * len(modes)
    for mode, (ids, labels, row_tokens) in parts.items():
        bounds = np.cumsum(row_tokens)[:-1]
        for i, row_ids, row_labels in zip(by_mode[mode], np.split(ids, bounds), np.split(labels, bounds)):
            per_row[i] = (row_ids, row_labels)
    return (np.concatenate([r[0] for r in per_row]), np.concatenate([r[1] for r in per_row]),
            np.array([len(r[0]) for r in per_row], dtype=np.int64))


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401  (pa.compute below)

    rows = read_table(inputs["formatted"] / "formatted.arrow").num_rows
    # one process unless dataset_processes says more: the fast tokenizer's own threads already use
    # every core, and worker processes then only add their start-up (measured: 1.4x slower on 2 cores)
    with ctx.progress("tokenize", rows) as advance:
        parts = workers.map_ranges(_tokenize_rows, rows, workers.processes_for(rows, params.dataset_processes or 1),
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
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("length", pa.int32()), ("row", pa.int64())])
    counts = {"dropped": {"too_long": 0, "too_short": 0, "nothing_trained": 0}, "truncated": 0, "chunked": 0, "first": {}}
    batches = []  # one Arrow batch per input batch: the whole dataset is never held as arrays
    for offset in range(0, table.num_rows, BATCH):
        batch = table.slice(offset, BATCH)
        modes = batch.column("mode").to_pylist()
        ids, labels, row_tokens = _encode(tokenizer, batch, modes, params.train_on_inputs, vocab, formatted)
        batches.append(_kept(batch.column("row").to_numpy(), np.array(modes) == "chunk", ids, labels, row_tokens, params, formatted, counts, schema))
        if advance:
            advance(batch.num_rows)
    return pa.Table.from_batches(batches, schema=schema), counts


def _kept(rows: np.ndarray, chunked: np.ndarray, ids: np.ndarray, labels: np.ndarray, row_tokens: np.ndarray, params: Params,
          formatted: Path, counts: dict, schema):
    """The record batch of a batch's rows that are kept, its rows cut to sequence_len pieces where
    the format chunks them (completion), too long ones refused, dropped or truncated
    (excess_length_strategy), too short ones and ones with nothing to train dropped; counts and
    each kind's first dropped row are added to `counts`."""
    import pyarrow as pa

    limit = params.sequence_len
    if chunked.any():  # completion: every piece of sequence_len tokens becomes a row (an empty text none)
        counts["chunked"] += int((chunked & (row_tokens > limit)).sum())
        pieces = np.where(chunked, -(-row_tokens // limit), 1)
        piece_row = np.repeat(np.arange(len(rows)), pieces)
        index = np.arange(len(piece_row)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        row_tokens = np.where(chunked[piece_row], np.minimum(limit, row_tokens[piece_row] - index * limit), row_tokens[piece_row])
        rows = rows[piece_row]
    dropped, first = counts["dropped"], counts["first"]

    def drop(kind: str, which: np.ndarray) -> None:
        if which.any():
            dropped[kind] += int(which.sum())
            first.setdefault(kind, int(rows[np.argmax(which)]))

    too_long = row_tokens > limit
    strategy = params.excess_length_strategy or "drop"
    if too_long.any() and strategy == "raise":
        k = int(np.argmax(too_long))
        raise DataError(f"{origin.where(formatted, int(rows[k]))}: {int(row_tokens[k])} tokens, over sequence_len {limit} (excess_length_strategy: raise)")
    alive = ~too_long if strategy == "drop" else np.ones(len(rows), dtype=bool)
    drop("too_long", too_long & ~alive)
    counts["truncated"] += int((too_long & alive).sum())
    lengths = np.minimum(row_tokens, limit)
    token_row = np.repeat(np.arange(len(rows)), row_tokens)
    within = np.arange(len(ids)) - np.repeat(np.cumsum(row_tokens) - row_tokens, row_tokens) < limit
    trained = np.bincount(token_row[within & (labels != IGNORE)], minlength=len(rows))
    short = alive & (lengths < params.min_sample_len)
    drop("too_short", short)
    drop("nothing_trained", alive & ~short & (trained == 0))
    keep = alive & ~short & (trained > 0)
    taken = keep[token_row] & within
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths[keep])]), pa.int32())
    return pa.record_batch([pa.ListArray.from_arrays(offsets, pa.array(ids[taken], pa.int32())),
                            pa.ListArray.from_arrays(offsets, pa.array(labels[taken], pa.int32())),
                            pa.array(lengths[keep], pa.int32()), pa.array(rows[keep], pa.int64())], schema=schema)
