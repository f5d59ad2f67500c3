"""The train stage beyond LoRA: full fine-tuning, test_datasets as the held-out split."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from conftest import write_jsonl

SAMPLE = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


def test_full_fine_tune_changes_the_weights_and_loads_back(make_config, molt, tiny_model_dir):
    config = make_config(adapter=None, lora_target_linear=None, learning_rate=0.01)
    result = molt("train", config)
    assert result.exit_code == 0, result
    out = Path("out")
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert (trained(SAMPLE).logits - base(SAMPLE).logits).abs().max() > 1e-4
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    refused = molt("merge-lora", config)
    assert refused.exit_code == 2 and "adapter" in refused.output


def test_test_datasets_become_the_validation_split(make_config, molt, workdir):
    write_jsonl(workdir / "data" / "held_out.jsonl", [{"instruction": f"Echo {i}.", "output": str(i)} for i in range(5)])
    config = make_config(val_set_size=None, test_datasets=[{"path": "data/held_out.jsonl", "type": "alpaca"}])
    result = molt("preprocess", config)
    assert result.exit_code == 0, result
    assert {"fetch_data[test0]", "format[test0]", "tokenize[test0]"} <= result.built(), result.output
    assert "5 validation rows" in result.output


def test_merge_lora_after_relora_says_train_wrote_the_full_model(make_config, molt):
    refused = molt("merge-lora", make_config(relora_steps=2))
    assert refused.exit_code == 2 and "relora_steps" in refused.output and "full model" in refused.output
