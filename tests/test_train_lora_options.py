"""LoRA options (DoRA, layers_to_transform, regex targets, LoRA+, continuing from an adapter) and
full fine-tuning of `unfrozen_parameters` with NEFTune, each checked in what was trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    # copies: the tensors would otherwise map the file, which the next run overwrites in place
    return {k: v.clone() for k, v in load_file(out / "adapter_model.safetensors").items()}


def metrics(cache: Path, result) -> dict:
    """The newest train artifact's metrics.json."""
    newest = max(cache.glob("train/*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(newest.read_text())


def test_dora_on_chosen_layers_and_modules(warm, molt):
    result = molt("train", warm(peft_use_dora=True, lora_target_linear=None, lora_target_modules=["q_proj", "v_proj"], peft_layers_to_transform=[1]))
    assert result.exit_code == 0, result
    assert "not supported yet" not in result.output
    weights = adapter_weights(Path("out"))
    assert any("lora_magnitude_vector" in k for k in weights)  # DoRA's magnitudes
    lora = [k for k in weights if "lora_A" in k]
    assert lora and all(".layers.1." in k and ("q_proj" in k or "v_proj" in k) for k in lora), lora


def test_regex_targets_loraplus_then_continue_from_the_adapter(warm, molt, workdir):
    lr = 1e-3
    result = molt("train", warm(lora_target_linear=None, lora_target_modules=r".*\.(k_proj|down_proj)", learning_rate=lr, loraplus_lr_ratio=16))
    assert result.exit_code == 0, result
    first = adapter_weights(Path("out"))
    assert {k.split(".")[-3] for k in first if "lora_A" in k} == {"k_proj", "down_proj"}
    # Adam moves a weight by at most about lr per step: B moving far more is LoRA+'s 16x rate
    biggest_b = max(v.abs().max() for k, v in first.items() if "lora_B" in k)
    assert biggest_b > 4 * lr, biggest_b

    shutil.copytree("out", workdir / "first_adapter")
    again = molt("train", warm(lora_target_linear=None, lora_target_modules=None, lora_model_dir=str(workdir / "first_adapter"), learning_rate=lr))
    assert again.exit_code == 0, again
    second = adapter_weights(Path("out"))
    assert second.keys() == first.keys()
    # continued from the first adapter's weights (a fresh A is random), and trained on
    moved = max((second[k] - first[k]).abs().max() for k in first)
    assert 0 < moved < 0.01, moved


def test_unfrozen_parameters_and_neftune(warm, molt, cache_dir, tiny_model_dir):
    full = dict(adapter=None, lora_target_linear=None, learning_rate=0.01, unfrozen_parameters=[r"model\.layers\.1\.mlp\..*"])
    result = molt("train", warm(**full))
    assert result.exit_code == 0, result
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = AutoModelForCausalLM.from_pretrained("out").state_dict()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all(k.startswith("model.layers.1.mlp.") for k in changed), changed
    plain = metrics(cache_dir, result)
    assert plain["trainable_parameters"] == sum(v.numel() for k, v in base.items() if k.startswith("model.layers.1.mlp."))

    noisy = molt("train", warm(**full, neftune_noise_alpha=50))
    assert noisy.exit_code == 0, noisy
    # NEFTune adds noise to the embeddings in training forward passes: the first loss differs
    assert metrics(cache_dir, noisy)["loss_history"][0]["loss"] != plain["loss_history"][0]["loss"]

    bad = molt("train", warm(**{**full, "unfrozen_parameters": ["nothing\\.like\\.this"]}))
    assert bad.exit_code == 2 and "match no parameter" in bad.output
