"""Multiclass focal loss (Lin et al. 2017) as SPEC.md stage 3 defines it."""

from __future__ import annotations

import torch

from patchflannel.classes import NUM_CLASSES


def class_alpha(labels: torch.Tensor, n_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Inverse class frequency of ``labels``, normalised to sum to 1 (absent classes get weight 0)."""
    counts = torch.bincount(labels.long(), minlength=n_classes).to(torch.float64)
    inv = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    return (inv / inv.sum()).to(torch.float32)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean over the batch of ``sum_m -alpha_m y_m (1 - p_m)^gamma log p_m`` with ``p = softmax(logits)``."""
    log_p = logits.float().log_softmax(-1).gather(1, targets.long()[:, None])[:, 0]
    p = log_p.exp()
    a = alpha.to(logits.device)[targets.long()]
    # Clamped: for 0 < gamma < 1 the derivative of (1 - p)^gamma is infinite at p = 1 (NaN gradients).
    return (-a * (1 - p).clamp(min=torch.finfo(torch.float32).tiny).pow(gamma) * log_p).mean()
