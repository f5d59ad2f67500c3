"""Through the CLI on the tiny Llama: one optimizer step over the whole epoch gives the same
weights, and the same token-weighted validation loss, with and without sample packing, unpacked
micro-batches flattened into one row (the default) or padded (batch_flattening: false), because
train divides the summed token loss by the step's trained tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ONE_STEP = dict(adapter=None, lora_target_linear=None, optimizer="sgd", learning_rate=0.5, lr_scheduler="constant",
                gradient_accumulation_steps=16, max_steps=1, max_grad_norm=1e9)


def train(molt, make_config, name: str, **changes) -> tuple[dict, dict]:
    return train_logged(molt, make_config, name, **changes)[:2]


def train_logged(molt, make_config, name: str, **changes) -> tuple[dict, dict, str]:
    config = make_config(f"{name}.yml", output_dir=name, **ONE_STEP, **changes)
    result = molt("train", config)
    assert result.exit_code == 0, result
    return load_file(Path(name) / "model.safetensors"), json.loads((Path(name) / "metrics.json").read_text()), result.output


def test_packed_unpacked_and_flattened_steps_give_the_same_weights(make_config, molt, tiny_model_dir):
    packed, packed_metrics = train(molt, make_config, "packed", sample_packing=True)
    unpacked, unpacked_metrics, log = train_logged(molt, make_config, "unpacked", sample_packing=False)
    assert "micro-batches: flattened into one padding-free row" in log  # the default where the model keeps samples apart
    padded, _, log = train_logged(molt, make_config, "padded", sample_packing=False, batch_flattening=False)
    assert "padding-free" not in log
    flat, flat_metrics = train(molt, make_config, "flat", sample_packing=False, batch_flattening=True, micro_batch_size=3)
    assert packed_metrics["train_rows"] < unpacked_metrics["train_rows"]  # really packed
    assert packed_metrics["steps"] == unpacked_metrics["steps"] == 1
    base = load_file(tiny_model_dir / "model.safetensors")
    moved = max((packed[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3  # the step did change the weights
    for other in (unpacked, padded, flat):
        worst = max((packed[k] - other[k]).abs().max().item() for k in packed)
        assert worst < 1e-5, worst
    assert packed_metrics["eval_loss_before"] == pytest.approx(unpacked_metrics["eval_loss_before"], abs=1e-5)
    assert packed_metrics["eval_loss_after"] == pytest.approx(unpacked_metrics["eval_loss_after"], abs=1e-5)
    assert packed_metrics["eval_loss_after"] < packed_metrics["eval_loss_before"] + 1.0


def test_pad_to_sequence_len_gives_constant_shapes(make_config, molt, workdir):
    from stages.store import read_table
    from stages.training.batches import make_collator

    config = make_config(sample_packing=True, pad_to_sequence_len=True, multipack_real_batches=False)
    result = molt("run", config, "--until", "pack")
    assert result.exit_code == 0, result
    artifact = next((workdir / "cache" / "pack").glob("*/layout.json")).parent
    layout = json.loads((artifact / "layout.json").read_text())
    assert layout["train"]["capacity"] == 256 and layout["train"]["rows_per_batch"] == 1  # micro_batch_size 2 x 128
    rows = read_table(artifact / "train.arrow").to_pylist()
    assert len({len(r["input_ids"]) for r in rows}) > 1
    constant = make_collator(layout["train"], 2, pad_to_sequence_len=True, batch_flattening=False)
    assert {constant([r])["input_ids"].shape for r in rows} == {torch.Size([1, 256])}
    longest = make_collator(layout["train"], 2, pad_to_sequence_len=False, batch_flattening=False)
    assert {longest([r])["input_ids"].shape[1] % 8 for r in rows} == {0}
    assert len({longest([r])["input_ids"].shape for r in rows}) > 1
    flat = make_collator({"capacity": 128, "rows_per_batch": 2}, 2, pad_to_sequence_len=True, batch_flattening=True)
    assert flat(rows[:1] * 1)["input_ids"].shape == (1, 256)
