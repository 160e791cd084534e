"""Where training runs: tf.distribute strategies for one run, and KerasTuner's distributed mode
(a chief oracle and workers) for a search. em-unet schedules nothing itself; it chooses and
configures these engines, and adds the one thing KerasTuner's chief lacks: noticing a dead worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import keras_tuner as kt
import tensorflow as tf
from keras_tuner.engine.trial import Trial, TrialStatus

from em_unet.errors import EmUnetError
from em_unet.machine import threads_per_worker


def tf_config() -> dict:
    """The parsed ``TF_CONFIG`` (``{}`` when unset)."""
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise EmUnetError(f"TF_CONFIG is not valid JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(config, dict) or "cluster" not in config or "task" not in config:
        raise EmUnetError(
            'TF_CONFIG needs "cluster" and "task" entries, e.g. {"cluster": {"worker": '
            '["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}'
        )
    return config


def _one_device() -> tf.distribute.Strategy:
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def _mirrored() -> tf.distribute.Strategy:
    devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    return tf.distribute.MirroredStrategy(devices or [d.name for d in tf.config.list_logical_devices("CPU")])


def _multi_worker() -> tf.distribute.Strategy:
    if not tf_config():
        raise EmUnetError("--strategy multi-worker needs TF_CONFIG to describe the cluster and this task")
    return tf.distribute.MultiWorkerMirroredStrategy()


# The strategies by name (--strategy, which also offers "auto": resolve_strategy; em_unet.config reads the
# names from here), each a function that makes it (see make_strategy).
STRATEGIES = {"one-device": _one_device, "mirrored": _mirrored, "multi-worker": _multi_worker}


def resolve_strategy(name: str) -> str:
    """``auto``: multi-worker when ``TF_CONFIG`` names more than one task, mirrored over several
    local GPUs, otherwise one device."""
    choices = ("auto", *STRATEGIES)
    if name not in choices:
        raise EmUnetError(f"strategy {name!r} is not one of {choices}")
    if name != "auto":
        return name
    tasks = sum(len(addresses) for addresses in tf_config().get("cluster", {}).values())
    if tasks > 1:
        return "multi-worker"
    return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "one-device"


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy for ``name`` (see :func:`resolve_strategy`).

    ``mirrored`` replicates over the local GPUs, or over the logical CPU devices when there is no GPU
    (one, unless ``tf.config.set_logical_device_configuration`` made more: that is how it is tested).
    ``multi-worker`` reads the cluster from ``TF_CONFIG``; create it before TensorFlow runs anything else.
    """
    return STRATEGIES[resolve_strategy(name)]()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes logs, checkpoints and exports: the ``chief`` task, or worker 0 of
    a cluster without one; always true outside multi-worker training."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs


