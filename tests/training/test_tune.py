import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from em_unet.errors import EmUnetError
from em_unet.training.tune import load_search_space
from tests.helpers import error_line, run_cli, small_isbi, tiny_flags

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass

REPO = Path(__file__).resolve().parents[2]


def test_default_search_space_ships_in_the_package():
    from em_unet.config import shipped_toml

    assert shipped_toml("default.toml") == (REPO / "tuning" / "default.toml").read_text()
    space = load_search_space(None)
    assert space["space"]["optimizer"] == ["sgd", "adam", "adamax"] and space["tuner"]["algorithm"] == "hyperband"


BAD_SPACES = [
    ("[tuner\nalgorithm = ", "not valid TOML"),
    ("[space]\nwidth = [1, 2]\n", "unknown search-space entries ['width']"),
    ("[space]\noptimizer = ['adam', 'rmsprop']\n", "--optimizer = 'rmsprop': must be one of sgd, adam, adamax"),
    ("[space]\nlearning_rate = { min = 1e-3, max = 1e-5 }\n", "min 0.001 must be below max 1e-05"),
    ("[space]\nlearning_rate = { min = 0.0, max = 1e-3, sampling = 'linear' }\n", "learning_rate.min"),
    ("[space]\nlearning_rate = { min = 1e-5, max = 1e-3, sampling = 'cubic' }\n", "sampling 'cubic'"),
    ("[space]\noptimizer = []\n", "list at least one value"),
    ("[space]\ndepth = [3, 0]\n", "--depth = 0: must be an integer >= 1"),
    ("[space]\noptimizer = { min = 1, max = 2 }\n", "a range needs a numeric setting"),
    ("[tuner]\nalgorithm = 'annealing'\n", "--tuner (algorithm) = 'annealing': must be one of hyperband"),
    ("[tuner]\nmax_epochs = 3\n", "unknown settings 'max_epochs'"),
    ("[tuner]\nmax_trials = 0\n", "--max-trials = 0: must be an integer >= 1"),
    ("[search]\nx = 1\n", "unknown tables ['search']"),
]


