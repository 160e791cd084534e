"""The one way em-unet writes an image-like output: open an address, write slices or regions, finish.

Every command writes through :func:`open_output` (``predict``, ``segment``, and blockwise work on chunked
volumes), so each output is complete or absent:

- **TIFF stacks** (``OUT.tif``, ``OUT.tiff``) are written slice by slice, in order, to a temporary file
  beside the target and renamed into place when the block ends without error; an earlier file is kept
  until then. A JSON ``sidecar`` (``OUT.json``: parameters, inputs) is written with it, both or neither.
  They open in Fiji (ImageJ hyperstacks where the type allows).
- **Chunked volumes** (``OUT.zarr``, ``OUT.ome.zarr``, ``OUT.h5:/KEY``, see :mod:`em_unet.io.volumes`)
  are written by region, from any process for Zarr. With a ``record`` (the settings of the run), an
  unfinished output has :class:`ResumeMarkers` beside it: the record and a done marker per finished
  piece, so the same command resumes it and a run with other settings is refused; the markers go when
  the output is complete. A start that fails before any piece is done leaves nothing behind.

A new output format is one writer here plus its address pattern in :func:`output_kind`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from em_unet.errors import EmUnetError, warn
from em_unet.io.files import atomic_output, check_free_space, check_writable, exclusive, free_space, human_size
from em_unet.io.volumes import Volume, create_volume, is_volume_address, open_volume, parse_address

MARKERS = ".em-unet"  # suffix of the folder of an unfinished chunked output's record and done markers
IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)  # ImageJ hyperstacks hold no other type


def output_kind(address: str | Path) -> str:
    """``"volume"`` for a chunked-volume address (``OUT.zarr``, ``OUT.ome.zarr``, ``OUT.h5:/KEY``), else
    ``"tiff"``: any other path is written as a TIFF stack."""
    return "volume" if is_volume_address(address) else "tiff"


def sidecar_path(path: str | Path) -> Path:
    """Where a TIFF output's JSON sidecar goes: beside it, ``OUT.json``."""
    return Path(path).with_suffix(".json")


