"""The training loss: cross-entropy summed over the trained tokens, divided by the trained tokens
of the whole optimizer step, so packing changes neither the loss nor the gradients."""

from __future__ import annotations

IGNORE = -100  # the label of a token that is not trained (prompts, padding, a row's first token)


def token_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy summed over the trained tokens, divided by the number of trained tokens of
    the whole optimizer step (`num_items_in_batch`: every micro-batch of the accumulation and, by
    the Trainer, every rank), or of this batch when not given. So a packed batch and the same
    samples in any other batching give the same loss and the same gradients."""
    import torch
    import torch.nn.functional as F

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    targets = labels[..., 1:].reshape(-1).to(logits.device)
    logits = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # bf16/fp16 logits: the softmax in fp32
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE).sum()
    if torch.is_tensor(num_items_in_batch):
        return total / num_items_in_batch.to(total.device).clamp(min=1)
    return total / max(1, num_items_in_batch)
