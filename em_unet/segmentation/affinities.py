"""Affinities: for each pixel p and offset o = (dy, dx), whether p and p + o belong to the same neuron; and
neurons from them by the mutex watershed. No TensorFlow.

Channel c of an affinity map ``(c, y, x)`` holds the affinity of pixel (y, x) with pixel (y + dy_c, x + dx_c)
(mwatershed's convention). Membrane pixels have affinity 0 to everything; where p + o leaves the image there
is no pair.

- :mod:`.offsets`: the offsets as ``--offsets`` gives them, checked (light: the settings import it);
- :func:`cell_ids`: the cells of a membrane label slice (4-connected components of its interior);
- :func:`affinities_from_cells`: the affinity targets of a cell-id slice (the NumPy reference of the
  training graph's :func:`em_unet.training.losses.affinity_targets`);
- :func:`mutex_watershed`: neurons from predicted affinities (mwatershed), with a bias on the long-range
  channels and a size filter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mwatershed
import numpy as np
from skimage.measure import label
from skimage.segmentation import relabel_sequential
from tqdm import tqdm

from em_unet.errors import DataError
from em_unet.io.stacks import is_channel_stack, read_channel_stack
from em_unet.io.volumes import is_volume_address, open_volume
from em_unet.io.writers import check_output_space
from em_unet.segmentation.labels import label_offsets
from em_unet.segmentation.offsets import OFFSETS_ATTRIBUTE, Offsets, offsets_from_attributes, offsets_text
from em_unet.segmentation.watershed import check_segment_outputs, warn_single_segments, write_segments
from em_unet.settings import Settings, setting


def cell_ids(membrane: np.ndarray) -> np.ndarray:
    """int32 ids 1..k of the cells of each slice of a membrane mask ``(y, x)`` or ``(z, y, x)`` (1 or True =
    membrane): the 4-connected components of the interior, as Fiji's scores count them; 0 on membranes."""
    membrane = np.asarray(membrane) > 0
    if membrane.ndim == 2:
        return label(~membrane, connectivity=1).astype(np.int32)
    return np.stack([label(~section, connectivity=1).astype(np.int32) for section in membrane])


def shifted(values: np.ndarray, offset: Sequence[int], fill) -> np.ndarray:
    """``values`` (..., y, x) read at p + offset for every pixel p; ``fill`` where p + offset leaves it."""
    dy, dx = offset
    height, width = values.shape[-2:]
    out = np.full_like(values, fill)
    ys, yd = slice(max(dy, 0), height + min(dy, 0)), slice(max(-dy, 0), height + min(-dy, 0))
    xs, xd = slice(max(dx, 0), width + min(dx, 0)), slice(max(-dx, 0), width + min(-dx, 0))
    out[..., yd, xd] = values[..., ys, xs]
    return out


