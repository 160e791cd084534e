"""Resumable training: a run killed (SIGKILL of its process group) or stopped with Ctrl-C continues with
--resume and ends as the uninterrupted run would; the run folder is locked while a run trains in it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from em_unet import cli
from em_unet.config import TrainConfig
from em_unet.reporting.history import read_history
from tests.helpers import interruptible, small_isbi, tiny_flags

DEADLINE_S = 300  # for a subprocess to reach an epoch: TensorFlow's start-up on a loaded machine included


def flags(folder, **changes):
    """A tiny run on 3 ISBI slices of 128 px, about half a second an epoch."""
    settings = {"steps": 8, "patch_size": 64, "epochs": 8, "val_every": 1, "seed": 3, **changes}
    return tiny_flags(folder, **settings)


@pytest.fixture
def stack(isbi_dir, tmp_path):
    small_isbi(isbi_dir, tmp_path, slices=3, size=128)
    return tmp_path


def start_training(argv, folder):
    """``em-unet train`` in its own process group, its output in files of ``folder``."""
    out, err = open(folder / "stdout.txt", "w"), open(folder / "stderr.txt", "w")
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "em_unet.cli", "train", *map(str, argv)],
        stdout=out,
        stderr=err,
        env=environment,
        start_new_session=True,
        preexec_fn=interruptible,
    )
    out.close()
    err.close()
    return process


def wait_for_backup(process, run_dir, epoch, folder):
    """Wait until the run's backup holds ``epoch`` epochs or more; return how many it holds."""
    state = run_dir / "backup" / "state.json"
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert process.poll() is None, (folder / "stderr.txt").read_text()
        try:
            done = json.loads(state.read_text())["epoch"]
        except (OSError, ValueError):
            done = -1
        if done >= epoch:
            return done
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no backup of epoch {epoch} within {DEADLINE_S} s")


def history_rows(run_dir):
    lines = (run_dir / "history.csv").read_text().splitlines()
    return lines[0].split(","), np.array([[float(v) for v in line.split(",")] for line in lines[1:]])


def weights(path):
    return keras.saving.load_model(path, compile=False).get_weights()


