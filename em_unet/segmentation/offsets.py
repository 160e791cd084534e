"""Affinity offsets: pairs (dy, dx) of pixels, as ``--offsets`` gives them and files and models record them.
Light (no NumPy-heavy imports): the settings import it."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

Offsets = tuple[tuple[int, int], ...]

# The mutex-watershed paper's 2-D set for ISBI 2012 (Wolf et al., TPAMI 2020): nearest neighbours, then
# 9 px in eight directions and 27 px along the axes. It is closed under flips and quarter turns up to sign,
# which test-time augmentation needs (a turned offset must be one of the set, or its negative).
DEFAULT_OFFSETS: Offsets = (
    (-1, 0),
    (0, -1),
    (-9, 0),
    (0, -9),
    (-9, -9),
    (9, -9),
    (-9, -4),
    (-4, -9),
    (4, -9),
    (9, -4),
    (-27, 0),
    (0, -27),
)
OFFSETS_ATTRIBUTE = "affinity_offsets"  # how files and models record their offsets


def offsets_text(offsets: Sequence[Sequence[int]]) -> str:
    """The ``--offsets`` text of ``offsets``: ``"-1,0 0,-1 ..."``."""
    return " ".join(f"{dy},{dx}" for dy, dx in offsets)


def parse_offsets(text: str) -> Offsets:
    """``"-1,0 0,-1 -9,0"`` (pairs ``dy,dx`` of pixels, separated by spaces or semicolons) -> offsets; a
    ValueError saying what is wrong otherwise (not checked: see :func:`check_offsets`)."""
    pairs = [pair for pair in re.split(r"[\s;]+", str(text).strip()) if pair]
    offsets = []
    for pair in pairs:
        match = re.fullmatch(r"\(?\s*(-?\d+)\s*,\s*(-?\d+)\s*\)?", pair)
        if not match:
            raise ValueError(f"{pair!r} is not a pair DY,DX of integers, e.g. -1,0")
        offsets.append((int(match.group(1)), int(match.group(2))))
    if not offsets:
        raise ValueError("no offsets given")
    return tuple(offsets)


def check_offsets(offsets: Sequence[Sequence[int]], patch_size: int | None = None) -> Offsets:
    """The offsets as a tuple of ``(dy, dx)`` pairs, or a ValueError naming the first bad one: zero, repeated
    (an offset and its negative are the same pairs of pixels), or not shorter than ``patch_size`` (pixels),
    which leaves no pair inside a training crop."""
    checked: list[tuple[int, int]] = []
    for offset in offsets:
        if len(offset) != 2 or not all(isinstance(v, int) or hasattr(v, "__index__") for v in offset):
            raise ValueError(f"{offset!r} is not a pair (dy, dx) of integers")
        dy, dx = int(offset[0]), int(offset[1])
        if dy == 0 and dx == 0:
            raise ValueError("offset 0,0 pairs a pixel with itself")
        if (dy, dx) in checked or (-dy, -dx) in checked:
            raise ValueError(f"offset {dy},{dx} is repeated (an offset and its negative are the same pairs)")
        if patch_size is not None and max(abs(dy), abs(dx)) >= patch_size:
            raise ValueError(f"offset {dy},{dx} does not fit in the {patch_size} px patch (--patch-size)")
        checked.append((dy, dx))
    if not checked:
        raise ValueError("no offsets given")
    return tuple(checked)


def offsets_from_attributes(attributes: dict | str | None) -> Offsets | None:
    """The offsets a file or model recorded under :data:`OFFSETS_ATTRIBUTE` (a dict, or JSON text holding
    one), or None."""
    if isinstance(attributes, str):
        try:
            attributes = json.loads(attributes)
        except ValueError:
            return None
    if not isinstance(attributes, dict) or OFFSETS_ATTRIBUTE not in attributes:
        return None
    return tuple((int(dy), int(dx)) for dy, dx in attributes[OFFSETS_ATTRIBUTE])
