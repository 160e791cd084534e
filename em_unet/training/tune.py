"""Hyperparameter search with KerasTuner over the training settings a search space lists.

Search spaces are TOML files: ``[tuner]`` holds :class:`~em_unet.config.SearchConfig` settings
(algorithm, max_trials, ...; flags override them) and ``[space]`` lists, per training setting, the
values to try (``optimizer = ["sgd", "adam"]``) or a range (``learning_rate = {min = 1e-5, max = 1e-3,
sampling = "log"}``). The built-in default is ``default.toml`` in :mod:`em_unet.tuning`.

The HyperModel sits on the same training assembly as ``em-unet train`` (:mod:`em_unet.training.assembly`):
architecture and optimizer settings are chosen in :meth:`UnetHyperModel.build`, training-time ones
(augmentation, batch and crop size) in :meth:`UnetHyperModel.fit`. Every training flag ``tune`` shows
is honoured: ``--epochs`` is the epochs of each trial (Hyperband's longest), ``--early-stopping``
applies within each trial, ``--max-minutes`` to the whole search (no trial starts after it, and the
running one stops at an epoch's end), ``--seed`` fixes the trials drawn and their order.
Trials and per-trial TensorBoard logs (with the HParams dashboard) go to ``logs/tune/<project>/``;
re-running the same command resumes. After each trial the search prints "trial k of N" (N: ``max_trials``,
or every trial of Hyperband's brackets), the time per trial so far and the time left.

``--workers N`` (:func:`tune` with ``search.workers``) makes this process KerasTuner's chief on 127.0.0.1 and
runs the trials in N worker processes (KerasTuner's own distributed mode), each replaced by a fresh process
after ``--recycle-after`` trials: Keras and TensorFlow keep memory after every ``fit``, a process that ends
gives it back.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import keras
import keras_tuner as kt
import tensorflow as tf

from em_unet.config import (
    BUILD_FIELDS,
    FIT_FIELDS,
    SAMPLINGS,
    TUNE_EXCLUDED,
    SearchConfig,
    TrainConfig,
    shipped_toml,
)
from em_unet.errors import ConfigError, EmUnetError
from em_unet.inference.export import check_export_space, export_saved_model
from em_unet.io.files import atomic_output, check_writable
from em_unet.machine import precision_policy
from em_unet.settings import check_value, to_flags, value_type
from em_unet.training.assembly import (
    build_model,
    fit,
    inner_unet,
    model_voxel_size,
    placement_for,
    prepare_data,
    run_callbacks,
    steps_per_epoch,
    training_precision,
)
from em_unet.training.data import check_patch_size
from em_unet.training.distribute import (
    CHIEF_VARIABLE,
    LOCALHOST,
    ORACLE_VARIABLES,
    RECYCLE_VARIABLE,
    TrialHeartbeat,
    WorkerPool,
    free_port,
    make_strategy,
    oracle_class,
    resolve_strategy,
    set_tuner_role,
    watch_chief,
)
from em_unet.training.model import anisotropic_levels, unet_parameter_count

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SEARCHABLE = BUILD_FIELDS + FIT_FIELDS


# ---------------------------------------------------------------- search spaces


def _check_space(space: dict, where: str) -> dict:
    unknown = [key for key in space if key not in SEARCHABLE]
    if unknown:
        raise ConfigError(f"{where} [space]: unknown search-space entries {unknown} (valid: {', '.join(SEARCHABLE)})")
    for name, spec in space.items():
        field = TrainConfig.field(name)
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{where} [space] {name}: list at least one value")
            for value in spec:
                try:
                    check_value(field, value, TrainConfig)
                except ConfigError as err:
                    raise ConfigError(f"{where} [space] {name}: {err}") from None
            continue
        if not isinstance(spec, dict) or not {"min", "max"} <= set(spec) or set(spec) - {"min", "max", "sampling"}:
            raise ConfigError(
                f'{where} [space] {name}: give a list of values or {{min = ..., max = ..., sampling = "log"}}'
            )
        if value_type(TrainConfig, name) not in (float, int):
            raise ConfigError(f"{where} [space] {name}: a range needs a numeric setting; list the values instead")
        for bound in ("min", "max"):
            try:
                check_value(field, spec[bound], TrainConfig)
            except ConfigError as err:
                raise ConfigError(f"{where} [space] {name}.{bound}: {err}") from None
        if not spec["min"] < spec["max"]:
            raise ConfigError(f"{where} [space] {name}: min {spec['min']} must be below max {spec['max']}")
        sampling = spec.get("sampling", "log")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"{where} [space] {name}: sampling {sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if sampling == "log" and spec["min"] <= 0:
            raise ConfigError(f"{where} [space] {name}: log sampling needs min > 0")
    return space


def load_search_space(path: str | Path | None = None) -> dict:
    """Read and check a search-space TOML (None: the built-in ``default.toml``).

    Returns ``{"tuner": {...}, "space": {...}, "path": ...}``; ``tuner`` holds only the settings the
    file gives (defaults come from :class:`SearchConfig`)."""
    where = str(path) if path else "default.toml (built in)"
    try:
        text = shipped_toml("default.toml") if path is None else Path(path).read_text(encoding="utf-8")
        spec = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such search-space file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a search-space file") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    unknown = set(spec) - {"tuner", "space"}
    if unknown:
        raise ConfigError(f"{where}: unknown tables {sorted(unknown)} (valid: [tuner], [space])")
    tuner = spec.get("tuner", {})
    SearchConfig.from_dict(tuner, f"{where} [tuner]")  # checks the values; flags are layered on later
    return {"tuner": tuner, "space": _check_space(spec.get("space", {}), where), "path": where}


def search_settings(search_space: str | Path | None = None, given: dict | None = None) -> SearchConfig:
    """The search's settings: defaults, then the search-space TOML's ``[tuner]``, then ``given`` (flags)."""
    given = dict(given or {})
    search_space = given.get("search_space", search_space)
    tuner = load_search_space(search_space)["tuner"]
    return SearchConfig(**{**tuner, **given, "search_space": str(search_space) if search_space else None})


# ---------------------------------------------------------------- the HyperModel


class UnetHyperModel(kt.HyperModel):
    """Architecture and optimizer in ``build``; augmentation, batches and crops in ``fit``; both through the
    training assembly ``em-unet train`` uses."""

    # Frees Keras' global state between trials. It does not stop the ~30 MB a new model's
    # fit() keeps in TF 2.21 / Keras 3.15 (keras-team/keras#17458; benchmarks/tune_memory.py).
    clear_session_between_trials = True

    def __init__(self, space: dict, base: TrainConfig, data, deadline: float | None = None, grid: bool = False):
        super().__init__(name="em_unet")
        self.space, self.base, self.data, self.deadline, self.grid = space, base, data, deadline, grid
        self.placement = placement_for(base)

    def _register(self, hp, names) -> dict:
        values = {}  # KerasTuner hands booleans back as 0/1: cast each value to its setting's type
        for name in names:
            spec = self.space.get(name)
            if isinstance(spec, list):
                values[name] = value_type(TrainConfig, name)(hp.Choice(name, spec))
            elif isinstance(spec, dict):
                numeric = hp.Int if value_type(TrainConfig, name) is int else hp.Float
                sampling = spec.get("sampling", "log")
                step = (10 if sampling == "log" else None) if self.grid else None
                values[name] = numeric(name, spec["min"], spec["max"], sampling=sampling, step=step)
        return values

    def trial_config(self, hp, names=SEARCHABLE) -> TrainConfig:
        """The base configuration with this trial's values of ``names``."""
        return dataclasses.replace(self.base, **self._register(hp, names))

    def build(self, hp):
        config = self.trial_config(hp, BUILD_FIELDS)
        model, _ = build_model(config, steps_per_epoch(config, self.data), self.placement)
        return model

    def fit(self, hp, model, *args, callbacks=None, **kwargs):
        config = self.trial_config(hp)
        for callback in callbacks or []:
            if hasattr(callback, "objective"):
                only_on_validated_epochs(callback)
        callbacks = list(callbacks or []) + run_callbacks(config, deadline=self.deadline)
        return fit(model, config, self.data, self.placement, callbacks=callbacks, **kwargs)


