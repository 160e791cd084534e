import numpy as np
import pytest
from skimage.metrics import adapted_rand_error

from em_unet.metrics import evaluate_stack, split_merge_scores, thinned_proposal, truth_segments


def grid_target(size=32, cell=8):
    """Membrane target (1 = membrane) of square cells separated by 1-pixel lines."""
    target = np.zeros((size, size), np.float32)
    target[::cell, :] = 1
    target[:, ::cell] = 1
    return target


def test_perfect_prediction_scores_one():
    target = np.stack([grid_target(), grid_target(cell=4)])
    scores = evaluate_stack(target, target)
    assert scores["v_rand"] == pytest.approx(1.0)
    assert scores["v_info"] == pytest.approx(1.0)
    assert scores["pixel_error"] == pytest.approx(0.0)


def test_hand_computed_merge():
    # truth: two cells of 2 pixels each; proposal: one segment over all four
    truth = np.array([[1, 1, 2, 2]])
    proposal = np.array([[5, 5, 5, 5]])
    scores = split_merge_scores(proposal, truth)
    # p_ij = 1/2, 1/2; s = [1]; t = [1/2, 1/2]
    assert scores["v_rand_split"] == pytest.approx(1.0)       # 0.5 / 0.5
    assert scores["v_rand_merge"] == pytest.approx(0.5)       # 0.5 / 1
    assert scores["v_rand"] == pytest.approx(2 / 3)
    assert scores["v_info_split"] == pytest.approx(1.0)  # H(S) = 0: nothing split
    assert scores["v_info_merge"] == pytest.approx(0.0)  # I = 0


def test_hand_computed_split_with_boundary_singletons():
    # truth: one cell of 4 pixels; proposal: two segments and a boundary pixel between them
    truth = np.array([[1, 1, 1, 1]])
    proposal = np.array([[3, 0, 4, 4]])
    scores = split_merge_scores(proposal, truth)
    # segments of sizes 1, 1 (singleton), 2 -> sum p^2 = (1 + 1 + 4) / 16
    assert scores["v_rand_split"] == pytest.approx(6 / 16)
    assert scores["v_rand_merge"] == pytest.approx(1.0)


def test_matches_skimage_adapted_rand_with_singletons():
    rng = np.random.default_rng(0)
    truth_target = grid_target(48, 12)
    probability = np.clip(truth_target * 0.5 + rng.random(truth_target.shape) * 0.6, 0, 1)
    truth = truth_segments(truth_target)
    proposal = thinned_proposal(probability, 0.5)
    relabelled = proposal.copy()
    boundary = (proposal == 0) & (truth > 0)
    relabelled[boundary] = proposal.max() + 1 + np.arange(boundary.sum())
    error, precision, recall = adapted_rand_error(truth, relabelled, ignore_labels=(0,))
    ours = split_merge_scores(proposal, truth)
    # skimage counts pairs of distinct pixels (sums of squares minus n) where ISBI/Fiji sum squares,
    # so the two agree to O(1 / segment size); skimage's precision divides by the truth's sizes (our split), its recall by the proposal's (our merge).
    assert ours["v_rand"] == pytest.approx(1 - error, abs=1e-3)
    assert ours["v_rand_split"] == pytest.approx(precision, abs=1e-3)
    assert ours["v_rand_merge"] == pytest.approx(recall, abs=1e-3)
    assert ours["v_rand"] < 0.999  # the noise did cost something


def test_constant_predictions_give_no_nan():
    target = np.stack([grid_target()])
    for value in (0.0, 0.5, 1.0):
        scores = evaluate_stack(np.full_like(target, value), target)
        flat = [scores["v_rand"], scores["v_info"], scores["pixel_error"]]
        flat += [v for row in scores["per_threshold"] for v in row.values()]
        assert np.isfinite(flat).all()
    assert evaluate_stack(np.full_like(target, 1.0), target)["v_rand"] < 0.5


def test_thinning_leaves_one_pixel_lines():
    probability = grid_target(32, 8) * 0.9
    proposal = thinned_proposal(probability, 0.5)
    assert proposal.max() == 16
    assert (proposal == 0).mean() < 0.25


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"prediction shape \(1, 8, 8\) differs from label shape \(1, 8, 9\)"):
        evaluate_stack(np.zeros((1, 8, 8)), np.zeros((1, 8, 9)))
