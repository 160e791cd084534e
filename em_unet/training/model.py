"""The U-Net: small building blocks and a builder that loops over levels.

``depth`` counts the contracting (max-pooling) levels; a bottleneck sits below
them. Level ``i`` (1-based) has ``base_filters * 2**(i-1)`` filters and the
bottleneck ``base_filters * 2**depth``. All convolutions use 'same' padding, so
the output has the input's height and width, and any input whose sides are
multiples of ``2**depth`` pixels works.

The 2-D U-Net (:func:`build_unet`; with ``--z-context K`` its K input channels are the sections around the one
it predicts) and the anisotropic 3-D U-Net (:func:`build_unet3d`, ``--model unet3d``) are the same loop over
levels (:func:`unet_body`), each level a kernel and a pooling (:class:`Level`).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from em_unet.config import TrainConfig
from em_unet.errors import ModelInputError
from em_unet.settings import check_value

UP_MODES = ("transpose", "bilinear")


def valid_side_lengths(size: int, depth: int) -> tuple[int, int]:
    """The nearest side lengths (pixels) at or below and above ``size`` that a depth-``depth`` U-Net takes."""
    step = 2**depth
    lower = max(step, (size // step) * step)
    upper = -(-size // step) * step
    return lower, max(upper, step)


def check_input_size(height: int, width: int, depth: int) -> None:
    """Raise :class:`ModelInputError` unless both sides (pixels) are multiples of ``2**depth``."""
    step = 2**depth
    for name, size in (("height", height), ("width", width)):
        if size is None:
            continue
        if size < step or size % step:
            lower, upper = valid_side_lengths(size, depth)
            nearest = f"{lower} or {upper}" if lower != upper else f"{lower}"
            raise ModelInputError(
                f"input {name} {size} px does not fit a depth-{depth} U-Net: sides must be multiples "
                f"of {step} px (nearest valid: {nearest})"
            )


def check_z_size(sections: int, step: int) -> None:
    """Raise :class:`ModelInputError` unless a 3-D U-Net's z-patch of ``sections`` is a positive multiple of
    ``step`` (2 per z-pooling, :func:`z_step`)."""
    if sections < step or sections % step:
        lower, upper = max(step, sections // step * step), -(-sections // step) * step
        nearest = f"{lower} or {upper}" if lower != upper else f"{lower}"
        raise ModelInputError(
            f"z-patch of {sections} sections does not fit this 3-D U-Net: it pools z {step.bit_length() - 1} "
            f"times, so z-patches must be multiples of {step} sections (nearest valid: {nearest})"
        )


@keras.saving.register_keras_serializable(package="em_unet")
class InputSizeCheck(layers.Layer):
    """Identity layer that rejects inputs whose sides are not multiples of ``2**depth`` (and, for a 3-D U-Net,
    whose z-patch is not a multiple of ``z_step`` sections).

    Static shapes are checked when the graph is traced (a Python error naming the
    size and the nearest valid sizes); dynamic shapes with a TensorFlow assertion,
    which is a plain TF op and survives SavedModel export. A 3-D U-Net's layer also keeps ``z_context``, the
    sections of the z-patches it was trained on (prediction reads windows of as many).
    """

    def __init__(self, depth: int, z_step: int = 0, z_context: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.depth, self.z_step, self.z_context = depth, z_step, z_context

    def call(self, inputs):
        volumetric = len(inputs.shape) == 5
        first = 2 if volumetric else 1
        height, width = inputs.shape[first], inputs.shape[first + 1]
        check_input_size(height, width, self.depth)
        sections = inputs.shape[1] if volumetric else 1
        if volumetric and sections is not None:
            check_z_size(sections, self.z_step)
        if height is not None and width is not None and sections is not None:
            return inputs
        step = 2**self.depth
        sides = tf.shape(inputs)[first : first + 2]
        tf.debugging.assert_equal(
            sides % step,
            tf.zeros_like(sides),
            message=f"U-Net depth {self.depth}: height and width (shown) must be multiples of {step} px",
        )
        if volumetric:
            tf.debugging.assert_equal(
                tf.shape(inputs)[1] % self.z_step,
                0,
                message=f"3-D U-Net: the z-patch (sections) must be a multiple of {self.z_step}",
            )
        return inputs

    def get_config(self):
        config = {**super().get_config(), "depth": self.depth}
        if self.z_step:
            config.update(z_step=self.z_step, z_context=self.z_context)
        return config


@keras.saving.register_keras_serializable(package="em_unet")
class AffinityHead(layers.Conv2D):
    """The output of an affinity U-Net: a 1x1 sigmoid convolution whose channel 0 is the membrane probability and
    channel 1 + c the affinity for offset c of ``affinity_offsets`` (``(dy, dx)`` pixels), which the layer
    keeps, so a saved model says what its channels mean."""

    def __init__(self, affinity_offsets, **kwargs):
        self.affinity_offsets = tuple(tuple(int(v) for v in offset) for offset in affinity_offsets)
        kwargs.update(filters=1 + len(self.affinity_offsets), kernel_size=1, activation="sigmoid")
        super().__init__(**kwargs)

    def get_config(self):
        config = super().get_config()
        for key in ("filters", "kernel_size", "activation"):
            config.pop(key, None)
        return {**config, "affinity_offsets": [list(offset) for offset in self.affinity_offsets]}


@dataclass(frozen=True)
class Level:
    """One level of a U-Net: its convolutions' ``kernel`` and the ``pool`` below it (voxels per axis; 2-D:
    (y, x), 3-D: (z, y, x)). The bottleneck is a level whose pool is not used."""

    kernel: tuple[int, ...]
    pool: tuple[int, ...]


def planar_levels(depth: int) -> list[Level]:
    """The 2-D U-Net's ``depth + 1`` levels: 3x3 convolutions, 2x2 pooling."""
    return [Level((3, 3), (2, 2)) for _ in range(depth + 1)]


