"""tf.distribute strategies and KerasTuner's distributed mode, run on 127.0.0.1 and logical CPU devices."""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from em_unet.distribute import is_chief, make_strategy, resolve_strategy, set_tuner_role
from em_unet.errors import EmUnetError
from tests.helpers import error_line, run_cli, small_isbi, tiny_flags


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_cli(*args, env=None, log=None):
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "em_unet.cli", *map(str, args)],
        env=environment,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_strategy_choice_and_bad_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert resolve_strategy("auto") == "one-device"
    assert is_chief(make_strategy("one-device"))
    with pytest.raises(EmUnetError, match="needs TF_CONFIG"):
        make_strategy("multi-worker")
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}})
    )
    assert resolve_strategy("auto") == "multi-worker"
    monkeypatch.setenv("TF_CONFIG", "{worker")
    with pytest.raises(EmUnetError, match="TF_CONFIG is not valid JSON"):
        resolve_strategy("auto")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(EmUnetError, match='needs "cluster" and "task"'):
        resolve_strategy("auto")


def test_tuner_role_from_flags_or_variables(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # set_tuner_role writes the variables; keep them here
    for variable in ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"):
        monkeypatch.delenv(variable, raising=False)
    assert set_tuner_role() == "standalone"
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    with pytest.raises(EmUnetError, match="missing KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_PORT"):
        set_tuner_role()
    assert set_tuner_role("chief", None, 8000) == "chief"
    assert set_tuner_role("tuner3") == "worker" and os.environ["KERASTUNER_TUNER_ID"] == "tuner3"
    with pytest.raises(EmUnetError, match="oracle port 'http' is not a port number"):
        monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "http")
        set_tuner_role()


MIRRORED_SCRIPT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from em_unet.history import read_history
from em_unet.config import TrainConfig
from em_unet.train import train
folder = sys.argv[1]
losses = {}
for strategy in ("one-device", "mirrored"):
    config = TrainConfig(data=f"{folder}/img.tif", labels=f"{folder}/lab.tif", val_slices=(2, 2), depth=2,
                         base_filters=4, patch_size=32, batch_size=4, epochs=3, steps_per_epoch=3,
                         precision="float32", strategy=strategy, run_name=strategy, logs_dir=f"{folder}/logs", seed=0)
    run = train(config, verbose=0, export=False)["run_dir"]
    history = read_history(run)
    replicas = json.loads((run / "config.json").read_text())["replicas"]
    losses[strategy] = {"replicas": replicas, "loss": history["loss"].tolist(),
                        "val_loss": history["val_loss"].tolist()}
