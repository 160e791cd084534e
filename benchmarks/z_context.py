"""What z-context costs: training and prediction throughput (sections per second) of the 2-D U-Net, 2.5-D
(``--z-context 3`` and ``5``) and the anisotropic 3-D U-Net (``--model unet3d --z-context 4 --voxel-size
50,4,4``), side by side in one process, and the cost of each section transform of the augmentation.

Part "train": em-unet's full training epoch as ``em-unet train`` runs it (ISBI 2012 slices 0-14, validation on
15-19 every 4 epochs, the recipe's preset: depth 4, 16 base filters, 256 px crops; the 3-D U-Net takes batches
of 1 z-patch of 4 sections, so every candidate sees 4 sections per step), in alternating rounds, the best
epoch time kept, the first epoch of each fit left out (tracing). Each candidate trains in the precision
``--precision auto`` gives it (the 3-D U-Net in float32 on CPUs, see ``training_precision``); the 2-D U-Net is
also timed in float32 so the 3-D ratio can be read at equal precision.

Part "predict": sections per second of ``predict_stack`` (one tile per 512 px slice, float32 as exported) on
slices 0-9, models untrained (the arithmetic is the same).

Part "augment": batches per second of ``augment_batch`` on 4 crops of 5 sections x 256 px, with all section
transforms on and with each one alone switched off, against none.

    python benchmarks/z_context.py [--part train|predict|augment|all] [--rounds 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tifffile  # noqa: E402
from isbi_data import ISBI  # noqa: E402  (benchmarks/, beside this script)
from train_throughput import EpochClock  # noqa: E402  (the same clock as the 2-D throughput benchmark)

from em_unet.config import TrainConfig  # noqa: E402
from em_unet.inference.predict import keras_predictor, predict_stack  # noqa: E402
from em_unet.inference.tiling import Tiling  # noqa: E402
from em_unet.io.stacks import to_unit_range  # noqa: E402
from em_unet.machine import machine_description, precision_policy  # noqa: E402
from em_unet.training.assembly import (  # noqa: E402
    build_model,
    fit,
    placement_for,
    prepare_data,
    run_callbacks,
    steps_per_epoch,
    training_precision,
    volumetric,
)
from em_unet.training.augment import AugmentConfig, augment_batch  # noqa: E402

PRESET = TrainConfig(data=str(ISBI / "train-volume.tif"), labels=str(ISBI / "train-labels.tif"), val_slices=(15, 19))
CANDIDATES = {
    "2-D (the recipe)": PRESET,
    "2-D, float32": dataclasses.replace(PRESET, precision="float32"),
    "2.5-D, --z-context 3": dataclasses.replace(PRESET, z_context=3),
    "2.5-D, --z-context 5": dataclasses.replace(PRESET, z_context=5),
    "3-D, --model unet3d --z-context 4": dataclasses.replace(
        PRESET, model="unet3d", z_context=4, voxel_size="50,4,4", batch_size=1
    ),
}


def sections_per_step(config: TrainConfig) -> int:
    return config.batch_size * (config.z_context if volumetric(config) else 1)


def train_part(rounds: int, epochs: int) -> None:
    runs, meta = {}, {}
    for name, config in CANDIDATES.items():
        data = prepare_data(config)
        steps = steps_per_epoch(config, data)
        precision = training_precision(config)
        with precision_policy(precision) as resolved:
            keras.utils.set_random_seed(config.seed)
            placement = placement_for(config)
            model, _ = build_model(config, steps, placement)
        meta[name] = (steps * sections_per_step(config), resolved)
        runs[name] = (config, data, model, placement, resolved)
    best = {name: np.inf for name in runs}
    for _ in range(rounds):
        for name, (config, data, model, placement, precision) in runs.items():
            clock = EpochClock()
            with precision_policy(precision):
                fit(model, config, data, placement, epochs=epochs, callbacks=run_callbacks(config) + [clock], verbose=0)
            best[name] = min(best[name], clock.seconds_per_epoch)
    print(f"\ntraining: full epochs of {epochs}-epoch fits, epochs 2-{epochs} timed, best of {rounds} rounds")
    base = meta["2-D (the recipe)"][0] / best["2-D (the recipe)"]
    base32 = meta["2-D, float32"][0] / best["2-D, float32"]
    for name, seconds in best.items():
        sections, precision = meta[name]
        rate = sections / seconds
        print(
            f"{name:36s} {precision:15s} {seconds:6.2f} s/epoch  {rate:6.1f} sections/s  {rate / base:5.2f}x 2-D"
            f"  {rate / base32:5.2f}x 2-D float32"
        )


def predict_part(rounds: int) -> None:
    images = to_unit_range(tifffile.imread(ISBI / "train-volume.tif")[:10])
    best = {}
    for name, config in CANDIDATES.items():
        if name == "2-D, float32":
            continue
        with precision_policy("float32"):
            keras.utils.set_random_seed(0)
            model, unet = build_model(config, 1, "pipeline")
        predictor = keras_predictor(unet)
        list(predict_stack(predictor, images[:2], Tiling()))  # trace
        best[name] = np.inf
        for _ in range(rounds):
            start = time.perf_counter()
            list(predict_stack(predictor, images, Tiling()))
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"\nprediction: {len(images)} slices of 512 px, one tile each, float32, best of {rounds}")
    base = len(images) / best["2-D (the recipe)"]
    for name, seconds in best.items():
        rate = len(images) / seconds
        print(f"{name:36s} {rate:6.2f} sections/s  {rate / base:5.2f}x 2-D")


def augment_part(rounds: int) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((4, 256, 256, 5), dtype=np.float32)
    masks = (images[..., 2:3] > 0.5).astype(np.float32)
    off = dict(z_flips=False, missing_sections=0.0, misaligned_sections=0.0, section_jitter=0.0)
    defaults = AugmentConfig()
    variants = {
        "no section transforms": AugmentConfig(**off),
        "all (the defaults)": defaults,
        "  without z-flips": dataclasses.replace(defaults, z_flips=False),
        "  without misaligned slabs": dataclasses.replace(defaults, misaligned_sections=0.0),
        "  without missing sections": dataclasses.replace(defaults, missing_sections=0.0),
        "  without section jitter": dataclasses.replace(defaults, section_jitter=0.0),
    }
    best = {name: np.inf for name in variants}
    # traced, as the tf.data map and the training step run it
    functions = {
        name: tf.function(lambda i, m, s, c=config: augment_batch(i, m, s, c)) for name, config in variants.items()
    }
    for function in functions.values():
        function(images, masks, tf.constant([0, 0], tf.int64))  # trace
    batches = 50
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            for index in range(batches):
                function(images, masks, tf.constant([0, index], tf.int64))[0].numpy()
            best[name] = min(best[name], (time.perf_counter() - start) / batches)
    print(f"\naugmentation: 4 crops x 5 sections x 256 px, {batches} batches, best of {rounds}")
    for name, seconds in best.items():
        print(f"{name:30s} {1000 * seconds:7.1f} ms/batch  {seconds / best['no section transforms']:5.2f}x none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("train", "predict", "augment", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine_description()}")
    if args.part in ("augment", "all"):
        augment_part(args.rounds)
    if args.part in ("predict", "all"):
        predict_part(args.rounds)
    if args.part in ("train", "all"):
        train_part(args.rounds, args.epochs)


if __name__ == "__main__":
    main()