def affinities_from_cells(cells: np.ndarray, offsets: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Affinity targets ``(c, y, x)`` float32 of a cell-id slice ``(y, x)`` (0 = membrane) and the mask of the
    pairs inside the slice (1) or not (0): 1 where p and p + o are in the same cell, 0 elsewhere."""
    cells = np.asarray(cells)
    targets, inside = [], []
    for offset in offsets:
        other = shifted(cells, offset, -1)
        targets.append((cells > 0) & (cells == other))
        inside.append(other >= 0)
    return np.stack(targets).astype(np.float32), np.stack(inside).astype(np.float32)


# ---------------------------------------------------------------- the mutex watershed


@dataclass(frozen=True)
class MutexParams(Settings):
    """The mutex watershed's parameters (see :func:`mutex_watershed`)."""

    long_range_bias: float = setting(
        0.0,
        "added to the split weight of the long-range offsets (beyond the nearest neighbours): a long-range pair "
        "attracts only above affinity 0.5 + B; 0.5 makes long-range pairs only repulsive, as in the mutex "
        "watershed paper; 0 was best on ISBI slices 15-19 (benchmarks/segment_affinities.py)",
        group="mutex",
        minimum=-0.5,
        maximum=0.5,
        metavar="B",
    )
    min_size_px: int = setting(
        50,
        "segments smaller than this (pixels) are merged into the neighbour they share the highest mean "
        "nearest-neighbour affinity with (0: keep all)",
        flag="--min-size",
        group="mutex",
        minimum=0,
        metavar="PX",
    )


def _nearest_channels(offsets: Offsets) -> list[int]:
    return [c for c, (dy, dx) in enumerate(offsets) if abs(dy) + abs(dx) == 1]


def check_affinities(affinities: np.ndarray, offsets: Offsets, source: str) -> None:
    """One-line errors: a channel count other than the offsets', no nearest-neighbour offsets, values that are
    not finite or not in [0, 1]."""
    if affinities.ndim != 3:
        raise DataError(f"{source}: an affinity slice is (channels, y, x), got shape {affinities.shape}")
    if affinities.shape[0] != len(offsets):
        raise DataError(
            f"{source}: {affinities.shape[0]} affinity channels but {len(offsets)} offsets "
            f"({offsets_text(offsets)}): give one offset per channel"
        )
    if not _nearest_channels(offsets):
        raise DataError(f"{source}: the offsets hold no nearest neighbour (-1,0 or 0,-1 ...), which neurons need")
    if not np.isfinite(affinities).all():
        raise DataError(f"{source}: affinities hold NaN or infinite values")
    low, high = float(affinities.min()), float(affinities.max())
    if low < 0.0 or high > 1.0:
        raise DataError(f"{source}: affinities from {low:g} to {high:g} are not probabilities in [0, 1]")


MUTEX_HINT = "the affinities merge everything there; raise --long-range-bias to keep neurons apart"


def mutex_watershed(
    affinities: np.ndarray, offsets: Sequence[Sequence[int]], params: MutexParams = MutexParams()
) -> np.ndarray:
    """int32 labels 1..k of the neuron sections of one slice's affinities ``(c, y, x)`` in [0, 1].

    Each pair of pixels (p, p + o) is an edge of weight ``affinity - 0.5`` (nearest neighbours) or
    ``affinity - 0.5 - long_range_bias`` (longer offsets): positive edges attract, negative ones repel, and the
    mutex watershed (mwatershed, Wolf et al. 2020) takes them in order of magnitude, merging unless a
    repulsion between the two clusters was taken before. Then segments below ``min_size_px`` pixels are merged
    into their best neighbour (:func:`merge_small_segments`).
    """
    offsets = tuple(tuple(int(v) for v in o) for o in offsets)
    affinities = np.asarray(affinities)
    check_affinities(affinities, offsets, "affinities")
    nearest = set(_nearest_channels(offsets))
    bias = np.array([0.5 if c in nearest else 0.5 + params.long_range_bias for c in range(len(offsets))])
    weights = affinities.astype(np.float64) - bias[:, None, None]
    labels = mwatershed.agglom(weights, [list(o) for o in offsets]).astype(np.int64)
    labels = relabel_sequential(labels + 1)[0]  # mwatershed may number a segment 0, which relabelling keeps
    if params.min_size_px > 0:
        labels = merge_small_segments(labels, affinities, offsets, params.min_size_px)
    return labels.astype(np.int32)


def merge_small_segments(labels: np.ndarray, affinities: np.ndarray, offsets: Offsets, min_size_px: int) -> np.ndarray:
    """``labels`` (1..k, one slice) with every segment below ``min_size_px`` pixels merged into the neighbour
    with which it has the highest mean nearest-neighbour affinity, smallest first (a segment with no
    neighbour stays). Returns labels 1..k' renumbered."""
    labels = np.asarray(labels, np.int64)
    sums: dict[tuple[int, int], float] = {}
    counts: dict[tuple[int, int], int] = {}
    for channel in _nearest_channels(offsets):
        other = shifted(labels, offsets[channel], 0)
        cross = (other > 0) & (other != labels)
        a, b = labels[cross], other[cross]
        pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)
        if not len(pairs):
            continue
        unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
        total = np.bincount(inverse.ravel(), weights=affinities[channel][cross], minlength=len(unique))
        number = np.bincount(inverse.ravel(), minlength=len(unique))
        for (i, j), s, n in zip(unique.tolist(), total, number):
            sums[(i, j)] = sums.get((i, j), 0.0) + float(s)
            counts[(i, j)] = counts.get((i, j), 0) + int(n)
    sizes = np.bincount(labels.ravel())
    parent = np.arange(len(sizes))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    neighbours: dict[int, dict[int, list[float]]] = {}
    for (i, j), s in sums.items():
        neighbours.setdefault(i, {})[j] = [s, counts[(i, j)]]
        neighbours.setdefault(j, {})[i] = [s, counts[(i, j)]]
    size = sizes.astype(np.int64)
    for segment in np.argsort(sizes, kind="stable"):
        segment = int(segment)
        if segment == 0 or root(segment) != segment or size[segment] >= min_size_px:
            continue
        edges = neighbours.get(segment, {})
        candidates: dict[int, list[float]] = {}
        for n, (s, c) in edges.items():
            if root(n) != segment:
                entry = candidates.setdefault(root(n), [0.0, 0])
                entry[0] += s
                entry[1] += c
        if not candidates:
            continue
        best = max(candidates, key=lambda n: (candidates[n][0] / candidates[n][1], size[n]))
        parent[segment] = best
        size[best] += size[segment]
        merged = neighbours.setdefault(best, {})
        for n, (s, c) in edges.items():
            n = root(n)
            if n == best:
                continue
            entry = merged.setdefault(n, [0.0, 0])
            entry[0] += s
            entry[1] += c
            back = neighbours.setdefault(n, {}).setdefault(best, [0.0, 0])
            back[0] += s
            back[1] += c
    roots = np.array([root(i) for i in range(len(sizes))])
    return relabel_sequential(roots[labels])[0]


