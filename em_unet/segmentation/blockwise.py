"""Segmentation of chunked membrane-probability volumes, or affinity volumes ``(c, z, y, x)``, slice by slice on
a Dask cluster, without TensorFlow (workers import only NumPy, scikit-image, mwatershed and the volume libraries).

Pass 1 segments each slice into local labels 1..k (:func:`~em_unet.segmentation.watershed.segment_slice`, or
:func:`~em_unet.segmentation.affinities.mutex_watershed` for affinities),
kept in a scratch volume beside the output; pass 2 shifts them to be unique across the volume
(:func:`~em_unet.segmentation.labels.label_offsets`), so the result equals
:func:`~em_unet.segmentation.watershed.segment_stack` in memory. Both passes are resumable through the
output's resume markers (:mod:`em_unet.io.writers`).
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from em_unet.cluster import dask_client, gather_in_any_order
from em_unet.errors import DataError, EmUnetError
from em_unet.io.volumes import create_volume, open_volume
from em_unet.io.writers import ResumeMarkers, open_output
from em_unet.machine import cpu_cores
from em_unet.segmentation.affinities import (
    MUTEX_HINT,
    MutexParams,
    check_affinities,
    mutex_watershed,
    resolve_offsets,
)
from em_unet.segmentation.labels import label_offsets
from em_unet.segmentation.metrics import as_probability
from em_unet.segmentation.offsets import Offsets, offsets_from_attributes, offsets_text
from em_unet.segmentation.watershed import SEED_HINT, SegmentParams, segment_slice, warn_single_segments

SLICE_CHUNK_PX = 512  # y and x chunk side of label outputs (one slice deep)


def _segment_slice_task(
    source, z: int, scratch, markers: ResumeMarkers, params: SegmentParams | MutexParams, offsets: Offsets = ()
) -> int:
    """Pass 1 on a worker: segment slice ``z`` into local labels 1..k (kept in ``scratch``); returns k. With
    ``offsets``, ``source`` is an affinity volume ``(c, z, y, x)``."""
    if offsets:
        affinities = source[:, z]
        try:
            check_affinities(affinities, offsets, source.address)
        except DataError as err:
            raise DataError(f"{err} (slice {z})") from None
        local = mutex_watershed(affinities, offsets, params)
    else:
        probability = as_probability(source[z : z + 1], source.address, first_slice=z)[0]
        local = segment_slice(probability, params)
    scratch[z : z + 1] = local[None].astype(np.uint32)
    count = int(local.max())
    markers.mark(f"local-{z}", str(count))
    return count


def _offset_slice_task(scratch, output, z: int, offset: int, markers: ResumeMarkers) -> None:
    """Pass 2 on a worker: slice ``z``'s labels made unique across the volume (idempotent: from ``scratch``)."""
    output[z : z + 1] = scratch[z : z + 1].astype(output.dtype) + offset
    markers.mark(f"labels-{z}")


def segment_volume(
    probability_address: str,
    output_address: str,
    params: SegmentParams | MutexParams = SegmentParams(),
    key: str | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    offsets: Offsets | None = None,
) -> str:
    """Neuron labels of a chunked membrane-probability volume, each slice segmented in 2-D on the cluster
    (as :func:`~em_unet.segmentation.watershed.segment_stack` does in memory) and labels unique across the
    volume (slice z's follow slice z-1's), into a uint32 chunked output. Resumes an interrupted run.

    With :class:`~em_unet.segmentation.affinities.MutexParams`, the input is an affinity volume ``(c, z, y, x)``
    (from ``predict --affinities``) segmented by the mutex watershed, as
    :func:`~em_unet.segmentation.affinities.segment_affinity_stack` does in memory; its offsets are those it
    records, or ``offsets`` (see :func:`~em_unet.segmentation.affinities.resolve_offsets`)."""
    mutex = isinstance(params, MutexParams)
    source = open_volume(probability_address, key=key, channels=mutex)
    if mutex:
        if source.ndim != 4:
            raise DataError(f"{source.address}: an affinity volume is (c, z, y, x), found shape {source.shape}")
        offsets = resolve_offsets(offsets_from_attributes(source.attributes), offsets, source.address)
        if source.shape[0] != len(offsets):
            raise DataError(
                f"{source.address}: {source.shape[0]} affinity channels but {len(offsets)} offsets "
                f"({offsets_text(offsets)}): give one offset per channel"
            )
        if not np.issubdtype(source.dtype, np.floating):
            raise DataError(f"{source.address}: affinities must be float values in [0, 1], found {source.dtype}")
    elif not (np.issubdtype(source.dtype, np.floating) or source.dtype in (np.uint8, np.uint16)):
        raise DataError(f"{source.address}: a probability map must be 8-bit, 16-bit or float, found {source.dtype}")
    shape = source.shape[-3:]
    _, height, width = shape
    chunks = (1, min(height, SLICE_CHUNK_PX), min(width, SLICE_CHUNK_PX))
    record = {
        "command": "em-unet segment",
        "probability": str(probability_address),
        "key": key,
        "segment": params.to_dict(),
        **({"offsets": [list(o) for o in offsets]} if mutex else {}),
    }
    opened = open_output(
        output_address,
        shape=shape,
        dtype=np.uint32,
        chunks=chunks,
        record=record,
        overwrite=overwrite,
        pieces=(2 * shape[0], "slice steps (2 per slice)"),
    )
    with opened as (output, markers):
        scratch_address = str(markers.folder / "local.zarr")
        try:
            scratch = open_volume(scratch_address, mode="r+")
        except EmUnetError:
            scratch = create_volume(scratch_address, shape, np.uint32, chunks)
        work = (params, tuple(offsets) if mutex else ())
        _segment_on_cluster(source, output, scratch, markers, work, scheduler, workers or cpu_cores(), progress)
    return output_address


def _segment_on_cluster(source, output, scratch, markers: ResumeMarkers, work, scheduler, workers, progress) -> None:
    """Pass 1 (local labels and their counts) and pass 2 (labels offset to be unique), each resumable; ``work``:
    the parameters and the affinity offsets (none for a membrane map)."""
    n = output.shape[0]
    done = markers.done()
    counts = {z: int(done[f"local-{z}"]) for z in range(n) if f"local-{z}" in done}
    relabelled = {z for z in range(n) if f"labels-{z}" in done}
    with (
        dask_client(scheduler, workers, log_file=markers.log_path) as client,
        tqdm(
            total=2 * n, initial=len(counts) + len(relabelled), unit="slice", desc="segmenting", disable=not progress
        ) as bar,
    ):
        futures = {
            client.submit(_segment_slice_task, source, z, scratch, markers, *work, pure=False): z
            for z in range(n)
            if z not in counts
        }
        gather_in_any_order(client, futures, counts.__setitem__, bar)
        hint = MUTEX_HINT if work[1] else SEED_HINT
        warn_single_segments([counts[z] for z in range(n)], source.address, hint)
        offsets = label_offsets([counts[z] for z in range(n)], str(output.address))
        futures = {
            client.submit(_offset_slice_task, scratch, output, z, int(offsets[z]), markers, pure=False): z
            for z in range(n)
            if z not in relabelled
        }
        gather_in_any_order(client, futures, lambda z, result: None, bar)
