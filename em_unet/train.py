"""Training: configuration, the loop, where augmentation runs, and what a run leaves behind."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from em_unet.augment import AugmentConfig, augment_batch, resolve_placement
from em_unet.data import check_patch_size, load_labelled_stack, split_slices, training_dataset, validation_dataset
from em_unet.distribute import STRATEGIES, is_chief, make_strategy, prepare_for_fit, resolve_strategy, shardable
from em_unet.errors import DataError, EmUnetError
from em_unet.export import export_saved_model
from em_unet.machine import cpu_flags
from em_unet.losses import border_weight_map, get_loss, metrics
from em_unet.metrics import evaluate_stack
from em_unet.model import build_unet, check_input_size
from em_unet.outputs import atomic_output, check_writable
from em_unet.predict import keras_predictor, predict_stack


class StepAugmentedModel(keras.Model):
    """Wraps a model so that each training batch is augmented inside the training step.

    The seed of batch ``n`` is ``(seed, n)`` with ``n`` the optimizer's step
    counter, so runs are reproducible. Inference and export use ``self.inner``.
    """

    def __init__(self, inner: keras.Model, augment: AugmentConfig, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.augment = augment
        self.augment_seed = seed

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def train_step(self, data):
        images, targets = data[0], data[1]
        step = tf.cast(self.optimizer.iterations, tf.int64)
        seed = tf.stack([tf.constant(self.augment_seed, tf.int64), step])
        images, targets = augment_batch(images, targets, seed, self.augment)
        return super().train_step((images, targets) + tuple(data[2:]))


OPTIMIZERS = ("sgd", "adam", "adamax")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


@dataclass
class TrainConfig:
    """Everything a training run depends on; written to ``<run dir>/config.json``.

    Sizes in pixels; ``val_slices`` is an inclusive (first, last) slice range. ``slices``
    (inclusive, optional) restricts the run to part of the stack; ``val_slices`` then lies inside it.
    The defaults are the preset chosen by measurement on ISBI 2012 (README, "Quality"):
    16 base filters and Adam 3e-4 beat 32 filters at the same wall time, because
    they train about 3x as many epochs in it; a constant 3e-4 beat cosine decay
    (``lr_schedule="cosine"``) from 3e-4 and from 1e-3 at 95 epochs.
    """

    data: str
    labels: str
    label_convention: str = "auto"
    val_slices: tuple[int, int] | None = None
    val_fraction: float | None = None
    slices: tuple[int, int] | None = None
    depth: int = 4
    base_filters: int = 16
    batch_norm: bool = False
    patch_size: int = 256
    batch_size: int = 4
    epochs: int = 40
    steps_per_epoch: int | None = None
    optimizer: str = "adam"
    learning_rate: float = 3e-4
    lr_schedule: str = "constant"
    momentum: float = 0.0
    loss: str = "bce"
    augment: bool = True
    augment_placement: str = "auto"
    elastic_backend: str = "tensorflow"
    elastic_sigma_px: float = 10.0
    elastic_points: int = 3
    rotation_degrees: float = 180.0
    precision: str = "auto"
    strategy: str = "auto"
    early_stopping: int = 0
    max_minutes: float | None = None
    seed: int = 0
    run_name: str | None = None
    logs_dir: str = "logs"
    models_dir: str = "saved_models"
    model_name: str = "em_unet"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.val_slices is not None:
            self.val_slices = tuple(self.val_slices)
        if self.slices is not None:
            self.slices = tuple(self.slices)


    def augment_config(self) -> AugmentConfig | None:
        """The augmentation this run trains with, or None when ``augment`` is off."""
        if not self.augment:
            return None
        return AugmentConfig(rotation_degrees=self.rotation_degrees, elastic=self.elastic_sigma_px > 0,
                             elastic_sigma_px=self.elastic_sigma_px, elastic_points=self.elastic_points,
                             elastic_backend=self.elastic_backend)


def resolve_precision(precision: str) -> str:
    """``auto``: bfloat16 on CPUs with AMX or AVX512-BF16 and on GPUs of compute capability >= 8,
    float16 on older GPUs, float32 otherwise."""
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        return "mixed_bfloat16" if capability >= (8, 0) else "mixed_float16"
    return "mixed_bfloat16" if cpu_flags() & {"amx_bf16", "avx512_bf16"} else "float32"


def learning_rate_schedule(learning_rate: float, schedule: str, total_steps: int):
    """``constant``: ``learning_rate`` throughout. ``cosine``: a linear warm-up over the first 2 % of
    ``total_steps`` (optimizer steps), then cosine decay to 1 % of ``learning_rate`` at the last step;
    the warm-up keeps a high peak rate from spiking the loss in the first epochs."""
    if schedule == "constant":
        return learning_rate
    if schedule != "cosine":
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    warmup = max(1, total_steps // 50)
    return keras.optimizers.schedules.CosineDecay(0.0, max(1, total_steps - warmup), alpha=0.01,
                                                  warmup_target=learning_rate, warmup_steps=warmup)


def make_optimizer(name: str, learning_rate, momentum: float = 0.0) -> keras.optimizers.Optimizer:
    """``learning_rate``: a number or a Keras schedule of the optimizer step."""
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=momentum)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "adamax":
        return keras.optimizers.Adamax(learning_rate)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def default_steps_per_epoch(train_shape, patch_size: int, batch_size: int) -> int:
    """Enough batches to cover the training slices' area once per epoch."""
    n, height, width = train_shape[:3]
    return max(1, round(n * height * width / (patch_size * patch_size * batch_size)))


