"""Data parallelism: each epoch every rank gets the same number of micro-batches, the ranks'
rows do not overlap, and every row (so every sample) is trained exactly once; with
curriculum_sampling, in the prepared order."""

from __future__ import annotations

import numpy as np
import pytest

from stages.training.batches import RankBatches, epoch_batches


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n,per_batch", [(1, 1), (2, 4), (7, 1), (10, 2), (31, 3), (64, 4)])
@pytest.mark.parametrize("group_by_length", [False, True])
def test_every_row_once_per_epoch_and_the_same_batch_count_on_every_rank(world, n, per_batch, group_by_length):
    lengths = np.random.default_rng(n).integers(1, 100, size=n)
    for epoch in range(3):
        ranks = [_with_epoch(lengths, per_batch, world, r, epoch, group_by_length) for r in range(world)]
        counts = {len(batches) for batches in ranks}
        assert len(counts) == 1  # no rank waits for another at the end of the epoch
        assert counts == {len(RankBatches(lengths, per_batch, world, 0, seed=7))}
        rows = [i for batches in ranks for batch in batches for i in batch if i < n]
        assert sorted(rows) == list(range(n))  # each row exactly once, on exactly one rank
        for batches in ranks:
            assert all(1 <= len(b) <= per_batch for b in batches)
            assert all(i == n for b in batches for i in b if i >= n)  # only the empty-row marker beyond
            assert all(len(b) == 1 for b in batches if b[0] >= n)  # an empty row is a batch of its own


def _with_epoch(lengths, per_batch, world, rank, epoch, group_by_length):
    sampler = RankBatches(lengths, per_batch, world, rank, seed=7, group_by_length=group_by_length)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_each_epoch_has_a_fresh_order_and_a_seed_fixes_it():
    lengths = list(range(1, 41))
    first, second = epoch_batches(lengths, 2, 2, seed=1, epoch=0), epoch_batches(lengths, 2, 2, seed=1, epoch=1)
    assert first != second
    assert first == epoch_batches(lengths, 2, 2, seed=1, epoch=0)
    assert first != epoch_batches(lengths, 2, 2, seed=2, epoch=0)


def test_empty_rows_only_when_there_are_fewer_rows_than_batches():
    assert epoch_batches([5, 6], 4, 3, seed=0, epoch=0, shuffle=False) == [[[0]], [[1]], [[2]]]  # 2 rows, 3 ranks
    assert all(i < 8 for rank in epoch_batches([1] * 8, 3, 2, seed=0, epoch=0) for b in rank for i in b)


def test_group_by_length_puts_rows_of_similar_length_together():
    lengths = np.random.default_rng(0).integers(1, 1000, size=400)
    grouped = epoch_batches(lengths, 4, 1, seed=0, epoch=0, group_by_length=True)[0]
    shuffled = epoch_batches(lengths, 4, 1, seed=0, epoch=0)[0]

    def spread(batches):  # mean (longest - shortest) in a batch: padding a batch pays for
        return np.mean([lengths[b].max() - lengths[b].min() for b in batches])

    assert spread(grouped) < spread(shuffled) / 5


@pytest.mark.parametrize("curriculum", [False, True])
def test_curriculum_sampling_trains_the_rows_in_their_prepared_order(curriculum, tiny_model_dir, tmp_path):
    import pyarrow as pa
    from transformers import AutoModelForCausalLM, TrainingArguments

    from stages.train import Params
    from stages.training.batches import Rows, collate
    from stages.training.trainer import MoltTrainer

    n = 12
    table = pa.table({"input_ids": [[10 + i, 3, 4] for i in range(n)], "labels": [[-100, 3, 4]] * n, "position_ids": [[0, 1, 2]] * n})
    params = Params(learning_rate=1e-3, curriculum_sampling=curriculum)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], per_device_train_batch_size=1, use_cpu=True)
    trainer = MoltTrainer(params, Rows(table, 0), Rows(table.slice(0, 0), 0), {"train": lambda rows: collate(rows, 0)},
                          model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args)
    epochs = []
    for epoch in range(2):
        loader = trainer.get_train_dataloader()
        loader.set_epoch(epoch)  # as the Trainer does at each epoch
        epochs.append([int(b["input_ids"][0, 0]) - 10 for b in loader])
    assert all(sorted(order) == list(range(n)) for order in epochs)
    if curriculum:
        assert epochs == [list(range(n))] * 2
    else:
        assert epochs[0] != list(range(n)) and epochs[0] != epochs[1]


def test_curriculum_sampling_is_refused_where_trl_trains():
    # the preference and reward trainers are TRL's, with their own sampler: the key would be ignored
    from stages.config import ConfigError, config_from_dict

    base = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "chatml.intel"}], "rl": "dpo", "learning_rate": 1e-5, "curriculum_sampling": True}
    with pytest.raises(ConfigError, match="curriculum_sampling is a setting of molt's supervised trainer"):
        config_from_dict(base)
