"""ISBI 2012 segmentation scores, computed as Fiji's Trainable_Segmentation computes them.

The reference is ``RandError.getMaximalVRandAfterThinning`` and
``VariationOfInformation.getMaximalVInfoAfterThinning`` (fiji/Trainable_Segmentation,
``src/main/java/trainableSegmentation/metrics/``), the scripts the ISBI 2012 challenge
scored with (Arganda-Carreras et al. 2015):

- Thresholds ``0.0, 0.1, ...`` while ``<= 1.0``, accumulated in double precision as
  Fiji's loop does (so the last one is 0.9999999999999999); a pixel is cell where its
  cell probability (1 - membrane probability) exceeds the threshold.
- Ground-truth segments: the 4-connected components of ground-truth cell pixels;
  ground-truth membrane pixels are left out of every count (foreground restriction).
- Border thinning (Fiji's ``WatershedTransform2D(binaryProposal, 4)``): the *binary*
  proposal, inverted so borders are high, is flooded from its 4-connected cell
  components; border pixels go to the region that reaches them first, and pixels where
  two regions meet stay 0 (1-pixel lines). The continuous probability plays no part.
- Proposal label 0 inside ground-truth cells counts as singletons (one segment a pixel).
- Per slice, with ``c_ij`` the pixel counts of (truth i >= 1, proposal j), ``a_i`` the
  truth sizes, ``b_j`` the proposal sizes over truth-foreground pixels (j >= 1), ``c0``
  the truth-foreground pixels labelled 0: ``tp = sum c_ij^2 + c0``, ``fp = sum b_j^2 + c0 - tp``,
  ``fn = sum a_i^2 - tp``. These are *pooled over slices* (Fiji's ``ClassificationStatistics``);
  V_rand_merge = tp / (tp + fp) (precision), V_rand_split = tp / (tp + fn) (recall),
  V_rand their harmonic mean (each 1 where its denominator's error term is 0).
- V_info the same way with entropies (nats) summed over slices (Fiji's ``InformationStatistics``):
  V_info_merge = I(S;T) / H(T), V_info_split = I(S;T) / H(S), V_info their harmonic mean.
- The best V_rand and the best V_info over thresholds are reported, each with its threshold.
- Pixel error: 1 - the best F1 of the cell class over thresholds, pooled over all slices.

A label image (neuron segments, e.g. from :mod:`em_unet.segment`) is scored by the same
counts with no threshold and no thinning: :func:`evaluate_segments`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from em_unet.errors import DataError


def fiji_thresholds(first: float = 0.0, last: float = 1.0, step: float = 0.1) -> tuple[float, ...]:
    """The thresholds of Fiji's ``for (th = first; th <= last; th += step)`` loop, accumulation error included."""
    values, threshold = [], first
    while threshold <= last:
        values.append(threshold)
        threshold += step
    return tuple(values)


THRESHOLDS = fiji_thresholds()


def _ratio_or_one(numerator: float, error: float) -> float:
    """Fiji's precision/recall: 1 when the error term is 0, else numerator / (numerator + error)."""
    return 1.0 if error == 0 else numerator / (numerator + error)


def _harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def truth_segments(membrane_target: np.ndarray) -> np.ndarray:
    """4-connected components of the ground-truth cell pixels (membrane target 0); membrane is label 0."""
    from skimage.measure import label

    return label(membrane_target < 0.5, connectivity=1)


def thinned_proposal(membrane_probability: np.ndarray, threshold: float) -> np.ndarray:
    """Fiji's thinned proposal at one threshold: the 4-connected cell components of the binarised map,
    grown over the border pixels of the binary image until 1-pixel lines (label 0) divide them."""
    from skimage.measure import label
    from skimage.segmentation import watershed

    cell = (1.0 - np.asarray(membrane_probability, np.float32)) > threshold
    seeds = label(cell, connectivity=1)
    if seeds.max() == 0:
        return seeds
    # Flooding the inverted binary image: every border pixel has the same height, so regions grow
    # breadth-first and ties become watershed lines; the probabilities' ordering is not used.
    return watershed(np.where(cell, 0, 255).astype(np.uint8), markers=seeds, connectivity=1, watershed_line=True)


