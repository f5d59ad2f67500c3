"""Precision (bf16 / fp16 / tf32), the attention kernel and torch.compile: what each resolves to on
this CPU machine (and on a GPU, by pretending one), and what training does with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from stages.store import DataError
from stages.train import Params
from stages.training.batches import collate
from stages.training.precision import attention_implementation, compile_settings, precision_settings, set_attention

LR = 1e-3


def settings(**keys) -> dict:
    return precision_settings(Params(learning_rate=LR, **keys), log=print)


def test_precision_on_cpu(capsys):
    assert settings() == {}  # bf16: auto is fp32 on CPU
    assert settings(bf16=False) == {}
    assert settings(bf16=True) == {"bf16": True, "use_cpu": True}  # CPU bf16 autocast
    assert settings(bf16="full") == {"bf16_full_eval": True, "use_cpu": True}
    assert settings(fp16=True) == {}
    assert "fp16: true needs a CUDA GPU" in capsys.readouterr().out
    assert settings(tf32=True) == {}
    assert settings(float16=True) == {} and settings(bfloat16=True) == {}  # the weights' dtype; no autocast
    assert "tf32: true changes CUDA matmuls only" in capsys.readouterr().out


@pytest.mark.parametrize("bf16_capable, auto", [(True, {"bf16": True}), (False, {"fp16": True})])
def test_precision_on_a_gpu(monkeypatch, bf16_capable, auto):
    # Axolotl's resolution of bf16: auto on a GPU: bf16 where supported, else fp16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_capable)
    assert settings() == auto
    assert settings(fp16=True) == {"fp16": True}
    assert settings(bf16=True, tf32=True) == {"bf16": True, "tf32": True}
    assert settings(bf16=False, tf32=False) == {"tf32": False}
    assert settings(float16=True) == {}  # fp16 weights: bf16: auto adds no autocast


def losses(molt, cache_dir, config) -> tuple[list[float], str]:
    result = molt("train", config)
    assert result.exit_code == 0, result
    assert "not supported yet" not in result.output, result.output
    newest = max(cache_dir.glob("train/*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return [h["loss"] for h in json.loads(newest.read_text())["loss_history"]], result.output


def test_precision_when_training_on_cpu(warm, molt, cache_dir):
    fp32, _ = losses(molt, cache_dir, warm(max_steps=3, bf16=False))
    auto, _ = losses(molt, cache_dir, warm(max_steps=3))
    assert auto == fp32  # bf16: auto falls back to fp32 on CPU: the very same numbers
    bf16, _ = losses(molt, cache_dir, warm(max_steps=3, bf16=True))
    # bf16 autocast: close to fp32 but not bit-equal
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)
    fp16, output = losses(molt, cache_dir, warm(max_steps=3, bf16=False, fp16=True))
    assert "fp16: true needs a CUDA GPU" in output and "training in fp32 on CPU" in output
    assert fp16 == fp32


@pytest.mark.parametrize("keys, dtype", [({"bf16": "full"}, "BF16"), ({"bfloat16": True}, "BF16"), ({"float16": True}, "F16")])
def test_half_precision_weights(warm, molt, cache_dir, keys, dtype):
    trained, _ = losses(molt, cache_dir, warm(max_steps=2, adapter=None, lora_target_linear=None, learning_rate=1e-2, **keys))
    assert len(trained) == 2 and all(loss == loss for loss in trained)  # not NaN
    with safe_open(Path("out") / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}
    assert dtypes == {dtype}, dtypes


# -- attention ---------------------------------------------------------------------------------


def attention(**keys):
    return attention_implementation(Params(learning_rate=LR, **keys), log=print)


def test_attention_flags_map_to_transformers_names():
    assert attention() is None
    assert attention(sdp_attention=True) == "sdpa"
    assert attention(eager_attention=True) == "eager"
    assert attention(attn_implementation="eager") == "eager"
    with pytest.raises(DataError, match="'sdpa2' is not an attention kernel"):
        attention(attn_implementation="sdpa2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
@pytest.mark.parametrize("keys, message", [
    ({"flash_attention": True}, "flash_attention: true needs the package flash-attn (pip install flash-attn) and a CUDA GPU"),
    ({"attn_implementation": "flash_attention_2"}, "attn_implementation: flash_attention_2 needs the package flash-attn (pip install flash-attn) and a CUDA GPU"),
    ({"xformers_attention": True}, "xformers_attention: true needs the package xformers (pip install xformers) and a CUDA GPU"),
    ({"attn_implementation": "flex_attention"}, "attn_implementation: flex_attention needs a CUDA GPU (PyTorch's FlexAttention has no backward pass on CPU)"),
])
def test_gpu_kernels_need_their_package_and_a_gpu(keys, message):
    with pytest.raises(DataError) as info:
        attention(**keys)
    assert message in str(info.value) and "on CPU use sdp_attention: true" in str(info.value)


def test_flash_attention_refused_before_training(warm, molt):
    result = molt("train", warm(flash_attention=True))
    assert result.exit_code == 2, result
    assert "flash_attention: true needs" in result.output and "CUDA GPU" in result.output


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_packed_samples_stay_apart(kernel, tiny_model_dir):
    """Two samples packed in one row give each the logits it has alone: the kernel gets a
    block-diagonal mask from the restarting position_ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    set_attention(model, Params(learning_rate=LR, attn_implementation=kernel), log=print)
    # SDPA on CPU runs per packed sample (training/segment_attention.py)
    assert model.config._attn_implementation == {"sdpa": "molt_segments"}.get(kernel, kernel)
    model.eval()
    first, second = [5, 17, 42, 99, 7], [8, 3, 250, 11]
    row = {"input_ids": first + second, "labels": first + second, "position_ids": list(range(5)) + list(range(4))}
    batch = collate([row], pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]  # as training: no KV cache
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
        # without the restart the second sample would see the first: the check can fail
        leaky = model(input_ids=batch["input_ids"][:, :9], use_cache=False).logits[0]
    assert torch.allclose(packed[5:9], alone, atol=1e-5)
    assert not torch.allclose(leaky[5:9], alone, atol=1e-3)