@dataclass
class PreparedData:
    train_images: np.ndarray
    train_targets: np.ndarray
    val_images: np.ndarray
    val_targets: np.ndarray
    train_slices: np.ndarray
    val_slices: np.ndarray


def prepare_data(config: TrainConfig) -> PreparedData:
    """Read, split, and (for the border-weighted loss) attach weight maps as target channel 1."""
    images, targets = load_labelled_stack(config.data, config.labels, config.label_convention)
    train_slices, val_slices = split_slices(len(images), config.val_slices, config.val_fraction)
    if config.slices is not None:
        first, last = config.slices
        if not 0 <= first <= last < len(images):
            raise DataError(f"slices {first}-{last} are outside the stack's slices 0-{len(images) - 1}")
        train_slices = train_slices[(train_slices >= first) & (train_slices <= last)]
        val_slices = val_slices[(val_slices >= first) & (val_slices <= last)]
        if not (train_slices.size and val_slices.size):
            raise DataError(f"slices {first}-{last} need both training and validation slices "
                            f"(validation: {config.val_slices})")
    check_patch_size(images.shape, config.patch_size)
    check_input_size(config.patch_size, config.patch_size, config.depth)
    if config.loss == "weighted_bce":
        weights = np.stack([border_weight_map(t) for t in targets])
        targets = np.stack([targets, weights], axis=-1)
    return PreparedData(images[train_slices], targets[train_slices], images[val_slices], targets[val_slices],
                        train_slices, val_slices)


