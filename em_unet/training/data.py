"""The tf.data pipelines that feed training: random crops, augmentation, validation tiles, the split of
slices into training and validation, and chunked volumes read lazily for training (stacks are read by
:mod:`em_unet.io.stacks`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from em_unet.errors import DataError
from em_unet.io.stacks import MEMBRANE_VALUE, scale_to_unit
from em_unet.segmentation.affinities import cell_ids
from em_unet.training.augment import RNG, AugmentConfig, augment_batch
from em_unet.training.losses import border_weight_map

# ---------------------------------------------------------------- volumes read lazily for training


class LazyImages:
    """The float32 [0, 1] intensities of some slices of a chunked volume, read on demand: ``view[i, y0:y1,
    x0:x1]`` reads only that region of slice ``slices[i]``, scaled by the volume's (low, high) range."""

    def __init__(self, volume, slices: np.ndarray, low: float, high: float):
        self.volume, self.slices, self.low, self.high = volume, np.asarray(slices), low, high
        self.shape = (len(self.slices), *volume.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        z, *rest = index if isinstance(index, tuple) else (index,)
        return scale_to_unit(self.volume[(int(self.slices[z]), *rest)], self.low, self.high)


class LazyTargets:
    """Training targets (1 = membrane; with ``weighted`` the border weight map as channel 1; with ``cells`` the
    cell ids as the last channel: both computed per region read) of some slices of a chunked label volume, read
    on demand like :class:`LazyImages`. Cells are numbered within the region read, so a cell that leaves it and
    comes back counts as two there (the whole slice of a large volume is not read for one crop)."""

    def __init__(self, volume, slices: np.ndarray, convention: str, weighted: bool = False, cells: bool = False):
        self.volume, self.slices, self.weighted, self.cells = volume, np.asarray(slices), weighted, cells
        self.membrane = MEMBRANE_VALUE[convention]
        channels = 1 + weighted + cells
        self.shape = (len(self.slices), *volume.shape[1:]) + ((channels,) if channels > 1 else ())
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        z, *rest = index if isinstance(index, tuple) else (index,)
        target = (self.volume[(int(self.slices[z]), *rest)] == self.membrane).astype(np.float32)
        channels = [target]
        if self.weighted:
            channels.append(border_weight_map(target))
        if self.cells:
            channels.append(cell_ids(target).astype(np.float32))
        return channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)


def _read_crops(images, targets, patch_size: int):
    """A tf.data map function reading ``(z, row, col)`` crops from lazy views (on the host)."""
    channels = targets.shape[3] if len(targets.shape) == 4 else 1

    def read(z, row, col):
        index = (int(z), slice(int(row), int(row) + patch_size), slice(int(col), int(col) + patch_size))
        target = targets[index]
        return images[index][..., None], (target[..., None] if target.ndim == 2 else target)

    def crop(z, row, col):
        image, target = tf.numpy_function(read, [z, row, col], (tf.float32, tf.float32), stateful=False)
        return tf.ensure_shape(image, (patch_size, patch_size, 1)), tf.ensure_shape(
            target, (patch_size, patch_size, channels)
        )

    return crop


# ---------------------------------------------------------------- splitting


