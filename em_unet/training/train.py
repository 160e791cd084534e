"""One training run: the assembly (:mod:`em_unet.training.assembly`), fit, scoring, export, and what a run
leaves behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from em_unet.config import TrainConfig
from em_unet.errors import EmUnetError
from em_unet.inference.export import export_saved_model
from em_unet.inference.predict import keras_predictor, predict_stack
from em_unet.io.files import atomic_output, check_free_space, check_writable, new_folder
from em_unet.machine import precision_policy
from em_unet.segmentation.metrics import evaluate_stack
from em_unet.training.assembly import (
    build_model,
    fit,
    placement_for,
    prepare_data,
    record_callbacks,
    run_callbacks,
    steps_per_epoch,
)
from em_unet.training.distribute import is_chief, make_strategy, resolve_strategy


def new_run_dir(logs_dir: str | Path, run_name: str | None, prefix: str = "train") -> Path:
    """The path of a fresh ``logs/<run>/`` (checked, not made); an existing run is never reused."""
    name = run_name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(logs_dir) / name
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise EmUnetError(f"{run_dir} already exists: choose another --run-name")
    check_writable(run_dir / "config.json")
    return run_dir


def validation_scores(model: keras.Model, images: np.ndarray, targets: np.ndarray) -> dict:
    """ISBI scores of ``model`` on whole validation slices, predicted as ``em-unet predict`` does by default."""
    slices = images if isinstance(images, np.ndarray) else (images[i] for i in range(len(images)))
    probabilities = np.stack(list(predict_stack(keras_predictor(model), slices)))
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

    ``config.strategy`` picks the ``tf.distribute`` strategy (:func:`em_unet.training.distribute.make_strategy`);
    ``batch_size`` is the global batch, split across replicas. In multi-worker training every
    worker trains and only the chief writes anything; the others return ``run_dir`` None.
    """
    strategy = make_strategy(config.strategy)  # first: multi-worker must start before TensorFlow runs anything
    chief = is_chief(strategy)
    if config.max_minutes and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise EmUnetError(
            "--max-minutes cannot be used with --strategy multi-worker: workers would stop at "
            "different epochs and wait for each other for ever"
        )
    run_dir = new_run_dir(config.logs_dir, config.run_name) if chief else None
    if chief and export:
        check_export_location(config.models_dir, config.model_name)
    data = prepare_data(config)
    steps = steps_per_epoch(config, data)
    placement = placement_for(config)
    with precision_policy(config.precision) as precision:
        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            model, unet = build_model(config, steps, placement)
        callbacks = run_callbacks(config)
        if not chief:
            fit(model, config, data, placement, callbacks=callbacks, verbose=verbose)
            return {"run_dir": None, "best_model": None, "export_dir": None, "scores": None}
        checkpoint_bytes = 2 * 4 * unet.count_params() + (1 << 20)
        check_free_space(run_dir, 3 * checkpoint_bytes, "the run's checkpoints")
        with new_folder(run_dir):
            record = {
                **config.to_dict(),
                "resolved_precision": precision,
                "augment_placement_used": placement,
                "strategy_used": resolve_strategy(config.strategy),
                "replicas": strategy.num_replicas_in_sync,
                "steps_per_epoch_used": steps,
                "train_slices": data.train_slices.tolist(),
                "val_slices_used": data.val_slices.tolist(),
                "augment_config": augment.to_dict() if (augment := config.augment_config()) else None,
            }
            with atomic_output(run_dir / "config.json") as tmp:
                tmp.write_text(json.dumps(record, indent=2))
            best_path = run_dir / "best.keras"
            callbacks += record_callbacks(run_dir, unet)
            fit(model, config, data, placement, callbacks=callbacks, verbose=verbose)
    if not best_path.exists():
        raise EmUnetError(
            f"{run_dir}: val_loss was never finite, so there is no best model: the training "
            f"diverged; lower --lr (now {config.learning_rate:g}) (the run's logs are kept there)"
        )
    best = keras.saving.load_model(best_path, compile=False)
    scores = validation_scores(best, data.val_images, data.val_targets)
    with atomic_output(run_dir / "scores.json") as tmp:
        tmp.write_text(json.dumps(scores, indent=2))
    export_dir = (
        export_saved_model(best, config.model_name, config.models_dir, precision=config.export_precision)
        if export
        else None
    )
    return {"run_dir": run_dir, "best_model": best_path, "export_dir": export_dir, "scores": scores}


def check_export_location(models_dir: str | Path, model_name: str) -> None:
    """Refuse, before training, a models folder where no version could be exported."""
    check_writable(Path(models_dir) / model_name / ".next-version")