def only_on_validated_epochs(callback: keras.callbacks.Callback) -> None:
    """Let a KerasTuner callback that follows the objective (its best-epoch checkpoint) act only on epochs
    whose logs hold the objective. KerasTuner saves the weights of every epoch whose logs lack it, which
    with ``--val-every`` > 1 would overwrite the best epoch's weights by a later, unvalidated epoch's."""
    on_epoch_end = callback.on_epoch_end

    def on_validated_epoch_end(epoch, logs=None):
        if callback.objective.has_value(logs or {}):
            on_epoch_end(epoch, logs)

    callback.on_epoch_end = on_validated_epoch_end


def check_space_fits(space: dict, base: TrainConfig, data) -> None:
    """Every listed depth / crop size fits the base settings and the slices (before any trial)."""
    lists = {name: space[name] for name in ("depth", "patch_size") if isinstance(space.get(name), list)}
    for values in itertools.product(*lists.values()):
        config = dataclasses.replace(base, **dict(zip(lists, values)))
        check_patch_size((0, *data.train_images.shape[1:3]), config.patch_size)


def largest_parameters(space: dict, base: TrainConfig) -> int:
    """The parameters of the largest U-Net the search can build: the export the models folder must have room for."""

    def values(name: str) -> list:
        spec = space.get(name)
        return spec if isinstance(spec, list) else [spec["max"]] if isinstance(spec, dict) else [getattr(base, name)]

    sizes = itertools.product(values("depth"), values("base_filters"), values("batch_norm"))
    outputs = 1 + len(base.affinity_offsets())
    voxel_size = model_voxel_size(base)

    def count(depth: int, filters: int, batch_norm: bool) -> int:
        if voxel_size is not None:  # a 3-D U-Net
            return unet_parameter_count(depth, filters, batch_norm, outputs, anisotropic_levels(depth, voxel_size))
        return unet_parameter_count(depth, filters, batch_norm, outputs, channels=base.z_context)

    return max(count(*size) for size in sizes)


