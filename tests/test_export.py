import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from em_unet.errors import EmUnetError
from em_unet.export import export_saved_model, versions
from em_unet.model import build_unet

LOAD_WITHOUT_EM_UNET = """
import json, sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
out = loaded.signatures["serving_default"](image=tf.constant(np.load(sys.argv[2])))
assert "em_unet" not in sys.modules
print(json.dumps(out["membrane_probability"].numpy().tolist()))
"""


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(0)
    return build_unet(depth=2, base_filters=4)


def test_versions_increment_and_load_in_plain_tensorflow(tiny_model, tmp_path):
    first = export_saved_model(tiny_model, "membranes", tmp_path)
    second = export_saved_model(tiny_model, "membranes", tmp_path)
    assert (first.name, second.name) == ("1", "2") and versions(tmp_path / "membranes") == [1, 2]
    assert (second / "saved_model.pb").exists() and (second / "model.keras").exists()
    image = np.random.default_rng(0).random((2, 48, 64, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", image)
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_EM_UNET)
    result = subprocess.run([sys.executable, str(script), str(second), str(tmp_path / "x.npy")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    served = np.array(json.loads(result.stdout.strip().splitlines()[-1]), np.float32)
    assert served.shape == (2, 48, 64, 1)
    assert np.allclose(served, tiny_model.predict(image, verbose=0), atol=1e-6)


def test_saved_model_cli_lists_the_signature(tiny_model, tmp_path):
    version = export_saved_model(tiny_model, "m", tmp_path)
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--dir", str(version), "--all"]
    result = subprocess.run(cli, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "serving_default" in result.stdout
    assert "image" in result.stdout and "membrane_probability" in result.stdout
    assert "(-1, -1, -1, 1)" in result.stdout


def test_interrupted_export_leaves_nothing_and_keeps_earlier_versions(tiny_model, tmp_path, monkeypatch):
    export_saved_model(tiny_model, "m", tmp_path)
    before = sorted(p.name for p in (tmp_path / "m").iterdir())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", fail)
    with pytest.raises((EmUnetError, OSError)):
        export_saved_model(tiny_model, "m", tmp_path)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before == ["1"]


def test_unwritable_models_dir(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(EmUnetError, match="cannot create folder"):
        export_saved_model(tiny_model, "m", blocker)


def test_a_mixed_bfloat16_model_exports_a_float32_signature(tmp_path):
    import tensorflow as tf

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        model = build_unet(depth=2, base_filters=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("enc1_conv1").compute_dtype == "bfloat16"
    signature = tf.saved_model.load(str(export_saved_model(model, "mixed", tmp_path))).signatures["serving_default"]
    assert signature.structured_input_signature[1]["image"].dtype == tf.float32
    assert signature.structured_outputs["membrane_probability"].dtype == tf.float32
    image = np.random.default_rng(0).random((1, 32, 32, 1)).astype(np.float32)
    served = signature(image=tf.constant(image))["membrane_probability"]
    assert served.dtype == tf.float32
    np.testing.assert_allclose(served.numpy(), model.predict(image, verbose=0), atol=1e-6)