def anisotropic_levels(depth: int, voxel_size: tuple[float, float, float]) -> list[Level]:
    """A 3-D U-Net's ``depth + 1`` levels for voxels of ``voxel_size`` (z, y, x; any one unit, e.g. nm).

    y and x are pooled at every level; z only once the voxel is about isotropic, that is where its z side is at
    most twice its smallest y/x side (nnU-Net's rule): until then kernels are (1, 3, 3) and pooling (1, 2, 2), so
    a serial-section stack (ISBI: 50 x 4 x 4 nm) is convolved in 2-D at full resolution and in 3-D where the
    pooled y/x voxel has grown to about the section thickness. The voxel size after each level doubles on the
    pooled axes."""
    z, y, x = (float(v) for v in voxel_size)
    levels = []
    for _ in range(depth + 1):
        isotropic = z <= 2.0 * min(y, x)
        levels.append(Level((3 if isotropic else 1, 3, 3), (2 if isotropic else 1, 2, 2)))
        z, y, x = z * levels[-1].pool[0], y * 2, x * 2
    return levels


def z_step(levels: list[Level]) -> int:
    """The multiple of sections a 3-D U-Net with these levels takes in z: 2 per z-pooling above the bottleneck."""
    return int(np.prod([level.pool[0] for level in levels[:-1]]))


