"""Hyperparameter search with KerasTuner over optimizer, learning rate and, when the
search space lists them, depth and augmentation.

Search spaces are TOML files (``tuning/default.toml`` is the built-in default).
Architecture and optimizer are chosen in :meth:`UnetHyperModel.build`, training-time
choices (augmentation, batch size, epochs) in :meth:`UnetHyperModel.fit`.
Trials, checkpoints and per-trial TensorBoard logs (with the HParams dashboard) go
to ``logs/tune/<project>/``; re-running the same command resumes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

import keras
import keras_tuner as kt
import tensorflow as tf

from em_unet.data import training_dataset, validation_dataset
from em_unet.distribute import (TrialHeartbeat, WorkerWatch, make_strategy, prepare_for_fit, resolve_strategy,
                                 set_tuner_role, shardable)
from em_unet.errors import EmUnetError
from em_unet.export import export_saved_model
from em_unet.losses import get_loss, metrics
from em_unet.model import build_unet
from em_unet.train import TrainConfig, default_steps_per_epoch, make_optimizer, prepare_data, resolve_precision

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ALGORITHMS = ("hyperband", "bayesian", "random", "grid")
DEFAULT_SEARCH_SPACE = {
    "tuner": {"algorithm": "hyperband", "objective": "val_loss", "max_trials": 12, "max_epochs": 40,
              "hyperband_factor": 3},
    "space": {"optimizer": ["sgd", "adam", "adamax"],
              "learning_rate": {"min": 1e-5, "max": 1e-3, "sampling": "log"}},
}


def load_search_space(path: str | Path | None = None) -> dict:
    """Read a search-space TOML (None: the built-in default)."""
    if path is None:
        return json.loads(json.dumps(DEFAULT_SEARCH_SPACE))
    path = Path(path)
    try:
        space = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EmUnetError(f"{path}: no such search-space file") from None
    except tomllib.TOMLDecodeError as err:
        raise EmUnetError(f"{path}: not valid TOML ({err})") from None
    unknown = set(space.get("space", {})) - {"optimizer", "learning_rate", "depth", "augment"}
    if unknown:
        raise EmUnetError(f"{path}: unknown search-space entries {sorted(unknown)}")
    algorithm = space.get("tuner", {}).get("algorithm", "hyperband")
    if algorithm not in ALGORITHMS:
        raise EmUnetError(f"{path}: tuner algorithm {algorithm!r} is not one of {ALGORITHMS}")
    return space


class UnetHyperModel(kt.HyperModel):
    """Architecture and optimizer in ``build``; augmentation and batches in ``fit``."""

    # Frees Keras' global state between trials. It does not stop the ~30 MB a new model's
    # fit() keeps in TF 2.21 / Keras 3.15 (keras-team/keras#17458; benchmarks/tune_memory.py).
    clear_session_between_trials = True

    def __init__(self, space: dict, base: TrainConfig, data, grid: bool = False):
        super().__init__(name="em_unet")
        self.space, self.base, self.data, self.grid = space, base, data, grid

    def _choice(self, hp, name, default):
        values = self.space.get(name)
        return hp.Choice(name, values) if values else default

    def build(self, hp):
        depth = self._choice(hp, "depth", self.base.depth)
        optimizer = hp.Choice("optimizer", self.space.get("optimizer", [self.base.optimizer]))
        rate = self.space.get("learning_rate")
        if isinstance(rate, dict):
            step = 10 if self.grid else None
            learning_rate = hp.Float("learning_rate", rate["min"], rate["max"], sampling=rate.get("sampling", "log"),
                                     step=step)
        else:
            learning_rate = hp.Choice("learning_rate", rate or [self.base.learning_rate])
        model = build_unet(depth, self.base.base_filters, batch_norm=self.base.batch_norm)
        model.compile(optimizer=make_optimizer(optimizer, learning_rate, self.base.momentum),
                      loss=get_loss(self.base.loss), metrics=metrics())
        return model

    def fit(self, hp, model, *args, **kwargs):
        augment = self._choice(hp, "augment", self.base.augment)
        base = self.base
        train = training_dataset(self.data.train_images, self.data.train_targets, base.patch_size, base.batch_size,
                                 base.seed, dataclasses.replace(base, augment=augment).augment_config())
        val = validation_dataset(self.data.val_images, self.data.val_targets, base.patch_size, base.batch_size)
        steps = base.steps_per_epoch or default_steps_per_epoch(self.data.train_images.shape, base.patch_size,
                                                                base.batch_size)
        prepare_for_fit(model, train)
        return model.fit(shardable(train), validation_data=shardable(val), steps_per_epoch=steps, shuffle=False,
                         **kwargs)


IDLE_POLL_S = 1.0  # wait between asks when the oracle has no trial to give yet


class TrialHooks:
    """Mixed into KerasTuner's tuners: says which worker runs which trial, waits between asks
    when the oracle answers IDLE, and (as a distributed worker) sends heartbeats during a trial."""

    heartbeat_s: float | None = None

    def pre_create_trial(self):
        if getattr(self, "_asked_in_vain", False):
            time.sleep(IDLE_POLL_S)
        self._asked_in_vain = True
        super().pre_create_trial()

    def on_trial_begin(self, trial):
        self._asked_in_vain = False
        if getattr(self.hypermodel, "clear_session_between_trials", False):
            keras.backend.clear_session()  # here, not in build(): build runs inside the strategy's scope
        values = {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")}
        print(f"[{self.tuner_id}] trial {trial.trial_id} started: {values}", flush=True)
        self._heartbeat = TrialHeartbeat(self.oracle, trial.trial_id, self.heartbeat_s) if self.heartbeat_s else None
        super().on_trial_begin(trial)

    def on_trial_end(self, trial):
        if self._heartbeat:
            self._heartbeat.stop()
        super().on_trial_end(trial)
        print(f"[{self.tuner_id}] trial {trial.trial_id} finished: {trial.status}", flush=True)


TUNERS = {"hyperband": kt.Hyperband, "bayesian": kt.BayesianOptimization, "random": kt.RandomSearch,
          "grid": kt.GridSearch}


def make_tuner(algorithm: str, hypermodel, tuner_cfg: dict, directory: Path, project: str, overwrite: bool, seed: int,
               strategy=None, heartbeat_s: float | None = None):
    if isinstance(strategy, tf.distribute.OneDeviceStrategy):
        strategy = None  # KerasTuner's default path: the same single device
    common = dict(objective=tuner_cfg.get("objective", "val_loss"), directory=str(directory), project_name=project,
                  overwrite=overwrite, seed=seed, distribution_strategy=strategy)
    tuner_class = type(f"EmUnet{TUNERS[algorithm].__name__}", (TrialHooks, TUNERS[algorithm]),
                       {"heartbeat_s": heartbeat_s})
    if algorithm == "hyperband":
        return tuner_class(hypermodel, max_epochs=tuner_cfg.get("max_epochs", 40),
                           factor=tuner_cfg.get("hyperband_factor", 3), **common)
    return tuner_class(hypermodel, max_trials=tuner_cfg.get("max_trials", 12), **common)


def results_table(tuner, epochs: int) -> list[dict]:
    """One row per finished trial: id, hyperparameters, best val_loss, epochs (Hyperband's own per
    trial; ``epochs`` for the other tuners)."""
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        if trial.status != "COMPLETED":
            continue
        values = {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")}
        rows.append({"trial": trial_id, **values, "best_val_loss": trial.score,
                     "epochs": trial.hyperparameters.values.get("tuner/epochs", epochs)})
    return rows


def tune(base: TrainConfig, search_space: str | Path | None = None, algorithm: str | None = None,
         max_trials: int | None = None, max_epochs: int | None = None, project: str = "default",
         overwrite: bool = False, verbose: int = 1, tuner_id: str | None = None, oracle_ip: str | None = None,
         oracle_port: int | None = None, worker_timeout_s: float = 120.0) -> dict:
    """Run (or resume) a search; write ``results.csv``; export the best model. Returns where things went.

    Distributed (KerasTuner's chief/worker mode, set by the arguments or by ``KERASTUNER_TUNER_ID``,
    ``KERASTUNER_ORACLE_IP``, ``KERASTUNER_ORACLE_PORT``): the chief serves the oracle and, once
    every trial has ended, writes the results table and exports; workers run trials. All of them
    need the same ``logs_dir`` (a shared filesystem across machines). A worker silent for
    ``worker_timeout_s`` seconds (it sends a heartbeat every quarter of that) loses its trial to
    the others.
    """
    role = set_tuner_role(tuner_id, oracle_ip, oracle_port)
    if role == "worker" and overwrite:
        raise EmUnetError("--overwrite is for the chief: a worker would delete the search it joins")
    if resolve_strategy(base.strategy) == "multi-worker" and role != "worker":
        raise EmUnetError("with --strategy multi-worker, each training cluster joins a KerasTuner chief as one "
                          "worker: start a chief and give the processes of one cluster the same --tuner-id")
    strategy = make_strategy(base.strategy)
    space = load_search_space(search_space)
    tuner_cfg = dict(space.get("tuner", {}))
    if max_trials:
        tuner_cfg["max_trials"] = max_trials
    if max_epochs:
        tuner_cfg["max_epochs"] = max_epochs
    algorithm = algorithm or tuner_cfg.get("algorithm", "hyperband")
    if algorithm not in ALGORITHMS:
        raise EmUnetError(f"tuner algorithm {algorithm!r} is not one of {ALGORITHMS}")
    data = prepare_data(base)
    keras.mixed_precision.set_global_policy(resolve_precision(base.precision))
    directory = Path(base.logs_dir) / "tune"
    hypermodel = UnetHyperModel(space.get("space", {}), base, data, grid=algorithm == "grid")
    tuner = make_tuner(algorithm, hypermodel, tuner_cfg, directory, project, overwrite, base.seed, strategy,
                       heartbeat_s=worker_timeout_s / 4 if role == "worker" else None)
    run_dir = directory / project
    if role == "chief":
        WorkerWatch(tuner.oracle, worker_timeout_s)
    if role != "worker":
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "search.json").write_text(json.dumps({"algorithm": algorithm, "tuner": tuner_cfg,
                                                         "space": space.get("space", {}),
                                                         "base": dataclasses.asdict(base)}, indent=2))
    epochs = tuner_cfg.get("max_epochs", 40)
    tuner.search(epochs=epochs, callbacks=[keras.callbacks.TensorBoard(str(run_dir / "tensorboard"))],
                 verbose=verbose)
    if role == "worker":
        return {"role": role, "run_dir": run_dir}
    rows = results_table(tuner, epochs)
    if not rows:
        raise EmUnetError(f"{run_dir}: no trial finished")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(run_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    best = tuner.get_best_models(1)[0]
    keras.mixed_precision.set_global_policy("float32")
    export_dir = export_saved_model(best, base.model_name, base.models_dir)
    return {"role": role, "run_dir": run_dir, "rows": rows, "export_dir": export_dir,
            "best_hyperparameters": tuner.get_best_hyperparameters(1)[0].values}
