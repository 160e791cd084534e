"""Membrane probabilities for stacks of any slice size, by overlap-tile prediction.

Each slice is mirror-padded and cut into square tiles predicted in batches.
Each tile's outer ``margin`` pixels only give context (the U-Net's zero padding
distorts them) and get almost no weight; inside that, neighbouring tiles overlap
by ``overlap`` pixels where their outputs are blended with linear ramps, so tile
seams do not show. Peak memory is set by the tile batch, not by the stack: slices are
predicted and written one at a time.
"""

from __future__ import annotations

import contextlib
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from em_unet.config import PredictConfig
from em_unet.errors import EmUnetError
from em_unet.inference.serving import AFFINITIES_NAME, INPUT_NAME, OUTPUT_NAME, SIGNATURE, Z_CONTEXT_NAME, versions
from em_unet.inference.tiling import TileGrid, Tiling
from em_unet.io.stacks import iter_image_slices, stack_shape, z_windows
from em_unet.io.writers import check_output, check_output_space, open_output, output_kind
from em_unet.segmentation.affinities import shifted
from em_unet.segmentation.offsets import OFFSETS_ATTRIBUTE

OUTPUT_KINDS = ("probability", "binary")


def resolve_model_path(path: str | Path) -> Path:
    """A ``.keras`` file, a SavedModel folder, a folder of numbered versions (the newest is taken), or a
    bioimage.io package (a ``.zip``, or a folder with an ``rdf.yaml``)."""
    from em_unet.inference.package import is_package  # lazy: the package module imports this one

    path = Path(path)
    if not path.exists():
        raise EmUnetError(f"{path}: no such model file or folder")
    if is_package(path):
        return path
    if path.is_file():
        if path.suffix != ".keras":
            raise EmUnetError(
                f"{path}: not a model (expected a .keras file, a SavedModel folder or a bioimage.io package .zip)"
            )
        return path
    if (path / "saved_model.pb").exists():
        return path
    found = versions(path)
    if found and (path / str(found[-1]) / "saved_model.pb").exists():
        return path / str(found[-1])
    raise EmUnetError(f"{path}: not a SavedModel folder (no saved_model.pb) nor a folder of numbered versions")


