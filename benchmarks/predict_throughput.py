"""Prediction: overlap-tile prediction against one whole-slice forward pass, the cost of --tta,
and peak memory for a 30- and a 60-slice stack.

In one process, on the 30-slice 512x512 ISBI 2012 test volume, with the default preset's
architecture (depth 4, 16 base filters, precision auto; untrained weights: speed does not depend
on them): slices per second of ``predict_stack`` at its defaults (whole slice plus 32 px mirrored
margins per tile), of 256 px tiles, and of one forward pass per whole slice; alternating rounds,
best kept. Then ``em-unet predict`` runs in child processes on 30 and 60 slices and their peak
resident memory is read from the kernel.

    python benchmarks/predict_throughput.py [--rounds 3] [--tta-slices 6]

Targets: tiling overhead <= 25 %; peak memory does not grow with the stack. The floor of the
overhead at the defaults is the mirrored margin: a 512 px slice runs as a 576 px tile, (576/512)^2 = 1.27x
the pixels; ``--margin 16`` (544 px, 1.13x) is measured beside it.
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
from em_unet.data import load_image_stack  # noqa: E402
from em_unet.export import export_saved_model  # noqa: E402
from em_unet.machine import (
    machine_description,  # noqa: E402
    resolve_precision,
)
from em_unet.model import build_unet  # noqa: E402
from em_unet.predict import keras_predictor, predict_stack  # noqa: E402


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
    args = parser.parse_args()

    preset = TrainConfig(data="", labels="")
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
        "em-unet predict --margin 16": lambda v: predict_stack(predictor, v, margin=16),
        "em-unet predict --tile 256": lambda v: predict_stack(predictor, v, tile=256),
    }
    for run in candidates.values():  # warm-up: one trace per tile shape
        slices_per_second(run, volume[:2])
    rate = {name: 0.0 for name in candidates}
    for _ in range(args.rounds):
        for name, run in candidates.items():
            rate[name] = max(rate[name], slices_per_second(run, volume))
    tta = slices_per_second(lambda v: predict_stack(predictor, v, tta=True), volume[: args.tta_slices])

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
    print(f"{'em-unet predict --tta':32s} {tta:6.2f} slices/s   {default / tta:.1f}x the time of the defaults")
    print(
        f"peak memory of em-unet predict: 30 slices {memory[30]:.0f} MB, 60 slices {memory[60]:.0f} MB "
        f"({memory[60] - memory[30]:+.0f} MB)"
    )
    print(f"tiling overhead at the defaults: {whole / default - 1:.1%} (target <= 25 %)")


if __name__ == "__main__":
    main()
