"""`em-unet package`: a bioimage.io model package that bioimage.io's own model test passes offline, that
bioimage.io's prediction and `em-unet predict` run to em-unet's own map, and refusals that leave nothing."""

import socket
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
import tifffile
import yaml

from em_unet import cli
from em_unet.inference import package
from em_unet.inference.tiling import Tiling
from em_unet.io.stacks import to_unit_range
from em_unet.training.model import build_unet, build_unet3d
from tests.helpers import small_isbi, tiny_flags

UNET_DOI = "10.1007/978-3-319-24574-4_28"
# The one validator warning of severity WARNING or above a package may carry: the Model Zoo asks uploaders for a
# maintainer's GitHub account (--github-user), which bioimage.io checks on GitHub, so an offline test leaves it out.
ALLOWED_WARNINGS = ("Missing `maintainers`",)
SLICE = 19  # the ISBI slice predicted whole


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: every connection to an address fails and is recorded; bioimage.io's cache and the folder
    its TensorFlow backend unpacks weights into are in ``tmp_path``."""
    from bioimageio.spec._internal._settings import settings

    attempts = []
    connect = socket.socket.connect

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network access in an offline test")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    # bioimageio.core's Keras backend sets KERAS_BACKEND (default "torch") in os.environ when imported; Dask
    # workers and subprocesses of later tests inherit it, and Keras then fails to import without torch
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    monkeypatch.setattr(settings, "cache_path", tmp_path / "bioimageio-cache")
    monkeypatch.chdir(tmp_path)
    return attempts


@pytest.fixture(scope="module")
def trained(isbi_dir, tmp_path_factory):
    """A tiny model trained through the CLI on three 64 px ISBI slices (validation slice 2), packaged by
    ``train --package`` as ``from-train.zip``."""
    folder = tmp_path_factory.mktemp("trained")
    small_isbi(isbi_dir, folder, slices=3, size=64)
    flags = tiny_flags(
        folder,
        epochs=1,
        run_name="tiny",
        logs_dir=folder / "logs",
        models_dir=folder / "models",
        package=folder / "from-train.zip",
    )
    assert cli.main(["train", *flags]) == 0
    return folder


@pytest.mark.slow
def test_train_package_packages_its_export_documented_from_its_run(trained, capsys):
    model = package.read_package(trained / "from-train.zip")
    assert model.halo == Tiling().margin
    assert set(model.rdf["weights"]) >= {"tensorflow_saved_model_bundle", "keras_v3"}
    documentation = read_zip(trained / "from-train.zip", model.rdf["documentation"]["source"]).decode()
    assert "em-unet train" in documentation and "--run-name tiny" in documentation
    (trained / "taken.zip").write_text("not ours")  # an existing package: refused before any training
    flags = tiny_flags(trained, epochs=1, run_name="other", logs_dir=trained / "logs", package=trained / "taken.zip")
    assert cli.main(["train", *flags]) == 2
    assert "taken.zip already exists" in one_error(capsys) and not (trained / "logs" / "other").exists()


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("em-unet: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def read_zip(path, name):
    with zipfile.ZipFile(path) as archive:
        return archive.read(name)


@pytest.mark.slow
def test_trained_model_packaged_passes_bioimageio_test_offline_and_predicts_as_em_unet(
    trained, isbi_dir, tmp_path, offline, monkeypatch, capsys
):
    from bioimageio.core import create_prediction_pipeline, load_model_description, predict, test_model

    export = trained / "models" / "em_unet"  # the parent: its newest version is packaged
    out = tmp_path / "isbi-membranes.zip"
    argv = ["package", export, "-o", out, "--run", trained / "logs" / "tiny", "--author", "Ada Lovelace; Alan Turing"]
    assert cli.main([*map(str, argv), "--cite", "Doe J. (2025) Membranes.|10.1000/xyz"]) == 0
    printed = capsys.readouterr()
    assert "no config.json" not in printed.err and f"wrote {out}" in printed.out

    rdf = yaml.safe_load(read_zip(out, "rdf.yaml"))
    readme = read_zip(out, "README.md").decode()
    weights = rdf["weights"]
    assert rdf["format_version"].startswith("0.5.") and set(weights) == {
        "tensorflow_saved_model_bundle",
        "keras_v3",
        "onnx",
    }
    assert "parent" not in weights["tensorflow_saved_model_bundle"]
    assert weights["keras_v3"]["parent"] == weights["onnx"]["parent"] == "tensorflow_saved_model_bundle"
    assert [a["name"] for a in rdf["authors"]] == ["Ada Lovelace", "Alan Turing"] and rdf["license"] == "CC-BY-4.0"
    assert [c.get("doi") for c in rdf["cite"]] == [UNET_DOI, "10.1000/xyz"]
    assert {"electron-microscopy", "membrane", "neurons", "unet"} <= set(rdf["tags"])
    (image_in,), (probability_out,) = rdf["inputs"], rdf["outputs"]
    assert [a.get("id", a["type"]) for a in image_in["axes"]] == ["batch", "y", "x", "channel"]
    assert image_in["axes"][1]["size"]["step"] == 4  # 2**depth
    assert [op["id"] for op in image_in["preprocessing"]] == ["ensure_dtype", "scale_linear", "ensure_dtype"]
    assert {a.get("halo") for a in probability_out["axes"][1:3]} == {Tiling().margin}
    for text in ("em-unet train \\", "--val-slices 2-2", "## Validation", "V_rand", "V_info", "pixel error"):
        assert text in readme, text
    for program in ("Fiji", "ilastik", "napari", "Python"):
        assert f"**{program}" in readme

    # bioimage.io's own test, as `bioimageio test PACKAGE` runs it, with em-unet's custom Keras layer
    # unregistered: the keras_v3 weights must load with Keras alone.
    monkeypatch.delitem(keras.saving.get_custom_objects(), "em_unet>InputSizeCheck")
    summary = test_model(out)
    errors = [e.msg for d in summary.details for e in d.errors]
    warnings = [w.msg for d in summary.details for w in d.warnings if w.severity >= 30]
    assert summary.status == "passed" and not errors, errors
    assert all(w.startswith(ALLOWED_WARNINGS) for w in warnings), warnings
    reproduced = {d.loc[-1] for d in summary.details if d.name.startswith("Reproduce test outputs")}
    assert reproduced == set(weights)

    # A whole ISBI slice: bioimage.io's prediction with each weight format, and em-unet predict of the
    # package, against em-unet predict of the export.
    image = tifffile.imread(isbi_dir / "train-volume.tif")[SLICE]
    tifffile.imwrite(tmp_path / "slice.tif", image, photometric="minisblack")
    assert cli.main(["predict", str(export), str(tmp_path / "slice.tif"), "-o", str(tmp_path / "em.tif")]) == 0
    assert cli.main(["predict", str(out), str(tmp_path / "slice.tif"), "-o", str(tmp_path / "package.tif")]) == 0
    em_unet = tifffile.imread(tmp_path / "em.tif")
    assert np.abs(tifffile.imread(tmp_path / "package.tif") - em_unet).max() <= 1e-4

    model = load_model_description(out)
    result = predict(model=model, inputs={"image": image[None, :, :, None]})  # as the package's README says
    assert np.abs(result.as_arrays()["membrane_probability"][0, :, :, 0] - em_unet).max() <= 1e-4
    for weights_format in weights:
        pipeline = create_prediction_pipeline(model, weight_format=weights_format)  # predict loads and unloads it
        result = predict(model=pipeline, inputs={"image": image[None, :, :, None]})
        probability = result.as_arrays()["membrane_probability"][0, :, :, 0]
        assert probability.shape == image.shape
        assert np.abs(probability - em_unet).max() <= 1e-4, weights_format
    assert offline == []


@pytest.mark.slow
def test_keras_file_without_config_is_packaged_with_one_warning_and_unchecked_onnx_left_out(
    tmp_path, offline, monkeypatch, capsys
):
    keras.utils.set_random_seed(0)
    model_file = tmp_path / "model.keras"
    build_unet(depth=2, base_filters=4).save(model_file)
    monkeypatch.setattr(package, "ONNX_TOLERANCE", -1.0)  # no conversion passes: ONNX must then stay out
    before = listing(tmp_path)
    out = tmp_path / "unzipped"
    assert cli.main(["package", str(model_file), "--output-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert sum("no config.json" in line for line in err.splitlines()) == 1, err
    assert "test image is synthetic" in err and "no ONNX weights" in err
    assert listing(tmp_path) == sorted([*before, "unzipped", *(f"unzipped/{p}" for p in listing(out))])

    rdf = yaml.safe_load((out / "rdf.yaml").read_text())
    assert set(rdf["weights"]) == {"keras_v3", "tensorflow_saved_model_bundle"}
    assert "parent" not in rdf["weights"]["keras_v3"]
    assert rdf["weights"]["tensorflow_saved_model_bundle"]["parent"] == "keras_v3"
    readme = (out / "README.md").read_text()
    assert "No ONNX weights: the ONNX model differs from the SavedModel" in readme and "Not recorded" in readme

    top = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["package", str(model_file), "--output-dir", str(out), "--no-onnx", "--overwrite"]) == 0
    assert "not asked for (--no-onnx)" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == top  # replaced: the old folder is gone

    stack = np.random.default_rng(0).integers(0, 256, (2, 40, 72), dtype=np.uint8)  # not a multiple of 4 px
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    assert cli.main(["predict", str(out), str(tmp_path / "stack.tif"), "-o", str(tmp_path / "a.tif")]) == 0
    assert cli.main(["predict", str(model_file), str(tmp_path / "stack.tif"), "-o", str(tmp_path / "b.tif")]) == 0
    assert np.abs(tifffile.imread(tmp_path / "a.tif") - tifffile.imread(tmp_path / "b.tif")).max() <= 1e-4
    assert offline == []


def foreign_saved_model(path, channels=1, signature="serving_default"):
    """A SavedModel that is not em-unet's: another signature name, or another number of channels."""

    class Foreign(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32, name="image")])
        def serve(self, image):
            return {"membrane_probability": tf.reduce_mean(image, axis=-1, keepdims=True)}

    module = Foreign()
    tf.saved_model.save(module, str(path), signatures={signature: module.serve})
    return path


