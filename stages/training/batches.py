"""Micro-batches of packed rows: which rows each rank gets each epoch (epoch_batches, RankBatches),
the rows themselves (Rows), how they become tensors (collate, make_collator) and the DataLoader
that hands them to the Trainer (data_loader).

A micro-batch is `layout.rows_per_batch` rows of pack's layout.json (1 row of `micro_batch_size ×
sequence_len` tokens when pack made multipack bins, else `micro_batch_size` rows). Each epoch a
fresh order is drawn from `seed` and the epoch, every rank gets the same number of micro-batches
(no rank waits at the end of an epoch) and every row lands on exactly one rank once.
"""

from __future__ import annotations

from stages.training.loss import IGNORE

PAD_MULTIPLE = 8


def collate(rows: list[dict], pad_id: int, width: int | None = None, multiple_of: int = PAD_MULTIPLE, flatten: bool = False) -> dict:
    """Rows to tensors. No attention mask: position_ids restarting at 0 mark where each sample
    (and the padding) begins, and transformers derives a block-diagonal causal mask from them
    (cu_seqlens for flash-attention). `flatten` concatenates the rows into one (padding-free
    batches, `batch_flattening`); `width` pads to a constant length (`pad_to_sequence_len`),
    otherwise to the longest row rounded up to `multiple_of`. Padding has label -100 and
    position_ids of its own, so it is a separate block that nothing attends to."""
    import torch

    ids = [list(r["input_ids"]) for r in rows]
    labels = [list(r["labels"]) for r in rows]
    pos = [list(r["position_ids"]) for r in rows]
    if flatten:
        ids, pos = [sum(ids, [])], [sum(pos, [])]
        labels = [sum(([IGNORE] + lab[1:] for lab in labels), [])]  # each row's first label: never a target
    longest = max(len(r) for r in ids)
    target = max(width or 0, longest)
    if width is None and multiple_of > 1:
        target = -(-target // multiple_of) * multiple_of
    batch = {"input_ids": [], "labels": [], "position_ids": []}
    for i, lab, p in zip(ids, labels, pos):
        pad = target - len(i)
        batch["input_ids"].append(i + [pad_id] * pad)
        batch["labels"].append(lab + [IGNORE] * pad)
        batch["position_ids"].append(p + list(range(pad)))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def make_collator(split_layout: dict, pad_id: int, pad_to_sequence_len: bool, batch_flattening: bool):
    """The collate of a split (pack's layout.json entry): constant width = the row capacity (times
    the rows of a micro-batch when they are flattened into one) with pad_to_sequence_len."""
    width = split_layout["capacity"] * (split_layout["rows_per_batch"] if batch_flattening else 1)
    width = width if pad_to_sequence_len else None
    return lambda rows: collate(rows, pad_id, width=width, flatten=batch_flattening)


def epoch_batches(lengths, rows_per_batch: int, world_size: int, seed: int, epoch: int, shuffle: bool = True, group_by_length: bool = False) -> list[list[list[int]]]:
    """Each rank's micro-batches for one epoch, as row indices; an index >= len(lengths) is an
    empty row (no tokens, nothing trained). Every rank gets the same number of batches, every row
    appears exactly once across the ranks, and batches differ in size by at most one row; only
    when there are fewer rows than batches are empty rows added. The order is drawn from `seed`
    and `epoch` (the same on every rank). `group_by_length` sorts rows by length within
    mega-batches of 50 batches, so a batch holds rows of similar length (less padding)."""
    import numpy as np

    n = len(lengths)
    per_rank = max(1, -(-n // (rows_per_batch * world_size)))
    total = per_rank * world_size
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    chunks = np.array_split(order, total)
    if group_by_length and n:
        lengths = np.asarray(lengths)
        mega = 50 * world_size
        chunks = []
        for start in range(0, total, mega):
            k = min(mega, total - start)
            lo = (n * start) // total
            hi = (n * (start + k)) // total
            part = order[lo:hi]
            part = part[np.argsort(-lengths[part], kind="stable")]
            chunks += np.array_split(part, k)
    batches = [c.tolist() if len(c) else [n] for c in chunks]
    return [batches[r::world_size] for r in range(world_size)]


class RankBatches:
    """A batch sampler over `epoch_batches` for one rank; the Trainer calls `set_epoch`."""

    def __init__(self, lengths, rows_per_batch: int, world_size: int, rank: int, seed: int, shuffle: bool = True, group_by_length: bool = False):
        self.lengths, self.rows_per_batch, self.world_size, self.rank = list(lengths), rows_per_batch, world_size, rank
        self.seed, self.shuffle, self.group_by_length, self.epoch = seed, shuffle, group_by_length, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return max(1, -(-len(self.lengths) // (self.rows_per_batch * self.world_size)))

    def __iter__(self):
        yield from epoch_batches(self.lengths, self.rows_per_batch, self.world_size, self.seed, self.epoch, self.shuffle, self.group_by_length)[self.rank]


class Rows:
    """Packed rows from an Arrow table; an index past the end is an empty row (see epoch_batches)."""

    def __init__(self, table, pad_id: int):
        self.table, self.pad_id = table, pad_id
        self.lengths = table.column("length").to_pylist() if "length" in table.column_names else [len(r) for r in table.column("input_ids").to_pylist()]

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        if i >= self.table.num_rows:
            return {"input_ids": [self.pad_id], "labels": [IGNORE], "position_ids": [0]}
        row = self.table.slice(i, 1)
        return {k: row.column(k)[0].as_py() for k in ("input_ids", "labels", "position_ids")}


def data_loader(trainer, rows: Rows, sampler: RankBatches, collate_fn):
    """The DataLoader of `rows` in the sampler's batches, prepared by the Trainer's accelerator
    (device placement) without re-sharding them."""
    from torch.utils.data import DataLoader

    loader = trainer.accelerator.prepare(DataLoader(rows, batch_sampler=sampler, collate_fn=collate_fn, num_workers=0))
    # the sampler already picks this rank's batches: accelerate's shard wrapper must pass them through
    shard = getattr(loader, "batch_sampler", None)
    if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
        shard.num_processes, shard.process_index = 1, 0
    return loader
