"""The tf.data pipelines that feed training: random crops, augmentation, validation tiles, the split of
slices into training and validation, the sections each sample reads with z-context (:func:`section_windows`),
and chunked volumes read lazily for training (stacks are read by :mod:`em_unet.io.stacks`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from em_unet.errors import DataError
from em_unet.io.stacks import MEMBRANE_VALUE, mirrored_sections, scale_to_unit
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


def _read_crops(images, targets, patch_size: int, sections: int, volumetric: bool):
    """A tf.data map function reading the crops of a window of ``sections`` (positions into the lazy views) at
    (row, col) from lazy views (on the host), laid out as :func:`_sample` says."""
    channels = targets.shape[3] if len(targets.shape) == 4 else 1
    target_shape = ((sections,) if volumetric else ()) + (patch_size, patch_size, channels)

    def read(window, row, col):
        rows, cols = slice(int(row), int(row) + patch_size), slice(int(col), int(col) + patch_size)
        image = np.stack([images[(int(z), rows, cols)] for z in window])
        chosen = window if volumetric else window[len(window) // 2 : len(window) // 2 + 1]
        target = np.stack([as_channels_last(targets[(int(z), rows, cols)][None])[0] for z in chosen])
        return image.astype(np.float32), target.astype(np.float32) if volumetric else target[0].astype(np.float32)

    def crop(window, row, col):
        image, target = tf.numpy_function(read, [window, row, col], (tf.float32, tf.float32), stateful=False)
        image = tf.ensure_shape(image, (sections, patch_size, patch_size))
        return _sample(image, tf.ensure_shape(target, target_shape), volumetric)

    return crop


def _crop_reader(images, targets, patch_size: int, sections: int, volumetric: bool):
    """``read(window, row, col)``: the sample of a window of ``sections`` (positions into ``images``) cropped at
    (row, col), laid out as :func:`_sample` says: in graph for arrays in memory, on the host for lazy views."""
    if not isinstance(images, np.ndarray):
        return _read_crops(images, targets, patch_size, sections, volumetric)
    image_stack = tf.constant(images, tf.float32)
    target_stack = tf.constant(as_channels_last(targets), tf.float32)

    def read(window, row, col):
        chosen = window if volumetric else window[sections // 2 : sections // 2 + 1]
        target = _window_crop(target_stack, chosen, row, col, patch_size)
        image = _window_crop(image_stack, window, row, col, patch_size)
        return _sample(image, target if volumetric else target[0], volumetric)

    return read


def _sample(sections, targets, volumetric: bool):
    """One training sample from its window's sections ``(K, y, x)``: ``(y, x, K)`` for the 2-D U-Net (the
    sections as channels), ``(K, y, x, 1)`` for a 3-D U-Net; ``targets`` as they are."""
    return (sections[..., None] if volumetric else tf.transpose(sections, [1, 2, 0])), targets


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


# ---------------------------------------------------------------- z-context


def contiguous_runs(slices: np.ndarray) -> list[np.ndarray]:
    """Positions in ``slices`` (ascending section numbers) grouped into runs of consecutive sections."""
    slices = np.asarray(slices)
    breaks = np.flatnonzero(np.diff(slices) != 1) + 1
    return np.split(np.arange(len(slices)), breaks)


def section_windows(slices: np.ndarray, z_context: int = 1, volumetric: bool = False) -> np.ndarray:
    """Which sections each training or validation sample reads: ``(samples, z_context)`` positions into
    ``slices`` (the section numbers of the training or of the validation block, ascending).

    Context never crosses from one block into another: a window is mirrored at the ends of its run of
    consecutive sections (so validation never sees a training section, nor training a validation one). With
    ``volumetric`` False (2-D, 2.5-D), one window per section, centred on it; with True (3-D z-patches), every
    window of ``z_context`` consecutive sections inside a run, or the run's one mirrored window when the run is
    shorter."""
    half = z_context // 2
    windows = []
    for run in contiguous_runs(slices):
        if not volumetric:
            offsets = np.arange(len(run))[:, None] + np.arange(-half, z_context - half)[None]
        else:
            starts = np.arange(max(1, len(run) - z_context + 1))
            offsets = starts[:, None] + np.arange(z_context)[None]
        windows.append(run[mirrored_sections(offsets, len(run))])
    return np.concatenate(windows).astype(np.int64)


def _window_crop(stack, window, row, col, patch_size: int):
    """``stack``'s sections ``window`` (static length) cropped at (row, col): ``(sections, patch, patch, ...)``;
    each section is cropped before it is copied."""
    return tf.stack([stack[window[k], row : row + patch_size, col : col + patch_size] for k in range(window.shape[0])])


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
    windows: np.ndarray | None = None,
    volumetric: bool = False,
) -> tf.data.Dataset:
    """Endless batches of random crops from random slices, optionally augmented.

    Batch ``n`` of the stream is a function of ``(seed, n)`` alone (stateless random draws keyed by the crop's
    and the batch's index), so a stream started at ``start_batch`` gives exactly the batches an uninterrupted
    one gives from there: a resumed training run sees what it would have seen.

    Args:
        images: float32 ``(z, y, x)`` in [0, 1] (the training slices only), or a lazy view of them.
        targets: ``(z, y, x)`` or ``(z, y, x, c)`` targets cropped and augmented
            with the images (channel 0 is the membrane target; further channels,
            such as loss weight maps, travel with it).
        patch_size: side of the square crops, in pixels.
        batch_size: crops per batch.
        seed: the same seed gives the same batches.
        augment: transform ranges, or None for no augmentation.
        start_batch: index of the first batch (0: the start of the stream).
        windows: the sections each sample reads (:func:`section_windows`); default one section each.
        volumetric: samples are z-patches of a 3-D U-Net, with every section's targets.

    Returns:
        A dataset of ``(images, targets)`` with shapes ``(batch, patch, patch, K)`` (K sections of the window,
        1 by default) and ``(batch, patch, patch, c)`` (the middle section's); with ``volumetric``
        ``(batch, K, patch, patch, 1)`` and ``(batch, K, patch, patch, c)``.
    """
    check_patch_size(images.shape, patch_size)
    height, width = images.shape[1:3]
    windows = np.arange(len(images))[:, None] if windows is None else np.asarray(windows)
    crop_seed, augment_seed = seed, seed + 1

    def origin(index):
        draw = tf.random.stateless_uniform([3], [crop_seed, index], 0, 2**30, dtype=tf.int64, alg=RNG)
        return draw[0] % len(windows), draw[1] % (height - patch_size + 1), draw[2] % (width - patch_size + 1)

    window_table = tf.constant(windows, tf.int64)
    read = _crop_reader(images, targets, patch_size, windows.shape[1], volumetric)

    def crop(index):
        w, row, col = origin(index)
        return read(window_table[w], row, col)

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
    images: np.ndarray,
    targets: np.ndarray,
    patch_size: int = 256,
    batch_size: int = 4,
    windows: np.ndarray | None = None,
    volumetric: bool = False,
) -> tf.data.Dataset:
    """Fixed, unaugmented crops of every window (:func:`section_windows`; default one section each) that cover
    every validation slice (the last crop in a row or column is flush with the edge), laid out as
    :func:`training_dataset`'s."""
    check_patch_size(images.shape, patch_size)
    windows = np.arange(len(images))[:, None] if windows is None else np.asarray(windows)
    rows = tile_origins(images.shape[1], patch_size)
    cols = tile_origins(images.shape[2], patch_size)
    crops = [(w, r, c) for w in range(len(windows)) for r in rows for c in cols]
    origins = tf.data.Dataset.from_tensor_slices(np.array(crops, np.int64))
    window_table = tf.constant(windows, tf.int64)
    read = _crop_reader(images, targets, patch_size, windows.shape[1], volumetric)
    dataset = origins.map(lambda o: read(window_table[o[0]], o[1], o[2]))
    if isinstance(images, np.ndarray):  # a chunked store is read again each epoch, never held in memory
        dataset = dataset.cache()
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
