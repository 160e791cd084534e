import numpy as np
import pytest
import scipy.ndimage as ndi
import tensorflow as tf

from em_unet.training.augment import (
    RNG,
    AugmentConfig,
    _spline_prefilter_matrix,
    augment_batch,
    elastic_displacement_field,
    import_elasticdeform,
    random_control_displacement,
    resample,
    resolve_placement,
)

PY_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc", "NumpyFunction"}
ELASTIC_ONLY = AugmentConfig(
    rotation_degrees=0,
    scale_range=(1, 1),
    shear_degrees=0,
    translation_px=0,
    flips=False,
    brightness=0,
    contrast_range=(1, 1),
)
GEOMETRY_ONLY = AugmentConfig(brightness=0, contrast_range=(1, 1))


def smooth_images(batch=2, height=96, width=80, seed=0, blur_px=4):
    rng = np.random.default_rng(seed)
    images = np.stack([ndi.gaussian_filter(rng.random((height, width)), blur_px) for _ in range(batch)])
    images = (images - images.min()) / (images.max() - images.min())
    return images[..., None].astype(np.float32)


def graph_op_types(concrete_function):
    graph = concrete_function.graph
    ops = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        ops |= {node.op for node in function.node_def}
    return ops


def test_prefilter_equals_scipy_spline_filter():
    control = np.random.default_rng(0).normal(size=(4, 4))
    matrix = _spline_prefilter_matrix(4)
    assert np.allclose(matrix @ control @ matrix.T, ndi.spline_filter(control, order=3, mode="mirror"), atol=1e-5)


def test_matches_elasticdeform_for_same_displacement():
    elasticdeform = import_elasticdeform()
    images = smooth_images(batch=3)
    masks = (images > 0.5).astype(np.float32)
    seed = tf.constant([3, 4], tf.int64)
    ours_images, ours_masks = augment_batch(images, masks, seed, ELASTIC_ONLY)
    # augment_batch draws its elastic field from the second of three split seeds
    control = random_control_displacement(
        tf.random.experimental.stateless_split(seed, 3, alg=RNG)[1], 3, ELASTIC_ONLY
    ).numpy()
    assert np.abs(control).max() > 5  # a real deformation, sigma 10 px
    for i in range(3):
        ref_image = elasticdeform.deform_grid(images[i, ..., 0], control[i], order=1, mode="mirror")
        ref_mask = elasticdeform.deform_grid(masks[i, ..., 0], control[i], order=0, mode="mirror")
        assert np.abs(ours_images[i, ..., 0].numpy() - ref_image).mean() < 1e-3
        assert (ours_masks[i, ..., 0].numpy() == ref_mask).mean() >= 0.995
        assert np.abs(ref_image - images[i, ..., 0]).mean() > 1e-2  # the images did move


def test_elasticdeform_backend_agrees_with_tensorflow_backend():
    import dataclasses

    images = smooth_images(batch=2, height=64, width=64)
    masks = (images > 0.5).astype(np.float32)
    reference = dataclasses.replace(ELASTIC_ONLY, elastic_backend="elasticdeform")
    ours = augment_batch(images, masks, [1, 2], ELASTIC_ONLY)
    theirs = augment_batch(images, masks, [1, 2], reference)
    assert np.abs(ours[0].numpy() - theirs[0].numpy()).mean() < 1e-3
    assert (ours[1].numpy() == theirs[1].numpy()).mean() >= 0.995


def test_mask_stays_aligned_with_image():
    rows, cols = np.mgrid[0:128, 0:128]
    image = (0.5 + 0.5 * np.sin(cols / 16.0) * np.cos(rows / 20.0)).astype(np.float32)
    images = np.repeat(image[None, ..., None], 4, axis=0)
    masks = (images > 0.5).astype(np.float32)
    out_images, out_masks = augment_batch(images, masks, [7, 8], GEOMETRY_ONLY)
    thresholded = out_images.numpy() > 0.5
    assert (thresholded == (out_masks.numpy() > 0.5)).mean() >= 0.99
    # a mask off by one pixel would fail the same check
    assert (thresholded[:, :, 1:] == (out_masks.numpy()[:, :, :-1] > 0.5)).mean() < 0.99
    assert not np.allclose(out_images.numpy(), images)
    assert set(np.unique(out_masks.numpy())) <= {0.0, 1.0}


