"""LoftQ (`peft: {loftq_config: {loftq_bits: 4}}`): the LoRA adapter starts as the low-rank fit
of the NF4 quantization error of each base weight, the base becomes its NF4 round trip; training,
reloading and merging all see that same base."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from stages.config import ConfigError, config_from_dict
from stages.store import read_table
from stages.training.batches import collate
from stages.training.loss import token_loss
from stages.training.model import _nf4_round_trip, load_base, with_adapter, with_trained_adapter

pytest.importorskip("bitsandbytes")

LOFTQ = {"loftq_config": {"loftq_bits": 4}}


def test_loftq_initialisation_fits_the_quantization_error(tiny_model_dir):
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    params = SimpleNamespace(adapter="lora", lora_target_linear=True, lora_r=4, lora_alpha=8, peft=LOFTQ)
    model = with_adapter(params, AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(layers) == 2 * 7  # q k v o gate up down in each of the 2 layers
    for name, layer in layers:
        weight = original[name.removeprefix("base_model.model.") + ".weight"]
        base = layer.get_base_layer().weight.detach()
        b, a = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
        assert b.abs().max() > 0  # not peft's zero-B start
        assert torch.equal(base, _nf4_round_trip(weight))  # the base is now on the NF4 grid
        error_quantized = (weight - base).norm()
        error_loftq = (weight - base - layer.scaling["default"] * b @ a).norm()
        assert error_loftq < 0.9 * error_quantized, name  # the adapter takes back part of the error


def test_loftq_adapter_trains_reloads_and_merges(warm, molt, cache_dir, tiny_model_dir):
    from peft import PeftModel

    config = warm(peft=LOFTQ, learning_rate=0.01)
    result = molt("train", config)
    assert result.exit_code == 0, result
    assert "not supported yet" not in result.output
    after = json.loads(Path("out/metrics.json").read_text())["eval_loss_after"]
    (val,) = cache_dir.glob("pack/*/val.arrow")
    batch = collate(read_table(val).to_pylist(), pad_id=0)
    labels = batch.pop("labels")

    def loss(model) -> float:
        with torch.no_grad():
            return float(token_loss(model.eval()(**batch, use_cache=False), labels, 1)) / int((labels[..., 1:] != -100).sum())

    params = SimpleNamespace(peft=LOFTQ)
    assert loss(with_trained_adapter(params, load_base(params, tiny_model_dir, 49152), Path("out"))) == pytest.approx(after, rel=1e-5)
    # on the unquantized base the same adapter is another model: LoftQ's base is part of it
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), "out")
    assert abs(loss(plain) - after) > 1e-4

    merged = molt("merge-lora", config)
    assert merged.exit_code == 0, merged
    assert loss(AutoModelForCausalLM.from_pretrained("out/merged", dtype=torch.float32)) == pytest.approx(after, rel=1e-5)


@pytest.mark.parametrize("changes, message", [
    ({"adapter": None}, "needs adapter: lora"),
    ({"adapter": "qlora", "load_in_4bit": True}, "needs adapter: lora"),
    ({"load_in_8bit": True}, "unset load_in_4bit / load_in_8bit"),
    ({"peft_use_dora": True}, "peft_use_dora"),
    ({"peft": {"loftq_config": {"loftq_bits": 4, "loftq_iter": 2}}}, "expected {loftq_bits: 4}"),
    ({"peft": {"something": 1}}, "peft: something not supported"),
])
def test_loftq_combinations_refused_at_load(changes, message):
    config = {"base_model": "m", "datasets": [{"path": "d.jsonl"}], "adapter": "lora", "peft": LOFTQ, **changes}
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        config_from_dict(config)


def test_loftq_bits_other_than_4_are_refused(tiny_model_dir):
    from stages.store import DataError

    params = SimpleNamespace(adapter="lora", lora_target_linear=True, lora_r=4, lora_alpha=8, peft={"loftq_config": {"loftq_bits": 2}})
    with pytest.raises(DataError, match="loftq_bits: 2"):
        with_adapter(params, AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
