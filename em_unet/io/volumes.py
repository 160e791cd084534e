"""Chunked 3-D volumes ``(z, y, x)`` in HDF5, Zarr (v2 and v3) and OME-Zarr, read lazily and written by region.

A volume is named by an address:

- ``FILE.h5:/KEY``: the dataset at KEY in an HDF5 file (also ``.hdf5`` and ``.hdf``); KEY may be nested,
  ``vol.h5:/volumes/raw``. ``FILE.h5`` alone reads the file's only dataset.
- ``STORE.zarr/KEY``: the array at KEY inside a Zarr group; ``STORE.zarr`` alone when the store root is an
  array (or the store holds a single array). A KEY naming an OME-Zarr image group reads level 0 of that image.
- ``STORE.ome.zarr``: an OME-Zarr image, level 0 of its first multiscale; ``STORE.ome.zarr/1`` or ``level=1``
  for another level (levels count from 0, full resolution, in the order the metadata lists them).

A separate ``key`` argument (the ``--key`` flag) gives the key, or replaces the one in the address.
TIFF and PNG paths are not volume addresses: :mod:`em_unet.io.stacks` reads those.

Opening a volume reads metadata only; ``volume[z, y0:y1, x0:x1]`` reads only the chunks that region touches.
A stored 2-D array is one slice: shape ``(1, y, x)``. :func:`create_volume` writes ``.zarr`` and ``.ome.zarr``
outputs as an OME-Zarr image (a group holding the single level ``0`` and multiscales metadata for axes z, y, x,
so napari and Fiji/MoBIE open it), HDF5 outputs as a chunked dataset.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from em_unet.errors import DataError, DependencyError, EmUnetError
from em_unet.io.files import check_writable, new_folder

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
ZARR_FORMATS = (2, 3)
REAL_KINDS = "biuf"  # numpy dtype kinds of booleans, integers and floats
SHOWN_NAMES = 10  # keys listed in an error message before "..."
UNFINISHED_ATTR = "em_unet_unfinished"  # attribute of an output array whose run has not finished, see Volume
UNFINISHED_NAME = "UNFINISHED "  # prefix of an unfinished OME-Zarr image's name, which napari shows as the layer

# The leftmost store in an address: a path component ending in .zarr, or an HDF5 file name followed by
# ":KEY" or by nothing.
_STORE = re.compile(r"(\.ome)?\.zarr(?=/|$)|\.(?:h5|hdf5|hdf)(?=:|$)", re.IGNORECASE)


# ---------------------------------------------------------------- addresses


@dataclass(frozen=True)
class VolumeAddress:
    """Where a volume is: a file or store ``path``, the ``key`` inside it (None: the root), its ``kind``
    (``"hdf5"``, ``"zarr"`` or ``"ome-zarr"``) and the resolution ``level`` of a multiscale image."""

    path: Path
    key: str | None
    kind: str
    level: int = 0

    def __str__(self) -> str:
        if self.kind == "hdf5":
            text = f"{self.path}:/{self.key}" if self.key else str(self.path)
        else:
            text = f"{self.path}/{self.key}" if self.key else str(self.path)
        if self.level and self.key is None and self.kind == "ome-zarr":
            return f"{text}/{self.level}"
        return f"{text} level {self.level}" if self.level else text


def _split(address: str | Path) -> tuple[str, str | None, str] | None:
    """``(store path, key or None, kind)`` of an address, or None when it is not a volume address."""
    text = os.fspath(address)
    match = _STORE.search(text)
    if match is None:
        return None
    store, rest = text[: match.end()], text[match.end() :]
    if match.group(0).lower().endswith(HDF5_SUFFIXES):
        kind = "hdf5"
        rest = rest[1:]  # the ":"
    else:
        kind = "ome-zarr" if match.group(1) else "zarr"
    return store, _clean_key(rest), kind


def _clean_key(key: str | None) -> str | None:
    """A key without leading or trailing slashes; None for the root."""
    if key is None:
        return None
    key = re.sub(r"/+", "/", key).strip("/")
    return key or None


def is_volume_address(address: str | Path) -> bool:
    """True when ``address`` names a volume: an HDF5 file (``.h5``, ``.hdf5``, ``.hdf``, optionally with
    ``:/KEY``) or a Zarr store (``.zarr``, ``.ome.zarr``, optionally with ``/KEY``). Looks at the text only."""
    return _split(address) is not None


def parse_address(address: str | Path | VolumeAddress, key: str | None = None) -> VolumeAddress:
    """Split a volume address (see the module docstring) into file or store, key, kind and level.

    ``key``, when given, replaces the key in the address. A single number after an ``.ome.zarr`` store
    (``img.ome.zarr/1``) is a level, not a key. Looks at the text only; raises :class:`DataError` for a path
    that is not a volume address.
    """
    if isinstance(address, VolumeAddress):
        return address if key is None else replace(address, key=_clean_key(key), level=0)
    parts = _split(address)
    if parts is None:
        raise DataError(
            f"{address}: not a volume address: name an HDF5 dataset (vol.h5:/KEY), a Zarr array "
            "(store.zarr/KEY) or an OME-Zarr image (image.ome.zarr)"
        )
    store, path_key, kind = parts
    level = 0
    if kind == "ome-zarr" and path_key is not None and path_key.isdigit():
        path_key, level = None, int(path_key)
    if key is not None:
        path_key, level = _clean_key(key), 0
    return VolumeAddress(Path(store), path_key, kind, level)


# ---------------------------------------------------------------- indexing


def _selection(index: Any, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple, tuple[int, ...]]:
    """Turn a numpy basic index on ``shape`` into what a store can read.

    Returns the region to read (slices with positive steps; HDF5 refuses negative ones), the index
    that turns the region into numpy's result (drops the axes of integer indices, reverses negative
    steps) and the region's shape.
    """
    if not isinstance(index, tuple):
        index = (index,)
    ellipses = [i for i, item in enumerate(index) if item is Ellipsis]
    if len(ellipses) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if ellipses:
        at = ellipses[0]
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1 :]
    if len(index) > len(shape):
        raise IndexError(f"too many indices for a {len(shape)}-D volume: {len(index)} were given")
    index = index + (slice(None),) * (len(shape) - len(index))
    region, after, counts = [], [], []
    for axis, (item, size) in enumerate(zip(index, shape)):
        if isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_)):
            position = int(item) + size if item < 0 else int(item)
            if not 0 <= position < size:
                raise IndexError(f"index {int(item)} is out of bounds for axis {axis} with size {size}")
            region.append(slice(position, position + 1))
            after.append(0)
            counts.append(1)
        elif isinstance(item, slice):
            steps = range(*item.indices(size))
            counts.append(len(steps))
            if not steps:
                region.append(slice(0, 0))
                after.append(slice(None))
            elif steps.step > 0:
                region.append(slice(steps.start, steps[-1] + 1, steps.step))
                after.append(slice(None))
            else:
                region.append(slice(steps[-1], steps.start + 1, -steps.step))
                after.append(slice(None, None, -1))
        else:
            raise TypeError(
                f"volumes take integers, slices and '...' as indices (numpy basic indexing), not {type(item).__name__}"
            )
    return tuple(region), tuple(after), tuple(counts)


# ---------------------------------------------------------------- volumes


class Volume:
    """A 3-D volume ``(z, y, x)`` in an HDF5 file or a Zarr store, read (and written) region by region; or, opened
    or created with channels, a 4-D one ``(c, z, y, x)`` (an affinity map: a channel per offset).

    ``volume[index]`` takes numpy basic indexing (integers, slices, ``...``) and returns a numpy array read
    from the chunks the region touches. ``volume[index] = values`` writes, for volumes opened with
    ``mode="r+"`` (as :func:`create_volume` returns them). ``chunks`` is the storage unit, in voxels (z, y, x):
    blocks aligned to it read and write whole chunks; a contiguous HDF5 dataset reports one slice.

    A pickled volume holds only its address and mode and opens the store again when unpickled, so Dask can
    send it to worker processes. Zarr volumes can be written from many processes at once when each writes
    whole chunks; an HDF5 file can be open for writing in one process only.
    """

    address: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]

    def __init__(self, location: VolumeAddress, mode: str, address: str, array: Any, file: Any = None):
        """Wrap an opened, checked ``array`` (h5py Dataset or zarr Array); use :func:`open_volume`."""
        self._location = location
        self._mode = mode
        self._array = array
        self._file = file
        self._flat = array.ndim == 2  # a stored 2-D slice: z has size 1
        self.channels = array.ndim == 4  # (c, z, y, x)
        self.address = address
        self.shape = (1, *array.shape) if self._flat else tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.chunks = _chunks(array, self.shape)

    @property
    def ndim(self) -> int:
        """Number of axes: 3 (z, y, x), or 4 (c, z, y, x) for a volume with channels."""
        return len(self.shape)

    @property
    def attributes(self) -> dict:
        """The array's attributes (Zarr ``attributes`` / ``.zattrs``, HDF5 attributes), as plain values."""
        return {key: _plain(value) for key, value in self._stored().attrs.items()}

    @property
    def writable(self) -> bool:
        """True when the volume was opened with ``mode="r+"``."""
        return self._mode == "r+"

    def _stored(self) -> Any:
        if self._array is None:
            raise ValueError(f"{self.address}: the volume is closed")
        return self._array

    def __getitem__(self, index: Any) -> np.ndarray:
        region, after, counts = _selection(index, self.shape)
        if 0 in counts:
            return np.empty(counts, self.dtype)[after]
        array = self._stored()
        try:
            data = np.asarray(array[region[1:]])[None] if self._flat else np.asarray(array[region])
        except Exception as err:  # corrupt chunks and missing codecs surface as many exception types
            raise DataError(f"{self.address}: cannot read {_region_text(region)} ({_reason(err)})") from None
        return data[after]

    def __setitem__(self, index: Any, value: Any) -> None:
        if not self.writable:
            raise ValueError(f"{self.address}: the volume is opened read-only; open it with mode='r+' to write")
        region, after, counts = _selection(index, self.shape)
        selected = np.broadcast_to(np.empty(()), counts)[after].shape  # the shape numpy gives this selection
        values = np.broadcast_to(np.asarray(value), selected).astype(self.dtype, copy=False).reshape(counts)
        if 0 in counts:
            return
        values = values[tuple(step if isinstance(step, slice) else slice(None) for step in after)]  # undo reversals
        array = self._stored()
        try:
            if self._flat:
                array[region[1:]] = values[0]
            else:
                array[region] = values
        except OSError as err:  # disk full, permissions
            raise DataError(f"{self.address}: cannot write {_region_text(region)} ({_reason(err)})") from None

    @property
    def unfinished(self) -> str | None:
        """The note of the run that is writing this volume and has not finished, else None."""
        note = self._stored().attrs.get(UNFINISHED_ATTR)
        return str(note) if note else None

    def mark_unfinished(self, note: str | None) -> None:
        """Mark the volume as unfinished with ``note`` (an attribute in its metadata: ``.zattrs`` or
        ``zarr.json``, HDF5 attributes), or clear the mark (None). An OME-Zarr image's name (the layer's
        name in napari) also starts with :data:`UNFINISHED_NAME` while it is unfinished."""
        attrs = self._stored().attrs
        if note:
            attrs[UNFINISHED_ATTR] = note
        elif UNFINISHED_ATTR in attrs:
            del attrs[UNFINISHED_ATTR]
        if self._location.kind != "hdf5":
            _name_image(self._location, self._stored(), unfinished=bool(note))

    def close(self) -> None:
        """Close the HDF5 file (Zarr keeps nothing open); reading or writing afterwards is an error."""
        if self._file is not None:
            self._file.close()
        self._file = None
        self._array = None

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __reduce__(self):
        return _reopen, (self._location, self._mode, self.address, self.channels)

    def __repr__(self) -> str:
        shape, chunks, mode = self.shape, self.chunks, self._mode
        return f"Volume({self.address!r}, {shape=}, dtype={self.dtype}, {chunks=}, {mode=})"


