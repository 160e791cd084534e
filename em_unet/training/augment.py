"""Augmentation of EM image/mask batches in pure TensorFlow ops.

One resampling pass per batch: every output pixel ``o`` (row, column) is read
from the input at ``A(o) + d(o)``, where ``A`` is a random affine transform about
the patch centre (rotation, scale, shear, translation, flips) and ``d`` is an
elastic displacement field. Images are sampled bilinearly, masks by nearest
neighbour, both with mirrored borders, so image and mask always share the
transform. Brightness and contrast then change the image only.

The elastic field follows elasticdeform's ``deform_grid``: a coarse grid of
control points (``elastic_points`` x ``elastic_points``) with displacements drawn
from N(0, sigma^2) pixels, spline-prefiltered and interpolated to every pixel
with cubic B-splines (mirrored at the grid's edges), control point ``k`` sitting
at pixel ``k * (size - 1) / (points - 1)``.

Every random draw uses ``tf.random.stateless_*`` keyed by a seed of shape (2,):
the same seed gives the same batch; each example in a batch gets its own
transform. No Python callbacks end up in the graph, so the same function runs
in a ``tf.data`` map on the CPU or inside the training step on an accelerator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import tensorflow as tf

from em_unet.errors import DependencyError

# One fixed algorithm: "auto_select" differs between XLA and plain TF, which would break reproducibility.
RNG = "philox"

# Where augmentation runs (--augment-placement): in the tf.data pipeline or inside the training step (the
# training assembly does either); "auto" picks one for this machine (resolve_placement). The elastic
# backends (--elastic-backend) are ELASTIC_BACKENDS, at the end of this module.
PLACEMENTS = ("auto", "pipeline", "step")

ELASTICDEFORM_FIX = "pip install --force-reinstall --no-binary elasticdeform elasticdeform"


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms. Angles in degrees, lengths in pixels.

    ``elastic_backend="elasticdeform"`` uses elasticdeform's host-side TF op
    (a ``tf.py_function``) as a reference; it cannot run on a GPU nor be saved.
    """

    rotation_degrees: float = 180.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    shear_degrees: float = 5.0
    translation_px: float = 8.0
    flips: bool = True
    elastic: bool = True
    elastic_points: int = 3
    elastic_sigma_px: float = 10.0
    elastic_backend: str = "tensorflow"
    brightness: float = 0.1
    contrast_range: tuple[float, float] = (0.8, 1.2)
    z_flips: bool = True
    missing_sections: float = 0.05
    misaligned_sections: float = 0.1
    misalign_px: float = 8.0
    section_jitter: float = 0.05

    def __post_init__(self):
        if self.elastic_backend not in ELASTIC_BACKENDS:
            raise ValueError(f"elastic_backend must be one of {tuple(ELASTIC_BACKENDS)}, got {self.elastic_backend!r}")
        if self.elastic_points < 1:
            raise ValueError(f"elastic_points must be >= 1, got {self.elastic_points}")
        if self.elastic and self.elastic_backend == "elasticdeform":
            import_elasticdeform()  # fail at configuration time with the one-line fix

    def to_dict(self) -> dict:
        return asdict(self)


def import_elasticdeform():
    """Import ``elasticdeform.tf``, turning a broken install into a one-line fix."""
    try:
        # lazy: the reference backend only, and a broken install becomes a one-line fix
        import elasticdeform
        import elasticdeform.tf  # noqa: F401
    except ImportError as err:
        raise DependencyError(
            f"elasticdeform cannot be imported ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            f"its PyPI wheel was built for NumPy 1, rebuild it with: {ELASTICDEFORM_FIX}"
        ) from None
    return elasticdeform