# ---------------------------------------------------------------- the tuners


IDLE_POLL_S = 1.0  # wait between asks when the oracle has no trial to give yet


class WorkerRecycled(Exception):
    """Raised on a worker of ``tune --workers`` before it would ask for a trial beyond its ``recycle_after``."""


class TrialHooks:
    """Mixed into KerasTuner's tuners: seeds each trial, says which worker runs which trial, waits
    between asks when the oracle answers IDLE, (as a distributed worker) sends heartbeats, and (as a
    worker of ``tune --workers``) leaves after ``recycle_after`` trials so a fresh process takes over."""

    heartbeat_s: float | None = None
    recycle_after: int = 0

    def pre_create_trial(self):
        trials_run = getattr(self, "_trials_run", 0)
        if self.recycle_after and trials_run >= self.recycle_after:
            raise WorkerRecycled(trials_run)
        if getattr(self, "_asked_in_vain", False):
            time.sleep(IDLE_POLL_S)
        self._asked_in_vain = True
        super().pre_create_trial()

    def on_trial_begin(self, trial):
        self._asked_in_vain = False
        if getattr(self.hypermodel, "clear_session_between_trials", False):
            keras.backend.clear_session()  # here, not in build(): build runs inside the strategy's scope
        seed = self.hypermodel.base.seed
        keras.utils.set_random_seed(seed + int(trial.trial_id) if trial.trial_id.isdigit() else seed)
        values = {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")}
        print(f"[{self.tuner_id}] trial {trial.trial_id} started: {values}", flush=True)
        self._heartbeat = TrialHeartbeat(self.oracle, trial.trial_id, self.heartbeat_s) if self.heartbeat_s else None
        super().on_trial_begin(trial)

    def on_trial_end(self, trial):
        if self._heartbeat:
            self._heartbeat.stop()
        super().on_trial_end(trial)
        self._trials_run = getattr(self, "_trials_run", 0) + 1
        print(f"[{self.tuner_id}] trial {trial.trial_id} finished: {trial.status}", flush=True)


class EmUnetHyperband(TrialHooks, kt.Hyperband):
    """KerasTuner's Hyperband tuner (its epoch schedule and weight hand-over) on an oracle of ours."""

    def __init__(self, oracle, hypermodel, **kwargs):
        kt.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel, **kwargs)