def conv_block(x, filters: int, name: str, batch_norm: bool = False, kernel: tuple[int, ...] = (3, 3)):
    """Two 'same' convolutions of ``kernel`` (2-D or 3-D by its length) with ReLU, optionally batch-normalised."""
    conv = layers.Conv2D if len(kernel) == 2 else layers.Conv3D
    for i in (1, 2):
        x = conv(
            filters,
            kernel,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer="he_normal",
            name=f"{name}_conv{i}",
        )(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def up_block(
    x,
    skip,
    filters: int,
    name: str,
    up_mode: str = "transpose",
    batch_norm: bool = False,
    level: Level = Level((3, 3), (2, 2)),
):
    """Undo ``level``'s pooling, concatenate the skip connection, then a :func:`conv_block` of its kernel.
    ``"bilinear"`` up-sampling is nearest-neighbour in 3-D (Keras has no trilinear up-sampling)."""
    pool = level.pool
    planar = len(pool) == 2
    if up_mode == "transpose":
        transpose = layers.Conv2DTranspose if planar else layers.Conv3DTranspose
        x = transpose(filters, pool, strides=pool, padding="same", name=f"{name}_up")(x)
    else:
        if planar:
            x = layers.UpSampling2D(pool, interpolation="bilinear", name=f"{name}_up")(x)
        else:
            x = layers.UpSampling3D(pool, name=f"{name}_up")(x)
        conv = layers.Conv2D if planar else layers.Conv3D
        x = conv(filters, pool, padding="same", kernel_initializer="he_normal", name=f"{name}_upconv")(x)
    x = layers.Concatenate(name=f"{name}_concat")([skip, x])
    return conv_block(x, filters, name, batch_norm, level.kernel)


def unet_body(x, levels: list[Level], base_filters: int, batch_norm: bool, bottleneck_dropout: float, up_mode: str):
    """The U-Net between its input check and its output: a loop over ``levels`` (2-D or 3-D alike), contracting
    then expanding. Level ``i`` (1-based) has ``base_filters * 2**(i-1)`` filters."""
    depth = len(levels) - 1
    pool_layer = layers.MaxPooling2D if len(levels[0].pool) == 2 else layers.MaxPooling3D
    skips = []
    for level in range(1, depth + 1):
        x = conv_block(x, base_filters * 2 ** (level - 1), f"enc{level}", batch_norm, levels[level - 1].kernel)
        skips.append(x)
        x = pool_layer(levels[level - 1].pool, name=f"enc{level}_pool")(x)
    if bottleneck_dropout > 0:
        x = layers.Dropout(bottleneck_dropout, name="bottleneck_dropout")(x)
    x = conv_block(x, base_filters * 2**depth, "bottleneck", batch_norm, levels[depth].kernel)
    for level in range(depth, 0, -1):
        filters = base_filters * 2 ** (level - 1)
        x = up_block(x, skips[level - 1], filters, f"dec{level}", up_mode, batch_norm, levels[level - 1])
    return x


def _check_builder(depth: int, base_filters: int, up_mode: str) -> None:
    for name, value in (("depth", depth), ("base_filters", base_filters)):
        check_value(TrainConfig.field(name), value, TrainConfig)
    if up_mode not in UP_MODES:
        raise ValueError(f"up_mode must be one of {UP_MODES}, got {up_mode!r}")


def build_unet(
    depth: int = TrainConfig.depth,
    base_filters: int = TrainConfig.base_filters,
    channels: int = 1,
    batch_norm: bool = False,
    bottleneck_dropout: float = 0.0,
    up_mode: str = "transpose",
    name: str | None = None,
    affinity_offsets: tuple[tuple[int, int], ...] = (),
) -> keras.Model:
    """Build an uncompiled U-Net.

    Args:
        depth: number of contracting (pooling) levels above the bottleneck (>= 1).
        base_filters: filters of the first level; they double per level.
        channels: input channels (1 for grayscale EM; K for ``--z-context K``: the K sections around the one
            predicted, in z order).
        batch_norm: batch normalisation after every convolution.
        bottleneck_dropout: dropout rate applied at the bottleneck (0 = none).
        up_mode: ``"transpose"`` (2x2 transposed convolution) or ``"bilinear"``
            (bilinear up-sampling followed by a 2x2 convolution).
        affinity_offsets: ``(dy, dx)`` pixel offsets to predict affinities for, after the
            membrane channel (:class:`AffinityHead`); none: a boundary U-Net.

    Returns:
        A model mapping ``(batch, height, width, channels)`` images in [0, 1] to
        ``(batch, height, width, 1)`` float32 membrane probabilities, or with
        ``affinity_offsets`` to ``(batch, height, width, 1 + offsets)``.
    """
    _check_builder(depth, base_filters, up_mode)
    image = keras.Input(shape=(None, None, channels), name="image")
    x = InputSizeCheck(depth, name="input_size_check")(image)
    x = unet_body(x, planar_levels(depth), base_filters, batch_norm, bottleneck_dropout, up_mode)
    # float32 output keeps the loss stable under a mixed-precision policy.
    if affinity_offsets:
        output = AffinityHead(affinity_offsets, dtype="float32", name="membrane_and_affinities")(x)
    else:
        output = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="membrane_probability")(x)
    return keras.Model(image, output, name=name or f"unet_d{depth}_f{base_filters}")


