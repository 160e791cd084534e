import csv
import sys
from pathlib import Path

import pytest
import tifffile

from em_unet.errors import EmUnetError
from em_unet.tune import DEFAULT_SEARCH_SPACE, load_search_space
from tests.helpers import error_line, run_cli

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


@pytest.mark.slow
def test_tune_two_trials_then_resume(isbi_dir, tmp_path):
    images = tifffile.imread(isbi_dir / "train-volume.tif")[:3, :64, :64]
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[:3, :64, :64]
    tifffile.imwrite(tmp_path / "img.tif", images, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    space = tmp_path / "space.toml"
    space.write_text('[tuner]\nalgorithm = "random"\nmax_trials = 2\nmax_epochs = 1\n\n'
                     '[space]\noptimizer = ["adam", "adamax"]\nlearning_rate = { min = 1e-4, max = 1e-3 }\n'
                     'augment = [true, false]\n')
    args = ["tune", "--data", tmp_path / "img.tif", "--labels", tmp_path / "lab.tif", "--val-slices", "2-2",
            "--depth", "2", "--base-filters", "4", "--patch-size", "32", "--steps-per-epoch", "2",
            "--search-space", space, "--project", "tiny", "--logs-dir", tmp_path / "logs",
            "--models-dir", tmp_path / "models"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "logs" / "tune" / "tiny"
    with open(run / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {"optimizer", "learning_rate", "augment", "best_val_loss", "epochs"} <= set(rows[0])
    assert (tmp_path / "models" / "em_unet" / "1" / "saved_model.pb").exists()
    assert len(list((run / "tensorboard").rglob("events.out.tfevents.*"))) >= 2
    assert "best hyperparameters" in first.stdout

    second = run_cli(*args)  # resumes: no trial runs again
    assert second.returncode == 0, second.stderr
    assert "Epoch 1/1" not in second.stdout + second.stderr
    with open(run / "results.csv") as handle:
        assert [r["trial"] for r in csv.DictReader(handle)] == [r["trial"] for r in rows]

    bad = run_cli(*args[:-4], "--search-space", tmp_path / "nope.toml")
    assert bad.returncode == 2 and "no such search-space file" in error_line(bad)
