"""Blockwise prediction of chunked volumes: a worker's peak memory is set by the block, not the volume.

Predicts a small Zarr volume and one 4x larger (each slice twice as high and twice as wide, so a whole
slice in memory would take 4x as much) with the same tiny U-Net, block by block, on one Dask worker
process, and prints the worker's peak resident memory for both, their ratio, and the blocks per second;
beside them, the peak of ``em-unet predict`` writing a TIFF of the larger volume (whole slices in memory).
The worker is restarted between the volumes, so each peak is that volume's own.

    python benchmarks/blockwise_memory.py [--slices 4] [--side 1024] [--block 256]

Target: the larger volume's worker peak within a few per cent of the smaller's.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from em_unet.inference.blockwise import predict_volume  # noqa: E402
from em_unet.inference.tiling import Tiling  # noqa: E402
from em_unet.io.volumes import create_volume  # noqa: E402
from em_unet.machine import machine_description  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_volume(address: str, shape: tuple[int, int, int], block: int) -> None:
    rng = np.random.default_rng(0)
    with create_volume(address, shape, np.uint8, (1, block, block)) as volume:
        for z in range(shape[0]):
            volume[z : z + 1] = rng.integers(0, 256, (1, *shape[1:]), dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=4, help="slices of both volumes (default 4)")
    parser.add_argument("--side", type=int, default=1024, help="slice side of the small volume, px (default 1024)")
    parser.add_argument("--block", type=int, default=256, help="block side, px (default 256)")
    args = parser.parse_args()

    import keras
    from distributed import Client, LocalCluster

    from em_unet.training.model import build_unet

    print(f"machine: {machine_description()}")
    folder = Path(tempfile.mkdtemp(prefix="em-unet-blockwise-"))
    keras.utils.set_random_seed(0)
    build_unet(depth=3, base_filters=8).save(folder / "model.keras")
    sizes = {"small": (args.slices, args.side, args.side), "large": (args.slices, 2 * args.side, 2 * args.side)}
    peaks, rates = {}, {}
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
        ) as cluster,
        Client(cluster) as client,
    ):
        for name, shape in sizes.items():
            make_volume(f"{folder}/{name}.zarr", shape, args.block)
            client.restart()
            start = time.perf_counter()
            predict_volume(
                folder / "model.keras",
                f"{folder}/{name}.zarr",
                f"{folder}/{name}-p.zarr",
                block=args.block,
                tiling=Tiling(overlap=0),
                scheduler=cluster.scheduler_address,
                progress=False,
            )
            seconds = time.perf_counter() - start
            blocks = shape[0] * (shape[1] // args.block) * (shape[2] // args.block)
            peaks[name] = max(client.run(peak_rss_mb).values())
            rates[name] = blocks / seconds
            print(
                f"{name:10s} {shape}: {blocks} blocks in {seconds:.1f} s ({rates[name]:.1f} blocks/s), "
                f"worker peak RSS {peaks[name]:.0f} MB"
            )
    print(
        f"worker peak, large (4x) / small: {peaks['large'] / peaks['small']:.3f} "
        f"({peaks['large'] - peaks['small']:+.0f} MB)"
    )
    tiff = folder / "large.tif"
    script = (
        "import resource, sys; from em_unet import cli; "
        "cli.main(sys.argv[1:]); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    whole = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "predict",
            str(folder / "model.keras"),
            f"{folder}/large.zarr",
            "-o",
            str(tiff),
            "--margin",
            "32",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    print(
        f"em-unet predict of the 4x larger volume to a TIFF (whole slices in memory): peak RSS "
        f"{float(whole.stdout.strip().splitlines()[-1]):.0f} MB"
    )


if __name__ == "__main__":
    main()
