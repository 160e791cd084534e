"""EM stacks on disk: reading them, and the intensity and label conventions (no TensorFlow).

Stacks are ``(z, y, x)`` arrays: slices by rows by columns. They are read from a
multi-page TIFF (every page of every series, in file order, so a TIFF written
slice by slice counts whole), a single 2-D TIFF, or a folder of per-slice
TIFF/PNG files taken in numeric order (``2.tif`` before ``10.tif``). All slices
of a stack have one size and one type. Some compressions (LZW, which Pillow and
Fiji write, and JPEG) are decoded by the ``imagecodecs`` package.

Intensities become float32 in [0, 1]: 8-bit images are divided by 255, 16-bit
by 65535 (the full range of the type, so brightness is comparable across
stacks); float images already within [0, 1] are kept; anything else (other
integer types, floats outside [0, 1]) is rescaled by the stack's own minimum
and maximum. NaN or infinite values are refused, naming the first slice that holds one.

Label convention, decided in :func:`membrane_target` and nowhere else: the
training target is 1 = membrane, 0 = cell interior. A label stack whose values
are {0, 255} follows the ISBI 2012 convention (0 = membrane, 255 = cell
interior); one whose values are {0, 1} is a membrane mask (1 = membrane). Labels
need both membrane and cell interior pixels: a stack with a single value is refused.

Slices smaller than the patch size are an error (no silent padding): choose a
smaller ``patch_size``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError
from tifffile import TIFF, TiffPageSeries

from em_unet.errors import DataError, DependencyError, EmUnetError
from em_unet.io.volumes import is_volume_address, open_volume

SLICE_SUFFIXES = (".tif", ".tiff", ".png")


# ---------------------------------------------------------------- reading


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def check_finite(values: np.ndarray, source: str, why: str, first_slice: int = 0) -> None:
    """One-line :class:`DataError` naming the first slice of ``values`` that holds NaN or an infinity.

    ``values`` is a ``(z, y, x)`` stack or one ``(y, x)`` slice; ``first_slice`` is the index in the
    stack of its first slice. ``why`` says what valid data holds. Integer data always passes.
    """
    if not np.issubdtype(values.dtype, np.inexact):
        return
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    z = first_slice + (where[0] if values.ndim >= 3 else 0)
    raise DataError(
        f"{source}: NaN or infinite value at slice {z} ({float(values[where]):g} at row {where[-2]}, "
        f"column {where[-1]}); {why}"
    )


class _TiffProblems(logging.Handler):
    """Collects what tifffile logs: it reports truncated files there and returns partial data."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _missing_codec(page) -> str | None:
    """Why tifffile cannot decode ``page`` (its compression or predictor), or None when it can."""

    for table, key in ((TIFF.DECOMPRESSORS, page.compression), (TIFF.UNPREDICTORS, page.predictor)):
        try:
            table[key]
        except KeyError as err:
            return str(err.args[0] if err.args else err)
    return None


def _codec_error(path: Path, reason: str) -> EmUnetError:
    """The one-line error for a TIFF encoding tifffile cannot decode (``reason`` is tifffile's)."""
    match = re.search(r"<(COMPRESSION|PREDICTOR)\.(\w+)", reason)
    what = f"{match[2]} {match[1].lower()}" if match else "encoding"
    if "imagecodecs" in reason:
        return DependencyError(
            f"{path}: reading this TIFF's {what} needs the imagecodecs package, which is not "
            "installed: pip install imagecodecs"
        )
    return DataError(f"{path}: this TIFF's {what} cannot be decoded ({reason})")


