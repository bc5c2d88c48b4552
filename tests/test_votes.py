"""Patch votes (SPEC.md stage 2, inference): fractions of the K patches' argmax, ties to the lowest index."""

from __future__ import annotations

import torch

from patchflannel.ops.votes import majority_label, mean_softmax, vote_fractions


def test_vote_fractions_count_each_patch_argmax_once():
    logits = torch.tensor([[[3.0, 1, 0, 0], [0, 2, 1, 0], [0, 5, 0, 0], [1, 1, 1, 1]]])  # the last patch: a tie
    torch.testing.assert_close(vote_fractions(logits), torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    soft = mean_softmax(logits)
    assert soft.shape == (1, 4) and torch.allclose(soft.sum(-1), torch.ones(1))


def test_majority_ties_go_to_the_lowest_class_index():
    fractions = torch.tensor([[0.5, 0.5, 0, 0], [0, 0.25, 0.25, 0.5], [0, 0.4, 0.4, 0.2], [0.25] * 4])
    assert majority_label(fractions).tolist() == [0, 3, 1, 0]