def slice_counts(proposal: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The pair counts and entropies of one slice that Fiji pools over slices.

    ``proposal`` and ``truth`` are integer label images of one slice; truth label 0 (membrane)
    is left out; proposal label 0 is a boundary whose pixels count as singletons.
    Returns ``tp``, ``fp``, ``fn`` (pixel pairs, counted as Fiji's N^2 normalisation does)
    and ``h_truth``, ``h_proposal``, ``h_truth_given_proposal``, ``h_proposal_given_truth`` (nats).
    """
    truth = np.asarray(truth).ravel()
    proposal = np.asarray(proposal).ravel()
    foreground = truth > 0
    n = int(foreground.sum())
    if n == 0:
        return dict.fromkeys(
            ("tp", "fp", "fn", "h_truth", "h_proposal", "h_truth_given_proposal", "h_proposal_given_truth"), 0.0
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
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "h_truth": -sum_truth,
        "h_proposal": -sum_proposal,
        "h_truth_given_proposal": sum_proposal - sum_joint,
        "h_proposal_given_truth": sum_truth - sum_joint,
    }


def pooled_scores(counts: Iterable[dict[str, float]]) -> dict[str, float]:
    """V_rand and V_info with their split and merge parts from :func:`slice_counts` of several slices."""
    total = {}
    for row in counts:
        for key, value in row.items():
            total[key] = total.get(key, 0.0) + value
    rand_merge = _ratio_or_one(total["tp"], total["fp"])
    rand_split = _ratio_or_one(total["tp"], total["fn"])
    h_truth, h_proposal = total["h_truth"], total["h_proposal"]
    # Fiji: precision C(T|S) = (H(T) - H(T|S)) / H(T), recall C(S|T) = (H(S) - H(S|T)) / H(S); a zero
    # entropy (one segment, nothing to split or merge) scores 1 here where Java would divide by zero.
    info_merge = (h_truth - total["h_truth_given_proposal"]) / h_truth if h_truth > 0 else 1.0
    info_split = (h_proposal - total["h_proposal_given_truth"]) / h_proposal if h_proposal > 0 else 1.0
    return {
        key: float(value)
        for key, value in (
            ("v_rand", _harmonic(rand_split, rand_merge)),
            ("v_rand_split", rand_split),
            ("v_rand_merge", rand_merge),
            ("v_info", _harmonic(info_split, info_merge)),
            ("v_info_split", info_split),
            ("v_info_merge", info_merge),
        )
    }


def split_merge_scores(proposal: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """V_rand and V_info with their split and merge parts for one slice of integer labels."""
    return pooled_scores([slice_counts(proposal, truth)])


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
    """ISBI scores of a probability stack against a target stack, both ``(z, y, x)`` with 1 = membrane.

    Returns a dict with ``v_rand``, ``v_info``, ``pixel_error`` (each the best over thresholds),
    their thresholds, and a ``per_threshold`` table.
    """
    membrane_probability, membrane_target = _checked_pair(membrane_probability, membrane_target, "prediction")
    membrane_probability = membrane_probability.astype(np.float32)
    check_probability(membrane_probability, "prediction")
    truths = [truth_segments(t) for t in membrane_target]
    true_cell = membrane_target < 0.5
    rows = []
    for threshold in thresholds:
        row = {"threshold": round(float(threshold), 6)}
        row.update(
            pooled_scores(
                slice_counts(thinned_proposal(p, threshold), truth) for p, truth in zip(membrane_probability, truths)
            )
        )
        cell = (1.0 - membrane_probability) > threshold
        tp = int((cell & true_cell).sum())
        fp = int((cell & ~true_cell).sum())
        fn = int((~cell & true_cell).sum())
        row["pixel_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 1.0
        rows.append(row)
    best = {}
    for key in ("v_rand", "v_info", "pixel_f1"):
        winner = max(rows, key=lambda r: r[key])
        best[key] = winner[key]
        best[f"{key}_threshold"] = winner["threshold"]
    return {
        "v_rand": best["v_rand"],
        "v_rand_threshold": best["v_rand_threshold"],
        "v_info": best["v_info"],
        "v_info_threshold": best["v_info_threshold"],
        "pixel_error": 1.0 - best["pixel_f1"],
        "pixel_error_threshold": best["pixel_f1_threshold"],
        "slices": int(membrane_probability.shape[0]),
        "per_threshold": rows,
    }


def evaluate_segments(segments: np.ndarray, membrane_target: np.ndarray) -> dict:
    """Fiji's foreground-restricted V_rand and V_info of a label image (one integer label per neuron
    section, 0 = boundary) against a target stack with 1 = membrane; no threshold, no thinning."""
    segments, membrane_target = _checked_pair(segments, membrane_target, "segments")
    check_segments(segments, "segments")
    scores = pooled_scores(slice_counts(s, truth_segments(t)) for s, t in zip(segments, membrane_target))
    return {**scores, "slices": int(segments.shape[0])}


def check_probability(values: np.ndarray, source: str) -> None:
    """One-line error unless every value is a finite probability in [0, 1]."""
    from em_unet.data import check_finite

    check_finite(values, source, "a membrane probability map must hold values in [0, 1]")
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


def as_probability(stack: np.ndarray, source: str) -> np.ndarray:
    """A membrane-probability stack as float32 in [0, 1]: 8/16-bit maps scaled by 255/65535, float maps
    taken as they are and refused unless finite and in [0, 1]."""
    from em_unet.data import to_unit_range

    if stack.dtype in (np.uint8, np.uint16):
        return to_unit_range(stack)  # the one scaling rule of 8/16-bit data
    if not np.issubdtype(stack.dtype, np.floating):
        raise DataError(
            f"{source}: a probability map must be 8-bit, 16-bit or float, found {stack.dtype} "
            "(a label image? score it with --segments)"
        )
    stack = stack.astype(np.float32)
    check_probability(stack, source)
    return stack


SEGMENTS_SOFTWARE = "em-unet segment"  # TIFF Software tag of em-unet's label images


def is_segments_file(path: str | Path) -> bool:
    """True for TIFFs written by ``em-unet segment`` (their Software tag)."""
    import tifffile

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
    from em_unet.data import membrane_target, read_stack

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
    probability = as_probability(stack, str(prediction_path))
    return {**evaluate_stack(1.0 - probability if isbi else probability, target), "kind": "probability"}
