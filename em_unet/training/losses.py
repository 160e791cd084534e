"""Losses and per-epoch metrics. Targets are ``(batch, h, w, c)`` (a 3-D U-Net's ``(batch, z, h, w, c)``;
every loss and metric averages over all axes but the batch): channel 0 is the membrane
target (1 = membrane); the border-weighted loss reads its weight map from channel 1; an affinity U-Net's
loss reads cell ids from the last channel. Predictions: channel 0 is the membrane probability, the
channels after it an affinity U-Net's affinities."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from scipy import ndimage
from skimage.measure import label


def _per_example(tensor) -> tuple[int, ...]:
    """The axes of one example: all but the batch axis (2-D ``(b, y, x, c)`` and 3-D ``(b, z, y, x, c)`` alike)."""
    return tuple(range(1, len(tensor.shape)))


def _membrane(y_true):
    return y_true[..., :1]


def _pixel_bce(y_true, y_pred):
    y_pred = ops.clip(ops.cast(y_pred, "float32"), 1e-7, 1.0 - 1e-7)
    y_true = ops.cast(_membrane(y_true), "float32")
    return -(y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred))


def bce(y_true, y_pred):
    """Binary cross-entropy averaged over pixels."""
    return ops.mean(_pixel_bce(y_true, y_pred), axis=_per_example(y_pred))


def soft_dice(y_true, y_pred, smooth: float = 1.0):
    """Soft Dice coefficient of the membrane class per example."""
    y_true = ops.cast(_membrane(y_true), "float32")
    y_pred = ops.cast(y_pred, "float32")
    overlap = ops.sum(y_true * y_pred, axis=_per_example(y_pred))
    total = ops.sum(y_true, axis=_per_example(y_pred)) + ops.sum(y_pred, axis=_per_example(y_pred))
    return (2.0 * overlap + smooth) / (total + smooth)


def dice_loss(y_true, y_pred):
    return 1.0 - soft_dice(y_true, y_pred)


def bce_dice(y_true, y_pred):
    return bce(y_true, y_pred) + dice_loss(y_true, y_pred)


def weighted_bce(y_true, y_pred):
    """Cross-entropy weighted per pixel by the map in target channel 1 (see :func:`border_weight_map`)."""
    weights = ops.cast(y_true[..., 1:2], "float32")
    return ops.mean(weights * _pixel_bce(y_true, y_pred), axis=_per_example(y_pred))


# The losses by name: --loss offers these (em_unet.config reads the names from here).
LOSSES = {"bce": bce, "dice": dice_loss, "bce_dice": bce_dice, "weighted_bce": weighted_bce}


def get_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {name!r}")
    return LOSSES[name]


def affinity_targets(cells, offsets):
    """Affinity targets and their mask of a batch of cell-id crops ``(batch, h, w)`` (0 = membrane; ids travel
    through augmentation as a nearest-neighbour mask channel): ``(targets, inside)``, each float32
    ``(batch, h, w, offsets)``. Target 1 where pixel p and p + (dy, dx) have the same non-zero id; ``inside``
    is 0 where p + (dy, dx) leaves the crop (no pair to learn). NumPy's reference:
    :func:`em_unet.segmentation.affinities.affinities_from_cells`."""
    cells = tf.cast(tf.round(tf.cast(cells, tf.float32)), tf.int32)
    reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = tf.pad(cells, [[0, 0], [reach, reach], [reach, reach]], constant_values=-1)
    height, width = tf.shape(cells)[1], tf.shape(cells)[2]
    targets, inside = [], []
    for dy, dx in offsets:
        other = padded[:, reach + dy : reach + dy + height, reach + dx : reach + dx + width]
        targets.append(tf.logical_and(cells > 0, tf.equal(cells, other)))
        inside.append(other >= 0)
    return tf.cast(tf.stack(targets, -1), tf.float32), tf.cast(tf.stack(inside, -1), tf.float32)


def training_loss(name: str, affinity_offsets=()):
    """The loss ``--loss`` names, of the membrane channel; with ``affinity_offsets`` plus the binary
    cross-entropy of the affinity channels (output channels 1...) against :func:`affinity_targets` of the cell
    ids in the targets' last channel, averaged over the pairs inside the crop."""
    membrane_loss = get_loss(name)
    if not affinity_offsets:
        return membrane_loss
    offsets = tuple(tuple(offset) for offset in affinity_offsets)

    def loss(y_true, y_pred):
        membrane = membrane_loss(y_true[..., :-1], y_pred[..., :1])
        targets, inside = affinity_targets(y_true[..., -1], offsets)
        predicted = ops.clip(ops.cast(y_pred[..., 1:], "float32"), 1e-7, 1.0 - 1e-7)
        pixel = -(targets * ops.log(predicted) + (1.0 - targets) * ops.log(1.0 - predicted)) * inside
        pairs = ops.maximum(ops.sum(inside, axis=_per_example(y_pred)), 1.0)
        return membrane + ops.sum(pixel, axis=_per_example(y_pred)) / pairs

    loss.__name__ = f"{name}_and_affinities"
    return loss


def pixel_accuracy(y_true, y_pred):
    """Fraction of pixels whose thresholded (0.5) prediction equals the membrane target."""
    y_true = ops.cast(_membrane(y_true), "float32")
    y_pred = _membrane(y_pred)
    return ops.mean(
        ops.cast(ops.equal(y_true, ops.cast(y_pred > 0.5, "float32")), "float32"), axis=_per_example(y_pred)
    )


def dice(y_true, y_pred):
    """Dice of the thresholded (0.5) membrane prediction."""
    return soft_dice(y_true, ops.cast(_membrane(y_pred) > 0.5, "float32"), smooth=1e-6)


def metrics() -> list:
    return [
        keras.metrics.MeanMetricWrapper(pixel_accuracy, name="pixel_accuracy"),
        keras.metrics.MeanMetricWrapper(dice, name="dice"),
    ]


def border_weight_map(membrane_target: np.ndarray, w0: float = 10.0, sigma_px: float = 5.0) -> np.ndarray:
    """The U-Net paper's weight map for one slice (1 = membrane target): w_c + w0 exp(-(d1 + d2)^2 / 2 sigma^2).

    w_c balances the class frequencies (each class carries half the total weight);
    d1 and d2 are the distances (pixels) to the nearest and second-nearest cell (4-connected
    component of non-membrane pixels). The border term is added on membrane pixels, where
    touching cells must be separated. Distances are computed in windows of 4 sigma around
    each cell, beyond which the term is below 1e-3 * w0.
    """
    membrane = membrane_target > 0.5
    n = membrane.size
    n_membrane = int(membrane.sum())
    class_weight = np.where(membrane, n / (2.0 * max(n_membrane, 1)), n / (2.0 * max(n - n_membrane, 1)))
    cells = label(~membrane, connectivity=1)
    reach = int(np.ceil(4 * sigma_px))
    d1 = np.full(membrane.shape, np.inf)
    d2 = np.full(membrane.shape, np.inf)
    for index, box in enumerate(ndimage.find_objects(cells), start=1):
        if box is None:
            continue
        window = tuple(
            slice(max(s.start - reach, 0), min(s.stop + reach, size)) for s, size in zip(box, membrane.shape)
        )
        distance = ndimage.distance_transform_edt(cells[window] != index)
        near, second = d1[window], d2[window]
        d2[window] = np.where(distance < near, near, np.minimum(second, distance))
        d1[window] = np.minimum(near, distance)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma_px**2))
    return (class_weight + np.where(membrane, border, 0.0)).astype(np.float32)