def _region_text(region: tuple[slice, ...]) -> str:
    """A region as ``z 0-3, y 0-63, x 64-127`` (inclusive voxel indices; ``c`` first with channels)."""
    axes = "czyx" if len(region) == 4 else "zyx"
    return ", ".join(f"{axis} {part.start}-{part.stop - 1}" for axis, part in zip(axes, region))


def _plain(value: Any) -> Any:
    """An attribute value as JSON-like Python values (HDF5 gives numpy arrays and scalars)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _reason(err: Exception) -> str:
    """An exception as one line: its type and the first line of its message."""
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0]}" if message else type(err).__name__


def _reopen(location: VolumeAddress, mode: str, address: str, channels: bool = False) -> Volume:
    """Open a volume again from what pickling kept (see :meth:`Volume.__reduce__`)."""
    return _open(location, location.level, mode, address, channels)


def _chunks(array: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The storage unit of ``array`` in voxels (z, y, x; or c, z, y, x), clipped to ``shape``."""
    stored = getattr(array, "shards", None) or getattr(array, "chunks", None)  # a Zarr shard is written whole
    if stored is None:  # contiguous HDF5: any region reads directly; one slice is a natural unit
        stored = shape[1:]
    stored = tuple(int(n) for n in stored)
    if len(stored) == len(shape) - 1:
        stored = (1, *stored)
    return tuple(max(1, min(n, size)) for n, size in zip(stored, shape))


