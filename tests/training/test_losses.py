import numpy as np
import pytest

from em_unet.training.losses import bce, border_weight_map, dice, pixel_accuracy, weighted_bce


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