def main(argv):
    return cli.main(["train", *map(str, argv)])


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_result(stack, capsys):
    """SIGKILL after epoch 2 or later, --resume RUN_DIR in-process: history.csv, the TensorBoard curve, best.keras,
    the scores and the export equal those of an uninterrupted run of the same command."""
    argv = flags(stack)
    killed, whole = stack / "killed", stack / "whole"
    run_dir = killed / "logs" / "r"
    process = start_training(
        [*argv, "--logs-dir", killed / "logs", "--models-dir", killed / "models", "--run-name", "r"], stack
    )
    done = wait_for_backup(process, run_dir, 2, stack)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert done < 8 and not (run_dir / "scores.json").exists()
    assert (killed / "logs" / "r.lock").exists()  # left by the killed process: stale

    resumed = [*argv, "--logs-dir", killed / "logs", "--models-dir", killed / "models", "--resume", run_dir]
    assert main(resumed) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "taking its lock over" in captured.err
    assert f"resumed {run_dir} after epoch" in captured.out
    assert main([*argv, "--logs-dir", whole / "logs", "--models-dir", whole / "models", "--run-name", "r"]) == 0

    header, rows = history_rows(run_dir)
    whole_header, whole_rows = history_rows(whole / "logs" / "r")
    assert header == whole_header and rows.shape == whole_rows.shape == (8, len(header))
    assert rows[:, 0].tolist() == list(range(8))
    np.testing.assert_allclose(rows, whole_rows, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(weights(run_dir / "best.keras"), weights(whole / "logs" / "r" / "best.keras")):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    exported = killed / "models" / "em_unet" / "1" / "model.keras"
    for ours, theirs in zip(weights(exported), weights(whole / "models" / "em_unet" / "1" / "model.keras")):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    scores = json.loads((run_dir / "scores.json").read_text())
    whole_scores = json.loads((whole / "logs" / "r" / "scores.json").read_text())
    assert scores.keys() == whole_scores.keys()
    for key, value in whole_scores.items():
        assert scores[key] == (pytest.approx(value, rel=1e-4) if isinstance(value, float) else value), key
    assert not (run_dir / "backup").exists() and not (killed / "logs" / "r.lock").exists()

    # one TensorBoard curve: every epoch once, as history.csv has it
    (run_dir / "history.csv").rename(stack / "history.csv")
    from_events = read_history(run_dir)
    np.testing.assert_allclose(from_events["loss"], rows[:, header.index("loss")], rtol=1e-6)
    np.testing.assert_allclose(from_events["val_loss"], rows[:, header.index("val_loss")], rtol=1e-6)


@pytest.mark.slow
def test_ctrl_c_keeps_the_backup_and_a_second_process_is_refused_while_the_run_trains(stack, capsys):
    """While a run trains, a second train into it (same --run-name, or --resume of it) is refused naming the
    running process; Ctrl-C (SIGINT to the process group) ends it with status 130 and no traceback, keeping the
    backup; --resume last then finishes it."""
    argv = flags(stack, epochs=20)
    logs, models = stack / "logs", stack / "models"
    run_dir = logs / "r"
    process = start_training([*argv, "--logs-dir", logs, "--models-dir", models, "--run-name", "r"], stack)
    wait_for_backup(process, run_dir, 1, stack)

    running = f"in use by process {process.pid} on {socket.gethostname()}"
    for second in (["--run-name", "r"], ["--resume", "last"], ["--resume", run_dir]):
        assert main([*argv, "--logs-dir", logs, "--models-dir", models, *second]) == 2, second
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("em-unet: error: ") and running in err[0], (second, err)
    assert process.poll() is None, "the run ended before Ctrl-C: give it more epochs"

    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == 130
    stderr = (stack / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "em-unet: interrupted" in stderr and f"--resume {run_dir}" in stderr, stderr
    assert (run_dir / "backup" / "state.json").exists() and not (run_dir / "scores.json").exists()
    assert not (logs / "r.lock").exists()

    assert main([*argv, "--logs-dir", logs, "--models-dir", models, "--resume", "last"]) == 0, capsys.readouterr().err
    header, rows = history_rows(run_dir)
    assert rows[:, 0].tolist() == list(range(20))
    assert (run_dir / "scores.json").exists() and (models / "em_unet" / "1" / "saved_model.pb").exists()
    assert not (run_dir / "backup").exists()


@pytest.mark.slow
def test_a_run_killed_after_training_resumes_to_scores_and_export(stack, capsys, monkeypatch):
    """Stopped between the last epoch and the scores: --resume trains no epoch more, then scores and exports."""
    from em_unet.training import train as train_module

    argv = [*flags(stack, epochs=2, steps=2), "--logs-dir", stack / "logs", "--models-dir", stack / "models"]
    run_dir = stack / "logs" / "r"

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "validation_scores", interrupted)
        assert main([*argv, "--run-name", "r"]) == 130
    assert f"--resume {run_dir}" in capsys.readouterr().err
    state = json.loads((run_dir / "backup" / "state.json").read_text())
    assert state["epoch"] == 2 and state["stopped"]
    history = (run_dir / "history.csv").read_text()

    assert main([*argv, "--resume", run_dir]) == 0, capsys.readouterr().err
    assert (run_dir / "history.csv").read_text() == history  # no epoch trained again
    assert (run_dir / "scores.json").exists() and (stack / "models" / "em_unet" / "1" / "saved_model.pb").exists()
    assert not (run_dir / "backup").exists()


@pytest.mark.slow
def test_in_step_augmentation_and_early_stopping_resume_as_uninterrupted(stack, capsys, monkeypatch):
    """Interrupted after epoch 2 (in-process), with augmentation in the training step, seeded by the optimizer's
    step counter, and early stopping: the resumed run stops at the same epoch with the same history and best."""
    from em_unet.training import assembly

    argv = flags(stack, epochs=8, steps=2, augment_placement="step", early_stopping=1, lr=0.01)
    interrupted, whole = stack / "interrupted", stack / "whole"
    run_dir = interrupted / "r"
    original = assembly.TrainingBackup.on_epoch_end

    def stop_after_epoch_2(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(assembly.TrainingBackup, "on_epoch_end", stop_after_epoch_2)
        assert main([*argv, "--logs-dir", interrupted, "--models-dir", stack / "m1", "--run-name", "r"]) == 130
    assert main([*argv, "--logs-dir", interrupted, "--models-dir", stack / "m1", "--resume", run_dir]) == 0
    assert main([*argv, "--logs-dir", whole, "--models-dir", stack / "m2", "--run-name", "r"]) == 0
    header, rows = history_rows(run_dir)
    whole_header, whole_rows = history_rows(whole / "r")
    assert header == whole_header and len(rows) < 8  # early stopping ended both runs
    np.testing.assert_allclose(rows, whole_rows, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(weights(run_dir / "best.keras"), weights(whole / "r" / "best.keras")):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_max_minutes_counts_the_training_time_of_every_attempt(stack, capsys, monkeypatch):
    """The backup keeps the training time so far; a resumed run with --max-minutes has only what is left of it.
    Its first epoch, not validated, appends to history.csv in the file's own columns."""
    from em_unet.training import assembly

    argv = flags(stack, epochs=8, steps=2, max_minutes=10, val_every=3)
    argv += ["--logs-dir", stack / "logs", "--models-dir", stack / "m"]
    run_dir = stack / "logs" / "r"
    original = assembly.TrainingBackup.on_epoch_end

    def stop_after_epoch_1(self, epoch, logs=None):
        original(self, epoch, logs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(assembly.TrainingBackup, "on_epoch_end", stop_after_epoch_1)
        assert main([*argv, "--run-name", "r"]) == 130
    state_path = run_dir / "backup" / "state.json"
    state = json.loads(state_path.read_text())
    assert state["epoch"] == 1 and 0 < state["elapsed_seconds"] < 600
    state_path.write_text(json.dumps({**state, "elapsed_seconds": 600.0}))  # as if the first attempt took 10 min
    assert main([*argv, "--resume", run_dir]) == 0, capsys.readouterr().err
    history = read_history(run_dir)  # the limit ends the first resumed epoch (a limit stops at epoch ends)
    assert len(history["loss"]) == 2 and np.isnan(history["val_loss"]).tolist() == [False, True]  # --val-every 3


def test_resume_refusals_are_one_line(stack, capsys):
    """Nothing to resume, a finished run, a missing or corrupt backup, other settings: one line, before any data
    are read, and no lock left behind."""
    from em_unet.settings import from_args

    argv = flags(stack)
    logs = stack / "logs"
    config = from_args(TrainConfig, cli.build_parser().parse_args(["train", *argv]))

    def run(name, config_json=None, state=None, weights_file=True, scores=False):
        folder = logs / name
        (folder / "backup").mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config_json or {}))
        if state is not None:
            (folder / "backup" / "state.json").write_text(state)
        if weights_file:
            (folder / "backup" / "epoch-00001.weights.h5").write_text("")
        if scores:
            (folder / "scores.json").write_text("{}")
        return folder

    def refused(change, message):
        assert main([*argv, "--logs-dir", logs, *change]) == 2, change
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("em-unet: error: ") and message in err[0], (change, err)

    refused(["--resume", "last"], f"nothing to resume in {logs}")
    good = json.dumps({"epoch": 1, "elapsed_seconds": 1.0, "stopped": False, "weights": "epoch-00001.weights.h5"})
    other = {**config.to_dict(), "epochs": 6, "learning_rate": 0.001}
    cases = [
        (["--resume", stack / "nowhere"], "not the folder of an em-unet train run"),
        (["--resume", run("finished", state=good, scores=True)], "that run has finished"),
        (["--resume", run("no-backup")], "no backup to resume from"),
        (["--resume", run("corrupt", state="{")], "the backup is corrupt"),
        (["--resume", run("no-weights", state=good, weights_file=False)], "weights epoch-00001.weights.h5 are missing"),
        (
            ["--resume", run("other", other, good)],
            "settings differ from the run's config.json (--epochs 8 now, 6 in the run; "
            "--lr (learning_rate) 0.0003 now, 0.001 in the run)",
        ),
    ]
    for change, message in cases:
        refused(change, message)
    assert not list(logs.glob("*.lock"))


def test_the_crops_continue_where_a_resumed_run_left_them(isbi_dir):
    """training_dataset from batch k gives batch k, k + 1, ... of the whole stream, augmented alike."""
    import tifffile

    from em_unet.training.augment import AugmentConfig
    from em_unet.training.data import training_dataset

    images = tifffile.imread(isbi_dir / "train-volume.tif")[:2, :96, :96].astype(np.float32) / 255
    targets = (tifffile.imread(isbi_dir / "train-labels.tif")[:2, :96, :96] == 0).astype(np.float32)
    for augment in (None, AugmentConfig()):
        whole = list(training_dataset(images, targets, 32, 2, seed=4, augment=augment).take(5))
        later = list(training_dataset(images, targets, 32, 2, seed=4, augment=augment, start_batch=3).take(2))
        for (image, target), (image_again, target_again) in zip(whole[3:], later):
            np.testing.assert_array_equal(image, image_again)
            np.testing.assert_array_equal(target, target_again)


def test_early_stopping_and_best_count_on_across_a_resume():
    """Early stopping resumed after any epoch stops at the epoch the uninterrupted one stops at, with the same
    best and patience; validations skipped by --val-every (None) do not count."""
    from em_unet.training.assembly import ValidatedEarlyStopping

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    losses = [0.9, None, 0.8, None, 0.85, 0.7, None, 0.75, 0.72, 0.71, 0.74, 0.69, 0.9]

    def stops(past, patience=3):
        callback = ValidatedEarlyStopping(monitor="val_loss", patience=patience, past=past)
        callback.set_model(model)
        model.stop_training = False
        callback.on_train_begin()
        state = (callback.best, callback.wait, callback.best_epoch)
        for epoch in range(len(past), len(losses)):
            logs = {"loss": 1.0} if losses[epoch] is None else {"loss": 1.0, "val_loss": losses[epoch]}
            callback.on_epoch_end(epoch, logs)
            if model.stop_training:
                return epoch, state
        return None, state

    stopped, _ = stops([])
    assert stopped == 9  # best 0.7 at epoch 5, then 3 validations (0.75, 0.72, 0.71) without improvement
    for k in range(1, 10):
        assert stops(losses[:k])[0] == stopped, k
    assert stops(losses[:9])[1] == (0.7, 2, 5)
