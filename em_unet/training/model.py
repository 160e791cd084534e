"""The U-Net: small building blocks and a builder that loops over levels.

``depth`` counts the contracting (max-pooling) levels; a bottleneck sits below
them. Level ``i`` (1-based) has ``base_filters * 2**(i-1)`` filters and the
bottleneck ``base_filters * 2**depth``. All convolutions use 'same' padding, so
the output has the input's height and width, and any input whose sides are
multiples of ``2**depth`` pixels works.
"""

from __future__ import annotations

import keras
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


@keras.saving.register_keras_serializable(package="em_unet")
class InputSizeCheck(layers.Layer):
    """Identity layer that rejects inputs whose sides are not multiples of ``2**depth``.

    Static shapes are checked when the graph is traced (a Python error naming the
    size and the nearest valid sizes); dynamic shapes with a TensorFlow assertion,
    which is a plain TF op and survives SavedModel export.
    """

    def __init__(self, depth: int, **kwargs):
        super().__init__(**kwargs)
        self.depth = depth

    def call(self, inputs):
        height, width = inputs.shape[1], inputs.shape[2]
        check_input_size(height, width, self.depth)
        if height is not None and width is not None:
            return inputs
        step = 2**self.depth
        sides = tf.shape(inputs)[1:3]
        tf.debugging.assert_equal(
            sides % step,
            tf.zeros_like(sides),
            message=f"U-Net depth {self.depth}: height and width (shown) must be multiples of {step} px",
        )
        return inputs

    def get_config(self):
        return {**super().get_config(), "depth": self.depth}


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


def conv_block(x, filters: int, name: str, batch_norm: bool = False):
    """Two 3x3 'same' convolutions with ReLU, optionally batch-normalised."""
    for i in (1, 2):
        x = layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer="he_normal",
            name=f"{name}_conv{i}",
        )(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def up_block(x, skip, filters: int, name: str, up_mode: str = "transpose", batch_norm: bool = False):
    """Double the resolution, concatenate the skip connection, then a :func:`conv_block`."""
    if up_mode == "transpose":
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_up")(x)
    else:
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_up")(x)
        x = layers.Conv2D(filters, 2, padding="same", kernel_initializer="he_normal", name=f"{name}_upconv")(x)
    x = layers.Concatenate(name=f"{name}_concat")([skip, x])
    return conv_block(x, filters, name, batch_norm)


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
        channels: input channels (1 for grayscale EM).
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
    for name in ("depth", "base_filters"):
        check_value(TrainConfig.field(name), locals()[name], TrainConfig)
    if up_mode not in UP_MODES:
        raise ValueError(f"up_mode must be one of {UP_MODES}, got {up_mode!r}")

    image = keras.Input(shape=(None, None, channels), name="image")
    x = InputSizeCheck(depth, name="input_size_check")(image)
    skips = []
    for level in range(1, depth + 1):
        x = conv_block(x, base_filters * 2 ** (level - 1), f"enc{level}", batch_norm)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    if bottleneck_dropout > 0:
        x = layers.Dropout(bottleneck_dropout, name="bottleneck_dropout")(x)
    x = conv_block(x, base_filters * 2**depth, "bottleneck", batch_norm)
    for level in range(depth, 0, -1):
        x = up_block(x, skips[level - 1], base_filters * 2 ** (level - 1), f"dec{level}", up_mode, batch_norm)
    # float32 output keeps the loss stable under a mixed-precision policy.
    if affinity_offsets:
        output = AffinityHead(affinity_offsets, dtype="float32", name="membrane_and_affinities")(x)
    else:
        output = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="membrane_probability")(x)
    return keras.Model(image, output, name=name or f"unet_d{depth}_f{base_filters}")


def unet_parameter_count(depth: int, base_filters: int, batch_norm: bool = False, outputs: int = 1) -> int:
    """The parameters (trainable or not) of :func:`~em_unet.training.model.build_unet`'s U-Net, counted without
    building it."""

    def conv3(inputs: int, filters: int) -> int:
        return 9 * inputs * filters + (4 * filters if batch_norm else filters)  # BN: 4 per filter, no bias

    def block(inputs: int, filters: int) -> int:
        return conv3(inputs, filters) + conv3(filters, filters)

    count, channels = 0, 1
    for level in range(1, depth + 2):  # the contracting levels, then the bottleneck
        filters = base_filters * 2 ** (level - 1)
        count, channels = count + block(channels, filters), filters
    for level in range(depth, 0, -1):
        filters = base_filters * 2 ** (level - 1)
        count += 4 * channels * filters + filters + block(2 * filters, filters)  # 2x2 transposed conv, then a block
        channels = filters
    return count + (channels + 1) * outputs  # the 1x1 output convolution
