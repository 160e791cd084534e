"""Training throughput: em-unet's full training step against a plain Keras step, and the machine's
own peak in float32 and mixed_bfloat16, side by side.

Part "full" (in one process, alternating rounds, best kept): at the default preset (depth 4, 16
base filters, 256 px crops, batch 4, precision auto, ISBI 2012 slices 0-14 for training and 15-19
for validation), patches per second of a plain Keras step (the same U-Net, compiled with Adam and
binary cross-entropy, fed one batch from memory) beside em-unet's full training epoch as ``em-unet
train`` runs it (crops, augmentation, metrics, validation, TensorBoard, checkpoint and history
callbacks), and of the full epoch without each of these parts, to show where the time goes.
Epochs are timed end to end (validation and callbacks included), the first epoch of each fit left
out (tracing).

Part "precision": the FLOPs of a training step counted from the model's layers, the peak of a large
float32 and bfloat16 matrix product, and 256x256 patches per second at depth 4, 32 base filters,
batch 4 (input from memory, so only the step is timed), in alternating rounds so machine noise
hits both alike. Then a fixed short run on ISBI 2012 in each precision (same seed, same batches)
compares the validation loss.

    python benchmarks/train_throughput.py [--part full|precision|all] [--rounds 3] [--epochs 12]
        [--steps 10] [--short-steps 60]

Target (part "full"): em-unet's full step at least 0.90x the plain Keras step.

A training step counts as 3x the forward pass (forward, gradient w.r.t. activations, gradient
w.r.t. weights), the usual convention; only convolutions are counted (ReLU, pooling, concatenation
and the loss are < 1 % of the arithmetic).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from isbi_data import ISBI  # noqa: E402  (benchmarks/, beside this script)

from em_unet.config import TrainConfig  # noqa: E402
from em_unet.machine import machine_description, precision_policy  # noqa: E402
from em_unet.training.assembly import (  # noqa: E402
    build_model,
    fit,
    placement_for,
    prepare_data,
    record_callbacks,
    run_callbacks,
    steps_per_epoch,
    validation_epochs,
)
from em_unet.training.data import training_dataset, validation_dataset  # noqa: E402
from em_unet.training.losses import get_loss  # noqa: E402
from em_unet.training.model import build_unet  # noqa: E402


def forward_flops(model: keras.Model, size: int) -> float:
    """Multiply-adds x 2 of every convolution for one ``size`` x ``size`` image, from the layers' shapes."""
    convolutions = [
        layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))
    ]
    probe = keras.Model(model.inputs, [layer.output for layer in convolutions])
    outputs = probe([np.zeros((1, size, size, 1), np.float32)])
    flops = 0.0
    for layer, output in zip(convolutions, outputs):
        kh, kw, c_in, c_out = layer.kernel.shape
        if isinstance(layer, keras.layers.Conv2DTranspose):  # every input pixel is spread over a kernel
            positions = output.shape[1] * output.shape[2] / (layer.strides[0] * layer.strides[1])
        else:
            positions = output.shape[1] * output.shape[2]
        flops += 2.0 * positions * kh * kw * c_in * c_out
    return flops


def matmul_peak(dtype: tf.DType, n: int, repeats: int, rounds: int) -> float:
    a = tf.random.normal((n, n), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)

    @tf.function
    def products():
        total = tf.zeros((), tf.float32)
        for _ in tf.range(repeats):
            total += tf.cast(tf.linalg.matmul(a, b)[0, 0], tf.float32)
        return total

    products()
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        products().numpy()
        best = max(best, 2.0 * n**3 * repeats / (time.perf_counter() - start))
    return best


def compiled_unet(precision: str, depth: int, filters: int, seed: int = 0) -> keras.Model:
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(seed)
    model = build_unet(depth, filters)
    model.compile(optimizer=keras.optimizers.Adam(3e-4), loss=get_loss("bce"))
    keras.mixed_precision.set_global_policy("float32")
    return model


def steps_per_second(model: keras.Model, dataset: tf.data.Dataset, steps: int) -> float:
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return steps / (time.perf_counter() - start)


