"""Export for TF Serving: ``saved_models/<model_name>/<version>/`` with a ``serving_default`` signature.

Input ``image``: float32 ``[batch, height, width, 1]`` in [0, 1] (sides multiples of
``2**depth``), ``[batch, height, width, K]`` for a U-Net with ``--z-context K`` (the section and its z-context
in z order, the middle one predicted), or ``[batch, z, height, width, 1]`` for a 3-D U-Net (every section
predicted; the trained z-patch kept as the variable collection ``z_context``); output
``membrane_probability``: float32, the input's shape with one channel; an affinity U-Net also returns
``affinities``: float32 ``[batch, height, width, offsets]``, channel c for offset c of the model's
``affinity_offsets``, which the SavedModel keeps as a variable collection of that name (``loaded.affinity_offsets[0]``,
int32 ``[offsets, 2]``, (dy, dx) pixels) and ``model.keras`` in its output layer. Versions are
one above the highest numeric name in the model folder, written to a temporary
folder and renamed, so an export never overwrites an earlier version nor leaves a
half-written one. The Keras model is kept beside the SavedModel as ``model.keras``
for fine-tuning.

By default the export is a float32 copy of the model: a model trained under a
``mixed_bfloat16`` / ``mixed_float16`` policy would otherwise compute in half
precision inside the SavedModel, which CPUs without bfloat16 support and many GPUs
serve slowly or not at all, and whose outputs differ from float32 by up to ~4e-3.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from em_unet.errors import EmUnetError
from em_unet.inference.predict import affinity_offsets_of, load_keras_model, resolve_model_path, z_context_of
from em_unet.inference.serving import (
    AFFINITIES_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    SIGNATURE,
    Z_CONTEXT_NAME,
    next_version,
)
from em_unet.io.files import check_free_space, check_writable, new_folder
from em_unet.machine import precision_policy
from em_unet.segmentation.offsets import OFFSETS_ATTRIBUTE

RENAME_ATTEMPTS = 100

# Dtype-policy names that compute in half precision; rewritten to "float32" in the float32 copy.
_HALF_POLICIES = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")
# Errors a rename reports when another exporter took the version first.
_TAKEN_ERRNOS = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)
# Causes looked for in TensorFlow / h5py messages, which carry no errno.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO)


def _all_layers(model: keras.Layer) -> Iterator[keras.Layer]:
    """``model`` and every layer inside it, nested models included."""
    yield model
    for layer in getattr(model, "layers", ()):
        yield from _all_layers(layer)


def _float32_config(config: Any) -> Any:
    """``config`` with every half-precision ``"dtype"`` entry replaced by ``"float32"``.

    ``Model.from_config`` restores each layer's recorded dtype policy, so building
    under a float32 global policy alone would keep the bfloat16 layers.
    """
    if isinstance(config, list):
        return [_float32_config(item) for item in config]
    if not isinstance(config, dict):
        return config
    rewritten = {}
    for key, value in config.items():
        if key == "dtype":
            name = value.get("config", {}).get("name") if isinstance(value, dict) else value
            if name in _HALF_POLICIES:
                rewritten[key] = "float32"
                continue
        rewritten[key] = _float32_config(value)
    return rewritten


def _half_precision_layers(model: keras.Model) -> list[str]:
    """``"name: dtype"`` of every layer in ``model`` (itself included) that computes in float16 or bfloat16."""
    half = [layer for layer in _all_layers(model) if layer.compute_dtype in ("float16", "bfloat16")]
    return sorted({f"{layer.name}: {layer.compute_dtype}" for layer in half})


def float32_copy(model: keras.Model) -> keras.Model:
    """``model`` rebuilt under a float32 dtype policy with the same weights; ``model`` itself if already float32.

    The copy is uncompiled (no optimizer state). The global Keras dtype policy is
    restored afterwards.
    """
    if not _half_precision_layers(model):
        return model
    try:
        with precision_policy("float32"):
            copy = type(model).from_config(_float32_config(model.get_config()))
            copy.set_weights(model.get_weights())
    except (TypeError, ValueError, NotImplementedError) as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EmUnetError(
            f"cannot rebuild model {model.name!r} in float32 ({cause}); export it with precision='trained'"
        ) from None
    left = _half_precision_layers(copy)
    if left:
        raise EmUnetError(
            f"float32 copy of model {model.name!r} still computes in half precision ({', '.join(left)}); "
            "export it with precision='trained'"
        )
    return copy


# What each --export-precision exports: the registry the flag's choices come from.
EXPORT_PRECISIONS = {"float32": float32_copy, "trained": lambda model: model}


def _cause(err: BaseException) -> str:
    """A one-line cause: ``strerror`` when known, else the first line of the message."""
    strerror = getattr(err, "strerror", None)
    if strerror:
        return strerror
    message = getattr(err, "message", None) or str(err)
    for code in _WRITE_ERRNOS:
        if os.strerror(code) in message:
            return os.strerror(code)
    lines = message.strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _publish(staged: Path, model_dir: Path) -> Path:
    """Rename ``staged`` to the next free version folder of ``model_dir`` and return it.

    Retries with the next number when another export takes a version first; gives
    up after :data:`RENAME_ATTEMPTS` so a folder that keeps refusing cannot hang us.
    """
    for _ in range(RENAME_ATTEMPTS):
        target = model_dir / str(next_version(model_dir))
        try:
            os.rename(staged, target)
            return target
        except OSError as err:
            if err.errno in _TAKEN_ERRNOS and os.path.lexists(target):
                continue
            raise EmUnetError(f"cannot move the export to {target}: {_cause(err)}") from None
    raise EmUnetError(
        f"cannot move the export into {model_dir}: every version tried was taken "
        f"({RENAME_ATTEMPTS} attempts); are other exports running?"
    )


def export_saved_model(
    model: keras.Model,
    model_name: str = "em_unet",
    base_dir: str | Path = "saved_models",
    precision: str = "float32",
) -> Path:
    """Write ``model`` as the next version of ``base_dir/model_name`` and return the version folder.

    Args:
        model: the Keras U-Net.
        model_name: folder under ``base_dir`` holding the versions.
        base_dir: the models folder (TF Serving's ``--model_base_path`` parent).
        precision: ``"float32"`` exports a float32 copy of a mixed-precision model
            (both the SavedModel and ``model.keras``); ``"trained"`` exports the
            model with the dtype policies it was trained under.

    Raises:
        EmUnetError: an unknown ``precision``, or a folder that cannot be written
            (one line naming the folder and the cause).
    """
    if precision not in EXPORT_PRECISIONS:
        raise EmUnetError(f"export precision {precision!r} is not one of: {', '.join(EXPORT_PRECISIONS)}")
    served = EXPORT_PRECISIONS[precision](model)
    model_dir = Path(base_dir) / model_name
    check_writable(model_dir / "probe", overwrite=True)
    offsets = affinity_offsets_of(served)
    archive = keras.export.ExportArchive()
    archive.track(served)

    def serve(image):
        output = tf.cast(served(image, training=False), tf.float32)
        if not offsets:
            return {OUTPUT_NAME: output}
        return {OUTPUT_NAME: output[..., :1], AFFINITIES_NAME: output[..., 1:]}

    if offsets:
        offsets_variable = tf.Variable(offsets, dtype=tf.int32, trainable=False, name=OFFSETS_ATTRIBUTE)
        archive.add_variable_collection(OFFSETS_ATTRIBUTE, [offsets_variable])
    z_context, volumetric = z_context_of(served)
    if volumetric:  # [batch, z, y, x, 1]; the trained z-patch, which prediction reads windows of, kept beside it
        shape = [None, None, None, None, 1]
        archive.add_variable_collection(Z_CONTEXT_NAME, [tf.Variable(z_context, dtype=tf.int32, trainable=False)])
    else:  # [batch, y, x, K]: the section and its z-context as channels (K = 1 without)
        shape = [None, None, None, z_context]
    archive.add_endpoint(name=SIGNATURE, fn=serve, input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)])
    try:
        with new_folder(model_dir):  # removes the folders it made if the export fails
            tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=model_dir))
            try:
                staged = tmp / "savedmodel"
                archive.write_out(str(staged), verbose=False)
                served.save(staged / "model.keras")
                return _publish(staged, model_dir)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # before new_folder checks whether its folders are empty
    except (OSError, tf.errors.OpError) as err:
        raise EmUnetError(f"cannot write the export in {model_dir}: {_cause(err)}") from None


def export_keras_file(
    model_path: str | Path,
    model_name: str = "em_unet",
    base_dir: str | Path = "saved_models",
    precision: str = "float32",
) -> Path:
    """``em-unet export``: load a ``.keras`` U-Net and export it (:func:`export_saved_model`), checking the
    models folder's free space first (a float32 export from the parameter count, see :func:`export_bytes`)."""
    path = resolve_model_path(model_path)
    if path.suffix != ".keras":
        raise EmUnetError(f"{path}: export takes a .keras file; this is already a SavedModel")
    model = load_keras_model(path)
    check_export_space(base_dir, model_name, model.count_params())
    return export_saved_model(model, model_name, base_dir, precision)


EXPORT_MARGIN_BYTES = 16 << 20  # the graph, the metadata and some headroom


def export_bytes(parameters: int) -> int:
    """Free space, bytes, an export of a U-Net of ``parameters`` parameters needs: float32 weights in both the
    SavedModel and its model.keras, and a margin for the graph and the metadata."""
    return 2 * 4 * parameters + EXPORT_MARGIN_BYTES


def check_export_space(models_dir: str | Path, model_name: str, parameters: int) -> None:
    """Refuse, before long work, a models folder without the space for the export (:func:`export_bytes`)."""
    check_free_space(Path(models_dir) / model_name, export_bytes(parameters), "the export")
