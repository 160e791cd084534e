"""Input pipeline vs training step: can the tf.data pipeline keep the default preset fed?

In one process, on ISBI 2012 slices 0-14: batches per second that ``training_dataset`` (crop,
affine + elastic + intensity augmentation, batch; the stack is read once, up front, as training
does) delivers on its own, against training steps per second of the default preset (depth 4,
16 base filters, batch 4 x 256 px, precision auto) fed from memory. Alternating rounds, best kept.

    python benchmarks/input_pipeline.py [--batches 100] [--steps 15] [--rounds 3]

Target: pipeline >= 5x the training step rate, so input never limits training. The two are measured
apart; in training they share the same cores, which the ratio's headroom has to cover.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from isbi_data import ISBI  # noqa: E402  (benchmarks/, beside this script)

from em_unet.config import TrainConfig  # noqa: E402
from em_unet.machine import (
    machine_description,  # noqa: E402
    resolve_precision,
)
from em_unet.training.assembly import prepare_data  # noqa: E402
from em_unet.training.data import training_dataset  # noqa: E402
from em_unet.training.losses import get_loss  # noqa: E402
from em_unet.training.model import build_unet  # noqa: E402
from em_unet.training.optimizers import make_optimizer  # noqa: E402


def batches_per_second(iterator, batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100, help="pipeline batches per round (default 100)")
    parser.add_argument("--steps", type=int, default=15, help="training steps per round (default 15)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    preset = TrainConfig(
        data=str(ISBI / "train-volume.tif"), labels=str(ISBI / "train-labels.tif"), val_slices=(15, 19)
    )
    start = time.perf_counter()
    data = prepare_data(preset)
    read_seconds = time.perf_counter() - start
    pipeline = training_dataset(
        data.train_images,
        data.train_targets,
        preset.patch_size,
        preset.batch_size,
        preset.seed,
        preset.augment_config(),
    )
    precision = resolve_precision(preset.precision)
    keras.mixed_precision.set_global_policy(precision)
    model = build_unet(preset.depth, preset.base_filters)
    model.compile(optimizer=make_optimizer(preset.optimizer, preset.learning_rate), loss=get_loss(preset.loss))
    keras.mixed_precision.set_global_policy("float32")
    fixed = tf.data.Dataset.from_tensors(next(iter(pipeline))).repeat()

    batches_per_second(iter(pipeline), 10)  # warm-up: tracing, XLA compilation
    model.fit(fixed, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)
    feed = step = 0.0
    for _ in range(args.rounds):
        feed = max(feed, batches_per_second(iter(pipeline), args.batches))  # a fresh iterator: no batches prefetched
        begin = time.perf_counter()
        model.fit(fixed, epochs=1, steps_per_epoch=args.steps, verbose=0, shuffle=False)
        step = max(step, args.steps / (time.perf_counter() - begin))

    print(f"machine: {machine_description()}")
    print(f"reading and scaling the 20-slice stack and labels once: {read_seconds:.2f} s")
    print(
        f"input pipeline (crop + augment + batch of {preset.batch_size} x {preset.patch_size} px): "
        f"{feed:7.1f} batches/s"
    )
    print(
        f"training step, default preset ({preset.base_filters} filters, depth {preset.depth}, {precision}): "
        f"{step:7.2f} steps/s"
    )
    print(f"pipeline / training: {feed / step:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