def build_unet3d(
    depth: int = TrainConfig.depth,
    base_filters: int = TrainConfig.base_filters,
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
    z_context: int = 0,
    batch_norm: bool = False,
    bottleneck_dropout: float = 0.0,
    up_mode: str = "transpose",
    name: str | None = None,
) -> keras.Model:
    """Build an uncompiled anisotropic 3-D U-Net (``--model unet3d``): :func:`unet_body` over
    :func:`anisotropic_levels` of ``voxel_size`` (z, y, x, nm).

    ``z_context``: the sections of the z-patches it is trained on, kept in the model (its input check's config)
    so that prediction reads windows of as many sections (0: not recorded).

    Returns:
        A model mapping ``(batch, z, y, x, 1)`` images in [0, 1] to ``(batch, z, y, x, 1)`` float32 membrane
        probabilities: every section of the z-patch is predicted. y and x must be multiples of ``2**depth``, z
        of :func:`z_step` of the levels.
    """
    _check_builder(depth, base_filters, up_mode)
    levels = anisotropic_levels(depth, voxel_size)
    image = keras.Input(shape=(None, None, None, 1), name="image")
    x = InputSizeCheck(depth, z_step=z_step(levels), z_context=z_context, name="input_size_check")(image)
    x = unet_body(x, levels, base_filters, batch_norm, bottleneck_dropout, up_mode)
    output = layers.Conv3D(1, 1, activation="sigmoid", dtype="float32", name="membrane_probability")(x)
    return keras.Model(image, output, name=name or f"unet3d_d{depth}_f{base_filters}")


def unet_parameter_count(
    depth: int,
    base_filters: int,
    batch_norm: bool = False,
    outputs: int = 1,
    levels: list[Level] | None = None,
    channels: int = 1,
) -> int:
    """The parameters (trainable or not) of the U-Net :func:`build_unet` (``levels`` None: :func:`planar_levels`;
    ``channels``: its input channels) or :func:`build_unet3d` (its ``levels``) builds, counted without building
    it."""
    levels = levels or planar_levels(depth)

    def conv(inputs: int, filters: int, kernel) -> int:
        weights = int(np.prod(kernel)) * inputs * filters
        return weights + (4 * filters if batch_norm else filters)  # BN: 4 per filter, no bias

    def block(inputs: int, filters: int, kernel) -> int:
        return conv(inputs, filters, kernel) + conv(filters, filters, kernel)

    count = 0
    for level in range(1, depth + 2):  # the contracting levels, then the bottleneck
        filters = base_filters * 2 ** (level - 1)
        count, channels = count + block(channels, filters, levels[level - 1].kernel), filters
    for level in range(depth, 0, -1):
        filters, pool = base_filters * 2 ** (level - 1), levels[level - 1].pool
        # a transposed convolution of the pooling's size, then a block
        count += (
            int(np.prod(pool)) * channels * filters + filters + block(2 * filters, filters, levels[level - 1].kernel)
        )
        channels = filters
    return count + (channels + 1) * outputs  # the 1x1 output convolution
