import numpy as np
import pytest

from em_unet.segmentation.affinities import affinities_from_cells, cell_ids
from em_unet.segmentation.offsets import DEFAULT_OFFSETS
from em_unet.training.losses import (
    affinity_targets,
    bce,
    border_weight_map,
    dice,
    pixel_accuracy,
    training_loss,
    weighted_bce,
)


def test_border_weights_peak_between_close_cells():
    target = np.zeros((40, 60), np.float32)
    target[:, 20:23] = 1  # a thin membrane between two close cells
    target[:, 45:] = 1  # a wide membrane region far from the left cell
    weights = border_weight_map(target, w0=10, sigma_px=5)
    narrow = weights[20, 21]
    wide = weights[20, 55]
    assert narrow > wide + 5  # d1 + d2 small between close cells
    n, m = target.size, target.sum()
    assert weights[20, 5] == pytest.approx(n / (2 * (n - m)))  # cell pixels: class weight only
    assert wide == pytest.approx(n / (2 * m), rel=1e-3)  # far from any second cell


def test_weighted_bce_with_unit_weights_is_bce():
    rng = np.random.default_rng(0)
    target = (rng.random((2, 8, 8, 1)) > 0.5).astype(np.float32)
    prediction = rng.random((2, 8, 8, 1)).astype(np.float32)
    with_weights = np.concatenate([target, np.ones_like(target)], axis=-1)
    assert np.allclose(weighted_bce(with_weights, prediction), bce(target, prediction), atol=1e-6)
    doubled = np.concatenate([target, 2 * np.ones_like(target)], axis=-1)
    assert np.allclose(weighted_bce(doubled, prediction), 2 * np.asarray(bce(target, prediction)), atol=1e-5)


def test_accuracy_and_dice_on_perfect_prediction():
    target = np.zeros((1, 8, 8, 1), np.float32)
    target[0, 2:4] = 1
    assert float(np.mean(pixel_accuracy(target, target))) == 1.0
    assert float(np.mean(dice(target, target))) == pytest.approx(1.0)
    assert float(np.mean(dice(target, 1 - target))) == pytest.approx(0.0, abs=1e-5)


def test_affinity_targets_in_the_graph_equal_numpy_on_random_labels():
    rng = np.random.default_rng(0)
    for density in (0.2, 0.4, 0.6):
        membrane = rng.random((3, 40, 48)) < density
        cells = cell_ids(membrane).astype(np.float32)  # ids travel as a float mask channel
        targets, inside = affinity_targets(cells, DEFAULT_OFFSETS)
        for z in range(3):
            expected, expected_inside = affinities_from_cells(cells[z], DEFAULT_OFFSETS)
            assert np.array_equal(np.moveaxis(np.asarray(targets[z]), -1, 0), expected)
            assert np.array_equal(np.moveaxis(np.asarray(inside[z]), -1, 0), expected_inside)
        # membrane pixels have affinity 0 to everything; pairs leaving the crop are masked out
        assert not np.asarray(targets)[membrane].any()
        assert not np.asarray(inside)[:, :27, :, 10].any() and np.asarray(inside)[:, 27:, :, 10].all()


def test_affinity_loss_is_the_masked_mean_beside_the_membrane_loss():
    rng = np.random.default_rng(1)
    offsets = ((-1, 0), (0, -1), (0, -5))
    membrane = (rng.random((2, 12, 12)) < 0.3).astype(np.float32)
    cells = np.where(membrane > 0, 0, 1 + (np.arange(12) >= 6)[None, None, :]).astype(np.float32)
    y_true = np.stack([membrane, cells], axis=-1)
    y_pred = rng.uniform(0.05, 0.95, (2, 12, 12, 4)).astype(np.float32)
    loss = np.asarray(training_loss("bce", offsets)(y_true, y_pred))
    expected = []
    for b in range(2):
        pixel_membrane = -(
            membrane[b] * np.log(y_pred[b, ..., 0]) + (1 - membrane[b]) * np.log(1 - y_pred[b, ..., 0])
        ).mean()
        terms = []
        for c, (dy, dx) in enumerate(offsets):
            for y in range(12):
                for x in range(12):
                    if 0 <= y + dy < 12 and 0 <= x + dx < 12:
                        same = float(cells[b, y, x] > 0 and cells[b, y, x] == cells[b, y + dy, x + dx])
                        p = y_pred[b, y, x, 1 + c]
                        terms.append(-(same * np.log(p) + (1 - same) * np.log(1 - p)))
        expected.append(pixel_membrane + np.mean(terms))
    assert np.allclose(loss, expected, atol=1e-5)
    # the metrics read the membrane channel only
    assert np.asarray(pixel_accuracy(y_true[..., :1], y_pred)).shape == (2,)
