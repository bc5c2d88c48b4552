"""Aggregation of K patch predictions into per-image confidences (SPEC.md stage 2, inference)."""

from __future__ import annotations

import torch


def vote_fractions(logits: torch.Tensor) -> torch.Tensor:
    """(N, K, C) patch logits -> (N, C) fraction of the K patches whose argmax is each class."""
    n, k, c = logits.shape
    votes = torch.nn.functional.one_hot(logits.argmax(-1), c).to(torch.float32)
    return votes.sum(1) / k


def mean_softmax(logits: torch.Tensor) -> torch.Tensor:
    """(N, K, C) patch logits -> (N, C) mean softmax over the K patches."""
    return logits.float().softmax(-1).mean(1)


def majority_label(fractions: torch.Tensor) -> torch.Tensor:
    """Most frequent class per image; ties go to the lowest class index."""
    return fractions.argmax(-1)
