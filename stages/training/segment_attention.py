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

NAME = "molt_segments"


def segment_sizes(position_ids: torch.Tensor) -> list[int]:
    """The lengths of the runs that begin where position_ids are 0 (or a row begins), row after
    row: one list for the whole batch, whose sums per row are the row length."""
    rows, length = position_ids.reshape(-1, position_ids.shape[-1]).shape
    starts = position_ids.reshape(-1) == 0
    starts[::length] = True
    bounds = torch.nonzero(starts).flatten()
    return torch.diff(bounds, append=bounds.new_tensor([rows * length])).tolist()


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention interface: query [B, H, T, D], key/value [B, H_kv, T, D]; returns
    [B, T, H, D]. `attention_mask` is SDPA's (the same segments, as a mask): used only where
    segments cannot stand in for it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    whole_rows = query.shape[2] == key.shape[2] and query.shape[2] > 1 and position_ids is not None
    sizes = None
    if whole_rows:
        batch, heads, length, dim = query.shape
        sizes = segment_sizes(position_ids.expand(batch, length))  # position_ids [1, T] the model made for every row
    window = kwargs.get("sliding_window")
    if sizes is not None and window and max(sizes) > window:
        sizes = None
    if sizes is None or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or is_causal is False:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    dropout = dropout if module.training else 0.0
    # All rows as one sequence per head, cut with split: its backward concatenates the segments'
    # gradients, where slicing would add a zero-filled whole-batch gradient for every segment.
    flat = [t.transpose(0, 1).reshape(t.shape[1], batch * length, dim).split(sizes, dim=1) for t in (query, key, value)]
    gqa = key.shape[1] != heads
    parts = [_causal(q[None], k[None], v[None], dropout, scaling, gqa)[0] for q, k, v in zip(*flat)]  # 4-d: SDPA's fused CPU kernel; 3-d takes the math path
    return torch.cat(parts, dim=1).reshape(heads, batch, length, dim).permute(1, 2, 0, 3).contiguous(), None


def _causal(q, k, v, dropout, scaling, gqa):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=q.shape[-2] > 1, enable_gqa=gqa)


AttentionInterface.register(NAME, segment_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