print(json.dumps(losses))
"""


def test_mirrored_over_two_logical_cpus_matches_one_device(isbi_dir, tmp_path):
    """Same global batch (4) and seed: the 2-replica run gives the same losses to float32 round-off."""
    small_isbi(isbi_dir, tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    losses = json.loads(result.stdout.strip().splitlines()[-1])
    one, mirrored = losses["one-device"], losses["mirrored"]
    assert (one["replicas"], mirrored["replicas"]) == (1, 2)
    for key in ("loss", "val_loss"):
        assert one[key] == pytest.approx(mirrored[key], rel=1e-4), key
    assert one["loss"][0] != pytest.approx(one["loss"][-1], rel=1e-4)  # training moved: the comparison means something


def train_args(folder, *extra):
    where = ["--logs-dir", folder / "logs", "--models-dir", folder / "models", "--run-name", "mw"]
    return ["train", *tiny_flags(folder, steps=2, batch_size=4, epochs=1), *where, *extra]


@pytest.mark.slow
def test_multi_worker_two_local_processes_one_export(isbi_dir, tmp_path):
    small_isbi(isbi_dir, tmp_path)
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = [
        start_cli(
            *train_args(tmp_path, "--strategy", "multi-worker"),
            log=tmp_path / f"worker{i}.log",
            env={"TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})},
        )
        for i in range(2)
    ]
    codes = [p.wait(timeout=600) for p in processes]
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    assert [p.name for p in (tmp_path / "models" / "em_unet").iterdir()] == ["1"]
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["mw"]
    config = json.loads((tmp_path / "logs" / "mw" / "config.json").read_text())
    assert (config["strategy_used"], config["replicas"]) == ("multi-worker", 2)
    assert "SavedModel for TF Serving" in logs[0] and "worker done" in logs[1]


def test_multi_worker_refuses_max_minutes(isbi_dir, tmp_path):
    small_isbi(isbi_dir, tmp_path)
    (port,) = free_ports(1)
    tf_config = json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}"]}, "task": {"type": "worker", "index": 0}})
    result = run_cli(
        *train_args(tmp_path, "--strategy", "multi-worker", "--max-minutes", "5"), env={"TF_CONFIG": tf_config}
    )
    assert result.returncode == 2 and "--max-minutes cannot be used with --strategy multi-worker" in error_line(result)


GRID = """
[tuner]
algorithm = "grid"
max_trials = 4
[space]
optimizer = ["adam", "adamax"]
learning_rate = [1e-3, 1e-4]
"""


def distributed_search(folder, port, timeout_s):
    (folder / "grid.toml").write_text(GRID)
    common = [
        "tune",
        *tiny_flags(folder, steps=3, epochs=2),
        "--search-space",
        folder / "grid.toml",
        "--project",
        "dist",
        "--logs-dir",
        folder / "logs",
        "--models-dir",
        folder / "models",
        "--oracle-ip",
        "127.0.0.1",
        "--oracle-port",
        port,
        "--worker-timeout",
        timeout_s,
    ]
    chief = start_cli(*common, "--tuner-id", "chief", log=folder / "chief.log")
    workers = {
        tuner: start_cli(*common, "--tuner-id", tuner, log=folder / f"{tuner}.log") for tuner in ("tuner0", "tuner1")
    }
    return chief, workers


def trials_run(log):
    return re.findall(r"\] trial (\d+) finished: COMPLETED", log.read_text())


def results(folder):
    with open(folder / "logs" / "tune" / "dist" / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_chief_and_two_workers_run_each_trial_once(isbi_dir, tmp_path):
    small_isbi(isbi_dir, tmp_path)
    chief, workers = distributed_search(tmp_path, free_ports(1)[0], timeout_s=60)
    assert [w.wait(timeout=900) for w in workers.values()] == [0, 0], [
        (tmp_path / f"{t}.log").read_text() for t in workers
    ]
    assert chief.wait(timeout=120) == 0, (tmp_path / "chief.log").read_text()
    ran = {tuner: trials_run(tmp_path / f"{tuner}.log") for tuner in workers}
    assert all(ran.values()), ran  # both workers ran trials
    every = sorted(t for trials in ran.values() for t in trials)
    assert every == sorted(set(every)) and len(every) == 4  # each trial exactly once
    rows = results(tmp_path)
    assert sorted(r["trial"] for r in rows) == every
    assert {(r["optimizer"], float(r["learning_rate"])) for r in rows} == {
        (o, lr) for o in ("adam", "adamax") for lr in (1e-3, 1e-4)
    }
    assert [p.name for p in (tmp_path / "models" / "em_unet").iterdir()] == ["1"]
    assert "worker done" in (tmp_path / "tuner0.log").read_text()


@pytest.mark.slow
def test_a_killed_worker_loses_its_trial_to_the_other(isbi_dir, tmp_path):
    small_isbi(isbi_dir, tmp_path)
    chief, workers = distributed_search(tmp_path, free_ports(1)[0], timeout_s=8)
    victim_log = tmp_path / "tuner1.log"
    deadline = time.monotonic() + 300
    while "] trial " not in victim_log.read_text() or " started" not in victim_log.read_text():
        assert time.monotonic() < deadline and workers["tuner1"].poll() is None, victim_log.read_text()
        time.sleep(0.2)
    victim_trial = re.search(r"\] trial (\d+) started", victim_log.read_text()).group(1)
    workers["tuner1"].send_signal(signal.SIGKILL)
    assert workers["tuner0"].wait(timeout=900) == 0, (tmp_path / "tuner0.log").read_text()
    assert chief.wait(timeout=120) == 0, (tmp_path / "chief.log").read_text()
    chief_log = (tmp_path / "chief.log").read_text()
    assert "worker tuner1 silent" in chief_log and f"trial {victim_trial} goes back to the queue" in chief_log
    finished_by_victim = trials_run(victim_log)
    survivor = trials_run(tmp_path / "tuner0.log")
    assert victim_trial in survivor
    assert sorted(finished_by_victim + survivor) == sorted(set(finished_by_victim + survivor))
    assert len(results(tmp_path)) == 4  # every trial recorded, none twice
    assert [p.name for p in (tmp_path / "models" / "em_unet").iterdir()] == ["1"]


def test_tune_refuses_what_would_break_a_distributed_search(isbi_dir, tmp_path):
    small_isbi(isbi_dir, tmp_path)
    args = [
        "tune",
        "--data",
        tmp_path / "img.tif",
        "--labels",
        tmp_path / "lab.tif",
        "--val-slices",
        "2-2",
        "--logs-dir",
        tmp_path / "logs",
    ]
    worker = run_cli(*args, "--overwrite", "--tuner-id", "tuner0", "--oracle-ip", "127.0.0.1", "--oracle-port", "1")
    assert worker.returncode == 2 and "--overwrite is for the chief" in error_line(worker)
    alone = run_cli(*args, "--strategy", "multi-worker")
    assert alone.returncode == 2 and "each training cluster joins a KerasTuner chief" in error_line(alone)
    half = run_cli(*args, "--oracle-ip", "127.0.0.1")
    assert half.returncode == 2 and "missing KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_PORT" in error_line(half)
    assert not (tmp_path / "logs").exists()
