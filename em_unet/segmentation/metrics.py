"""ISBI 2012 segmentation scores, computed exactly as the challenge's Fiji script computes them.

The reference is fiji/Trainable_Segmentation (``src/main/java/trainableSegmentation/metrics/``), called as
the ISBI 2012 challenge scored (Arganda-Carreras et al. 2015):
``RandError.getMaximalVRandAfterThinning(0.0, 1.0, 0.1, true)`` and
``VariationOfInformation.getMaximalVInfoAfterThinning(0.0, 1.0, 0.1)``.
``../shared/data/fiji-reference`` holds Fiji's own numbers for three maps; the tests reproduce them.

- Thresholds ``0.0, 0.1, ...`` while ``<= 1.0``, accumulated in double precision as Fiji's loop does (so
  the last one is 0.9999999999999999). A pixel is cell where its float32 cell probability
  (1 - membrane probability) exceeds the double threshold: a cell probability of 1.0 is cell at every one.
- Ground-truth segments: the 4-connected components of ground-truth cell pixels; ground-truth membrane
  pixels are left out of every count (foreground restriction).
- Border thinning: Fiji's ``WatershedTransform2D(binaryProposal, 4)``, Soille and Vincent's flooding of
  the inverted *binary* proposal from its 4-connected cell components (:func:`fiji_thinned_labels`).
  Border pixels go to the region that reaches them first, in Fiji's scan and queue order, and pixels
  that two regions reach stay 0 (1-pixel lines). The continuous probability plays no part.
- Proposal label 0 inside ground-truth cells counts as singletons (one segment a pixel).
- Per slice, with ``c_ij`` the pixel counts of (truth i >= 1, proposal j), ``a_i`` the truth sizes,
  ``b_j`` the proposal sizes over truth-foreground pixels (j >= 1), ``c0`` the truth-foreground pixels
  labelled 0: ``tp = sum c_ij^2 + c0``, ``fp = sum b_j^2 + c0 - tp``, ``fn = sum a_i^2 - tp``;
  V_rand_merge = tp / (tp + fp) (precision), V_rand_split = tp / (tp + fn) (recall), each 1 where its
  error term is 0, and V_rand the F-score (Fiji's ``ClassificationStatistics``).
- V_info per slice with entropies in nats (Fiji's ``foregroundRestrictedFscore``):
  V_info_merge = I(S;T) / H(T), V_info_split = I(S;T) / H(S), V_info their F-score; a zero H(T) or
  H(S) scores 0, as in Fiji.
- **The stack's scores are the means of the per-slice scores** (the challenge's ``perSliceAverage =
  true``; Fiji's V_info always averages). ``v_rand_pooled`` is Fiji's other mode, pair counts summed over
  slices before one F-score, reported beside it. A slice with no ground-truth cell pixel scores 0, as in
  Fiji.
- The best V_rand and the best V_info over thresholds are reported, each with its threshold.
- Pixel error: 1 - the best F1 of the cell class over thresholds, pooled over all slices.

A label image (neuron segments, e.g. from :mod:`em_unet.segmentation.watershed`) is scored by the same per-slice
counts with no threshold and no thinning: :func:`evaluate_segments`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from skimage.measure import label
from skimage.metrics import variation_of_information

from em_unet.errors import DataError
from em_unet.io.stacks import FIXED_RANGES, check_finite, membrane_target, read_stack, to_unit_range


def fiji_thresholds(first: float = 0.0, last: float = 1.0, step: float = 0.1) -> tuple[float, ...]:
    """The thresholds of Fiji's ``for (th = first; th <= last; th += step)`` loop, accumulation error included."""
    values, threshold = [], first
    while threshold <= last:
        values.append(threshold)
        threshold += step
    return tuple(values)


THRESHOLDS = fiji_thresholds()

# Fiji's Neighborhood2DC4 order in its (x, y) = (column, row) coordinates: (x-1, y), (x, y-1), (x+1, y), (x, y+1).
# Scanned column by column, as Fiji's pixel list is, these are the (row, column) steps of the transposed slice.
_FIJI_STEPS = ((-1, 0), (0, -1), (1, 0), (0, 1))