def test_bad_inputs_give_one_line_and_leave_nothing(tmp_path, capsys):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "a-file").write_text("")
    (tmp_path / "exists.zip").write_bytes(b"old")
    three = foreign_saved_model(tmp_path / "three-channels", channels=3)
    other = foreign_saved_model(tmp_path / "other-signature", signature="predict")
    keras_file = tmp_path / "model.keras"
    build_unet(depth=2, base_filters=4).save(keras_file)
    build_unet(depth=2, base_filters=4, channels=3).save(tmp_path / "k3.keras")
    build_unet3d(depth=2, base_filters=4, voxel_size=(12, 4, 4), z_context=4).save(tmp_path / "u3d.keras")
    before = listing(tmp_path)
    cases = [
        ([tmp_path / "missing", "-o", tmp_path / "out.zip"], "missing: no such model file or folder"),
        ([tmp_path / "not-a-model", "-o", tmp_path / "out.zip"], "not a SavedModel folder"),
        ([keras_file, "-o", tmp_path / "exists.zip"], "exists.zip already exists"),
        ([keras_file, "-o", tmp_path / "a-file" / "out.zip"], "is a file, not a folder"),
        ([keras_file, "-o", tmp_path / "out.tif"], "name it NAME.zip"),
        ([keras_file, "--output-dir", tmp_path / "a-file"], "is a file"),
        ([keras_file], "give -o NAME.zip or --output-dir DIR"),
        ([keras_file, "-o", tmp_path / "out.zip", "--license", "no-such-license"], "not an SPDX license"),
        ([keras_file, "-o", tmp_path / "out.zip", "--name", "x/y"], "--name 'x/y'"),
        ([three, "-o", tmp_path / "out.zip"], "takes 3 channels"),
        ([other, "-o", tmp_path / "out.zip"], "has no serving_default signature"),
        ([tmp_path / "k3.keras", "-o", tmp_path / "out.zip"], "takes 3 channels"),
        ([tmp_path / "u3d.keras", "-o", tmp_path / "out.zip"], "a 3-D U-Net (z-patches of 4 sections)"),
    ]
    for args, expected in cases:
        assert cli.main(["package", *map(str, args)]) == 2, args
        assert expected in one_error(capsys), args
        assert listing(tmp_path) == before, args
    assert (tmp_path / "exists.zip").read_bytes() == b"old"


