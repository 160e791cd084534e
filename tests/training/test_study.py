import csv
import json
import sys

import numpy as np
import pytest
from PIL import Image

from em_unet.config import shipped_toml
from em_unet.errors import EmUnetError
from em_unet.reporting.plot import SERIES_KEY
from em_unet.training.study import (
    DEFAULT_RULES,
    STUDY_CONFIG,
    judge_experiment,
    late_trend,
    load_study,
    tail,
    worst_jump,
)
from tests.helpers import error_line, run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FALLING = np.linspace(1.0, 0.2, 20)
FLAT = np.r_[np.linspace(1.0, 0.5, 6), np.full(14, 0.5)]
U_SHAPED = np.r_[np.linspace(1.0, 0.4, 10), np.linspace(0.42, 0.6, 10)]


def test_seed_study_defines_the_four_experiments_as_the_issue_states():
    study = load_study()
    experiments = study["experiments"]
    assert list(experiments) == ["depth", "augmentation", "lr", "optimizer"]
    assert experiments["depth"]["values"] == [3, 4]
    assert experiments["augmentation"]["values"] == [False, True]
    assert experiments["lr"]["values"] == [1e-5, 1e-4, 1e-3] and experiments["lr"]["fixed"]["optimizer"] == "adam"
    assert experiments["optimizer"]["values"] == ["sgd", "adam", "adamax"]
    assert experiments["optimizer"]["fixed"]["learning_rate"] == 1e-4
    assert study["settings"]["epochs"] == 40
    quick = load_study(quick=True)["settings"]
    assert quick["epochs"] == 2 and quick["slices"] == [0, 1] and quick["base_filters"] <= 8


def test_curve_measures():
    assert late_trend(FALLING) == pytest.approx((0.2 - 0.6) / 0.6, rel=0.05) and abs(late_trend(FLAT)) < 1e-9
    assert late_trend(U_SHAPED) > 0.3
    noisy = FALLING * np.where(np.arange(20) % 2, 1.1, 0.9)  # a falling trend under 10 % epoch-to-epoch noise
    assert late_trend(noisy) < -0.5
    assert worst_jump(U_SHAPED) == (pytest.approx(0.5), 20) and worst_jump(FALLING)[0] == 0
    assert tail(np.arange(10.0)) == 7.0


def test_conclusions_are_judged_on_the_numbers_both_ways():
    original = {3: {"loss": FALLING, "val_loss": FLAT}, 4: {"loss": FALLING, "val_loss": FALLING}}
    verdict, checks = judge_experiment({"claim": "depth"}, original, DEFAULT_RULES)
    assert verdict == "holds" and all(c.holds for c in checks)
    reversed_ = {3: {"loss": FALLING, "val_loss": FALLING}, 4: {"loss": FLAT, "val_loss": FLAT}}
    verdict, checks = judge_experiment({"claim": "depth"}, reversed_, DEFAULT_RULES)
    assert verdict == "partly holds" and [c.holds for c in checks] == [True, False, False, False]

    lr = {
        1e-5: {"loss": FLAT, "val_loss": FLAT + 0.3},
        1e-4: {"loss": FALLING, "val_loss": FALLING},
        1e-3: {"loss": FALLING, "val_loss": U_SHAPED},
    }
    assert judge_experiment({"claim": "lr"}, lr, DEFAULT_RULES)[0] == "holds"
    lr[1e-3] = {"loss": FALLING, "val_loss": FALLING * 0.5}
    verdict, checks = judge_experiment({"claim": "lr"}, lr, DEFAULT_RULES)
    assert verdict == "partly holds" and [c.holds for c in checks] == [True, False, False]

    augmentation = {False: {"loss": FALLING * 0.5, "val_loss": U_SHAPED}, True: {"loss": FALLING, "val_loss": FALLING}}
    assert judge_experiment({"claim": "augmentation"}, augmentation, DEFAULT_RULES)[0] == "holds"
    optimizer = {
        "sgd": {"loss": np.full(20, 0.69), "val_loss": np.full(20, 0.69)},
        "adam": {"loss": FALLING * 0.5, "val_loss": U_SHAPED},
        "adamax": {"loss": FALLING, "val_loss": FALLING},
    }
    assert judge_experiment({"claim": "optimizer"}, optimizer, DEFAULT_RULES)[0] == "holds"
    assert judge_experiment({"claim": "optimizer"}, {"sgd": optimizer["sgd"]}, DEFAULT_RULES)[0].startswith(
        "not checked"
    )
    assert judge_experiment({"claim": "mine"}, optimizer, DEFAULT_RULES)[0].startswith("not checked")


