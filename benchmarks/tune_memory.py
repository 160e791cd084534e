"""Memory across tuning trials: resident memory after each trial, with and without clearing
the Keras session between trials (UnetHyperModel.clear_session_between_trials), side by side.

Each variant runs in its own subprocess (a fresh interpreter, so the two do not share
memory) on the first ISBI slices cropped to 128 px, a depth-3 U-Net with 8 base filters,
one epoch per trial, and prints the resident set size after every trial and the growth
from the second trial to the last.

    python benchmarks/tune_memory.py [--trials 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from isbi_data import ISBI  # benchmarks/, beside this script

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def one_variant(clear: bool, trials: int) -> list[float]:
    import keras
    import tifffile

    from em_unet import tune as tune_module
    from em_unet.config import TrainConfig

    folder = Path(tempfile.mkdtemp())
    tifffile.imwrite(
        folder / "img.tif", tifffile.imread(ISBI / "train-volume.tif")[:4, :128, :128], photometric="minisblack"
    )
    tifffile.imwrite(
        folder / "lab.tif", tifffile.imread(ISBI / "train-labels.tif")[:4, :128, :128], photometric="minisblack"
    )
    (folder / "space.toml").write_text(
        f'[tuner]\nalgorithm = "random"\nmax_trials = {trials}\n\n'
        '[space]\noptimizer = ["sgd", "adam", "adamax"]\nlearning_rate = { min = 1e-5, max = 1e-3 }\n'
    )
    tune_module.UnetHyperModel.clear_session_between_trials = clear
    samples = []
    original_fit = tune_module.UnetHyperModel.fit

    def fit_and_measure(self, hp, model, *args, **kwargs):
        history = original_fit(self, hp, model, *args, **kwargs)
        samples.append(rss_mb())
        return history

    tune_module.UnetHyperModel.fit = fit_and_measure
    base = TrainConfig(
        data=str(folder / "img.tif"),
        labels=str(folder / "lab.tif"),
        val_slices=(3, 3),
        depth=3,
        base_filters=8,
        patch_size=64,
        steps_per_epoch=4,
        epochs=1,
        precision="float32",
        logs_dir=str(folder / "logs"),
        models_dir=str(folder / "models"),
    )
    keras.utils.set_random_seed(0)
    tune_module.tune(base, tune_module.search_settings(folder / "space.toml"), verbose=0)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--variant", choices=("clear", "keep"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args.variant == "clear", args.trials)))
        return
    results = {}
    for variant in ("clear", "keep"):
        out = subprocess.run(
            [sys.executable, __file__, "--trials", str(args.trials), "--variant", variant],
            capture_output=True,
            text=True,
            check=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    for variant, label in (("clear", "clear_session between trials"), ("keep", "no clear_session")):
        samples = results[variant]
        growth = samples[-1] - samples[1]
        print(f"{label:30s} RSS after each trial (MB): {' '.join(f'{s:.0f}' for s in samples)}")
        print(
            f"{'':30s} growth trial 2 -> {len(samples)}: {growth:+.0f} MB ({growth / (len(samples) - 2):+.1f} MB/trial)"
        )


if __name__ == "__main__":
    main()
