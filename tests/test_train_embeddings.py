"""Embeddings follow the tokenizer: added `tokens` grow them (to a multiple of 32 with
resize_token_embeddings_to_32x) and their rows train; with LoRA the embeddings must be in
lora_modules_to_save, and merge grows the base the same way before folding the adapter in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stages.store import read_table
from stages.training.batches import collate
from stages.training.loss import token_loss

UNIT = "<|unit|>"
UNIT_ROWS = [{"instruction": f"Tag {n} metres.", "input": "", "output": f"{n} {UNIT} m"} for n in (3, 8, 21, 40, 75, 99)]
BASE_VOCAB = 49152  # the SmolLM2 tokenizer's


def with_units(make_config, **changes) -> Path:
    """The base config plus a dataset whose answers use the added token."""
    config = make_config(**changes)
    write_jsonl(config.parent / "data" / "units.jsonl", UNIT_ROWS)
    text = config.read_text().replace("datasets:\n", "datasets:\n- path: data/units.jsonl\n  type: alpaca\n", 1)
    config.write_text(text)
    return config


def test_added_token_grows_embeddings_to_a_multiple_of_32_and_its_rows_train(make_config, molt):
    full = dict(adapter=None, lora_target_linear=None, tokens=[UNIT], resize_token_embeddings_to_32x=True, learning_rate=0.01)
    weights = {}
    for steps in (1, 3):
        result = molt("train", with_units(make_config, max_steps=steps, output_dir=f"out{steps}", **full))
        assert result.exit_code == 0, result
        assert "not supported yet" not in result.output
        weights[steps] = load_file(Path(f"out{steps}") / "model.safetensors")
    info = json.loads(Path("out1/molt_tokenizer.json").read_text())
    assert info["vocab_size"] == BASE_VOCAB + 1
    embed, head = weights[3]["model.embed_tokens.weight"], weights[3]["lm_head.weight"]
    assert embed.shape[0] == head.shape[0] == BASE_VOCAB + 32  # 49153 rounded up to a multiple of 32
    assert json.loads(Path("out3/config.json").read_text())["vocab_size"] == BASE_VOCAB + 32
    # the new token's rows keep training between step 1 and step 3 (they are in the data)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert (weights[3][name][BASE_VOCAB] - weights[1][name][BASE_VOCAB]).abs().max() > 1e-4, name
    # padding rows beyond the vocabulary never appear as input: their embeddings stay as initialised
    assert torch.equal(weights[3]["model.embed_tokens.weight"][BASE_VOCAB + 1 :], weights[1]["model.embed_tokens.weight"][BASE_VOCAB + 1 :])


def test_without_32x_the_embeddings_grow_to_the_vocabulary(make_config, molt):
    result = molt("train", with_units(make_config, adapter=None, lora_target_linear=None, tokens=[UNIT], max_steps=1))
    assert result.exit_code == 0, result
    assert load_file(Path("out") / "model.safetensors")["model.embed_tokens.weight"].shape[0] == BASE_VOCAB + 1


def test_lora_with_added_tokens_trains_the_embeddings_and_merges(make_config, molt, cache_dir):
    refused = molt("train", with_units(make_config, tokens=[UNIT]))
    assert refused.exit_code == 2, refused
    assert "lora_modules_to_save includes embed_tokens, lm_head" in refused.output

    config = with_units(make_config, tokens=[UNIT], resize_token_embeddings_to_32x=True, lora_modules_to_save=["embed_tokens", "lm_head"], learning_rate=0.01)
    result = molt("train", config)
    assert result.exit_code == 0, result
    adapter = load_file(Path("out") / "adapter_model.safetensors")
    embeds = [v for k, v in adapter.items() if "embed_tokens" in k]
    assert embeds and all(v.shape[0] == BASE_VOCAB + 32 for v in embeds)
    after = json.loads(Path("out/metrics.json").read_text())["eval_loss_after"]

    merged = molt("merge-lora", config)
    assert merged.exit_code == 0, merged
    model = AutoModelForCausalLM.from_pretrained("out/merged", dtype=torch.float32).eval()
    assert model.get_input_embeddings().num_embeddings == BASE_VOCAB + 32
    (val,) = cache_dir.glob("pack/*/val.arrow")
    batch = collate(read_table(val).to_pylist(), pad_id=0)
    labels = batch.pop("labels")
    with torch.no_grad():
        loss = float(token_loss(model(**batch, use_cache=False), labels, 1)) / int((labels[..., 1:] != -100).sum())
    assert loss == pytest.approx(after, rel=1e-5)
