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

from em_unet.errors import EmUnetError
from em_unet.training.distribute import is_chief, make_strategy, resolve_strategy, set_tuner_role
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
from em_unet.reporting.history import read_history
from em_unet.config import TrainConfig
from em_unet.training.train import train
folder = sys.argv[1]
losses = {}
for strategy in ("one-device", "mirrored"):
    config = TrainConfig(data=f"{folder}/img.tif", labels=f"{folder}/lab.tif", val_slices=(2, 2), depth=2,
                         base_filters=4, patch_size=32, batch_size=4, epochs=3, steps_per_epoch=3, val_every=1,
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


# ---------------------------------------------------------------- tune --workers


def workers_args(folder, *extra):
    (folder / "grid.toml").write_text(GRID)
    where = ["--project", "dist", "--logs-dir", folder / "logs", "--models-dir", folder / "models"]
    flags = tiny_flags(folder, steps=2, epochs=1)
    return ["tune", *flags, "--search-space", str(folder / "grid.toml"), *map(str, where), *map(str, extra)]


def worker_processes(folder):
    """Per worker log: the trials each process finished, one list per process start."""
    runs = {}
    for log in sorted((folder / "logs" / "tune" / "dist" / "workers").glob("worker*.log")):
        processes = []
        for line in log.read_text().splitlines():
            if line.startswith("=== em-unet worker"):
                processes.append([])
            elif match := re.search(r"\] trial (\d+) finished: COMPLETED", line):
                processes[-1].append(match.group(1))
        runs[log.stem] = processes
    return runs


def live_children():
    """Processes whose parent is this one (from /proc)."""
    children = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                children.append(int(stat))
    return children


@pytest.mark.slow
def test_tune_workers_recycles_processes_and_runs_each_trial_once(isbi_dir, tmp_path, capsys):
    from em_unet import cli

    small_isbi(isbi_dir, tmp_path)
    before = set(live_children())  # earlier tests in this process may have left helpers (e.g. Dask's)
    assert cli.main(workers_args(tmp_path, "--workers", "2")) == 0
    out = capsys.readouterr().out
    processes = worker_processes(tmp_path)
    assert set(processes) == {"worker0", "worker1"}
    every = [t for runs in processes.values() for trials in runs for t in trials]
    assert sorted(every) == ["0", "1", "2", "3"]  # each trial exactly once
    assert all(len(trials) <= 1 for runs in processes.values() for trials in runs)  # --recycle-after 1
    assert sum(len(runs) for runs in processes.values()) >= 4  # a process per trial at least
    assert sorted(r["trial"] for r in results(tmp_path)) == ["0", "1", "2", "3"]
    assert [p.name for p in (tmp_path / "models" / "em_unet").iterdir()] == ["1"]
    assert "em-unet: worker worker0 started: process" in out and "recycled after 1 trial(s)" in out
    assert re.search(r"em-unet: trial 4 of 4 finished .* per trial so far; about 0 s to go on 2 workers", out)
    assert set(live_children()) <= before
    assert not any(v in os.environ for v in ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP"))


@pytest.mark.slow
def test_tune_workers_replace_a_killed_worker_and_its_trial_runs_once(isbi_dir, tmp_path):
    small_isbi(isbi_dir, tmp_path)
    args = workers_args(tmp_path, "--workers", "2", "--recycle-after", "2")
    chief = start_cli(*args, log=tmp_path / "chief.log")
    victim_log = tmp_path / "logs" / "tune" / "dist" / "workers" / "worker1.log"
    deadline = time.monotonic() + 300
    try:
        while not (victim_log.exists() and re.search(r"\] trial \d+ started", victim_log.read_text())):
            assert time.monotonic() < deadline and chief.poll() is None, (tmp_path / "chief.log").read_text()
            time.sleep(0.2)
        victim_trial = re.search(r"\] trial (\d+) started", victim_log.read_text()).group(1)
        victim = int(re.search(r"worker worker1 started: process (\d+)", (tmp_path / "chief.log").read_text()).group(1))
        os.kill(victim, signal.SIGKILL)
        assert chief.wait(timeout=600) == 0, (tmp_path / "chief.log").read_text()
    finally:
        if chief.poll() is None:
            chief.kill()
    chief_log = (tmp_path / "chief.log").read_text()
    assert f"worker worker1 (process {victim}) killed by signal 9; trial {victim_trial} goes back to the queue" in (
        chief_log
    )
    processes = worker_processes(tmp_path)
    every = [t for runs in processes.values() for trials in runs for t in trials]
    assert sorted(every) == ["0", "1", "2", "3"] and victim_trial in every  # rerun, and each trial once
    assert all(len(trials) <= 2 for runs in processes.values() for trials in runs)  # --recycle-after 2
    assert len(processes["worker1"]) >= 2  # replaced
    assert sorted(r["trial"] for r in results(tmp_path)) == ["0", "1", "2", "3"]
    assert [p.name for p in (tmp_path / "models" / "em_unet").iterdir()] == ["1"]
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_worker_of(p, tmp_path)]


def _is_worker_of(pid, folder):
    try:
        return (
            str(folder) in open(f"/proc/{pid}/cmdline").read() and "--tuner-id" in open(f"/proc/{pid}/cmdline").read()
        )
    except OSError:
        return False


REFUSED_WORKERS = [
    (["--workers", "-1"], "--workers = -1: must be an integer >= 0 and <= 64"),
    (["--workers", "65"], "--workers = 65: must be an integer >= 0 and <= 64"),
    (["--recycle-after", "-2"], "--recycle-after = -2: must be an integer >= 0"),
    (["--workers", "2", "--tuner-id", "chief"], "leave out --tuner-id (they join a search started elsewhere)"),
    (
        ["--workers", "1", "--oracle-ip", "127.0.0.1", "--oracle-port", "5000"],
        "leave out --oracle-ip, --oracle-port",
    ),
]


@pytest.mark.parametrize("flags, message", REFUSED_WORKERS)
def test_tune_workers_refusals_are_one_line(tmp_path, capsys, flags, message):
    from em_unet import cli

    args = ["tune", "--data", "img.tif", "--labels", "lab.tif", "--logs-dir", str(tmp_path / "logs"), *flags]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("em-unet: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "logs").exists()


def test_tune_workers_refuses_oracle_variables(tmp_path, capsys, monkeypatch):
    from em_unet import cli

    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "10.0.0.1")
    args = ["tune", "--data", "img.tif", "--labels", "lab.tif", "--logs-dir", str(tmp_path / "logs"), "--workers", "2"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "unset KERASTUNER_ORACLE_IP" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tune", "--data", "x", "--labels", "y", "--workers", "two"])
    assert exit_.value.code == 2 and "--workers: invalid int value: 'two'" in capsys.readouterr().err


class FakeOracle:
    """What WorkerPool uses of the oracle."""

    def __init__(self):
        self.end_order, self.ongoing_trials, self.tuner_ids, self.gone = [], {}, set(), []
        self.on_stop = None

    def worker_gone(self, tuner_id):
        self.gone.append(tuner_id)
        return None


@pytest.mark.parametrize("status, exit_status", [(1, 1), (2, 2)])
def test_worker_pool_gives_up_after_three_failures_in_a_row(tmp_path, status, exit_status):
    from em_unet.training.distribute import WorkerError, WorkerPool

    oracle, lines = FakeOracle(), []
    command = [sys.executable, "-c", f"import sys; print('em-unet: error: bad {status}'); sys.exit({status})"]
    pool = WorkerPool(
        oracle,
        1,
        lambda tuner_id: command,
        tmp_path / "workers",
        1,
        poll_s=0.05,
        log=lambda *a, **k: lines.append(a[0]),
    )
    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # what the pool sends the main thread on giving up
    try:
        pool.start()
        pool.thread.join(timeout=60)
        pool.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert isinstance(pool.error, WorkerError) and pool.error.exit_status == exit_status
    message = str(pool.error)
    assert "failed 3 times in a row without finishing a trial" in message and f"bad {status}" in message
    assert message.endswith(f"read {tmp_path / 'workers' / 'worker0.log'}") and "\n" not in message
    assert (tmp_path / "workers" / "worker0.log").read_text().count("=== em-unet worker0: process") == 3
    assert oracle.gone == ["worker0"] * 3 and sum("replaced" in line for line in lines) == 2


@pytest.mark.slow
def test_tune_workers_that_keep_failing_end_the_search_with_one_line(isbi_dir, tmp_path, capsys, monkeypatch):
    from em_unet import cli
    from em_unet.training import tune

    small_isbi(isbi_dir, tmp_path)
    failing = [sys.executable, "-c", "import sys; print('em-unet: error: cannot read the stack'); sys.exit(2)"]
    monkeypatch.setattr(tune, "worker_command", lambda *args: failing)
    before = set(live_children())
    assert cli.main(workers_args(tmp_path, "--workers", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    log = tmp_path / "logs" / "tune" / "dist" / "workers" / "worker0.log"
    assert err == [
        "em-unet: error: worker processes failed 3 times in a row without finishing a trial (the last, worker0, "
        f"exited with status 2: cannot read the stack): read {log}"
    ]
    assert set(live_children()) <= before and not (tmp_path / "models").exists()


def test_workers_split_the_cores_without_gpus(monkeypatch):
    from em_unet.machine import cpu_cores
    from em_unet.training.distribute import worker_environment

    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    threads = str(max(1, cpu_cores() // 2))
    assert worker_environment(1, 2, gpus=0) == dict.fromkeys(
        ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"), threads
    )
    assert worker_environment(0, 64, gpus=0)["TF_NUM_INTRAOP_THREADS"] == "1"
    assert worker_environment(3, 4, gpus=2) == {"CUDA_VISIBLE_DEVICES": "1"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert worker_environment(0, 2, gpus=2) == {"CUDA_VISIBLE_DEVICES": "4"}


def test_trial_cost_separates_building_a_model_from_training_an_epoch():
    from em_unet.training.distribute import trial_cost

    assert trial_cost([(2, 30.0), (5, 45.0), (14, 90.0)]) == pytest.approx((20.0, 5.0))
    assert trial_cost([(2, 20.0), (2, 24.0)]) == (0.0, 11.0)  # one length: no way to tell the two apart
    assert trial_cost([(2, 30.0), (5, 20.0)]) == (0.0, 50.0 / 7)  # a falling fit is noise: per epoch only


CHILD_OF_A_CHIEF = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import os, time
from em_unet.training.distribute import watch_chief
watch_chief(os.getppid(), interval_s=0.2)
print("watching", flush=True)
time.sleep(120)
'''], stdout=sys.stdout)
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_worker_stops_when_its_chief_is_gone():
    chief = subprocess.Popen([sys.executable, "-c", CHILD_OF_A_CHIEF], stdout=subprocess.PIPE, text=True)
    worker = int(chief.stdout.readline())
    assert chief.stdout.readline().strip() == "watching"
    chief.kill()
    chief.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            break  # gone
        if state == "Z":
            break  # ended, not yet reaped
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker kept running after its chief was killed")