def _listed(names: list[str]) -> str:
    """``names`` comma-separated, the first :data:`SHOWN_NAMES` of them."""
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f", ... ({len(names)} in all)" if len(names) > SHOWN_NAMES else "")


def _check_dtype(shown: str, dtype: Any) -> np.dtype:
    """``dtype`` as a numpy dtype, refused (one line naming ``shown``) unless it holds real numbers."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise DataError(
            f"{shown}: values of type {dtype} are not numbers; volumes hold integers, floats or booleans"
        ) from None
    if dtype.kind not in REAL_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        what = "complex numbers" if dtype.kind == "c" else f"{dtype} values"
        raise DataError(f"{shown}: {what} are not real numbers; volumes hold integers, floats or booleans")
    return dtype


def _check_array(
    shown: str, shape: tuple[int, ...] | None, dtype: Any, axes: list[str] | None = None, channels: bool = False
) -> None:
    """Refuse, with one line naming ``shown``, an array that cannot be a volume (with ``channels``: one that is
    neither a volume nor a 4-D ``(c, z, y, x)`` one)."""
    if shape is None:
        raise DataError(f"{shown}: empty dataset (no shape): a volume needs (z, y, x) values")
    shape = tuple(int(n) for n in shape)
    named = f" (axes {', '.join(axes)})" if axes and len(axes) == len(shape) else ""
    if channels and len(shape) == 4:
        pass
    elif len(shape) > 3:
        raise DataError(
            f"{shown}: {len(shape)}-D array of shape {shape}{named}; em-unet reads 3-D (z, y, x) volumes or 2-D "
            "slices: save a single channel and time point (drop channel or time axes) as its own array"
        )
    if len(shape) < 2:
        raise DataError(f"{shown}: {len(shape)}-D array of shape {shape}; expected a 3-D (z, y, x) or 2-D (y, x) array")
    if 0 in shape:
        raise DataError(f"{shown}: empty array (shape {shape}); a volume needs at least one voxel")
    _check_dtype(shown, dtype)


def open_volume(
    address: str | Path | VolumeAddress,
    key: str | None = None,
    level: int | None = None,
    mode: str = "r",
    channels: bool = False,
) -> Volume:
    """Open the volume at ``address`` (see the module docstring); reads metadata only.

    Args:
        address: a volume address, e.g. ``vol.h5:/raw``, ``store.zarr/raw`` or ``image.ome.zarr``.
        key: the dataset or array inside the file or store; replaces a key in ``address``.
        level: the resolution level of an OME-Zarr image (0: full resolution); None takes the address's.
        mode: ``"r"`` to read, ``"r+"`` to read and write.
        channels: also open a 4-D ``(c, z, y, x)`` array (an affinity map).

    Raises :class:`DataError` with one line naming the file or key for a missing file, store, key or
    level, a group where an array is needed, an array that is not 2-D or 3-D, values that are not real
    numbers, an empty array, and an OME-Zarr image without multiscales metadata.
    """
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
    location = parse_address(address, key)
    if level is None:
        level = location.level
    elif level < 0:
        raise DataError(f"{location}: level {level} is negative; level 0 is full resolution")
    return _open(location, level, mode, str(location), channels)


def _open(location: VolumeAddress, level: int, mode: str, shown: str, channels: bool = False) -> Volume:
    if location.kind == "hdf5":
        if level:
            raise DataError(f"{shown}: HDF5 datasets have no resolution levels; drop level {level}")
        volume = _open_hdf5(location, mode, shown, channels)
    else:
        volume = _open_zarr(location, level, mode, shown, channels)
    note = volume.unfinished if mode == "r" else None  # only the run that writes it (mode "r+") may open it
    if note:
        volume.close()
        raise DataError(f"{volume.address} is unfinished, not a result: {note}")
    return volume


# ---------------------------------------------------------------- HDF5


def _h5py():
    try:
        import h5py  # lazy, as every format backend here: reading a TIFF loads none of them
    except ImportError as err:
        raise DependencyError(f"HDF5 volumes need the h5py package ({err}): pip install h5py") from None
    return h5py


def _hdf5_datasets(group: Any) -> list[str]:
    """Names (``/a/b``) of the datasets in an h5py group and its subgroups, in file order."""
    h5py = _h5py()
    names: list[str] = []
    group.visititems(lambda name, node: names.append(node.name) if isinstance(node, h5py.Dataset) else None)
    return names


# HDF5 filters that files from ilastik, BigDataViewer, Imaris and detectors often use; hdf5plugin provides them
HDF5_PLUGIN_FILTERS = {307: "bzip2", 32001: "Blosc", 32004: "LZ4", 32008: "bitshuffle", 32015: "Zstandard"}


def _hdf5_filters_missing(dataset: Any) -> list[str]:
    """Names of the compression filters ``dataset`` needs that this HDF5 library cannot decode, after
    loading the ``hdf5plugin`` package if it is installed (importing it registers its filters)."""
    h5py = _h5py()
    plist = dataset.id.get_create_plist()
    filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
    for attempt in range(2):
        missing = [
            f"{HDF5_PLUGIN_FILTERS.get(code) or name.decode(errors='replace') or 'a filter'} (HDF5 filter {code})"
            for code, _flags, _values, name in filters
            if not h5py.h5z.filter_avail(code)
        ]
        if not missing or attempt:
            return missing
        try:
            import hdf5plugin  # noqa: F401
        except ImportError:
            return missing
    return missing


def _open_hdf5(location: VolumeAddress, mode: str, shown: str, channels: bool = False) -> Volume:
    h5py = _h5py()
    path = location.path
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an HDF5 file")
    try:
        file = h5py.File(path, mode)
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file ({_h5_reason(err)})") from None
    try:
        key = location.key
        if key is None:
            datasets = _hdf5_datasets(file)
            if len(datasets) != 1:
                found = f"datasets: {_listed(datasets)}" if datasets else "the file holds no datasets"
                raise DataError(f"{path}: name the dataset to read, e.g. {path}:/raw or --key /raw ({found})")
            key = datasets[0].lstrip("/")
            shown = str(VolumeAddress(path, key, "hdf5"))  # the file's only dataset: name it
        node = file.get(key)
        if node is None:
            datasets = _hdf5_datasets(file)
            found = f"datasets: {_listed(datasets)}" if datasets else "the file holds no datasets"
            raise DataError(f"{path}: no dataset '/{key}' ({found})")
        if not isinstance(node, h5py.Dataset):
            inside = _hdf5_datasets(node) if isinstance(node, h5py.Group) else []
            found = f"datasets in it: {_listed(inside)}" if inside else "it holds no datasets"
            raise DataError(f"{path}: /{key} is a group, not a dataset ({found})")
        location = replace(location, key=key, level=0)
        _check_array(shown, node.shape, node.dtype, channels=channels)
        missing = _hdf5_filters_missing(node)
        if missing:
            raise DataError(
                f"{shown}: compressed with {', '.join(missing)}, which this HDF5 library cannot decode: "
                "pip install hdf5plugin (em-unet then loads it), or save the dataset with gzip compression"
            )
    except BaseException:
        file.close()
        raise
    return Volume(replace(location, path=Path(os.path.abspath(path))), mode, shown, node, file)


def _h5_reason(err: OSError) -> str:
    """The useful part of an h5py error, e.g. ``file signature not found``."""
    match = re.search(r"\(([^()]*)\)\s*$", str(err))
    return match[1] if match else str(err)


# ---------------------------------------------------------------- Zarr


def _zarr():
    try:
        import zarr  # lazy: zarr's import alone takes about 0.5 s
    except ImportError as err:
        raise DependencyError(f"Zarr volumes need the zarr package ({err}): pip install 'zarr>=3'") from None
    return zarr


def _multiscales(group: Any) -> list[dict] | None:
    """The ``multiscales`` list of an OME-Zarr image group (OME-NGFF 0.4 or 0.5), or None."""
    attrs = group.attrs.asdict()
    ome = attrs.get("ome")
    found = ome.get("multiscales") if isinstance(ome, dict) else attrs.get("multiscales")
    return found if isinstance(found, list) and found else None


def _zarr_arrays(group: Any) -> list[str]:
    """Paths (``a/b``) of the arrays in a Zarr group and its subgroups, relative to the store root."""
    zarr = _zarr()
    return sorted(node.path for _name, node in group.members(max_depth=None) if isinstance(node, zarr.Array))


def _zarr_images(group: Any) -> list[str]:
    """Paths of the OME-Zarr image groups inside a Zarr group (not the group itself)."""
    zarr = _zarr()
    return sorted(
        node.path
        for _name, node in group.members(max_depth=None)
        if isinstance(node, zarr.Group) and _multiscales(node) is not None
    )


def _open_zarr(location: VolumeAddress, level: int, mode: str, shown: str, channels: bool = False) -> Volume:
    zarr = _zarr()
    path = location.path
    if not path.exists():
        raise DataError(f"{path}: no such Zarr store")
    if not path.is_dir():
        raise DataError(f"{path} is a file, not a Zarr store (a folder)")
    try:
        root = zarr.open(store=str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        raise DataError(f"{path}: not a Zarr store (no zarr.json, .zgroup or .zarray at its top)") from None
    except Exception as err:  # unknown codecs, corrupt JSON, ...: many exception types
        raise DataError(f"{path}: not a readable Zarr store ({_reason(err)})") from None
    key = location.key
    node = root
    if key is not None:
        if isinstance(root, zarr.Array):
            raise DataError(
                f"{path}: the store root is an array (shape {root.shape}), which holds no '{key}': "
                f"name the store alone ({path})"
            )
        try:
            node = root[key]
        except KeyError:
            arrays = _zarr_arrays(root)
            found = f"arrays: {_listed(arrays)}" if arrays else "the store holds no arrays"
            raise DataError(f"{path}: no array '{key}' ({found})") from None
        except Exception as err:
            raise DataError(f"{path}: cannot read '{key}' ({_reason(err)})") from None
    if isinstance(node, zarr.Group):
        node, key, axes, chosen = _zarr_level(location, node, level)
        if chosen:  # the store's only array: name it
            shown = str(VolumeAddress(path, key, location.kind))
    elif level:
        raise DataError(f"{shown} is an array, not a multiscale image: it has no level {level}")
    else:
        axes = node.metadata.dimension_names if node.metadata.zarr_format == 3 else None
    _check_array(shown, node.shape, node.dtype, list(axes) if axes and all(axes) else None, channels)
    return Volume(VolumeAddress(Path(os.path.abspath(path)), key, location.kind), mode, shown, node)


def _zarr_level(location: VolumeAddress, group: Any, level: int) -> tuple[Any, str, list[str] | None, bool]:
    """The array of ``level`` in the image ``group``, its key, its axis names and False; or, for a plain
    ``.zarr`` store named without a key, the store's only array, its key, None and True."""
    zarr = _zarr()
    path, key = location.path, location.key
    multiscales = _multiscales(group)
    named = f"{path}/{key}" if key else str(path)
    if multiscales is None:
        arrays = _zarr_arrays(group)
        if key is None and location.kind == "zarr" and len(arrays) == 1 and not level:
            return group[arrays[0]], arrays[0], None, True
        images = _zarr_images(group)
        if images:
            found = f"images in it: {_listed(images)}; name one, e.g. --key {images[0]}"
        else:
            found = f"arrays in it: {_listed(arrays)}" if arrays else "it holds no arrays"
        if location.kind == "ome-zarr" or level:
            raise DataError(f"{named}: no OME-Zarr multiscales metadata, so no image levels ({found})")
        if key is None:
            raise DataError(f"{path}: name the array to read, e.g. {path}/raw or --key raw ({found})")
        raise DataError(f"{path}: '{key}' is a group, not an array ({found})")
    image = multiscales[0]
    datasets = [d.get("path") for d in image.get("datasets", []) if isinstance(d, dict)]
    if not datasets or not all(isinstance(p, str) for p in datasets):
        raise DataError(f"{named}: the OME-Zarr multiscales metadata lists no datasets (levels)")
    if level >= len(datasets):
        levels = ", ".join(f"{i} ('{p}')" if p != str(i) else p for i, p in enumerate(datasets))
        raise DataError(f"{named}: no level {level} (levels: {levels})")
    level_path = datasets[level]
    array_key = f"{key}/{level_path}" if key else level_path
    try:
        array = group[level_path]
    except KeyError:
        array = None
    if not isinstance(array, zarr.Array):
        raise DataError(f"{named}: level {level} ('{level_path}') is in the multiscales metadata but not an array")
    axes = [a.get("name") if isinstance(a, dict) else a for a in image.get("axes", [])]
    return array, array_key, axes or None, False


