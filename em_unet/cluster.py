"""Blocks of a chunked volume and the ``dask.distributed`` cluster that works on them (blockwise prediction
and segmentation share both). Bottom layer: imports nothing of em-unet above :mod:`em_unet.errors` and
:mod:`em_unet.machine`, and never TensorFlow."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s [process %(process)d] %(message)s"


@contextlib.contextmanager
def dask_client(scheduler: str | None, workers: int, log_file: Path | None = None) -> Iterator:
    """A ``dask.distributed`` client: of the cluster at ``scheduler`` (an address), or of a LocalCluster
    with ``workers`` worker processes, one thread each.

    With ``log_file``, the workers' log lines (a failed task's traceback among them) and the local
    scheduler's warnings go to that file; a LocalCluster then prints nothing on stderr, so a failure reaches
    the user as the one-line error the client raises. Workers of a remote cluster also write there when
    they see the file's folder (a shared file system), and keep their own logging."""
    # lazy: Dask's distributed scheduler starts only for chunked volumes
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if log_file is not None:
            stack.enter_context(_log_to_file(log_file))
        if scheduler:
            try:
                client = Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
            except (OSError, TimeoutError) as err:
                raise EmUnetError(f"--scheduler {scheduler}: no Dask scheduler answers there ({err})") from None
            stack.callback(client.close)
        else:
            quiet = logging.CRITICAL if log_file is not None else logging.ERROR
            with _workers_ignore_ctrl_c():
                cluster = stack.enter_context(
                    LocalCluster(
                        n_workers=workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=None,
                        silence_logs=quiet,
                    )
                )
            client = stack.enter_context(Client(cluster))
        if log_file is not None:
            client.register_plugin(_worker_log_plugin(str(log_file)), name="em-unet-log")
        yield client


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Start worker processes with Ctrl-C (SIGINT) ignored, as Python then leaves it at start-up: Ctrl-C
    reaches the whole process group, and this process alone should answer it (by closing the cluster),
    rather than each worker printing its own KeyboardInterrupt traceback."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _log_to_file(log_file: Path) -> Iterator[None]:
    """This process's Dask warnings (scheduler, nannies) also go to ``log_file`` while the block runs."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = _file_handler(log_file)
    logger = logging.getLogger("distributed")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def _file_handler(log_file: str | Path) -> logging.FileHandler:
    """A handler that appends Dask's warnings and errors to ``log_file`` (from the client and every worker)."""
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


def _worker_log_plugin(log_file: str):
    """A worker plugin that sends each worker's ``distributed`` log lines to ``log_file`` (defined here, not
    at the top, because its base class would import Dask's distributed scheduler with this module)."""
    from distributed import WorkerPlugin  # lazy: see dask_client

    class LogToFile(WorkerPlugin):
        def setup(self, worker):
            if not Path(log_file).parent.is_dir():  # a remote worker without the shared folder
                return
            self.handler = _file_handler(log_file)
            logger = logging.getLogger("distributed")
            logger.addHandler(self.handler)
            if logger.getEffectiveLevel() > logging.WARNING:  # a silenced LocalCluster worker: stderr stays quiet
                logger.setLevel(logging.WARNING)

        def teardown(self, worker):
            handler = getattr(self, "handler", None)
            if handler is not None:
                logging.getLogger("distributed").removeHandler(handler)
                handler.close()

    return LogToFile()


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
