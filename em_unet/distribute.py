"""Where training runs: tf.distribute strategies for one run, and KerasTuner's distributed mode
(a chief oracle and workers) for a search. em-unet schedules nothing itself; it chooses and
configures these engines, and adds the one thing KerasTuner's chief lacks: noticing a dead worker.
"""

from __future__ import annotations

import json
import os
import threading
import time

import tensorflow as tf

from em_unet.errors import EmUnetError

STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")


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
        raise EmUnetError('TF_CONFIG needs "cluster" and "task" entries, e.g. {"cluster": {"worker": '
                          '["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}')
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


def prepare_for_fit(model, dataset: tf.data.Dataset) -> None:
    """Make Keras 3's ``fit`` work under ``MultiWorkerMirroredStrategy`` (no-op otherwise).

    Keras 3.15 fails there twice (keras-team/keras#20585, tensorflow/tensorflow#72388, both open):
    it builds the model's state from the first batch reduced across workers, an eager reduce that
    fails; and it averages each step's scalar logs across workers along axis 0, which scalars do
    not have. So: build the state from a local batch, and average scalars over workers as scalars.
    """
    strategy = model.distribute_strategy
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    _patch_keras_multi_worker_logs()
    batch = next(iter(dataset))
    with strategy.scope():
        model._symbolic_build(data_batch=batch)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


def _patch_keras_multi_worker_logs() -> None:
    from keras.src.backend.tensorflow import trainer as keras_trainer

    original = keras_trainer.reduce_per_replica
    if getattr(original, "em_unet_patched", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            def mean(value):
                local = strategy.experimental_local_results(value)[0]
                return strategy.reduce("MEAN", value, axis=None if local.shape.rank == 0 else 0)
            return tf.nest.map_structure(mean, values)
        return original(values, strategy, reduction)

    reduce_per_replica.em_unet_patched = True
    keras_trainer.reduce_per_replica = reduce_per_replica


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
        raise EmUnetError(f"distributed tuning needs all of {', '.join(ORACLE_VARIABLES)} "
                          f"(or --tuner-id, --oracle-ip, --oracle-port); missing {', '.join(missing)}")
    port = os.environ["KERASTUNER_ORACLE_PORT"]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise EmUnetError(f"oracle port {port!r} is not a port number")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


class WorkerWatch:
    """On the chief: gives a dead worker's trial to the others.

    KerasTuner's chief keeps a trial "ongoing" until the worker that took it reports back, and
    waits for that before it exits, so one killed worker stalls the search for ever (KerasTuner 1.4
    has no timeout). Workers send a heartbeat every few seconds while they run a trial
    (:class:`TrialHeartbeat`); when a trial's worker has been silent for ``timeout_s`` seconds,
    the trial goes back into KerasTuner's own retry queue and the next worker that asks runs it.
    Workers that ask for a trial while others are still running are told to wait (IDLE) rather
    than to stop, so someone is left to take a trial that comes back.
    """

    def __init__(self, oracle, timeout_s: float, log=print):
        from keras_tuner.src.engine import trial as trial_module
        from keras_tuner.src.engine.oracle import synchronized

        self.oracle, self.timeout_s, self.log = oracle, timeout_s, log
        self.status = trial_module.TrialStatus
        self.trial_class = trial_module.Trial
        self.last_seen: dict[str, float] = {}  # trial id -> last sign of life of the worker running it
        self.tuner_seen: dict[str, float] = {}  # worker -> last time it asked for a trial
        self.given_up: set[str] = set()
        self._create, self._end, self._get = oracle.create_trial, oracle.end_trial, oracle.get_trial
        oracle.create_trial = lambda tuner_id: synchronized(WorkerWatch._create_trial)(oracle, self, tuner_id)
        oracle.end_trial = lambda trial: synchronized(WorkerWatch._end_trial)(oracle, self, trial)
        oracle.get_trial = self._get_trial
        self._check = lambda: synchronized(WorkerWatch._requeue_silent)(oracle, self)
        threading.Thread(target=self._watch, name="em-unet-worker-watch", daemon=True).start()

    @staticmethod
    def _create_trial(oracle, watch: WorkerWatch, tuner_id: str):
        watch.tuner_seen[tuner_id] = time.monotonic()
        trial = watch._create(tuner_id)
        if trial.status == watch.status.RUNNING:
            watch.last_seen[trial.trial_id] = time.monotonic()
        elif trial.status == watch.status.STOPPED and oracle.ongoing_trials:
            oracle.tuner_ids.add(tuner_id)
            return watch.trial_class(oracle.hyperparameters.copy(), trial_id=trial.trial_id,
                                     status=watch.status.IDLE)
        return trial

    @staticmethod
    def _end_trial(oracle, watch: WorkerWatch, trial):
        # The first result of a trial counts, whoever sends it: the worker that rerun it, or the one
        # given up on that turned out to be alive. A second result of the same trial is dropped.
        ongoing = any(t.trial_id == trial.trial_id for t in oracle.ongoing_trials.values())
        if trial.trial_id in watch.given_up:
            watch.given_up.discard(trial.trial_id)
            if trial.trial_id in oracle._retry_queue:
                oracle._retry_queue.remove(trial.trial_id)
        elif trial.trial_id in oracle.end_order and not ongoing:
            watch.log(f"em-unet: a second result of trial {trial.trial_id} dropped: it has one", flush=True)
            return None
        watch.last_seen.pop(trial.trial_id, None)
        return watch._end(trial)

    def _get_trial(self, trial_id: str):
        if trial_id in self.last_seen:
            self.last_seen[trial_id] = time.monotonic()
        return self._get(trial_id)

    @staticmethod
    def _requeue_silent(oracle, watch: WorkerWatch) -> None:
        now = time.monotonic()
        for tuner_id, trial in list(oracle.ongoing_trials.items()):
            silent = now - watch.last_seen.get(trial.trial_id, now)
            if silent > watch.timeout_s:
                oracle.ongoing_trials.pop(tuner_id)
                oracle.tuner_ids.discard(tuner_id)
                oracle._retry_queue.append(trial.trial_id)
                watch.last_seen.pop(trial.trial_id, None)
                watch.given_up.add(trial.trial_id)
                oracle.save()
                watch.log(f"em-unet: worker {tuner_id} silent for {silent:.0f} s: "
                          f"trial {trial.trial_id} goes back to the queue", flush=True)
        for tuner_id in list(oracle.tuner_ids - set(oracle.ongoing_trials)):
            if now - watch.tuner_seen.get(tuner_id, now) > watch.timeout_s:
                oracle.tuner_ids.discard(tuner_id)  # a worker that died between trials

    def _watch(self) -> None:
        while True:
            time.sleep(max(0.5, self.timeout_s / 4))
            self._check()


class TrialHeartbeat:
    """On a worker: tells the chief every ``interval_s`` seconds that this trial is still running."""

    def __init__(self, oracle, trial_id: str, interval_s: float):
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, args=(oracle, trial_id, interval_s),
                                       name="em-unet-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self, oracle, trial_id: str, interval_s: float) -> None:
        while not self.stopped.wait(interval_s):
            try:
                oracle.get_trial(trial_id)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the chief decides what silence means
                pass

    def stop(self) -> None:
        self.stopped.set()
