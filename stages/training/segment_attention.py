"""Attention that costs what a packed row's samples cost, on CPU: PyTorch's SDPA run on each sample
(segment) of a row by itself, causal, instead of once over the whole row with a block-diagonal
mask. A row of k samples of length l then pays k·l² rather than (k·l)², and each call takes SDPA's
fused causal kernel (a materialised mask sends SDPA's CPU path to the slow general kernel).
Segments start where position_ids restart at 0: how packed rows (and padding) are laid out.

Registered with transformers as attn_implementation "molt_segments", with SDPA's masks: the
block-diagonal mask is still built (once per forward) for what segments cannot do, a sliding
window shorter than a sample, a position bias, a cache. A GPU keeps its own kernels
(flash-attention's varlen path reads the same position_ids without a host sync per layer).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.integrations.sdpa_attention import repeat_kv

NAME = "molt_segments"


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each run that begins where position_ids are 0."""
    bounds = []
    length = position_ids.shape[-1]
    for row in position_ids.reshape(-1, length):
        starts = torch.nonzero(row == 0).flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        bounds.append(list(zip(starts, starts[1:] + [length])))
    return bounds


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention interface: query [B, H, T, D], key/value [B, H_kv, T, D]; returns
    [B, T, H, D]. `attention_mask` is SDPA's (the same segments, as a mask): used only where
    segments cannot stand in for it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    whole_rows = query.shape[2] == key.shape[2] and query.shape[2] > 1 and position_ids is not None
    bounds = segment_bounds(position_ids) if whole_rows else None
    window = kwargs.get("sliding_window")
    if bounds is not None and window and max(e - s for spans in bounds for s, e in spans) > window:
        bounds = None
    if bounds is None or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or is_causal is False:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    rows = []
    if len(bounds) == 1 and query.shape[0] > 1:
        bounds = bounds * query.shape[0]  # position_ids [1, T] the model made for every row
    for b, spans in enumerate(bounds):
        if len(spans) == 1:
            rows.append(_causal(query[b : b + 1], key[b : b + 1], value[b : b + 1], dropout, scaling))
            continue
        parts = [_causal(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e], dropout, scaling) for s, e in spans]
        rows.append(torch.cat(parts, dim=2))
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _causal(q, k, v, dropout, scaling):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=q.shape[2] > 1)


AttentionInterface.register(NAME, segment_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