def resolve_placement(placement: str) -> str:
    """Where augmentation runs: ``"step"`` (inside the training step) or ``"pipeline"`` (tf.data map).

    ``"auto"`` chooses the training step when a GPU is visible, the pipeline otherwise.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"augmentation placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "auto":
        return "step" if tf.config.list_physical_devices("GPU") else "pipeline"
    return placement


# ---------------------------------------------------------------- elastic field


def _mirror_index(index, length: int):
    """Mirror integer indices into [0, length - 1] about the end samples (scipy's 'mirror')."""
    if length <= 1:
        return tf.zeros_like(index)
    period = 2 * length - 2
    index = tf.math.floormod(index, period)
    return tf.where(index >= length, period - index, index)


def _spline_prefilter_matrix(points: int) -> np.ndarray:
    """Matrix that turns samples into cubic B-spline coefficients with mirrored borders.

    Equal to ``scipy.ndimage.spline_filter1d(order=3, mode="mirror")`` on ``points`` samples.
    """
    sampling = np.zeros((points, points))
    for i in range(points):
        for offset, weight in ((-1, 1 / 6), (0, 4 / 6), (1, 1 / 6)):
            j = i + offset
            if points > 1:
                j = abs(j) if j < 0 else (2 * points - 2 - j if j >= points else j)
            else:
                j = 0
            sampling[i, j] += weight
    return np.linalg.inv(sampling).astype(np.float32)


def _bspline_interpolation_matrix(size, points: int):
    """(size, points) matrix of cubic B-spline weights placing control points across ``size`` pixels."""
    pixel = tf.cast(tf.range(size), tf.float32)
    span = tf.cast(tf.maximum(size - 1, 1), tf.float32)
    position = (points - 1) * pixel / span
    start = tf.floor(position)
    x = position - start
    z = 1.0 - x
    w0 = z * z * z / 6.0
    w1 = (x * x * (x - 2.0) * 3.0 + 4.0) / 6.0
    w2 = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0
    w3 = 1.0 - w0 - w1 - w2
    start = tf.cast(start, tf.int32) - 1
    matrix = 0.0
    for k, weight in enumerate((w0, w1, w2, w3)):
        index = _mirror_index(start + k, points)
        matrix += tf.one_hot(index, points, dtype=tf.float32) * weight[:, None]
    return matrix


def elastic_displacement_field(control_displacement, height, width):
    """Dense displacement (pixels) from control-point displacements.

    Args:
        control_displacement: float32 ``(batch, 2, points, points)``; index 0 of
            axis 1 moves along rows, 1 along columns (elasticdeform's layout).
        height, width: output size in pixels.

    Returns:
        float32 ``(batch, 2, height, width)``.
    """
    control_displacement = tf.convert_to_tensor(control_displacement, tf.float32)
    points = control_displacement.shape[-1]
    prefilter = tf.constant(_spline_prefilter_matrix(points))
    coefficients = tf.einsum("ip,bkpq,jq->bkij", prefilter, control_displacement, prefilter)
    rows = _bspline_interpolation_matrix(height, points)
    cols = _bspline_interpolation_matrix(width, points)
    return tf.einsum("hp,bkpq,wq->bkhw", rows, coefficients, cols)


# ---------------------------------------------------------------- resampling


def _mirror_coordinate(position, length):
    """Mirror fractional positions into [0, length - 1] about the end samples (elasticdeform's 'mirror')."""
    span = tf.cast(tf.maximum(length - 1, 1), position.dtype)
    position = tf.math.floormod(position, 2.0 * span)
    return tf.where(position > span, 2.0 * span - position, position)


def resample(images, masks, rows, cols):
    """Read ``images`` bilinearly and ``masks`` by nearest neighbour at fractional positions.

    Args:
        images: float ``(batch, height, width, c_img)``.
        masks: float ``(batch, height, width, c_mask)``.
        rows, cols: float32 ``(batch, height, width)`` source positions in pixels;
            positions outside the image are mirrored back in.

    Returns:
        ``(images, masks)`` resampled, shapes and dtypes unchanged.
    """
    images = tf.convert_to_tensor(images)
    masks = tf.convert_to_tensor(masks)
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    image_channels = images.shape[-1]
    stacked = tf.concat([images, tf.cast(masks, images.dtype)], axis=-1)
    channels = stacked.shape[-1]
    if image_channels is None or channels is None:
        raise ValueError("resample needs images and masks with a known number of channels")

    # Each pixel carries its 2x2 neighbourhood, so one gather fetches all four corners.
    padded = tf.pad(stacked, [[0, 0], [0, 1], [0, 1], [0, 0]], mode="SYMMETRIC")
    quads = tf.concat([padded[:, :-1, :-1], padded[:, :-1, 1:], padded[:, 1:, :-1], padded[:, 1:, 1:]], axis=-1)
    quads = tf.reshape(quads, [-1, 4 * channels])

    rows = _mirror_coordinate(rows, height)
    cols = _mirror_coordinate(cols, width)
    row0 = tf.floor(rows)
    col0 = tf.floor(cols)
    row_frac = (rows - row0)[..., None]
    col_frac = (cols - col0)[..., None]
    index = tf.cast(row0, tf.int32) * width + tf.cast(col0, tf.int32)
    index += (tf.range(batch) * (height * width))[:, None, None]
    corners = tf.gather(quads, index)
    top_left, top_right, bottom_left, bottom_right = tf.split(corners, 4, axis=-1)

    row_weight = tf.cast(row_frac, stacked.dtype)
    col_weight = tf.cast(col_frac, stacked.dtype)
    image_corners = [c[..., :image_channels] for c in (top_left, top_right, bottom_left, bottom_right)]
    top = image_corners[0] + (image_corners[1] - image_corners[0]) * col_weight
    bottom = image_corners[2] + (image_corners[3] - image_corners[2]) * col_weight
    bilinear = top + (bottom - top) * row_weight

    # Nearest neighbour is the corner the fractions round to: floor(x + 0.5).
    mask_corners = [c[..., image_channels:] for c in (top_left, top_right, bottom_left, bottom_right)]
    right = col_frac >= 0.5
    nearest = tf.where(
        row_frac >= 0.5,
        tf.where(right, mask_corners[3], mask_corners[2]),
        tf.where(right, mask_corners[1], mask_corners[0]),
    )
    return bilinear, tf.cast(nearest, masks.dtype)


# ---------------------------------------------------------------- random transforms


def random_affine_matrices(seed, batch, config: AugmentConfig):
    """Per-example 2x2 matrices and translations (pixels) acting on (row, col) offsets from the centre."""
    seeds = tf.random.experimental.stateless_split(seed, 6, alg=RNG)
    degrees = config.rotation_degrees
    theta = tf.random.stateless_uniform([batch], seeds[0], -degrees, degrees, alg=RNG) * (math.pi / 180.0)
    scale = tf.random.stateless_uniform([batch], seeds[1], config.scale_range[0], config.scale_range[1], alg=RNG)
    shear = tf.math.tan(
        tf.random.stateless_uniform([batch], seeds[2], -config.shear_degrees, config.shear_degrees, alg=RNG)
        * (math.pi / 180.0)
    )
    if config.flips:
        flip = tf.where(tf.random.stateless_uniform([batch, 2], seeds[3], alg=RNG) < 0.5, -1.0, 1.0)
    else:
        flip = tf.ones([batch, 2])
    shift = config.translation_px
    translation = tf.random.stateless_uniform([batch, 2], seeds[4], -shift, shift, alg=RNG)
    cos, sin = tf.cos(theta), tf.sin(theta)
    rotation = tf.reshape(tf.stack([cos, -sin, sin, cos], axis=-1), [batch, 2, 2])
    shearing = tf.reshape(
        tf.stack([tf.ones_like(shear), shear, tf.zeros_like(shear), tf.ones_like(shear)], axis=-1), [batch, 2, 2]
    )
    scaling = tf.linalg.diag(flip / scale[:, None])
    return rotation @ shearing @ scaling, translation


def random_control_displacement(seed, batch, config: AugmentConfig):
    """Control-point displacements (pixels) drawn from N(0, sigma^2): ``(batch, 2, points, points)``."""
    points = config.elastic_points
    return tf.random.stateless_normal([batch, 2, points, points], seed, stddev=config.elastic_sigma_px, alg=RNG)


def random_intensity(seed, batch, config: AugmentConfig):
    """Per-example contrast factors and brightness offsets, each ``(batch,)``."""
    seeds = tf.random.experimental.stateless_split(seed, 2, alg=RNG)
    contrast = tf.random.stateless_uniform([batch], seeds[0], *config.contrast_range, alg=RNG)
    brightness = tf.random.stateless_uniform([batch], seeds[1], -config.brightness, config.brightness, alg=RNG)
    return contrast, brightness


def adjust_intensity(images, contrast, brightness):
    """Contrast about each image's mean, then additive brightness; clipped to [0, 1]."""
    contrast = contrast[:, None, None, None]
    brightness = brightness[:, None, None, None]
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    return tf.clip_by_value((images - mean) * contrast + mean + brightness, 0.0, 1.0)


def _elasticdeform_reference(images, masks, control_displacement):
    """Elastic step through elasticdeform's host op (reference backend), one example at a time."""
    elasticdeform = import_elasticdeform()

    def one(args):
        image, mask, displacement = args
        image_out, mask_out = elasticdeform.tf.deform_grid(
            [image, mask], displacement, order=[1, 0], mode="mirror", axis=(0, 1), prefilter=False
        )
        return image_out, mask_out

    image_out, mask_out = tf.map_fn(
        one,
        (images, masks, control_displacement),
        fn_output_signature=(
            tf.TensorSpec(images.shape[1:], images.dtype),
            tf.TensorSpec(masks.shape[1:], masks.dtype),
        ),
    )
    return image_out, mask_out


def augment_batch(images, masks, seed, config: AugmentConfig | None = None):
    """Augment a batch: one affine + elastic resampling pass shared by image and mask, then intensity; with
    several sections (z-context), the section transforms after them (:func:`augment_sections`).

    Args:
        images: float32 ``(batch, height, width, sections)`` in [0, 1] (sections: 1, or the K sections of
            ``--z-context`` in z order), or ``(batch, z, height, width, 1)`` z-patches of a 3-D U-Net.
        masks: ``(batch, height, width, channels)`` labels (of the middle section), resampled by nearest
            neighbour; extra channels (e.g. loss weight maps) travel with the mask; with z-patches
            ``(batch, z, height, width, channels)``, each section's labels.
        seed: int ``(2,)`` tensor; the same seed gives the same output.
        config: transform ranges; defaults to :class:`AugmentConfig`.

    Returns:
        ``(images, masks)`` with the input shapes and dtypes. The spatial transform is one 2-D transform for all
        sections of a crop, as is usual for anisotropic stacks.
    """
    config = config or AugmentConfig()
    images = tf.convert_to_tensor(images, tf.float32)
    masks = tf.convert_to_tensor(masks)
    volumetric = len(images.shape) == 5
    if volumetric:
        images, masks = sections_as_channels(images, masks)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    batch = tf.shape(images)[0]
    affine_seed, elastic_seed, intensity_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3, alg=RNG))
    matrix, translation = random_affine_matrices(affine_seed, batch, config)
    control = random_control_displacement(elastic_seed, batch, config) if config.elastic else None
    contrast, brightness = random_intensity(intensity_seed, batch, config)
    transform = ELASTIC_BACKENDS[config.elastic_backend]
    images, masks = transform(images, masks, matrix, translation, control, contrast, brightness)
    if images.shape[-1] > 1:  # its own stream: 2-D crops augment as they did before z-context existed
        section_seed = tf.random.experimental.stateless_fold_in(seed, SECTION_STREAM, alg=RNG)
        images, masks = augment_sections(images, masks, section_seed, config, volumetric)
    if volumetric:
        images, masks = channels_as_sections(images, masks)
    return images, masks