# ---------------------------------------------------------------- stacks and files


def resolve_offsets(recorded: Offsets | None, given: Offsets | None, source: str) -> Offsets:
    """The offsets of an affinity map: those ``source`` records, or those given (``--offsets``); a one-line
    error when neither is there or the two disagree."""
    if recorded is None and given is None:
        raise DataError(
            f"{source}: the file records no affinity offsets: give them with --offsets (pairs DY,DX, one per channel, "
            "e.g. --offsets '-1,0 0,-1')"
        )
    if recorded is not None and given is not None and tuple(recorded) != tuple(given):
        raise DataError(
            f"{source}: the file records offsets {offsets_text(recorded)} but --offsets gives {offsets_text(given)}: "
            "leave out --offsets, or give the file's"
        )
    return tuple(recorded if recorded is not None else given)


def segment_affinity_stack(
    affinities: np.ndarray,
    offsets: Offsets,
    params: MutexParams = MutexParams(),
    progress: bool = False,
    source: str = "affinities",
) -> np.ndarray:
    """uint32 labels of a ``(z, c, y, x)`` affinity stack, each slice by :func:`mutex_watershed`, labels unique
    across the stack (slice z's follow slice z-1's)."""
    stack = np.asarray(affinities)
    if stack.ndim == 3:
        stack = stack[None]
    if stack.ndim != 4:
        raise DataError(f"{source}: an affinity stack is (z, c, y, x), got shape {stack.shape}")
    sections = []
    for z, section in enumerate(tqdm(stack, desc="segmenting", unit="slice", disable=not progress)):
        try:
            check_affinities(section, offsets, source)
        except DataError as err:
            raise DataError(f"{err} (slice {z})") from None
        sections.append(mutex_watershed(section, offsets, params))
    counts = [int(section.max()) for section in sections]
    warn_single_segments(counts, source, MUTEX_HINT)
    shifts = label_offsets(counts)
    return np.stack([section.astype(np.uint32) + np.uint32(shift) for section, shift in zip(sections, shifts)])


def is_affinity_map(address: str | Path) -> bool:
    """Whether ``address`` holds an affinity map: a multi-channel TIFF stack, or a 4-D ``(c, z, y, x)`` chunked
    volume (an unreadable address is not one: reading it as a membrane map then says why)."""
    if not is_volume_address(address):
        return is_channel_stack(address, OFFSETS_ATTRIBUTE)
    try:
        with open_volume(address, channels=True) as volume:
            return volume.ndim == 4
    except DataError:
        return False


def read_affinity_file(path: str | Path, offsets: Offsets | None = None) -> tuple[np.ndarray, Offsets]:
    """A TIFF affinity map ``(z, c, y, x)`` as float32 and its offsets (recorded in it, or ``offsets``: see
    :func:`resolve_offsets`); a one-line error when the channels do not match the offsets."""
    stack, attributes = read_channel_stack(path)
    offsets = resolve_offsets(offsets_from_attributes(attributes), offsets, str(path))
    if stack.shape[1] != len(offsets):
        raise DataError(
            f"{path}: {stack.shape[1]} affinity channels but {len(offsets)} offsets ({offsets_text(offsets)}): "
            "give one offset per channel"
        )
    if not np.issubdtype(stack.dtype, np.floating):
        raise DataError(f"{path}: affinities must be float values in [0, 1], found {stack.dtype}")
    return stack.astype(np.float32, copy=False), offsets


def segment_affinity_file(
    affinities_path: str | Path,
    output_path: str | Path,
    params: MutexParams = MutexParams(),
    offsets: Offsets | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, Path]:
    """``em-unet segment AFFINITIES.tif``: read an affinity TIFF (from ``em-unet predict --affinities``), segment
    it by the mutex watershed, write the labels and their parameters (as :func:`write_segments`)."""
    output_path = check_segment_outputs(output_path, overwrite)
    affinities, offsets = read_affinity_file(affinities_path, offsets)
    check_output_space(output_path, (affinities.shape[0], *affinities.shape[2:]), np.uint16)
    labels = segment_affinity_stack(affinities, offsets, params, progress=progress, source=str(affinities_path))
    return write_segments(output_path, labels, params, str(affinities_path), overwrite, source_kind="affinities")
