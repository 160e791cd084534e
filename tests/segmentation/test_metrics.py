import numpy as np
import pytest
from skimage.metrics import adapted_rand_error

from em_unet.errors import DataError
from em_unet.segmentation.metrics import (
    evaluate_segments,
    evaluate_stack,
    split_merge_scores,
    thinned_proposal,
    truth_segments,
)


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
    # H(S) = 0 (one segment): Fiji's foregroundRestrictedFscore sets precision 1, recall 0 -> V_info 0
    assert scores["v_info_split"] == pytest.approx(0.0)
    assert scores["v_info_merge"] == pytest.approx(1.0)
    assert scores["v_info"] == 0.0


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
    from em_unet.segmentation.metrics import THRESHOLDS

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


def test_stack_scores_average_slices_as_the_challenge_does():
    # slice 1: truth one cell of 4 px, proposal two of 2 px -> tp 8, fp 0, fn 8 (split 0.5)
    # slice 2: truth one cell of 2 px, proposal the same -> tp 4, fp 0, fn 0 (split 1)
    first = split_merge_scores(np.array([[1, 1, 2, 2]]), np.array([[1, 1, 1, 1]]))
    assert first["v_rand_split"] == pytest.approx(0.5)
    target = np.zeros((2, 1, 4), np.float32)
    target[1, 0, 2:] = 1  # slice 2: membrane on its right half
    segments = np.array([[[1, 1, 2, 2]], [[3, 3, 0, 0]]])
    scores = evaluate_segments(segments, target)
    assert scores["v_rand_split"] == pytest.approx(0.75)  # the mean of 0.5 and 1
    assert scores["v_rand_merge"] == pytest.approx(1.0)
    assert scores["v_rand"] == pytest.approx((2 * 0.5 / 1.5 + 1.0) / 2)  # the mean of the slices' F-scores
    assert [row["v_rand"] for row in scores["per_slice"]] == pytest.approx([2 / 3, 1.0])
    assert scores["v_rand_pooled"] == pytest.approx(2 * 0.6 / 1.6)  # counts summed first: split 12 / 20


def fiji_reference_cases(reference_dir):
    import json

    import tifffile

    from em_unet.io.stacks import membrane_target
    from em_unet.segmentation.metrics import as_probability

    for name, expected in json.loads((reference_dir / "fiji-scores.json").read_text()).items():
        probability = as_probability(tifffile.imread(reference_dir / name), name, np.float64)
        target = membrane_target(tifffile.imread(reference_dir / expected["labels"]))
        yield name, probability, target, expected


def test_evaluate_reproduces_every_number_fiji_gives_for_the_reference_maps(fiji_reference_dir):
    checked = 0
    for name, probability, target, expected in fiji_reference_cases(fiji_reference_dir):
        scores = evaluate_stack(probability, target)
        for key in ("v_rand", "v_rand_pooled", "v_info"):
            assert scores[key] == pytest.approx(expected[key], abs=1e-4), (name, key)
            fiji = expected["per_threshold"][key]
            assert [row["threshold"] for row in scores["per_threshold"]] == pytest.approx([t for t, _ in fiji])
            ours = [row[key] for row in scores["per_threshold"]]
            assert ours == pytest.approx([value for _, value in fiji], abs=1e-4), (name, key)
            checked += 1 + len(fiji)
    assert checked == 3 * 3 * 12


def test_erased_membranes_score_as_fiji_not_as_pooled_counts(fiji_reference_dir):
    """Map b merges cells in three slices: the per-slice mean and the pooled counts differ by 0.02."""
    cases = {name: case for name, *case in fiji_reference_cases(fiji_reference_dir)}
    probability, target, expected = cases["membrane-prob-b.tif"]
    scores = evaluate_stack(probability, target)
    assert scores["v_rand"] == pytest.approx(0.814566, abs=1e-6)
    assert scores["v_rand"] - scores["v_rand_pooled"] > 0.02
    assert np.mean([row["v_rand"] for row in scores["per_slice"]]) == pytest.approx(scores["v_rand"])