def short_run_val_loss(precision: str, depth: int, filters: int, steps: int, seed: int) -> float:
    """Validation loss after ``steps`` batches of the real pipeline (ISBI 0-14, augmented)."""
    config = TrainConfig(
        data=str(ISBI / "train-volume.tif"),
        labels=str(ISBI / "train-labels.tif"),
        val_slices=(15, 19),
        depth=depth,
        base_filters=filters,
    )
    data = prepare_data(config)
    train = training_dataset(data.train_images, data.train_targets, 256, 4, seed, config.augment_config())
    val = validation_dataset(data.val_images, data.val_targets, 256, 4)
    model = compiled_unet(precision, depth, filters, seed)
    model.fit(train, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return float(model.evaluate(val, verbose=0))


class EpochClock(keras.callbacks.Callback):
    """Mean seconds between successive epoch ends (after every other callback's work), the first epoch
    (tracing) left out."""

    def on_train_begin(self, logs=None):
        self.ends: list[float] = []

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(time.perf_counter())

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean(np.diff(self.ends)))


def full_step_part(rounds: int, epochs: int) -> None:
    """Patches per second of em-unet's full training epoch and of its variants, beside a plain Keras step."""
    preset = TrainConfig(
        data=str(ISBI / "train-volume.tif"), labels=str(ISBI / "train-labels.tif"), val_slices=(15, 19)
    )
    data = prepare_data(preset)
    steps = steps_per_epoch(preset, data)
    variants = {
        "em-unet train, full step (defaults)": (preset, True),
        "  with --val-every 1 (the previous default)": (dataclasses.replace(preset, val_every=1), True),
        "  without augmentation": (dataclasses.replace(preset, augment=False), True),
        "  without TensorBoard/checkpoint/CSV": (preset, False),
    }
    folder = Path(tempfile.mkdtemp(prefix="train-throughput-"))
    runs = {}
    with precision_policy(preset.precision) as precision:
        keras.utils.set_random_seed(preset.seed)
        unet = build_unet(preset.depth, preset.base_filters)
        unet.compile(optimizer=keras.optimizers.Adam(preset.learning_rate), loss=get_loss(preset.loss))
        rng = np.random.default_rng(0)
        images = rng.random((preset.batch_size, preset.patch_size, preset.patch_size, 1), dtype=np.float32)
        one_batch = tf.data.Dataset.from_tensors((images, (images > 0.5).astype(np.float32))).repeat()
        plain_name = "plain Keras step (same U-Net, batch from memory)"
        runs[plain_name] = lambda clock: unet.fit(
            one_batch, epochs=epochs, steps_per_epoch=steps, verbose=0, callbacks=[clock]
        )
        for index, (name, (config, record)) in enumerate(variants.items()):
            placement = placement_for(config)
            model, inner = build_model(config, steps, placement)
            callbacks = run_callbacks(config) + (record_callbacks(folder / str(index), inner) if record else [])
            runs[name] = lambda clock, m=model, c=config, p=placement, cb=callbacks: fit(
                m, c, data, p, epochs=epochs, callbacks=cb + [clock], verbose=0
            )
        best = {name: np.inf for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                clock = EpochClock()
                run(clock)
                best[name] = min(best[name], clock.seconds_per_epoch)
    shutil.rmtree(folder, ignore_errors=True)
    patches = steps * preset.batch_size
    validated = validation_epochs(1, epochs, preset.val_every)
    print(f"machine: {machine_description()}")
    print(
        f"default preset: depth {preset.depth}, {preset.base_filters} base filters, {precision}, batch "
        f"{preset.batch_size} x {preset.patch_size} px, {steps} steps per epoch, validation on "
        f"{len(data.val_slices)} slices every {preset.val_every} epochs; fits of {epochs} epochs (validated: "
        f"{validated}), epochs 2-{epochs} timed, best of {rounds} rounds"
    )
    plain_rate = patches / best[plain_name]
    for name, seconds in best.items():
        rate = patches / seconds
        print(f"{name:50s} {seconds:6.2f} s/epoch  {rate:6.2f} patches/s  {rate / plain_rate:5.2f}x plain Keras")
    full = patches / best["em-unet train, full step (defaults)"]
    print(f"em-unet's full step / plain Keras: {full / plain_rate:.2f}x (target >= 0.90x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--filters", type=int, default=32, help="base filters (default 32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="patch side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per round (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, best kept (default 3)")
    parser.add_argument("--matmul", type=int, default=4096, help="matrix side for the peak (default 4096)")
    parser.add_argument(
        "--short-steps",
        type=int,
        default=60,
        help="steps of the short ISBI run for the validation-loss comparison (default 60; 0 skips)",
    )
    parser.add_argument(
        "--short-seeds",
        type=int,
        default=2,
        help="seeds of the short run per precision: their spread is the noise floor (default 2)",
    )
    parser.add_argument("--part", choices=("full", "precision", "all"), default="all")
    parser.add_argument(
        "--epochs", type=int, default=12, help="epochs per fit in part full (default 12: validations 1 in 4)"
    )
    args = parser.parse_args()
    if args.part in ("full", "all"):
        full_step_part(args.rounds, args.epochs)
    if args.part == "full":
        return

    precisions = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16}
    peak = {name: matmul_peak(dtype, args.matmul, 8, args.rounds) for name, dtype in precisions.items()}
    models = {name: compiled_unet(name, args.depth, args.filters) for name in precisions}
    step_flops = 3.0 * forward_flops(models["float32"], args.size) * args.batch
    rng = np.random.default_rng(0)
    images = rng.random((args.batch, args.size, args.size, 1), dtype=np.float32)
    batch = tf.data.Dataset.from_tensors((images, (images > 0.5).astype(np.float32))).repeat()
    for model in models.values():  # warm-up: tracing, oneDNN kernel selection
        steps_per_second(model, batch, 2)
    rate = {name: 0.0 for name in precisions}
    for _ in range(args.rounds):
        for name, model in models.items():
            rate[name] = max(rate[name], steps_per_second(model, batch, args.steps))

    print(f"machine: {machine_description()}")
    print(
        f"model: depth {args.depth}, {args.filters} base filters, batch {args.batch} x {args.size}x{args.size} px: "
        f"{step_flops / 1e9:.1f} GFLOP per training step (3x forward)"
    )
    for name in precisions:
        achieved = rate[name] * step_flops
        print(
            f"{name:15s} matmul peak {peak[name] / 1e9:8.1f} GFLOP/s | training {rate[name] * args.batch:6.2f} "
            f"patches/s = {achieved / 1e9:7.1f} GFLOP/s = {achieved / peak[name]:5.1%} of its peak, "
            f"{achieved / peak['float32']:5.1%} of the float32 peak"
        )
    print(
        f"mixed_bfloat16 / float32 training throughput: {rate['mixed_bfloat16'] / rate['float32']:.2f}x "
        f"(target >= 2x); float32 at {rate['float32'] * step_flops / peak['float32']:.1%} of its peak (target >= 60 %)"
    )
    if args.short_steps:
        seeds = range(args.short_seeds)
        loss = {
            name: [short_run_val_loss(name, args.depth, args.filters, args.short_steps, seed) for seed in seeds]
            for name in precisions
        }
        for name, values in loss.items():
            print(
                f"validation loss after {args.short_steps} steps on ISBI, {name:15s} seeds {list(seeds)}: "
                + ", ".join(f"{v:.4f}" for v in values)
            )
        same_seed = [b / f - 1.0 for f, b in zip(loss["float32"], loss["mixed_bfloat16"])]
        difference = np.mean(loss["mixed_bfloat16"]) / np.mean(loss["float32"]) - 1.0
        print(
            f"mixed_bfloat16 vs float32: {difference:+.2%} on the mean over seeds, per seed "
            + ", ".join(f"{d:+.2%}" for d in same_seed)
            + " (target within 2 %)"
        )
        if len(loss["float32"]) > 1:
            spread = max(loss["float32"]) / min(loss["float32"]) - 1.0
            print(f"noise floor: float32 alone varies by {spread:.2%} between seeds after {args.short_steps} steps")


if __name__ == "__main__":
    main()