SECTION_STREAM = 3  # folded into a batch's seed for the section transforms


def sections_as_channels(images, masks):
    """z-patches ``(b, z, h, w, 1)`` and their labels ``(b, z, h, w, c)`` as 2-D crops whose channels are the
    sections: ``(b, h, w, z)`` and ``(b, h, w, z * c)`` (section-major), so one 2-D transform moves them all."""
    sections, channels = images.shape[1], masks.shape[-1]
    images = tf.transpose(images[..., 0], [0, 2, 3, 1])
    masks = tf.transpose(masks, [0, 2, 3, 1, 4])
    shape = tf.shape(masks)
    return images, tf.reshape(masks, [shape[0], shape[1], shape[2], sections * channels])


def channels_as_sections(images, masks):
    """The inverse of :func:`sections_as_channels`."""
    sections = images.shape[-1]
    shape = tf.shape(masks)
    masks = tf.reshape(masks, [shape[0], shape[1], shape[2], sections, masks.shape[-1] // sections])
    return tf.transpose(images, [0, 3, 1, 2])[..., None], tf.transpose(masks, [0, 3, 1, 2, 4])


def _translated(stack, shift):
    """``stack`` (b, h, w, c) moved by whole pixels ``shift`` (b, 2: rows, columns), mirrored at the borders."""
    shape = tf.shape(stack)
    rows = _mirror_index(tf.range(shape[1])[None] - shift[:, :1], shape[1])
    cols = _mirror_index(tf.range(shape[2])[None] - shift[:, 1:], shape[2])
    stack = tf.gather(stack, rows, axis=1, batch_dims=1)
    return tf.gather(stack, cols, axis=2, batch_dims=1)


def augment_sections(images, masks, seed, config: AugmentConfig, volumetric: bool = False):
    """The EM-specific transforms of crops with several sections ``(b, h, w, K)`` (:func:`sections_as_channels`
    for z-patches, whose ``masks`` then hold each section's labels; else ``masks`` belong to the middle section):

    - z-flip: the sections' order reversed (``z_flips``, half the crops);
    - misaligned slab: with probability ``misaligned_sections``, the sections on one side of a random cut shifted
      together by up to ``misalign_px`` whole pixels (mirrored borders), their labels with them; for a middle
      section's labels, the slab is always the side without the middle section;
    - section jitter: each section's own brightness (+-``section_jitter``) and contrast (1 +- 2 x it);
    - missing section: with probability ``missing_sections``, one section blanked to 0.

    The draws are made here; :func:`apply_sections` applies them, compiled by XLA (as the affine pass).
    """
    sections = images.shape[-1]
    batch = tf.shape(images)[0]
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 8, alg=RNG))

    def chance(seed, probability):
        return tf.random.stateless_uniform([batch], seed, alg=RNG) < probability

    flip = slab = shift = brightness = contrast = blank = None
    if config.z_flips:
        flip = chance(seeds[0], 0.5)
    if config.misaligned_sections > 0 and config.misalign_px > 0:
        cut = tf.random.stateless_uniform([batch, 1], seeds[2], 1, sections, dtype=tf.int32, alg=RNG)
        index = tf.range(sections)[None]
        slab = index >= cut if volumetric else tf.where(cut > sections // 2, index >= cut, index < cut)
        slab = tf.logical_and(slab, chance(seeds[1], config.misaligned_sections)[:, None])
        reach = config.misalign_px
        shift = tf.cast(tf.round(tf.random.stateless_uniform([batch, 2], seeds[3], -reach, reach, alg=RNG)), tf.int32)
    if config.section_jitter > 0:
        jitter = config.section_jitter
        brightness = tf.random.stateless_uniform([batch, sections], seeds[4], -jitter, jitter, alg=RNG)
        contrast = tf.random.stateless_uniform([batch, sections], seeds[5], 1 - 2 * jitter, 1 + 2 * jitter, alg=RNG)
    if config.missing_sections > 0:
        which = tf.random.stateless_uniform([batch], seeds[7], 0, sections, dtype=tf.int32, alg=RNG)
        blank = tf.one_hot(which, sections, on_value=True, off_value=False)
        blank = tf.logical_and(blank, chance(seeds[6], config.missing_sections)[:, None])
    return _apply_sections_xla(images, masks, volumetric, flip, slab, shift, brightness, contrast, blank)


def apply_sections(
    images, masks, volumetric, flip=None, slab=None, shift=None, brightness=None, contrast=None, blank=None
):
    """Apply drawn section transforms (see :func:`augment_sections`; None: not applied): ``flip`` (b,) reverses
    the sections; ``slab`` (b, K) sections moved by ``shift`` (b, 2) whole pixels; ``brightness`` and ``contrast``
    (b, K) per section; ``blank`` (b, K) sections set to 0."""
    sections = images.shape[-1]
    if volumetric:
        shape, flat = tf.shape(masks), masks.shape[-1]
        masks = tf.reshape(masks, [shape[0], shape[1], shape[2], sections, flat // sections])
    if flip is not None:
        images = tf.where(flip[:, None, None, None], images[..., ::-1], images)
        if volumetric:
            masks = tf.where(flip[:, None, None, None, None], masks[..., ::-1, :], masks)
    if slab is not None:
        images = tf.where(slab[:, None, None, :], _translated(images, shift), images)
        if volumetric:
            moved = tf.reshape(
                _translated(tf.reshape(masks, [shape[0], shape[1], shape[2], flat]), shift), tf.shape(masks)
            )
            masks = tf.where(slab[:, None, None, :, None], moved, masks)
    if brightness is not None:
        mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
        images = (images - mean) * contrast[:, None, None, :] + mean + brightness[:, None, None, :]
        images = tf.clip_by_value(images, 0.0, 1.0)
    if blank is not None:
        images = tf.where(blank[:, None, None, :], 0.0, images)
    if volumetric:
        masks = tf.reshape(masks, [shape[0], shape[1], shape[2], flat])
    return images, masks


_apply_sections_xla = tf.function(apply_sections, jit_compile=True)


def apply_transforms(images, masks, matrix, translation, control=None, contrast=None, brightness=None):
    """Resample image and mask once at ``A(o) + d(o)``, then adjust the image's intensity.

    Args:
        images, masks: as in :func:`augment_batch`.
        matrix: ``(batch, 2, 2)`` affine matrices on (row, col) offsets from the centre.
        translation: ``(batch, 2)`` shifts in pixels.
        control: ``(batch, 2, points, points)`` elastic control displacements
            in pixels, or None for no elastic deformation.
        contrast, brightness: ``(batch,)`` intensity changes, or None for none.
    """
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    centre = tf.stack([tf.cast(height - 1, tf.float32), tf.cast(width - 1, tf.float32)]) / 2.0
    grid_rows, grid_cols = tf.meshgrid(
        tf.cast(tf.range(height), tf.float32) - centre[0],
        tf.cast(tf.range(width), tf.float32) - centre[1],
        indexing="ij",
    )
    offsets = tf.stack([grid_rows, grid_cols], axis=0)  # (2, H, W)
    source = tf.einsum("bij,jhw->bihw", matrix, offsets) + (centre[None] + translation)[:, :, None, None]
    if control is not None:
        source += elastic_displacement_field(control, height, width)
    images, masks = resample(images, masks, source[:, 0], source[:, 1])
    if contrast is not None:
        images = adjust_intensity(images, contrast, brightness)
    return images, masks


# XLA fuses the many per-pixel operations (about 2x faster on a CPU). The random
# draws stay outside: XLA's stateless normal differs from TensorFlow's.
_apply_transforms_xla = tf.function(apply_transforms, jit_compile=True)


def _apply_transforms_elasticdeform(images, masks, matrix, translation, control=None, contrast=None, brightness=None):
    """:func:`apply_transforms` with the elastic step through elasticdeform's host op (the reference)."""
    if control is None:
        return _apply_transforms_xla(images, masks, matrix, translation, control, contrast, brightness)
    images, masks = apply_transforms(images, masks, matrix, translation)
    images, masks = _elasticdeform_reference(images, masks, control)
    return adjust_intensity(images, contrast, brightness), masks


# The elastic backends by name (--elastic-backend; em_unet.config reads the names from here): each applies
# the transforms as apply_transforms does.
ELASTIC_BACKENDS = {"tensorflow": _apply_transforms_xla, "elasticdeform": _apply_transforms_elasticdeform}
