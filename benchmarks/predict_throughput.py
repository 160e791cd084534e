"""Prediction: overlap-tile prediction against one whole-slice forward pass, the cost of --tta,
the quality of the defaults, and peak memory for a 30- and a 60-slice stack.

In one process, on the 30-slice 512x512 ISBI 2012 test volume, with the default preset's
architecture (depth 4, 16 base filters, precision auto; untrained weights: speed does not depend
on them): slices per second of one forward pass per whole slice (the baseline), of ``predict_stack``
at its defaults (each slice plus 16 px mirrored margins is one 544 px tile; tiles of successive
slices share forward passes of --tile-batch 4), of the previous defaults (32 px margins, a forward
pass per slice), of 256 px tiles and of ``--tta``; alternating rounds, best kept. Then
``em-unet predict`` runs in child processes on 30 and 60 slices and their peak resident memory is
read from the kernel.

With ``--model`` (a trained model, e.g. ``saved_models/em_unet`` after ``em-unet train ... --val-slices
15-19``), the defaults and the previous defaults also predict ISBI training slices 15-19 and are scored
Fiji's way (V_rand, V_info, pixel error).

    python benchmarks/predict_throughput.py [--rounds 3] [--tta-slices 6] [--model PATH]

Targets: the defaults at most 1.10x the time of the whole-slice forward pass, V_rand of slices 15-19
within 0.002 of the previous defaults, ``--tta`` at most 8.5x the time of the defaults, and peak
memory that does not grow with the stack. A 544 px tile is (544/512)^2 = 1.13x the pixels of the
slice; sharing forward passes between slices wins that back. 8 px margins (528 px tiles) would cost
less but lower V_rand by about 0.02 (zero padding reaches further in than 8 px).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from isbi_data import ISBI  # noqa: E402  (benchmarks/, beside this script)

from em_unet.config import TrainConfig  # noqa: E402
from em_unet.inference.export import export_saved_model  # noqa: E402
from em_unet.inference.predict import keras_predictor, load_predictor, predict_stack  # noqa: E402
from em_unet.inference.tiling import Tiling  # noqa: E402
from em_unet.io.stacks import load_image_stack  # noqa: E402
from em_unet.machine import (
    machine_description,  # noqa: E402
    resolve_precision,
)
from em_unet.segmentation.metrics import evaluate_stack  # noqa: E402
from em_unet.training.model import build_unet  # noqa: E402

PREVIOUS_DEFAULTS = Tiling(margin=32, tile_batch=1)  # before sharing forward passes between slices
VALIDATION_SLICES = slice(15, 20)


def slices_per_second(run, volume) -> float:
    start = time.perf_counter()
    for _ in run(volume):
        pass
    return len(volume) / (time.perf_counter() - start)


def peak_memory_mb(command: list[str]) -> float:
    """Peak resident memory of a child process, in MB (the kernel's ru_maxrss)."""
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the child
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{log.read()}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tta-slices", type=int, default=6, help="slices timed with --tta (default 6)")
    parser.add_argument("--model", help="a trained model: score the defaults against the previous ones")
    args = parser.parse_args()

    preset = TrainConfig(data=str(ISBI / "train-volume.tif"), labels=str(ISBI / "train-labels.tif"))
    precision = resolve_precision(preset.precision)
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    model = build_unet(preset.depth, preset.base_filters)
    keras.mixed_precision.set_global_policy("float32")
    predictor = keras_predictor(model)
    volume = load_image_stack(ISBI / "test-volume.tif")

    candidates = {
        "whole slice, one forward pass": lambda v: (predictor(s[None, ..., None]) for s in v),
        "em-unet predict (defaults)": lambda v: predict_stack(predictor, v),
        "previous defaults": lambda v: predict_stack(predictor, v, PREVIOUS_DEFAULTS),
        "defaults, --tile-batch 1": lambda v: predict_stack(predictor, v, Tiling(tile_batch=1)),
        "em-unet predict --tile 256": lambda v: predict_stack(predictor, v, Tiling(tile=256)),
    }
    for run in candidates.values():  # warm-up: one trace per tile shape
        slices_per_second(run, volume[:2])
    rate = {name: 0.0 for name in candidates}
    for _ in range(args.rounds):
        for name, run in candidates.items():
            rate[name] = max(rate[name], slices_per_second(run, volume))
    slices_per_second(lambda v: predict_stack(predictor, v, tta=True), volume[:2])
    tta = slices_per_second(lambda v: predict_stack(predictor, v, tta=True), volume[: args.tta_slices])
    quality = scores(args.model) if args.model else None

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        version = export_saved_model(model, "bench", folder / "models")
        stack = tifffile.imread(ISBI / "test-volume.tif")
        tifffile.imwrite(folder / "30.tif", stack, imagej=True)
        tifffile.imwrite(folder / "60.tif", np.concatenate([stack, stack]), imagej=True)
        memory = {
            n: peak_memory_mb(
                [
                    sys.executable,
                    "-m",
                    "em_unet.cli",
                    "predict",
                    str(version),
                    str(folder / f"{n}.tif"),
                    "-o",
                    str(folder / f"p{n}.tif"),
                ]
            )
            for n in (30, 60)
        }

    print(f"machine: {machine_description()}")
    print(
        f"model: depth {preset.depth}, {preset.base_filters} base filters, {precision}; "
        f"volume: {len(volume)} slices of {volume.shape[1]}x{volume.shape[2]} px"
    )
    whole = rate["whole slice, one forward pass"]
    for name, value in rate.items():
        print(f"{name:32s} {value:6.2f} slices/s   overhead {whole / value - 1:+6.1%} against the whole slice")
    default = rate["em-unet predict (defaults)"]
    previous = rate["previous defaults"]
    print(
        f"{'em-unet predict --tta':32s} {tta:6.2f} slices/s   {default / tta:.2f}x the time of the defaults "
        f"(target <= 8.5x), {previous / tta:.2f}x the previous defaults"
    )
    print(
        f"peak memory of em-unet predict: 30 slices {memory[30]:.0f} MB, 60 slices {memory[60]:.0f} MB "
        f"({memory[60] - memory[30]:+.0f} MB)"
    )
    if quality:
        for name, values in quality.items():
            print(
                f"slices 15-19, {name:18s} V_rand {values['v_rand']:.4f}  V_info {values['v_info']:.4f}  "
                f"pixel error {values['pixel_error']:.4f}"
            )
        change = quality["defaults"]["v_rand"] - quality["previous defaults"]["v_rand"]
        print(f"V_rand change: {change:+.4f} (target: within 0.002)")
    else:
        print("quality not measured: give --model PATH (a trained model) to score slices 15-19")
    print(f"time of the defaults against one whole-slice forward pass: {whole / default:.3f}x (target <= 1.10x)")


def scores(model_path: str) -> dict[str, dict]:
    """Fiji's scores of ISBI training slices 15-19 at the defaults and at the previous defaults."""
    from em_unet.io.stacks import membrane_target, read_stack

    predictor = load_predictor(model_path)
    images = load_image_stack(ISBI / "train-volume.tif")[VALIDATION_SLICES]
    target = membrane_target(read_stack(ISBI / "train-labels.tif")[VALIDATION_SLICES])
    settings = {"defaults": Tiling(), "previous defaults": PREVIOUS_DEFAULTS}
    return {
        name: evaluate_stack(np.stack(list(predict_stack(predictor, images, options))), target)
        for name, options in settings.items()
    }


if __name__ == "__main__":
    main()
