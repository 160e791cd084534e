"""Membrane probabilities for stacks of any slice size, by overlap-tile prediction.

Each slice is mirror-padded and cut into square tiles predicted in batches.
Each tile's outer ``margin`` pixels only give context (the U-Net's zero padding
distorts them) and get almost no weight; inside that, neighbouring tiles overlap
by ``overlap`` pixels where their outputs are blended with linear ramps, so tile
seams do not show. Peak memory is set by the tile batch, not by the stack: slices are
predicted and written one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from em_unet.errors import EmUnetError

OUTPUT_KINDS = ("probability", "binary")


def resolve_model_path(path: str | Path) -> Path:
    """A ``.keras`` file, a SavedModel folder, or a folder of numbered versions (the newest is taken)."""
    from em_unet.export import versions

    path = Path(path)
    if not path.exists():
        raise EmUnetError(f"{path}: no such model file or folder")
    if path.is_file():
        if path.suffix != ".keras":
            raise EmUnetError(f"{path}: not a model (expected a .keras file or a SavedModel folder)")
        return path
    if (path / "saved_model.pb").exists():
        return path
    found = versions(path)
    if found and (path / str(found[-1]) / "saved_model.pb").exists():
        return path / str(found[-1])
    raise EmUnetError(f"{path}: not a SavedModel folder (no saved_model.pb) nor a folder of numbered versions")


def load_predictor(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function from float32 ``(n, h, w, 1)`` tiles to membrane probabilities of the same shape."""
    import tensorflow as tf

    path = resolve_model_path(path)
    predictor = _load(path)

    def checked(tiles: np.ndarray) -> np.ndarray:
        try:
            return predictor(tiles)
        except Exception as err:  # TF wraps the model's own size error in staging/runtime errors
            lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
            reason = next((line for line in lines if "does not fit" in line or "multiples of" in line),
                          lines[0] if lines else type(err).__name__)[:300]
            raise EmUnetError(f"{path}: the model cannot take tiles of shape {tiles.shape[1:]} ({reason}); "
                              "choose a --tile that is a multiple of 2**depth") from None

    return checked


def keras_predictor(model) -> Callable[[np.ndarray], np.ndarray]:
    """Tiles -> probabilities through a Keras model, traced once per tile shape."""
    import tensorflow as tf

    serve = tf.function(lambda x: model(x, training=False))
    return lambda tiles: serve(tf.constant(tiles)).numpy()


def _load(path: Path):
    import tensorflow as tf

    if path.suffix == ".keras":
        import keras

        import em_unet.model  # noqa: F401  registers the custom layer

        return keras_predictor(keras.saving.load_model(path, compile=False))
    loaded = tf.saved_model.load(str(path))
    if "serving_default" not in loaded.signatures:
        raise EmUnetError(f"{path}: SavedModel has no serving_default signature")
    signature = loaded.signatures["serving_default"]
    return lambda tiles: signature(image=tf.constant(tiles))["membrane_probability"].numpy()


def _ramp(side: int, margin: int, overlap: int) -> np.ndarray:
    """1e-6 in the outer ``margin`` px, a linear ramp over ``overlap`` px, 1 inside."""
    from_edge = np.minimum(np.arange(side), np.arange(side)[::-1]).astype(np.float32)
    return np.clip((from_edge - margin + 1) / (overlap + 1), 1e-6, 1.0)


AUTO_TILE_MAX = 1024  # px: the largest tile side "auto" picks; larger slices are tiled
TILE_MULTIPLE = 32  # px: auto tiles suit U-Nets up to depth 5


