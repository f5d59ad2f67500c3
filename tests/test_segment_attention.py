"""SDPA per packed sample (training/segment_attention.py) against SDPA over the whole row with the
block-diagonal mask transformers builds: the same logits and the same gradients, for several model
families, packed rows with padding, grouped-query attention and a sliding window."""

from __future__ import annotations

import pytest
import torch

from stages.training import segment_attention
from stages.training.batches import collate


def _model(family: str, **extra):
    import transformers

    common = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    configs = {
        "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=1, **common),
        "mistral": lambda: transformers.MistralConfig(num_key_value_heads=2, **common, **extra),
        "gemma": lambda: transformers.GemmaConfig(num_key_value_heads=2, head_dim=8, **common),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**common),
    }
    torch.manual_seed(0)
    config = configs[family]()
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).float()


def _batch():
    g = torch.Generator().manual_seed(3)
    lengths = [[7, 5, 9], [12], [3, 3, 3, 4]]
    rows = []
    for spans in lengths:
        ids = torch.randint(1, 300, (sum(spans),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "position_ids": [p for n in spans for p in range(n)]})
    return collate(rows, pad_id=0)  # padded to 24: the padding is a segment of its own


def _logits_and_grads(model, batch):
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits  # a cache switches off packed masking
    (logits.float().pow(2).mean()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gpt_neox"])
def test_segments_equal_the_masked_row(family):
    model = _model(family)
    batch = _batch()
    want, want_grads = _logits_and_grads(model, batch)
    model.set_attn_implementation(segment_attention.NAME)
    got, got_grads = _logits_and_grads(model, batch)
    real = batch["labels"] != -100
    assert torch.allclose(got[real], want[real], atol=1e-5), float((got - want)[real].abs().max())
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), float((g - w).abs().max())


def test_a_sliding_window_shorter_than_a_sample_falls_back_to_the_mask():
    model = _model("mistral", sliding_window=4)
    batch = _batch()
    want, _ = _logits_and_grads(model, batch)
    model.set_attn_implementation(segment_attention.NAME)
    got, _ = _logits_and_grads(model, batch)
    assert torch.allclose(got, want, atol=1e-5)


def test_segment_sizes():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [3, 4, 0, 1, 2, 3]])
    assert segment_attention.segment_sizes(positions) == [3, 2, 1, 6, 2, 4]


def test_generation_with_a_cache_is_plain_sdpa():
    model = _model("llama").eval()
    ids = torch.tensor([[5, 9, 11, 40]])
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.set_attn_implementation(segment_attention.NAME)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