def split_slices(
    n_slices: int, val_slices: tuple[int, int] | None = None, val_fraction: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split slice indices into training and one contiguous validation block.

    Neighbouring sections are correlated, so a random split would leak: the
    validation slices are ``val_slices`` (first, last; inclusive) or, when only
    ``val_fraction`` is given, that fraction of the slices taken from the end.

    Returns:
        ``(train_slices, val_slices)`` as int arrays of slice indices.
    """
    if val_slices is not None and val_fraction is not None:
        raise ValueError("give val_slices or val_fraction, not both")
    if val_slices is None:
        fraction = 0.25 if val_fraction is None else val_fraction
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1, got {fraction}")
        n_val = max(1, int(round(n_slices * fraction)))
        first, last = n_slices - n_val, n_slices - 1
    else:
        first, last = val_slices
    if first < 0 or last >= n_slices or last < first:
        raise DataError(f"validation slices {first}-{last} are outside the stack's slices 0-{n_slices - 1}")
    val = np.arange(first, last + 1)
    train = np.setdiff1d(np.arange(n_slices), val)
    if train.size == 0:
        raise DataError(f"validation slices {first}-{last} leave no slice of 0-{n_slices - 1} for training")
    return train, val


# ---------------------------------------------------------------- tf.data


def as_channels_last(array: np.ndarray) -> np.ndarray:
    """``(z, y, x)`` -> ``(z, y, x, 1)``; arrays with a channel axis as they are."""
    return array[..., None] if array.ndim == 3 else array


def check_patch_size(shape: Sequence[int], patch_size: int) -> None:
    """Raise :class:`DataError` if ``patch_size`` (pixels) does not fit inside slices of ``shape`` (z, y, x)."""
    height, width = shape[1], shape[2]
    if patch_size > height or patch_size > width:
        raise DataError(
            f"patch size {patch_size} px is larger than the slices ({height} x {width} px): "
            f"choose a patch size of at most {min(height, width)} px"
        )


def training_dataset(
    images: np.ndarray,
    targets: np.ndarray,
    patch_size: int = 256,
    batch_size: int = 4,
    seed: int = 0,
    augment: AugmentConfig | None = None,
    start_batch: int = 0,
) -> tf.data.Dataset:
    """Endless batches of random crops from random slices, optionally augmented.

    Batch ``n`` of the stream is a function of ``(seed, n)`` alone (stateless random draws keyed by the crop's
    and the batch's index), so a stream started at ``start_batch`` gives exactly the batches an uninterrupted
    one gives from there: a resumed training run sees what it would have seen.

    Args:
        images: float32 ``(z, y, x)`` in [0, 1] (the training slices only).
        targets: ``(z, y, x)`` or ``(z, y, x, c)`` targets cropped and augmented
            with the images (channel 0 is the membrane target; further channels,
            such as loss weight maps, travel with it).
        patch_size: side of the square crops, in pixels.
        batch_size: crops per batch.
        seed: the same seed gives the same batches.
        augment: transform ranges, or None for no augmentation.
        start_batch: index of the first batch (0: the start of the stream).

    Returns:
        A dataset of ``(images, targets)`` with shapes ``(batch, patch, patch, 1)``
        and ``(batch, patch, patch, c)``.
    """
    check_patch_size(images.shape, patch_size)
    n_slices, height, width = images.shape[:3]
    crop_seed, augment_seed = seed, seed + 1

    def origin(index):
        draw = tf.random.stateless_uniform([3], [crop_seed, index], 0, 2**30, dtype=tf.int64, alg=RNG)
        return draw[0] % n_slices, draw[1] % (height - patch_size + 1), draw[2] % (width - patch_size + 1)

    if isinstance(images, np.ndarray):
        image_stack = tf.constant(as_channels_last(images), tf.float32)
        target_stack = tf.constant(as_channels_last(targets), tf.float32)

        def crop(index):
            z, row, col = origin(index)
            image = image_stack[z, row : row + patch_size, col : col + patch_size]
            target = target_stack[z, row : row + patch_size, col : col + patch_size]
            return image, target

    else:  # a volume larger than memory: the same crops, read from the chunked store
        read = _read_crops(images, targets, patch_size)

        def crop(index):
            return read(*origin(index))

    dataset = tf.data.Dataset.counter(start=start_batch * batch_size).map(crop, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if augment is not None:
        dataset = dataset.enumerate(start=start_batch).map(
            lambda index, batch: augment_batch(*batch, tf.stack([tf.constant(augment_seed, tf.int64), index]), augment),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return dataset.prefetch(tf.data.AUTOTUNE)


def tile_origins(size: int, patch_size: int) -> list[int]:
    """Start positions (pixels) of patches that cover ``size`` pixels; the last one is flush with the end."""
    starts = list(range(0, size - patch_size + 1, patch_size))
    if starts[-1] + patch_size < size:
        starts.append(size - patch_size)
    return starts


def validation_dataset(
    images: np.ndarray, targets: np.ndarray, patch_size: int = 256, batch_size: int = 4
) -> tf.data.Dataset:
    """Fixed, unaugmented crops that cover every validation slice (the last crop in a row or column is flush
    with the edge)."""
    check_patch_size(images.shape, patch_size)
    rows = tile_origins(images.shape[1], patch_size)
    cols = tile_origins(images.shape[2], patch_size)
    crops = [(z, r, c) for z in range(images.shape[0]) for r in rows for c in cols]
    if not isinstance(images, np.ndarray):  # read from the chunked store each epoch, never all in memory
        origins = tf.data.Dataset.from_tensor_slices(np.array(crops, np.int64))
        dataset = origins.map(lambda o: _read_crops(images, targets, patch_size)(o[0], o[1], o[2]))
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    images = as_channels_last(images)
    targets = as_channels_last(targets)
    image_crops = np.stack([images[z, r : r + patch_size, c : c + patch_size] for z, r, c in crops])
    target_crops = np.stack([targets[z, r : r + patch_size, c : c + patch_size] for z, r, c in crops])
    return tf.data.Dataset.from_tensor_slices((image_crops, target_crops)).batch(batch_size).prefetch(tf.data.AUTOTUNE)
