"""The declared settings: every bad value refused up front in one line naming the setting; the choice lists
are the registries' names; the README's tables and the command line are these settings."""

import subprocess
import sys
from pathlib import Path

import pytest

from em_unet import cli
from em_unet.config import (
    AUGMENT_PLACEMENTS,
    ELASTIC_BACKENDS,
    LOSSES,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    STRATEGIES,
    PredictConfig,
    SearchConfig,
    TrainConfig,
)
from em_unet.errors import ConfigError
from em_unet.settings import flags_markdown, from_args, selected

REPO = Path(__file__).resolve().parents[1]

BAD_TRAIN = [
    ({"learning_rate": float("nan")}, "--lr (learning_rate) = nan"),
    ({"learning_rate": -1e-3}, "--lr (learning_rate) = -0.001"),
    ({"learning_rate": float("inf")}, "--lr (learning_rate) = inf"),
    ({"depth": 0}, "--depth = 0: must be an integer >= 1"),
    ({"base_filters": 0}, "--base-filters = 0"),
    ({"batch_size": 0}, "--batch-size = 0"),
    ({"batch_size": -4}, "--batch-size = -4"),
    ({"epochs": 0}, "--epochs = 0"),
    ({"steps_per_epoch": 0}, "--steps-per-epoch = 0"),
    ({"elastic_points": 0}, "--elastic-points = 0"),
    ({"elastic_points": 1}, "--elastic-points = 1"),
    ({"elastic_sigma_px": -1.0}, "--elastic-sigma (elastic_sigma_px) = -1.0"),
    ({"rotation_degrees": 720.0}, "--rotation (rotation_degrees) = 720.0"),
    ({"val_fraction": 0.0}, "--val-fraction = 0.0: must be a finite number > 0 and < 1"),
    ({"val_fraction": 1.5}, "--val-fraction = 1.5"),
    ({"val_slices": "19-15"}, "--val-slices = '19-15'"),
    ({"val_slices": "15:19"}, "--val-slices = '15:19'"),
    ({"val_slices": [3]}, "--val-slices = [3]"),
    ({"val_slices": (1, 2), "val_fraction": 0.2}, "--val-slices and --val-fraction both given"),
    ({"patch_size": 100}, "--patch-size 100: must be a multiple of 2**depth = 16 px"),
    ({"patch_size": 0}, "--patch-size = 0"),
    ({"optimizer": "rmsprop"}, "--optimizer = 'rmsprop': must be one of sgd, adam, adamax"),
    ({"loss": "focal"}, "--loss = 'focal': must be one of bce"),
    ({"augment_placement": "gpu"}, "--augment-placement = 'gpu'"),
    ({"elastic_backend": "scipy"}, "--elastic-backend = 'scipy'"),
    ({"precision": "float64"}, "--precision = 'float64'"),
    ({"strategy": "tpu"}, "--strategy = 'tpu'"),
    ({"export_precision": "int8"}, "--export-precision = 'int8'"),
    ({"momentum": 1.0}, "--momentum = 1.0"),
    ({"max_minutes": 0.0}, "--max-minutes = 0.0"),
    ({"early_stopping": -1}, "--early-stopping = -1"),
    ({"seed": -1}, "--seed = -1"),
    ({"augment": "yes"}, "--no-augment (augment) = 'yes': must be true or false"),
    ({"depth": 3.5}, "--depth = 3.5: must be an integer"),
    ({"run_name": "a/b"}, "--run-name = 'a/b': must be a folder name"),
    ({"model_name": ".."}, "--model-name = '..'"),
    ({"logs_dir": ""}, "--logs-dir = ''"),
]