def shardable(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Datasets built from arrays have no files to split, so multi-worker training shards by element."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


# ---------------------------------------------------------------- KerasTuner's distributed mode

ORACLE_VARIABLES = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")


def set_tuner_role(tuner_id: str | None = None, oracle_ip: str | None = None, oracle_port: int | None = None) -> str:
    """Apply the flags over KerasTuner's environment variables and return this process's role:
    ``"chief"`` (serves the oracle), ``"worker"`` (runs trials) or ``"standalone"``."""
    for variable, value in zip(ORACLE_VARIABLES, (tuner_id, oracle_ip, oracle_port)):
        if value is not None:
            os.environ[variable] = str(value)
    present = [v for v in ORACLE_VARIABLES if os.environ.get(v)]
    if not present:
        return "standalone"
    if len(present) < len(ORACLE_VARIABLES):
        missing = [v for v in ORACLE_VARIABLES if v not in present]
        raise EmUnetError(
            f"distributed tuning needs all of {', '.join(ORACLE_VARIABLES)} "
            f"(or --tuner-id, --oracle-ip, --oracle-port); missing {', '.join(missing)}"
        )
    port = os.environ["KERASTUNER_ORACLE_PORT"]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise EmUnetError(f"oracle port {port!r} is not a port number")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


class EmUnetOracle:
    """Mixed into a KerasTuner oracle class (subclassing is KerasTuner's extension point; see
    :func:`oracle_class`). Adds three things:

    - a seed that holds: KerasTuner's ``Oracle`` replaces a seed of 0 by a random one
      (``seed or random.randint(...)``), so ``--seed 0``, the default, drew different trials each run;
    - a deadline (``time.monotonic()`` seconds): no trial starts after it;
    - on a distributed chief (``worker_timeout_s``), noticing a dead worker. KerasTuner's chief keeps a
      trial "ongoing" until the worker that took it reports back, and waits for that before it exits,
      so one killed worker stalls the search for ever (KerasTuner 1.4 has no timeout). Workers send a
      heartbeat while they run a trial (:class:`TrialHeartbeat`); when a trial's worker has been
      silent for ``worker_timeout_s`` seconds, the trial goes back into KerasTuner's own retry queue
      and the next worker that asks runs it. Workers that ask for a trial while others are still
      running are told to wait (IDLE) rather than to stop, so someone is left to take a trial that
      comes back.
    """

    def __init__(
        self,
        *args,
        seed: int = 0,
        deadline: float | None = None,
        worker_timeout_s: float | None = None,
        parallel: int = 0,
        log=print,
        **kwargs,
    ):
        super().__init__(*args, seed=seed, **kwargs)
        self.seed = self._seed_state = seed
        self.deadline, self.worker_timeout_s, self.log = deadline, worker_timeout_s, log
        self.parallel = parallel  # trials run at once (0: as many as workers have asked)
        self.last_seen: dict[str, float] = {}  # trial id -> last sign of life of the worker running it
        self.tuner_seen: dict[str, float] = {}  # worker -> last time it asked for a trial
        self.given_up: set[str] = set()
        self.trial_started: dict[str, float] = {}  # trial id -> when it was (last) handed out
        self.durations: list[tuple[int, float]] = []  # (epochs, seconds) of each trial ended in this process
        self.ended_at: dict[str, float] = {}  # worker -> when its last trial ended
        self.gaps: list[float] = []  # seconds from a worker's trial end to its next trial (a process restart)
        self.on_stop: Callable[[str], None] | None = None  # called (lock held) when a worker is told to stop
        self.closed = threading.Event()
        if worker_timeout_s:
            threading.Thread(target=self._watch, name="em-unet-worker-watch", daemon=True).start()

    @kt.synchronized
    def create_trial(self, tuner_id: str):
        self.tuner_seen[tuner_id] = time.monotonic()
        if self.deadline is not None and time.monotonic() >= self.deadline and tuner_id not in self.ongoing_trials:
            if not getattr(self, "_said_deadline", False):
                self.log("em-unet: --max-minutes reached: no new trial starts", flush=True)
                self._said_deadline = True
            self._stopping(tuner_id)
            return Trial(self.hyperparameters.copy(), status=TrialStatus.STOPPED)
        trial = super().create_trial(tuner_id)
        if trial.status == TrialStatus.RUNNING:
            self.last_seen[trial.trial_id] = self.trial_started[trial.trial_id] = time.monotonic()
            if tuner_id in self.ended_at:
                self.gaps.append(time.monotonic() - self.ended_at.pop(tuner_id))
        elif trial.status == TrialStatus.STOPPED and self.worker_timeout_s and self.ongoing_trials:
            self.tuner_ids.add(tuner_id)
            return Trial(self.hyperparameters.copy(), trial_id=trial.trial_id, status=TrialStatus.IDLE)
        elif trial.status == TrialStatus.STOPPED:
            self._stopping(tuner_id)
        return trial

    def _stopping(self, tuner_id: str) -> None:
        if self.on_stop is not None:
            try:
                self.on_stop(tuner_id)
            except Exception as err:  # noqa: BLE001 - KerasTuner's lock is not released when a call raises
                self.log(f"em-unet: stopping the other workers failed: {err}", flush=True)

    @kt.synchronized
    def end_trial(self, trial):
        # The first result of a trial counts, whoever sends it: the worker that reran it, or the one
        # given up on that turned out to be alive. A second result of the same trial is dropped.
        ongoing = any(t.trial_id == trial.trial_id for t in self.ongoing_trials.values())
        if trial.trial_id in self.given_up:
            self.given_up.discard(trial.trial_id)
            if trial.trial_id in self._retry_queue:
                self._retry_queue.remove(trial.trial_id)
        elif trial.trial_id in self.end_order and not ongoing:
            self.log(f"em-unet: a second result of trial {trial.trial_id} dropped: it has one", flush=True)
            return None
        self.last_seen.pop(trial.trial_id, None)
        worker = next((t for t, ongoing in self.ongoing_trials.items() if ongoing.trial_id == trial.trial_id), None)
        if worker is not None:
            self.ended_at[worker] = time.monotonic()
        result = super().end_trial(trial)
        try:
            self._progress(trial.trial_id)
        except Exception as err:  # noqa: BLE001 - a progress line is not worth a stuck oracle lock
            self.log(f"em-unet: no progress estimate ({type(err).__name__}: {err})", flush=True)
        return result

    def search_size(self) -> tuple[int | None, int | None]:
        """(trials, epochs) the whole search runs: Hyperband's from its own bracket and round sizes
        (every trial of a round trains from the previous round's epoch on); else (max_trials, None)."""
        if not hasattr(self, "_get_size"):  # not Hyperband
            return self.max_trials, None
        trials = epochs = 0
        for bracket in range(self._get_num_brackets()):
            for round_ in range(self._get_num_rounds(bracket)):
                size = self._get_size(bracket, round_)
                start = self._get_epochs(bracket, round_ - 1) if round_ else 0
                trials += size
                epochs += size * (self._get_epochs(bracket, round_) - start)
        return trials * self.hyperband_iterations, epochs * self.hyperband_iterations

    def _epochs_of(self, trial_id: str) -> int:
        values = self.trials[trial_id].hyperparameters.values
        return int(values.get("tuner/epochs", 0)) - int(values.get("tuner/initial_epoch", 0))

    def _progress(self, trial_id: str) -> None:
        """Print "trial k of N", the time per trial so far and the time the rest of the search takes: for
        Hyperband, whose trials differ in length, from seconds = a + b x epochs fitted to the finished trials
        (a: building and tracing a model, b: an epoch), plus the time between a worker's trials."""
        started = self.trial_started.pop(trial_id, None)
        if started is None:
            return
        seconds = time.monotonic() - started
        self.durations.append((self._epochs_of(trial_id), seconds))
        total, total_epochs = self.search_size()
        done = len(self.end_order)
        per_trial = sum(s for _, s in self.durations) / len(self.durations)
        parallel = self.parallel or max(1, len(self.tuner_seen))
        gap = sum(self.gaps) / len(self.gaps) if self.gaps else 0.0
        trials_left = max(0, (total or done) - done)
        line = f"em-unet: trial {done} of {total or '?'} finished ({format_seconds(seconds)}); "
        line += f"{format_seconds(per_trial)} per trial so far"
        if total_epochs and sum(e for e, _ in self.durations):
            fixed, per_epoch = trial_cost(self.durations)
            left = max(0, total_epochs - sum(self._epochs_of(t) for t in self.end_order if t in self.trials))
            eta = (trials_left * (fixed + gap) + left * per_epoch) / parallel
            line += f" ({format_seconds(fixed)} + {format_seconds(per_epoch)} per epoch); {left} epochs left"
        else:
            eta = trials_left * (per_trial + gap) / parallel
        line += f"; about {format_seconds(eta)} to go" + (f" on {parallel} workers" if parallel > 1 else "")
        if self.deadline is not None and eta > self.deadline - time.monotonic():
            line += f" (--max-minutes ends it in {format_seconds(max(0.0, self.deadline - time.monotonic()))})"
        self.log(line, flush=True)

    @kt.synchronized
    def worker_gone(self, tuner_id: str) -> str | None:
        """A worker process has exited: forget it, and give its trial (if it had one) back to the queue.
        Returns that trial's id."""
        self.tuner_ids.discard(tuner_id)
        self.tuner_seen.pop(tuner_id, None)
        if tuner_id not in self.ongoing_trials:
            return None
        return self._give_back(tuner_id, f"worker {tuner_id} exited")

    def get_trial(self, trial_id: str):
        if trial_id in self.last_seen:
            self.last_seen[trial_id] = time.monotonic()
        return super().get_trial(trial_id)

    @kt.synchronized
    def requeue_silent(self) -> None:
        """Give the trials of workers silent for longer than the timeout back to the queue."""
        now = time.monotonic()
        for tuner_id, trial in list(self.ongoing_trials.items()):
            silent = now - self.last_seen.get(trial.trial_id, now)
            if silent > self.worker_timeout_s:
                self._give_back(tuner_id, f"worker {tuner_id} silent for {silent:.0f} s")
        for tuner_id in list(self.tuner_ids - set(self.ongoing_trials)):
            if now - self.tuner_seen.get(tuner_id, now) > self.worker_timeout_s:
                self.tuner_ids.discard(tuner_id)  # a worker that died between trials

    def _give_back(self, tuner_id: str, why: str) -> str:
        trial = self.ongoing_trials.pop(tuner_id)
        self.tuner_ids.discard(tuner_id)
        self._retry_queue.append(trial.trial_id)
        self.last_seen.pop(trial.trial_id, None)
        self.trial_started.pop(trial.trial_id, None)
        self.given_up.add(trial.trial_id)
        self.save()
        self.log(f"em-unet: {why}: trial {trial.trial_id} goes back to the queue", flush=True)
        return trial.trial_id

    def close(self) -> None:
        """Stop watching the workers (the search is over)."""
        self.closed.set()

    def _watch(self) -> None:
        while not self.closed.wait(max(0.5, self.worker_timeout_s / 4)):
            self.requeue_silent()


def trial_cost(durations: list[tuple[int, float]]) -> tuple[float, float]:
    """(seconds per trial, seconds per epoch) fitted by least squares to the (epochs, seconds) of finished
    trials; while they all have the same length, (0, their mean seconds per epoch)."""
    n = len(durations)
    mean_e = sum(e for e, _ in durations) / n
    mean_s = sum(s for _, s in durations) / n
    spread = sum((e - mean_e) ** 2 for e, _ in durations)
    if spread > 0:
        per_epoch = sum((e - mean_e) * (s - mean_s) for e, s in durations) / spread
        fixed = mean_s - per_epoch * mean_e
        if per_epoch > 0 and fixed >= 0:
            return fixed, per_epoch
    return 0.0, mean_s / mean_e if mean_e else 0.0


def format_seconds(seconds: float) -> str:
    """``42 s``, ``7 min 05 s``, ``3 h 20 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def oracle_class(base: type) -> type:
    """``base`` (one of ``keras_tuner.oracles``) with :class:`EmUnetOracle` mixed in."""
    return type(f"EmUnet{base.__name__}", (EmUnetOracle, base), {})


class TrialHeartbeat:
    """On a worker: tells the chief every ``interval_s`` seconds that this trial is still running."""

    def __init__(self, oracle, trial_id: str, interval_s: float):
        self.stopped = threading.Event()
        self.thread = threading.Thread(
            target=self._beat, args=(oracle, trial_id, interval_s), name="em-unet-heartbeat", daemon=True
        )
        self.thread.start()

    def _beat(self, oracle, trial_id: str, interval_s: float) -> None:
        while not self.stopped.wait(interval_s):
            try:
                oracle.get_trial(trial_id)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the chief decides what silence means
                pass

    def stop(self) -> None:
        self.stopped.set()


# ---------------------------------------------------------------- tune --workers: the chief's own workers

LOCALHOST = "127.0.0.1"
RECYCLE_STATUS = 3  # exit status of a worker process that leaves after --recycle-after trials, to be replaced
RECYCLE_VARIABLE = "EM_UNET_RECYCLE_AFTER"  # set for the workers of `tune --workers`: trials per process
CHIEF_VARIABLE = "EM_UNET_CHIEF_PID"  # set for the workers of `tune --workers`: they stop when it is gone


class WorkerError(EmUnetError):
    """The worker processes of ``tune --workers`` kept failing. ``exit_status``: 2 when they refused the
    user's input, 1 for anything else."""

    def __init__(self, message: str, exit_status: int = 1):
        super().__init__(message)
        self.exit_status = exit_status


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port nobody listens on now (the system's choice for port 0)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def worker_environment(index: int, count: int, gpus: int) -> dict[str, str]:
    """What worker ``index`` of ``count`` runs on: one GPU (``CUDA_VISIBLE_DEVICES``) when there are
    ``gpus``, else its share of the cores for TensorFlow's thread pools and OpenMP. Variables the user
    set are kept."""
    if gpus:
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        ids = visible or [str(i) for i in range(gpus)]
        return {"CUDA_VISIBLE_DEVICES": ids[index % len(ids)]}
    threads = str(threads_per_worker(count))
    names = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")
    return {name: os.environ.get(name, threads) for name in names}


def watch_chief(pid: int, interval_s: float = 2.0) -> None:
    """On a worker of ``tune --workers``: end this process when the chief (its parent, ``pid``) is gone,
    instead of waiting an hour for an oracle that does not answer."""

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(interval_s)
        print(f"em-unet: the chief (process {pid}) is gone: this worker stops", flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="em-unet-chief-watch", daemon=True).start()


class WorkerPool:
    """The worker processes of ``tune --workers N``, run by a thread of the chief while its main thread
    serves the oracle.

    Worker ``workerI`` is one process at a time, with its output appended to ``log_dir/workerI.log``. A
    process that leaves after its ``recycle_after`` trials (:data:`RECYCLE_STATUS`), or dies, is replaced
    by a fresh one under the same id; a dead one's trial goes back to the oracle's queue first. A process
    the oracle told to stop (status 0) is not replaced, and the other idle ones are ended then, so the
    chief need not wait for them. After ``max_failures`` failures in a row with no trial finished in
    between, the pool gives up: :attr:`error` says why and the main thread gets a SIGTERM (while
    :attr:`searching`), which :func:`em_unet.training.tune.tune` handles (it raises KeyboardInterrupt there) and turns
    into that error.
    """

    def __init__(
        self,
        oracle,
        count: int,
        command: Callable[[str], list[str]],
        log_dir: Path,
        recycle_after: int,
        gpus: int = 0,
        max_failures: int = 3,
        poll_s: float = 0.5,
        log=print,
    ):
        self.oracle, self.count, self.command, self.log_dir = oracle, count, command, Path(log_dir)
        self.recycle_after, self.gpus, self.max_failures, self.poll_s, self.log = (
            recycle_after,
            gpus,
            max_failures,
            poll_s,
            log,
        )
        self.processes: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}
        self.retired: set[int] = set()  # processes ended on purpose: not failures, not replaced
        self.lock = threading.Lock()
        self.stopping = self.finishing = self.searching = False
        self.error: WorkerError | None = None
        self.failures, self._ended_at_failure = 0, -1
        self.thread = threading.Thread(target=self._supervise, name="em-unet-workers", daemon=True)
        oracle.on_stop = self._search_over

    def log_path(self, tuner_id: str) -> Path:
        return self.log_dir / f"{tuner_id}.log"

    def start(self) -> None:
        """Start the N workers and the thread that keeps them going."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.lock:
            self.searching = True
            for index in range(self.count):
                self._start(f"worker{index}", "started")
        self.thread.start()

    def search_returned(self) -> None:
        """The chief's search is over: no more SIGTERM to the main thread."""
        with self.lock:
            self.searching = False

    def _start(self, tuner_id: str, why: str) -> None:  # with self.lock held
        index = int(tuner_id.removeprefix("worker"))
        self.starts[tuner_id] = self.starts.get(tuner_id, 0) + 1
        environment = {k: v for k, v in os.environ.items() if k not in ORACLE_VARIABLES}
        environment.update(
            {
                "TF_CPP_MIN_LOG_LEVEL": environment.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                "PYTHONUNBUFFERED": "1",
                RECYCLE_VARIABLE: str(self.recycle_after),
                CHIEF_VARIABLE: str(os.getpid()),
                **worker_environment(index, self.count, self.gpus),
            }
        )
        path = self.log_path(tuner_id)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"=== em-unet {tuner_id}: process {self.starts[tuner_id]} ({why}) {time.ctime()}\n")
            handle.flush()
            process = subprocess.Popen(
                self.command(tuner_id),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=environment,
            )
        self.processes[tuner_id] = process
        self.log(f"em-unet: worker {tuner_id} {why}: process {process.pid} (log: {path})", flush=True)

    def _supervise(self) -> None:
        while True:
            with self.lock:
                if self.stopping or self.error:
                    return
                exited = [(t, p, p.poll()) for t, p in self.processes.items()]
            for tuner_id, process, status in exited:
                if status is not None:
                    self._exited(tuner_id, process, status)
            time.sleep(self.poll_s)

    def _exited(self, tuner_id: str, process: subprocess.Popen, status: int) -> None:
        trial = self.oracle.worker_gone(tuner_id)  # the oracle's lock, never inside ours: _search_over nests them
        with self.lock:
            if self.stopping or self.processes.get(tuner_id) is not process:
                return
            del self.processes[tuner_id]
            if process.pid in self.retired or self.finishing or status == 0:
                if status == 0:
                    self.finishing = True  # told STOPPED: the search has no trial left
                    self.log(f"em-unet: worker {tuner_id} done: no trial left", flush=True)
                return
            if status == RECYCLE_STATUS:
                self.failures = 0
                self._start(tuner_id, f"recycled after {self.recycle_after} trial(s)")
                return
            ended = len(self.oracle.end_order)
            if ended != self._ended_at_failure:
                self.failures = 0
            self._ended_at_failure = ended
            self.failures += 1
            how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
            lost = f"; trial {trial} goes back to the queue" if trial else ""
            if self.failures < self.max_failures:
                self._start(tuner_id, f"(process {process.pid}) {how}{lost}; replaced")
                return
            self.error = WorkerError(
                f"worker processes failed {self.failures} times in a row without finishing a trial (the last, "
                f"{tuner_id}, {how}{_last_error(self.log_path(tuner_id))}): read {self.log_path(tuner_id)}",
                exit_status=2 if status == 2 else 1,
            )
            if self.searching:
                # SIGTERM, not SIGINT: a chief started in the background (nohup, `cmd &`) ignores SIGINT
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    def _search_over(self, tuner_id: str) -> None:  # called by the oracle, its lock held
        with self.lock:
            self.finishing = True
            for other, process in self.processes.items():
                if other != tuner_id and other not in self.oracle.ongoing_trials and process.poll() is None:
                    self.retired.add(process.pid)
                    process.terminate()  # idle, or still starting: nothing is lost
                    self.oracle.tuner_ids.discard(other)

    def stop(self, grace_s: float = 10.0) -> None:
        """End every worker process (SIGTERM, then SIGKILL after ``grace_s`` seconds) and the thread."""
        with self.lock:
            self.stopping, self.searching = True, False
            processes = list(self.processes.values())
            for process in processes:
                if process.poll() is None:
                    self.retired.add(process.pid)
                    process.terminate()
        deadline = time.monotonic() + grace_s
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        self.oracle.on_stop = None


def _last_error(log: Path) -> str:
    """``: <the last em-unet error line of a worker log>``, or nothing."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("em-unet: error:")]
    return f": {errors[-1].removeprefix('em-unet: error: ')}" if errors else ""