# ---------------------------------------------------------------- writing


def create_volume(
    address: str | Path | VolumeAddress,
    shape: tuple[int, int, int],
    dtype: Any,
    chunks: tuple[int, int, int],
    key: str | None = None,
    overwrite: bool = False,
    zarr_format: int = 3,
    channels: int = 0,
    attributes: dict | None = None,
) -> Volume:
    """Create an empty (zero-filled) volume and return it opened for writing (``mode="r+"``).

    ``.zarr`` and ``.ome.zarr`` outputs become an OME-Zarr image (at ``key`` inside the store, or the store
    root): a group holding one level, the array ``0``, and multiscales metadata for axes z, y, x (type
    ``space``, scale 1); OME-NGFF 0.4 for ``zarr_format=2``, 0.5 for ``zarr_format=3``. An existing store
    must have that Zarr format. HDF5 outputs are a chunked dataset at ``key`` (missing groups are created).

    Args:
        address: where to write (see the module docstring); missing folders are created.
        shape: voxels along (z, y, x).
        dtype: the stored value type (integers, floats or booleans).
        chunks: storage chunk in voxels (z, y, x); clipped to ``shape``.
        key: the dataset or image group inside the file or store; replaces a key in ``address``.
        overwrite: replace an existing array (or image) at the key; other arrays are never touched.
        zarr_format: 2 or 3, for Zarr outputs.
        channels: > 0 makes a 4-D volume ``(c, z, y, x)`` of that many channels (axis ``c``, type
            ``channel``, in OME-Zarr), each chunk holding all channels.
        attributes: written into the array's attributes (e.g. an affinity map's offsets).

    Raises :class:`DataError` with one line for an existing array without ``overwrite``, a key below an
    array, a location that cannot be written (a parent that is a file, a read-only or unwritable folder),
    a Zarr store of the other format, and a shape, dtype or chunks that cannot make a volume.
    """
    location = parse_address(address, key)
    shown = str(location)
    if location.level:
        raise DataError(f"{shown}: cannot create a level of an image; name the image, e.g. {location.path}")
    shape = _positive(shown, "shape", shape)
    if 0 in shape:
        raise DataError(f"{shown}: shape {shape} is empty; a volume needs at least one voxel along z, y and x")
    chunks = _positive(shown, "chunks", chunks)
    if 0 in chunks:
        raise DataError(f"{shown}: chunks {chunks} must be at least 1 voxel along z, y and x")
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    dtype = _check_dtype(shown, dtype)
    if channels:
        shape, chunks = (int(channels), *shape), (int(channels), *chunks)
    if location.kind == "hdf5":
        volume = _create_hdf5(location, shape, dtype, chunks, overwrite)
    else:
        if zarr_format not in ZARR_FORMATS:
            raise ValueError(f"zarr_format must be 2 or 3, got {zarr_format!r}")
        volume = _create_zarr(location, shape, dtype, chunks, overwrite, zarr_format)
    for name, value in (attributes or {}).items():
        volume._stored().attrs[name] = value
    return volume


