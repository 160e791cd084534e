import errno
import json
import os
import subprocess
import sys
import tempfile
import threading

import keras
import numpy as np
import pytest

from em_unet.errors import EmUnetError
from em_unet.inference.export import (
    EXPORT_PRECISIONS,
    RENAME_ATTEMPTS,
    export_saved_model,
    float32_copy,
)
from em_unet.inference.predict import load_predictor
from em_unet.inference.serving import versions
from em_unet.training.model import build_unet

LOAD_WITHOUT_EM_UNET = """
import json, sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
out = loaded.signatures["serving_default"](image=tf.constant(np.load(sys.argv[2])))
assert "em_unet" not in sys.modules
print(json.dumps(out["membrane_probability"].numpy().tolist()))
"""


def leftovers(model_dir):
    """Temporary export folders left in ``model_dir``."""
    return [p.name for p in model_dir.iterdir() if p.name.startswith(".export-")] if model_dir.exists() else []


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


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
    result = subprocess.run(
        [sys.executable, str(script), str(second), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
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


@pytest.mark.parametrize("blocked", ["base", "model", "parent"])
def test_a_models_dir_that_is_a_file_is_one_line(tiny_model, tmp_path, blocked):
    blocker = {"base": tmp_path / "file", "model": tmp_path / "m", "parent": tmp_path / "file"}[blocked]
    base = {"base": tmp_path / "file", "model": tmp_path, "parent": tmp_path / "file" / "below"}[blocked]
    blocker.write_text("not a folder")
    with pytest.raises(EmUnetError) as err:
        export_saved_model(tiny_model, "m", base)
    assert str(blocker) in one_line(err)
    assert sorted(tmp_path.iterdir()) == [blocker]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
@pytest.mark.parametrize("read_only", ["base", "model"])
def test_read_only_models_dir_is_one_line(tiny_model, tmp_path, read_only):
    locked = tmp_path / "models" if read_only == "base" else tmp_path / "models" / "m"
    locked.mkdir(parents=True)
    locked.chmod(0o555)
    try:
        with pytest.raises(EmUnetError) as err:
            export_saved_model(tiny_model, "m", tmp_path / "models")
        assert str(locked) in one_line(err)
        assert sorted(p.name for p in locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_stray_files_and_odd_names_do_not_block_or_hang(tiny_model, tmp_path):
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    for name in ("2", "3", "10"):
        (model_dir / name).write_text("stray")
    for name in ("x", "\N{SUPERSCRIPT TWO}"):  # "²".isdigit() is True but int("²") fails
        (model_dir / name).mkdir()
    result = {}

    def run():
        try:
            result["version"] = export_saved_model(tiny_model, "m", tmp_path)
        except EmUnetError as err:  # surfaced in the main thread below
            result["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive(), "export hangs beside a stray file"
    assert "error" not in result, result.get("error")
    assert result["version"] == model_dir / "11" and (model_dir / "11" / "saved_model.pb").exists()
    assert versions(model_dir) == [1, 11]
    assert leftovers(model_dir) == []


def fake_rename(monkeypatch, model_dir, fail):
    """Make ``os.rename`` into ``model_dir`` call ``fail(target)`` instead; other renames still work."""
    real = os.rename
    tried = []

    def rename(src, dst, *args, **kwargs):
        if os.path.dirname(os.fspath(dst)) != os.fspath(model_dir):
            return real(src, dst, *args, **kwargs)
        tried.append(os.path.basename(os.fspath(dst)))
        fail(dst)

    monkeypatch.setattr(os, "rename", rename)
    return tried


def test_versions_that_keep_being_taken_give_up_after_a_bounded_number_of_attempts(tiny_model, tmp_path, monkeypatch):
    model_dir = tmp_path / "m"
    model_dir.mkdir()

    def taken_by_someone_else(target):
        open(target, "w").close()
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)

    tried = fake_rename(monkeypatch, model_dir, taken_by_someone_else)
    with pytest.raises(EmUnetError, match=f"{RENAME_ATTEMPTS} attempts") as err:
        export_saved_model(tiny_model, "m", tmp_path)
    assert str(model_dir) in one_line(err)
    assert tried == [str(v) for v in range(1, RENAME_ATTEMPTS + 1)]
    assert leftovers(model_dir) == [] and versions(model_dir) == []


def test_a_rename_failure_that_is_not_a_race_is_one_line(tiny_model, tmp_path, monkeypatch):
    model_dir = tmp_path / "m"

    def cross_device(target):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), target)

    tried = fake_rename(monkeypatch, model_dir, cross_device)
    with pytest.raises(EmUnetError) as err:
        export_saved_model(tiny_model, "m", tmp_path)
    message = one_line(err)
    assert str(model_dir / "1") in message and os.strerror(errno.EXDEV) in message
    assert tried == ["1"]
    assert list(tmp_path.iterdir()) == []  # neither the temporary folder nor the model folder made for it


def no_space_from_tensorflow(*args, **kwargs):
    import tensorflow as tf

    raise tf.errors.ResourceExhaustedError(
        None,
        None,
        "/x/variables/variables_temp/part-00000-of-00001.data-00000-of-00001.tempstate1; "
        "No space left on device\n\tFailed to rename [Op:SaveV2]",
    )


def denied_from_tensorflow(*args, **kwargs):
    import tensorflow as tf

    raise tf.errors.PermissionDeniedError(None, None, "/x/saved_model.pb; Permission denied\n\tdetails")


def no_space_from_python(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/model.keras")


def no_space_from_h5py(*args, **kwargs):
    raise OSError(
        "Unable to synchronously create file (file write failed: errno = 28, "
        "error message = 'No space left on device')\nmore"
    )


def denied_temporary_folder(*args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/x/.export-1")


@pytest.mark.parametrize(
    "target, failure, cause",
    [
        ("archive.write_out", no_space_from_tensorflow, errno.ENOSPC),
        ("archive.write_out", denied_from_tensorflow, errno.EACCES),
        ("keras.Model.save", no_space_from_python, errno.ENOSPC),
        ("keras.Model.save", no_space_from_h5py, errno.ENOSPC),
        ("tempfile.mkdtemp", denied_temporary_folder, errno.EACCES),
    ],
)
def test_write_errors_are_one_line_naming_the_folder_and_cause(
    tiny_model, tmp_path, monkeypatch, target, failure, cause
):
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    module, attribute = target.rsplit(".", 1)
    # ExportArchive() returns an instance of a backend-specific class.
    owner = {"archive": type(keras.export.ExportArchive()), "keras.Model": keras.Model, "tempfile": tempfile}[module]
    monkeypatch.setattr(owner, attribute, failure)
    with pytest.raises(EmUnetError) as err:
        export_saved_model(tiny_model, "m", tmp_path)
    assert one_line(err) == f"cannot write the export in {model_dir}: {os.strerror(cause)}"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


BAD_PRECISIONS = ["float16", "bfloat16", "FLOAT32", "Trained", "", " float32", "float32\n", None, 32]


@pytest.mark.parametrize("precision", BAD_PRECISIONS)
def test_an_unknown_precision_is_one_line_naming_it_and_the_choices(tiny_model, tmp_path, precision):
    with pytest.raises(EmUnetError) as err:
        export_saved_model(tiny_model, "m", tmp_path, precision=precision)
    message = one_line(err)
    assert repr(precision) in message and all(choice in message for choice in EXPORT_PRECISIONS)
    assert list(tmp_path.iterdir()) == []


def test_a_float32_model_is_exported_as_is(tiny_model):
    assert float32_copy(tiny_model) is tiny_model


def test_a_mixed_bfloat16_model_exports_float32_unless_asked_to_keep_it(tmp_path):
    import tensorflow as tf

    image = np.random.default_rng(0).random((2, 48, 64, 1)).astype(np.float32)
    before = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        model = build_unet(depth=2, base_filters=4)
        exported = {
            precision: export_saved_model(model, "mixed", tmp_path, precision=precision)
            for precision in ("float32", "trained")
        }
        assert keras.mixed_precision.dtype_policy().name == "mixed_bfloat16"
        trained_in_keras = model.predict(image, verbose=0)
        keras.mixed_precision.set_global_policy("float32")
        reference = build_unet(depth=2, base_filters=4)
        reference.set_weights(model.get_weights())
        float32_in_keras = reference.predict(image, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy(before)
    assert {layer.compute_dtype for layer in reference.layers} == {"float32"}
    assert model.get_layer("enc1_conv1").compute_dtype == "bfloat16"  # the trained model is left alone
    assert exported["float32"].name == "1" and exported["trained"].name == "2"

    served = {}
    for precision, folder in exported.items():
        signature = tf.saved_model.load(str(folder)).signatures["serving_default"]
        assert signature.structured_input_signature[1]["image"].dtype == tf.float32
        assert signature.structured_outputs["membrane_probability"].dtype == tf.float32
        served[precision] = signature(image=tf.constant(image))["membrane_probability"].numpy()
    np.testing.assert_allclose(served["float32"], float32_in_keras, rtol=0, atol=1e-5)
    assert np.abs(served["trained"] - float32_in_keras).max() > 1e-5
    np.testing.assert_allclose(served["trained"], trained_in_keras, rtol=0, atol=1e-6)

    kept = keras.saving.load_model(exported["float32"] / "model.keras", compile=False)
    assert {layer.compute_dtype for layer in [kept, *kept.layers]} == {"float32"}
    kept_trained = keras.saving.load_model(exported["trained"] / "model.keras", compile=False)
    assert kept_trained.get_layer("enc1_conv1").compute_dtype == "bfloat16"


def test_the_export_command_exports_a_kept_keras_file_and_refuses_what_it_cannot(tiny_model, tmp_path, capsys):
    from em_unet import cli

    tiny_model.save(tmp_path / "best.keras")
    models = tmp_path / "models"
    assert cli.main(["export", str(tmp_path / "best.keras"), "--models-dir", str(models), "--model-name", "m"]) == 0
    assert versions(models / "m") == [1] and f"{models / 'm' / '1'}" in capsys.readouterr().out
    (tmp_path / "notes.keras").write_text("not a zip")
    for argv, message in (
        ([str(tmp_path / "missing.keras")], "missing.keras: no such model file or folder"),
        ([str(models / "m" / "1")], "export takes a .keras file; this is already a SavedModel"),
        ([str(tmp_path / "notes.keras")], "notes.keras: "),
        ([str(tmp_path / "best.keras"), "--model-name", "a/b"], "--model-name = 'a/b': must be a folder name"),
        ([str(tmp_path / "best.keras"), "--models-dir", str(tmp_path / "best.keras")], "best.keras"),
    ):
        where = [] if "--models-dir" in argv else ["--models-dir", str(models)]
        assert cli.main(["export", *argv, *where]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert versions(models / "m") == [1] and sorted(p.name for p in models.iterdir()) == ["m"]


LOAD_AFFINITIES_WITHOUT_EM_UNET = """
import json, sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
out = loaded.signatures["serving_default"](image=tf.constant(np.load(sys.argv[2])))
assert "em_unet" not in sys.modules
print(json.dumps({"offsets": loaded.affinity_offsets[0].numpy().tolist(),
                  "membrane": out["membrane_probability"].numpy().tolist(),
                  "affinities": out["affinities"].numpy().tolist()}))
"""


def test_an_affinity_unet_serves_affinities_and_membrane_probability_with_its_offsets(tmp_path):
    keras.utils.set_random_seed(0)
    offsets = ((-1, 0), (0, -1), (-9, -4))
    model = build_unet(depth=2, base_filters=4, affinity_offsets=offsets)
    version = export_saved_model(model, "affinities", tmp_path)
    image = np.random.default_rng(1).random((1, 32, 48, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", image)
    (tmp_path / "load.py").write_text(LOAD_AFFINITIES_WITHOUT_EM_UNET)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), str(version), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout.strip().splitlines()[-1])
    expected = model.predict(image, verbose=0)
    assert [tuple(o) for o in served["offsets"]] == list(offsets)
    assert np.allclose(np.array(served["membrane"]), expected[..., :1], atol=1e-6)
    assert np.allclose(np.array(served["affinities"]), expected[..., 1:], atol=1e-6)
    predictor = load_predictor(version)  # em-unet reads both outputs back, membrane first
    assert predictor.affinity_offsets == offsets
    assert np.allclose(predictor(image), expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["2.5-D", "3-D"])
def test_z_context_unets_export_their_signature_and_predict_the_same(tmp_path, kind):
    """2.5-D: ``[batch, y, x, K]``; 3-D: ``[batch, z, y, x, 1]`` with its z-patch kept as ``z_context``."""
    import tensorflow as tf

    from em_unet.training.model import build_unet3d

    keras.utils.set_random_seed(4)
    if kind == "2.5-D":
        model, shape, sample = build_unet(depth=2, base_filters=4, channels=5), [None, None, None, 5], (1, 32, 32, 5)
    else:
        model = build_unet3d(depth=2, base_filters=4, voxel_size=(12, 4, 4), z_context=4)
        shape, sample = [None, None, None, None, 1], (1, 4, 32, 32, 1)
    folder = export_saved_model(model, "z", tmp_path)
    loaded = tf.saved_model.load(str(folder))
    signature = loaded.signatures["serving_default"]
    assert signature.structured_input_signature[1]["image"].shape.as_list() == shape
    image = np.random.default_rng(0).random(sample).astype(np.float32)
    served = signature(image=tf.constant(image))["membrane_probability"].numpy()
    assert served.shape == sample[:-1] + (1,) and np.abs(served - model(image).numpy()).max() < 1e-5
    if kind == "3-D":
        assert int(loaded.z_context[0].numpy()) == 4
    predictor = load_predictor(folder)
    keras_file = load_predictor(folder / "model.keras")
    assert predictor.z_context == keras_file.z_context == (5 if kind == "2.5-D" else 4)
    tiles = np.random.default_rng(1).random((2, 32, 32, predictor.z_context)).astype(np.float32)
    assert np.abs(predictor(tiles) - keras_file(tiles)).max() < 1e-5 and predictor(tiles).shape == (2, 32, 32, 1)
