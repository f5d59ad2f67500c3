"""The validation loss: token-weighted over every batch of every rank, as the training loss is."""

from __future__ import annotations

from stages.training.loss import IGNORE


def evaluation_loss(trainer, loader) -> float | None:
    """Token-weighted validation loss: summed over every trained token of every batch on every
    rank, divided by their number (not a mean of per-batch means). None when nothing is trained."""
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    device = trainer.args.device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            n = (labels[..., 1:] != IGNORE).sum()
            total += torch.stack([trainer.trained_token_loss(model, batch, labels, 1).double(), n.double()])
    total = trainer.accelerator.reduce(total, reduction="sum") if trainer.accelerator.num_processes > 1 else total
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else None
