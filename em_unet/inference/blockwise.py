"""Prediction of chunked volumes (HDF5, Zarr, OME-Zarr), block by block, on Dask.

A volume is cut into blocks ``(z, y, x)`` voxels, ``z`` the input's chunk depth and ``y``, ``x`` following
the cores of the slice's tiles (:meth:`~em_unet.inference.tiling.Tiling.block_side`), unless ``--block``
says otherwise. Each block is a task on a ``dask.distributed`` cluster (a LocalCluster with one worker
process per core, or per GPU, by default; any running cluster by its address). A worker loads the model once
and, for each slice of its block, predicts the block's part of the slice from the tiles of the slice's own
tile grid that reach into it (:func:`~em_unet.inference.predict.predict_regions`), reading only that window
of the input (mirror-padded at the volume's edges). So the result equals the prediction of the same slice
in memory (a TIFF), whatever the blocks, and a worker's memory is set by the block and tile size, not by
the volume.

Zarr outputs are written by the workers, each block into its own chunks; HDF5 outputs, which take one
writer at a time, by the client as blocks come back. Outputs go through :func:`em_unet.io.writers.open_output`:
a killed run resumes where it stopped, and a run with other settings is refused rather than mixed in.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from em_unet.cluster import Block, cluster_threads_per_worker, dask_client, gather_in_any_order, plan_blocks
from em_unet.config import PredictConfig
from em_unet.errors import EmUnetError
from em_unet.inference.predict import (
    affinity_attributes,
    check_affinity_model,
    load_predictor,
    predict_regions,
    resolve_model_path,
)
from em_unet.inference.tiling import Tiling
from em_unet.io.stacks import scale_to_unit, volume_intensity_range, z_context_indices
from em_unet.io.volumes import open_volume, parse_address
from em_unet.io.writers import ResumeMarkers, check_volume_output, open_output, output_kind
from em_unet.machine import cpu_cores, gpu_count, import_tensorflow_quietly

DEFAULT_BLOCK_PX = 512  # block side (pixels) for given tiles when the input's chunks are smaller than 64 px
# The default tiling of chunked outputs (library and command line): no overlap, so that each block is one tile.
# Blending 16 px would make each block also predict the neighbouring tiles that reach into it: 1.6x the time on
# a 4 x 1024 x 2048 stack (benchmarks/tiling.py); slices that fit one tile (up to 992 px) get the same map either way.
CHUNKED_TILING = Tiling(overlap=0)

# ---------------------------------------------------------------- the work of one block


@dataclass(frozen=True)
class PredictJob:
    """Everything a worker needs for the blocks of one prediction (pickled to the workers)."""

    model: str
    tiling: Tiling
    tta: bool
    isbi: bool
    low: float
    high: float
    threads: int
    channels: bool = False  # also the affinities, after the membrane probability


_PREDICTORS: dict[str, object] = {}


def worker_predictor(model: str, threads: int = 0):
    """The model's predictor in this process, loaded once (a worker keeps it for all its blocks).

    On a machine with GPUs, worker ``i`` of a LocalCluster uses GPU ``i`` (modulo their number)."""
    if model not in _PREDICTORS:
        import_tensorflow_quietly()  # a worker's stderr is the user's terminal
        import tensorflow as tf  # lazy: only prediction workers load TensorFlow

        with contextlib.suppress(RuntimeError, ValueError):  # TensorFlow already initialised in this process
            if threads:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                tf.config.set_visible_devices(gpus[_worker_number() % len(gpus)], "GPU")
        _PREDICTORS[model] = load_predictor(model)
    return _PREDICTORS[model]


def _worker_number() -> int:
    from distributed import get_worker  # lazy: Dask's worker state, inside a task

    try:
        name = get_worker().name
        return int(name) if str(name).isdigit() else 0
    except ValueError:  # not in a worker
        return 0


def predict_block(
    job: PredictJob, source, block: Block, output=None, markers: ResumeMarkers | None = None, affinities=None
) -> np.ndarray | None:
    """Predict ``block`` of the volume ``source``; write it into ``output`` (and with ``job.channels`` the
    affinities into ``affinities``, ``(c, z, y, x)``) and mark it done when given (Zarr), else return it (the
    client writes HDF5): ``(z, y, x)``, or with ``job.channels`` ``(1 + c, z, y, x)``."""
    predictor = worker_predictor(job.model, job.threads)
    sections, height, width = source.shape
    grid = job.tiling.grid(height, width)
    rows, cols = grid.padded_index(0), grid.padded_index(1)
    z_context = getattr(predictor, "z_context", 1)

    def reader(z):
        def read_padded(r0, r1, c0, c1):
            row_index, col_index = rows[r0:r1], cols[c0:c1]
            box = (slice(row_index.min(), row_index.max() + 1), slice(col_index.min(), col_index.max() + 1))
            pick = np.ix_(row_index - row_index.min(), col_index - col_index.min())
            if z_context == 1:
                return scale_to_unit(source[(z, *box)][pick], job.low, job.high)
            # the z halo: K // 2 sections each side, mirrored at the volume's ends, as in memory
            context = [source[(int(i), *box)][pick] for i in z_context_indices(z, sections, z_context)]
            return scale_to_unit(np.stack(context, axis=-1), job.low, job.high)

        return read_padded

    region = (block.y0, block.y1, block.x0, block.x1)
    regions = ((reader(z), grid, region) for z in range(block.z0, block.z1))
    result = np.stack(list(predict_regions(predictor, regions, job.tiling.tile_batch, job.tta, job.channels)), axis=-3)
    if job.isbi and job.channels:
        result[0] = 1.0 - result[0]
    elif job.isbi:
        result = 1.0 - result
    if output is None:
        return result
    write_block(block, result, output, affinities)
    markers.mark(block.name)
    return None


def write_block(block: Block, result: np.ndarray, output, affinities=None) -> None:
    """Write a block's prediction (see :func:`predict_block`) into the output, and the affinities into theirs."""
    if affinities is None:
        output[block.index] = result
        return
    affinities[(slice(None), *block.index)] = result[1:]
    output[block.index] = result[0]


