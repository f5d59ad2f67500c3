"""Packing is exact: a packed batch gives the same summed loss and the same gradients as its
samples run one by one (eager and SDPA attention), with pack's real layout and train's real
collate and loss. Plus the bin packer itself, the pack stage's artifact, and the collate options."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from stages import pack
from stages.context import Context
from stages.store import DataError, read_table, write_table
from stages.training.batches import collate
from stages.training.loss import token_loss

IGNORE = -100


# -- a tiny model and some samples ------------------------------------------------------------


def tiny_llama(attn: str, seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    return model


def samples(n: int, seed: int = 0, low: int = 2, high: int = 40) -> list[dict]:
    """Samples with a masked prompt and trained completion, as tokenize writes them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(low, high + 1))
        ids = rng.integers(3, 61, size=length).tolist()
        prompt = int(rng.integers(0, length))
        labels = [IGNORE] * prompt + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels, "length": length})
    return out


def mix_table(rows: list[dict]) -> pa.Table:
    return pa.table({
        "input_ids": pa.array([r["input_ids"] for r in rows], type=pa.list_(pa.int32())),
        "labels": pa.array([r["labels"] for r in rows], type=pa.list_(pa.int32())),
        "length": pa.array([r["length"] for r in rows], type=pa.int32()),
    })


def packed_rows(rows: list[dict], capacity: int) -> list[dict]:
    lengths = np.array([r["length"] for r in rows])
    bins = pack.pack_groups(lengths, capacity, group_size=100_000, max_items=200, seed=3)
    table, _ = pack._layout(mix_table(rows), bins)
    return table.to_pylist()


def loss_and_grads(model, batches: list[dict], num_items: int) -> tuple[float, dict]:
    model.zero_grad()
    total = 0.0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss = token_loss({"logits": logits}, batch["labels"], num_items)
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


def one_by_one(rows: list[dict]) -> list[dict]:
    return [{"input_ids": torch.tensor([r["input_ids"]]), "labels": torch.tensor([r["labels"]]), "position_ids": torch.arange(r["length"])[None]} for r in rows]


def assert_same(a: tuple[float, dict], b: tuple[float, dict], tol: float = 1e-5) -> None:
    assert abs(a[0] - b[0]) <= tol, (a[0], b[0])
    for name in a[1]:
        diff = (a[1][name] - b[1][name]).abs().max().item()
        assert diff <= tol, (name, diff)


# -- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_has_the_loss_and_gradients_of_its_samples_alone(attn):
    data = samples(9)
    trained = sum(sum(1 for t in r["labels"][1:] if t != IGNORE) for r in data)
    rows = packed_rows(data, capacity=96)
    assert len(rows) < len(data) and max(len(r["samples"]) for r in rows) >= 3  # really packed
    batch = collate(rows, pad_id=0)  # several packed rows in one batch, padded to a multiple of 8
    assert batch["input_ids"].shape[1] % 8 == 0

    # the summed loss (a few hundred nats: float32 cannot hold it to 1e-5, so float64 here)
    model = tiny_llama(attn, dtype=torch.float64)
    alone, together = loss_and_grads(model, one_by_one(data), 1), loss_and_grads(model, [batch], 1)
    assert alone[0] > 100
    assert_same(together, alone)
    # the training loss (sum / trained tokens of the step) and its gradients, in float32
    model = tiny_llama(attn)
    assert_same(loss_and_grads(model, [batch], trained), loss_and_grads(model, one_by_one(data), trained))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_exactness_check_sees_a_leak_between_samples(attn):
    """The same comparison fails when samples may attend to each other (positions that do not
    restart): the exactness test above has the power to catch a leak."""
    model = tiny_llama(attn)
    data = samples(9)
    trained = sum(sum(1 for t in r["labels"][1:] if t != IGNORE) for r in data)
    batch = collate(packed_rows(data, capacity=96), pad_id=0)
    leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    a, b = loss_and_grads(model, [leaky], trained), loss_and_grads(model, one_by_one(data), trained)
    assert abs(a[0] - b[0]) > 1e-4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_flattened_and_constant_width_batches_are_exact(attn):
    """batch_flattening (unpacked samples concatenated in collate) and pad_to_sequence_len
    (constant width) change neither the loss nor the gradients."""
    model = tiny_llama(attn, seed=1)
    data = samples(6, seed=1)
    trained = sum(sum(1 for t in r["labels"][1:] if t != IGNORE) for r in data)
    packed = packed_rows(data, capacity=40)
    singles = pack._layout(mix_table(data), [np.array([i]) for i in range(len(data))])[0].to_pylist()
    flat = collate(singles, pad_id=0, flatten=True)
    assert flat["input_ids"].shape[0] == 1 and flat["input_ids"].shape[1] % 8 == 0
    wide = collate(packed, pad_id=0, width=80)
    assert wide["input_ids"].shape[1] == 80
    reference = loss_and_grads(model, one_by_one(data), trained)
    assert_same(loss_and_grads(model, [flat], trained), reference)
    assert_same(loss_and_grads(model, [wide], trained), reference)
    padded = collate(singles, pad_id=0)  # plain padding to the longest: still exact
    assert_same(loss_and_grads(model, [padded], trained), reference)