def new_run_dir(logs_dir: str | Path, run_name: str | None, prefix: str = "train") -> Path:
    """A fresh ``logs/<run>/``; an existing run is never reused."""
    name = run_name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(logs_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise EmUnetError(f"{run_dir} already exists: choose another --run-name")
    check_writable(run_dir / "config.json")
    return run_dir


def validation_scores(model: keras.Model, images: np.ndarray, targets: np.ndarray) -> dict:
    """ISBI scores of ``model`` on whole validation slices, predicted as ``em-unet predict`` does by default."""
    probabilities = np.stack(list(predict_stack(keras_predictor(model), images)))
    membrane = targets[..., 0] if targets.ndim == 4 else targets
    scores = evaluate_stack(probabilities, membrane)
    scores.pop("per_threshold")
    return scores


def train(config: TrainConfig, verbose: int = 1, export: bool = True) -> dict:
    """Train a U-Net, keep the best ``val_loss`` checkpoint, score it, export it; return where things went.

    Writes ``logs/<run>/`` (config.json, TensorBoard events, best.keras,
    history.csv, scores.json: written last, so its presence marks a finished run)
    and, with ``export``, ``saved_models/<model_name>/<version>/``.

    ``config.strategy`` picks the ``tf.distribute`` strategy (:func:`em_unet.distribute.make_strategy`);
    ``batch_size`` is the global batch, split across replicas. In multi-worker training every
    worker trains and only the chief writes anything; the others return ``run_dir`` None.
    """
    strategy = make_strategy(config.strategy)  # first: multi-worker must start before TensorFlow runs anything
    chief = is_chief(strategy)
    if config.max_minutes and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise EmUnetError("--max-minutes cannot be used with --strategy multi-worker: workers would stop at "
                          "different epochs and wait for each other for ever")
    run_dir = new_run_dir(config.logs_dir, config.run_name) if chief else None
    data = prepare_data(config)
    steps = config.steps_per_epoch or default_steps_per_epoch(data.train_images.shape, config.patch_size,
                                                             config.batch_size)
    precision = resolve_precision(config.precision)
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(config.seed)
    augment = config.augment_config()
    placement = resolve_placement(config.augment_placement)
    train_data = training_dataset(data.train_images, data.train_targets, config.patch_size, config.batch_size,
                                  config.seed, augment if placement == "pipeline" else None)
    val_data = validation_dataset(data.val_images, data.val_targets, config.patch_size, config.batch_size)

    with strategy.scope():
        unet = build_unet(config.depth, config.base_filters, batch_norm=config.batch_norm)
        model = StepAugmentedModel(unet, augment, config.seed) if augment and placement == "step" else unet
        rate = learning_rate_schedule(config.learning_rate, config.lr_schedule, steps * config.epochs)
        model.compile(optimizer=make_optimizer(config.optimizer, rate, config.momentum),
                      loss=get_loss(config.loss), metrics=metrics())

    callbacks = []
    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {**asdict(config), "resolved_precision": precision, "augment_placement_used": placement,
                  "strategy_used": resolve_strategy(config.strategy), "replicas": strategy.num_replicas_in_sync,
                  "steps_per_epoch_used": steps, "train_slices": data.train_slices.tolist(),
                  "val_slices_used": data.val_slices.tolist(),
                  "augment_config": augment.to_dict() if augment else None}
        (run_dir / "config.json").write_text(json.dumps(record, indent=2))
        best_path = run_dir / "best.keras"
        callbacks = [
            keras.callbacks.TensorBoard(log_dir=str(run_dir)),
            BestUnetCheckpoint(unet, best_path),
            keras.callbacks.CSVLogger(str(run_dir / "history.csv")),
        ]
    if config.max_minutes:
        callbacks.append(TimeLimit(config.max_minutes))
    if config.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.early_stopping))
    prepare_for_fit(model, train_data)
    model.fit(shardable(train_data), epochs=config.epochs, steps_per_epoch=steps,
              validation_data=shardable(val_data), shuffle=False, callbacks=callbacks, verbose=verbose)
    keras.mixed_precision.set_global_policy("float32")
    if not chief:
        return {"run_dir": None, "best_model": None, "export_dir": None, "scores": None}

    best = keras.saving.load_model(best_path, compile=False)
    scores = validation_scores(best, data.val_images, data.val_targets)
    with atomic_output(run_dir / "scores.json") as tmp:
        tmp.write_text(json.dumps(scores, indent=2))
    export_dir = export_saved_model(best, config.model_name, config.models_dir) if export else None
    return {"run_dir": run_dir, "best_model": best_path, "export_dir": export_dir, "scores": scores}


class TimeLimit(keras.callbacks.Callback):
    """Ends training before the next epoch would run past ``minutes`` of wall time."""

    def __init__(self, minutes: float):
        super().__init__()
        self.seconds = minutes * 60.0

    def on_train_begin(self, logs=None):
        self.start = self.epoch_start = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        if now + (now - self.epoch_start) - self.start > self.seconds:
            self.model.stop_training = True


class BestUnetCheckpoint(keras.callbacks.Callback):
    """Saves the U-Net itself (not a training wrapper around it) whenever ``val_loss`` improves."""

    def __init__(self, unet: keras.Model, path: Path):
        super().__init__()
        self.unet, self.path, self.best = unet, path, np.inf

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("val_loss", np.inf)
        if loss < self.best:
            self.best = loss
            self.unet.save(self.path)
