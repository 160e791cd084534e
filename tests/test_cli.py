import json

import numpy as np
import tifffile

from tests.helpers import error_line, run_cli


def test_help_lists_commands_and_each_has_help():
    result = run_cli("--help")
    assert result.returncode == 0
    commands = ["augment-preview", "train", "tune", "predict", "segment", "evaluate", "study", "plot"]
    for command in commands:
        assert command in result.stdout
        sub = run_cli(command, "--help")
        assert sub.returncode == 0 and "usage: em-unet " + command in sub.stdout


def test_augment_preview_writes_png_and_never_overwrites(isbi_dir, tmp_path):
    out = tmp_path / "preview.png"
    args = [
        "augment-preview",
        "--data",
        isbi_dir / "train-volume.tif",
        "--labels",
        isbi_dir / "train-labels.tif",
        "-o",
        out,
        "--samples",
        "2",
        "--patch-size",
        "128",
    ]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = out.read_bytes()
    again = run_cli(*args)
    assert again.returncode == 2
    assert "already exists" in error_line(again)
    assert out.read_bytes() == before


def test_bad_input_gives_one_line_error(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((2, 64, 64), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", np.full((2, 64, 64), 7, np.uint8), photometric="minisblack")
    cases = [
        (["--data", tmp_path / "missing.tif", "--labels", tmp_path / "lab.tif"], "missing.tif: no such file"),
        (["--data", tmp_path / "img.tif", "--labels", tmp_path / "lab.tif"], "label values {7}"),
    ]
    for args, expected in cases:
        result = run_cli("augment-preview", *args, "-o", tmp_path / "p.png", "--patch-size", "32")
        assert result.returncode == 2
        assert expected in error_line(result)
    assert not (tmp_path / "p.png").exists()


def test_broken_elasticdeform_says_how_to_fix(tmp_path, isbi_dir):
    fake = tmp_path / "fake" / "elasticdeform"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("numpy.core.multiarray failed to import")\n')
    result = run_cli(
        "augment-preview",
        "--data",
        isbi_dir / "train-volume.tif",
        "--labels",
        isbi_dir / "train-labels.tif",
        "-o",
        tmp_path / "p.png",
        "--elastic-backend",
        "elasticdeform",
        env={"PYTHONPATH": str(tmp_path / "fake")},
    )
    assert result.returncode == 2
    line = error_line(result)
    assert "numpy.core.multiarray failed to import" in line
    assert "pip install --force-reinstall --no-binary elasticdeform elasticdeform" in line


def test_train_predict_evaluate_end_to_end(isbi_dir, tmp_path):
    """Through the CLI on real ISBI slices cropped small: train a tiny model, predict with tiling, evaluate."""
    images = tifffile.imread(isbi_dir / "train-volume.tif")[:4, :128, :128]
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[:4, :128, :128]
    tifffile.imwrite(tmp_path / "img.tif", images, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    train = run_cli(
        "train",
        "--data",
        tmp_path / "img.tif",
        "--labels",
        tmp_path / "lab.tif",
        "--val-slices",
        "2-3",
        "--depth",
        "2",
        "--base-filters",
        "4",
        "--patch-size",
        "64",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
        "--optimizer",
        "adamax",
        "--lr",
        "1e-3",
        "--run-name",
        "tiny",
        "--logs-dir",
        tmp_path / "logs",
        "--models-dir",
        tmp_path / "models",
    )
    assert train.returncode == 0, train.stderr
    run = tmp_path / "logs" / "tiny"
    config = json.loads((run / "config.json").read_text())
    assert config["optimizer"] == "adamax" and config["val_slices_used"] == [2, 3]
    assert (run / "best.keras").exists() and (run / "history.csv").exists()
    assert list(run.glob("train/events.out.tfevents.*")) and list(run.glob("validation/events.out.tfevents.*"))
    assert "V_rand" in train.stdout and str(tmp_path / "models" / "em_unet" / "1") in train.stdout

    again = run_cli(
        "train",
        "--data",
        tmp_path / "img.tif",
        "--labels",
        tmp_path / "lab.tif",
        "--run-name",
        "tiny",
        "--logs-dir",
        tmp_path / "logs",
        "--patch-size",
        "64",
    )
    assert again.returncode == 2 and "already exists" in error_line(again)

    predict = run_cli(
        "predict",
        tmp_path / "models" / "em_unet",
        tmp_path / "img.tif",
        "-o",
        tmp_path / "prob.tif",
        "--tile",
        "64",
        "--margin",
        "8",
        "--overlap",
        "8",
        "--segment",
        tmp_path / "neurons.tif",
    )
    assert predict.returncode == 0, predict.stderr
    assert tifffile.imread(tmp_path / "prob.tif").shape == (4, 128, 128)
    neurons = tifffile.imread(tmp_path / "neurons.tif")
    assert neurons.shape == (4, 128, 128) and neurons.dtype == np.uint16 and neurons.min() >= 1
    assert json.loads((tmp_path / "neurons.json").read_text())["membrane_probability"] == str(tmp_path / "prob.tif")
    scored = run_cli("evaluate", tmp_path / "neurons.tif", tmp_path / "lab.tif")
    assert scored.returncode == 0 and "merge" in scored.stdout, scored.stderr

    evaluate = run_cli("evaluate", tmp_path / "prob.tif", tmp_path / "lab.tif", "-o", tmp_path / "scores.json")
    assert evaluate.returncode == 0, evaluate.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert 0.0 <= scores["v_rand"] <= 1.0 and 0.0 <= scores["pixel_error"] <= 1.0
    assert "V_rand" in evaluate.stdout

    tifffile.imwrite(tmp_path / "short.tif", labels[:2], photometric="minisblack")
    mismatch = run_cli("evaluate", tmp_path / "prob.tif", tmp_path / "short.tif")
    assert mismatch.returncode == 2
    assert "label shape (2, 128, 128) differs from prediction shape (4, 128, 128)" in error_line(mismatch)

    missing = run_cli("predict", tmp_path / "nope", tmp_path / "img.tif", "-o", tmp_path / "p2.tif")
    assert missing.returncode == 2 and "no such model" in error_line(missing)