def _positive(shown: str, what: str, values: Any) -> tuple[int, int, int]:
    """``values`` as three non-negative ints (z, y, x), else a one-line :class:`DataError`."""
    try:
        counts = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        counts = None
    if counts is None or len(counts) != 3 or min(counts) < 0:
        raise DataError(f"{shown}: {what} must be three voxel counts (z, y, x), got {values}")
    return counts


def _check_location(path: Path) -> None:
    """One line unless a new file or store could be made at ``path`` (see :func:`check_writable`)."""
    try:
        check_writable(path)
    except EmUnetError as err:
        raise DataError(str(err)) from None


def _create_hdf5(
    location: VolumeAddress, shape: tuple[int, int, int], dtype: np.dtype, chunks: tuple[int, int, int], overwrite: bool
) -> Volume:
    h5py = _h5py()
    path, key = location.path, location.key
    if key is None:
        raise DataError(f"{path}: name the dataset to write, e.g. {path}:/prediction or --key prediction")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an HDF5 file")
    existed = path.exists()
    if not existed:
        _check_location(path)
    elif not h5py.is_hdf5(path):
        raise DataError(f"{path}: exists but is not an HDF5 file: choose another path")
    try:
        with new_folder(path.parent):
            file = h5py.File(path, "a")
    except OSError as err:
        raise DataError(f"{path}: cannot write this HDF5 file ({_h5_reason(err)})") from None
    try:
        node = file.get(key)
        if isinstance(node, h5py.Dataset):
            if not overwrite:
                raise DataError(
                    f"{path}: dataset /{key} already exists (shape {node.shape}, {node.dtype}): choose another "
                    "key or pass --overwrite"
                )
            del file[key]  # HDF5 keeps the freed space inside the file until it is repacked
        elif node is not None:
            raise DataError(f"{path}: /{key} is a group, not a dataset: choose another key")
        parent = _hdf5_blocking_dataset(file, key)
        if parent is not None:
            raise DataError(f"{path}: /{parent} is a dataset, so it cannot hold /{key}: choose another key")
        file.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks, fillvalue=0)
    except BaseException:
        file.close()
        if not existed:
            path.unlink(missing_ok=True)
        raise
    file.close()
    return _open_hdf5(replace(location, path=Path(os.path.abspath(path))), "r+", str(location), len(shape) == 4)