# -- torch.compile -----------------------------------------------------------------------------


def test_compile_settings():
    assert compile_settings(Params(learning_rate=LR)) == {}
    assert compile_settings(Params(learning_rate=LR, torch_compile="auto")) == ({"torch_compile": True} if torch.cuda.is_available() else {})
    assert compile_settings(Params(learning_rate=LR, torch_compile=True, torch_compile_backend="aot_eager", torch_compile_mode="default")) == {
        "torch_compile": True, "torch_compile_backend": "aot_eager", "torch_compile_mode": "default"}


def test_torch_compile_trains_the_same(warm, molt, cache_dir):
    from torch._dynamo.utils import counters

    counters.clear()
    plain, _ = losses(molt, cache_dir, warm(max_steps=2))
    assert counters["stats"]["unique_graphs"] == 0
    # the eager backend: dynamo captures the graphs and runs them as they are (seconds, same numbers)
    compiled, _ = losses(molt, cache_dir, warm(max_steps=2, torch_compile=True, torch_compile_backend="eager"))
    assert counters["stats"]["unique_graphs"] > 0
    assert compiled == pytest.approx(plain, rel=1e-5)


# -- Liger kernels ---------------------------------------------------------------------------------


def test_liger_kernels_need_the_package_and_a_gpu(monkeypatch):
    from stages.training import precision

    assert precision.liger_settings(Params(learning_rate=LR)) == {}
    liger = Params(learning_rate=LR, liger_rms_norm=True, liger_glu_activation=True)
    monkeypatch.setattr(precision, "_cuda", lambda: False)
    with pytest.raises(DataError, match=r"liger_rms_norm, liger_glu_activation: the Liger kernels need .*a CUDA GPU"):
        precision.liger_settings(liger)
    # with the package and a GPU: the Trainer patches exactly the chosen kernels, never the loss
    monkeypatch.setattr(precision, "_cuda", lambda: True)
    real = precision.importlib.util.find_spec
    monkeypatch.setattr(precision.importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real(name, *a))
    assert precision.liger_settings(liger) == {"use_liger_kernel": True, "liger_kernel_config": {
        "rope": False, "rms_norm": True, "layer_norm": False, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_liger_refused_before_training_on_cpu(warm, molt):
    result = molt("train", warm(plugins=["axolotl.integrations.liger.LigerPlugin"], liger_rms_norm=True))
    assert result.exit_code == 2, result
    assert "liger_rms_norm: the Liger kernels need" in result.output and "CUDA GPU" in result.output


def test_attention_kernel_reaches_the_adapter_model(warm, molt, cache_dir, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    set_attention(wrapped, Params(learning_rate=LR, eager_attention=True), log=print)
    assert wrapped.base_model.model.config._attn_implementation == "eager"
    # in training it is set on the LoRA-wrapped model before the packed-masking probe; eager and sdpa train alike
    sdpa, _ = losses(molt, cache_dir, warm(max_steps=2, sdp_attention=True))
    eager, _ = losses(molt, cache_dir, warm(max_steps=2, eager_attention=True))
    assert eager == pytest.approx(sdpa, rel=1e-4)


def test_offloaded_activations_train_the_same(warm, molt, cache_dir, monkeypatch):
    saved = []
    real = torch.autograd.graph.save_on_cpu

    def counting(*args, **kwargs):
        saved.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counting)
    checkpointed, _ = losses(molt, cache_dir, warm(max_steps=2, gradient_checkpointing=True))
    assert saved == []
    offloaded, _ = losses(molt, cache_dir, warm(max_steps=2, gradient_checkpointing="offload"))
    assert len(saved) >= 2  # every training forward pass ran with its saved tensors sent to CPU memory
    assert offloaded == checkpointed
