"""The one place em-unet changes or reads Keras' private internals, and only where it needs to.

Weight averaging (``--ema``): Keras' optimizers keep the moving average of the weights (``use_ema``) and
its public ``SwapEMAWeights`` callback swaps them in for validation, but nothing public saves the average
between epochs without disturbing the training state. :func:`averaged_weights` puts the average into the
model for the duration of a block (best.keras is saved inside it), reading the optimizer's private
``_trainable_variables`` and ``_model_variables_moving_average`` (checked to exist, on the versions in
``CHECKED_KERAS``).

Keras 3's ``fit`` fails under ``MultiWorkerMirroredStrategy`` twice (keras-team/keras#20585,
tensorflow/tensorflow#72388, both open when this was written): it builds the model's state from the
first batch reduced across workers, an eager reduce that fails; and it averages each step's scalar
logs across workers along axis 0, which scalars do not have. :func:`multi_worker_fit` builds the state
from a local batch and averages scalars over workers as scalars, for the duration of one ``fit``, and
puts Keras back afterwards.

The patch touches ``keras.src.backend.tensorflow.trainer.reduce_per_replica`` and
``Model._symbolic_build``, which are private: it was checked on the Keras versions in
``CHECKED_KERAS`` and refuses to run on others (setup.py bounds Keras to them), rather than risk
a silently wrong average.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from em_unet.errors import EmUnetError

CHECKED_KERAS = ("3.13", "3.14", "3.15")  # major.minor versions the patch was checked on


def check_keras_version(version: str = keras.__version__) -> None:
    """Refuse Keras versions the patch was not checked on."""
    if ".".join(version.split(".")[:2]) not in CHECKED_KERAS:
        raise EmUnetError(
            f"--strategy multi-worker needs a Keras version em-unet's multi-worker patch was checked "
            f"on ({', '.join(CHECKED_KERAS)}); this is Keras {version}: "
            f"pip install 'keras>={CHECKED_KERAS[0]},<{_next_minor(CHECKED_KERAS[-1])}'"
        )


def _next_minor(version: str) -> str:
    major, minor = version.split(".")
    return f"{major}.{int(minor) + 1}"


@contextlib.contextmanager
def averaged_weights(model: keras.Model):
    """Inside the block, ``model``'s trainable weights hold its optimizer's moving average of them (``use_ema``);
    afterwards their own values again."""
    optimizer = model.optimizer
    variables = getattr(optimizer, "_trainable_variables", None)
    averages = getattr(optimizer, "_model_variables_moving_average", None)
    if not getattr(optimizer, "use_ema", False) or variables is None or averages is None:
        raise EmUnetError(
            f"--ema: this Keras {keras.__version__} optimizer keeps no moving average where em-unet reads it "
            f"(checked on Keras {', '.join(CHECKED_KERAS)})"
        )
    own = [variable.numpy() for variable in variables]
    for variable, average in zip(variables, averages):
        variable.assign(average)
    try:
        yield
    finally:
        for variable, value in zip(variables, own):
            variable.assign(value)


@contextlib.contextmanager
def multi_worker_fit(model: keras.Model, dataset: tf.data.Dataset):
    """Make ``model.fit`` inside the block work under ``MultiWorkerMirroredStrategy`` (no-op otherwise)."""
    strategy = model.distribute_strategy
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        yield
        return
    check_keras_version()
    from keras.src.backend.tensorflow import trainer as keras_trainer  # private: only once the version is checked

    original = keras_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):

            def mean(value):
                local = strategy.experimental_local_results(value)[0]
                return strategy.reduce("MEAN", value, axis=None if local.shape.rank == 0 else 0)

            return tf.nest.map_structure(mean, values)
        return original(values, strategy, reduction)

    batch = next(iter(dataset))
    with strategy.scope():
        model._symbolic_build(data_batch=batch)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    keras_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        keras_trainer.reduce_per_replica = original
        del model._maybe_symbolic_build