def test_collate_flatten_masks_each_rows_first_label_and_restarts_positions():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 2]},
            {"input_ids": [8, 9], "labels": [8, 9], "position_ids": [0, 1]}]
    flat = collate(rows, pad_id=0, flatten=True, multiple_of=1)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert flat["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    padded = collate(rows, pad_id=0)
    assert padded["input_ids"].shape == (2, 8)
    assert padded["labels"][1].tolist() == [8, 9] + [IGNORE] * 6
    assert padded["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 3, 4, 5]


# -- the bin packer ----------------------------------------------------------------------------


def naive_ffd(lengths, capacity, max_items):
    """First-fit-decreasing written the obvious O(n * bins) way: the reference."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # sorted() is stable
    room, count, where = [], [], [0] * len(lengths)
    for i in order:
        for b in range(len(room)):
            if lengths[i] <= room[b] and count[b] < max_items:
                break
        else:
            b = len(room)
            room.append(capacity)
            count.append(0)
        room[b] -= lengths[i]
        count[b] += 1
        where[i] = b
    return where


@pytest.mark.parametrize("capacity,max_items,seed", [(64, 200, 0), (100, 3, 1), (50, 1, 2), (128, 5, 3), (37, 200, 4)])
def test_first_fit_decreasing_matches_the_naive_reference(capacity, max_items, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, capacity + 1, size=300) // rng.integers(1, 6, size=300) + 1
    lengths = np.minimum(lengths, capacity)
    got = pack.first_fit_decreasing(lengths, capacity, max_items)
    assert got.tolist() == naive_ffd(lengths.tolist(), capacity, max_items)
    fill = np.bincount(got, weights=lengths)
    assert fill.max() <= capacity and np.bincount(got).max() <= max_items


def test_first_fit_refuses_a_sample_longer_than_the_bin():
    with pytest.raises(DataError, match="between 1 and the bin capacity 10"):
        pack.first_fit_decreasing(np.array([3, 11]), 10)


def test_groups_are_packed_separately_and_the_bin_order_is_seeded():
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 60, size=250)
    bins = pack.pack_groups(lengths, 128, group_size=100, max_items=200, seed=1)
    items = np.concatenate(bins)
    assert sorted(items.tolist()) == list(range(250))  # every sample once
    assert {frozenset(b // 100) for b in map(np.asarray, bins)} <= {frozenset({0}), frozenset({1}), frozenset({2})}
    assert all(lengths[b].sum() <= 128 for b in bins)
    again = pack.pack_groups(lengths, 128, group_size=100, max_items=200, seed=1)
    assert [b.tolist() for b in again] == [b.tolist() for b in bins]
    other = pack.pack_groups(lengths, 128, group_size=100, max_items=200, seed=2)
    assert sorted(map(tuple, other)) == sorted(map(tuple, bins)) and [b.tolist() for b in other] != [b.tolist() for b in bins]


def test_lognormal_alpaca_lengths_pack_over_99_percent():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(180), 0.8, 20_000).astype(int), 2, 2048)
    bins = pack.pack_groups(lengths, 2048, 100_000, 200, seed=0)
    assert lengths.sum() / (len(bins) * 2048) >= 0.99


# -- the pack stage ----------------------------------------------------------------------------


def run_pack(tmp_path, train: list[dict], val: list[dict], name: str = "out", log=None, **params):
    mixed = tmp_path / "mix"
    mixed.mkdir(exist_ok=True)
    write_table(mix_table(train), mixed / "train.arrow")
    write_table(mix_table(val) if val else mix_table(train).slice(0, 0), mixed / "val.arrow")
    out = tmp_path / name
    out.mkdir()
    manifest = pack.run(pack.Params(**params), {"dataset": mixed}, out, Context(log=log or (lambda message: None)))
    return out, manifest


def test_pack_stage_keeps_every_token_and_label_of_every_sample(tmp_path):
    data, val = samples(40, seed=7), samples(6, seed=8)
    out, manifest = run_pack(tmp_path, data, val, sample_packing=True, sequence_len=48, micro_batch_size=2, gradient_accumulation_steps=2)
    layout = json.loads((out / "layout.json").read_text())
    assert layout["train"] == {"packed": True, "capacity": 96, "rows_per_batch": 1, "sequence_len": 48}
    rows = read_table(out / "train.arrow").to_pylist()
    seen = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == row["length"] <= 96
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [row["length"]]
        assert len(starts) - 1 == len(row["samples"])
        for s, a, b in zip(row["samples"], starts, starts[1:]):
            assert row["input_ids"][a:b] == data[s]["input_ids"]
            assert row["labels"][a:b] == [IGNORE] + data[s]["labels"][1:]
            assert row["position_ids"][a:b] == list(range(b - a))
        seen += row["samples"]
    assert sorted(seen) == list(range(40))
    stats = manifest["packing"]["train"]
    tokens = sum(r["length"] for r in data)
    assert stats["tokens"] == tokens and stats["rows"] == len(rows)
    assert stats["efficiency"] == round(tokens / (len(rows) * 96), 4)
    assert stats["micro_batches_per_epoch"] == len(rows) and stats["steps_per_epoch"] == -(-len(rows) // 2)
    assert (out / "bin_fill.png").read_bytes()[:4] == b"\x89PNG"


def test_pack_stage_is_byte_deterministic(tmp_path):
    data = samples(30, seed=9)
    a, _ = run_pack(tmp_path, data, [], "a", sample_packing=True, sequence_len=64)
    b, _ = run_pack(tmp_path, data, [], "b", sample_packing=True, sequence_len=64)
    for name in ("train.arrow", "val.arrow", "layout.json", "bin_fill.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_real_batches_bins_are_rows_of_sequence_len_and_eval_packing_follows_its_key(tmp_path):
    data, val = samples(30, seed=10), samples(8, seed=11)
    out, manifest = run_pack(tmp_path, data, val, sample_packing=True, multipack_real_batches=True, sequence_len=64,
                             micro_batch_size=3, eval_sample_packing=False)
    layout = json.loads((out / "layout.json").read_text())
    assert layout["train"]["capacity"] == 64 and layout["train"]["rows_per_batch"] == 3 and layout["train"]["packed"]
    assert layout["val"] == {"packed": False, "capacity": 64, "rows_per_batch": 3, "sequence_len": 64}
    assert read_table(out / "val.arrow").num_rows == 8
    assert manifest["packing"]["train"]["micro_batches_per_epoch"] == -(-manifest["packing"]["train"]["rows"] // 3)


def test_unpacked_rows_are_one_sample_each_in_mix_order(tmp_path):
    data = samples(10, seed=12)
    out, manifest = run_pack(tmp_path, data, [], sequence_len=64)
    rows = read_table(out / "train.arrow").to_pylist()
    assert [r["samples"] for r in rows] == [[i] for i in range(10)]
    assert [r["input_ids"] for r in rows] == [d["input_ids"] for d in data]
    assert json.loads((out / "layout.json").read_text())["train"]["packed"] is False


def test_eff_est_and_total_num_tokens_give_the_step_estimate(tmp_path):
    data = samples(30, seed=13)
    _, manifest = run_pack(tmp_path, data, [], sample_packing=True, sequence_len=64, micro_batch_size=2,
                           gradient_accumulation_steps=2, sample_packing_eff_est=0.5, total_num_tokens=10_000)
    stats = manifest["packing"]["train"]
    assert stats["estimated_steps_per_epoch"] == -(-10_000 // (0.5 * 64 * 2 * 2))  # 79
    assert stats["total_num_tokens_given"] == 10_000 and stats["tokens"] == sum(d["length"] for d in data)
    _, counted = run_pack(tmp_path, data, [], "b", sample_packing=True, sequence_len=64, sample_packing_eff_est=1.0)
    assert counted["packing"]["train"]["estimated_steps_per_epoch"] == -(-sum(d["length"] for d in data) // 64)


def test_an_eval_split_short_of_one_packed_batch_is_named_with_the_numbers(tmp_path):
    val, said = samples(2, seed=14, high=10), []
    out, manifest = run_pack(tmp_path, samples(20, seed=15), val, log=said.append, sample_packing=True, multipack_real_batches=True, sequence_len=64, eval_batch_size=4)
    message = " ".join(" ".join(said).split())
    tokens = sum(v["length"] for v in val)
    assert "eval_sample_packing" in message and "2 samples" in message and f"({tokens} tokens)" in message
    assert "1 rows of 64 tokens" in message and "eval_batch_size 4" in message
    assert manifest["packing"]["val"]["short_of_one_batch"] is True
    # train evaluates the one row as a batch of its own
    from stages.training.batches import epoch_batches
    assert epoch_batches([manifest["packing"]["val"]["tokens"]], 4, 1, 0, 0, shuffle=False) == [[[0]]]


def test_sequential_packing_keeps_mix_order_next_fit(tmp_path):
    # Axolotl's sample_packing_sequentially: each sample joins the current bin or opens the next
    assert [b.tolist() for b in pack.next_fit_in_order(np.array([5, 4, 3, 6, 1, 2]), 10)] == [[0, 1], [2, 3, 4], [5]]
    assert [b.tolist() for b in pack.next_fit_in_order(np.array([1, 1, 1, 1]), 10, max_items=3)] == [[0, 1, 2], [3]]
    data = samples(40, seed=13)
    out, _ = run_pack(tmp_path, data, [], sample_packing=True, sample_packing_sequentially=True, sequence_len=64, micro_batch_size=1)
    rows = read_table(out / "train.arrow").to_pylist()
    assert [s for r in rows for s in r["samples"]] == list(range(40))  # every sample once, in mix's order
    assert all(r["length"] + data[r["samples"][-1] + 1]["length"] > 64 for r in rows[:-1])  # a bin closes only when the next does not fit
    ffd, _ = run_pack(tmp_path, data, [], "ffd", sample_packing=True, sequence_len=64, micro_batch_size=1)
    assert [r["samples"] for r in read_table(ffd / "train.arrow").to_pylist()] != [r["samples"] for r in rows]
