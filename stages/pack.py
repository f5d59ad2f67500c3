"""pack: training rows laid out as model inputs, several samples per row when `sample_packing`.

Reads `train.arrow` / `val.arrow` from mix. With `sample_packing` (and `eval_sample_packing`,
which follows it unless set), samples are bin-packed by length, first-fit-decreasing, into bins:

* `multipack_real_batches: false` (Axolotl's default with flash/flex/xformers attention): a bin
  holds `micro_batch_size × sequence_len` tokens and is written as ONE row; train then takes one
  row per micro-batch. The bigger bins pack tighter, and varlen attention keeps the cost per sample.
* `multipack_real_batches: true` (the default otherwise, as in Axolotl): a bin holds
  `sequence_len` tokens (one row); train batches `micro_batch_size` rows.

Samples are packed in groups of `sample_packing_group_size` consecutive samples (in mix's seeded
order) with at most `sample_packing_bin_size` samples per bin (first-fit in mix's order replaces
FFD for a group where that cap makes it need more bins). Bins are then put in an order drawn
from `seed`, so the artifact is deterministic. `sample_packing_sequentially` packs next-fit in
mix's order instead and keeps the bins in that order. A fresh order each epoch is train's business: its
sampler reshuffles the rows with `seed` and the epoch number (the bins' contents stay fixed).

Inside a row each sample's `position_ids` restart at 0, which is how the model tells samples apart
(transformers derives a block-diagonal causal mask, or flash-attention's cu_seqlens, from them
when no attention mask is passed), and each sample's first label is -100 so no token is trained to
predict across a boundary (alone, a sample's first token is never a target either).

Writes `train.arrow` and `val.arrow` (input_ids, labels, position_ids, length = real tokens,
samples = the mix row indices in the row), `layout.json` (per split: row capacity, rows per
micro-batch, packed or not) and `bin_fill.png` (histogram of how full the rows are). The
manifest reports the packing efficiency (real tokens / slots) and the micro-batches and
optimizer steps per epoch (one process); with `sample_packing_eff_est` it also reports Axolotl's
estimate of the steps from `total_num_tokens` (counted unless set).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from stages.config import stage_params
from stages.store import DataError, read_table, write_table
from stages.context import QUIET, Context

SCHEMA = 2
LIBRARIES = ("pyarrow", "numpy", "pillow")
INPUTS = {"dataset": "mix"}
IGNORE = -100


# eval_sample_packing None: as sample_packing; eval_batch_size None: micro_batch_size; the config fills in
# multipack_real_batches (config._real_batches_without_varlen_attention)
Params = stage_params("sample_packing", "eval_sample_packing", "sequence_len", "micro_batch_size", "eval_batch_size",
                      "gradient_accumulation_steps", "multipack_real_batches", "sample_packing_group_size", "sample_packing_bin_size", "sample_packing_sequentially",
                      "sample_packing_eff_est", "total_num_tokens", "seed")


# -- bin packing -----------------------------------------------------------------------------


def _check(lengths: np.ndarray, capacity: int) -> None:
    if lengths.max() > capacity or lengths.min() < 1:
        raise DataError(f"sample lengths must be between 1 and the bin capacity {capacity}; got {int(lengths.min())}..{int(lengths.max())}")


def _first_fit(needs: list[int], room: np.ndarray, count: list[int], max_items: int) -> list[int]:
    """Each item into the first bin with room for it and fewer than `max_items` items, given the
    bins' starting room (`room`, a power-of-two length; -1 marks a closed bin) and item counts.
    A max-tree over the room finds that bin in log(bins) steps instead of a scan."""
    size = len(room)
    levels = [room]
    while len(levels[-1]) > 1:
        prev = levels[-1]
        levels.append(np.maximum(prev[0::2], prev[1::2]))
    tree = [0] * (2 * size)  # tree[1] is the root, tree[size + b] the room left in bin b
    for depth, level in enumerate(reversed(levels)):
        start = 1 << depth
        tree[start:start + len(level)] = level.tolist()
    bins = []
    for need in needs:
        node = 1
        while node < size:
            node <<= 1
            if tree[node] < need:
                node += 1
        b = node - size
        bins.append(b)
        count[b] += 1
        tree[node] = tree[node] - need if count[b] < max_items else -1
        node >>= 1
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            best = left if left > right else right
            if tree[node] == best:
                break
            tree[node] = best
            node >>= 1
    return bins


def first_fit_decreasing(lengths: np.ndarray, capacity: int, max_items: int | None = None) -> np.ndarray:
    """The bin of each item: items in decreasing length (ties in input order), each into the
    first bin with room for it and fewer than `max_items` items. O(n log n)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _check(lengths, capacity)
    max_items = max_items or n
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    # Items over half the capacity never share a bin with each other: in decreasing order each
    # opens the next bin, so they are placed without a search.
    big = int((sorted_len > capacity // 2).sum())
    room = np.full(1 << max(0, (n - 1).bit_length()), capacity, dtype=np.int64)
    room[:big] = -1 if max_items == 1 else capacity - sorted_len[:big]
    count = [1] * big + [0] * (n - big)
    bins = list(range(big)) + _first_fit(sorted_len[big:].tolist(), room, count, max_items)
    out = np.empty(n, dtype=np.int64)
    out[order] = bins
    return out


def first_fit_in_order(lengths: np.ndarray, capacity: int, max_items: int | None = None) -> np.ndarray:
    """First-fit in arrival order (no sort): each item into the first bin with room for it and
    fewer than `max_items` items. What a streaming packer does (the benchmark's baseline), and
    the fallback when the bin-size cap spoils first-fit-decreasing (see pack_group)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _check(lengths, capacity)
    room = np.full(1 << max(0, (n - 1).bit_length()), capacity, dtype=np.int64)
    return np.asarray(_first_fit(lengths.tolist(), room, [0] * n, max_items or n), dtype=np.int64)


def next_fit_in_order(lengths: np.ndarray, capacity: int, max_items: int | None = None) -> list[np.ndarray]:
    """Bins that keep the items' order (`sample_packing_sequentially`, as Axolotl's sequential
    packer): each item goes into the current bin, or opens the next one when it does not fit or
    the bin holds `max_items`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    _check(lengths, capacity)
    bins, start, room = [], 0, capacity
    for i, size in enumerate(lengths.tolist()):
        if size > room or (max_items and i - start >= max_items):
            bins.append(np.arange(start, i))
            start, room = i, capacity
        room -= size
    bins.append(np.arange(start, len(lengths)))
    return bins


def pack_group(lengths: np.ndarray, capacity: int, max_items: int) -> np.ndarray:
    """The bin of each item of one group: first-fit-decreasing, unless it needs more bins than
    the lower bound and first-fit in the given (seeded, shuffled) order needs fewer. That happens
    when the bin-size cap binds: FFD leaves the smallest samples for last, and bins made only
    of them fill up with `max_items` samples long before they fill up with tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)
    bins = first_fit_decreasing(lengths, capacity, max_items)
    bound = max(-(-int(lengths.sum()) // capacity), -(-len(lengths) // max_items))
    if int(bins.max()) + 1 > bound:
        other = first_fit_in_order(lengths, capacity, max_items)
        if other.max() < bins.max():
            return other
    return bins


def pack_groups(lengths: np.ndarray, capacity: int, group_size: int, max_items: int, seed: int) -> list[np.ndarray]:
    """Bins (arrays of item indices) for consecutive groups of `group_size` items, each group
    packed by pack_group; the bins in an order drawn from `seed`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    bins: list[np.ndarray] = []
    for start in range(0, len(lengths), max(1, group_size)):
        stop = min(len(lengths), start + max(1, group_size))
        of = pack_group(lengths[start:stop], capacity, max_items)
        order = np.argsort(of, kind="stable")  # items grouped by bin, in placement order
        members = order + start
        cuts = np.flatnonzero(np.diff(of[order])) + 1
        bins.extend(np.split(members, cuts))
    rng = np.random.default_rng(seed)
    return [bins[i] for i in rng.permutation(len(bins))]


# -- layout ----------------------------------------------------------------------------------


def _layout(table, bins: list[np.ndarray]):
    """One row per bin: the members' tokens concatenated, position_ids restarting at 0, each
    member's first label -100. Vectorised over the flat token buffers."""
    import pyarrow as pa

    n_rows = len(bins)
    items = np.concatenate(bins) if bins else np.zeros(0, dtype=np.int64)
    per_row = np.array([len(b) for b in bins], dtype=np.int64)
    ids_col = table.column("input_ids").combine_chunks()
    lab_col = table.column("labels").combine_chunks()
    offsets = ids_col.offsets.to_numpy().astype(np.int64)
    ids = ids_col.values.to_numpy()
    labels = lab_col.values.to_numpy()
    if len(lab_col.offsets) and not np.array_equal(lab_col.offsets.to_numpy(), ids_col.offsets.to_numpy()):
        raise DataError("input_ids and labels differ in length in some rows")
    lens = offsets[items + 1] - offsets[items] if len(items) else np.zeros(0, np.int64)
    first = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else np.zeros(0, np.int64)
    total = int(lens.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(first, lens)
    gather = np.repeat(offsets[items], lens) + within
    new_ids = ids[gather].astype(np.int32)
    new_labels = labels[gather].astype(np.int32)
    new_labels[first] = IGNORE
    positions = within.astype(np.int32)
    item_row_end = np.cumsum(per_row)
    row_tokens = np.add.reduceat(lens, item_row_end - per_row) if n_rows else np.zeros(0, np.int64)
    row_offsets = np.concatenate([[0], np.cumsum(row_tokens)]).astype(np.int32)
    item_offsets = np.concatenate([[0], item_row_end]).astype(np.int32)

    def lists(values, offs):
        return pa.ListArray.from_arrays(pa.array(offs, type=pa.int32()), pa.array(values))

    return pa.table({
        "input_ids": lists(new_ids, row_offsets),
        "labels": lists(new_labels, row_offsets),
        "position_ids": lists(positions, row_offsets),
        "length": pa.array(row_tokens.astype(np.int32)),
        "samples": lists(items.astype(np.int32), item_offsets),
    }), row_tokens


def plan_split(params: Params, split: str, lengths: np.ndarray) -> tuple[list[np.ndarray], dict]:
    """The bins of a split and how train batches them."""
    packed = params.sample_packing if split == "train" else (params.sample_packing if params.eval_sample_packing is None else params.eval_sample_packing)
    batch = params.micro_batch_size if split == "train" else (params.eval_batch_size or params.micro_batch_size)
    if packed and not params.multipack_real_batches:
        capacity, rows_per_batch = params.sequence_len * batch, 1
    else:
        capacity, rows_per_batch = params.sequence_len, batch
    if packed and params.sample_packing_sequentially:
        bins = next_fit_in_order(lengths, capacity, params.sample_packing_bin_size)
    elif packed:
        bins = pack_groups(lengths, capacity, params.sample_packing_group_size, params.sample_packing_bin_size, params.seed)
    else:
        bins = [np.array([i]) for i in range(len(lengths))]
    return bins, {"packed": bool(packed), "capacity": int(capacity), "rows_per_batch": int(rows_per_batch), "sequence_len": params.sequence_len}


def run(params: Params, inputs: dict[str, Path], out: Path, ctx: Context = QUIET) -> dict:
    stats, layout, fills = {}, {}, {}
    for split in ("train", "val"):
        table = read_table(inputs["dataset"] / f"{split}.arrow")
        lengths = table.column("length").to_numpy().astype(np.int64)
        if len(lengths) and lengths.max() > params.sequence_len:
            raise DataError(f"{split}: a sample of {int(lengths.max())} tokens is over sequence_len {params.sequence_len}")
        bins, layout[split] = plan_split(params, split, lengths)
        packed_table, row_tokens = _layout(table, bins)
        write_table(packed_table, out / f"{split}.arrow")
        capacity, per_batch = layout[split]["capacity"], layout[split]["rows_per_batch"]
        slots = len(bins) * capacity
        tokens = int(lengths.sum())
        fills[split] = row_tokens / capacity
        micro_batches = math.ceil(len(bins) / per_batch) if bins else 0
        stats[split] = {
            "samples": int(table.num_rows), "rows": len(bins), "tokens": tokens, "row_capacity": capacity,
            "efficiency": round(tokens / slots, 4) if slots else None,
            "micro_batches_per_epoch": micro_batches,
        }
        if split == "val" and layout[split]["packed"] and 0 < len(bins) < per_batch:
            # Axolotl's sampler drops the incomplete batch and evaluation dies later; train's
            # epoch_batches evaluates it as a smaller batch, so this is said, not refused.
            stats[split]["short_of_one_batch"] = True
            ctx.log(
                f"note: the validation split is small for eval_sample_packing: its {table.num_rows} samples "
                f"({tokens} tokens) pack into {len(bins)} rows of {capacity} tokens, fewer than one batch of "
                f"eval_batch_size {per_batch} rows; it is evaluated as one smaller batch"
            )
    train = stats["train"]
    train["steps_per_epoch"] = math.ceil(train["micro_batches_per_epoch"] / params.gradient_accumulation_steps)
    if params.sample_packing_eff_est:
        total = params.total_num_tokens if params.total_num_tokens is not None else train["tokens"]
        per_step = params.sample_packing_eff_est * params.sequence_len * params.micro_batch_size * params.gradient_accumulation_steps
        train["estimated_steps_per_epoch"] = max(1, math.ceil(total / per_step))
        train["sample_packing_eff_est"] = params.sample_packing_eff_est
    if params.total_num_tokens is not None:
        train["total_num_tokens_given"] = params.total_num_tokens
    (out / "layout.json").write_text(json.dumps(layout, indent=1, sort_keys=True))
    _plot_fill(fills, layout, out / "bin_fill.png")
    return {"rows": train["rows"], "packing": stats}


def _plot_fill(fills: dict[str, np.ndarray], layout: dict, path: Path) -> None:
    """A histogram of how full the rows are, one translucent colour a split. Drawn with Pillow:
    importing matplotlib alone took a cold preprocess of 40,000 rows as long as packing them."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 600, 350, 64, 16, 14, 44
    font = ImageFont.load_default(size=11)
    edges = np.linspace(0, 1, 41)
    counts = {split: np.histogram(fill, bins=edges)[0] for split, fill in fills.items() if len(fill)}
    peak = max((int(c.max()) for c in counts.values()), default=1)
    step = next(m * 10**e for e in range(12) for m in (1, 2, 5) if m * 10**e * 5 >= peak)
    y_max = max(step, math.ceil(peak / step) * step)
    x0, x1, y_bottom, y_top = left, width - right, height - bottom, top

    def at(fill: float, rows: float) -> tuple[float, float]:
        return x0 + fill * (x1 - x0), y_bottom - rows / y_max * (y_bottom - y_top)

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image, "RGBA")
    grid = (0, 0, 0, 40)
    for i in range(6):
        x, _ = at(i / 5, 0)
        draw.line([(x, y_top), (x, y_bottom)], fill=grid)
        draw.text((x, y_bottom + 5), f"{i / 5:.1f}", font=font, fill="black", anchor="mt")
    for rows in range(0, y_max + 1, step):
        _, y = at(0, rows)
        draw.line([(x0, y), (x1, y)], fill=grid)
        draw.text((x0 - 5, y), f"{rows:,}", font=font, fill="black", anchor="rm")
    colours = ((31, 119, 180), (255, 127, 14))
    for (split, count), colour in zip(counts.items(), colours):
        for k in np.flatnonzero(count):
            (left_x, top_y), (right_x, _) = at(edges[k], count[k]), at(edges[k + 1], 0)
            draw.rectangle([left_x, top_y, right_x, y_bottom], fill=(*colour, 150))
    draw.rectangle([x0, y_top, x1, y_bottom], outline="black")
    draw.text(((x0 + x1) / 2, height - 6), "fill of a row (real tokens / capacity)", font=font, fill="black", anchor="md")
    label = Image.new("RGBA", (60, 16), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((30, 8), "rows", font=font, fill="black", anchor="mm")
    label = label.rotate(90, expand=True)
    image.paste(label, (4, (y_top + y_bottom) // 2 - label.height // 2), label)
    for j, (split, colour) in enumerate(zip(counts, colours)):
        y, fill = y_top + 8 + 16 * j, fills[split]
        draw.rectangle([x0 + 8, y, x0 + 18, y + 10], fill=(*colour, 150))
        text = f"{split}: {len(fill)} rows of {layout[split]['capacity']}, {float(fill.mean()):.1%} full"
        draw.text((x0 + 24, y + 5), text, font=font, fill="black", anchor="lm")
    image.save(path, format="PNG")