def _tiff_parts(path: Path, tif) -> list:
    """What to read of an open TIFF, in file order: single pages (one slice each) and packed series
    (several slices in fewer pages, read whole). Refuses, before any pixel is read, slices of another
    size or type than page 0, colour, and compressions that cannot be decoded here.

    Every series counts: a stack written slice by slice (``tifffile.imwrite(..., append=True)``)
    holds one series per slice. Reduced-resolution pages (thumbnails, previews) are not slices.
    """

    parts: list = []
    for series in tif.series:
        pages = [p for p in series.pages if p is not None]
        keyframe = series.keyframe
        if getattr(keyframe, "is_reduced", False):
            continue
        if getattr(keyframe, "samplesperpixel", 1) > 1:
            raise DataError(
                f"{path}: {keyframe.samplesperpixel} samples per pixel (RGB or multi-channel); "
                "em-unet needs grayscale slices: convert the stack to 8- or 16-bit grayscale"
            )
        if series.size == 0:
            raise DataError(f"{path}: empty stack (shape {series.shape})")
        if len(series.shape) not in (2, 3):
            raise DataError(f"{path}: expected a grayscale stack (z, y, x), got shape {series.shape}")
        if len(series.shape) == 3 and len(pages) == series.shape[0] or len(series.shape) == 2 and len(pages) == 1:
            parts.extend(pages)
        else:
            parts.append(series)

    def position(part) -> int:
        index = (part.pages[0] if isinstance(part, TiffPageSeries) else part).index
        return index if isinstance(index, int) else index[0]

    # tifffile groups the pages of a generic TIFF by layout, not by position: file order is slice order
    parts.sort(key=position)
    first = None
    slice_index = 0
    codecs_checked = set()
    for part in parts:
        packed = isinstance(part, TiffPageSeries)
        shape, dtype = tuple(part.shape[-2:]), part.dtype
        page = part.keyframe  # a TiffFrame's layout and compression are its keyframe's
        if first is None:
            first = shape, dtype
        elif shape != first[0]:
            raise DataError(
                f"{path}: page {slice_index} is {shape[0]} x {shape[1]} px but page 0 is "
                f"{first[0][0]} x {first[0][1]} px: every slice of a stack must have the same size"
            )
        elif dtype != first[1]:
            raise DataError(
                f"{path}: page {slice_index} holds {dtype} values but page 0 holds {first[1]}: "
                "every slice of a stack must have the same type"
            )
        codec = (page.compression, page.predictor)
        if codec not in codecs_checked:
            reason = _missing_codec(page)
            if reason:
                raise _codec_error(path, reason)
            codecs_checked.add(codec)
        slice_index += part.shape[0] if packed and len(part.shape) == 3 else 1
    return parts


def _iter_tiff(path: Path) -> Iterator[np.ndarray]:
    """Slices of a TIFF, every page of every series in file order, one page at a time, so a long
    stack is never all in memory (a packed series, with several slices per page, is read whole)."""

    problems = _TiffProblems()
    logger = logging.getLogger("tifffile")

    def check_log():
        if problems.messages:
            first = problems.messages[0].replace("\n", " ")
            raise DataError(f"{path}: the TIFF is truncated or corrupt ({first})")

    logger.addHandler(problems)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise DataError(f"{path}: the TIFF holds no slices (empty stack)")
            parts = _tiff_parts(path, tif)
            check_log()
            if not parts:
                raise DataError(f"{path}: the TIFF holds no slices (empty stack)")
            for part in parts:
                array = part.asarray()
                check_log()
                if isinstance(part, tifffile.TiffPageSeries) and array.ndim == 3:
                    yield from array
                else:
                    yield array
    except EmUnetError:
        raise
    except tifffile.TiffFileError as err:
        raise DataError(f"{path}: not a readable TIFF file ({err})") from None
    except Exception as err:  # truncated or corrupt data surfaces as many exception types
        if "imagecodecs" in str(err):  # a codec the checks above could not foresee (e.g. inside a tile)
            raise _codec_error(path, str(err).replace("\n", " ")) from None
        raise DataError(f"{path}: the TIFF is truncated or corrupt ({type(err).__name__}: {err})") from None
    finally:
        logger.removeHandler(problems)