def fiji_flooding_as_written(cell):
    """Fiji's WatershedTransform2D.apply() on ``255 * ~cell``, transcribed line by line (slow; an oracle)."""
    from collections import deque

    image = np.where(cell, 0, 255).T  # Fiji's [x][y]
    size1, size2 = image.shape
    mask, wshed, init, inqueue = -2, 0, -1, -3
    labels = np.full(image.shape, init)
    pixels = sorted(((image[x, y], x, y) for x in range(size1) for y in range(size2)), key=lambda p: p[0])
    steps = ((-1, 0), (0, -1), (1, 0), (0, 1))
    current, flag, start = 0, False, 0
    for h in sorted(set(int(v) for v in image.ravel())):
        level = []
        while start < len(pixels) and pixels[start][0] == h:
            level.append(pixels[start][1:])
            start += 1
        fifo = deque()
        for i, j in level:
            labels[i, j] = mask
            for du, dv in steps:
                u, v = i + du, j + dv
                if 0 <= u < size1 and 0 <= v < size2 and labels[u, v] >= wshed:
                    fifo.append((i, j))
                    labels[i, j] = inqueue
                    break
        while fifo:
            i, j = fifo.popleft()
            for du, dv in steps:
                u, v = i + du, j + dv
                if not (0 <= u < size1 and 0 <= v < size2):
                    continue
                if labels[u, v] > 0:
                    if labels[i, j] == inqueue or (labels[i, j] == wshed and flag):
                        labels[i, j] = labels[u, v]
                    elif labels[i, j] > 0 and labels[i, j] != labels[u, v]:
                        labels[i, j] = wshed
                        flag = False
                elif labels[u, v] == wshed:
                    if labels[i, j] == inqueue:
                        labels[i, j] = wshed
                        flag = True
                elif labels[u, v] == mask:
                    labels[u, v] = inqueue
                    fifo.append((u, v))
        for i, j in level:
            if labels[i, j] == mask:
                current += 1
                labels[i, j] = current
                fifo.append((i, j))
                while fifo:
                    a, b = fifo.popleft()
                    for du, dv in steps:
                        u, v = a + du, b + dv
                        if 0 <= u < size1 and 0 <= v < size2 and labels[u, v] == mask:
                            labels[u, v] = current
                            fifo.append((u, v))
    return np.where(labels == init, 0, labels).T


def same_partition(a, b):
    """Equal label images up to the labels' values (0 kept as 0)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return np.array_equal(a == 0, b == 0) and len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def test_thinning_equals_fijis_flooding_transcribed_on_random_slices():
    from em_unet.segmentation.metrics import fiji_thinned_labels

    rng = np.random.default_rng(3)
    even_width = np.zeros((6, 10), bool)
    even_width[:, :4] = even_width[:, 6:] = True  # a 2-px membrane: Fiji's line is on its second pixel
    cases = [even_width, np.zeros((5, 7), bool), np.ones((5, 7), bool)]
    for size in (8, 13, 24):
        for density in (0.15, 0.4, 0.7):
            cases.append(rng.random((size, size + 3)) < density)
            smooth = ndimage_smooth(rng.random((size, size)), 1.5)
            cases.append(smooth > np.quantile(smooth, density))
    for cell in cases:
        fiji = fiji_flooding_as_written(cell)
        ours = fiji_thinned_labels(cell)
        assert same_partition(ours, fiji), cell.astype(int)
    line = fiji_thinned_labels(even_width)[0]
    assert (line[:5] > 0).all() and line[5] == 0 and line[4] == line[0] != line[6]


def ndimage_smooth(values, sigma):
    from scipy import ndimage

    return ndimage.gaussian_filter(values, sigma)


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

    from em_unet.segmentation.metrics import evaluate_files

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


# ------------------------------------------------------------ the field's other scores


def random_segments(rng, shape, cells):
    """A label stack of ``cells`` random Voronoi cells a slice (labels from 1), and a membrane target that
    draws the cells' borders (1 = membrane)."""
    from scipy import ndimage

    stack = np.zeros(shape, np.int32)
    for z in range(shape[0]):
        seeds = np.zeros(shape[1:], np.int32)
        points = rng.integers(0, shape[1], (cells, 2))
        seeds[points[:, 0], points[:, 1]] = np.arange(1, cells + 1)
        _, (rows, cols) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        stack[z] = seeds[rows, cols]
    border = np.zeros(shape, bool)
    border[:, 1:] |= stack[:, 1:] != stack[:, :-1]
    border[:, :, 1:] |= stack[:, :, 1:] != stack[:, :, :-1]
    return stack, border.astype(np.float32)