def truth_segments(membrane_target: np.ndarray) -> np.ndarray:
    """4-connected components of the ground-truth cell pixels (membrane target 0); membrane is label 0."""
    return label(membrane_target < 0.5, connectivity=1)


def fiji_cell_probability(membrane_probability: np.ndarray) -> np.ndarray:
    """The float32 cell probability Fiji scores, as float64 for comparing with Fiji's double thresholds."""
    # 1 - p is computed in double and rounded once, which for a float32 p is float32 arithmetic and for an
    # 8/16-bit map's v / 255 is the rounding Fiji's float32 image has.
    return (1.0 - np.asarray(membrane_probability, np.float64)).astype(np.float32).astype(np.float64)


def cell_mask(membrane_probability: np.ndarray, threshold: float) -> np.ndarray:
    """Where Fiji counts a pixel as cell: its float32 cell probability is above the double ``threshold``."""
    return fiji_cell_probability(membrane_probability) > threshold


def _one_region(seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of neighbour labels (0: line or undecided), the one region among them (0 for none or two),
    and whether there were two."""
    low = np.where(seen > 0, seen, np.iinfo(np.int32).max).min(axis=1)
    high = seen.max(axis=1)
    conflict = (high > 0) & (low != high)
    return np.where((high > 0) & ~conflict, high, 0).astype(np.int32), conflict


IN_PLANE = np.array([[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0, 0, 0]] * 3])


def fiji_thinned_labels(cell: np.ndarray) -> np.ndarray:
    """Fiji's ``WatershedTransform2D(255 * ~cell, 4).apply()`` of each binary slice of ``cell`` (one
    ``(y, x)`` slice or a ``(z, y, x)`` stack, each slice on its own), as integer labels.

    Soille and Vincent's flooding has two levels here. The cells (level 0) become the regions.
    The border pixels (level 255) are queued breadth-first from the regions, and a border pixel takes
    the one region among its neighbours that are already decided when it leaves the queue; with two
    regions, or none (only line neighbours), it becomes line (0). Pixels at the same distance from
    the cells see each other in queue order, which is why the line of an even-width membrane falls
    where Fiji puts it: the first distance's queue is Fiji's column-by-column pixel list, and each
    further distance is queued in the order its pixels are first reached.
    The labels' values differ from Fiji's (and are unique across slices); every score ignores them. A
    slice without cell pixels is one region, as Fiji floods it. The slices of a stack are flooded
    together, one queue per distance for all of them, which gives each the order it has alone.
    """
    cell = np.asarray(cell, bool)
    stack = cell if cell.ndim == 3 else cell[None]
    regions = ndimage.label(stack, IN_PLANE)[0].astype(np.int32)  # 4-connected, within each slice
    empty = ~stack.any(axis=(1, 2))
    regions[empty] = 1
    result = regions if stack.all() or not stack[~empty].size else _flood(stack, regions, empty)
    return result if cell.ndim == 3 else result[0]


def _flood(stack: np.ndarray, regions: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """The flooding of :func:`fiji_thinned_labels` over the border pixels of every slice with cells."""
    # Each slice transposed, so that row-major order is Fiji's column-by-column order, framed by one pixel
    # that is never queued (distance -1); the slices follow each other.
    slices, rows, columns = stack.shape
    width = rows + 2
    distance = np.full((slices, columns + 2, width), -1, np.int32)
    for z in np.flatnonzero(~empty):
        distance[z, 1:-1, 1:-1] = ndimage.distance_transform_cdt(~stack[z].T, metric="taxicab")
    state = np.zeros_like(distance)
    state[:, 1:-1, 1:-1] = regions.transpose(0, 2, 1)
    distance, state = distance.ravel(), state.ravel()
    steps = np.array([dr * width + dc for dr, dc in _FIJI_STEPS], np.int32)

    rank = np.full(distance.size, -1, np.int32)  # a pixel's place in its distance's queue
    order = np.flatnonzero(distance == 1).astype(np.int32)  # first distance: Fiji's pixel-list order
    level = 1
    while order.size:
        rank[order] = np.arange(order.size, dtype=np.int32)
        neighbours = order[:, None] + steps[None, :]  # (pixels, 4)
        neighbour_distance = distance[neighbours]
        seen = np.where(neighbour_distance == level - 1, state[neighbours], 0)  # decided: regions or before
        result, conflict = _one_region(seen)
        same_level_earlier = (neighbour_distance == level) & (rank[neighbours] < rank[order][:, None])
        waiting = np.flatnonzero(same_level_earlier.any(axis=1) & ~conflict)  # two regions: line whatever comes
        if waiting.size:
            # These pixels also see their neighbours at the same distance that left the queue before them;
            # iterate to the fixed point, which (dependencies run from earlier to later in the queue) is
            # the sequential result.
            earlier = same_level_earlier[waiting]
            earlier_rank = rank[neighbours[waiting]][earlier]
            while True:
                trial = seen[waiting]
                trial[earlier] = result[earlier_rank]
                updated = _one_region(trial)[0]
                if np.array_equal(updated, result[waiting]):
                    break
                result[waiting] = updated
        state[order] = result
        # The next distance, queued in the order its pixels are first reached: by the queue place of the
        # reaching pixel, then by the neighbour's place in Fiji's neighbour order, which is row-major here.
        targets = neighbours[neighbour_distance == level + 1]
        _, first = np.unique(targets, return_index=True)
        order = targets[np.sort(first)]
        level += 1
    flooded = state.reshape(slices, columns + 2, width)[:, 1:-1, 1:-1].transpose(0, 2, 1)
    return np.where(empty[:, None, None], regions, flooded)


def thinned_proposal(membrane_probability: np.ndarray, threshold: float) -> np.ndarray:
    """Fiji's thinned proposal of one slice at one threshold (see :func:`fiji_thinned_labels`)."""
    return fiji_thinned_labels(cell_mask(membrane_probability, threshold))