def check_output(address: str | Path, overwrite: bool = False, sidecar: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written; create nothing.

    A TIFF (and its sidecar) must be writable and new unless ``overwrite``; a chunked volume is
    checked by :func:`volume_output` (its record decides whether an existing one is resumed)."""
    if output_kind(address) == "tiff":
        check_writable(address, overwrite)
        if sidecar:
            check_writable(sidecar_path(address), overwrite)


def check_output_space(address: str | Path, shape: tuple[int, ...], dtype: Any) -> None:
    """Before long work: refuse a TIFF output (uncompressed) whose folder has less free space than its size;
    for a chunked output, compressed so that its size on disk is uncertain, warn when the folder has less
    than its uncompressed size."""
    needed = int(np.prod(shape)) * np.dtype(dtype).itemsize
    what = f"{address} ({' x '.join(str(n) for n in shape)} voxels of {np.dtype(dtype)})"
    if output_kind(address) == "tiff":
        check_free_space(address, needed + (64 << 10), what)  # + the TIFF's headers and the sidecar
        return
    folder, free = free_space(parse_address(address).path)
    if free < needed:
        warn(f"{folder}: {human_size(free)} free, and {what} takes {human_size(needed)} uncompressed: it may not fit")


# ---------------------------------------------------------------- TIFF stacks


class TiffStackWriter:
    """Slices of one TIFF stack, written in order (see :func:`open_output`)."""

    def __init__(self, tiff: tifffile.TiffWriter, path: Path, dtype: np.dtype | None, software: str | None):
        self._tiff, self.path, self.dtype, self._software = tiff, path, dtype, software
        self.slices, self.slice_shape = 0, None

    def write(self, values: np.ndarray) -> None:
        """Append one ``(y, x)`` slice (or a ``(z, y, x)`` run of slices) in ``dtype``."""
        values = np.asarray(values, self.dtype) if self.dtype is not None else np.asarray(values)
        for section in values.reshape(-1, *values.shape[-2:]):
            self._tiff.write(section, contiguous=True, software=self._software)
            self.slices, self.slice_shape = self.slices + 1, section.shape

    def name_slices(self, path: Path) -> None:
        """Make the finished ImageJ stack at ``path`` a stack of slices: tifffile's header for pages written one by
        one names them channels, which Fiji would show on a channel slider."""
        if self.slices > 1:
            tifffile.tiffcomment(
                path, comment=tifffile.imagej_description((self.slices, *self.slice_shape), axes="ZYX")
            )


class TiffChannelsWriter:
    """Slices ``(c, y, x)`` of a multi-channel TIFF stack (an affinity map), gathered and written as one ImageJ
    hyperstack ``(z, c, y, x)`` when the output is finished (ImageJ's hyperstack header must know the shape), with
    ``attributes`` as JSON in its Info (Fiji: Image > Show Info) and the channel names as its labels. Memory
    holds the whole stack: write large affinity maps as chunked volumes."""

    def __init__(self, path: Path, dtype: np.dtype, attributes: dict, channel_names: list[str]):
        self.path, self.dtype, self.attributes, self.channel_names = path, dtype, attributes, channel_names
        self.sections: list[np.ndarray] = []

    def write(self, values: np.ndarray) -> None:
        """Append one ``(c, y, x)`` slice (or a ``(z, c, y, x)`` run of slices)."""
        values = np.asarray(values, self.dtype)
        self.sections.extend(values.reshape(-1, *values.shape[-3:]))

    def finish(self, tiff: tifffile.TiffWriter, software: str | None) -> None:
        stack = np.stack(self.sections)
        metadata = {"axes": "ZCYX", "Info": json.dumps(self.attributes), "Labels": self.channel_names * len(stack)}
        tiff.write(stack, metadata=metadata, software=software)


# ---------------------------------------------------------------- chunked volumes and their resume markers


class ResumeMarkers:
    """The record and done markers of an unfinished chunked output, in a folder beside it
    (``OUT.zarr.em-unet``, ``OUT.h5.em-unet-KEY``). Markers are written atomically (a temporary name, then a
    rename), so a piece cut off mid-write is done again; a marker may carry a short text value."""

    def __init__(self, output_address: str):
        address = parse_address(output_address)
        suffix = MARKERS + (f"-{address.key.strip('/').replace('/', '-')}" if address.key else "")
        self.folder = address.path.with_name(address.path.name + suffix)
        self.record_path = self.folder / "run.json"
        self.log_path = self.folder / "workers.log"  # the Dask workers' log lines (em_unet.cluster.dask_client)

    def recorded(self) -> dict | None:
        """The settings an unfinished run recorded, or None."""
        return json.loads(self.record_path.read_text()) if self.record_path.is_file() else None

    def start(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.record_path.write_text(json.dumps(record, indent=2))

    def mark(self, name: str, value: str = "") -> None:
        """Record the piece ``name`` as done (with ``value``)."""
        partial = self.folder / f".{name}.partial"
        partial.write_text(value)
        os.replace(partial, self.folder / name)

    def done(self) -> dict[str, str]:
        """The done pieces' names and values."""
        if not self.folder.is_dir():
            return {}
        return {
            p.name: p.read_text()
            for p in self.folder.iterdir()
            if p.is_file() and p.name[0] != "." and p not in (self.record_path, self.log_path)
        }

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _changed(record: dict, earlier: dict) -> list[str]:
    """The keys whose values differ between a new ``record`` and an ``earlier`` one read from JSON."""
    as_json = json.loads(json.dumps(record))
    return [key for key in sorted(set(as_json) | set(earlier)) if as_json.get(key) != earlier.get(key)]


def check_volume_output(address: str, record: dict, overwrite: bool = False) -> ResumeMarkers:
    """Refuse, before any work: a run with other settings to resume, or an existing array without
    ``overwrite``; create nothing."""
    markers = ResumeMarkers(address)
    if overwrite:
        return markers
    earlier = markers.recorded()
    if earlier is not None:
        changed = _changed(record, earlier)
        if changed:
            raise EmUnetError(
                f"{address} holds the unfinished output of a run with other settings ({', '.join(changed)}): "
                "pass --overwrite to start anew, or repeat the earlier command"
            )
        return markers
    location = parse_address(address)
    if location.kind != "hdf5" and (location.path / (location.key or "")).exists():
        raise EmUnetError(f"{address} already exists: choose another output or pass --overwrite")
    return markers


@contextlib.contextmanager
def volume_output(
    address: str,
    shape: tuple[int, int, int],
    dtype: Any,
    chunks: tuple[int, int, int],
    record: dict,
    overwrite: bool = False,
    pieces: tuple[int, str] = (0, "pieces"),
    channels: int = 0,
    attributes: dict | None = None,
) -> Iterator[tuple[Volume, ResumeMarkers]]:
    """A chunked output and its :class:`ResumeMarkers`: new, or the one an unfinished run of the same
    ``record`` left (resumed), held under the output's lock (:func:`~em_unet.io.files.exclusive`).

    While the block runs, the array is marked unfinished in its metadata (:meth:`Volume.mark_unfinished`),
    so no em-unet command reads it as a result. When the block ends without error the mark and the markers
    go (the output is complete). When it fails before any piece is marked done, the output and markers this
    call created go too; after that, the error gets a note (``__notes__``) saying how many of ``pieces``
    (count, unit) are done, that the same command resumes, and where the workers' log is. ``channels`` > 0
    makes a ``(c, z, y, x)`` volume (see :func:`~em_unet.io.volumes.create_volume`), ``attributes`` go into
    the array's attributes."""
    path = parse_address(address).path
    full_shape = ((channels,) if channels else ()) + tuple(shape)
    with exclusive(path, "this output"):
        markers = check_volume_output(address, record, overwrite)
        check_output_space(address, full_shape, dtype)
        existed = path.exists()
        try:
            if markers.recorded() is not None and not overwrite:
                volume = open_volume(address, mode="r+", channels=bool(channels))
                if tuple(volume.shape) != full_shape:
                    raise EmUnetError(f"{address}: shape {volume.shape} differs from the input's {full_shape}")
            else:
                markers.remove()
                volume = create_volume(
                    address, shape, dtype, chunks, overwrite=overwrite, channels=channels, attributes=attributes
                )
                markers.start(record)
            volume.mark_unfinished(
                f"written by {record.get('command', 'em-unet')}, which has not finished; rerun that command to "
                f"finish it (its settings are in {markers.record_path})"
            )
            yield volume, markers
        except BaseException as err:
            done = markers.done()
            if not existed and not done:
                markers.remove()
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            elif done:
                count, unit = pieces
                note = f"{address} is unfinished: {len(done)} of {count or '?'} {unit} done; "
                note += "rerun the same command to resume"
                if markers.log_path.is_file() and markers.log_path.stat().st_size:
                    note += f" (the workers' log: {markers.log_path})"
                err.__notes__ = [*getattr(err, "__notes__", []), note]
            raise
        volume.mark_unfinished(None)
        markers.remove()


# ---------------------------------------------------------------- the one entry point


@contextlib.contextmanager
def open_output(
    address: str | Path,
    *,
    shape: tuple[int, int, int] | None = None,
    dtype: Any = None,
    chunks: tuple[int, int, int] | None = None,
    record: dict | None = None,
    sidecar: dict | None = None,
    software: str | None = None,
    overwrite: bool = False,
    pieces: tuple[int, str] = (0, "pieces"),
    channels: int = 0,
    attributes: dict | None = None,
    channel_names: list[str] | None = None,
) -> Iterator[TiffStackWriter | TiffChannelsWriter | tuple[Volume, ResumeMarkers]]:
    """Open an output at ``address`` for writing; it is complete when the block ends without error.

    TIFF: yields a :class:`TiffStackWriter` (slices in order, converted to ``dtype``; ``sidecar`` written
    as ``OUT.json`` beside it; ``software`` in the TIFF's Software tag). Chunked volume: yields the
    volume and its :class:`ResumeMarkers` (``shape``, ``dtype``, ``chunks`` and ``record`` required;
    ``pieces``: how many pieces the run marks done, and their unit; see :func:`volume_output`).
    ``channels`` > 0: a multi-channel output (an affinity map) with ``attributes`` (JSON-like) recorded in it:
    a :class:`TiffChannelsWriter` (``channel_names`` label its channels) or a ``(c, z, y, x)`` volume.
    Either way the output is locked against other processes while the block runs.
    """
    if output_kind(address) == "volume":
        if shape is None or dtype is None or chunks is None or record is None:
            raise ValueError("a chunked output needs shape, dtype, chunks and record")
        with volume_output(
            str(address), shape, dtype, chunks, record, overwrite, pieces, channels, attributes
        ) as opened:
            yield opened
        return
    path = Path(address)
    dtype = np.dtype(dtype) if dtype is not None else None
    imagej = dtype is None or dtype in IMAGEJ_DTYPES
    with contextlib.ExitStack() as stack:
        stack.enter_context(exclusive(path, "this output"))
        json_tmp = stack.enter_context(atomic_output(sidecar_path(path), overwrite)) if sidecar is not None else None
        tiff_tmp = stack.enter_context(atomic_output(path, overwrite))
        with tifffile.TiffWriter(tiff_tmp, imagej=imagej) as tiff:
            if channels:
                writer = TiffChannelsWriter(path, dtype or np.dtype(np.float32), attributes or {}, channel_names or [])
                yield writer
                writer.finish(tiff, software)
            else:
                writer = TiffStackWriter(tiff, path, dtype, software)
                yield writer
        if imagej and not channels:
            writer.name_slices(tiff_tmp)
        if json_tmp is not None:
            json_tmp.write_text(json.dumps(sidecar, indent=2))