def test_predict_refuses_a_package_it_cannot_run(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((1, 64, 64), np.uint8), photometric="minisblack")
    space = [{"type": "space", "id": axis, "size": {"min": 48, "step": 16}} for axis in ("y", "x")]
    rdf = {
        "format_version": "0.5.12",
        "type": "model",
        "inputs": [{"id": "image", "axes": [{"type": "batch"}, *space, {"type": "channel", "channel_names": ["em"]}]}],
        "outputs": [
            {
                "id": "membrane_probability",
                "axes": [
                    {"type": "batch"},
                    *({**a, "halo": 16} for a in space),
                    {"type": "channel", "channel_names": ["p"]},
                ],
            }
        ],
        "weights": {"onnx": {"source": "model.onnx"}, "pytorch_state_dict": {"source": "weights.pt"}},
    }
    with zipfile.ZipFile(tmp_path / "onnx-only.zip", "w") as archive:
        archive.writestr("rdf.yaml", yaml.safe_dump(rdf))
    with zipfile.ZipFile(tmp_path / "no-rdf.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    before = listing(tmp_path)
    cases = [
        ("onnx-only.zip", "no weights em-unet can run (the package has: onnx, pytorch_state_dict)"),
        ("no-rdf.zip", "not a bioimage.io package (it holds no rdf.yaml or bioimageio.yaml)"),
    ]
    for name, expected in cases:
        argv = ["predict", str(tmp_path / name), str(tmp_path / "stack.tif"), "-o", str(tmp_path / "out.tif")]
        assert cli.main(argv) == 2
        assert expected in one_error(capsys)
        assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "image",
    [
        np.arange(256, dtype=np.uint8).reshape(16, 16),
        (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16),
        np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16),
        np.arange(-100, 156, dtype=np.int16).reshape(16, 16),
    ],
)
def test_preprocessing_is_em_unets_intensity_rule(image):
    ops = package.preprocessing_for(image.dtype, image)
    assert np.abs(package.apply_preprocessing(image, ops) - to_unit_range(image)).max() <= 1e-6