def load_predictor(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function from float32 ``(n, h, w, 1)`` tiles to the model's outputs ``(n, h, w, c)``: channel 0 the
    membrane probability, then an affinity U-Net's affinities, for the offsets in the function's
    ``affinity_offsets`` attribute (``()`` for a boundary U-Net).

    Raises a one-line :class:`EmUnetError` naming the path and the cause for a missing, corrupt or
    foreign model (see :func:`_load`).
    """
    path = resolve_model_path(path)
    predictor, offsets = _load(path)

    def checked(tiles: np.ndarray) -> np.ndarray:
        try:
            return predictor(tiles)
        except Exception as err:  # TF wraps the model's own size error in staging/runtime errors
            lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
            reason = next(
                (line for line in lines if "does not fit" in line or "multiples of" in line),
                lines[0] if lines else type(err).__name__,
            )[:300]
            raise EmUnetError(
                f"{path}: the model cannot take tiles of shape {tiles.shape[1:]} ({reason}); "
                "choose a --tile that is a multiple of 2**depth"
            ) from None

    checked.affinity_offsets = offsets
    checked.z_context = getattr(predictor, "z_context", 1)
    checked.volumetric = getattr(predictor, "volumetric", False)
    return checked


def section_predictor(run: Callable[[np.ndarray], np.ndarray], z_context: int, volumetric: bool):
    """A predictor of tiles ``(n, y, x, z_context)`` (each tile's section with its z-context, in z order) from
    ``run``, a model's forward pass: the 2-D U-Net takes the sections as channels; a 3-D U-Net takes them as a
    z-patch ``(n, z, y, x, 1)`` and its output for the middle section (``z_context // 2``) is kept. The
    predictor's ``z_context`` says how many sections its tiles hold."""

    def predict(tiles: np.ndarray) -> np.ndarray:
        if not volumetric:
            return run(tiles)
        return run(np.ascontiguousarray(np.moveaxis(tiles, -1, 1)[..., None]))[:, z_context // 2]

    predict.z_context, predict.volumetric = z_context, volumetric
    return predict


def z_context_of(model) -> tuple[int, bool]:
    """How many sections a Keras U-Net's tiles hold, and whether it is a 3-D U-Net: the 2-D U-Net's input
    channels; a 3-D U-Net's trained z-patch (kept by its input check,
    :class:`~em_unet.training.model.InputSizeCheck`)."""
    shape = model.input_shape
    if len(shape) == 4:
        return int(shape[-1] or 1), False
    check = next((layer for layer in model.layers if type(layer).__name__ == "InputSizeCheck"), None)
    return int(getattr(check, "z_context", 0) or getattr(check, "z_step", 1) or 1), True


def keras_predictor(model) -> Callable[[np.ndarray], np.ndarray]:
    """Tiles -> probabilities through a Keras model, traced once per tile shape (see :func:`section_predictor`)."""
    import tensorflow as tf  # lazy: TensorFlow only where a model runs

    serve = tf.function(lambda x: model(x, training=False), autograph=False)  # a plain call: nothing to convert
    return section_predictor(lambda tiles: serve(tf.constant(tiles)).numpy(), *z_context_of(model))


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an error's message (TensorFlow's run to pages), cut to ``limit`` chars."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


def load_keras_model(path: Path) -> Any:
    """A Keras 3 model from a ``.keras`` file, or a one-line error saying why the file is not one."""
    import keras  # lazy: TensorFlow only where a model runs

    import em_unet.training.model  # noqa: F401  lazy, with Keras: registers the U-Net's custom layer

    # Keras reports any unreadable file as "File not found": say what is wrong with it instead
    if path.stat().st_size == 0:
        raise EmUnetError(f"{path}: empty file (0 bytes), not a Keras model")
    if not zipfile.is_zipfile(path):
        raise EmUnetError(
            f"{path}: not a Keras model file (a .keras file is a zip archive; this one is not: "
            "truncated, or another format)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as err:
        raise EmUnetError(f"{path}: the Keras model file is corrupt ({_first_line(err)})") from None
    if "config.json" not in names:
        raise EmUnetError(f"{path}: not a Keras model file (its zip archive holds no config.json)")
    if damaged:
        raise EmUnetError(f"{path}: the Keras model file is corrupt ({damaged} in it fails its checksum)")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as err:  # a damaged config or weights file surfaces as many exception types
        raise EmUnetError(f"{path}: cannot load the Keras model ({type(err).__name__}: {_first_line(err)})") from None


def load_saved_model(path: Path):
    """em-unet's serving signature of a SavedModel folder as a predictor (see :func:`load_predictor`) and the
    affinity offsets of its ``affinities`` output (``()`` without one), or a one-line error saying why there is
    none."""
    import tensorflow as tf  # lazy: TensorFlow only where a model runs

    graph = path / "saved_model.pb"
    if graph.stat().st_size == 0:
        raise EmUnetError(f"{graph}: empty file (0 bytes), not a SavedModel")
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as err:  # corrupt protocol buffers and missing variables surface as many exception types
        reason = _first_line(err)
        if "Cannot parse" in reason or "Wire format" in reason:
            raise EmUnetError(f"{graph}: corrupt (not a SavedModel protocol buffer)") from None
        if "0 MetaGraphs" in reason:
            raise EmUnetError(f"{graph}: holds no model (0 MetaGraphs)") from None
        if any(sign in reason for sign in ("TensorSliceReader", "variables/variables", "sstable")):
            raise EmUnetError(
                f"{path}: the SavedModel's weights (variables/ folder) are missing or incomplete"
            ) from None
        raise EmUnetError(f"{path}: cannot load the SavedModel ({type(err).__name__}: {reason})") from None
    if SIGNATURE not in loaded.signatures:
        found = ", ".join(loaded.signatures) or "none"
        raise EmUnetError(
            f"{path}: the SavedModel has no {SIGNATURE} signature (signatures: {found}); "
            "export the model with em-unet (export_saved_model)"
        )
    signature = loaded.signatures[SIGNATURE]
    inputs = sorted(signature.structured_input_signature[1])
    outputs = sorted(signature.structured_outputs)
    if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
        raise EmUnetError(
            f"{path}: the {SIGNATURE} signature takes {inputs} and returns {outputs}; em-unet needs "
            f"input {INPUT_NAME!r} and output {OUTPUT_NAME!r}"
        )
    offsets = tuple(map(tuple, loaded.affinity_offsets[0].numpy().tolist())) if AFFINITIES_NAME in outputs else ()
    shape = signature.structured_input_signature[1][INPUT_NAME].shape
    volumetric = shape.rank == 5
    z_context = int(getattr(loaded, Z_CONTEXT_NAME)[0].numpy()) if volumetric else int(shape[-1] or 1)

    def predict(tiles, _keep=loaded):  # the loaded object owns the variables the signature reads: keep it alive
        outputs = signature(**{INPUT_NAME: tf.constant(tiles)})
        if not offsets:
            return outputs[OUTPUT_NAME].numpy()
        return np.concatenate([outputs[OUTPUT_NAME].numpy(), outputs[AFFINITIES_NAME].numpy()], axis=-1)

    return section_predictor(predict, z_context, volumetric), offsets


def affinity_offsets_of(model) -> tuple[tuple[int, int], ...]:
    """The affinity offsets a Keras U-Net predicts after its membrane channel: its output layer's (an
    ``AffinityHead``, which keeps them), or none for a boundary U-Net."""
    for layer in getattr(model, "layers", ()):
        offsets = getattr(layer, "affinity_offsets", None) or affinity_offsets_of(layer)
        if offsets:
            return tuple(tuple(offset) for offset in offsets)
    return ()


def _load(path: Path):
    """A predictor and its affinity offsets from a resolved model path (see :func:`resolve_model_path`);
    one-line errors for files that are not loadable models."""
    from em_unet.inference import package  # lazy: the package module imports this one

    if package.is_package(path):
        return package.package_predictor(path), ()
    if path.suffix == ".keras":
        model = load_keras_model(path)
        return keras_predictor(model), affinity_offsets_of(model)
    return load_saved_model(path)


def _dihedral(tiles: np.ndarray, k: int, inverse: bool = False) -> np.ndarray:
    """The k-th of the 8 flips/rotations of tiles (n, h, w, c), or its inverse."""
    flip, turns = divmod(k, 4)
    if not inverse:
        tiles = tiles[:, :, ::-1] if flip else tiles
        return np.rot90(tiles, turns, axes=(1, 2))
    tiles = np.rot90(tiles, -turns, axes=(1, 2))
    return tiles[:, :, ::-1] if flip else tiles


def _turned_offset(offset: tuple[int, int], k: int) -> tuple[int, int]:
    """Where an offset between two pixels of view ``k`` points once the view is turned back (the inverse of
    :func:`_dihedral`), found by turning back an image that marks both pixels."""
    reach = max(abs(v) for v in offset)
    marks = np.zeros((1, 2 * reach + 1, 2 * reach + 1, 1))
    marks[0, reach, reach, 0], marks[0, reach + offset[0], reach + offset[1], 0] = 1, 2
    back = _dihedral(marks, k, inverse=True)[0, ..., 0]
    (y1, x1), (y2, x2) = np.argwhere(back == 1)[0], np.argwhere(back == 2)[0]
    return int(y2 - y1), int(x2 - x1)


def view_channels(offsets, k: int) -> list[tuple[int, int]]:
    """For each affinity channel i (offset o_i) of an image, the channel j of the model's output on view ``k``
    that holds it once turned back, and its sign: +1 when channel j turned back pairs p with p + o_i, -1 when it
    pairs p with p - o_i (then channel i at p is channel j at p + o_i). A one-line error when a turned offset
    is not in the set (test-time augmentation needs offsets closed under flips and quarter turns, up to sign)."""
    offsets = [tuple(o) for o in offsets]
    found: dict[int, tuple[int, int]] = {}
    for j, offset in enumerate(offsets):
        turned = _turned_offset(offset, k)
        negative = (-turned[0], -turned[1])
        if turned in offsets:
            found[offsets.index(turned)] = (j, 1)
        elif negative in offsets:
            found[offsets.index(negative)] = (j, -1)
        else:
            raise EmUnetError(
                f"--tta: affinity offset {offset[0]},{offset[1]} turns into {turned[0]},{turned[1]}, which is not "
                "among the model's offsets (nor its negative): TTA needs offsets closed under flips and quarter "
                "turns; predict without --tta"
            )
    return [found[i] for i in range(len(offsets))]


def _turned_back(output: np.ndarray, k: int, offsets, channels: list) -> tuple[np.ndarray, np.ndarray | None]:
    """One view's output ``(h, w, 1 + offsets)`` turned back to the image, its affinity channels put where the
    image's offsets are (``channels``: :func:`view_channels` of view ``k``), and where each value is known (None:
    everywhere; a channel moved by its offset is unknown where p + o_i leaves the tile)."""
    back = _dihedral(output[None], k, inverse=True)[0]
    if not offsets or k == 0:
        return back, None
    values, known = np.empty_like(back), np.ones(back.shape, bool)
    values[..., 0] = back[..., 0]
    for i, (j, sign) in enumerate(channels):
        if sign > 0:
            values[..., 1 + i] = back[..., 1 + j]
        else:
            values[..., 1 + i] = shifted(back[..., 1 + j], offsets[i], 0.0)
            known[..., 1 + i] = shifted(np.ones(back.shape[:2], bool), offsets[i], False)
    return values, known


class _Blend:
    """The weighted sum of the tiles of ``grid`` that reach into ``region`` (y0, y1, x0, x1 of the slice,
    pixels), read through ``read_padded`` (see :func:`predict_regions`); each tile comes back as ``views``
    outputs (8 with test-time augmentation) of ``channels`` channels."""

    def __init__(
        self,
        read_padded: Callable[[int, int, int, int], np.ndarray],
        grid: TileGrid,
        region,
        views: int,
        channels: int = 1,
    ):
        self.grid, self.region = grid, region
        self.origins = grid.origins(region)
        self.top = min(r for r, _ in self.origins)
        self.left = min(c for _, c in self.origins)
        bottom = max(r for r, _ in self.origins) + grid.tile_h
        right = max(c for _, c in self.origins) + grid.tile_w
        self.padded = read_padded(self.top, bottom, self.left, right)
        self.window = grid.weight(views)[..., None]
        self.total = np.zeros((bottom - self.top, right - self.left, channels), np.float32)
        self.weight = np.zeros_like(self.total)
        self.waiting = len(self.origins) * views  # tile outputs not yet added

    def tile(self, origin: tuple[int, int]) -> np.ndarray:
        r, c = origin[0] - self.top, origin[1] - self.left
        return self.padded[r : r + self.grid.tile_h, c : c + self.grid.tile_w]

    def add(self, origin: tuple[int, int], output: np.ndarray, known: np.ndarray | None = None) -> None:
        """Add one tile's ``output`` (h, w, channels), weighted by the tile's window (and 0 where not ``known``)."""
        r, c = origin[0] - self.top, origin[1] - self.left
        weight = self.window if known is None else self.window * known
        self.total[r : r + self.grid.tile_h, c : c + self.grid.tile_w] += output * weight
        self.weight[r : r + self.grid.tile_h, c : c + self.grid.tile_w] += np.broadcast_to(weight, output.shape)
        self.waiting -= 1

    def result(self) -> np.ndarray:
        y0, y1, x0, x1 = self.region
        m = self.grid.margin
        inside = (slice(y0 + m - self.top, y1 + m - self.top), slice(x0 + m - self.left, x1 + m - self.left))
        return self.total[inside] / self.weight[inside]


def predict_regions(
    predictor: Callable[[np.ndarray], np.ndarray],
    regions: Iterable[tuple[Callable[[int, int, int, int], np.ndarray], TileGrid, tuple[int, int, int, int]]],
    tile_batch: int = PredictConfig.tile_batch,
    tta: bool = PredictConfig.tta,
    channels: bool = False,
) -> Iterator[np.ndarray]:
    """Membrane probability (float32) of each ``(read_padded, grid, region)`` of ``regions``, in order; with
    ``channels``, all the model's outputs ``(channels, h, w)`` (an affinity U-Net's affinities after the
    membrane probability, for the offsets of the predictor's ``affinity_offsets``).

    ``region`` is (y0, y1, x0, x1) of one slice, pixels; it is predicted from the tiles of ``grid`` that
    reach into it, and ``read_padded(r0, r1, c0, c1)`` returns that window of the mirror-padded slice as
    float32 in [0, 1]. Tiles of successive regions share forward passes of up to ``tile_batch`` tiles (a
    stack of small slices runs several slices per pass); ``regions`` is read lazily, one batch ahead,
    so memory stays bounded for any number of regions. With ``tta`` each tile's 8 flips/rotations are
    batched like tiles and their outputs averaged; affinity channels are turned with them (an offset turned
    by a view is read from the channel that holds it there, :func:`view_channels`).
    """
    views = (0, 2, 4, 6, 1, 3, 5, 7) if tta else (0,)  # odd views turn a quarter: same shapes together
    offsets = tuple(getattr(predictor, "affinity_offsets", ())) if channels else ()
    turned = {k: view_channels(offsets, k) for k in views}  # once per view; a one-line error before any work
    count = 1 + len(offsets) if channels else 1
    pending: list[_Blend] = []  # regions in order, the oldest first; each is yielded when complete
    batch: list[tuple[_Blend, tuple[int, int], int, tuple[int, int]]] = []  # (region, tile origin, view, shape)

    def run(batch):
        tiles = np.stack([_dihedral(_with_sections(blend.tile(origin))[None], k)[0] for blend, origin, k, _ in batch])
        out = predictor(np.ascontiguousarray(tiles))
        for (blend, origin, k, _), output in zip(batch, out):
            blend.add(origin, *_turned_back(output[..., :count], k, offsets, turned[k]))

    def finished():
        while pending and pending[0].waiting == 0:
            result = pending.pop(0).result()
            yield np.moveaxis(result, -1, 0) if channels else result[..., 0]

    for read_padded, grid, region in regions:
        blend = _Blend(read_padded, grid, region, len(views), count)
        pending.append(blend)
        for origin in blend.origins:
            for k in views:
                shape = (grid.tile_w, grid.tile_h) if k % 2 else (grid.tile_h, grid.tile_w)  # odd k: a quarter turn
                if batch and (len(batch) == tile_batch or shape != batch[0][3]):
                    run(batch)
                    batch = []
                    yield from finished()
                batch.append((blend, origin, k, shape))
    if batch:
        run(batch)
    yield from finished()


def _with_sections(tile: np.ndarray) -> np.ndarray:
    """A tile ``(y, x)`` of one section, or ``(y, x, K)`` of a section with its z-context, as ``(y, x, K)``."""
    return tile[..., None] if tile.ndim == 2 else tile


def _whole_slice(image: np.ndarray, tiling: Tiling):
    """``(read_padded, grid, region)`` of a whole 2-D slice ``(y, x)``, or of a slice with its z-context ``(y,
    x, K)``, for :func:`predict_regions`."""
    height, width = image.shape[:2]
    grid = tiling.grid(height, width)
    padded_h, padded_w = grid.padded_shape
    margin = tiling.margin
    pad = ((margin, padded_h - height - margin), (margin, padded_w - width - margin)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image.astype(np.float32, copy=False), pad, mode=grid.pad_mode)
    return (lambda r0, r1, c0, c1: padded[r0:r1, c0:c1]), grid, (0, height, 0, width)


def predict_slice(
    predictor: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tiling: Tiling = Tiling(),
    tta: bool = PredictConfig.tta,
) -> np.ndarray:
    """Membrane probability (float32, same shape) of one 2-D slice in [0, 1] by overlap-tile prediction,
    cut into tiles as ``tiling`` says; ``tta`` averages the 8 flips/rotations of every tile."""
    return next(predict_stack(predictor, [image], tiling, tta))


def predict_stack(
    predictor: Callable[[np.ndarray], np.ndarray],
    images: Iterable[np.ndarray],
    tiling: Tiling = Tiling(),
    tta: bool = PredictConfig.tta,
    progress: bool = False,
    channels: bool = False,
    count: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield the membrane probability of each float32 slice in [0, 1] of ``images`` (an array or an
    iterator), in order; with ``channels`` all the model's outputs ``(channels, y, x)`` (see
    :func:`predict_regions`). Slices smaller than a tile share forward passes of ``tiling.tile_batch`` tiles.

    A predictor with z-context (its ``z_context`` K > 1) gets each slice with the K // 2 sections before it and
    those after it, mirrored at the ends of ``images`` (``count`` slices: needed when ``images`` is an
    iterator)."""
    total = len(images) if hasattr(images, "__len__") else count
    z_context = getattr(predictor, "z_context", 1)
    if z_context > 1:
        if total is None:
            raise ValueError("predict_stack: give count, the number of slices, for a model with z-context")
        images = z_windows(images, total, z_context)
    regions = (_whole_slice(image, tiling) for image in images)
    yield from tqdm(
        predict_regions(predictor, regions, tiling.tile_batch, tta, channels),
        desc="predicting",
        unit="slice",
        total=total,
        disable=not progress,
    )


def model_slices(model_path: str | Path, stack_path: str | Path) -> Iterator[np.ndarray]:
    """The slices of a stack as the model takes them: float32 in [0, 1] by em-unet's intensity rule, or through
    a bioimage.io package's own preprocessing."""
    from em_unet.inference import package  # lazy: the package module imports this one

    model_path = resolve_model_path(model_path)
    if package.is_package(model_path):
        return package.package_slices(model_path, stack_path)
    return iter_image_slices(stack_path)


def model_margin(model_path: str | Path, margin: int) -> int:
    """The tile margin (px) to predict with: a bioimage.io package's halo, else ``margin``."""
    from em_unet.inference import package  # lazy: the package module imports this one

    model_path = resolve_model_path(model_path)
    return package.read_package(model_path).halo if package.is_package(model_path) else margin


def affinity_attributes(offsets, model_path: str | Path) -> dict:
    """What an affinity output records: its offsets (channel c pairs p with p + offset c) and the model."""
    return {OFFSETS_ATTRIBUTE: [list(offset) for offset in offsets], "model": str(model_path)}


def affinity_channel_names(offsets) -> list[str]:
    return [f"affinity {dy},{dx}" for dy, dx in offsets]


def check_affinity_model(predictor, model_path: str | Path) -> tuple:
    """The offsets of an affinity U-Net's predictor, or a one-line error for a boundary U-Net."""
    offsets = tuple(getattr(predictor, "affinity_offsets", ()))
    if not offsets:
        raise EmUnetError(
            f"{model_path}: --affinities needs an affinity U-Net (trained with --target affinities); this model "
            "predicts the membrane probability only"
        )
    return offsets


def predict_file(
    model_path: str | Path,
    stack_path: str | Path,
    output_path: str | Path,
    tiling: Tiling = Tiling(),
    tta: bool = PredictConfig.tta,
    binary: bool = PredictConfig.binary,
    isbi: bool = PredictConfig.isbi,
    overwrite: bool = PredictConfig.overwrite,
    progress: bool = True,
    affinities_path: str | Path | None = None,
) -> Path:
    """Predict a stack file and write a TIFF stack that opens in Fiji.

    The output is float32 membrane probability; ``isbi`` writes 1 - probability
    (1 = cell interior, the ISBI 2012 submission convention); ``binary`` writes
    uint8 0/255 thresholded at 0.5 (255 = membrane, or cell interior with ``isbi``).
    ``affinities_path``: also write an affinity U-Net's affinities there, float32, as a TIFF hyperstack
    ``(z, c, y, x)`` with the offsets in its Info (:class:`~em_unet.io.writers.TiffChannelsWriter`).
    """
    check_output(output_path, overwrite)  # before the model loads: fail fast
    shape = stack_shape(stack_path)
    check_output_space(output_path, shape, np.uint8 if binary else np.float32)
    if affinities_path is not None:
        if output_kind(affinities_path) != "tiff":
            raise EmUnetError(
                f"--affinities {affinities_path}: a chunked affinity output is predicted from a chunked input; "
                "write a TIFF (.tif) for a TIFF input"
            )
        check_output(affinities_path, overwrite)
    predictor = load_predictor(model_path)
    offsets = check_affinity_model(predictor, model_path) if affinities_path is not None else ()
    if offsets:
        check_output_space(affinities_path, (shape[0], len(offsets), *shape[1:]), np.float32)
    images = model_slices(model_path, stack_path)  # a bad stack fails inside open_output, which then leaves nothing
    with contextlib.ExitStack() as outputs:
        writer = outputs.enter_context(
            open_output(output_path, dtype=np.uint8 if binary else np.float32, overwrite=overwrite)
        )
        affinity_writer = None
        if offsets:
            affinity_writer = outputs.enter_context(
                open_output(
                    affinities_path,
                    dtype=np.float32,
                    overwrite=overwrite,
                    channels=len(offsets),
                    attributes=affinity_attributes(offsets, model_path),
                    channel_names=affinity_channel_names(offsets),
                )
            )
        slices = predict_stack(predictor, images, tiling, tta, progress, channels=bool(offsets), count=shape[0])
        for outputs_of_slice in slices:
            probability = outputs_of_slice[0] if offsets else outputs_of_slice
            value = 1.0 - probability if isbi else probability
            writer.write(np.where(value > 0.5, 255, 0) if binary else value)
            if affinity_writer is not None:
                affinity_writer.write(outputs_of_slice[1:])
    return Path(output_path)
