import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from em_unet.errors import EmUnetError
from em_unet.tune import DEFAULT_SEARCH_SPACE, load_search_space
from tests.helpers import error_line, run_cli, small_isbi

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_builtin_default_equals_tuning_default_toml():
    assert tomllib.loads((REPO / "tuning" / "default.toml").read_text()) == DEFAULT_SEARCH_SPACE
    assert load_search_space(REPO / "tuning" / "default.toml") == load_search_space(None)


def test_bad_search_space_files(tmp_path):
    (tmp_path / "bad.toml").write_text("[tuner\nalgorithm = ")
    with pytest.raises(EmUnetError, match="not valid TOML"):
        load_search_space(tmp_path / "bad.toml")
    (tmp_path / "odd.toml").write_text('[space]\nwidth = [1, 2]\n')
    with pytest.raises(EmUnetError, match=r"unknown search-space entries \['width'\]"):
        load_search_space(tmp_path / "odd.toml")
    with pytest.raises(EmUnetError, match="no such search-space file"):
        load_search_space(tmp_path / "missing.toml")


def tune_args(folder, space, project="tiny", patch="32", steps="2"):
    return ["tune", "--data", folder / "img.tif", "--labels", folder / "lab.tif", "--val-slices", "2-2",
            "--depth", "2", "--base-filters", "4", "--patch-size", patch, "--steps-per-epoch", steps,
            "--search-space", space, "--project", project, "--logs-dir", folder / "logs",
            "--models-dir", folder / "models"]


def read_results(run):
    with open(run / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_tune_export_serve_predict_evaluate_end_to_end(isbi_dir, tmp_path):
    """The main job through the CLI: tune 2 trials, export, load the SavedModel in a fresh process,
    predict a 2-slice stack with tiling, evaluate; then re-running the same command resumes."""
    small_isbi(isbi_dir, tmp_path, slices=3, size=128)
    space = tmp_path / "space.toml"
    space.write_text('[tuner]\nalgorithm = "random"\nmax_trials = 2\nmax_epochs = 1\n\n'
                     '[space]\noptimizer = ["adam", "adamax"]\nlearning_rate = { min = 1e-4, max = 1e-3 }\n'
                     'augment = [true, false]\n')
    args = tune_args(tmp_path, space, patch="64")
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
        [sys.executable, "-c", "import sys, numpy as np, tensorflow as tf; "
         "f = tf.saved_model.load(sys.argv[1]).signatures['serving_default']; "
         "p = f(image=tf.constant(np.load(sys.argv[2])))['membrane_probability'].numpy(); "
         "assert 'em_unet' not in sys.modules; np.save(sys.argv[3], p)",
         str(version), str(tmp_path / "x.npy"), str(tmp_path / "served.npy")],
        capture_output=True, text=True)
    assert served.returncode == 0, served.stderr
    tifffile.imwrite(tmp_path / "two.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "two-labels.tif", tifffile.imread(tmp_path / "lab.tif")[:2], photometric="minisblack")
    predict = run_cli("predict", tmp_path / "models" / "em_unet", tmp_path / "two.tif", "-o", tmp_path / "p.tif",
                      "--tile", "64", "--margin", "8", "--overlap", "8")
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

    bad = run_cli(*args[:-4], "--search-space", tmp_path / "nope.toml")
    assert bad.returncode == 2 and "no such search-space file" in error_line(bad)


@pytest.mark.slow
def test_tune_killed_mid_trial_resumes(isbi_dir, tmp_path):
    small_isbi(isbi_dir, tmp_path)
    space = tmp_path / "space.toml"
    space.write_text('[tuner]\nalgorithm = "random"\nmax_trials = 3\nmax_epochs = 3\n\n'
                     '[space]\noptimizer = ["sgd", "adam", "adamax"]\nlearning_rate = [1e-4, 3e-4, 1e-3]\n')
    args = tune_args(tmp_path, space, steps="6")
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
