"""molt's chunked linear cross-entropy against torch's cross_entropy on the full logits: the same
loss and the same gradients (fp32, 1e-5), with and without untrained positions, packed rows and
plain ones, through tiny models of several families and with LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages.training.chunked_loss import TrainedTokenLoss, linear_cross_entropy
from stages.training.loss import IGNORE, token_loss


def _plain(hidden, weight, bias, targets, softcap=None):
    logits = F.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_loss_and_gradients_equal_the_full_logits(bias, softcap, chunk_rows):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(53, 16, generator=g, requires_grad=True)
    weight = torch.randn(301, 16, generator=g, requires_grad=True)
    b = torch.randn(301, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, 301, (53,), generator=g)
    mine = linear_cross_entropy(hidden, weight, b, targets, softcap, chunk_rows=chunk_rows)
    ref = _plain(hidden, weight, b, targets, softcap)
    assert torch.allclose(mine, ref, rtol=1e-5), (mine, ref)
    upstream = torch.tensor(0.37)  # the backward scales by the incoming gradient
    grads = torch.autograd.grad(mine * upstream, [hidden, weight] + ([b] if bias else []))
    expected = torch.autograd.grad(ref * upstream, [hidden, weight] + ([b] if bias else []))
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), float((got - want).abs().max())


def test_frozen_weight_gets_no_gradient_and_hidden_only_does():
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(40, 8)  # frozen (LoRA leaves the output layer alone)
    targets = torch.randint(0, 40, (9,))
    (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, None, targets), [hidden])
    (want,) = torch.autograd.grad(_plain(hidden, weight, None, targets), [hidden])
    assert torch.allclose(grad, want, rtol=1e-5, atol=1e-6)


def _model(family: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    configs = {
        "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common),
        "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common),
        "gemma2": lambda: transformers.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0, **common),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**common),
    }
    config = configs[family]()
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).float()


def _batch(packed: bool):
    """Two rows; some positions untrained (prompts, padding); packed: two samples in row 0."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 211, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = IGNORE  # a prompt
    labels[1, :5] = IGNORE
    labels[1, 10:] = IGNORE  # padding
    positions = torch.arange(12).repeat(2, 1)
    if packed:
        positions[0, 6:] = torch.arange(6)
        labels[0, 6] = IGNORE  # a sample's first token is never a target
        labels[0, 7:8] = IGNORE
    return {"input_ids": ids, "position_ids": positions}, labels


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt_neox"])
@pytest.mark.parametrize("packed", [False, True])
def test_model_loss_and_gradients_equal_the_plain_loss(family, packed):
    model = _model(family)
    loss = TrainedTokenLoss(model)
    assert loss.mode == "chunked", loss.mode
    inputs, labels = _batch(packed)
    num_items = torch.tensor(13)
    mine = loss(model, inputs, labels, num_items)
    mine_grads = torch.autograd.grad(mine, [p for p in model.parameters()], allow_unused=True)
    ref = token_loss(model(**inputs), labels, num_items)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters()], allow_unused=True)
    assert torch.allclose(mine, ref, rtol=1e-5), (float(mine), float(ref))
    for (name, _), got, want in zip(model.named_parameters(), mine_grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (name, float((got - want).abs().max()))


def test_lora_loss_and_adapter_gradients_equal_the_plain_loss():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    loss = TrainedTokenLoss(model)
    assert loss.mode == "chunked"
    inputs, labels = _batch(True)
    trained = [p for p in model.parameters() if p.requires_grad]
    mine = loss(model, inputs, labels)
    ref = token_loss(model(**inputs), labels)
    assert torch.allclose(mine, ref, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(mine, trained), torch.autograd.grad(ref, trained)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


def test_a_lora_wrapped_output_layer_has_the_model_compute_its_logits_at_the_labels_only():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    loss = TrainedTokenLoss(model)
    assert loss.mode == "masked"
    inputs, labels = _batch(False)
    assert torch.allclose(loss(model, inputs, labels), token_loss(model(**inputs), labels), rtol=1e-5)


def test_no_trained_token_is_a_zero_loss_with_zero_gradients():
    model = _model("llama")
    inputs, labels = _batch(False)
    labels[:] = IGNORE
    value = TrainedTokenLoss(model)(model, inputs, labels)
    value.backward()
    assert float(value) == 0.0
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in model.parameters())


def _train_manifest(cache_dir):
    import json

    (manifest,) = list((cache_dir / "train").glob("*/manifest.json"))
    return json.loads(manifest.read_text())


@pytest.mark.parametrize("keys, asked", [
    ({"plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"], "cut_cross_entropy": True}, "cut_cross_entropy: true asks for cut-cross-entropy's kernel"),
    ({"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_fused_linear_cross_entropy": True}, "asks for Liger's fused linear cross-entropy"),
])
def test_axolotl_loss_kernel_configs_train_with_molt_s_loss_on_cpu_and_say_so(make_config, molt, cache_dir, keys, asked):
    result = molt("train", make_config(max_steps=2, **keys))
    assert result.exit_code == 0, result
    assert "not supported yet" not in result.output, result.output
    assert "loss: molt's chunked linear cross-entropy" in result.output, result.output
    manifest = _train_manifest(cache_dir)
    assert manifest["loss"].startswith("molt's chunked linear cross-entropy") and asked in manifest["loss"] and "CUDA GPU" in manifest["loss"], manifest["loss"]
    assert manifest["peak_rss_mib"] > 50 and "peak_rss_since" not in manifest


def test_the_default_loss_is_the_chunked_one(make_config, molt, cache_dir):
    result = molt("train", make_config(max_steps=1))
    assert result.exit_code == 0, result
    assert _train_manifest(cache_dir)["loss"] == "molt's chunked linear cross-entropy on the labelled positions (no full logits)"