def test_reproducible_and_each_example_its_own_transform():
    images = np.repeat(smooth_images(batch=1), 3, axis=0)
    masks = (images > 0.5).astype(np.float32)
    a = augment_batch(images, masks, [5, 6])[0].numpy()
    b = augment_batch(images, masks, [5, 6])[0].numpy()
    c = augment_batch(images, masks, [5, 7])[0].numpy()
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])


def test_intensity_changes_image_only_and_stays_in_unit_range():
    images = smooth_images(batch=2)
    masks = (images > 0.5).astype(np.float32)
    config = AugmentConfig(
        rotation_degrees=0,
        scale_range=(1, 1),
        shear_degrees=0,
        translation_px=0,
        flips=False,
        elastic=False,
        brightness=0.2,
        contrast_range=(0.5, 1.5),
    )
    out_images, out_masks = augment_batch(images, masks, [1, 1], config)
    assert np.array_equal(out_masks.numpy(), masks)
    assert not np.allclose(out_images.numpy(), images)
    assert 0.0 <= out_images.numpy().min() and out_images.numpy().max() <= 1.0


def test_identity_transform_changes_nothing():
    images = smooth_images(batch=2)
    masks = (images > 0.5).astype(np.float32)
    config = AugmentConfig(
        rotation_degrees=0,
        scale_range=(1, 1),
        shear_degrees=0,
        translation_px=0,
        flips=False,
        elastic=False,
        brightness=0,
        contrast_range=(1, 1),
    )
    out_images, out_masks = augment_batch(images, masks, [0, 0], config)
    assert np.allclose(out_images.numpy(), images, atol=1e-6)
    assert np.array_equal(out_masks.numpy(), masks)


def test_mirrored_borders():
    image = np.arange(5, dtype=np.float32)[None, None, :, None] * np.ones((1, 3, 1, 1), np.float32)
    cols = np.array([[-1.0, -2.0, 4.0, 5.0, 6.0]], np.float32)[:, None, :] * np.ones((1, 3, 1), np.float32)
    rows = np.zeros_like(cols)
    out, _ = resample(image, image, rows, cols)
    assert out[0, 0, :, 0].numpy().tolist() == [1.0, 2.0, 4.0, 3.0, 2.0]


def test_traced_graph_has_no_python_ops():
    spec_images = tf.TensorSpec([None, None, None, 1], tf.float32)
    ours = tf.function(lambda i, m, s: augment_batch(i, m, s)).get_concrete_function(
        spec_images, spec_images, tf.TensorSpec([2], tf.int64)
    )
    ops = graph_op_types(ours)
    assert "GatherV2" in ops and not ops & PY_OPS
    # the same inspection does see the host-side reference op
    reference = AugmentConfig(elastic_backend="elasticdeform")
    fixed = tf.TensorSpec([2, 32, 32, 1], tf.float32)
    theirs = tf.function(lambda i, m, s: augment_batch(i, m, s, reference)).get_concrete_function(
        fixed, fixed, tf.TensorSpec([2], tf.int64)
    )
    assert graph_op_types(theirs) & PY_OPS


def test_dense_field_interpolates_control_points():
    control = np.zeros((1, 2, 3, 3), np.float32)
    control[0, 0, 1, 1] = 10.0
    field = elastic_displacement_field(control, 33, 33).numpy()
    assert abs(field[0, 0, 16, 16] - 10.0) < 1e-4  # control point 1 sits at pixel 16
    assert abs(field[0, 0, 0, 0]) < 1e-4 and np.abs(field[0, 1]).max() < 1e-6


def test_placement_auto_is_pipeline_without_gpu():
    assert not tf.config.list_physical_devices("GPU")
    assert resolve_placement("auto") == "pipeline"
    assert resolve_placement("step") == "step"
    with pytest.raises(ValueError):
        resolve_placement("gpu")


SECTIONS_OFF = dict(z_flips=False, missing_sections=0.0, misaligned_sections=0.0, section_jitter=0.0)


def z_patches(batch=4, sections=5, size=96):
    """Smooth sections, each a little different, and their masks (image > 0.5)."""
    rows, cols = np.mgrid[0:size, 0:size]
    stack = [0.5 + 0.5 * np.sin(cols / (16.0 + z)) * np.cos(rows / (20.0 + z)) for z in range(sections)]
    images = np.repeat(np.stack(stack)[None, ..., None], batch, axis=0).astype(np.float32)
    return images, (images > 0.5).astype(np.float32)


