"""The typed result of one engine input: :class:`Prediction`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from patchflannel.classes import CLASSES

DICOM_COLUMNS: dict[str, str] = {"study_instance_uid": "StudyInstanceUID", "sop_instance_uid": "SOPInstanceUID"}
"""Row column to the DICOM attribute it holds (empty for other formats)."""


@dataclass
class Prediction:
    """What the engine says about one input.

    ``status`` is 'ok', 'flagged' (a result that needs a look: see ``flags``) or 'error' (no result:
    see ``error``). ``probabilities`` maps class name to probability; ``learner_confidences`` maps each
    learner to its per-class vote fractions and ``learner_mean_softmax`` to its mean softmax over the K
    patches (a global learner's softmax in both). ``centres`` is the (K, 2) array of patch centres, (row, col)
    in the working image of ``image_size`` (1024) squared whatever the input's shape (scale by H/1024 and W/1024
    to place them on an H x W input), when requested and patches were drawn (an engine whose learners are all
    global draws none, nor segments: no ``mask_fallback``).
    ``learners`` names the engine's learners (an error result has no confidences, but the same row columns).
    """

    item_id: str
    status: str
    label: str | None = None
    probabilities: dict[str, float] | None = None
    learner_confidences: dict[str, dict[str, float]] = field(default_factory=dict)
    learner_mean_softmax: dict[str, dict[str, float]] = field(default_factory=dict)
    k: int | None = None
    seed: int | None = None
    content_hash: str | None = None
    flags: list[str] = field(default_factory=list)
    error: str | None = None
    centres: np.ndarray | None = field(default=None, compare=False)  # an array: == on it is not a bool
    meta: dict[str, Any] = field(default_factory=dict)
    bundle_id: str = ""
    backend: str = ""
    learners: tuple[str, ...] = ()

    @property
    def probability_array(self) -> np.ndarray | None:
        """The probabilities as a float64 array in class index order (None for an error)."""
        if self.probabilities is None:
            return None
        return np.array([self.probabilities[c] for c in CLASSES], dtype=np.float64)

    @property
    def ok(self) -> bool:
        """True when the input produced a result (status 'ok' or 'flagged'); a 'flagged' one needs a look (``flags``)."""
        return self.status != "error"

    def to_row(self) -> dict[str, Any]:
        """A flat dict for tabular output (``score``'s columns): the predicted class as ``pred`` (``label`` is
        left to a manifest's true label), one column per class and per learner confidence (None for an error),
        DICOM UIDs: the same columns for every result of one engine."""
        row: dict[str, Any] = {
            "path": self.item_id,
            "content_hash": self.content_hash,
            "status": self.status,
            "error": self.error,
            "flags": ";".join(self.flags),
            "pred": self.label,
        }
        for c in CLASSES:
            row[f"p_{c}"] = None if self.probabilities is None else self.probabilities[c]
        for learner in self.learners or tuple(self.learner_confidences):
            conf = self.learner_confidences.get(learner)
            for c in CLASSES:
                row[f"{learner}_{c}"] = None if conf is None else conf[c]
        row.update({"k": self.k, "seed": self.seed, "bundle_id": self.bundle_id, "backend": self.backend})
        row.update({column: self.meta.get(keyword) for column, keyword in DICOM_COLUMNS.items()})
        return row