def _read_png(path: Path) -> np.ndarray:

    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "I;16", "I;16B", "I", "1", "P"):
                raise DataError(f"{path}: PNG mode {image.mode} (RGB or multi-channel); em-unet needs grayscale slices")
            array = np.asarray(image)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: not a readable PNG file ({err})") from None
    return array


VOLUME_SLAB_BYTES = 256 * 2**20  # at most this much of a chunked volume is held in memory at once


def _iter_volume(address: str | Path) -> Iterator[np.ndarray]:
    """Slices of an HDF5/Zarr/OME-Zarr volume, read one chunk-deep slab at a time."""

    with open_volume(address) as volume:
        slice_bytes = volume.shape[1] * volume.shape[2] * volume.dtype.itemsize
        # every chunk a slice touches is decoded whole: reading a chunk's depth of slices at once decodes it once
        depth = max(1, min(volume.chunks[0], VOLUME_SLAB_BYTES // slice_bytes))
        for first in range(0, volume.shape[0], depth):
            yield from volume[first : first + depth]


def _tiff_slices(path: Path) -> tuple[int, tuple[int, int]]:
    """How many slices a TIFF holds and their (y, x) size, from its headers (no pixel is decoded)."""
    try:
        with tifffile.TiffFile(path) as tif:
            parts = _tiff_parts(path, tif)
    except tifffile.TiffFileError as err:
        raise DataError(f"{path}: not a readable TIFF file ({err})") from None
    if not parts:
        raise DataError(f"{path}: the TIFF holds no slices (empty stack)")
    count = sum(p.shape[0] if isinstance(p, TiffPageSeries) and len(p.shape) == 3 else 1 for p in parts)
    return count, tuple(parts[0].shape[-2:])


def mirrored_sections(index, count: int) -> np.ndarray:
    """Section indices mirrored into a stack of ``count`` sections about its end sections, without repeating
    them (NumPy's ``reflect``: -1 -> 1, count -> count - 2); all 0 for one section. The z-context of the first
    and last sections of a stack (or of a training or validation block)."""
    index = np.asarray(index)
    if count == 1:
        return np.zeros_like(index)
    period = 2 * count - 2
    index = np.mod(index, period)
    return np.where(index >= count, period - index, index)


def z_context_indices(section: int, count: int, z_context: int) -> np.ndarray:
    """The ``z_context`` sections (in z order) around ``section`` of a stack of ``count``: ``z_context // 2``
    before it, the rest after, mirrored at the stack's ends (:func:`mirrored_sections`)."""
    start = section - z_context // 2
    return mirrored_sections(np.arange(start, start + z_context), count)


def z_windows(slices: Iterable[np.ndarray], count: int, z_context: int) -> Iterator[np.ndarray]:
    """Each of the ``count`` sections of ``slices`` (read once, in order) with its z-context as a ``(y, x,
    z_context)`` stack (:func:`z_context_indices`); only the sections still needed are held."""
    source = iter(slices)
    held: dict[int, np.ndarray] = {}
    read = 0
    for section in range(count):
        wanted = z_context_indices(section, count, z_context)
        while read <= wanted.max():
            held[read] = next(source)
            read += 1
        yield np.stack([held[int(i)] for i in wanted], axis=-1)
        # later windows reach back at most z_context sections (mirrored ends stay inside their own window)
        following = range(section + 1, min(count, section + 1 + z_context))
        needed = {int(i) for later in following for i in z_context_indices(later, count, z_context)}
        for index in [i for i in held if i not in needed]:
            del held[index]


def stack_shape(path: str | Path) -> tuple[int, int, int]:
    """The ``(z, y, x)`` voxels of a stack (see :func:`iter_slices`) from its headers: TIFF and volume
    pixels are not read, a PNG is."""
    if is_volume_address(path):
        with open_volume(path) as volume:
            return volume.shape
    path = Path(path)
    files = _slice_files(path)
    counted = [(1, None) if file.suffix.lower() == ".png" else _tiff_slices(file) for file in files]
    return sum(count for count, _ in counted), *(counted[0][1] or _read_png(files[0]).shape)


def _slice_files(path: Path) -> list[Path]:
    """The files of a stack: ``path`` itself, or a folder's TIFF/PNG slices in numeric order."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in SLICE_SUFFIXES), key=_natural_key)
        if not files:
            raise DataError(f"{path}: the folder holds no .tif/.tiff/.png slices (empty stack)")
        return files
    return [path]


def iter_slices(path: str | Path) -> Iterator[np.ndarray]:
    """Yield the 2-D slices of a stack in their stored dtype, one at a time.

    ``path`` is a multi-page TIFF, a single 2-D TIFF or PNG, a folder of
    per-slice TIFF/PNG files in numeric order, or a volume address (an HDF5
    dataset, a Zarr array or an OME-Zarr image: see :mod:`em_unet.io.volumes`),
    read a slab of chunks at a time (at most :data:`VOLUME_SLAB_BYTES` bytes)
    so that a volume larger than memory is never whole in it. Raises
    :class:`DataError` with a one-line message for anything that is not a
    grayscale stack.
    """

    if is_volume_address(path):
        yield from _iter_volume(path)
        return
    files = _slice_files(Path(path))
    first = None
    for file in files:
        for array in _iter_tiff(file) if file.suffix.lower() != ".png" else [_read_png(file)]:
            if array.ndim != 2:
                raise DataError(f"{file}: expected 2-D grayscale slices, got shape {array.shape}")
            if first is None:
                first = array
            elif array.shape != first.shape:
                raise DataError(f"{file}: slice shape {array.shape} differs from {first.shape} of {files[0]}")
            elif array.dtype != first.dtype:  # one scaling rule per stack: 8-bit and 16-bit slices cannot mix
                raise DataError(
                    f"{file}: slices hold {array.dtype} values but those of {files[0]} hold "
                    f"{first.dtype}: every slice of a stack must have the same type"
                )
            yield array


def read_stack(path: str | Path) -> np.ndarray:
    """Read a whole stack as ``(z, y, x)`` in its stored dtype (see :func:`iter_slices`)."""
    stack = np.stack(list(iter_slices(path)))
    if stack.size == 0:
        raise DataError(f"{path}: empty stack (shape {stack.shape})")
    return stack


def is_channel_stack(path: str | Path, attribute: str) -> bool:
    """Whether ``path`` is a multi-channel TIFF stack as :class:`~em_unet.io.writers.TiffChannelsWriter` writes
    them: an ImageJ hyperstack with axes ZCYX, or one whose Info records ``attribute``. (A one-slice CYX stack
    without it is not: em-unet before December 2026 wrote the header of slice stacks that way.)"""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series or tif.series[0].keyframe.samplesperpixel != 1:
                return False
            info = (tif.imagej_metadata or {}).get("Info") or ""
            return tif.series[0].axes == "ZCYX" or (tif.series[0].axes == "CYX" and f'"{attribute}"' in info)
    except (OSError, ValueError, tifffile.TiffFileError):
        return False


def read_channel_stack(path: str | Path) -> tuple[np.ndarray, dict]:
    """A multi-channel TIFF stack as ``(z, c, y, x)`` in its stored dtype, and the attributes recorded as JSON in
    its ImageJ Info (``{}`` without)."""
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, stack = series.axes, series.asarray()
            info = (tif.imagej_metadata or {}).get("Info")
    except (OSError, ValueError, tifffile.TiffFileError) as err:
        raise DataError(f"{path}: cannot read the TIFF ({type(err).__name__}: {err})") from None
    if axes in ("CYX", "ZCYX"):
        stack = stack if axes == "ZCYX" else stack[None]
    else:
        raise DataError(f"{path}: a multi-channel stack must have axes ZCYX or CYX, found {axes} (shape {stack.shape})")
    try:
        attributes = json.loads(info) if info else {}
    except ValueError:
        attributes = {}
    return stack, attributes if isinstance(attributes, dict) else {}


IMAGE_VALUES = "an EM image must hold finite intensities"


def iter_image_slices(path: str | Path) -> Iterator[np.ndarray]:
    """Yield float32 slices in [0, 1] one at a time, scaled as :func:`to_unit_range` scales the whole stack.

    Slices of other types than 8/16-bit are read twice: a first pass finds the stack's range and
    refuses NaN and infinite values (naming the first slice that holds one) before any is yielded.
    """
    slices = iter_slices(path)
    first = next(slices)
    slices.close()
    if first.dtype in (np.uint8, np.uint16, bool):
        yield from (to_unit_range(s) for s in iter_slices(path))
        return
    low, high = np.inf, -np.inf
    for index, array in enumerate(iter_slices(path)):
        slice_low, slice_high = float(array.min()), float(array.max())
        if not (np.isfinite(slice_low) and np.isfinite(slice_high)):  # NaN spreads into min/max: no extra pass
            check_finite(array, str(path), IMAGE_VALUES, first_slice=index)
        low, high = min(low, slice_low), max(high, slice_high)
    yield from (to_unit_range(s, low, high) for s in iter_slices(path))


def to_unit_range(
    stack: np.ndarray, low: float | None = None, high: float | None = None, source: str = "image stack"
) -> np.ndarray:
    """Map intensities to float32 in [0, 1] (see the module docstring for the rule).

    ``low`` and ``high`` give the whole stack's range when ``stack`` is one slice of it (the caller
    has then checked the values). Otherwise NaN or infinite values are a :class:`DataError` naming
    ``source`` and the first slice that holds one.
    """
    if stack.dtype in FIXED_RANGES:
        return scale_to_unit(stack, *FIXED_RANGES[stack.dtype])
    is_float = np.issubdtype(stack.dtype, np.floating)
    stack = stack.astype(np.float32)
    if low is None or high is None:
        low, high = float(stack.min()), float(stack.max())
        if not (np.isfinite(low) and np.isfinite(high)):  # NaN spreads into min/max: no extra pass when clean
            check_finite(stack, source, IMAGE_VALUES)
    if is_float and low >= 0.0 and high <= 1.0:
        return stack
    return scale_to_unit(stack, low, high)


# The full range of 8- and 16-bit types and of booleans: no pass over the data finds it.
FIXED_RANGES = {np.dtype(np.uint8): (0.0, 255.0), np.dtype(np.uint16): (0.0, 65535.0), np.dtype(bool): (0.0, 1.0)}


def scale_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """float32 ``(values - low) / (high - low)``: intensities of range (low, high) in [0, 1]."""
    values = values.astype(np.float32)
    if (low, high) == (0.0, 1.0):
        return values
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def volume_intensity_range(volume, client=None) -> tuple[float, float]:
    """(low, high) of a chunked volume for :func:`scale_to_unit`: the rule of :func:`to_unit_range` applied
    chunk by chunk. 8/16-bit and boolean volumes need no pass over the data; other types (floats outside
    [0, 1], other integers) take their minimum and maximum in one dask pass (on ``client``'s cluster, else
    in this process), which also refuses NaN or infinite values."""
    dtype = np.dtype(volume.dtype)
    if dtype in FIXED_RANGES:
        return FIXED_RANGES[dtype]
    import dask.array as da  # lazy: Dask only for a volume whose range needs a pass over its data

    array = da.from_array(volume, chunks=volume.chunks, asarray=True)
    parts = [da.nanmin(array), da.nanmax(array), da.isfinite(array).all()]
    low, high, finite = client.compute(parts, sync=True) if client else da.compute(*parts)
    if not finite:
        raise DataError(f"{volume.address}: NaN or infinite values: em-unet needs finite intensities")
    if np.issubdtype(dtype, np.floating) and low >= 0.0 and high <= 1.0:
        return 0.0, 1.0
    return float(low), float(high)


def membrane_target(labels: np.ndarray, convention: str = "auto", source: str = "labels") -> np.ndarray:
    """float32 target with 1 = membrane from a label stack (the one place the convention is chosen).

    ``convention``: ``"isbi"`` (0 = membrane, 255 = interior), ``"mask"``
    (1 = membrane, 0 = interior) or ``"auto"`` ({0, 255} -> isbi, {0, 1} -> mask).
    Refused with a one-line :class:`DataError` naming ``source``: values outside the convention,
    NaN or infinite values, and labels with no membrane pixel or no cell interior pixel at all.
    """
    check_finite(labels, source, "labels are 0 = membrane, 255 = interior (ISBI) or a 0/1 membrane mask")
    convention = label_convention_of(np.unique(labels), convention, source)
    return (labels == MEMBRANE_VALUE[convention]).astype(np.float32)


MEMBRANE_VALUE = {"isbi": 0, "mask": 1}  # the label conventions: the value that marks membrane
LABEL_CONVENTIONS = ("auto", *MEMBRANE_VALUE)


def label_convention_of(values: np.ndarray, convention: str = "auto", source: str = "labels") -> str:
    """The convention (``"isbi"`` or ``"mask"``) of labels whose distinct values are ``values``, checked as
    :func:`membrane_target` describes (a whole volume's values can come from a pass over its chunks)."""
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(f"label convention must be one of {LABEL_CONVENTIONS}, got {convention!r}")
    values = np.unique(values)
    shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    allowed = {"isbi": {0, 255}, "mask": {0, 1}}
    found = set(values.tolist())
    if convention == "auto":
        fitting = [name for name, values_allowed in allowed.items() if found <= values_allowed]
        if not fitting:
            raise DataError(
                f"{source}: label values {{{shown}}} are neither ISBI labels {{0, 255}} (0 = membrane) "
                "nor a membrane mask {0, 1} (1 = membrane)"
            )
        if len(fitting) > 1:  # only a stack of zeros fits both
            raise DataError(
                f"{source}: every label is {shown}: all membrane in the ISBI convention (0 = membrane) and "
                "no membrane in a 0/1 mask (1 = membrane); labels need membrane and cell interior pixels"
            )
        convention = fitting[0]
    elif not found <= allowed[convention]:
        raise DataError(
            f"{source}: label values {{{shown}}} do not fit the {convention} convention {sorted(allowed[convention])}"
        )
    membrane, interior = (0, 255) if convention == "isbi" else (1, 0)
    named = "the ISBI convention" if convention == "isbi" else "a 0/1 mask"
    if membrane not in found:
        raise DataError(
            f"{source}: no membrane pixel ({membrane} in {named}) in any slice: every label is "
            f"{shown}; labels need membrane and cell interior pixels"
        )
    if interior not in found:
        raise DataError(
            f"{source}: every pixel is membrane ({membrane} in {named}): no cell interior pixel "
            f"({interior}) in any slice; labels need membrane and cell interior pixels"
        )
    return convention


def load_image_stack(path: str | Path) -> np.ndarray:
    """Read an EM stack as float32 ``(z, y, x)`` in [0, 1]."""
    return to_unit_range(read_stack(path), source=str(path))


def load_labelled_stack(
    image_path: str | Path, label_path: str | Path, convention: str = "auto", kind: str = "image"
) -> tuple[np.ndarray, np.ndarray]:
    """Read a stack (``kind``: an EM image, or a prediction) and its labels: float32 values in [0, 1]
    and float32 targets (1 = membrane)."""
    images = load_image_stack(image_path)
    labels = read_stack(label_path)
    if labels.shape != images.shape:
        raise DataError(
            f"{label_path}: label shape {labels.shape} differs from {kind} shape {images.shape} of {image_path}"
        )
    return images, membrane_target(labels, convention, source=str(label_path))
