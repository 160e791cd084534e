"""The training assembly that ``train``, the tuner's HyperModel and the study share.

From a :class:`~em_unet.config.TrainConfig`: the data (read, split, checked), the model (U-Net, optional
augmenting wrapper, optimizer with its schedule, loss, metrics), the datasets, the steps per epoch,
the callbacks every run gets (time limit, early stopping, stop on NaN), and the precision policy as a
context manager that always restores the previous one. Each piece is a plain function, usable from a
notebook; nothing here writes files except the callbacks that record a run (:func:`record_callbacks`,
:class:`TrainingBackup`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from em_unet.config import TrainConfig
from em_unet.errors import ConfigError, DataError, EmUnetError, ModelInputError
from em_unet.io.stacks import label_convention_of, load_labelled_stack, volume_intensity_range
from em_unet.io.volumes import is_volume_address, open_volume, voxel_size_nm
from em_unet.machine import gpu_count
from em_unet.segmentation.affinities import cell_ids
from em_unet.training.augment import AugmentConfig, augment_batch, resolve_placement
from em_unet.training.data import (
    LazyImages,
    LazyTargets,
    as_channels_last,
    check_patch_size,
    section_windows,
    split_slices,
    training_dataset,
    validation_dataset,
)
from em_unet.training.distribute import shardable
from em_unet.training.keras_patches import averaged_weights, multi_worker_fit
from em_unet.training.losses import border_weight_map, metrics, training_loss
from em_unet.training.model import anisotropic_levels, build_unet, build_unet3d, check_z_size, z_step
from em_unet.training.optimizers import learning_rate_schedule, make_optimizer

# ---------------------------------------------------------------- data


@dataclass
class PreparedData:
    train_images: np.ndarray
    train_targets: np.ndarray
    val_images: np.ndarray
    val_targets: np.ndarray
    train_slices: np.ndarray
    val_slices: np.ndarray


def prepare_data(config: TrainConfig) -> PreparedData:
    """Read, split, check, and (for the border-weighted loss) attach weight maps as target channel 1.

    Chunked volumes (HDF5, Zarr, OME-Zarr) are not read into memory: the data holds lazy views of them
    (:class:`~em_unet.training.data.LazyImages`, :class:`~em_unet.training.data.LazyTargets`) from which training
    crops and validation tiles are read as they are needed; their intensity range and label values are checked in
    one pass over the chunks first."""
    check_model_shape(config)
    training_precision(config)
    if is_volume_address(config.data) or is_volume_address(config.labels):
        return _prepare_volumes(config)
    images, targets = load_labelled_stack(config.data, config.labels, config.label_convention)
    train_slices, val_slices = _split(config, len(images))
    check_patch_size(images.shape, config.patch_size)
    membrane = targets
    if config.loss == "weighted_bce":
        weights = np.stack([border_weight_map(t) for t in targets])
        targets = np.stack([targets, weights], axis=-1)
    if config.affinity_offsets():
        cells = cell_ids(membrane)
        check_interior(cells[train_slices], config.labels)
        targets = np.concatenate([as_channels_last(targets), cells[..., None].astype(np.float32)], axis=-1)
    return PreparedData(
        images[train_slices], targets[train_slices], images[val_slices], targets[val_slices], train_slices, val_slices
    )


def _prepare_volumes(config: TrainConfig) -> PreparedData:
    import dask.array as da  # lazy: Dask only for chunked training volumes

    for flag, address in (("--data", config.data), ("--labels", config.labels)):
        if not is_volume_address(address):
            raise DataError(
                f"{flag} {address}: give both the images and the labels as chunked volumes "
                "(FILE.h5:/KEY, STORE.zarr/KEY, STORE.ome.zarr), or both as TIFF/PNG stacks"
            )
    images, labels = open_volume(config.data), open_volume(config.labels)
    if labels.shape != images.shape:
        raise DataError(
            f"{labels.address}: label shape {labels.shape} differs from image shape {images.shape} of {images.address}"
        )
    low, high = volume_intensity_range(images)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise DataError(f"{labels.address}: labels must be integers (0/255 or 0/1), found {labels.dtype}")
    values = da.unique(da.from_array(labels, chunks=labels.chunks, asarray=True)).compute()
    convention = label_convention_of(values, config.label_convention, labels.address)
    train_slices, val_slices = _split(config, images.shape[0])
    check_patch_size(images.shape, config.patch_size)
    weighted, cells = config.loss == "weighted_bce", bool(config.affinity_offsets())
    train_targets = LazyTargets(labels, train_slices, convention, weighted, cells)
    if cells:
        check_interior([train_targets[i][..., -1] for i in range(len(train_slices))], config.labels)
    return PreparedData(
        LazyImages(images, train_slices, low, high),
        train_targets,
        LazyImages(images, val_slices, low, high),
        LazyTargets(labels, val_slices, convention, weighted, cells),
        train_slices,
        val_slices,
    )


def model_voxel_size(config: TrainConfig) -> tuple[float, float, float] | None:
    """The voxel size (z, y, x, nm) a 3-D U-Net is shaped for: ``--voxel-size``, else the OME-Zarr metadata of
    ``--data``; None for the 2-D U-Net. A one-line error when a 3-D U-Net has neither."""
    if not volumetric(config):
        return None
    given = config.voxel_size_nm()
    found = given or (voxel_size_nm(config.data) if is_volume_address(config.data) else None)
    if found is None:
        raise DataError(
            f"--model unet3d: {config.data} records no voxel size (only OME-Zarr metadata with units does): give "
            "--voxel-size Z,Y,X in nm (ISBI 2012: 50,4,4)"
        )
    return found


def check_model_shape(config: TrainConfig) -> None:
    """Refuse, before any data are read, a z-patch the 3-D U-Net's z-pooling does not take (the 2-D U-Net's
    rules are checked with the settings)."""
    voxel_size = model_voxel_size(config)
    if voxel_size is None:
        return
    try:
        check_z_size(config.z_context, z_step(anisotropic_levels(config.depth, voxel_size)))
    except ModelInputError as err:
        raise ConfigError(f"--z-context {config.z_context}: {err} at --depth {config.depth}") from None


def training_precision(config: TrainConfig) -> str:
    """The ``--precision`` a run trains in: as given, except that a 3-D U-Net trains in float32 on CPUs
    (``auto``), where TensorFlow 2.21's oneDNN 3-D convolutions in bfloat16 crash the process (a segmentation
    fault on this project's Xeon with AMX); given explicitly there, it is refused in one line."""
    if not volumetric(config) or gpu_count():
        return config.precision
    if config.precision == "auto":
        return "float32"
    if config.precision != "float32":
        raise ConfigError(
            f"--precision {config.precision} with --model unet3d on a CPU: TensorFlow's 3-D convolutions crash in "
            "half precision there; use --precision float32 (or auto)"
        )
    return config.precision


