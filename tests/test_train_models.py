"""The model-family matrix: tiny random Llama, Mistral, Mixtral (MoE), Qwen2, Gemma, Phi-3 and
GPT-NeoX models (bench/pipeline.py's builder) each train through `molt train`, full and with LoRA
on every linear layer. Each saved artifact loads back and reproduces the validation loss the train
stage measured in memory, and a packed row gives the loss of its samples taken one by one: every
family keeps packed samples apart through position_ids (train refuses a model that does not)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ALPACA_ROWS, CHAT_ROWS, base_config, invoke_molt, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bench.pipeline import TINY_FAMILIES, tiny_model_dir
from stages.store import read_table
from stages.training.batches import collate
from stages.training.loss import token_loss

@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tokenizer_dir):
    """One directory (data, cache) for the whole matrix: the data stages are built once, since
    every family's tokenizer is the same SmolLM2 one."""
    root = tmp_path_factory.mktemp("families")
    write_jsonl(root / "data" / "alpaca.jsonl", ALPACA_ROWS)
    write_jsonl(root / "data" / "chat.jsonl", CHAT_ROWS)
    return root


def train_result(scratch: Path, family: str, name: str, **changes):
    """`molt train` of the base config on `family`, in `scratch`; the CLI result and the config."""
    config = base_config(tiny_model_dir(family))
    config.update(output_dir=f"out-{family}-{name}", **changes)
    config = {k: v for k, v in config.items() if v is not None}
    path = scratch / f"{family}-{name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    old = os.getcwd()
    os.chdir(scratch)
    try:
        return invoke_molt("train", path, cache=scratch / "cache"), config
    finally:
        os.chdir(old)


def train(scratch: Path, family: str, name: str, **changes) -> tuple[Path, dict]:
    """`molt train` of the base config on `family`; returns (output_dir, metrics)."""
    result, config = train_result(scratch, family, name, **changes)
    assert result.exit_code == 0, result
    out = scratch / config["output_dir"]
    return out, json.loads((out / "metrics.json").read_text())


def pack_rows(scratch: Path, out: Path) -> list[dict]:
    """The validation rows pack wrote for the run published in `out` (from its lineage.json)."""
    (pack,) = [link["key"] for link in json.loads((out / "lineage.json").read_text()) if link["stage"] == "pack"]
    return read_table(scratch / "cache" / "pack" / pack / "val.arrow").to_pylist()


def loss(model, rows: list[dict]) -> float:
    """Token-weighted loss of `rows` as one batch, outside the train stage."""
    batch = collate(rows, pad_id=0)
    labels = batch.pop("labels")
    with torch.no_grad():
        total = token_loss(model(**batch, use_cache=False), labels, 1)
    return float(total) / int((labels[..., 1:] != -100).sum())


def unpacked(rows: list[dict]) -> list[dict]:
    """Each packed row cut into its samples (where position_ids restart at 0)."""
    samples = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        for a, b in zip(starts, starts[1:]):
            samples.append({k: row[k][a:b] for k in ("input_ids", "labels", "position_ids")})
    return samples


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_family_trains_full_and_lora_and_reloads(family, scratch):
    from peft import PeftModel

    base_dir = tiny_model_dir(family)
    base_weights = load_file(base_dir / "model.safetensors")

    # full fine-tuning, one SGD step on packed rows; the saved model gives the in-memory loss
    full_out, full = train(scratch, family, "full", max_steps=1, adapter=None, lora_target_linear=None, optimizer="sgd", learning_rate=0.5)
    trained = load_file(full_out / "model.safetensors")
    assert max((trained[k] - base_weights[k]).abs().max().item() for k in base_weights) > 1e-3
    reloaded = AutoModelForCausalLM.from_pretrained(full_out, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == TINY_FAMILIES[family][1]
    rows = pack_rows(scratch, full_out)
    assert loss(reloaded, rows) == pytest.approx(full["eval_loss_after"], rel=1e-5)

    # packed rows hold several samples, and give the loss of those samples one by one: the
    # family's attention restarts where position_ids restart
    samples = unpacked(rows)
    assert len(samples) > len(rows)
    assert loss(reloaded, samples) == pytest.approx(loss(reloaded, rows), abs=1e-5)

    # LoRA on every linear layer: the adapter trains and reloads onto the base with the same loss
    lora_out, lora = train(scratch, family, "lora", max_steps=2, learning_rate=0.01)
    assert lora["eval_loss_after"] < lora["eval_loss_before"]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), lora_out).eval()
    assert any(p.abs().max() > 0 for n, p in adapted.named_parameters() if "lora_B" in n)
    assert loss(adapted, rows) == pytest.approx(lora["eval_loss_after"], rel=1e-5)
    shutil.rmtree(full_out)
    shutil.rmtree(lora_out)


def test_a_model_that_ignores_position_ids_is_refused_for_packing(scratch, monkeypatch):
    """Without the block-diagonal mask that transformers derives from restarting position_ids,
    packed samples would attend to each other: molt refuses instead of training on that."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    # eager: molt's per-sample SDPA reads the position_ids itself, not through that mask
    result, _ = train_result(scratch, "llama", "ignored", sample_packing=True, eager_attention=True)
    assert result.exit_code == 2, result
    assert "does not keep packed samples apart" in result.output and "sample_packing: false" in result.output
    assert not (scratch / "out-llama-ignored").exists()
