"""Neuron labels made unique across the slices and blocks of a stack or volume: the one place where
each section's local labels 1..k are shifted past those of the sections before it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from em_unet.errors import EmUnetError

MAX_LABELS = 2**32 - 1  # labels are stored as uint32 at most


def label_offsets(counts: Sequence[int], where: str = "the stack") -> np.ndarray:
    """What to add to each section's local labels 1..``counts[i]`` so labels are unique across them: section
    i's labels follow section i-1's. A one-line error past :data:`MAX_LABELS` labels in all."""
    counts = np.asarray(counts, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    if counts.size and offsets[-1] + counts[-1] > MAX_LABELS:
        raise EmUnetError(f"{where}: more than 2**32 - 1 segments; segment fewer slices at a time")
    return offsets


def label_dtype(max_label: int) -> np.dtype:
    """uint16 where every label fits (it opens in every viewer), else uint32."""
    return np.dtype(np.uint16 if max_label < 2**16 else np.uint32)