def _hdf5_blocking_dataset(file: Any, key: str) -> str | None:
    """The first parent of ``key`` that is a dataset (so no group can be made there), or None."""
    h5py = _h5py()
    parts = key.split("/")
    for end in range(1, len(parts)):
        parent = "/".join(parts[:end])
        node = file.get(parent)
        if node is None:
            return None
        if isinstance(node, h5py.Dataset):
            return parent
    return None


def _create_zarr(
    location: VolumeAddress,
    shape: tuple[int, int, int],
    dtype: np.dtype,
    chunks: tuple[int, int, int],
    overwrite: bool,
    zarr_format: int,
) -> Volume:
    zarr = _zarr()
    path, key = location.path, location.key
    shown = str(location)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path} is a file, not a Zarr store (a folder)")
    made = not path.exists()
    existed = not made and any(path.iterdir())
    if made:
        _check_location(path)
    try:
        with new_folder(path):
            root = zarr.open_group(store=str(path), mode="a", zarr_format=zarr_format) if not existed else None
    except EmUnetError as err:
        raise DataError(str(err)) from None
    except OSError as err:
        raise DataError(f"{path}: cannot write this Zarr store ({err.strerror or err})") from None
    try:
        if existed:
            root = _existing_root(path, key, zarr_format, overwrite)
        group = _image_group(root, path, key, overwrite)
        if zarr_format == 2:
            from numcodecs import Blosc  # lazy, with zarr

            # OME-NGFF 0.4 wants "/" between chunk indices; Blosc is what Fiji and napari read in Zarr v2
            options = {"chunk_key_encoding": {"name": "v2", "separator": "/"}, "compressors": Blosc("zstd", 5)}
        else:
            options = {"dimension_names": ("c", "z", "y", "x")[-len(shape) :]}
        group.create_array("0", shape=shape, dtype=dtype, chunks=chunks, fill_value=0, **options)
        _write_multiscales(group, zarr_format, channels=len(shape) == 4)
    except BaseException as err:
        if made:  # a store this call began: leave nothing half-written behind
            shutil.rmtree(path, ignore_errors=True)
        if isinstance(err, OSError):
            raise DataError(f"{shown}: cannot write ({err.strerror or err})") from None
        raise
    return _open_zarr(replace(location, path=Path(os.path.abspath(path))), 0, "r+", shown, len(shape) == 4)