class EmUnetTuner(TrialHooks, kt.Tuner):
    """KerasTuner's plain tuner, which the random, Bayesian and grid tuners are with their oracle."""


ORACLES = {
    "hyperband": kt.oracles.HyperbandOracle,
    "bayesian": kt.oracles.BayesianOptimizationOracle,
    "random": kt.oracles.RandomSearchOracle,
    "grid": kt.oracles.GridSearchOracle,
}


def make_tuner(
    search: SearchConfig,
    hypermodel: UnetHyperModel,
    directory: Path,
    epochs: int,
    seed: int,
    strategy=None,
    deadline: float | None = None,
    heartbeat_s: float | None = None,
    worker_timeout_s: float | None = None,
    recycle_after: int = 0,
):
    """A tuner for ``search.algorithm`` whose oracle holds ``seed`` and ``deadline``; ``recycle_after``
    (trials, 0: never) makes a worker's search end with :class:`WorkerRecycled`."""
    if isinstance(strategy, tf.distribute.OneDeviceStrategy):
        strategy = None  # KerasTuner's default path: the same single device
    options = {
        "objective": search.objective,
        "seed": seed,
        "deadline": deadline,
        "worker_timeout_s": worker_timeout_s,
        "parallel": search.workers,
    }
    if search.algorithm == "hyperband":
        oracle = oracle_class(ORACLES["hyperband"])(max_epochs=epochs, factor=search.hyperband_factor, **options)
        tuner_class = EmUnetHyperband
    else:
        oracle = oracle_class(ORACLES[search.algorithm])(max_trials=search.max_trials, **options)
        tuner_class = EmUnetTuner
    hooks = {"heartbeat_s": heartbeat_s, "recycle_after": recycle_after}
    tuner_class = type(tuner_class.__name__, (tuner_class,), hooks)
    return tuner_class(
        oracle,
        hypermodel,
        directory=str(directory),
        project_name=search.project,
        overwrite=search.overwrite,
        distribution_strategy=strategy,
    )


