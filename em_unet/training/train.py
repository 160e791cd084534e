"""One training run: the assembly (:mod:`em_unet.training.assembly`), fit, scoring, export, and what a run
leaves behind; resuming a run that was interrupted."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from em_unet.config import TrainConfig
from em_unet.errors import EmUnetError
from em_unet.inference.export import check_export_space, export_saved_model
from em_unet.inference.predict import keras_predictor, predict_stack
from em_unet.io.files import atomic_output, check_free_space, check_writable, exclusive, new_folder
from em_unet.machine import precision_policy
from em_unet.reporting.history import read_json
from em_unet.segmentation.metrics import evaluate_stack
from em_unet.settings import describe
from em_unet.training.assembly import (
    BACKUP_STATE,
    BackupState,
    TrainingBackup,
    build_model,
    fit,
    model_voxel_size,
    placement_for,
    prepare_data,
    read_backup,
    record_callbacks,
    restore_training_state,
    run_callbacks,
    steps_per_epoch,
    training_precision,
)
from em_unet.training.distribute import is_chief, make_strategy, resolve_strategy

BACKUP_FOLDER = "backup"  # in the run folder: the state a killed run resumes from, removed when the run finishes
RESUME_LAST = "last"  # --resume last: the newest unfinished run
RESUME_IGNORED = ("resume", "run_name", "logs_dir", "package")  # they locate the run, or act after it


def run_folder(logs_dir: str | Path, run_name: str | None, prefix: str = "train") -> Path:
    """The path of a new run's ``logs/<run>/``, checked writable; neither made nor yet checked unused
    (:func:`check_unused`, once the run's lock is held)."""
    name = run_name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(logs_dir) / name
    check_writable(run_dir / "config.json", overwrite=True)
    return run_dir


def check_unused(run_dir: Path) -> None:
    """Refuse an existing, non-empty ``run_dir``: an existing run is never reused by a new one."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        hint = f" (or continue it: --resume {run_dir})" if is_unfinished(run_dir) else ""
        raise EmUnetError(f"{run_dir} already exists: choose another --run-name{hint}")


def new_run_dir(logs_dir: str | Path, run_name: str | None, prefix: str = "train") -> Path:
    """The path of a fresh ``logs/<run>/`` (checked, not made); an existing run is never reused."""
    run_dir = run_folder(logs_dir, run_name, prefix)
    check_unused(run_dir)
    return run_dir


def is_unfinished(run_dir: Path) -> bool:
    """A run that ``--resume`` can continue: it has a backup and no scores.json."""
    return (run_dir / BACKUP_FOLDER / BACKUP_STATE).is_file() and not (run_dir / "scores.json").exists()


def resumable_run(config: TrainConfig) -> Path:
    """The run folder ``config.resume`` names: a folder (or a run's name in ``logs_dir``), or with ``"last"`` the
    run ``run_name`` names, else the unfinished run in ``logs_dir`` backed up last. Checked further, once its
    lock is held, by :func:`check_resumable`."""
    logs = Path(config.logs_dir)
    if config.resume != RESUME_LAST:
        run_dir = Path(config.resume)
        if not run_dir.is_dir() and (logs / config.resume).is_dir():
            run_dir = logs / config.resume
        if not (run_dir / "config.json").is_file():
            raise EmUnetError(
                f"--resume {config.resume}: not the folder of an em-unet train run (no config.json in {run_dir}): "
                f"give LOGS_DIR/<run>, or {RESUME_LAST} for the newest unfinished run"
            )
        return run_dir
    if config.run_name:
        run_dir = logs / config.run_name
        if not (run_dir / "config.json").is_file():
            raise EmUnetError(f"--resume {RESUME_LAST} --run-name {config.run_name}: no such run in {logs}")
        return run_dir
    runs = [folder for folder in logs.iterdir() if is_unfinished(folder)] if logs.is_dir() else []
    if not runs:
        raise EmUnetError(
            f"--resume {RESUME_LAST}: nothing to resume in {logs} (no run folder there has a {BACKUP_FOLDER}/ "
            "and no scores.json): start a new run without --resume"
        )
    return max(runs, key=lambda folder: (folder / BACKUP_FOLDER / BACKUP_STATE).stat().st_mtime)


def check_resumable(run_dir: Path, config: TrainConfig) -> BackupState:
    """The backup ``--resume`` continues ``run_dir`` from; refused: a finished run, a missing or corrupt backup,
    and settings other than the run's own (named, with both values)."""
    if (run_dir / "scores.json").exists():
        raise EmUnetError(
            f"--resume {run_dir}: that run has finished (its scores.json is written): start a new run without --resume"
        )
    backup = read_backup(run_dir / BACKUP_FOLDER)
    recorded = read_json(run_dir / "config.json")
    wanted = config.to_dict()
    # a setting the run's config.json lacks came into em-unet after that run: nothing to compare
    differences = [
        f"{describe(f)} {json.dumps(wanted[f.name])} now, {json.dumps(recorded[f.name])} in the run"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RESUME_IGNORED and f.name in recorded and recorded[f.name] != wanted[f.name]
    ]
    if differences:
        raise EmUnetError(
            f"--resume {run_dir}: settings differ from the run's config.json ({'; '.join(differences)}): "
            "give the run's own settings, or start a new run"
        )
    return backup


def history_before(path: Path, epochs: int) -> tuple[str, list[float | None]]:
    """The text of ``history.csv`` cut to its first ``epochs`` epochs (later rows belong to epochs a resumed run
    trains again; "" for none), and their ``val_loss`` (None where an epoch was not validated)."""
    if not epochs:
        return "", []
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except OSError as err:
        raise EmUnetError(f"{path}: cannot read the run's history ({err.strerror}): the run cannot resume") from None
    rows = [next(csv.reader([line]), []) for line in lines]
    header = rows[0] if rows else []
    kept = [(line, row) for line, row in zip(lines[1:], rows[1:]) if row and row[0].isdigit() and int(row[0]) < epochs]
    if "val_loss" not in header or [int(row[0]) for _, row in kept] != list(range(epochs)):
        raise EmUnetError(
            f"{path}: does not hold the {epochs} epochs the backup has trained (a damaged history): the run "
            "cannot resume; start a new run"
        )
    column = header.index("val_loss")
    losses = [None if row[column] == "NA" else float(row[column]) for _, row in kept]
    return "".join([lines[0], *(line for line, _ in kept)]), losses


def validation_scores(model: keras.Model, images: np.ndarray, targets: np.ndarray) -> dict:
    """ISBI scores of ``model`` on whole validation slices, predicted as ``em-unet predict`` does by default."""
    slices = images if isinstance(images, np.ndarray) else (images[i] for i in range(len(images)))
    probabilities = np.stack(list(predict_stack(keras_predictor(model), slices, count=len(images))))
    if not isinstance(targets, np.ndarray):  # lazy views of a volume: the validation slices one by one
        targets = np.stack([targets[i] for i in range(len(targets))])
    membrane = targets[..., 0] if targets.ndim == 4 else targets
    scores = evaluate_stack(probabilities, membrane)
    scores.pop("per_threshold")
    return scores


def train(config: TrainConfig, verbose: int = 1, export: bool = True) -> dict:
    """Train a U-Net, keep the best ``val_loss`` checkpoint, score it, export it; return where things went.

    Writes ``logs/<run>/`` (config.json, TensorBoard events, best.keras, history.csv, scores.json:
    written last, so its presence marks a finished run) and, with ``export``,
    ``saved_models/<model_name>/<version>/``. Every input and output location is checked before the
    run folder is made; a run refused before training leaves no folder behind.

    While it trains, ``logs/<run>/backup/`` holds the state after the last finished epoch (removed once the run
    has finished); ``config.resume`` continues such a run where it stopped (:func:`resumable_run`) and ends as
    the uninterrupted run would have: the same batches, history.csv and TensorBoard curves continued, the
    time limit counting every attempt's training time, early stopping and best.keras counting on. The run
    folder is locked (``logs/<run>.lock``) for the whole run: a second process training into it is refused.

    ``config.strategy`` picks the ``tf.distribute`` strategy (:func:`em_unet.training.distribute.make_strategy`);
    ``batch_size`` is the global batch, split across replicas. In multi-worker training every
    worker trains and only the chief writes anything; the others return ``run_dir`` None.
    """
    strategy = make_strategy(config.strategy)  # first: multi-worker must start before TensorFlow runs anything
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    if config.max_minutes and multi_worker:
        raise EmUnetError(
            "--max-minutes cannot be used with --strategy multi-worker: workers would stop at "
            "different epochs and wait for each other for ever"
        )
    if config.resume and multi_worker:
        raise EmUnetError(
            "--resume cannot be used with --strategy multi-worker: every worker would have to restore the "
            "chief's backup; start a new run"
        )
    if not is_chief(strategy):
        return _train(config, strategy, None, verbose, export)
    run_dir = resumable_run(config) if config.resume else run_folder(config.logs_dir, config.run_name)
    with exclusive(run_dir, "the training run"):  # before the data are read: the long work starts there
        try:
            return _train(config, strategy, run_dir, verbose, export)
        except KeyboardInterrupt as err:
            if is_unfinished(run_dir):
                note = f"{run_dir} is backed up: the same command with --resume {run_dir} continues it"
                err.__notes__ = [*getattr(err, "__notes__", []), note]
            raise


def _train(config: TrainConfig, strategy, run_dir: Path | None, verbose: int, export: bool) -> dict:
    """:func:`train` once the run folder is chosen and locked (``run_dir`` None: a multi-worker worker)."""
    backup = None
    if run_dir is not None:
        backup = check_resumable(run_dir, config) if config.resume else None
        if backup is None:
            check_unused(run_dir)
        if export:
            check_export_location(config.models_dir, config.model_name)
    history, past = history_before(run_dir / "history.csv", backup.epoch) if backup else ("", [])
    data = prepare_data(config)
    steps = steps_per_epoch(config, data)
    placement = placement_for(config)
    with precision_policy(training_precision(config)) as precision:
        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            model, unet = build_model(config, steps, placement)
            if backup is not None:
                restore_training_state(model, backup)
        started, spent = time.monotonic(), backup.elapsed_s if backup else 0.0
        deadline = started + config.max_minutes * 60.0 - spent if config.max_minutes else None
        callbacks = run_callbacks(config, deadline=deadline, past_val_losses=past)
        if run_dir is None:
            fit(model, config, data, placement, callbacks=callbacks, verbose=verbose)
            return {"run_dir": None, "best_model": None, "export_dir": None, "scores": None, "resumed_from": None}
        parameters = unet.count_params()
        checkpoint_bytes = 2 * 4 * parameters + (1 << 20)
        copies = 4 if config.ema else 3  # weights and two optimizer slots (and their average)
        backup_bytes = 2 * (copies * 4 * parameters + (1 << 20))  # the old and the new backup
        check_free_space(run_dir, 3 * checkpoint_bytes + backup_bytes, "the run's checkpoints")
        if export:
            check_export_space(config.models_dir, config.model_name, parameters)
        with new_folder(run_dir):
            if backup is None:
                record = {
                    **{k: v for k, v in config.to_dict().items() if k != "resume"},
                    "resolved_precision": precision,
                    "augment_placement_used": placement,
                    "strategy_used": resolve_strategy(config.strategy),
                    "replicas": strategy.num_replicas_in_sync,
                    "steps_per_epoch_used": steps,
                    "voxel_size_used": model_voxel_size(config),
                    "train_slices": data.train_slices.tolist(),
                    "val_slices_used": data.val_slices.tolist(),
                    "augment_config": augment.to_dict() if (augment := config.augment_config()) else None,
                }
                with atomic_output(run_dir / "config.json") as tmp:
                    tmp.write_text(json.dumps(record, indent=2))
            elif history:
                with atomic_output(run_dir / "history.csv", overwrite=True) as tmp:
                    tmp.write_text(history)
            else:  # resumed before its first epoch ended: rows of that epoch, if any, are written again
                (run_dir / "history.csv").unlink(missing_ok=True)
            best_path = run_dir / "best.keras"
            finite = [loss for loss in past if loss is not None and math.isfinite(loss)]
            callbacks += record_callbacks(
                run_dir, unet, best=min(finite, default=np.inf), append=backup is not None, averaged=bool(config.ema)
            )
            callbacks.append(TrainingBackup(run_dir / BACKUP_FOLDER, config.epochs, spent, started))  # last
            if backup is None or not backup.stopped:
                fit(
                    model,
                    config,
                    data,
                    placement,
                    callbacks=callbacks,
                    verbose=verbose,
                    resume_from=backup.epoch if backup else 0,
                )
    if not best_path.exists():
        raise EmUnetError(
            f"{run_dir}: val_loss was never finite, so there is no best model: the training "
            f"diverged; lower --lr (now {config.learning_rate:g}) (the run's logs are kept there)"
        )
    best = keras.saving.load_model(best_path, compile=False)
    scores = validation_scores(best, data.val_images, data.val_targets)
    export_dir = export_best(best, best_path, config) if export else None
    with atomic_output(run_dir / "scores.json") as tmp:  # after the export: a run that failed there can resume
        tmp.write_text(json.dumps(scores, indent=2))
    shutil.rmtree(run_dir / BACKUP_FOLDER, ignore_errors=True)
    return {
        "run_dir": run_dir,
        "best_model": best_path,
        "export_dir": export_dir,
        "scores": scores,
        "resumed_from": backup.epoch if backup else None,
    }


def export_best(best: keras.Model, best_path: Path, config: TrainConfig) -> Path:
    """Export ``best`` as ``config`` says; a failure (a full disk) names the kept ``best_path`` and the command
    that exports it later."""
    try:
        return export_saved_model(best, config.model_name, config.models_dir, precision=config.export_precision)
    except (OSError, EmUnetError) as err:
        cause = str(err)
        if isinstance(err, OSError):
            cause = f"cannot write the export in {Path(config.models_dir) / config.model_name}: {err.strerror or err}"
        raise EmUnetError(
            f"{cause}; the best model is kept: export it with em-unet export {best_path} "
            f"--models-dir {config.models_dir} --model-name {config.model_name}"
        ) from None


def check_export_location(models_dir: str | Path, model_name: str) -> None:
    """Refuse, before training, a models folder where no version could be exported."""
    check_writable(Path(models_dir) / model_name / ".next-version")