def slice_counts(proposal: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The pair counts and entropies of one slice.

    ``proposal`` and ``truth`` are integer label images of one slice; truth label 0 (membrane)
    is left out; proposal label 0 is a boundary whose pixels count as singletons.
    Returns ``n`` (truth-foreground pixels), ``tp``, ``fp``, ``fn`` (pixel pairs, counted as Fiji's N^2
    normalisation does) and ``h_truth``, ``h_proposal``, ``h_truth_given_proposal``,
    ``h_proposal_given_truth`` (nats).
    """
    truth = np.asarray(truth).ravel()
    proposal = np.asarray(proposal).ravel()
    foreground = truth > 0
    n = int(foreground.sum())
    if n == 0:
        return dict.fromkeys(
            ("n", "tp", "fp", "fn", "h_truth", "h_proposal", "h_truth_given_proposal", "h_proposal_given_truth"), 0.0
        )
    rows = truth[foreground].astype(np.int64)
    cols = proposal[foreground].astype(np.int64)
    boundary = cols == 0
    c0 = int(boundary.sum())
    inside = ~boundary
    pair_keys = rows[inside] * (int(cols.max(initial=0)) + 1) + cols[inside]
    joint = np.unique(pair_keys, return_counts=True)[1].astype(np.float64)
    truth_sizes = np.bincount(rows)
    truth_sizes = truth_sizes[truth_sizes > 0].astype(np.float64)
    proposal_sizes = np.bincount(cols[inside])
    proposal_sizes = proposal_sizes[proposal_sizes > 0].astype(np.float64)

    tp = float((joint**2).sum()) + c0
    fp = float((proposal_sizes**2).sum()) + c0 - tp
    fn = float((truth_sizes**2).sum()) - tp

    def plogp(counts: np.ndarray) -> float:
        p = counts / n
        return float((p * np.log(p)).sum())

    singleton = c0 / n * np.log(n) if c0 else 0.0  # each boundary pixel: p = 1/n, p log p summed
    sum_truth = plogp(truth_sizes)
    sum_proposal = plogp(proposal_sizes) - singleton
    sum_joint = plogp(joint) - singleton
    return {
        "n": float(n),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "h_truth": -sum_truth,
        "h_proposal": -sum_proposal,
        "h_truth_given_proposal": sum_proposal - sum_joint,
        "h_proposal_given_truth": sum_truth - sum_joint,
    }


def _fscore(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _rand_parts(tp: float, fp: float, fn: float) -> tuple[float, float]:
    """Fiji's ClassificationStatistics: (merge = precision, split = recall), each 1 where its error term is 0."""
    merge = 1.0 if fp == 0 else tp / (tp + fp)
    split = 1.0 if fn == 0 else tp / (tp + fn)
    return merge, split


def scores_of_slice(counts: dict[str, float]) -> dict[str, float]:
    """V_rand and V_info with their split and merge parts of one slice's :func:`slice_counts`."""
    if counts["n"] == 0:  # no ground-truth cell: Fiji's divisions by n give 0 scores
        return dict.fromkeys(("v_rand", "v_rand_split", "v_rand_merge", "v_info", "v_info_split", "v_info_merge"), 0.0)
    rand_merge, rand_split = _rand_parts(counts["tp"], counts["fp"], counts["fn"])
    h_truth, h_proposal = counts["h_truth"], counts["h_proposal"]
    # Fiji: precision C(T|S) = (H(T) - H(T|S)) / H(T), recall C(S|T) = (H(S) - H(S|T)) / H(S); a zero
    # H(T) makes them (0, 1) and a zero H(S) (1, 0): an F-score of 0 either way.
    if h_proposal == 0:
        info_merge, info_split = 1.0, 0.0
    elif h_truth == 0:
        info_merge, info_split = 0.0, 1.0
    else:
        info_merge = (h_truth - counts["h_truth_given_proposal"]) / h_truth
        info_split = (h_proposal - counts["h_proposal_given_truth"]) / h_proposal
    return {
        "v_rand": _fscore(rand_merge, rand_split),
        "v_rand_split": rand_split,
        "v_rand_merge": rand_merge,
        "v_info": _fscore(info_merge, info_split),
        "v_info_split": info_split,
        "v_info_merge": info_merge,
    }


def split_merge_scores(proposal: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """V_rand and V_info with their split and merge parts for one slice of integer labels."""
    return scores_of_slice(slice_counts(proposal, truth))


def stack_scores(counts: Sequence[dict[str, float]]) -> dict[str, float]:
    """The challenge's scores of a stack: the mean of each per-slice score, and ``v_rand_pooled``
    (pair counts summed over slices, Fiji's ``perSliceAverage = false``)."""
    per_slice = [scores_of_slice(row) for row in counts]
    means = {key: float(np.mean([row[key] for row in per_slice])) for key in per_slice[0]}
    total = {key: sum(row[key] for row in counts) for key in ("tp", "fp", "fn")}
    means["v_rand_pooled"] = _fscore(*_rand_parts(total["tp"], total["fp"], total["fn"]))
    return means


def _checked_pair(prediction: np.ndarray, membrane_target: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    prediction, membrane_target = np.asarray(prediction), np.asarray(membrane_target)
    if prediction.ndim == 2:
        prediction, membrane_target = prediction[None], membrane_target[None]
    if prediction.shape != membrane_target.shape:
        raise DataError(f"{what} shape {prediction.shape} differs from label shape {membrane_target.shape}")
    return prediction, membrane_target


def evaluate_stack(
    membrane_probability: np.ndarray, membrane_target: np.ndarray, thresholds: Iterable[float] = THRESHOLDS
) -> dict:
    """The challenge's scores of a probability stack against a target stack, both ``(z, y, x)`` with 1 = membrane.

    Returns a dict with ``v_rand``, ``v_info``, ``pixel_error`` (each the best over thresholds) and
    their thresholds; ``v_rand_split`` / ``v_rand_merge`` and ``v_info_split`` / ``v_info_merge`` at the
    best V_rand's and V_info's thresholds; ``v_rand_pooled`` (best over thresholds); ``per_slice``
    (V_rand and V_info of each slice at those thresholds); and a ``per_threshold`` table.
    """
    membrane_probability, membrane_target = _checked_pair(membrane_probability, membrane_target, "prediction")
    if membrane_probability.dtype != np.float64:
        membrane_probability = membrane_probability.astype(np.float32)
    check_probability(membrane_probability, "prediction")
    truths = [truth_segments(t) for t in membrane_target]
    true_cell = membrane_target < 0.5
    rows, counts_by_threshold = [], []
    cell_probability = fiji_cell_probability(membrane_probability)
    thresholds = tuple(thresholds)
    for threshold in thresholds:
        cell = cell_probability > threshold
        counts = [slice_counts(proposal, truth) for proposal, truth in zip(fiji_thinned_labels(cell), truths)]
        counts_by_threshold.append(counts)
        row = {"threshold": round(float(threshold), 6), **stack_scores(counts)}
        tp = int((cell & true_cell).sum())
        fp = int((cell & ~true_cell).sum())
        fn = int((~cell & true_cell).sum())
        row["pixel_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 1.0
        rows.append(row)
    best = {key: max(range(len(rows)), key=lambda i: rows[i][key]) for key in ("v_rand", "v_info", "pixel_f1")}
    rand_row, info_row = rows[best["v_rand"]], rows[best["v_info"]]
    thinned = fiji_thinned_labels(cell_probability > thresholds[best["v_rand"]])
    rand_slices = [scores_of_slice(c) for c in counts_by_threshold[best["v_rand"]]]
    info_slices = [scores_of_slice(c) for c in counts_by_threshold[best["v_info"]]]
    return {
        "v_rand": rand_row["v_rand"],
        "v_rand_threshold": rand_row["threshold"],
        "v_rand_split": rand_row["v_rand_split"],
        "v_rand_merge": rand_row["v_rand_merge"],
        "v_info": info_row["v_info"],
        "v_info_threshold": info_row["threshold"],
        "v_info_split": info_row["v_info_split"],
        "v_info_merge": info_row["v_info_merge"],
        "v_rand_pooled": max(row["v_rand_pooled"] for row in rows),
        # the field's other scores, of the thinned proposal at the best V_rand's threshold
        "adapted_rand_error": 1.0 - rand_row["v_rand_pooled"],
        **segment_errors(thinned, np.stack(truths)),
        "pixel_error": 1.0 - rows[best["pixel_f1"]]["pixel_f1"],
        "pixel_error_threshold": rows[best["pixel_f1"]]["threshold"],
        "slices": int(membrane_probability.shape[0]),
        "per_slice": [{"v_rand": r["v_rand"], "v_info": i["v_info"]} for r, i in zip(rand_slices, info_slices)],
        "per_threshold": rows,
    }


MIN_OVERLAP_PX = 50  # an overlap smaller than this is a border's misplacement, not a false merge or split


def _errors(pairs: np.ndarray, overlaps: np.ndarray, sizes: np.ndarray, min_overlap_px: int):
    """For each segment of one side (``sizes``), how many segments of the other side it overlaps by at
    least ``min_overlap_px`` and how many of its pixels lie outside its largest overlap."""
    counted = overlaps >= min_overlap_px
    parts = np.bincount(pairs[counted], minlength=len(sizes))
    largest_overlap = np.zeros(len(sizes), np.int64)
    np.maximum.at(largest_overlap, pairs, overlaps)
    return parts, sizes - largest_overlap


def segment_errors(
    segments: np.ndarray, truths: np.ndarray, largest: int = 10, min_overlap_px: int = MIN_OVERLAP_PX
) -> dict:
    """What the wider field reports of a label stack against ground-truth segments, both ``(z, y, x)``
    integer labels; each slice's labels are its own (sections), ground-truth label 0 (membrane) is left out
    and proposal label 0 is one more label.

    - ``voi_split`` = H(S|T) and ``voi_merge`` = H(T|S), nats, over the stack (scikit-image's
      ``variation_of_information``);
    - ``truth_segments`` and ``segments`` (proposal labels other than 0 inside the ground-truth cells);
    - ``false_merges``: proposal segments that overlap two or more ground-truth segments by at least
      ``min_overlap_px`` px each; ``false_splits``: ground-truth segments that two or more proposal segments
      overlap so; ``largest_false_merges`` / ``largest_false_splits``: the ``largest`` of each, by the pixels
      outside the segment's largest overlap, with the slice, the centroid (y, x px) and the segments involved.
    """
    foreground = truths > 0
    z, y, x = np.nonzero(foreground)

    def per_slice(labels: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        """((slice, label) of each distinct section, the section of each foreground pixel)."""
        values = labels[foreground].astype(np.int64)
        span = int(values.max(initial=0)) + 1
        keys, index = np.unique(z * span + values, return_inverse=True)
        return np.divmod(keys, span), index.ravel()

    t_keys, t_index = per_slice(truths)
    s_keys, s_index = per_slice(segments)
    voi_split, voi_merge = variation_of_information(t_index + 1, s_index + 1)
    pair_keys, overlaps = np.unique(t_index.astype(np.int64) * len(s_keys[0]) + s_index, return_counts=True)
    pair_t, pair_s = np.divmod(pair_keys, len(s_keys[0]))
    t_sizes, s_sizes = np.bincount(t_index), np.bincount(s_index)
    is_boundary = s_keys[1] == 0  # proposal label 0 neither merges nor splits
    keep = ~is_boundary[pair_s]
    merged, merge_px = _errors(pair_s[keep], overlaps[keep], s_sizes, min_overlap_px)
    split, split_px = _errors(pair_t[keep], overlaps[keep], t_sizes, min_overlap_px)
    merges = np.flatnonzero((merged >= 2) & ~is_boundary)
    splits = np.flatnonzero(split >= 2)

    def table(which, index, parts, outside, keys):
        rows = []
        for i in which[np.argsort(-outside[which], kind="stable")][:largest]:
            inside = index == i
            rows.append(
                {
                    "slice": int(keys[0][i]),
                    "label": int(keys[1][i]),
                    "segments": int(parts[i]),
                    "pixels": int(outside[i]),
                    "y": round(float(y[inside].mean()), 1),
                    "x": round(float(x[inside].mean()), 1),
                }
            )
        return rows

    return {
        "voi_split": float(voi_split),
        "voi_merge": float(voi_merge),
        "truth_segments": int(len(t_sizes)),
        "segments": int((~is_boundary).sum()),
        "false_merges": int(len(merges)),
        "false_splits": int(len(splits)),
        "largest_false_merges": table(merges, s_index, merged, merge_px, s_keys),
        "largest_false_splits": table(splits, t_index, split, split_px, t_keys),
    }


def evaluate_segments(segments: np.ndarray, membrane_target: np.ndarray) -> dict:
    """The challenge's foreground-restricted V_rand and V_info of a label image (one integer label per
    neuron section, 0 = boundary) against a target stack with 1 = membrane, averaged over slices;
    no threshold, no thinning. ``per_slice`` gives each slice's V_rand and V_info; beside them the
    field's other scores (:func:`segment_errors`) and CREMI's adapted Rand error (1 - the F-score of the
    pair counts pooled over the stack, proposal label 0 counted as singletons)."""
    segments, membrane_target = _checked_pair(segments, membrane_target, "segments")
    check_segments(segments, "segments")
    truths = np.stack([truth_segments(t) for t in membrane_target])
    counts = [slice_counts(s, t) for s, t in zip(segments, truths)]
    per_slice = [scores_of_slice(c) for c in counts]
    scores = stack_scores(counts)
    return {
        **scores,
        "adapted_rand_error": 1.0 - scores["v_rand_pooled"],
        **segment_errors(segments, truths),
        "slices": int(segments.shape[0]),
        "per_slice": [{"v_rand": row["v_rand"], "v_info": row["v_info"]} for row in per_slice],
    }


def check_probability(values: np.ndarray, source: str, first_slice: int = 0) -> None:
    """One-line error unless every value is a finite probability in [0, 1] (``first_slice``: the index of
    ``values``' first slice in its stack, for the message)."""
    check_finite(values, source, "a membrane probability map must hold values in [0, 1]", first_slice)
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise DataError(
            f"{source}: values from {low:g} to {high:g} are not probabilities in [0, 1] "
            "(8/16-bit maps are scaled by 255/65535; float maps must already be in [0, 1])"
        )


def check_segments(labels: np.ndarray, source: str) -> None:
    """One-line error unless ``labels`` is a non-negative integer label image."""
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise DataError(
            f"{source}: a label image needs integer values, found {labels.dtype} (write segments as uint16 or uint32)"
        )
    if labels.size and labels.min() < 0:
        raise DataError(f"{source}: negative label {labels.min()} (labels are 0 = boundary, 1, 2, ... = segments)")


def as_probability(stack: np.ndarray, source: str, dtype: type = np.float32, first_slice: int = 0) -> np.ndarray:
    """A membrane-probability stack in [0, 1]: 8/16-bit maps scaled by 255/65535, float maps taken as
    they are and refused unless finite and in [0, 1].

    ``dtype=np.float64`` keeps an 8/16-bit map's ``v / 255`` in double precision, so that the float32
    cell probability scored as Fiji scores it (``1 - v / 255``, rounded once) is Fiji's to the last bit.
    """
    if stack.dtype in FIXED_RANGES and dtype == np.float64:
        return stack / FIXED_RANGES[stack.dtype][1]
    if stack.dtype in (np.uint8, np.uint16):
        return to_unit_range(stack)  # the one scaling rule of 8/16-bit data
    if not np.issubdtype(stack.dtype, np.floating):
        raise DataError(
            f"{source}: a probability map must be 8-bit, 16-bit or float, found {stack.dtype} "
            "(a label image? score it with --segments)"
        )
    stack = stack.astype(dtype)
    check_probability(stack, source, first_slice)
    return stack


SEGMENTS_SOFTWARE = "em-unet segment"  # TIFF Software tag of em-unet's label images


def is_segments_file(path: str | Path) -> bool:
    """True for TIFFs written by ``em-unet segment`` (their Software tag)."""
    try:
        with tifffile.TiffFile(path) as tif:
            tag = tif.pages[0].tags.get("Software")
            return bool(tag) and str(tag.value).startswith(SEGMENTS_SOFTWARE)
    except (OSError, ValueError, tifffile.TiffFileError):  # not a TIFF: the reader then gives the one-line error
        return False


def evaluate_files(
    prediction_path, label_path, isbi: bool = False, label_convention: str = "auto", segments: bool | None = None
) -> dict:
    """Score a file against a label stack: a membrane-probability map (1 = membrane, or 1 = cell with
    ``isbi``) by :func:`evaluate_stack`, a label image by :func:`evaluate_segments`.

    ``segments``: None decides by the file (a TIFF written by ``em-unet segment``, or 32/64-bit integers).
    """
    stack = read_stack(prediction_path)
    target = membrane_target(read_stack(label_path), label_convention, source=str(label_path))
    if stack.shape != target.shape:
        raise DataError(
            f"{label_path}: label shape {target.shape} differs from prediction shape {stack.shape} of {prediction_path}"
        )
    if segments is None:
        segments = is_segments_file(prediction_path) or (stack.dtype.kind in "iu" and stack.dtype.itemsize >= 4)
    if segments:
        check_segments(stack, str(prediction_path))
        return {**evaluate_segments(stack, target), "kind": "segments"}
    probability = as_probability(stack, str(prediction_path), np.float64)
    return {**evaluate_stack(1.0 - probability if isbi else probability, target), "kind": "probability"}
