"""The FLANNEL neural weight module (SPEC.md stage 3)."""

from __future__ import annotations

import torch
from torch import nn

from patchflannel.classes import NUM_CLASSES
from patchflannel.models.registry import register_model


class NeuralWeightModule(nn.Module):
    """Outer product of the learners' confidences -> Linear -> tanh gives one weight per learner.

    ``forward`` takes (B, n_learners, n_classes) confidences and returns the (B, n_classes) logits
    ``sum_i W_i * P_i``; the prediction is their softmax.
    """

    def __init__(self, n_learners: int = 5, n_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.n_learners = n_learners
        self.n_classes = n_classes
        width = n_learners * n_classes
        self.dense = nn.Linear(width * width, n_learners)

    def learner_weights(self, confidences: torch.Tensor) -> torch.Tensor:
        """(B, n, C) confidences -> (B, n) weights in (-1, 1)."""
        f = confidences.flatten(1)
        outer = (f[:, :, None] * f[:, None, :]).flatten(1)
        return torch.tanh(self.dense(outer))

    def forward(self, confidences: torch.Tensor) -> torch.Tensor:
        w = self.learner_weights(confidences)
        return (w[:, :, None] * confidences).sum(1)


@register_model("ensemble", "flannel")
def flannel(n_learners: int = 5, n_classes: int = NUM_CLASSES) -> NeuralWeightModule:
    """The FLANNEL ensemble over ``n_learners`` base learners."""
    return NeuralWeightModule(n_learners, n_classes)
