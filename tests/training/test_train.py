"""`em-unet train` as a user runs it: every refusal happens before training, in one line, leaving nothing."""

import numpy as np
import pytest
import tifffile

from em_unet import cli


def write(path, array):
    tifffile.imwrite(path, array, photometric="minisblack")
    return path


@pytest.fixture
def stack(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.where(rng.random((3, 64, 64)) < 0.2, 0, 255).astype(np.uint8)
    write(tmp_path / "img.tif", rng.integers(0, 255, (3, 64, 64), dtype=np.uint8))
    write(tmp_path / "lab.tif", labels)
    return tmp_path


TINY = "--depth 2 --base-filters 4 --patch-size 32 --batch-size 2 --steps-per-epoch 1 --epochs 1".split()
TINY += ["--precision", "float32"]


def refusals(folder):
    (folder / "models-file").write_text("not a folder")
    (folder / "logs-file").write_text("not a folder")
    write(folder / "small-labels.tif", np.zeros((3, 32, 32), np.uint8))
    write(folder / "all-interior.tif", np.full((3, 64, 64), 255, np.uint8))
    all_membrane = np.zeros((3, 64, 64), np.uint8)
    all_membrane[2, 0, 0] = 255  # the validation slice has one interior pixel; the training slices none
    write(folder / "all-membrane.tif", all_membrane)
    write(
        folder / "nan.tif", np.where(np.arange(3 * 64 * 64).reshape(3, 64, 64) == 5000, np.nan, 0.5).astype(np.float32)
    )
    (folder / "runs" / "taken").mkdir(parents=True)
    (folder / "runs" / "taken" / "config.json").write_text("{}")
    return [
        (["--data", folder / "missing.tif"], "missing.tif: no such file"),
        (["--labels", folder / "small-labels.tif"], "label shape (3, 32, 32) differs"),
        (["--labels", folder / "all-interior.tif"], "no membrane pixel"),
        (["--data", folder / "nan.tif"], "NaN or infinite value at slice 1"),
        (["--val-slices", "2-7"], "validation slices 2-7 are outside the stack's slices 0-2"),
        (["--val-slices", "0-2"], "leave no slice"),
        (["--patch-size", "128"], "patch size 128 px is larger than the slices"),
        (["--models-dir", folder / "models-file"], "models-file is a file, not a folder"),
        (["--logs-dir", folder / "logs-file"], "logs-file is a file, not a folder"),
        (["--logs-dir", folder / "runs", "--run-name", "taken"], "already exists: choose another --run-name"),
        (["--logs-dir", "/proc/em-unet-logs"], "/proc"),
        (["--lr", "nan"], "--lr (learning_rate) = nan"),
        (["--steps-per-epoch", "0"], "--steps-per-epoch = 0"),
        (["--target", "affinities", "--labels", folder / "all-membrane.tif"], "have no cell interior"),
        (["--target", "affinities", "--offsets", "0,0"], "pairs a pixel with itself"),
        (["--target", "affinities", "--offsets", "-1,0 0,-1 -1,0"], "offset -1,0 is repeated"),
        (["--target", "affinities", "--offsets", "-1,0 0,-1 1,0"], "offset 1,0 is repeated"),
        (["--target", "affinities", "--offsets", "-1,0 0,-40"], "does not fit in the 32 px patch"),
        (["--target", "affinities", "--offsets", "up"], "is not a pair DY,DX"),
        (["--ema", "1"], "--ema = 1"),
        (["--z-context", "2"], "--z-context 2: the 2-D U-Net predicts the middle section"),
        (["--z-context", "4"], "K must be odd (e.g. 3 or 5)"),
        (["--z-context", "0"], "--z-context = 0"),
        (["--model", "unet3d", "--target", "affinities"], "learns the membrane probability only"),
        (["--model", "unet3d", "--z-context", "2"], "records no voxel size"),
        (["--model", "unet3d", "--voxel-size", "50,4"], "must be three positive numbers Z,Y,X"),
        (["--model", "unet3d", "--voxel-size", "0,4,4"], "must be three positive numbers Z,Y,X"),
        (["--model", "unet3d", "--voxel-size", "fifty,4,4"], "must be three positive numbers Z,Y,X"),
        (["--model", "unet3d", "--voxel-size", "12,4,4", "--z-context", "3"], "multiples of 2 sections"),
        (["--model", "unet3d", "--voxel-size", "4,4,4", "--z-context", "2"], "multiples of 4 sections"),
        (["--model", "unet3d", "--voxel-size", "4,4,4", "--z-context", "6"], "(nearest valid: 4 or 8)"),
        (["--model", "unet3d", "--voxel-size", "50,4,4", "--precision", "mixed_bfloat16"], "crash in half"),
    ]


def test_every_refusal_comes_before_training_and_leaves_nothing(stack, capsys, monkeypatch):
    monkeypatch.chdir(stack)
    cases = refusals(stack)
    before = sorted(p.relative_to(stack) for p in stack.rglob("*"))
    for change, message in cases:
        args = {
            "--data": stack / "img.tif",
            "--labels": stack / "lab.tif",
            "--val-slices": "2-2",
            "--logs-dir": stack / "logs",
            "--models-dir": stack / "models",
        }
        extra = []
        for flag, value in zip(change[::2], change[1::2]):
            if flag in args:
                args[flag] = value
            else:
                extra += [flag, value]
        argv = ["train", *TINY, *[str(x) for pair in args.items() for x in pair], *map(str, extra)]
        assert cli.main(argv) == 2, change
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("em-unet: error: ") and message in err[0], (change, err)
        assert sorted(p.relative_to(stack) for p in stack.rglob("*")) == before, change  # nothing created


@pytest.mark.slow
def test_a_diverged_run_says_so_instead_of_a_missing_file(stack, capsys, monkeypatch):
    """val_loss never finite (here: the loss made NaN) gives one line and keeps the run's logs."""
    from em_unet.training import assembly

    original = assembly.training_loss
    monkeypatch.setattr(
        assembly, "training_loss", lambda name, offsets=(): lambda y, p: original(name, offsets)(y, p) * np.nan
    )
    argv = [
        "train",
        *TINY,
        "--data",
        stack / "img.tif",
        "--labels",
        stack / "lab.tif",
        "--val-slices",
        "2-2",
        "--logs-dir",
        stack / "logs",
        "--models-dir",
        stack / "models",
        "--run-name",
        "nan",
    ]
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "val_loss was never finite" in err and "lower --lr" in err
    assert (stack / "logs" / "nan" / "config.json").exists() and not (stack / "models").exists()


@pytest.mark.slow
def test_train_on_a_zarr_volume(stack, capsys):
    """The same command on chunked data: images and labels as Zarr arrays of one store."""
    from em_unet.io.volumes import create_volume

    for key, name in (("raw", "img.tif"), ("labels", "lab.tif")):
        array = tifffile.imread(stack / name)
        with create_volume(f"{stack}/em.zarr/{key}", array.shape, array.dtype, (1, 32, 32)) as volume:
            volume[...] = array
    argv = [
        "train",
        *TINY,
        "--data",
        f"{stack}/em.zarr/raw",
        "--labels",
        f"{stack}/em.zarr/labels",
        "--val-slices",
        "2-2",
        "--logs-dir",
        stack / "logs",
        "--models-dir",
        stack / "models",
        "--run-name",
        "z",
    ]
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert (stack / "logs" / "z" / "scores.json").exists() and (stack / "models" / "em_unet" / "1").is_dir()


def test_val_every_validates_the_first_every_nth_and_the_last_epoch(stack, capsys, tmp_path):
    """--val-every 2 over 5 epochs: validations after epochs 1, 2, 4 and 5; the others are "not measured" in
    history.csv and NaN in the history read back (from the CSV and from TensorBoard alike); plots join the rest."""
    from em_unet.reporting.history import read_history
    from em_unet.reporting.plot import plot_runs

    argv = [
        "train",
        *TINY,
        "--epochs",
        "5",
        "--val-every",
        "2",
        "--data",
        stack / "img.tif",
        "--labels",
        stack / "lab.tif",
        "--val-slices",
        "2-2",
        "--logs-dir",
        stack / "logs",
        "--run-name",
        "sparse",
        "--models-dir",
        stack / "models",
    ]
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    run = stack / "logs" / "sparse"
    rows = (run / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    val_column = [row.split(",")[header.index("val_loss")] for row in rows[1:]]
    assert len(val_column) == 5 and val_column[2] == "NA" and "NA" not in val_column[:2] + val_column[3:]
    from_csv = read_history(run)
    assert np.isnan(from_csv["val_loss"]).tolist() == [False, False, True, False, False]
    (run / "history.csv").rename(tmp_path / "kept.csv")
    from_events = read_history(run)
    assert np.isnan(from_events["val_loss"]).tolist() == [False, False, True, False, False]
    assert np.allclose(from_events["val_loss"][[0, 1, 3, 4]], from_csv["val_loss"][[0, 1, 3, 4]], rtol=1e-5)
    assert plot_runs(run, tmp_path / "plots")


@pytest.mark.parametrize(
    "flags, input_shape",
    [
        (["--z-context", "3"], [None, None, None, 3]),
        (["--model", "unet3d", "--voxel-size", "12,4,4", "--z-context", "2"], [None, None, None, None, 1]),
    ],
)
def test_z_context_models_train_export_and_predict_a_stack(stack, capsys, flags, input_shape):
    """2.5-D and 3-D from the command line: trained, exported with their signature, predicted on a TIFF."""
    import json

    import tensorflow as tf

    argv = ["train", *TINY, "--data", stack / "img.tif", "--labels", stack / "lab.tif", "--val-slices", "2-2"]
    argv += ["--logs-dir", stack / "logs", "--models-dir", stack / "models", "--run-name", "z", *flags]
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    config = json.loads((stack / "logs" / "z" / "config.json").read_text())
    assert config["z_context"] == int(flags[flags.index("--z-context") + 1])
    signature = tf.saved_model.load(str(stack / "models" / "em_unet" / "1")).signatures["serving_default"]
    assert signature.structured_input_signature[1]["image"].shape.as_list() == input_shape
    assert (
        cli.main(["predict", str(stack / "models" / "em_unet"), str(stack / "img.tif"), "-o", str(stack / "p.tif")])
        == 0
    )
    probability = tifffile.imread(stack / "p.tif")
    assert probability.shape == (3, 64, 64) and np.isfinite(probability).all()
