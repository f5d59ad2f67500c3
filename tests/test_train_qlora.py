"""QLoRA (4-bit base through bitsandbytes, on CPU) and 8-bit LoRA: the adapter trains, reloads onto
the same quantized base with the eval loss measured in memory, and merges onto the full-precision base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from stages.store import read_table  # noqa: E402
from stages.training.batches import collate  # noqa: E402
from stages.training.loss import token_loss  # noqa: E402

SAMPLE = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


def reloaded_eval_loss(model, cache: Path) -> float:
    """The token-weighted loss on pack's validation rows, recomputed outside the train stage."""
    (val,) = cache.glob("pack/*/val.arrow")
    table = read_table(val)
    total = n = 0.0
    with torch.no_grad():
        for i in range(table.num_rows):
            row = {k: table.column(k)[i].as_py() for k in ("input_ids", "labels", "position_ids")}
            batch = collate([row], pad_id=0)
            labels = batch.pop("labels")
            count = int((labels[..., 1:] != -100).sum())
            # no KV cache: with one, transformers would not mask between the packed samples
            total += float(token_loss(model(**batch, use_cache=False), labels, 1))
            n += count
    return total / n


def quantized_base(model_dir, **bnb):
    """The base as train loads it: bitsandbytes' quantized layers, on the kernel they trained with."""
    from stages.training.model import same_4bit_kernel_in_eval

    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(**bnb), device_map="cpu", dtype=torch.float32)
    same_4bit_kernel_in_eval(model)
    return model.eval()


def test_qlora_trains_reloads_and_merges(make_config, molt, tiny_model_dir, cache_dir):
    from peft import PeftModel

    config = make_config(adapter="qlora", load_in_4bit=True, learning_rate=0.01, bnb_config_kwargs={"bnb_4bit_use_double_quant": False})
    result = molt("train", config)
    assert result.exit_code == 0, result
    assert "not supported yet" not in result.output
    out = Path("out")
    assert (out / "adapter_config.json").exists()
    metrics = json.loads((cache_dir.glob("train/*/metrics.json").__next__()).read_text())

    nf4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float32)
    base4 = quantized_base(tiny_model_dir, **nf4)
    with torch.no_grad():
        before = base4(SAMPLE).logits
    model = PeftModel.from_pretrained(base4, out).eval()
    # the adapter trained: its B matrices left their zero initialisation, the logits moved
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        assert (model(SAMPLE).logits - before).abs().max() > 1e-4
    # the saved adapter on the same 4-bit base gives the eval loss the stage measured in memory
    # and lower than the base's
    after = reloaded_eval_loss(model, cache_dir)
    assert after == pytest.approx(metrics["eval_loss_after"], rel=1e-5)
    with torch.no_grad(), model.disable_adapter():
        assert after < reloaded_eval_loss(model, cache_dir) - 1e-3

    # merge: onto the full-precision base (4-bit is not merged into), loads without peft
    merged_run = molt("merge-lora", config)
    assert merged_run.exit_code == 0, merged_run
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    with torch.no_grad():
        assert torch.allclose(merged(SAMPLE).logits, full(SAMPLE).logits, atol=1e-4)
    assert not hasattr(merged.config, "quantization_config")


def test_8bit_lora_trains_and_reloads(make_config, molt, tiny_model_dir, cache_dir):
    from peft import PeftModel

    config = make_config(load_in_8bit=True, learning_rate=0.01)
    result = molt("train", config)
    assert result.exit_code == 0, result
    metrics = json.loads((cache_dir.glob("train/*/metrics.json").__next__()).read_text())
    model = PeftModel.from_pretrained(quantized_base(tiny_model_dir, load_in_8bit=True), Path("out")).eval()
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear8bitLt"
    assert reloaded_eval_loss(model, cache_dir) == pytest.approx(metrics["eval_loss_after"], rel=1e-5)


def test_bfloat16_with_8bit_trains_with_the_unquantized_weights_in_fp32(make_config, molt, cache_dir):
    # Axolotl accepts bfloat16: true with load_in_8bit; molt loads it with a note (int8 layers, the rest fp32)
    result = molt("train", make_config(load_in_8bit=True, bfloat16=True, learning_rate=0.01))
    assert result.exit_code == 0, result
    assert "bfloat16: true with load_in_8bit: molt keeps the int8 layers int8 and the other weights in fp32" in result.output
    metrics = json.loads((cache_dir.glob("train/*/metrics.json").__next__()).read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]


def test_4bit_layers_evaluate_on_their_training_kernel(tiny_model_dir):
    """bitsandbytes would repack a 4-bit weight in place for its bf16 CPU inference kernel on the
    first forward in eval mode without gradients (on AVX512-BF16 CPUs): the evaluation would then
    differ from training, fail on layers narrower than a quantization block, and leave the next
    training steps on a kernel with no backward. The base train loads keeps one kernel."""
    from types import SimpleNamespace

    from stages.training.model import load_base

    params = SimpleNamespace(load_in_4bit=True, bnb_config_kwargs={"bnb_4bit_use_double_quant": False})
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    model = load_base(params, tiny_model_dir, vocab)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    with torch.no_grad():
        trained = model.train()(SAMPLE).logits
        evaluated = model.eval()(SAMPLE).logits
    assert torch.equal(trained, evaluated)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
