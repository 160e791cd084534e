"""Blocks of a chunked volume and the ``dask.distributed`` cluster that works on them (blockwise prediction
and segmentation share both). Bottom layer: imports nothing of em-unet above :mod:`em_unet.errors` and
:mod:`em_unet.machine`, and never TensorFlow."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from em_unet.errors import EmUnetError
from em_unet.machine import threads_per_worker

SCHEDULER_TIMEOUT_S = 30.0  # how long to wait for a --scheduler to answer


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


@contextlib.contextmanager
def dask_client(scheduler: str | None, workers: int) -> Iterator:
    """A ``dask.distributed`` client: of the cluster at ``scheduler`` (an address), or of a LocalCluster
    with ``workers`` worker processes, one thread each."""
    # lazy: Dask's distributed scheduler starts only for chunked volumes
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
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def cluster_threads_per_worker(client) -> int:
    """CPU threads for each worker's numeric libraries: the machine's cores shared among the local workers."""
    return threads_per_worker(len(client.scheduler_info().get("workers", {})))


def gather_in_any_order(client, futures: dict, on_result, bar) -> None:
    """Wait for ``futures`` (future -> what it works on), calling ``on_result(item, result)`` and advancing the
    progress ``bar`` as each finishes; on any failure or interrupt the rest are cancelled and the error raised."""
    from distributed import as_completed  # lazy: see dask_client

    try:
        for future in as_completed(futures):
            on_result(futures[future], future.result())
            bar.update(1)
    except BaseException:
        client.cancel(list(futures))
        raise