@dataclass(frozen=True)
class _BothMarkers:
    """The done markers of the output and of the affinity output (if any), marked together."""

    output: ResumeMarkers
    affinities: ResumeMarkers | None

    def mark(self, name: str) -> None:
        self.output.mark(name)
        if self.affinities is not None:
            self.affinities.mark(name)


# ---------------------------------------------------------------- predicting a volume


def block_shape(source, tiling: Tiling, block: int | None) -> tuple[int, int, int]:
    """The blocks' shape (z, y, x voxels): the input's chunk depth, and ``block`` px; by default the auto
    tiles' cores (one tile per block without overlap), or for a given ``tiling.tile`` the input's chunk side
    (at least 64 px, else :data:`DEFAULT_BLOCK_PX`)."""
    _, height, width = source.shape
    chunk_z, chunk_y, chunk_x = source.chunks
    if block and (block % chunk_y or block % chunk_x) and (block < height or block < width):
        raise EmUnetError(
            f"--block {block} px does not divide into the input's chunks of {chunk_y} x {chunk_x} px: "
            f"choose a multiple of {max(chunk_y, chunk_x)} px, so each block reads whole chunks"
        )
    if block:
        return chunk_z, min(block, height), min(block, width)
    if tiling.tile:  # tiles the user chose: blocks of whole chunks
        side = min(chunk_y, chunk_x) if min(chunk_y, chunk_x) >= 64 else DEFAULT_BLOCK_PX
        return chunk_z, min(side, height), min(side, width)
    return chunk_z, tiling.block_side(height), tiling.block_side(width)


