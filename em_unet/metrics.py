"""ISBI 2012 segmentation scores: V_rand, V_info (after border thinning) and pixel error.

Follows Arganda-Carreras et al. 2015 and Fiji's Trainable_Segmentation metrics:

- Thresholds 0.0, 0.1, ..., 1.0 on the cell probability (1 - membrane probability);
  a pixel is cell where its cell probability exceeds the threshold.
- Ground-truth segments are the 4-connected components of the ground-truth cell
  pixels; ground-truth membrane pixels are left out of the counts.
- The proposal's 4-connected cell components seed a watershed on the membrane
  probability that grows them until 1-pixel lines separate them (border thinning);
  proposal-boundary pixels inside ground-truth cells count as singletons.
- V_rand = 2 sum p_ij^2 / (sum s_i^2 + sum t_j^2), the harmonic mean of
  V_rand_split = sum p_ij^2 / sum t_j^2 and V_rand_merge = sum p_ij^2 / sum s_i^2
  (p the joint distribution of proposal i and truth j, s and t its marginals).
- V_info: harmonic mean of V_info_split = I(S;T)/H(S) and V_info_merge = I(S;T)/H(T).
- Scores are averaged over slices at each threshold; the maximum over thresholds
  is reported for each score, with its threshold.
- Pixel error: 1 - the best F1 of the cell class over thresholds, with true and
  false positives and negatives pooled over all slices.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

THRESHOLDS = tuple(np.round(np.arange(0.0, 1.01, 0.1), 1))


def _safe_ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 1.0


def _harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def contingency(proposal: np.ndarray, truth: np.ndarray) -> sparse.csr_matrix:
    """Pixel counts of (proposal label, truth label) over pixels whose truth label is not 0."""
    keep = truth.ravel() > 0
    rows = proposal.ravel()[keep].astype(np.int64)
    cols = truth.ravel()[keep].astype(np.int64)
    return sparse.coo_matrix((np.ones(rows.size), (rows, cols))).tocsr()


def split_merge_scores(proposal: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """V_rand and V_info with their split and merge parts for one labelled slice pair.

    Both arguments are integer label images; truth label 0 (membrane) is ignored.
    Proposal label 0 is a boundary: each such pixel is its own segment (a singleton).
    """
    proposal = proposal.astype(np.int64, copy=True)
    boundary = (proposal == 0) & (truth > 0)
    proposal[boundary] = proposal.max() + 1 + np.arange(int(boundary.sum()))
    table = contingency(proposal, truth)
    total = table.sum()
    if total == 0:
        return {k: 1.0 for k in ("v_rand", "v_rand_split", "v_rand_merge", "v_info", "v_info_split", "v_info_merge")}
    p = table.data / total
    s = np.asarray(table.sum(axis=1)).ravel() / total
    t = np.asarray(table.sum(axis=0)).ravel() / total
    s, t = s[s > 0], t[t > 0]
    sum_p2, sum_s2, sum_t2 = float((p**2).sum()), float((s**2).sum()), float((t**2).sum())
    rand_split, rand_merge = _safe_ratio(sum_p2, sum_t2), _safe_ratio(sum_p2, sum_s2)

    coo = table.tocoo()
    s_full = np.asarray(table.sum(axis=1)).ravel() / total
    t_full = np.asarray(table.sum(axis=0)).ravel() / total
    mutual = float((p * np.log(p / (s_full[coo.row] * t_full[coo.col]))).sum())
    entropy_s = float(-(s * np.log(s)).sum())
    entropy_t = float(-(t * np.log(t)).sum())
    # I(S;T) <= min(H(S), H(T)); a zero entropy means nothing can be split (or merged).
    info_split = _safe_ratio(mutual, entropy_s) if entropy_s > 0 else 1.0
    info_merge = _safe_ratio(mutual, entropy_t) if entropy_t > 0 else 1.0
    return {
        "v_rand": _harmonic(rand_split, rand_merge),
        "v_rand_split": rand_split,
        "v_rand_merge": rand_merge,
        "v_info": _harmonic(info_split, info_merge),
        "v_info_split": info_split,
        "v_info_merge": info_merge,
    }


def truth_segments(membrane_target: np.ndarray) -> np.ndarray:
    """4-connected components of the ground-truth cell pixels (membrane target 0); membrane is label 0."""
    from skimage.measure import label

    return label(membrane_target < 0.5, connectivity=1)


def thinned_proposal(membrane_probability: np.ndarray, threshold: float) -> np.ndarray:
    """Proposal segments at one threshold, grown by a watershed until 1-pixel lines (label 0) divide them."""
    from skimage.measure import label
    from skimage.segmentation import watershed

    seeds = label((1.0 - membrane_probability) > threshold, connectivity=1)
    if seeds.max() == 0:
        return seeds
    return watershed(membrane_probability, markers=seeds, connectivity=1, watershed_line=True)


def evaluate_files(
    prediction_path, label_path, isbi: bool = False, label_convention: str = "auto"
) -> dict:
    """:func:`evaluate_stack` on a probability TIFF (1 = membrane, or 1 = cell with ``isbi``) and a label stack."""
    from em_unet.data import load_labelled_stack

    probability, target = load_labelled_stack(prediction_path, label_path, label_convention, kind="prediction")
    return evaluate_stack(1.0 - probability if isbi else probability, target)


def evaluate_stack(
    membrane_probability: np.ndarray, membrane_target: np.ndarray, thresholds=THRESHOLDS
) -> dict:
    """ISBI scores of a probability stack against a target stack, both ``(z, y, x)`` with 1 = membrane.

    Returns a dict with ``v_rand``, ``v_info``, ``pixel_error`` (each the best
    over thresholds), their thresholds, and ``per_threshold`` tables.
    """
    membrane_probability = np.asarray(membrane_probability, np.float32)
    membrane_target = np.asarray(membrane_target)
    if membrane_probability.ndim == 2:
        membrane_probability, membrane_target = membrane_probability[None], membrane_target[None]
    if membrane_probability.shape != membrane_target.shape:
        raise ValueError(
            f"prediction shape {membrane_probability.shape} differs from label shape {membrane_target.shape}"
        )
    truths = [truth_segments(t) for t in membrane_target]
    true_cell = membrane_target < 0.5
    rows = []
    for threshold in thresholds:
        per_slice = [split_merge_scores(thinned_proposal(p, threshold), truth)
                     for p, truth in zip(membrane_probability, truths)]
        cell = (1.0 - membrane_probability) > threshold
        tp = int((cell & true_cell).sum())
        fp = int((cell & ~true_cell).sum())
        fn = int((~cell & true_cell).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 1.0
        row = {"threshold": float(threshold), "pixel_f1": f1}
        for key in per_slice[0]:
            row[key] = float(np.mean([s[key] for s in per_slice]))
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
