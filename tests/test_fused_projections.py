"""training/fused_projections.py: the swapped forwards compute what peft's and transformers' own
do (loss and every gradient), keep less for the backward pass, and stand aside where they do not
apply."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from stages.training.fused_projections import install


def _model(kind="llama", **lora):
    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v with biases
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    if lora is not None and lora.pop("full", False) is False:
        model = get_peft_model(model, LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **lora}))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the adapter a say
                torch.nn.init.normal_(p, std=0.1)
    return model


def _grads(model, ids):
    model.zero_grad()
    torch.manual_seed(5)  # the same lora_dropout draws for both models
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,lora", [("llama", {}), ("qwen2", {}), ("llama", {"full": True}), ("llama", {"r": 4, "lora_alpha": 4, "use_rslora": True}),
                                       ("llama", {"lora_dropout": 0.1}), ("qwen2", {"lora_dropout": 0.3})])
def test_loss_and_every_gradient_match_the_modules_own_forward(kind, lora):
    own = _model(kind, **lora)
    fused = copy.deepcopy(own)
    swapped = install(fused)
    assert swapped["gated_mlp"] == 2
    assert swapped["lora_linear"] == (0 if lora.get("full") else 8)  # q, k, v, o of 2 layers
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))
    loss_own, grads_own = _grads(own, ids)
    loss_fused, grads_fused = _grads(fused, ids)
    assert loss_fused == pytest.approx(loss_own, rel=1e-6)
    assert grads_own.keys() == grads_fused.keys() and grads_own
    for name, g in grads_own.items():
        torch.testing.assert_close(grads_fused[name], g, rtol=1e-5, atol=1e-6, msg=name)


def _saved_bytes(model, ids) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return sum(seen.values())


def test_the_forward_keeps_less_for_the_backward_pass():
    own = _model()
    fused = copy.deepcopy(own)
    install(fused)
    ids = torch.randint(0, 300, (1, 64))
    # per layer: silu(gate), the product and down's input are no longer kept
    assert _saved_bytes(fused, ids) < 0.85 * _saved_bytes(own, ids)


def test_lora_dropout_draws_differ_between_seeds_and_stop_in_eval():
    own = _model(lora_dropout=0.5)
    fused = copy.deepcopy(own)
    install(fused)
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(1)
        first = fused(input_ids=ids).logits
        torch.manual_seed(2)
        assert not torch.allclose(fused(input_ids=ids).logits, first)  # the mask is drawn, not fixed
        fused.eval(), own.eval()
        torch.testing.assert_close(fused(input_ids=ids).logits, own(input_ids=ids).logits)


def test_the_dropout_mask_is_kept_as_bytes_not_as_floats():
    own = _model(lora_dropout=0.1)
    fused = copy.deepcopy(own)
    assert install(fused) == {"gated_mlp": 2, "lora_linear": 8}
    ids = torch.randint(0, 300, (1, 64))
    assert _saved_bytes(fused, ids) < 0.6 * _saved_bytes(own, ids)


def test_modules_it_cannot_stand_in_for_keep_their_own_forward():
    dora = _model(use_dora=True)
    assert install(dora) == {"gated_mlp": 0, "lora_linear": 0}


def test_a_disabled_or_merged_adapter_falls_back_to_peft():
    model = _model()
    reference = copy.deepcopy(model)
    install(model)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        with model.disable_adapter(), reference.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        model.merge_adapter()
        reference.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