def test_3d_crops_share_one_transform_for_every_section_and_its_mask():
    images, masks = z_patches()
    out_images, out_masks = (
        a.numpy()
        for a in augment_batch(
            images, masks, [3, 4], AugmentConfig(brightness=0, contrast_range=(1, 1), **SECTIONS_OFF)
        )
    )
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    thresholded = out_images > 0.5
    assert (thresholded == (out_masks > 0.5)).mean() >= 0.99
    assert (thresholded[:, :, :, 1:] == (out_masks[:, :, :, :-1] > 0.5)).mean() < 0.99  # one pixel off fails
    # one 2-D transform for all sections: the same as augmenting the sections as channels of a 2-D crop
    planar, _ = augment_batch(
        np.moveaxis(images[..., 0], 1, -1),
        masks[:, 2],
        [3, 4],
        AugmentConfig(brightness=0, contrast_range=(1, 1), **SECTIONS_OFF),
    )
    assert np.allclose(np.moveaxis(planar.numpy(), -1, 1), out_images[..., 0], atol=1e-6)


def test_section_transforms_each_do_what_they_say_and_can_be_switched_off():
    images, masks = z_patches(batch=16)
    base = dict(
        rotation_degrees=0,
        scale_range=(1, 1),
        shear_degrees=0,
        translation_px=0,
        flips=False,
        elastic=False,
        brightness=0,
        contrast_range=(1, 1),
    )
    untouched, _ = augment_batch(images, masks, [1, 2], AugmentConfig(**base, **SECTIONS_OFF))
    assert np.allclose(untouched.numpy(), images, atol=1e-6)
    flips, flipped_masks = (
        a.numpy()
        for a in augment_batch(images, masks, [1, 2], AugmentConfig(**base, **{**SECTIONS_OFF, "z_flips": True}))
    )
    reversed_ = [np.allclose(f, images[0, ::-1], atol=1e-6) for f in flips]
    assert 2 <= sum(reversed_) <= 14 and all(
        r or np.allclose(f, images[0], atol=1e-6) for r, f in zip(reversed_, flips)
    )
    assert all(np.array_equal(m > 0.5, f > 0.5) for m, f in zip(flipped_masks, flips))  # masks flipped with them
    blank, _ = augment_batch(images, masks, [1, 2], AugmentConfig(**base, **{**SECTIONS_OFF, "missing_sections": 1.0}))
    blanked = (blank.numpy().max(axis=(2, 3, 4)) == 0).sum(axis=1)
    assert blanked.tolist() == [1] * 16  # one section per crop
    moved, moved_masks = (
        a.numpy()
        for a in augment_batch(
            images,
            masks,
            [1, 2],
            AugmentConfig(**base, **{**SECTIONS_OFF, "misaligned_sections": 1.0, "misalign_px": 6}),
        )
    )
    for crop, crop_masks in zip(moved, moved_masks):
        changed = [not np.allclose(section, original, atol=1e-6) for section, original in zip(crop, images[0])]
        first = changed.index(True) if any(changed) else None
        if first is not None:  # a slab: every section from the cut on, and the labels moved with them
            assert changed == [False] * first + [True] * (5 - first) and first >= 1
        assert np.array_equal(crop_masks > 0.5, crop > 0.5)
    jitter, _ = augment_batch(images, masks, [1, 2], AugmentConfig(**base, **{**SECTIONS_OFF, "section_jitter": 0.1}))
    means = jitter.numpy().mean(axis=(2, 3, 4)) - images.mean(axis=(2, 3, 4))
    assert np.abs(means).max() <= 0.1 + 1e-3 and np.std(means) > 0.01  # each section its own shift
    # 2.5-D: the misaligned slab never holds the middle section, whose labels are the target
    planar_images = np.moveaxis(images[..., 0], 1, -1)
    moved, _ = augment_batch(
        planar_images,
        masks[:, 2],
        [5, 6],
        AugmentConfig(**base, **{**SECTIONS_OFF, "misaligned_sections": 1.0, "misalign_px": 6}),
    )
    assert np.allclose(moved.numpy()[..., 2], planar_images[..., 2], atol=1e-6)
    assert not np.allclose(moved.numpy(), planar_images, atol=1e-6)