def tile_shape(height: int, width: int, tile: int | None, margin: int) -> tuple[int, int]:
    """``tile`` x ``tile``, or for ``None`` ("auto") the whole slice plus its margins, rounded up to a
    multiple of 32 px and at most 1024 px a side: one forward pass per slice where that fits."""
    if tile:
        return tile, tile
    def fit(side):
        return min(AUTO_TILE_MAX, -(-(side + 2 * margin) // TILE_MULTIPLE) * TILE_MULTIPLE)
    return fit(height), fit(width)


def _tiling(size: int, tile: int, margin: int, overlap: int) -> tuple[int, int]:
    """(tile origins' stride, number of tiles) along one axis of ``size`` px."""
    stride = tile - 2 * margin - overlap
    if margin < 0 or overlap < 0 or stride < 1:
        raise ValueError(f"margin {margin} px and overlap {overlap} px leave no core in {tile} px tiles")
    return stride, max(1, -(-(size + 2 * margin - tile) // stride) + 1)


def _dihedral(tiles: np.ndarray, k: int, inverse: bool = False) -> np.ndarray:
    """The k-th of the 8 flips/rotations of tiles (n, h, w, c), or its inverse."""
    flip, turns = divmod(k, 4)
    if not inverse:
        tiles = tiles[:, :, ::-1] if flip else tiles
        return np.rot90(tiles, turns, axes=(1, 2))
    tiles = np.rot90(tiles, -turns, axes=(1, 2))
    return tiles[:, :, ::-1] if flip else tiles


def predict_slice(
    predictor: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile: int | None = None,
    margin: int = 32,
    overlap: int = 16,
    tile_batch: int = 4,
    tta: bool = False,
) -> np.ndarray:
    """Membrane probability (float32, same shape) of one 2-D slice in [0, 1] by overlap-tile prediction.

    Args:
        tile: tile side in pixels (a multiple of ``2**depth`` of the model), or None: the
            whole slice in one tile where it fits (:func:`tile_shape`).
        margin: pixels at each tile border used as context only; the slice is
            mirror-padded by this much so every pixel is covered.
        overlap: pixels over which neighbouring tiles' outputs are blended.
        tile_batch: tiles per forward pass (sets peak memory).
        tta: average the 8 flips/rotations of every tile.
    """
    height, width = image.shape
    tile_h, tile_w = tile_shape(height, width, tile, margin)
    stride_h, rows = _tiling(height, tile_h, margin, overlap)
    stride_w, cols = _tiling(width, tile_w, margin, overlap)
    padded_h = (rows - 1) * stride_h + tile_h
    padded_w = (cols - 1) * stride_w + tile_w
    pad = ((margin, padded_h - height - margin), (margin, padded_w - width - margin))
    padded = np.pad(image.astype(np.float32), pad, mode="symmetric" if min(height, width) < 2 else "reflect")
    window = np.outer(_ramp(tile_h, margin, overlap), _ramp(tile_w, margin, overlap))
    total = np.zeros((padded_h, padded_w), np.float32)
    weight = np.zeros((padded_h, padded_w), np.float32)
    origins = [(r * stride_h, c * stride_w) for r in range(rows) for c in range(cols)]
    for start in range(0, len(origins), tile_batch):
        batch_origins = origins[start : start + tile_batch]
        tiles = np.stack([padded[r : r + tile_h, c : c + tile_w] for r, c in batch_origins])[..., None]
        if tta:
            out = np.mean([_dihedral(predictor(np.ascontiguousarray(_dihedral(tiles, k))), k, inverse=True)
                           for k in range(8)], axis=0)
        else:
            out = predictor(tiles)
        for (r, c), probability in zip(batch_origins, out[..., 0]):
            total[r : r + tile_h, c : c + tile_w] += probability * window
            weight[r : r + tile_h, c : c + tile_w] += window
    return (total / weight)[margin : margin + height, margin : margin + width]


def predict_stack(
    predictor: Callable[[np.ndarray], np.ndarray],
    images: Iterable[np.ndarray],
    tile: int | None = None,
    margin: int = 32,
    overlap: int = 16,
    tile_batch: int = 4,
    tta: bool = False,
    progress: bool = False,
) -> Iterator[np.ndarray]:
    """Yield the membrane probability of each float32 slice in [0, 1] of ``images`` (an array or an iterator)."""
    from tqdm import tqdm

    for image in tqdm(images, desc="predicting", unit="slice", disable=not progress):
        yield predict_slice(predictor, image, tile, margin, overlap, tile_batch, tta)


def predict_file(
    model_path: str | Path,
    stack_path: str | Path,
    output_path: str | Path,
    tile: int | None = None,
    margin: int = 32,
    overlap: int = 16,
    tile_batch: int = 4,
    tta: bool = False,
    binary: bool = False,
    isbi: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Predict a stack file and write a TIFF stack that opens in Fiji.

    The output is float32 membrane probability; ``isbi`` writes 1 - probability
    (1 = cell interior, the ISBI 2012 submission convention); ``binary`` writes
    uint8 0/255 thresholded at 0.5 (255 = membrane, or cell interior with ``isbi``).
    """
    import tifffile

    from em_unet.data import iter_image_slices
    from em_unet.outputs import atomic_output, check_writable

    check_writable(output_path, overwrite)  # before the model loads: fail fast
    predictor = load_predictor(model_path)
    images = iter_image_slices(stack_path)  # a bad stack fails inside atomic_output, which then leaves nothing
    with atomic_output(output_path, overwrite) as tmp:
        with tifffile.TiffWriter(tmp, imagej=True) as writer:
            for probability in predict_stack(predictor, images, tile, margin, overlap, tile_batch, tta, progress):
                value = 1.0 - probability if isbi else probability
                if binary:
                    value = np.where(value > 0.5, 255, 0).astype(np.uint8)
                writer.write(value.astype(np.uint8 if binary else np.float32), contiguous=True)
    return Path(output_path)
