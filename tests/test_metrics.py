import numpy as np
import pytest
from skimage.metrics import adapted_rand_error

from em_unet.errors import DataError
from em_unet.metrics import evaluate_segments, evaluate_stack, split_merge_scores, thinned_proposal, truth_segments


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
    assert scores["v_rand_split"] == pytest.approx(1.0)  # 0.5 / 0.5
    assert scores["v_rand_merge"] == pytest.approx(0.5)  # 0.5 / 1
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
    # so the two agree to O(1 / segment size); skimage's precision divides by the truth's sizes (our split),
    # its recall by the proposal's (our merge).
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


# ------------------------------------------------------------ Fiji's thinning and pooling


def test_fiji_thresholds_accumulate_like_fijis_loop():
    from em_unet.metrics import THRESHOLDS

    assert len(THRESHOLDS) == 11
    assert THRESHOLDS[3] == 0.1 + 0.1 + 0.1 != 0.3
    assert THRESHOLDS[-1] == 0.9999999999999999


def two_cells_with_a_thick_border():
    """Rows of: cell A (x = 0), a 3-px border (x = 1-3) whose middle is the faintest, cell B (x = 4);
    the truth puts the membrane at x = 3, so cell T1 is x = 0-2 and T2 is x = 4."""
    probability = np.tile(np.array([0.0, 0.9, 0.6, 0.95, 0.0], np.float32), (3, 1))
    target = np.tile(np.array([0, 0, 0, 1, 0], np.float32), (3, 1))
    return probability, target


def test_thinning_floods_the_binary_proposal_not_the_probabilities():
    from skimage.measure import label
    from skimage.segmentation import watershed

    probability, target = two_cells_with_a_thick_border()
    thinned = thinned_proposal(probability, 0.5)
    # binary flood: x = 1 and x = 3 are one step from a cell, x = 2 is two steps from both: a line
    a, b = thinned[0, 0], thinned[0, 4]
    assert a != b and a > 0 and b > 0
    assert (thinned == np.array([a, a, 0, b, b])).all()

    # The slice (n = 12 truth-cell px): truth T1 = x 0-2 (9 px), T2 = x 4 (3 px); proposal A = x 0-1 (6 px),
    # B = x 4 (3 px; x = 3 is truth membrane and not counted), 3 boundary px at x = 2 inside T1.
    # tp = sum c_ij^2 + c0 = 36 + 9 + 3 = 48; sum b_j^2 + c0 = 36 + 9 + 3 -> fp = 0; sum a_i^2 = 81 + 9 -> fn = 42.
    split, merge = 48 / 90, 1.0
    # H(T) = -(3/4 ln 3/4 + 1/4 ln 1/4); H(S) = -(1/2 ln 1/2 + 1/4 ln 1/4 + 3 x 1/12 ln 1/12); every proposal
    # segment lies in one truth cell, so H(T|S) = 0 and I(S;T) = H(T).
    h_t = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    h_s = -(0.5 * np.log(0.5) + 0.25 * np.log(0.25) + 3 / 12 * np.log(1 / 12))
    info_merge, info_split = 1.0, h_t / h_s
    scores = evaluate_stack(probability[None], target[None], thresholds=[0.5])
    assert scores["v_rand"] == pytest.approx(2 * split * merge / (split + merge))
    assert scores["per_threshold"][0]["v_rand_split"] == pytest.approx(split)
    assert scores["v_info"] == pytest.approx(2 * info_split * info_merge / (info_split + info_merge))
    assert scores["v_rand"] == pytest.approx(32 / 46)

    # Flooding the continuous map instead (the evaluator's old thinning) would have given x = 2 to A
    # (its 0.6 is flooded before x = 3's 0.95) and scored a perfect 1.0 here.
    seeds = label((1 - probability) > 0.5, connectivity=1)
    continuous = watershed(probability, markers=seeds, connectivity=1, watershed_line=True)
    assert split_merge_scores(continuous, truth_segments(target))["v_rand"] == pytest.approx(1.0)


