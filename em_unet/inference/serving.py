"""TF Serving's layout, without TensorFlow: ``<models dir>/<model name>/<version>/`` holding a SavedModel
whose ``serving_default`` signature takes ``image`` (float32 ``[batch, height, width, 1]`` in [0, 1]) and
returns ``membrane_probability`` (float32, same shape), and for an affinity U-Net ``affinities`` (float32
``[batch, height, width, offsets]``); with z-context ``image`` is ``[batch, height, width, K]`` (2.5-D) or
``[batch, z, height, width, 1]`` (a 3-D U-Net, whose output has the same z). :mod:`.export` writes it,
:mod:`.predict` reads it."""

from __future__ import annotations

import os
from pathlib import Path

SIGNATURE = "serving_default"
INPUT_NAME = "image"
OUTPUT_NAME = "membrane_probability"
AFFINITIES_NAME = "affinities"
Z_CONTEXT_NAME = "z_context"  # a 3-D U-Net's SavedModel: the z-patch (sections) it was trained on


def _version_number(name: str) -> int | None:
    """The version a folder-entry name stands for, or None (ASCII digits only: ``int("²")`` fails)."""
    return int(name) if name.isascii() and name.isdigit() else None


def versions(model_dir: str | Path) -> list[int]:
    """The integer versions present under a model folder (numeric folders only), ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    found = (_version_number(p.name) for p in model_dir.iterdir() if p.is_dir())
    return sorted(v for v in found if v is not None)


def next_version(model_dir: Path) -> int:
    """One above the highest numeric name in ``model_dir``, files included (a stray file ``2`` blocks version 2)."""
    taken = (_version_number(name) for name in os.listdir(model_dir))
    return max((v for v in taken if v is not None), default=0) + 1
