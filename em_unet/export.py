"""Export for TF Serving: ``saved_models/<model_name>/<version>/`` with a ``serving_default`` signature.

Input ``image``: float32 ``[batch, height, width, 1]`` in [0, 1] (sides multiples of
``2**depth``); output ``membrane_probability``: float32, same shape. Versions are
the next free integer, written to a temporary folder and renamed, so an export
never overwrites an earlier version nor leaves a half-written one. The Keras
model is kept beside the SavedModel as ``model.keras`` for fine-tuning.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from em_unet.errors import EmUnetError
from em_unet.outputs import check_writable

SIGNATURE = "serving_default"
INPUT_NAME = "image"
OUTPUT_NAME = "membrane_probability"


def versions(model_dir: str | Path) -> list[int]:
    """The integer versions present under a model folder, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def export_saved_model(model: keras.Model, model_name: str = "em_unet", base_dir: str | Path = "saved_models") -> Path:
    """Write ``model`` as the next version of ``base_dir/model_name`` and return the version folder."""
    model_dir = Path(base_dir) / model_name
    check_writable(model_dir / "probe", overwrite=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=model_dir))
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            name=SIGNATURE,
            fn=lambda image: {OUTPUT_NAME: tf.cast(model(image, training=False), tf.float32)},
            input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name=INPUT_NAME)],
        )
        archive.write_out(str(tmp / "savedmodel"), verbose=False)
        staged = tmp / "savedmodel"
        model.save(staged / "model.keras")
        while True:
            version = (versions(model_dir) or [0])[-1] + 1
            try:
                os.rename(staged, model_dir / str(version))
                break
            except OSError:
                if not (model_dir / str(version)).exists():
                    raise
    except OSError as err:
        raise EmUnetError(f"export to {model_dir} failed: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir / str(version)