def results_table(tuner, epochs: int) -> list[dict]:
    """One row per finished trial: id, hyperparameters, best val_loss, epochs (Hyperband's own per
    trial; ``epochs`` for the other tuners)."""
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        if trial.status != "COMPLETED":
            continue
        values = {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")}
        rows.append(
            {
                "trial": trial_id,
                **values,
                f"best_{tuner.oracle.objective.name}": trial.score,
                "epochs": trial.hyperparameters.values.get("tuner/epochs", epochs),
            }
        )
    return rows


def _write_table(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(buffer.getvalue())


def _export_best(tuner, base: TrainConfig, run_dir: Path) -> Path:
    """Export the best trial's U-Net, unless this search already exported that trial (a re-run of a
    finished search does not add a duplicate version)."""
    best_trial = tuner.oracle.get_best_trials(1)[0]
    record_path = run_dir / "export.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("trial") == best_trial.trial_id and (Path(record.get("export_dir", "")) / "saved_model.pb").exists():
        print(f"the best trial ({best_trial.trial_id}) was exported before: {record['export_dir']}")
        return Path(record["export_dir"])
    best = inner_unet(tuner.get_best_models(1)[0])
    export_dir = export_saved_model(best, base.model_name, base.models_dir, precision=base.export_precision)
    with atomic_output(record_path, overwrite=True) as tmp:
        tmp.write_text(json.dumps({"trial": best_trial.trial_id, "export_dir": str(export_dir)}, indent=2))
    return export_dir


def worker_command(base: TrainConfig, search: SearchConfig, tuner_id: str, deadline: float | None) -> list[str]:
    """The command of one worker of ``tune --workers``: the chief's settings, as a worker of its oracle
    (``KERASTUNER_ORACLE_PORT`` of this process) that gets what is left of ``deadline`` (``time.monotonic()``)."""
    flags = to_flags(base, exclude=(*TUNE_EXCLUDED, "max_minutes"))
    flags += to_flags(search, exclude=("workers", "recycle_after", "overwrite", "tuner_id", "oracle_ip", "oracle_port"))
    if deadline is not None:
        flags += ["--max-minutes", repr(max(1e-6, (deadline - time.monotonic()) / 60.0))]
    where = ["--tuner-id", tuner_id, "--oracle-ip", LOCALHOST, "--oracle-port", os.environ["KERASTUNER_ORACLE_PORT"]]
    return [sys.executable, "-m", "em_unet.cli", "tune", *flags, *where]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def tune(base: TrainConfig, search: SearchConfig | None = None, verbose: int = 1) -> dict:
    """Run (or resume) a search; write ``results.csv``; export the best model. Returns where things went.

    ``search`` defaults to the built-in search space's settings (:func:`search_settings`).
    Distributed (KerasTuner's chief/worker mode, set by ``search.tuner_id`` etc. or by
    ``KERASTUNER_TUNER_ID``, ``KERASTUNER_ORACLE_IP``, ``KERASTUNER_ORACLE_PORT``): the chief serves
    the oracle and, once every trial has ended, writes the results table and exports; workers run
    trials. All of them need the same ``logs_dir`` (a shared filesystem across machines). A worker
    silent for ``search.worker_timeout`` seconds (it sends a heartbeat every quarter of that) loses
    its trial to the others.

    ``search.workers`` = N > 0: this process is the chief of N worker processes on this machine
    (:class:`~em_unet.training.distribute.WorkerPool`; it must be the main thread, which SIGINT or SIGTERM stop
    together with the workers). Each worker process runs ``search.recycle_after`` trials, then a fresh
    one takes its place; their output goes to ``logs_dir/tune/<project>/workers/``. A worker that leaves
    (recycled) returns ``{"role": "worker", "recycled": trials, ...}``.
    """
    search = search or search_settings()
    if base.ema:
        raise ConfigError(
            "--ema is for train: KerasTuner keeps each trial's own weights, not their average; tune without it, "
            "then train the chosen settings with --ema"
        )
    if not search.workers:
        return _tune(base, search, verbose)
    if threading.current_thread() is not threading.main_thread():
        raise EmUnetError("tune with workers runs in the main thread (it stops them on Ctrl-C)")
    inherited = [v for v in ORACLE_VARIABLES if os.environ.get(v)]
    if inherited:
        raise EmUnetError(
            f"--workers {search.workers} starts its own chief and workers on this machine: unset "
            f"{', '.join(inherited)} (they join a search started elsewhere)"
        )
    previous = signal.signal(signal.SIGTERM, _interrupt)  # so that `kill` also ends the workers
    try:
        set_tuner_role("chief", LOCALHOST, free_port())
        return _tune(base, search, verbose)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for variable in ORACLE_VARIABLES:
            os.environ.pop(variable, None)


def _tune(base: TrainConfig, search: SearchConfig, verbose: int) -> dict:
    role = set_tuner_role(search.tuner_id, search.oracle_ip, search.oracle_port)
    recycle_after = int(os.environ.get(RECYCLE_VARIABLE) or 0) if role == "worker" else 0
    if role == "worker" and os.environ.get(CHIEF_VARIABLE):
        watch_chief(int(os.environ[CHIEF_VARIABLE]))
    if role == "worker" and search.overwrite:
        raise EmUnetError("--overwrite is for the chief: a worker would delete the search it joins")
    if resolve_strategy(base.strategy) == "multi-worker" and role != "worker":
        raise EmUnetError(
            "with --strategy multi-worker, each training cluster joins a KerasTuner chief as one "
            "worker: start a chief and give the processes of one cluster the same --tuner-id"
        )
    space = load_search_space(search.search_space)["space"]
    directory = Path(base.logs_dir) / "tune"
    run_dir = directory / search.project
    if role != "worker":
        check_writable(run_dir / "search.json", overwrite=True)
        check_writable(Path(base.models_dir) / base.model_name / ".next-version")
        check_export_space(base.models_dir, base.model_name, largest_parameters(space, base))
    gpus = len(tf.config.list_physical_devices("GPU"))
    if search.workers and gpus:
        try:
            tf.config.set_visible_devices([], "GPU")  # the chief only serves the oracle: the GPUs are the workers'
        except RuntimeError:  # pragma: no cover - TensorFlow already runs on them in this process
            pass
    strategy = make_strategy(base.strategy)
    data = prepare_data(base)
    check_space_fits(space, base, data)
    deadline = time.monotonic() + base.max_minutes * 60.0 if base.max_minutes else None
    with precision_policy(training_precision(base)) as precision:
        hypermodel = UnetHyperModel(space, base, data, deadline, grid=search.algorithm == "grid")
        tuner = make_tuner(
            search,
            hypermodel,
            directory,
            base.epochs,
            base.seed,
            strategy,
            deadline,
            heartbeat_s=search.worker_timeout / 4 if role == "worker" else None,
            worker_timeout_s=search.worker_timeout if role == "chief" else None,
            recycle_after=recycle_after,
        )
        if role != "worker":
            with atomic_output(run_dir / "search.json", overwrite=True) as tmp:
                tmp.write_text(
                    json.dumps(
                        {
                            "search": search.to_dict(),
                            "space": space,
                            "base": base.to_dict(),
                            "resolved_precision": precision,
                            "augment_placement_used": hypermodel.placement,
                        },
                        indent=2,
                    )
                )
        pool = None
        if search.workers:
            pool = WorkerPool(
                tuner.oracle,
                search.workers,
                lambda tuner_id: worker_command(base, search, tuner_id, deadline),
                run_dir / "workers",
                search.recycle_after,
                gpus=gpus,
            )
        try:
            if pool:
                pool.start()
            tuner.search(
                epochs=base.epochs,
                callbacks=[keras.callbacks.TensorBoard(str(run_dir / "tensorboard"))],
                verbose=verbose,
            )
            if pool:
                pool.search_returned()
        except WorkerRecycled as left:
            return {"role": role, "run_dir": run_dir, "recycled": left.args[0]}
        except KeyboardInterrupt:
            if pool and pool.error:  # the pool gave up on its workers and interrupted the search
                raise pool.error from None
            raise
        finally:
            if pool:
                pool.stop()
            if role == "chief":
                tuner.oracle.close()
        if role == "worker":
            return {"role": role, "run_dir": run_dir}
        rows = results_table(tuner, base.epochs)
        if not rows:
            raise EmUnetError(f"{run_dir}: no trial finished" + (" within --max-minutes" if deadline else ""))
        _write_table(run_dir / "results.csv", rows)
        export_dir = _export_best(tuner, base, run_dir)
        best_hyperparameters = {
            k: v for k, v in tuner.get_best_hyperparameters(1)[0].values.items() if not k.startswith("tuner/")
        }
    return {
        "role": role,
        "run_dir": run_dir,
        "rows": rows,
        "export_dir": export_dir,
        "best_hyperparameters": best_hyperparameters,
    }
