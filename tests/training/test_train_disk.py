"""The export's disk space: train and tune refuse, before training, a --models-dir without room for it; an export
that fails all the same names the kept best.keras and the command that exports it."""

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from em_unet import cli
from tests.helpers import small_isbi, tiny_flags


@pytest.fixture
def stack(isbi_dir, tmp_path):
    small_isbi(isbi_dir, tmp_path)
    return tmp_path


def full_disk(monkeypatch, folder, free_bytes=4096):
    """Make ``os.statvfs`` report ``free_bytes`` free in ``folder`` (every other folder as it is)."""
    real = os.statvfs

    def statvfs(path):
        stats = real(path)
        if Path(path).resolve() == Path(folder).resolve():
            return SimpleNamespace(f_bavail=free_bytes // 4096, f_frsize=4096, f_flag=stats.f_flag)
        return stats

    monkeypatch.setattr(os, "statvfs", statvfs)


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("em-unet: error: "), err
    return err[0]


def test_the_parameter_count_is_the_built_unets():
    from em_unet.training.model import build_unet, unet_parameter_count

    for depth, filters, batch_norm in ((1, 2, False), (2, 4, False), (3, 4, True), (4, 16, False), (2, 8, True)):
        built = build_unet(depth, filters, batch_norm=batch_norm).count_params()
        assert unet_parameter_count(depth, filters, batch_norm) == built, (depth, filters, batch_norm)


def test_train_refuses_a_models_dir_without_room_for_the_export(stack, capsys, monkeypatch):
    models, logs = stack / "models", stack / "logs"
    models.mkdir()
    full_disk(monkeypatch, models)
    argv = ["train", *tiny_flags(stack), "--logs-dir", logs, "--models-dir", models, "--run-name", "full"]
    assert cli.main([str(a) for a in argv]) == 2
    line = error_line(capsys)
    assert f"{models}: 4.0 KiB free but " in line and "MiB needed for the export" in line, line
    assert not any(models.iterdir()) and not logs.exists()  # refused before the run folder and its lock


def test_tune_refuses_a_models_dir_without_room_for_the_largest_export(stack, capsys, monkeypatch):
    from em_unet.config import TrainConfig
    from em_unet.training.model import unet_parameter_count
    from em_unet.training.tune import largest_parameters

    base = TrainConfig(data="x", labels="y", depth=2, base_filters=4)
    space = {"depth": [2, 3], "base_filters": {"min": 2, "max": 8}, "batch_norm": [False, True]}
    assert largest_parameters(space, base) == unet_parameter_count(3, 8, True)
    assert largest_parameters({}, base) == unet_parameter_count(2, 4, False)

    models, logs = stack / "models", stack / "logs"
    models.mkdir()
    full_disk(monkeypatch, models)
    argv = ["tune", *tiny_flags(stack), "--logs-dir", logs, "--models-dir", models]
    assert cli.main([str(a) for a in argv]) == 2
    line = error_line(capsys)
    assert f"{models}: 4.0 KiB free but " in line and "needed for the export" in line, line
    assert not any(models.iterdir()) and not logs.exists()


@pytest.mark.slow
def test_a_failed_export_names_the_kept_best_model_and_how_to_export_it(stack, capsys, monkeypatch):
    from em_unet.training import train as train_module

    models, logs = stack / "models", stack / "logs"
    run_dir = logs / "r"
    argv = [str(a) for a in ["train", *tiny_flags(stack, epochs=2), "--logs-dir", logs, "--models-dir", models]]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "export_saved_model", disk_full)
        assert cli.main([*argv, "--run-name", "r"]) == 2
    line = error_line(capsys)
    assert "No space left on device" in line, line
    assert f"em-unet export {run_dir / 'best.keras'} --models-dir {models} --model-name em_unet" in line, line
    assert (run_dir / "best.keras").is_file() and not (run_dir / "scores.json").exists()

    # the run is not finished: --resume trains nothing more, scores and exports
    assert cli.main([*argv, "--resume", str(run_dir)]) == 0, capsys.readouterr().err
    assert (run_dir / "scores.json").is_file() and (models / "em_unet" / "1" / "saved_model.pb").is_file()
    assert not (run_dir / "backup").exists()