def predict_volume(
    model_path: str | Path,
    input_address: str,
    output_address: str,
    key: str | None = None,
    tiling: Tiling = CHUNKED_TILING,
    tta: bool = PredictConfig.tta,
    isbi: bool = PredictConfig.isbi,
    block: int | None = PredictConfig.block,
    scheduler: str | None = None,
    workers: int | None = None,
    overwrite: bool = PredictConfig.overwrite,
    progress: bool = True,
    affinities_address: str | None = None,
) -> str:
    """Predict a chunked volume block by block on a Dask cluster into a float32 chunked output (Zarr /
    OME-Zarr or HDF5); resumes an interrupted run of the same command. Returns the output address.

    ``block``: block side in pixels (default: along the tiles' cores, so each block is one tile where
    ``tiling.overlap`` is 0; an overlap or another block side makes blocks also predict the parts of
    neighbouring tiles that reach into them); ``key``: the input's array inside its file or store;
    ``affinities_address``: also write an affinity U-Net's affinities there, a chunked ``(c, z, y, x)`` float32
    volume with the offsets in its attributes (Zarr / OME-Zarr: axis ``c`` of type channel). See the module
    docstring for the rest."""
    model = str(resolve_model_path(model_path))
    source = open_volume(input_address, key=key)
    offsets = ()
    if affinities_address is not None:
        if output_kind(affinities_address) != "volume":
            raise EmUnetError(
                f"--affinities {affinities_address}: a chunked input gives a chunked affinity output "
                "(OUT.zarr, OUT.ome.zarr, OUT.h5:/KEY)"
            )
        if parse_address(affinities_address).path == parse_address(output_address).path:
            raise EmUnetError(f"--affinities {affinities_address}: name another store than the output's")
        offsets = check_affinity_model(worker_predictor(model), model)  # loads the model here once, to know it
    shape = block_shape(source, tiling, block)
    record = {
        "command": "em-unet predict",
        "model": model,
        "input": str(input_address),
        "key": key,
        "block": list(shape),
        "tile": tiling.tile,
        "margin": tiling.margin,
        "overlap": tiling.overlap,
        "tta": tta,
        "isbi": isbi,
        "affinities": affinities_address,
    }
    check_volume_output(output_address, record, overwrite)  # refusals before a cluster starts
    if offsets:
        check_volume_output(affinities_address, record, overwrite)
    blocks = plan_blocks(source.shape, shape)
    client_writes = parse_address(output_address).kind == "hdf5" or (
        bool(offsets) and parse_address(affinities_address).kind == "hdf5"
    )
    written_as = dict(  # the membrane output and the affinity output alike
        shape=source.shape,
        dtype=np.float32,
        chunks=shape,
        record=record,
        overwrite=overwrite,
        pieces=(len(blocks), "blocks"),
    )
    opened = open_output(output_address, **written_as)
    affinity_output = (
        open_output(
            affinities_address,
            channels=len(offsets),
            attributes=affinity_attributes(offsets, model),
            **written_as,
        )
        if offsets
        else contextlib.nullcontext((None, None))
    )
    with (
        opened as (output, markers),
        affinity_output as (affinities, affinity_markers),
        dask_client(scheduler, workers or gpu_count() or cpu_cores(), log_file=markers.log_path) as client,
    ):
        low, high = volume_intensity_range(source, client)
        job = PredictJob(model, tiling, tta, isbi, low, high, cluster_threads_per_worker(client), bool(offsets))
        done = set(markers.done())
        if affinity_markers is not None:
            done &= set(affinity_markers.done())
        todo = [b for b in blocks if b.name not in done]
        futures = {
            client.submit(
                predict_block,
                job,
                source,
                b,
                None if client_writes else output,
                None if client_writes else _BothMarkers(markers, affinity_markers),
                None if client_writes else affinities,
                pure=False,
                key=f"predict-{b.name}-{time.time()}",
            ): b
            for b in todo
        }

        def written(b: Block, result) -> None:
            if client_writes:
                write_block(b, result, output, affinities)
                _BothMarkers(markers, affinity_markers).mark(b.name)

        with tqdm(
            total=len(blocks), initial=len(blocks) - len(todo), unit="block", desc="predicting", disable=not progress
        ) as bar:
            gather_in_any_order(client, futures, written, bar)
    return output_address