@pytest.mark.parametrize("values, message", BAD_TRAIN)
def test_every_bad_training_setting_is_refused_in_one_line(values, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(data="d.tif", labels="l.tif", **values)
    assert message in str(err.value) and "\n" not in str(err.value)


BAD_PREDICT = [
    ({"tile": 8}, "--tile = 8"),
    ({"tile": 40, "overlap": 16}, "--tile 40 px leaves no core"),
    ({"tile": 64, "margin": 32}, "--tile 64 px leaves no core"),
    ({"margin": -1}, "--margin = -1"),
    ({"overlap": -8}, "--overlap = -8"),
    ({"tile_batch": 0}, "--tile-batch = 0"),
    ({"segment": "s.tif", "binary": True}, "--segment needs the membrane probability"),
]


@pytest.mark.parametrize("values, message", BAD_PREDICT)
def test_bad_prediction_settings_are_refused(values, message):
    with pytest.raises(ConfigError) as err:
        PredictConfig(model="m", stack="s", output="o.tif", **values)
    assert message in str(err.value)


def test_tune_offers_every_training_flag_but_run_name_and_resume():
    parser = cli.build_parser()
    tune = parser._subparsers._group_actions[0].choices["tune"]
    dests = {action.dest for action in tune._actions}
    assert {f.name for f in selected(TrainConfig)} - dests == {"run_name", "resume"}  # a search resumes itself
    assert {"algorithm", "max_trials", "project", "overwrite", "worker_timeout"} <= dests


def test_choice_lists_are_the_names_of_the_registries_that_implement_them():
    from em_unet import machine
    from em_unet.training import augment, distribute, losses, optimizers

    assert LOSSES == tuple(losses.LOSSES) == ("bce", "dice", "bce_dice", "weighted_bce")
    assert OPTIMIZERS == tuple(optimizers.OPTIMIZERS) == ("sgd", "adam", "adamax")
    assert LR_SCHEDULES == tuple(optimizers.LR_SCHEDULES) == ("constant", "cosine")
    assert ELASTIC_BACKENDS == tuple(augment.ELASTIC_BACKENDS) == ("tensorflow", "elasticdeform")
    assert AUGMENT_PLACEMENTS == augment.PLACEMENTS == ("auto", "pipeline", "step")
    assert STRATEGIES == ("auto", *distribute.STRATEGIES) == ("auto", "one-device", "mirrored", "multi-worker")
    assert PRECISIONS is machine.PRECISIONS


def test_commands_that_do_not_train_never_import_tensorflow():
    """The registries' modules import TensorFlow; the configuration and every command's flags are declared
    without them, and only a command that checks or lists those choices reads them."""
    code = (
        "import sys\n"
        "from em_unet import cli\n"
        "parser = cli.build_parser()\n"
        "parser.parse_args(['evaluate', 'p.tif', 'l.tif'])\n"
        "parser.parse_args(['segment', 'p.tif', '-o', 's.tif'])\n"
        "parser.parse_args(['plot', 'logs'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'keras_tuner'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_train_help_lists_the_registries_names(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())
    assert "--loss {bce,dice,bce_dice,weighted_bce}" in usage
    assert "--strategy {auto,one-device,mirrored,multi-worker}" in usage


def test_readme_flag_tables_are_the_configuration():
    """The README's flag tables are generated (python -m em_unet.config); this keeps them equal."""
    readme = (REPO / "README.md").read_text()
    for name, cls in (("train", TrainConfig), ("tune", SearchConfig), ("predict", PredictConfig)):
        start, end = f"<!-- flags:{name} -->\n", f"\n<!-- /flags:{name} -->"
        assert start in readme, f"README lacks the {name} flag table"
        table = readme.split(start, 1)[1].split(end, 1)[0]
        assert table == flags_markdown(cls), f"README's {name} flags differ: run python -m em_unet.config"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "d", "--labels", "l", "--lr", "nan"], "--lr (learning_rate) = nan"),
        (["train", "--data", "d", "--labels", "l", "--depth", "x"], "argument --depth: invalid int value: 'x'"),
        (["train", "--data", "d"], "the following arguments are required: --labels"),
        (["predict", "m", "s", "-o", "o.tif", "--tile-batch", "0"], "--tile-batch = 0"),
        (["augment-preview", "--data", "d", "--labels", "l", "--samples", "0"], "--samples = 0"),
        (["tune", "--data", "d", "--labels", "l", "--oracle-port", "70000"], "--oracle-port = 70000"),
        (["study", "--data", "d", "--labels", "l", "--epochs", "0"], "--epochs = 0"),
        (["segment", "p.tif", "-o", "s.tif", "--sigma", "-1"], "--sigma (sigma_px) = -1.0"),
    ],
)
def test_cli_refusals_are_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        status = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("em-unet: error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_plot", boom)
    assert cli.main(["plot", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ZeroDivisionError: division by zero" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        cli.main(["plot", "somewhere", "--debug"])


def test_os_errors_name_the_path_and_the_cause(monkeypatch, capsys):
    import errno

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.tif")

    monkeypatch.setattr(cli, "cmd_plot", full)
    assert cli.main(["plot", "x"]) == 2
    assert capsys.readouterr().err == "em-unet: error: /data/out.tif: No space left on device\n"


def test_tensorflow_start_up_lines_stay_off_stderr(tmp_path):
    """A refused command prints exactly its error line, though TensorFlow is imported first."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "em_unet.cli",
            "train",
            "--data",
            tmp_path / "none.tif",
            "--labels",
            tmp_path / "none.tif",
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == f"em-unet: error: {tmp_path / 'none.tif'}: no such file or folder\n", result.stderr
    assert list(tmp_path.iterdir()) == []


def test_resume_alone_resumes_the_newest_run_and_takes_a_folder():
    parser = cli.build_parser()
    for argv, resume in (
        (["--resume"], "last"),
        (["--resume", "--epochs", "5"], "last"),
        (["--resume", "logs/train-1"], "logs/train-1"),
        ([], None),
    ):
        args = parser.parse_args(["train", "--data", "d", "--labels", "l", *argv])
        assert from_args(TrainConfig, args).resume == resume