def _existing_root(path: Path, key: str | None, zarr_format: int, overwrite: bool) -> Any:
    """The root group of an existing store, opened for writing; refused if it is the other Zarr format,
    not a Zarr store, or an array that cannot be kept."""
    zarr = _zarr()
    try:
        root = zarr.open(store=str(path), mode="r+")
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        raise DataError(
            f"{path}: a folder that is not a Zarr store (no zarr.json, .zgroup or .zarray): choose another path"
        ) from None
    except Exception as err:
        raise DataError(f"{path}: not a readable Zarr store ({_reason(err)})") from None
    found = root.metadata.zarr_format
    if found != zarr_format:
        raise DataError(
            f"{path}: a Zarr v{found} store, so it cannot hold a Zarr v{zarr_format} image: write Zarr v{found} "
            "there or choose another store"
        )
    if isinstance(root, zarr.Array):
        if key is not None:
            raise DataError(f"{path}: the store root is an array, so it cannot hold '{key}': choose another store")
        if not overwrite:
            raise DataError(
                f"{path}: array already exists (shape {root.shape}, {root.dtype}): choose another path or pass "
                "--overwrite"
            )
        _delete_tree(path)
        root = zarr.open_group(store=str(path), mode="a", zarr_format=zarr_format)
    return root


def _delete_tree(path: Path) -> None:
    """Delete the contents of the folder ``path`` (a store whose root is an array being replaced)."""
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _image_group(root: Any, path: Path, key: str | None, overwrite: bool) -> Any:
    """The group at ``key`` ready to receive image level ``0``: made if missing; an existing array or image
    there is removed only with ``overwrite``; a group holding other arrays is refused."""
    zarr = _zarr()
    named = f"{path}/{key}" if key else str(path)
    node = root
    if key is not None:
        parts = key.split("/")
        for end in range(1, len(parts) + 1):
            part = "/".join(parts[:end])
            try:
                node = root[part]
            except KeyError:
                node = None
                break
            if isinstance(node, zarr.Array) and end < len(parts):
                raise DataError(f"{path}: '{part}' is an array, so it cannot hold '{key}': choose another key")
    if isinstance(node, zarr.Array):
        if not overwrite:
            raise DataError(
                f"{named}: array already exists (shape {node.shape}, {node.dtype}): choose another key or pass "
                "--overwrite"
            )
        del root[key]
        node = None
    if node is None:
        return root.require_group(key)
    multiscales = _multiscales(node)
    if multiscales is not None:
        levels = [d.get("path") for d in multiscales[0].get("datasets", []) if isinstance(d, dict)]
        if not overwrite:
            raise DataError(
                f"{named}: an OME-Zarr image already exists there ({len(levels)} level(s)): choose another key or "
                "pass --overwrite"
            )
        for level in levels:
            if isinstance(level, str) and level in node:
                del node[level]
        return node
    inside = _zarr_arrays(node)
    if inside:
        raise DataError(f"{named}: a group holding other arrays ({_listed(inside)}), not an image: choose another key")
    return node