@pytest.mark.parametrize(
    "change, message",
    [
        ("[experiments.depth]\nfactor = 'colour'\nvalues = [1, 2]", "factor 'colour' is not a training setting"),
        ("[experiments.depth]\nfactor = 'depth'\nvalues = [3]", "values must list at least two"),
        ("[experiments.depth]\nfactor = 'depth'\nvalues = [3, 4]\nlabels = ['a']", "labels must name each"),
        ("[study]\nepoch = 3\n[experiments.depth]\nfactor = 'depth'\nvalues = [3, 4]", "unknown settings 'epoch'"),
        ("[study]\nepochs = 0\n[experiments.depth]\nfactor = 'depth'\nvalues = [3, 4]", "[study]: --epochs = 0"),
        ("[study]\nloss = 'l1'\n[experiments.depth]\nfactor = 'depth'\nvalues = [3, 4]", "--loss = 'l1'"),
        (
            "[study]\nelastic_backend = 'scipy'\n[experiments.depth]\nfactor = 'depth'\nvalues = [3, 4]",
            "--elastic-backend = 'scipy'",
        ),
        (
            "[experiments.depth]\nfactor = 'depth'\nvalues = [3, 4]\nfixed = { augment_placement = 'gpu' }",
            "--augment-placement = 'gpu'",
        ),
        ("[experiments.depth]\nfactor = 'depth'\nvalues = [3, 0]", "--depth = 0"),
        ("[study\n", "not valid TOML"),
        ("[study]\nepochs = 3\n", "no [experiments.<name>] tables"),
    ],
)
def test_bad_study_files_are_named(tmp_path, change, message):
    path = tmp_path / "study.toml"
    path.write_text(change)
    with pytest.raises(EmUnetError) as err:
        load_study(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_missing_study_file_and_unknown_experiment_are_one_line_errors(isbi_dir, tmp_path):
    data = ["--data", isbi_dir / "train-volume.tif", "--labels", isbi_dir / "train-labels.tif"]
    missing = run_cli("study", *data, "--config", tmp_path / "none.toml", "--logs-dir", tmp_path)
    assert missing.returncode == 2 and "none.toml: no such study file" in error_line(missing)
    unknown = run_cli("study", *data, "--quick", "--experiments", "depth,colour", "--logs-dir", tmp_path)
    assert unknown.returncode == 2 and "unknown experiments ['colour']" in error_line(unknown)
    bad_data = run_cli(
        "study",
        "--data",
        tmp_path / "none.tif",
        "--labels",
        isbi_dir / "train-labels.tif",
        "--quick",
        "--logs-dir",
        tmp_path,
    )
    assert bad_data.returncode == 2 and "none.tif" in error_line(bad_data)
    assert not (tmp_path / "study-quick").exists()


@pytest.mark.slow
def test_quick_study_end_to_end_resumes_and_keeps_what_it_finished(isbi_dir, tmp_path):
    data = ["--data", isbi_dir / "train-volume.tif", "--labels", isbi_dir / "train-labels.tif"]
    args = ["study", *data, "--quick", "--logs-dir", tmp_path / "logs"]
    result = run_cli(*args, timeout=1200)
    assert result.returncode == 0, result.stderr
    root = tmp_path / "logs" / "study-quick"
    report = root / "report"
    study = tomllib.loads(shipped_toml(STUDY_CONFIG))["experiments"]
    rows = list(csv.DictReader(open(report / "summary.csv")))
    assert len(rows) == sum(len(e["values"]) for e in study.values()) == 10
    markdown = (report / "report.md").read_text()
    overview = json.loads(Image.open(report / "overview.png").text[SERIES_KEY])
    for name, experiment in study.items():
        labels = experiment.get("labels") or [f"{experiment['factor']} {v}" for v in experiment["values"]]
        drawn = json.loads(Image.open(report / f"{name}.png").text[SERIES_KEY])
        assert drawn == [f"{label}/{key}" for label in labels for key in ("loss", "val_loss")]
        assert set(drawn) <= set(overview)
        assert f"![{name}]({name}.png)" in markdown and experiment["title"] in markdown
        for label in labels:
            assert f"| {label} |" in markdown
            row = next(r for r in rows if r["experiment"] == name and r["variant"] == label)
            assert int(row["epochs"]) == 2 and float(row["min_val_loss"]) > 0 and 0 <= float(row["v_rand"]) <= 1
        # each variant is a run folder with TensorBoard logs
        for folder in (root / name).iterdir():
            assert any((folder / "train").glob("events.out.tfevents.*")), folder
    assert markdown.count("On this run the original conclusion **") == 4
    assert "trained once and copied" in markdown

    # resume: nothing is trained again; an interrupted variant is set aside and rerun
    (root / "lr" / "lr-1e-3" / "scores.json").unlink()
    again = run_cli(*args, timeout=1200)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished earlier, kept") == 9
    assert "lr / lr 1e-3: an interrupted run was moved to" in again.stdout
    assert again.stdout.count("training 2 epochs") == 1
    assert len(list((root / ".interrupted").iterdir())) == 1

    # other settings on top of finished runs: refused, nothing touched
    before = (root / "depth" / "depth-3" / "history.csv").read_text()
    clash = run_cli(*args, "--epochs", "3")
    assert clash.returncode == 2 and "holds a finished run with other settings (epochs: 2 there, 3 now)" in error_line(
        clash
    )
    assert (root / "depth" / "depth-3" / "history.csv").read_text() == before


def test_a_finished_run_from_before_a_setting_existed_is_not_a_clash(tmp_path):
    from em_unet.config import TrainConfig
    from em_unet.training.study import Variant, _check_finished_matches

    config = TrainConfig(data="a.tif", labels="b.tif", logs_dir=str(tmp_path), run_name="v", epochs=2, val_every=1)
    variant = Variant("lr", "lr 1e-3", 1e-3, config)
    variant.run_dir.mkdir()
    recorded = {k: v for k, v in config.to_dict().items() if k != "val_every"}  # written before --val-every
    (variant.run_dir / "config.json").write_text(json.dumps(recorded))
    _check_finished_matches(variant)
    (variant.run_dir / "config.json").write_text(json.dumps({**recorded, "epochs": 3}))
    with pytest.raises(EmUnetError, match="epochs: 3 there, 2 now"):
        _check_finished_matches(variant)