def test_scores_pool_pair_counts_over_slices_as_fiji_does():
    # slice 1: truth one cell of 4 px, proposal two of 2 px -> tp 8, fp 0, fn 8 (split 0.5)
    # slice 2: truth one cell of 2 px, proposal the same -> tp 4, fp 0, fn 0 (split 1)
    first = split_merge_scores(np.array([[1, 1, 2, 2]]), np.array([[1, 1, 1, 1]]))
    assert first["v_rand_split"] == pytest.approx(0.5)
    target = np.zeros((2, 1, 4), np.float32)
    target[1, 0, 2:] = 1  # slice 2: membrane on its right half
    segments = np.array([[[1, 1, 2, 2]], [[3, 3, 0, 0]]])
    pooled = evaluate_segments(segments, target)
    assert pooled["v_rand_split"] == pytest.approx(12 / 20)  # not the mean of 0.5 and 1
    assert pooled["v_rand_merge"] == pytest.approx(1.0)
    assert pooled["v_rand"] == pytest.approx(2 * 0.6 / 1.6)


def test_evaluate_segments_scores_perfect_labels_one_and_refuses_bad_labels():
    target = grid_target(32, 8)[None]
    perfect = truth_segments(target[0])[None]
    assert evaluate_segments(perfect, target)["v_rand"] == pytest.approx(1.0)
    assert evaluate_segments(perfect * 7 + 100, target)["v_info"] == pytest.approx(1.0)  # label values do not matter
    merged = np.where(perfect > 0, 1, 0)
    assert evaluate_segments(merged, target)["v_rand_merge"] < 0.2
    for bad, message in [
        (perfect.astype(np.float32), "integer values"),
        (perfect - 5, "negative label"),
        (perfect[:, :16], "differs from label shape"),
    ]:
        with pytest.raises(DataError, match=message):
            evaluate_segments(bad, target)


def test_probability_maps_outside_zero_one_or_not_finite_are_refused():
    target = grid_target()[None]
    for bad, message in [
        (target * 2.0, "from 0 to 2 are not probabilities"),
        (target - 0.5, "-0.5"),
        (np.where(target > 0, np.nan, 0.2), "NaN or infinite value at slice 0"),
        (np.where(target > 0, np.inf, 0.2), "NaN or infinite"),
    ]:
        with pytest.raises(DataError, match=message):
            evaluate_stack(bad, target)


def test_evaluate_files_reads_maps_and_label_images(tmp_path):
    import tifffile

    from em_unet.metrics import evaluate_files

    target = np.stack([grid_target(32, 8)] * 2)
    labels = np.where(target > 0, 0, 255).astype(np.uint8)  # ISBI convention
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    tifffile.imwrite(tmp_path / "map8.tif", (target * 255).astype(np.uint8), photometric="minisblack")
    assert evaluate_files(tmp_path / "map8.tif", tmp_path / "labels.tif")["v_rand"] == pytest.approx(1.0)
    segments = np.stack([truth_segments(t) for t in target]).astype(np.uint32)
    tifffile.imwrite(tmp_path / "seg32.tif", segments, photometric="minisblack")
    auto = evaluate_files(tmp_path / "seg32.tif", tmp_path / "labels.tif")
    assert auto["kind"] == "segments" and auto["v_rand"] == pytest.approx(1.0)
    tifffile.imwrite(tmp_path / "seg16.tif", segments.astype(np.uint16), photometric="minisblack")
    assert evaluate_files(tmp_path / "seg16.tif", tmp_path / "labels.tif")["kind"] == "probability"  # 16-bit map
    assert evaluate_files(tmp_path / "seg16.tif", tmp_path / "labels.tif", segments=True)["v_info"] == pytest.approx(1)
    for name, values, as_segments, message in [
        ("logits.tif", target * 6 - 3, None, r"not probabilities in \[0, 1\]"),
        ("float-labels.tif", segments.astype(np.float32) + 0.5, True, "integer values"),
        ("negative.tif", segments.astype(np.int32) - 3, None, "negative label"),
        ("short.tif", segments[:1], None, r"label shape \(2, 32, 32\) differs from prediction shape \(1, 32, 32\)"),
    ]:
        tifffile.imwrite(tmp_path / name, values, photometric="minisblack")
        with pytest.raises(DataError, match=message):
            evaluate_files(tmp_path / name, tmp_path / "labels.tif", segments=as_segments)