def check_interior(cells, labels: str) -> None:
    """Refuse, for ``--target affinities``, training labels without a cell interior: no pair of pixels in the
    same cell, so the affinities would learn only 0 (``cells``: cell ids of each training slice)."""
    if not any(np.any(slice_cells > 0) for slice_cells in cells):
        raise DataError(
            f"{labels}: the training slices' labels have no cell interior (every pixel is membrane), so there are "
            "no affinities to learn: check the labels and --label-convention, or train --target boundary"
        )


def _split(config: TrainConfig, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
    train_slices, val_slices = split_slices(n_slices, config.val_slices, config.val_fraction)
    if config.slices is not None:
        first, last = config.slices
        if not last < n_slices:
            raise DataError(f"--slices {first}-{last}: outside the stack's slices 0-{n_slices - 1}")
        train_slices = train_slices[(train_slices >= first) & (train_slices <= last)]
        val_slices = val_slices[(val_slices >= first) & (val_slices <= last)]
        if not (train_slices.size and val_slices.size):
            raise DataError(
                f"--slices {first}-{last} need both training and validation slices (validation: {config.val_slices})"
            )
    return train_slices, val_slices


def default_steps_per_epoch(train_shape, patch_size: int, batch_size: int, sections_per_crop: int = 1) -> int:
    """Enough batches to cover the training slices' area once per epoch (a 3-D U-Net's crop covers
    ``sections_per_crop`` sections)."""
    n, height, width = train_shape[:3]
    return max(1, round(n * height * width / (patch_size * patch_size * batch_size * sections_per_crop)))


def volumetric(config: TrainConfig) -> bool:
    """True for a 3-D U-Net: it takes and predicts z-patches of ``z_context`` sections."""
    return config.model == "unet3d"


def steps_per_epoch(config: TrainConfig, data: PreparedData) -> int:
    sections = config.z_context if volumetric(config) else 1
    return config.steps_per_epoch or default_steps_per_epoch(
        data.train_images.shape, config.patch_size, config.batch_size, sections
    )


def make_datasets(
    config: TrainConfig, data: PreparedData, placement: str, start_batch: int = 0
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Training batches (augmented here when ``placement`` is ``"pipeline"``) from batch ``start_batch`` of the
    stream on, and validation tiles. With z-context, each sample's sections come from its own block (training
    or validation), mirrored at the block's ends (:func:`~em_unet.training.data.section_windows`)."""
    augment = config.augment_config() if placement == "pipeline" else None
    volume = volumetric(config)
    train_windows = section_windows(data.train_slices, config.z_context, volume)
    val_windows = section_windows(data.val_slices, config.z_context, volume)
    train = training_dataset(
        data.train_images,
        data.train_targets,
        config.patch_size,
        config.batch_size,
        config.seed,
        augment,
        start_batch,
        train_windows,
        volume,
    )
    val = validation_dataset(
        data.val_images, data.val_targets, config.patch_size, config.batch_size, val_windows, volume
    )
    return train, val


# ---------------------------------------------------------------- model


class StepAugmentedModel(keras.Model):
    """Wraps a model so that each training batch is augmented inside the training step.

    The seed of batch ``n`` is ``(seed, n)`` with ``n`` the optimizer's step counter, so runs are
    reproducible. ``augment`` may be set (or None: no augmentation) until the first ``fit`` traces
    the step. Inference and export use ``self.inner``.
    """

    def __init__(self, inner: keras.Model, augment: AugmentConfig | None, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.augment = augment
        self.augment_seed = seed

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def train_step(self, data):
        if self.augment is None:
            return super().train_step(data)
        images, targets = data[0], data[1]
        step = tf.cast(self.optimizer.iterations, tf.int64)
        seed = tf.stack([tf.constant(self.augment_seed, tf.int64), step])
        images, targets = augment_batch(images, targets, seed, self.augment)
        return super().train_step((images, targets) + tuple(data[2:]))


def build_model(config: TrainConfig, steps: int, placement: str) -> tuple[keras.Model, keras.Model]:
    """The compiled model to fit and the U-Net inside it (the same object unless augmentation runs in the
    training step). Call it inside the strategy's scope (KerasTuner does that for its ``build``)."""
    offsets = config.affinity_offsets()
    if volumetric(config):
        unet = build_unet3d(
            config.depth, config.base_filters, model_voxel_size(config), config.z_context, batch_norm=config.batch_norm
        )
    else:
        unet = build_unet(
            config.depth,
            config.base_filters,
            channels=config.z_context,
            batch_norm=config.batch_norm,
            affinity_offsets=offsets,
        )
    model = StepAugmentedModel(unet, config.augment_config(), config.seed) if placement == "step" else unet
    rate = learning_rate_schedule(config.learning_rate, config.lr_schedule, steps * config.epochs)
    model.compile(
        optimizer=make_optimizer(config.optimizer, rate, config.momentum, config.ema),
        loss=training_loss(config.loss, offsets),
        metrics=metrics(),
    )
    return model, unet


def inner_unet(model: keras.Model) -> keras.Model:
    """The U-Net itself, unwrapped from a training wrapper."""
    return model.inner if isinstance(model, StepAugmentedModel) else model


def fit(
    model: keras.Model,
    config: TrainConfig,
    data: PreparedData,
    placement: str,
    epochs: int | None = None,
    callbacks: list | None = None,
    verbose: int = 1,
    resume_from: int = 0,
    **kwargs,
) -> keras.callbacks.History:
    """Fit ``model`` (from :func:`build_model`) on ``data`` as ``config`` says.

    ``resume_from``: the epochs an interrupted run has trained already (its state restored into ``model`` by
    :func:`restore_training_state`); training continues with the next epoch, on the batches and with the
    validations the uninterrupted run would have had."""
    if isinstance(model, StepAugmentedModel):
        model.augment = config.augment_config()
    steps = steps_per_epoch(config, data)
    train_data, val_data = make_datasets(config, data, placement, start_batch=resume_from * steps)
    epochs = epochs or config.epochs
    if resume_from:
        kwargs["initial_epoch"] = resume_from
        validated = validation_epochs(1, epochs, config.val_every)
    else:
        validated = validation_epochs(kwargs.get("initial_epoch", 0) + 1, epochs, config.val_every)
    with multi_worker_fit(model, train_data):
        history = model.fit(
            shardable(train_data),
            epochs=epochs,
            steps_per_epoch=steps,
            validation_data=shardable(val_data),
            validation_freq=validated,
            shuffle=False,
            callbacks=callbacks or [],
            verbose=verbose,
            **kwargs,
        )
    return epoch_aligned(history, validated)


def epoch_aligned(history: keras.callbacks.History, validated: list[int]) -> keras.callbacks.History:
    """``history`` with an entry for every epoch in each validation metric (NaN where an epoch was not
    validated): Keras lists them for the validated epochs only, while readers such as KerasTuner take
    ``history.history[key][i]`` to be epoch ``history.epoch[i]``."""
    ran = [epoch + 1 for epoch in history.epoch]
    done = [epoch for epoch in validated if epoch in ran]
    for key, values in history.history.items():
        if key.startswith("val_") and len(values) == len(done) != len(ran):
            by_epoch = dict(zip(done, values))
            history.history[key] = [by_epoch.get(epoch, float("nan")) for epoch in ran]
    return history


def validation_epochs(first: int, last: int, every: int) -> list[int]:
    """The epochs (numbered from 1) a fit from epoch ``first`` to ``last`` validates: every ``every``-th,
    and always the first (so history.csv has its validation columns from the start) and the last (so a
    run or trial ends with a val_loss)."""
    return sorted({first, last, *range(every, last + 1, every)} & set(range(first, last + 1)))


def placement_for(config: TrainConfig) -> str:
    """Where augmentation runs for this run: ``"step"`` or ``"pipeline"`` (see :func:`resolve_placement`)."""
    return resolve_placement(config.augment_placement)


# ---------------------------------------------------------------- callbacks


def run_callbacks(
    config: TrainConfig, deadline: float | None = None, past_val_losses: Sequence[float | None] = ()
) -> list[keras.callbacks.Callback]:
    """What every fit gets: stop on a NaN loss, early stopping, and the time limit (``deadline``: a
    ``time.monotonic()`` instant; by default ``max_minutes`` from now).

    ``past_val_losses``: the ``val_loss`` of each epoch a resumed run has trained already (None where an epoch
    was not validated), so early stopping counts on from where the interrupted run was."""
    callbacks: list[keras.callbacks.Callback] = [keras.callbacks.TerminateOnNaN()]
    if config.ema:  # validate the averaged weights: early stopping and best.keras judge what is kept
        callbacks.append(keras.callbacks.SwapEMAWeights())
    if config.early_stopping:  # Keras counts patience in validations: epochs without val_loss are skipped
        patience = math.ceil(config.early_stopping / config.val_every)
        callbacks.append(ValidatedEarlyStopping(monitor="val_loss", patience=patience, past=past_val_losses))
    if deadline is None and config.max_minutes:
        deadline = time.monotonic() + config.max_minutes * 60.0
    if deadline is not None:
        callbacks.append(TimeLimit(deadline=deadline))
    return callbacks


def record_callbacks(
    run_dir: Path, unet: keras.Model, best: float = np.inf, append: bool = False, averaged: bool = False
) -> list[keras.callbacks.Callback]:
    """What a run leaves in ``run_dir``: TensorBoard events, ``best.keras`` (the U-Net at its best
    ``val_loss``; with ``averaged``, its averaged weights, ``--ema``) and ``history.csv``. A resumed run passes
    the ``best`` val_loss so far and ``append``s to its history.csv (cut at the epoch it resumes from) and
    TensorBoard curves."""
    return [
        FlushedTensorBoard(log_dir=str(run_dir)),
        BestUnetCheckpoint(unet, run_dir / "best.keras", best=best, averaged=averaged),
        HistoryCSV(str(run_dir / "history.csv"), append=append),
    ]


class FlushedTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback, with its event files flushed after every epoch: a killed run keeps each
    finished epoch's curve points (TensorFlow's writers otherwise flush every two minutes)."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        for writer in getattr(self, "_writers", {}).values():
            writer.flush()


class HistoryCSV(keras.callbacks.CSVLogger):
    """Keras' CSVLogger; appending to an existing history.csv, it keeps that file's columns (Keras takes them
    from the first epoch's logs, which lack the validation columns when that epoch is not validated)."""

    def on_train_begin(self, logs=None):
        header = None
        if self.append and os.path.exists(self.filename):
            with open(self.filename, encoding="utf-8") as handle:
                header = handle.readline().strip()
        super().on_train_begin(logs)
        if header:
            self.keys = header.split(self.sep)[1:]  # the first column is the epoch


class ValidatedEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' early stopping, quiet on the epochs that are not validated (see ``--val-every``).

    ``past``: the ``val_loss`` of epochs trained before this fit (None: not validated), replayed when the fit
    begins so that a resumed run's best and patience count on as if it had not been interrupted."""

    def __init__(self, *args, past: Sequence[float | None] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.past = list(past)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.past and self.monitor_op is None:
            self._set_monitor_op()
        for epoch, loss in enumerate(self.past):
            if loss is None:
                continue
            # as EarlyStopping.on_epoch_end counts, without stopping: the run that stopped never resumes
            self.wait += 1
            if self._is_improvement(loss, self.best):
                self.best, self.best_epoch = loss, epoch
                if self.baseline is None or self._is_improvement(loss, self.baseline):
                    self.wait = 0

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor in (logs or {}):
            super().on_epoch_end(epoch, logs)


class TimeLimit(keras.callbacks.Callback):
    """Ends training before the next epoch would end past the limit: ``minutes`` from the start of
    training, or an absolute ``deadline`` (``time.monotonic()`` seconds) shared by several fits."""

    def __init__(self, minutes: float | None = None, deadline: float | None = None):
        super().__init__()
        self.minutes, self.deadline = minutes, deadline

    def on_train_begin(self, logs=None):
        self.epoch_start = time.monotonic()
        if self.deadline is None:
            self.deadline = self.epoch_start + (self.minutes or 0.0) * 60.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        if now + (now - self.epoch_start) > self.deadline:
            self.model.stop_training = True


class BestUnetCheckpoint(keras.callbacks.Callback):
    """Saves the U-Net itself (not a training wrapper around it) whenever ``val_loss`` improves; with
    ``averaged``, its optimizer's moving average of the weights (``--ema``, validated by Keras'
    ``SwapEMAWeights``).

    Written to a temporary name and renamed, so a full disk or a kill never leaves a truncated
    ``best.keras``: the previous best stays until the new one is complete.
    """

    def __init__(self, unet: keras.Model, path: str | Path, best: float = np.inf, averaged: bool = False):
        super().__init__()
        self.unet, self.path, self.best, self.averaged = unet, Path(path), best, averaged

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("val_loss", np.inf)
        if loss < self.best:
            self.best = loss
            partial = self.path.with_name(f".{self.path.stem}.partial.keras")
            try:
                with averaged_weights(self.model) if self.averaged else contextlib.nullcontext():
                    self.unet.save(partial)
                os.replace(partial, self.path)
            finally:
                partial.unlink(missing_ok=True)


# ---------------------------------------------------------------- the backup a killed run resumes from

BACKUP_STATE = "state.json"


@dataclass
class BackupState:
    """What a run's backup folder holds: ``epoch`` epochs trained, ``elapsed_s`` seconds of training spent on
    them (all attempts), ``stopped`` when training has ended (last epoch, early stopping, time limit, NaN loss),
    and the weights file with the model's and the optimizer's state after that epoch."""

    epoch: int
    elapsed_s: float
    stopped: bool
    weights: Path


class TrainingBackup(keras.callbacks.Callback):
    """Backs up the running state into ``folder`` when training begins and after every epoch: the weights with
    the optimizer's state (its step counter, which also seeds the in-step augmentation and drives the
    learning-rate schedule), the epochs done, the training time so far and whether training has stopped.

    Put it last among the callbacks, so that it sees the decisions of early stopping and the time limit and
    the epoch's history row is written before it. Each backup is a new weights file, then ``state.json``
    (renamed into place) naming it, then the older weights file is removed: a kill at any instant leaves a
    complete backup. ``elapsed_s`` is the training time of earlier attempts, ``started`` the
    ``time.monotonic()`` instant this attempt's training time counts from.
    """

    def __init__(self, folder: str | Path, epochs: int, elapsed_s: float = 0.0, started: float | None = None):
        super().__init__()
        self.folder, self.epochs, self.elapsed_s, self.started = Path(folder), epochs, elapsed_s, started

    def on_train_begin(self, logs=None):
        if self.started is None:
            self.started = time.monotonic()
        if not (self.folder / BACKUP_STATE).exists():  # a kill in the first epoch resumes from the start
            self.save(0, stopped=False)

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch + 1, stopped=bool(self.model.stop_training) or epoch + 1 >= self.epochs)

    def save(self, epoch: int, stopped: bool) -> None:
        """Write the backup after ``epoch`` epochs."""
        name = f"epoch-{epoch:05d}.weights.h5"
        partial = self.folder / f".partial-{name}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                self.model.save_weights(partial)
                _sync(partial)
                os.replace(partial, self.folder / name)
            finally:
                partial.unlink(missing_ok=True)
            state = {
                "epoch": epoch,
                "elapsed_seconds": self.elapsed_s + time.monotonic() - self.started,
                "stopped": stopped,
                "weights": name,
                "saved": time.time(),
            }
            state_partial = self.folder / f".partial-{BACKUP_STATE}"
            state_partial.write_text(json.dumps(state, indent=2))
            _sync(state_partial)
            os.replace(state_partial, self.folder / BACKUP_STATE)
        except OSError as err:
            raise EmUnetError(f"{self.folder}: cannot write the training backup ({err.strerror or err})") from None
        for old in self.folder.glob("epoch-*.weights.h5"):
            if old.name != name:
                old.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    """Flush ``path`` to the disk, so that a power cut after the rename that follows keeps its data."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def read_backup(folder: str | Path) -> BackupState:
    """The backup in ``folder`` (written by :class:`TrainingBackup`); a missing or unreadable one is a one-line
    :class:`EmUnetError`."""
    folder = Path(folder)
    path = folder / BACKUP_STATE
    if not path.is_file():
        raise EmUnetError(
            f"{folder}: no backup to resume from (the run stopped before training began, or was made by an "
            "em-unet without --resume): start a new run"
        )
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        backup = BackupState(
            int(state["epoch"]), float(state["elapsed_seconds"]), bool(state["stopped"]), folder / state["weights"]
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EmUnetError(f"{path}: the backup is corrupt ({type(err).__name__}: {err}): start a new run") from None
    if not backup.weights.is_file():
        raise EmUnetError(f"{path}: the backup's weights {backup.weights.name} are missing: start a new run")
    return backup


def restore_training_state(model: keras.Model, backup: BackupState) -> None:
    """Load the backup's weights and optimizer state (step counter included) into ``model``, a fresh model from
    :func:`build_model` with the run's settings; call it inside the strategy's scope."""
    if not model.built:  # a training wrapper is built on its first call: build it on an input of any size
        model.build(model.inner.input_shape)
    model.optimizer.build(model.trainable_variables)  # its slots must exist to be loaded into
    try:
        model.load_weights(backup.weights)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise EmUnetError(f"{backup.weights}: the backup does not load ({first}): start a new run") from None
