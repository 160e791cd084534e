"""Prediction and segmentation of chunked volumes (HDF5, Zarr, OME-Zarr), block by block, on Dask.

A volume is cut into blocks that match the output's chunks: ``(z, block, block)`` voxels, ``z`` the
input's chunk depth. Each block is a task on a ``dask.distributed`` cluster (a LocalCluster with one
worker process per core, or per GPU, by default; any running cluster by its address). A worker loads
the model once and, for each slice of its block, predicts the block's part of the slice from the tiles
of the slice's own tile grid that reach into it (:func:`em_unet.inference.predict.predict_regions`), reading only
that window of the input (mirror-padded at the volume's edges). So the result equals the prediction of
the whole slice in memory, whatever the blocks, and a worker's memory is set by the block and tile size,
not by the volume.

Zarr outputs are written by the workers, each block into its own chunks; HDF5 outputs, which take one
writer at a time, by the client as blocks come back. After a block's data is written, a marker file
records it as done (in ``<output>.em-unet/`` beside the output, removed once it is complete), so re-running
the same command after a kill predicts only the blocks not yet done, and a block cut off mid-write is
predicted again. The record ``run.json`` there holds the settings, and a re-run with other settings is
refused rather than mixed in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from em_unet.config import PredictConfig, check_prediction_settings
from em_unet.errors import DataError, EmUnetError
from em_unet.inference.predict import TILE_MULTIPLE
from em_unet.io.stacks import scale_to_unit, volume_intensity_range
from em_unet.machine import cpu_cores, threads_per_worker

DEFAULT_BLOCK_PX = 512  # block side (pixels) when the input's chunks do not suggest one
MARKERS = ".em-unet"  # the folder of done markers and run.json
SCHEDULER_TIMEOUT_S = 30.0  # how long to wait for a --scheduler to answer


# ---------------------------------------------------------------- blocks and markers


@dataclass(frozen=True)
class Block:
    """Voxels z0:z1, y0:y1, x0:x1 of a volume."""

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def name(self) -> str:
        return f"{self.z0}-{self.y0}-{self.x0}"

    @property
    def index(self) -> tuple[slice, slice, slice]:
        return slice(self.z0, self.z1), slice(self.y0, self.y1), slice(self.x0, self.x1)


def plan_blocks(shape: tuple[int, int, int], block_shape: tuple[int, int, int]) -> list[Block]:
    """The blocks that tile a volume of ``shape`` (z, y, x voxels), row by row, slice by slice."""
    bz, by, bx = block_shape
    return [
        Block(z, min(z + bz, shape[0]), y, min(y + by, shape[1]), x, min(x + bx, shape[2]))
        for z in range(0, shape[0], bz)
        for y in range(0, shape[1], by)
        for x in range(0, shape[2], bx)
    ]


def marker_folder(output_address: str) -> Path:
    """Where an unfinished output's done markers live: a folder beside it (``OUT.zarr.em-unet``), removed
    when the output is complete."""
    from em_unet.io.volumes import parse_address

    address = parse_address(output_address)
    suffix = MARKERS + (f"-{address.key.strip('/').replace('/', '-')}" if address.key else "")
    return address.path.with_name(address.path.name + suffix)


def _mark_done(folder: Path, block: Block) -> None:
    partial = folder / f".{block.name}.partial"
    partial.write_text("")
    os.replace(partial, folder / block.name)


def done_blocks(folder: Path, blocks: list[Block]) -> set[str]:
    """The names of the blocks whose markers exist."""
    if not folder.is_dir():
        return set()
    present = {p.name for p in folder.iterdir()}
    return {b.name for b in blocks if b.name in present}


@contextlib.contextmanager
def _removed_if_nothing_done(output_address: str, markers: Path) -> Iterator[None]:
    """If the block fails before any block (or slice) is done, remove the output and markers this run
    created, so a refused or failed start leaves nothing behind; once work is done it stays, to resume."""
    from em_unet.io.volumes import parse_address

    path = parse_address(output_address).path
    existed = path.exists()
    try:
        yield
    except BaseException:
        done = markers.is_dir() and any(p.name[0].isdigit() or p.name.startswith("local-") for p in markers.iterdir())
        if not existed and not done:
            shutil.rmtree(markers, ignore_errors=True)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- the work of one block


@dataclass(frozen=True)
class PredictJob:
    """Everything a worker needs for the blocks of one prediction (pickled to the workers)."""

    model: str
    tile: int | None
    margin: int
    overlap: int
    tile_batch: int
    tta: bool
    isbi: bool
    low: float
    high: float
    threads: int


_PREDICTORS: dict[str, object] = {}


def worker_predictor(model: str, threads: int = 0):
    """The model's predictor in this process, loaded once (a worker keeps it for all its blocks).

    On a machine with GPUs, worker ``i`` of a LocalCluster uses GPU ``i`` (modulo their number)."""
    if model not in _PREDICTORS:
        import tensorflow as tf

        from em_unet.inference.predict import load_predictor

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
    try:
        from distributed import get_worker

        name = get_worker().name
        return int(name) if str(name).isdigit() else 0
    except (ImportError, ValueError):
        return 0


def predict_block(job: PredictJob, source, block: Block, output=None, markers: str | None = None) -> np.ndarray | None:
    """Predict ``block`` of the volume ``source``; write it into ``output`` and mark it done when given
    (Zarr), else return it (the client writes HDF5)."""
    from em_unet.inference.predict import predict_regions, tile_grid

    predictor = worker_predictor(job.model, job.threads)
    _, height, width = source.shape
    grid = tile_grid(height, width, job.tile, job.margin, job.overlap)
    rows, cols = grid.padded_index(0), grid.padded_index(1)

    def reader(z):
        def read_padded(r0, r1, c0, c1):
            row_index, col_index = rows[r0:r1], cols[c0:c1]
            window = source[z, row_index.min() : row_index.max() + 1, col_index.min() : col_index.max() + 1]
            window = window[np.ix_(row_index - row_index.min(), col_index - col_index.min())]
            return scale_to_unit(window, job.low, job.high)

        return read_padded

    region = (block.y0, block.y1, block.x0, block.x1)
    regions = ((reader(z), grid, region) for z in range(block.z0, block.z1))
    result = np.stack(list(predict_regions(predictor, regions, job.tile_batch, job.tta)))
    if job.isbi:
        result = 1.0 - result
    if output is None:
        return result
    output[block.index] = result
    _mark_done(Path(markers), block)
    return None


# ---------------------------------------------------------------- the cluster


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None) -> Iterator:
    """A ``dask.distributed`` client: of the cluster at ``scheduler`` (an address), or of a LocalCluster
    with ``workers`` worker processes (default: one per GPU, else one per core), one thread each."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
        except (OSError, TimeoutError) as err:
            raise EmUnetError(f"--scheduler {scheduler}: no Dask scheduler answers there ({err})") from None
        try:
            yield client
        finally:
            client.close()
        return
    count = workers or _local_worker_count()
    with (
        LocalCluster(
            n_workers=count, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _local_worker_count() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU")) or cpu_cores()


def _threads_per_worker(client) -> int:
    """CPU threads for each worker's TensorFlow: the machine's cores shared among the local workers."""
    return threads_per_worker(len(client.scheduler_info().get("workers", {})))


# ---------------------------------------------------------------- predicting a volume


def predict_volume(
    model_path: str | Path,
    input_address: str,
    output_address: str,
    key: str | None = None,
    tile: int | None = PredictConfig.tile,
    margin: int = PredictConfig.margin,
    overlap: int = PredictConfig.overlap,
    tile_batch: int = PredictConfig.tile_batch,
    tta: bool = PredictConfig.tta,
    isbi: bool = False,
    block: int | None = PredictConfig.block,
    scheduler: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Predict a chunked volume block by block on a Dask cluster into a float32 chunked output (Zarr /
    OME-Zarr or HDF5); resumes an interrupted run of the same command. Returns the output address.

    ``block``: block side in pixels (default: the input's chunk side, else 512); ``key``: the input's
    array inside its file or store. With ``tile`` None each block is one tile (the block plus its margins and
    overlap, rounded up to a multiple of 32 px): with ``overlap`` 0 no pixel is then predicted twice, while an
    overlap makes each block also predict the neighbouring tiles whose blending reaches into it.
    See the module docstring for the rest."""
    from tqdm import tqdm

    from em_unet.inference.predict import resolve_model_path
    from em_unet.io.volumes import open_volume, parse_address

    check_prediction_settings(tile, margin, overlap, tile_batch)
    model = str(resolve_model_path(model_path))
    source = open_volume(input_address, key=key)
    target = parse_address(output_address)
    _, height, width = source.shape
    chunk_z, chunk_y, chunk_x = source.chunks
    if block and (block % chunk_y or block % chunk_x) and (block < height or block < width):
        raise EmUnetError(
            f"--block {block} px does not divide into the input's chunks of {chunk_y} x {chunk_x} px: "
            f"choose a multiple of {max(chunk_y, chunk_x)} px, so each block reads whole chunks"
        )
    side = block or (min(chunk_y, chunk_x) if min(chunk_y, chunk_x) >= 64 else DEFAULT_BLOCK_PX)
    if tile is None:  # one tile per block: its output (without margins) is the block, so none is predicted twice
        tile = -(-(side + 2 * margin + overlap) // TILE_MULTIPLE) * TILE_MULTIPLE
        side = side if block else tile - 2 * margin - overlap
    block_shape = (chunk_z, min(side, height), min(side, width))
    blocks = plan_blocks(source.shape, block_shape)
    markers = marker_folder(output_address)
    record = {
        "model": model,
        "input": str(input_address),
        "key": key,
        "block": list(block_shape),
        "tile": tile,
        "margin": margin,
        "overlap": overlap,
        "tta": tta,
        "isbi": isbi,
    }
    _check_output(output_address, markers, record, overwrite)  # refusals before a cluster starts
    with _removed_if_nothing_done(output_address, markers), dask_client(scheduler, workers) as client:
        output = _prepare_output(output_address, source.shape, block_shape, markers, record, overwrite)
        low, high = volume_intensity_range(source, client)
        job = PredictJob(model, tile, margin, overlap, tile_batch, tta, isbi, low, high, _threads_per_worker(client))
        done = done_blocks(markers, blocks)
        todo = [b for b in blocks if b.name not in done]
        client_writes = target.kind == "hdf5"
        futures = {
            client.submit(
                predict_block,
                job,
                source,
                b,
                None if client_writes else output,
                None if client_writes else str(markers),
                pure=False,
                key=f"predict-{b.name}-{time.time()}",
            ): b
            for b in todo
        }
        from distributed import as_completed

        with tqdm(total=len(blocks), initial=len(done), unit="block", desc="predicting", disable=not progress) as bar:
            try:
                for future in as_completed(futures):
                    result = future.result()
                    if client_writes:
                        output[futures[future].index] = result
                        _mark_done(markers, futures[future])
                    bar.update(1)
            except BaseException:
                client.cancel(list(futures))
                raise
    shutil.rmtree(markers, ignore_errors=True)  # complete: a re-run is refused like any existing output
    return output_address


def _check_output(address: str, markers: Path, record: dict, overwrite: bool) -> None:
    """Refuse, before any work: a run with other settings to resume, or an existing store without --overwrite."""
    from em_unet.io.volumes import parse_address

    recorded = markers / "run.json"
    if overwrite:
        return
    if recorded.is_file():
        earlier = json.loads(recorded.read_text())
        if earlier != json.loads(json.dumps(record)):
            changed = [k for k in record if earlier.get(k) != json.loads(json.dumps(record[k]))]
            raise EmUnetError(
                f"{address} holds blocks of a run with other settings ({', '.join(changed)}): "
                "pass --overwrite to start anew, or repeat the earlier command"
            )
        return
    location = parse_address(address)
    if location.kind != "hdf5" and (location.path / (location.key or "")).exists():
        raise EmUnetError(f"{address} already exists: choose another output or pass --overwrite")


def _prepare_output(address: str, shape, block_shape, markers: Path, record: dict, overwrite: bool):
    """The output volume, new or (with a matching record) the one an interrupted run left; refuses to mix."""
    from em_unet.io.volumes import create_volume, open_volume

    if (markers / "run.json").is_file() and not overwrite:  # checked by _check_output: resume
        output = open_volume(address, mode="r+")
        if tuple(output.shape) != tuple(shape):
            raise EmUnetError(f"{address}: shape {output.shape} differs from the input's {shape}")
        return output
    if overwrite:
        shutil.rmtree(markers, ignore_errors=True)
    output = create_volume(address, shape, np.float32, block_shape, overwrite=overwrite)
    markers.mkdir(parents=True, exist_ok=True)
    (markers / "run.json").write_text(json.dumps(record, indent=2))
    return output


# ---------------------------------------------------------------- segmenting a volume, slice by slice


def _segment_slice_task(source, z: int, scratch, markers: str, params) -> int:
    """Pass 1 on a worker: segment slice ``z`` into local labels 1..k (kept in ``scratch``); returns k."""
    from em_unet.segmentation.metrics import as_probability
    from em_unet.segmentation.watershed import segment_slice

    probability = as_probability(source[z : z + 1], f"{source.address} slice {z}")[0]
    local = segment_slice(probability, params)
    scratch[z : z + 1] = local[None].astype(np.uint32)
    count = int(local.max())
    partial = Path(markers) / f".local-{z}.partial"
    partial.write_text(str(count))
    os.replace(partial, Path(markers) / f"local-{z}")
    return count


def _offset_slice_task(scratch, output, z: int, offset: int, markers: str) -> None:
    """Pass 2 on a worker: slice ``z``'s labels made unique across the volume (idempotent: from ``scratch``)."""
    output[z : z + 1] = scratch[z : z + 1].astype(output.dtype) + offset
    partial = Path(markers) / f".labels-{z}.partial"
    partial.write_text("")
    os.replace(partial, Path(markers) / f"labels-{z}")


def segment_volume(
    probability_address: str,
    output_address: str,
    params=None,
    key: str | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Neuron labels of a chunked membrane-probability volume, each slice segmented in 2-D on the cluster
    (as :func:`em_unet.segmentation.watershed.segment_stack` does in memory) and labels unique across the volume
    (slice z's follow slice z-1's), into a uint32 chunked output. Resumes an interrupted run."""

    from em_unet.io.volumes import open_volume
    from em_unet.segmentation.watershed import SegmentParams

    params = params or SegmentParams()
    source = open_volume(probability_address, key=key)
    if not (np.issubdtype(source.dtype, np.floating) or source.dtype in (np.uint8, np.uint16)):
        raise DataError(f"{source.address}: a probability map must be 8-bit, 16-bit or float, found {source.dtype}")
    markers = marker_folder(output_address)
    _, height, width = source.shape
    chunks = (1, min(height, DEFAULT_BLOCK_PX), min(width, DEFAULT_BLOCK_PX))
    record = {"probability": str(probability_address), "key": key, "segment": params.to_dict()}
    with _removed_if_nothing_done(output_address, markers):
        output, scratch = _segment_outputs(output_address, source, chunks, markers, record, overwrite)
        _segment_on_cluster(source, output, scratch, markers, params, scheduler, workers, progress)
    shutil.rmtree(markers, ignore_errors=True)  # complete: the scratch labels and markers go
    return output_address


def _segment_outputs(output_address: str, source, chunks, markers: Path, record: dict, overwrite: bool):
    """The label output and the scratch volume of local labels: new, or those an interrupted run left."""
    from em_unet.io.volumes import create_volume, open_volume

    recorded = markers / "run.json"
    if recorded.is_file() and not overwrite:
        if json.loads(recorded.read_text()) != json.loads(json.dumps(record)):
            raise EmUnetError(
                f"{output_address} holds slices of a run with other settings: pass --overwrite to "
                "start anew, or repeat the earlier command"
            )
        output = open_volume(output_address, mode="r+")
    else:
        if overwrite:
            shutil.rmtree(markers, ignore_errors=True)
        output = create_volume(output_address, source.shape, np.uint32, chunks, overwrite=overwrite)
        markers.mkdir(parents=True, exist_ok=True)
        recorded.write_text(json.dumps(record, indent=2))
    scratch_address = str(markers / "local.zarr")
    try:
        scratch = open_volume(scratch_address, mode="r+")
    except EmUnetError:
        scratch = create_volume(scratch_address, source.shape, np.uint32, chunks)
    return output, scratch


def _segment_on_cluster(source, output, scratch, markers: Path, params, scheduler, workers, progress) -> None:
    """Pass 1 (local labels and their counts) and pass 2 (labels offset to be unique), each resumable."""
    from tqdm import tqdm

    n = source.shape[0]
    present = {p.name for p in markers.iterdir()}
    counts = {z: int((markers / f"local-{z}").read_text()) for z in range(n) if f"local-{z}" in present}
    with dask_client(scheduler, workers) as client:
        from distributed import as_completed

        with tqdm(total=2 * n, initial=len(counts), unit="slice", desc="segmenting", disable=not progress) as bar:
            futures = {
                client.submit(_segment_slice_task, source, z, scratch, str(markers), params, pure=False): z
                for z in range(n)
                if z not in counts
            }
            for future in as_completed(futures):
                counts[futures[future]] = future.result()
                bar.update(1)
            offsets = np.concatenate([[0], np.cumsum([counts[z] for z in range(n)])[:-1]])
            if offsets[-1] + counts[n - 1] >= 2**32:
                raise EmUnetError(f"{output.address}: more than 2**32 segments; segment fewer slices at a time")
            done = {z for z in range(n) if f"labels-{z}" in present}
            bar.update(len(done))
            futures = [
                client.submit(_offset_slice_task, scratch, output, z, int(offsets[z]), str(markers), pure=False)
                for z in range(n)
                if z not in done
            ]
            for future in as_completed(futures):
                future.result()
                bar.update(1)
