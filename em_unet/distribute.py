"""Where training runs: tf.distribute strategies for one run, and KerasTuner's distributed mode
(a chief oracle and workers) for a search. em-unet schedules nothing itself; it chooses and
configures these engines, and adds the one thing KerasTuner's chief lacks: noticing a dead worker.
"""

from __future__ import annotations

import json
import os
import threading
import time

import keras_tuner as kt
import tensorflow as tf
from keras_tuner.engine.trial import Trial, TrialStatus

from em_unet.config import STRATEGIES
from em_unet.errors import EmUnetError


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


def resolve_strategy(name: str) -> str:
    """``auto``: multi-worker when ``TF_CONFIG`` names more than one task, mirrored over several
    local GPUs, otherwise one device."""
    if name not in STRATEGIES:
        raise EmUnetError(f"strategy {name!r} is not one of {STRATEGIES}")
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
    name = resolve_strategy(name)
    if name == "multi-worker":
        if not tf_config():
            raise EmUnetError("--strategy multi-worker needs TF_CONFIG to describe the cluster and this task")
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "one-device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


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
        log=print,
        **kwargs,
    ):
        super().__init__(*args, seed=seed, **kwargs)
        self.seed = self._seed_state = seed
        self.deadline, self.worker_timeout_s, self.log = deadline, worker_timeout_s, log
        self.last_seen: dict[str, float] = {}  # trial id -> last sign of life of the worker running it
        self.tuner_seen: dict[str, float] = {}  # worker -> last time it asked for a trial
        self.given_up: set[str] = set()
        if worker_timeout_s:
            threading.Thread(target=self._watch, name="em-unet-worker-watch", daemon=True).start()

    @kt.synchronized
    def create_trial(self, tuner_id: str):
        self.tuner_seen[tuner_id] = time.monotonic()
        if self.deadline is not None and time.monotonic() >= self.deadline and tuner_id not in self.ongoing_trials:
            if not getattr(self, "_said_deadline", False):
                self.log("em-unet: --max-minutes reached: no new trial starts", flush=True)
                self._said_deadline = True
            return Trial(self.hyperparameters.copy(), status=TrialStatus.STOPPED)
        trial = super().create_trial(tuner_id)
        if trial.status == TrialStatus.RUNNING:
            self.last_seen[trial.trial_id] = time.monotonic()
        elif trial.status == TrialStatus.STOPPED and self.worker_timeout_s and self.ongoing_trials:
            self.tuner_ids.add(tuner_id)
            return Trial(self.hyperparameters.copy(), trial_id=trial.trial_id, status=TrialStatus.IDLE)
        return trial

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
        return super().end_trial(trial)

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
                self.ongoing_trials.pop(tuner_id)
                self.tuner_ids.discard(tuner_id)
                self._retry_queue.append(trial.trial_id)
                self.last_seen.pop(trial.trial_id, None)
                self.given_up.add(trial.trial_id)
                self.save()
                self.log(
                    f"em-unet: worker {tuner_id} silent for {silent:.0f} s: "
                    f"trial {trial.trial_id} goes back to the queue",
                    flush=True,
                )
        for tuner_id in list(self.tuner_ids - set(self.ongoing_trials)):
            if now - self.tuner_seen.get(tuner_id, now) > self.worker_timeout_s:
                self.tuner_ids.discard(tuner_id)  # a worker that died between trials

    def _watch(self) -> None:
        while True:
            time.sleep(max(0.5, self.worker_timeout_s / 4))
            self.requeue_silent()


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