def test_voi_split_and_merge_equal_scikit_images_and_the_adapted_rand_error_cremis():
    from skimage.metrics import variation_of_information

    rng = np.random.default_rng(5)
    truth_cells, target = random_segments(rng, (3, 64, 64), 12)
    proposal, _ = random_segments(rng, (3, 64, 64), 9)
    proposal[0, :5, :5] = 0  # boundary pixels: one more label for VOI, singletons for the Rand counts
    scores = evaluate_segments(proposal, target)
    truths = np.stack([truth_segments(t) for t in target])
    offsets = np.arange(3)[:, None, None] * 1000  # each slice's labels its own, as the scores take them
    foreground = truths > 0
    split, merge = variation_of_information((truths + offsets)[foreground], (proposal + offsets)[foreground])
    assert scores["voi_split"] == pytest.approx(split, abs=1e-12)
    assert scores["voi_merge"] == pytest.approx(merge, abs=1e-12)
    # skimage's adapted Rand error counts pairs of distinct pixels (n^2 - n) where CREMI and Fiji count n^2,
    # and gives label 0 no special role: without label 0 the two agree to O(1 / segment size)
    no_boundary = proposal.copy()
    no_boundary[0, :5, :5] = no_boundary[0, 5, 5]
    are = evaluate_segments(no_boundary, target)["adapted_rand_error"]
    error, _, _ = adapted_rand_error(
        np.where(foreground, truths + offsets, 0).ravel(), (no_boundary + offsets).ravel(), ignore_labels=(0,)
    )
    assert are == pytest.approx(error, abs=2e-3) and are > 0.05


def test_false_merges_and_splits_are_counted_and_located():
    target = np.zeros((1, 40, 60), np.float32)
    target[0, :, 20] = target[0, :, 40] = 1  # three ground-truth cells: x 0-19, 21-39, 41-59
    proposal = np.zeros((1, 40, 60), np.int32)
    proposal[0, :, :40] = 1  # merges the first two cells
    proposal[0, :20, 40:] = 2  # splits the third in two halves
    proposal[0, 20:, 40:] = 3
    proposal[0, 0, 21:24] = 4  # a 3-px sliver in the second cell: below the overlap threshold, no split
    scores = evaluate_segments(proposal, target)
    assert scores["truth_segments"] == 3 and scores["segments"] == 4
    assert scores["false_merges"] == 1 and scores["false_splits"] == 1
    merge, split = scores["largest_false_merges"][0], scores["largest_false_splits"][0]
    assert (merge["slice"], merge["label"], merge["segments"]) == (0, 1, 2)
    assert merge["pixels"] == 40 * 19 - 3 and merge["x"] == pytest.approx(19.0, abs=0.5)  # the smaller cell, off
    assert (split["segments"], split["pixels"]) == (2, 20 * 19)
    assert split["y"] == pytest.approx(19.5) and split["x"] == pytest.approx(50.0)
    perfect = evaluate_segments(truth_segments(target[0])[None], target)
    assert perfect["false_merges"] == perfect["false_splits"] == 0
    assert perfect["voi_split"] == perfect["voi_merge"] == perfect["adapted_rand_error"] == pytest.approx(0.0)


def test_probability_maps_report_the_fields_scores_of_their_thinned_proposal(fiji_reference_dir):
    cases = {name: case for name, *case in fiji_reference_cases(fiji_reference_dir)}
    probability, target, _ = cases["membrane-prob-b.tif"]
    scores = evaluate_stack(probability, target)
    assert scores["adapted_rand_error"] == pytest.approx(1 - 0.7934123407286249, abs=1e-9)  # Fiji's pooled
    # the three erased membranes are the largest false merges, where they were erased
    merges = scores["largest_false_merges"][:3]
    assert {row["slice"] for row in merges} == {0, 1, 2}
    slice0 = next(row for row in merges if row["slice"] == 0)
    assert abs(slice0["x"] - 251) < 30  # slice 0's membrane was erased at columns 250-252
    assert scores["voi_merge"] > scores["voi_split"] > 0
