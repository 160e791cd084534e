"""Training from a chunked volume: peak memory does not grow with the volume.

Writes a Zarr store with an image and a label volume, small and 4x as many slices, and runs the same short
``em-unet train`` (tiny U-Net, a few steps) on each in a child process, reading peak resident memory from
the kernel; beside them, the larger volume as TIFF stacks, which training reads whole into memory.

    python benchmarks/train_volume_memory.py [--slices 8] [--side 2048]

Target: the larger Zarr volume's peak within a few per cent of the smaller's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from em_unet.io.volumes import create_volume  # noqa: E402
from em_unet.machine import machine_description  # noqa: E402

TRAIN = [
    "--depth",
    "3",
    "--base-filters",
    "8",
    "--patch-size",
    "128",
    "--batch-size",
    "4",
    "--epochs",
    "2",
    "--steps-per-epoch",
    "4",
    "--precision",
    "float32",
]


def write_volumes(folder: Path, name: str, shape: tuple[int, int, int], tiff: bool = False) -> tuple[str, str]:
    """Random intensities and labels with a membrane grid (0) between cells (255), ISBI's convention."""
    rng = np.random.default_rng(0)
    grid = np.full(shape[1:], 255, np.uint8)
    grid[::64], grid[:, ::64] = 0, 0
    if tiff:
        images, labels = folder / f"{name}-img.tif", folder / f"{name}-lab.tif"
        with tifffile.TiffWriter(images) as image_file, tifffile.TiffWriter(labels) as label_file:
            for _ in range(shape[0]):
                image_file.write(rng.integers(0, 256, shape[1:], dtype=np.uint8), photometric="minisblack")
                label_file.write(grid, photometric="minisblack")
        return str(images), str(labels)
    store = f"{folder}/{name}.zarr"
    with (
        create_volume(f"{store}/raw", shape, np.uint8, (1, 512, 512)) as images,
        create_volume(f"{store}/labels", shape, np.uint8, (1, 512, 512)) as labels,
    ):
        for z in range(shape[0]):
            images[z : z + 1] = rng.integers(0, 256, (1, *shape[1:]), dtype=np.uint8)
            labels[z : z + 1] = grid[None]
    return f"{store}/raw", f"{store}/labels"


def peak_of_training(folder: Path, data: str, labels: str, run: str, slices: int) -> float:
    script = (
        "import resource, sys; from em_unet import cli; status = cli.main(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(status)"
    )
    args = [
        "train",
        "--data",
        data,
        "--labels",
        labels,
        "--val-slices",
        f"{slices - 1}-{slices - 1}",
        *TRAIN,
        "--logs-dir",
        str(folder / "logs"),
        "--models-dir",
        str(folder / "models"),
        "--run-name",
        run,
    ]
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=8, help="slices of the small volume (default 8)")
    parser.add_argument("--side", type=int, default=2048, help="slice side, px (default 2048)")
    args = parser.parse_args()
    print(f"machine: {machine_description()}")
    folder = Path(tempfile.mkdtemp(prefix="em-unet-train-volume-"))
    peaks = {}
    for name, slices in (("small", args.slices), ("large", 4 * args.slices)):
        data, labels = write_volumes(folder, name, (slices, args.side, args.side))
        peaks[name] = peak_of_training(folder, data, labels, name, slices)
        print(
            f"Zarr {name:5s} ({slices} x {args.side} x {args.side} px, "
            f"{slices * args.side**2 / 2**20:.0f} MiB of 8-bit images): peak RSS {peaks[name]:.0f} MB"
        )
    print(
        f"peak, large (4x) / small: {peaks['large'] / peaks['small']:.3f} ({peaks['large'] - peaks['small']:+.0f} MB)"
    )
    data, labels = write_volumes(folder, "large-tiff", (4 * args.slices, args.side, args.side), tiff=True)
    whole = peak_of_training(folder, data, labels, "large-tiff", 4 * args.slices)
    print(f"the large volume as TIFF stacks (read whole into memory): peak RSS {whole:.0f} MB")


if __name__ == "__main__":
    main()
