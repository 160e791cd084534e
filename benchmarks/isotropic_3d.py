"""A small isotropic check of the 3-D path: a synthetic volume of random blobs with membranes, an anisotropic 3-D
U-Net trained on it for a few minutes from the command line, its membrane map scored, and blockwise prediction
compared with in-memory prediction.

The volume: 64 x 128 x 128 voxels of 8 nm (isotropic), about 60 cells grown from random seeds (a 3-D Voronoi
tessellation), membrane = voxels next to another cell (about 2 voxels thick), membranes dark and interiors bright
with organelle-like dark specks, blurred and noisy, stored as OME-Zarr whose metadata records the voxel size (so
``--voxel-size`` is read from it: every level is then (3, 3, 3) with (2, 2, 2) pooling). Sections 48-63 are the
validation block.

    python benchmarks/isotropic_3d.py [--minutes 4] [--folder /tmp/isotropic-3d]

It prints the validation scores of the trained model (Fiji's V_rand / V_info of the membrane map per section,
pixel error) beside an untrained one's, and the largest difference between the blockwise (Zarr, 2 workers,
blocks of 8 sections) and the in-memory (TIFF) prediction of the whole volume.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import zarr
from scipy import ndimage

from em_unet.io.volumes import create_volume, open_volume
from em_unet.machine import machine_description

SHAPE = (64, 128, 128)
VOXEL_NM = 8.0


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8) and ISBI-convention labels (0 = membrane, 255 = interior) of a synthetic volume."""
    rng = np.random.default_rng(seed)
    seeds = rng.random((60, 3)) * np.array(SHAPE)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1).reshape(-1, 3)
    cells = np.empty(len(grid), np.int32)
    for start in range(0, len(grid), 1 << 18):  # nearest seed, in pieces to bound memory
        part = grid[start : start + (1 << 18)]
        cells[start : start + len(part)] = np.argmin(((part[:, None] - seeds[None]) ** 2).sum(-1), axis=1)
    cells = cells.reshape(SHAPE)
    membrane = np.zeros(SHAPE, bool)
    for axis in range(3):
        differs = np.diff(cells, axis=axis) != 0
        before = [slice(None)] * 3
        after = [slice(None)] * 3
        before[axis], after[axis] = slice(None, -1), slice(1, None)
        membrane[tuple(before)] |= differs
        membrane[tuple(after)] |= differs
    intensity = np.where(membrane, 0.25, 0.7) - 0.3 * (rng.random(SHAPE) < 0.002)
    intensity = ndimage.gaussian_filter(ndimage.grey_erosion(intensity, size=2), 1.0) + rng.normal(0, 0.06, SHAPE)
    images = np.clip(intensity * 255, 0, 255).astype(np.uint8)
    return images, np.where(membrane, 0, 255).astype(np.uint8)


def write_ome_zarr(path: Path, array: np.ndarray) -> None:
    with create_volume(str(path), array.shape, array.dtype, (8, 64, 64)) as volume:
        volume[...] = array
    group = zarr.open_group(str(path), mode="r+")
    attrs = group.attrs.asdict()
    ome = attrs.get("ome", attrs)
    multiscales = ome["multiscales"]
    multiscales[0]["axes"] = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    multiscales[0]["datasets"][0]["coordinateTransformations"] = [{"type": "scale", "scale": [VOXEL_NM] * 3}]
    if "ome" in attrs:
        group.attrs["ome"] = {**ome, "multiscales": multiscales}
    else:
        group.attrs["multiscales"] = multiscales


def em_unet(*args: str) -> str:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "em_unet.cli", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"em-unet {' '.join(map(str, args))} failed:\n{done.stderr[-2000:]}")
    print(f"  em-unet {args[0]}: {time.perf_counter() - started:.0f} s")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/isotropic-3d"))
    args = parser.parse_args()
    folder = args.folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"machine: {machine_description()}")
    images, labels = blobs()
    print(f"volume {SHAPE}, {VOXEL_NM:g} nm voxels, membrane fraction {np.mean(labels == 0):.2f}")
    write_ome_zarr(folder / "raw.ome.zarr", images)
    write_ome_zarr(folder / "labels.ome.zarr", labels)
    tifffile.imwrite(folder / "raw.tif", images)
    tifffile.imwrite(folder / "val-labels.tif", labels[48:])
    common = ["--model", "unet3d", "--z-context", "8", "--depth", "3", "--base-filters", "8", "--patch-size", "64"]
    common += ["--batch-size", "1", "--val-slices", "48-63", "--logs-dir", folder / "logs", "--models-dir"]
    common += [folder / "models", "--data", folder / "raw.ome.zarr", "--labels", folder / "labels.ome.zarr"]
    em_unet(
        "train",
        *common,
        "--epochs",
        "1",
        "--steps-per-epoch",
        "1",
        "--run-name",
        "untrained",
        "--model-name",
        "untrained",
    )
    em_unet(
        "train",
        *common,
        "--epochs",
        "1000",
        "--max-minutes",
        args.minutes,
        "--run-name",
        "trained",
        "--model-name",
        "trained",
    )
    config = json.loads((folder / "logs" / "trained" / "config.json").read_text())
    history = (folder / "logs" / "trained" / "history.csv").read_text().splitlines()
    print(
        f"voxel size read from the OME-Zarr metadata: {config['voxel_size_used']} nm; "
        f"epochs trained: {len(history) - 1}"
    )
    for name in ("untrained", "trained"):
        scores = json.loads((folder / "logs" / name / "scores.json").read_text())
        print(
            f"{name:10s} validation (sections 48-63): V_rand {scores['v_rand']:.4f}  V_info {scores['v_info']:.4f}"
            f"  pixel error {scores['pixel_error']:.4f}"
        )
    tifffile.imwrite(folder / "val.tif", images[48:])
    em_unet("predict", folder / "models" / "trained", folder / "raw.tif", "-o", folder / "memory.tif")
    em_unet(
        "predict",
        folder / "models" / "trained",
        folder / "raw.ome.zarr",
        "-o",
        folder / "blocks.zarr",
        "--workers",
        "2",
        "--overlap",
        "0",
    )
    in_memory = tifffile.imread(folder / "memory.tif")
    em_unet(
        "predict", folder / "models" / "trained", folder / "raw.tif", "-o", folder / "memory0.tif", "--overlap", "0"
    )
    blockwise = open_volume(str(folder / "blocks.zarr"))[...]
    same_tiling = tifffile.imread(folder / "memory0.tif")
    print(
        "blockwise (blocks of 8 sections) vs in memory, same tiling: max |difference| "
        f"{np.abs(blockwise - same_tiling).max():.2e}"
    )
    print(f"(in memory with the default 16 px overlap vs without: {np.abs(in_memory - same_tiling).max():.2e})")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