@pytest.mark.parametrize("text, message", BAD_SPACES)
def test_bad_search_spaces_are_refused_naming_the_entry(tmp_path, text, message):
    (tmp_path / "space.toml").write_text(text)
    with pytest.raises(EmUnetError) as err:
        load_search_space(tmp_path / "space.toml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_search_space_file_and_folder(tmp_path):
    with pytest.raises(EmUnetError, match="no such search-space file"):
        load_search_space(tmp_path / "missing.toml")
    with pytest.raises(EmUnetError, match="is a folder"):
        load_search_space(tmp_path)


def test_search_settings_defaults_then_toml_then_flags(tmp_path):
    from em_unet.training.tune import search_settings

    assert search_settings().algorithm == "hyperband" and search_settings().max_trials == 12
    (tmp_path / "space.toml").write_text('[tuner]\nalgorithm = "random"\nmax_trials = 5\n')
    from_toml = search_settings(tmp_path / "space.toml")
    assert (from_toml.algorithm, from_toml.max_trials) == ("random", 5)
    flagged = search_settings(given={"search_space": str(tmp_path / "space.toml"), "max_trials": 2})
    assert (flagged.algorithm, flagged.max_trials, flagged.search_space) == ("random", 2, str(tmp_path / "space.toml"))


def tune_args(folder, space, project="tiny", patch="32", steps="2"):
    flags = tiny_flags(folder, steps=steps, patch_size=patch, batch_size=4, precision="auto")
    where = ["--search-space", space, "--project", project, "--logs-dir", folder / "logs", "--models-dir"]
    return ["tune", *flags, *where, folder / "models"]


def read_results(run):
    with open(run / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_tune_export_serve_predict_evaluate_end_to_end(isbi_dir, tmp_path):
    """The main job through the CLI: tune 2 trials, export, load the SavedModel in a fresh process,
    predict a 2-slice stack with tiling, evaluate; then re-running the same command resumes."""
    small_isbi(isbi_dir, tmp_path, slices=3, size=128)
    space = tmp_path / "space.toml"
    space.write_text(
        '[tuner]\nalgorithm = "random"\nmax_trials = 2\n\n'
        '[space]\noptimizer = ["adam", "adamax"]\nlearning_rate = { min = 1e-4, max = 1e-3 }\n'
        "augment = [true, false]\n"
    )
    args = tune_args(tmp_path, space, patch="64") + ["--epochs", "1"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "logs" / "tune" / "tiny"
    rows = read_results(run)
    assert len(rows) == 2 and {"optimizer", "learning_rate", "augment", "best_val_loss", "epochs"} <= set(rows[0])
    assert "best hyperparameters" in first.stdout
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert {p.relative_to(run / "tensorboard").parts[0] for p in events} >= {r["trial"] for r in rows}
    assert any(b"hparams" in p.read_bytes() for p in events)  # the HParams dashboard's data

    version = tmp_path / "models" / "em_unet" / "1"
    stack = tifffile.imread(tmp_path / "img.tif")[:2]
    np.save(tmp_path / "x.npy", (stack[..., None] / 255.0).astype(np.float32))
    served = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, numpy as np, tensorflow as tf; "
            "f = tf.saved_model.load(sys.argv[1]).signatures['serving_default']; "
            "p = f(image=tf.constant(np.load(sys.argv[2])))['membrane_probability'].numpy(); "
            "assert 'em_unet' not in sys.modules; np.save(sys.argv[3], p)",
            str(version),
            str(tmp_path / "x.npy"),
            str(tmp_path / "served.npy"),
        ],
        capture_output=True,
        text=True,
    )
    assert served.returncode == 0, served.stderr
    tifffile.imwrite(tmp_path / "two.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "two-labels.tif", tifffile.imread(tmp_path / "lab.tif")[:2], photometric="minisblack")
    predict = run_cli(
        "predict",
        tmp_path / "models" / "em_unet",
        tmp_path / "two.tif",
        "-o",
        tmp_path / "p.tif",
        "--tile",
        "64",
        "--margin",
        "8",
        "--overlap",
        "8",
    )
    assert predict.returncode == 0, predict.stderr
    probability = tifffile.imread(tmp_path / "p.tif")
    assert probability.shape == (2, 128, 128)
    assert np.abs(probability - np.load(tmp_path / "served.npy")[..., 0]).mean() < 0.05  # tiles vs whole slice
    evaluate = run_cli("evaluate", tmp_path / "p.tif", tmp_path / "two-labels.tif", "-o", tmp_path / "s.json")
    assert evaluate.returncode == 0, evaluate.stderr
    assert 0.0 <= json.loads((tmp_path / "s.json").read_text())["v_rand"] <= 1.0

    second = run_cli(*args)  # resumes: no trial runs again
    assert second.returncode == 0, second.stderr
    assert "Epoch 1/1" not in second.stdout + second.stderr
    assert [r["trial"] for r in read_results(run)] == [r["trial"] for r in rows]
    assert "exported before" in second.stdout  # a finished search does not export a duplicate version
    assert sorted(p.name for p in (tmp_path / "models" / "em_unet").iterdir()) == ["1"]

    bad = run_cli(*args[:-6], "--search-space", tmp_path / "nope.toml")
    assert bad.returncode == 2 and "no such search-space file" in error_line(bad)


@pytest.mark.slow
def test_tune_killed_mid_trial_resumes(isbi_dir, tmp_path):
    small_isbi(isbi_dir, tmp_path)
    space = tmp_path / "space.toml"
    space.write_text(
        '[tuner]\nalgorithm = "random"\nmax_trials = 3\n\n'
        '[space]\noptimizer = ["sgd", "adam", "adamax"]\nlearning_rate = [1e-4, 3e-4, 1e-3]\n'
    )
    args = tune_args(tmp_path, space, steps="6") + ["--epochs", "3"]
    command = [sys.executable, "-m", "em_unet.cli", *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "logs" / "tune" / "tiny"
    deadline = time.monotonic() + 300
    try:
        # wait until the second trial is running, then kill the search without warning
        while time.monotonic() < deadline and process.poll() is None:
            states = [json.loads(p.read_text()).get("status") for p in run.glob("trial_*/trial.json")]
            if states.count("COMPLETED") >= 1 and "RUNNING" in states:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the search ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert not (run / "results.csv").exists()
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_results(run)
    assert sorted(r["trial"] for r in rows) == ["0", "1", "2"]
    assert (tmp_path / "models" / "em_unet" / "1" / "saved_model.pb").exists()


def tiny_tune(folder, project, *extra):
    from em_unet import cli

    where = ["--project", project, "--logs-dir", folder / "logs", "--models-dir", folder / "models"]
    return cli.main(["tune", *tiny_flags(folder), *map(str, where), *map(str, extra)])


def trial_values(folder, project):
    trials = sorted((folder / "logs" / "tune" / project).glob("trial_*/trial.json"))
    values = [json.loads(t.read_text())["hyperparameters"]["values"] for t in trials]
    return [{k: v for k, v in value.items() if not k.startswith("tuner/")} for value in values]


def epochs_run(folder, project):
    """Epochs each trial ran, from its TensorBoard logs (KerasTuner records only the best epoch)."""
    from em_unet.reporting.history import read_history

    runs = sorted((folder / "logs" / "tune" / project / "tensorboard").glob("*/execution0"))
    return [len(read_history(run)["val_loss"]) for run in runs]


@pytest.mark.slow
def test_tune_seed_gives_the_same_trials_in_the_same_order(isbi_dir, tmp_path):
    """KerasTuner turns a seed of 0 into a random one; em-unet's oracle keeps it."""
    small_isbi(isbi_dir, tmp_path, slices=3, size=32)
    for project, seed in (("a", 0), ("b", 0), ("c", 7)):
        assert (
            tiny_tune(tmp_path, project, "--tuner", "random", "--max-trials", "3", "--epochs", "1", "--seed", seed) == 0
        )
    assert len(trial_values(tmp_path, "a")) == 3
    assert trial_values(tmp_path, "a") == trial_values(tmp_path, "b")
    assert trial_values(tmp_path, "a") != trial_values(tmp_path, "c")


@pytest.mark.slow
def test_tune_honours_epochs_early_stopping_and_max_minutes(isbi_dir, tmp_path):
    small_isbi(isbi_dir, tmp_path, slices=3, size=32)
    fixed = tmp_path / "fixed.toml"  # one optimizer and a learning rate too small to change any weight
    fixed.write_text(
        '[tuner]\nalgorithm = "random"\nmax_trials = 2\n[space]\noptimizer = ["adam"]\nlearning_rate = [1e-12, 2e-12]\n'
    )
    assert tiny_tune(tmp_path, "epochs", "--search-space", fixed, "--epochs", "3") == 0
    assert epochs_run(tmp_path, "epochs") == [3, 3]
    # val_loss cannot improve; validations after epochs 1, 2, 4 and 6; patience 3 epochs = 2 validations:
    # each trial stops after its fourth epoch
    patience = ["--epochs", "6", "--val-every", "2", "--early-stopping", "3"]
    assert tiny_tune(tmp_path, "patience", "--search-space", fixed, *patience) == 0
    assert epochs_run(tmp_path, "patience") == [4, 4]
    # a limit that passes before the first trial: no trial starts, nothing is exported
    assert tiny_tune(tmp_path, "minutes", "--search-space", fixed, "--epochs", "5", "--max-minutes", "0.0001") == 2
    assert epochs_run(tmp_path, "minutes") == []
    record = json.loads((tmp_path / "logs" / "tune" / "minutes" / "search.json").read_text())
    assert record["base"]["epochs"] == 5 and record["base"]["max_minutes"] == 0.0001


def test_oracle_starts_no_trial_after_the_deadline_and_keeps_seed_zero(tmp_path):
    import keras_tuner as kt

    from em_unet.training.distribute import oracle_class

    def make(deadline):
        oracle = oracle_class(kt.oracles.RandomSearchOracle)(
            objective="val_loss", max_trials=5, seed=0, deadline=deadline, log=lambda *a, **k: None
        )
        oracle.hyperparameters.Choice("optimizer", ["sgd", "adam", "adamax"])
        oracle._set_project_dir(str(tmp_path), "p")
        return oracle

    assert make(None).seed == 0
    assert make(time.monotonic() - 1).create_trial("t0").status == "STOPPED"
    assert make(time.monotonic() + 600).create_trial("t0").status == "RUNNING"


def test_time_limit_with_a_shared_deadline_stops_at_an_epoch_end():
    import keras

    from em_unet.training.assembly import TimeLimit
    from em_unet.training.model import build_unet

    model = build_unet(depth=2, base_filters=4)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    images = np.random.default_rng(0).random((2, 16, 16, 1), dtype=np.float32)
    history = model.fit(images, images > 0.5, epochs=4, verbose=0, callbacks=[TimeLimit(deadline=time.monotonic())])
    assert len(history.history["loss"]) == 1
    keras.backend.clear_session()


def test_tune_does_not_offer_run_name(capsys):
    from em_unet import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["tune", "--data", "a", "--labels", "b", "--run-name", "x"])
    assert exit_.value.code == 2 and "unrecognized arguments: --run-name" in capsys.readouterr().err


def run_hyperband_oracle(folder, max_epochs, factor):
    """Drive KerasTuner's own Hyperband oracle (our mixin on it) to its end, as one worker would, with
    made-up scores: the trials and epochs it actually hands out."""
    import random

    import keras_tuner as kt

    from em_unet.training.distribute import oracle_class

    oracle = oracle_class(kt.oracles.HyperbandOracle)(
        objective="val_loss", max_epochs=max_epochs, factor=factor, seed=1, log=lambda *a, **k: None
    )
    oracle.hyperparameters.Float("learning_rate", 1e-5, 1e-3, sampling="log")
    oracle._set_project_dir(str(folder), "hb")
    trials = epochs = 0
    while True:
        trial = oracle.create_trial("tuner0")
        if trial.status == "STOPPED":
            break
        values = trial.hyperparameters.values
        trials, epochs = trials + 1, epochs + values["tuner/epochs"] - values["tuner/initial_epoch"]
        oracle.update_trial(trial.trial_id, {"val_loss": random.random()})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)
    return oracle, trials, epochs


@pytest.mark.parametrize("max_epochs, factor", [(40, 3), (2, 2), (9, 3), (10, 4), (1, 3)])
def test_hyperband_size_is_what_keras_tuner_runs(tmp_path, max_epochs, factor):
    oracle, trials, epochs = run_hyperband_oracle(tmp_path, max_epochs, factor)
    assert oracle.search_size() == (trials, epochs)


def test_default_search_size():
    import keras_tuner as kt

    from em_unet.config import TrainConfig
    from em_unet.training.distribute import oracle_class

    search = load_search_space(None)["tuner"]
    epochs = TrainConfig.field("epochs").default
    oracle = oracle_class(kt.oracles.HyperbandOracle)(
        objective="val_loss", max_epochs=epochs, factor=search["hyperband_factor"], log=lambda *a, **k: None
    )
    assert oracle.search_size() == (90, 754)  # the README's figures


def test_settings_round_trip_through_flags():
    from em_unet import cli
    from em_unet.config import TUNE_EXCLUDED, SearchConfig, TrainConfig
    from em_unet.settings import from_args, to_flags

    base = TrainConfig(
        data="a.tif",
        labels="b.tif",
        val_slices=(3, 4),
        augment=False,
        batch_norm=True,
        lr_schedule="cosine",
        learning_rate=1e-4,
    )
    search = SearchConfig(algorithm="random", max_trials=5, workers=2, worker_timeout=30.5, project="p")
    args = cli.build_parser().parse_args(["tune", *to_flags(base, TUNE_EXCLUDED), *to_flags(search)])
    assert from_args(TrainConfig, args) == base and from_args(SearchConfig, args) == search


@pytest.mark.slow
def test_tune_prints_trial_k_of_the_hyperband_total(isbi_dir, tmp_path, capsys):
    small_isbi(isbi_dir, tmp_path, slices=3, size=32)
    # --epochs 2, factor 2: brackets of 2 + 1 trials (1 epoch, then 1 more) and 2 trials of 2 epochs
    assert tiny_tune(tmp_path, "hb", "--tuner", "hyperband", "--hyperband-factor", "2", "--epochs", "2") == 0
    out = capsys.readouterr().out
    assert len(trial_values(tmp_path, "hb")) == 5
    progress = re.findall(r"em-unet: trial (\d+) of (\d+) finished .*per epoch\); (\d+) epochs left; about", out)
    assert [(int(k), int(n)) for k, n, _ in progress] == [(k, 5) for k in range(1, 6)]
    assert int(progress[-1][2]) == 0


def test_keras_tuners_best_epoch_checkpoint_ignores_epochs_without_validation():
    import keras
    import keras_tuner as kt

    from em_unet.training.tune import only_on_validated_epochs

    class Checkpoint(keras.callbacks.Callback):  # KerasTuner's SaveBestEpoch saves when the objective is missing
        objective = kt.Objective("val_loss", "min")
        saved: list[int] = []

        def on_epoch_end(self, epoch, logs=None):
            self.saved.append(epoch)

    checkpoint = Checkpoint()
    only_on_validated_epochs(checkpoint)
    for epoch, logs in enumerate([{"loss": 1, "val_loss": 1}, {"loss": 0.9}, {"loss": 0.8, "val_loss": 0.7}]):
        checkpoint.on_epoch_end(epoch, logs)
    assert checkpoint.saved == [0, 2]