def _name_image(location: VolumeAddress, array: Any, unfinished: bool) -> None:
    """Prefix (or unprefix) the name in the multiscales metadata of the OME-Zarr image holding ``array``."""
    zarr = _zarr()
    parent = array.path.rpartition("/")[0]
    try:
        group = zarr.open_group(store=str(location.path), path=parent, mode="r+")
    except Exception:  # not inside a group: a plain Zarr array has no image name
        return
    attrs = group.attrs.asdict()
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else None
    multiscales = (ome or attrs).get("multiscales")
    if not (isinstance(multiscales, list) and multiscales and isinstance(multiscales[0], dict)):
        return
    name = str(multiscales[0].get("name") or group.basename or "image").removeprefix(UNFINISHED_NAME)
    multiscales[0]["name"] = UNFINISHED_NAME + name if unfinished else name
    if ome is not None:
        group.attrs["ome"] = {**ome, "multiscales": multiscales}
    else:
        group.attrs["multiscales"] = multiscales


def _write_multiscales(group: Any, zarr_format: int, channels: bool = False) -> None:
    """OME-NGFF multiscales metadata (0.4 in Zarr v2, 0.5 in Zarr v3) for the single level ``0`` of ``group``
    (axes z, y, x; with ``channels`` c, z, y, x)."""
    try:
        # lazy: ome-zarr's import takes over a second, for metadata written once per output
        from ome_zarr.format import FormatV04, FormatV05
        from ome_zarr.writer import write_multiscales_metadata
    except ImportError as err:
        raise DependencyError(
            f"writing OME-Zarr images needs the ome-zarr package ({err}): pip install ome-zarr"
        ) from None
    write_multiscales_metadata(
        group,
        datasets=[{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * (3 + channels)}]}],
        fmt=FormatV04() if zarr_format == 2 else FormatV05(),
        axes=[{"name": "c", "type": "channel"}] * channels + [{"name": name, "type": "space"} for name in "zyx"],
        name=group.basename or "image",
    )


# ---------------------------------------------------------------- metadata

NANOMETRES_PER_UNIT = {"picometer": 1e-3, "angstrom": 0.1, "nanometer": 1.0, "micrometer": 1e3, "millimeter": 1e6}


def voxel_size_nm(address: str | Path, key: str | None = None) -> tuple[float, float, float] | None:
    """The voxel size (z, y, x, nm) an OME-Zarr image's metadata records for the level read: the scale of its
    dataset (times the image's own scale, if any) on the spatial axes z, y, x, each with a length unit. None when
    the volume is not an OME-Zarr image or its axes have no units (a scale without a unit says nothing of nm)."""
    location = parse_address(address, key)
    if location.kind not in ("zarr", "ome-zarr"):
        return None
    zarr = _zarr()
    try:
        root = zarr.open(store=str(location.path), mode="r")
        node = root[location.key] if location.key else root
        multiscales = _multiscales(node) if isinstance(node, zarr.Group) else None
    except Exception:  # not a store we read: open_volume says why, where it matters
        return None
    if not multiscales:
        return None
    image = multiscales[0]
    axes = [a for a in image.get("axes", []) if isinstance(a, dict)]
    datasets = image.get("datasets", [])
    if not axes or len(datasets) <= location.level:
        return None
    scale = np.ones(len(axes))
    for transforms in (
        datasets[location.level].get("coordinateTransformations"),
        image.get("coordinateTransformations"),
    ):
        for transform in transforms or []:
            if (
                isinstance(transform, dict)
                and transform.get("type") == "scale"
                and len(transform["scale"]) == len(axes)
            ):
                scale = scale * np.asarray(transform["scale"], float)
    found = {}
    for axis, value in zip(axes, scale):
        unit = NANOMETRES_PER_UNIT.get(str(axis.get("unit", "")).lower())
        if axis.get("name") in ("z", "y", "x") and unit is not None and value > 0:
            found[axis["name"]] = float(value) * unit
    return (found["z"], found["y"], found["x"]) if len(found) == 3 else None
