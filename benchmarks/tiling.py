"""The default tiling, measured: what blending tiles buys in quality, and that a stack gives the same map and
takes about the same time as a TIFF and as a Zarr volume.

1. Quality: slices 15-19 of ISBI 2012 predicted by a trained model cut into 256 px tiles (several tiles per
   slice, so the seams matter) with ``--overlap`` 0 (tiles meet at their cores, each with 16 px of context,
   the chunked outputs' default) and 16 (the default) and 32 px of blending, beside the whole-slice tile;
   Fiji's V_rand / V_info of each.
2. Containers: a wide stack (ISBI slices mirrored side by side, 4 x 1024 x 2048 px, several auto tiles a
   slice) predicted from a TIFF in memory and from a Zarr volume blockwise (one worker) with and without
   blending: the time of each, and the largest difference from the TIFF of the same tiling.

    python benchmarks/tiling.py --model saved_models/em_unet
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from isbi_data import ISBI  # noqa: E402  (benchmarks/, beside this script)

from em_unet.inference.blockwise import predict_volume  # noqa: E402
from em_unet.inference.predict import load_predictor, predict_file, predict_stack  # noqa: E402
from em_unet.inference.tiling import Tiling  # noqa: E402
from em_unet.io.stacks import membrane_target, to_unit_range  # noqa: E402
from em_unet.io.volumes import create_volume, open_volume  # noqa: E402
from em_unet.machine import machine_description  # noqa: E402
from em_unet.segmentation.metrics import evaluate_stack  # noqa: E402


def quality(model: str) -> None:
    images = to_unit_range(tifffile.imread(ISBI / "train-volume.tif")[15:20])
    target = membrane_target(tifffile.imread(ISBI / "train-labels.tif")[15:20])
    predictor = load_predictor(model)
    print("slices 15-19, Fiji's scores (means over slices)")
    for name, tiling in {
        "whole-slice tile (default)": Tiling(),
        "256 px tiles, --overlap 0": Tiling(tile=256, overlap=0),
        "256 px tiles, --overlap 16 (default)": Tiling(tile=256),
        "256 px tiles, --overlap 32": Tiling(tile=256, overlap=32),
    }.items():
        scores = evaluate_stack(np.stack(list(predict_stack(predictor, images, tiling))), target)
        print(f"  {name:36s} V_rand {scores['v_rand']:.4f}  V_info {scores['v_info']:.4f}")


DEFAULT = " (default)"


def containers(model: str) -> None:
    isbi = tifffile.imread(ISBI / "train-volume.tif")[:4, :, :]
    stack = np.concatenate([isbi, isbi[:, :, ::-1]], axis=2)
    stack = np.concatenate([stack, stack[:, ::-1]], axis=1)  # 4 x 1024 x 1024
    stack = np.concatenate([stack, stack[:, :, ::-1]], axis=2)  # 4 x 1024 x 2048
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tifffile.imwrite(folder / "stack.tif", stack, photometric="minisblack")
        with create_volume(f"{folder}/stack.zarr", stack.shape, stack.dtype, (1, 256, 256)) as volume:
            volume[...] = stack
        grid = Tiling().grid(*stack.shape[1:])
        print(f"{stack.shape} stack, auto tiles {grid.tile_h} x {grid.tile_w} px, {grid.rows} x {grid.cols} a slice")
        start = time.perf_counter()
        predict_file(model, folder / "stack.tif", folder / "p.tif", progress=False)
        in_memory = time.perf_counter() - start
        predict_file(model, folder / "stack.tif", folder / "p0.tif", Tiling(overlap=0), progress=False)
        as_tiff = {16: tifffile.imread(folder / "p.tif"), 0: tifffile.imread(folder / "p0.tif")}
        print(f"  TIFF in memory, defaults (--overlap 16): {in_memory:.1f} s")
        for overlap in (0, 16):
            start = time.perf_counter()
            out = f"{folder}/p{overlap}.zarr"
            predict_volume(
                model, f"{folder}/stack.zarr", out, tiling=Tiling(overlap=overlap), workers=1, progress=False
            )
            seconds = time.perf_counter() - start
            difference = np.abs(as_tiff[overlap] - open_volume(out)[...]).max()
            label = f"--overlap {overlap:2d}{DEFAULT if overlap == 0 else ' ' * len(DEFAULT)}"
            print(
                f"  Zarr blockwise {label}: {seconds:.1f} s "
                f"({seconds / in_memory:.2f}x, one worker, cluster start included); largest difference from the TIFF "
                f"of the same overlap {difference:.1e}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained model (SavedModel folder or .keras file)")
    args = parser.parse_args()
    print(machine_description())
    quality(args.model)
    containers(args.model)


if __name__ == "__main__":
    main()
