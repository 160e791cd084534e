import numpy as np
import pytest

from em_unet.errors import DataError
from em_unet.training.augment import AugmentConfig
from em_unet.training.data import split_slices, training_dataset, validation_dataset


def synthetic(n=4, size=64, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size), dtype=np.float32)
    targets = (images > 0.7).astype(np.float32)
    return images, targets


def one_line(err):
    message = str(err.value)
    assert "\n" not in message
    return message


def test_slices_smaller_than_patch():
    images, targets = synthetic(size=64)
    with pytest.raises(DataError) as err:
        training_dataset(images, targets, patch_size=128)
    assert "patch size 128 px is larger than the slices (64 x 64 px)" in one_line(err)
    with pytest.raises(DataError):
        validation_dataset(images, targets, patch_size=128)


# ------------------------------------------------------------------ split and pipeline


def test_split_is_contiguous_block():
    train, val = split_slices(20, val_slices=(15, 19))
    assert val.tolist() == [15, 16, 17, 18, 19] and train.tolist() == list(range(15))
    train, val = split_slices(20, val_fraction=0.2)
    assert val.tolist() == [16, 17, 18, 19]
    with pytest.raises(DataError, match="outside the stack's slices 0-19"):
        split_slices(20, val_slices=(18, 25))


def batches(dataset, n):
    return [tuple(t.numpy() for t in batch) for batch in dataset.take(n)]


def test_training_dataset_shapes_and_reproducible():
    images, targets = synthetic()
    config = AugmentConfig()
    first = batches(training_dataset(images, targets, patch_size=32, batch_size=3, seed=5, augment=config), 3)
    again = batches(training_dataset(images, targets, patch_size=32, batch_size=3, seed=5, augment=config), 3)
    other = batches(training_dataset(images, targets, patch_size=32, batch_size=3, seed=6, augment=config), 3)
    assert first[0][0].shape == (3, 32, 32, 1) and first[0][1].shape == (3, 32, 32, 1)
    for (a, b), (c, d) in zip(first, again):
        assert np.array_equal(a, c) and np.array_equal(b, d)
    assert not np.array_equal(first[0][0], other[0][0])
    assert not np.array_equal(first[0][0], first[1][0])


def test_unaugmented_crops_come_from_the_stack():
    images, targets = synthetic(n=2, size=48)
    for image_batch, target_batch in batches(training_dataset(images, targets, patch_size=16, batch_size=4), 2):
        for image, target in zip(image_batch[..., 0], target_batch[..., 0]):
            assert np.array_equal(target, (image > 0.7).astype(np.float32))
            windows = np.lib.stride_tricks.sliding_window_view(images, (16, 16), axis=(1, 2))
            assert (windows == image).all(axis=(-1, -2)).any()


def test_extra_target_channels_travel_with_the_mask():
    images, targets = synthetic()
    weights = np.stack([targets, 1 + targets], axis=-1)
    image_batch, target_batch = batches(
        training_dataset(images, weights, patch_size=32, batch_size=2, augment=AugmentConfig()), 1
    )[0]
    assert target_batch.shape == (2, 32, 32, 2)
    assert np.array_equal(target_batch[..., 1], 1 + target_batch[..., 0])


def test_validation_crops_cover_every_slice():
    images, targets = synthetic(n=2, size=80)
    crops = batches(validation_dataset(images, targets, patch_size=32, batch_size=4), 100)
    image_crops = np.concatenate([b[0] for b in crops])
    assert image_crops.shape == (2 * 3 * 3, 32, 32, 1)  # origins 0, 32, 48 on each axis
    assert np.array_equal(image_crops[0, ..., 0], images[0, :32, :32])
    assert np.array_equal(image_crops[8, ..., 0], images[0, 48:, 48:])


def test_z_context_windows_never_cross_between_training_and_validation():
    """The no-leak rule: a window's sections all come from its own block, mirrored at the block's ends."""
    from em_unet.training.data import section_windows

    train, val = split_slices(20, val_slices=(8, 11))  # a validation block in the middle: two training runs
    for z_context in (3, 5, 9):
        for slices in (train, val):
            windows = section_windows(slices, z_context)
            assert windows.shape == (len(slices), z_context)
            assert np.array_equal(slices[windows[:, z_context // 2]], slices)  # centred on every section
            for window, centre in zip(slices[windows], slices):
                same_run = (centre < 8 and window.max() < 8) or (centre > 11 and window.min() > 11)
                assert same_run or slices is val, (window, centre)
                assert set(window) <= set(slices)
    assert val[section_windows(val, 5)].tolist()[0] == [10, 9, 8, 9, 10]  # mirrored at the block's first section
    assert train[section_windows(train, 3)].tolist()[7] == [6, 7, 6]  # the last section before the block
    volumetric = section_windows(train, 4, volumetric=True)
    assert volumetric.shape == (5 + 5, 4)  # 8 and 8 sections: 5 windows of 4 each
    assert all(np.array_equal(np.diff(train[w]), [1, 1, 1]) for w in volumetric)
    short = section_windows(np.arange(3), 6, volumetric=True)
    assert short.tolist() == [[0, 1, 2, 1, 0, 1]]  # a block shorter than the z-patch: one mirrored window


def test_z_context_samples_hold_the_window_and_the_middle_sections_targets():
    from em_unet.training.data import section_windows

    images, targets = synthetic(n=6, size=48)
    images = (images + np.arange(6)[:, None, None]).astype(np.float32)  # each section its own range
    windows = section_windows(np.arange(6), 3)
    image_batch, target_batch = batches(
        training_dataset(images, targets, patch_size=16, batch_size=8, windows=windows), 1
    )[0]
    assert image_batch.shape == (8, 16, 16, 3) and target_batch.shape == (8, 16, 16, 1)
    for image, target in zip(image_batch, target_batch):
        sections = np.floor(image.min(axis=(0, 1))).astype(int)
        middle = sections[1]
        assert sections.tolist() == windows[middle].tolist()
        assert np.array_equal(target[..., 0], ((image[..., 1] - middle) > 0.7).astype(np.float32))
    val_images, val_targets = batches(
        validation_dataset(images, targets, patch_size=48, batch_size=6, windows=windows), 1
    )[0]
    assert val_images.shape == (6, 48, 48, 3) and np.array_equal(val_images[:, ..., 1], images)
    volumetric = section_windows(np.arange(6), 4, volumetric=True)
    image_batch, target_batch = batches(
        training_dataset(images, targets, patch_size=16, batch_size=2, windows=volumetric, volumetric=True), 1
    )[0]
    assert image_batch.shape == (2, 4, 16, 16, 1) and target_batch.shape == (2, 4, 16, 16, 1)
    for image, target in zip(image_batch[..., 0], target_batch[..., 0]):
        sections = np.floor(image.min(axis=(1, 2))).astype(int)
        assert np.array_equal(np.diff(sections), [1, 1, 1])
        assert np.array_equal(target, ((image - sections[:, None, None]) > 0.7).astype(np.float32))
