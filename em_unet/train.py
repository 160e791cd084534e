"""Training: where augmentation runs, and (later) the training loop itself."""

from __future__ import annotations

import keras
import tensorflow as tf

from em_unet.augment import AugmentConfig, augment_batch


class StepAugmentedModel(keras.Model):
    """Wraps a model so that each training batch is augmented inside the training step.

    The seed of batch ``n`` is ``(seed, n)`` with ``n`` the optimizer's step
    counter, so runs are reproducible. Inference and export use ``self.inner``.
    """

    def __init__(self, inner: keras.Model, augment: AugmentConfig, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.augment = augment
        self.augment_seed = seed

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def train_step(self, data):
        images, targets = data[0], data[1]
        step = tf.cast(self.optimizer.iterations, tf.int64)
        seed = tf.stack([tf.constant(self.augment_seed, tf.int64), step])
        images, targets = augment_batch(images, targets, seed, self.augment)
        return super().train_step((images, targets) + tuple(data[2:]))
