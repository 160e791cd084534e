"""How a slice is cut into tiles: the one :class:`Tiling` value and the tile grid it gives a slice.

Each slice is mirror-padded by ``margin`` px and cut into tiles predicted in batches of ``tile_batch``.
A tile's outer ``margin`` px only give context (the U-Net's zero padding distorts them) and get no weight;
inside that, neighbouring tiles overlap by ``overlap`` px, where their outputs are blended with linear
ramps.

The grid depends only on the slice's size and the tiling, never on the container: a TIFF stack predicted
in memory and the same data as a chunked volume predicted block by block, with the same tiling, use the
same tiles and give the same map. With ``tile`` None ("auto") a slice that fits in one tile of at most
1024 px a side (with its margins) is one tile; a larger one gets the fewest tiles of at most 1024 px that
cover it, each as small as that allows (multiples of 32 px), so little is predicted twice. Chunked volumes
are cut into blocks along the tiles' cores (:meth:`Tiling.block_side`), and by default they are not
blended (:data:`em_unet.inference.blockwise.CHUNKED_TILING`), so each block is exactly one tile: where a
slice fits one tile (ISBI's 512 px) the map is the same as in memory at the defaults; where it is tiled,
the seams are not blended (measured in ``benchmarks/tiling.py``: 0.03 lower V_rand with 256 px tiles;
``--overlap 16`` blends them at 1.6x the time).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from em_unet.config import PredictConfig, check_tiling
from em_unet.settings import check_value

AUTO_TILE_MAX = 1024  # px: the largest tile side "auto" picks
TILE_MULTIPLE = 32  # px: auto tiles suit U-Nets up to depth 5


def _round_up(value: int, multiple: int = TILE_MULTIPLE) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one slice of ``height`` x ``width`` px sit, in the coordinates of the slice
    mirror-padded by ``margin`` px on the top and left (and enough on the bottom and right for whole tiles).

    A part of a slice (a block of a chunked volume) predicted with the tiles of the grid that reach into it
    gets exactly the values the whole slice would.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    stride_h: int
    stride_w: int
    rows: int
    cols: int
    margin: int
    overlap: int

    @property
    def padded_shape(self) -> tuple[int, int]:
        return (self.rows - 1) * self.stride_h + self.tile_h, (self.cols - 1) * self.stride_w + self.tile_w

    @property
    def pad_mode(self) -> str:
        return "symmetric" if min(self.height, self.width) < 2 else "reflect"

    def padded_index(self, axis: int) -> np.ndarray:
        """For each padded row (axis 0) or column (axis 1), the row or column of the slice it mirrors."""
        size = (self.height, self.width)[axis]
        return np.pad(np.arange(size), (self.margin, self.padded_shape[axis] - size - self.margin), self.pad_mode)

    def origins(self, region: tuple[int, int, int, int] | None = None) -> list[tuple[int, int]]:
        """Padded (row, column) origins of the tiles whose output (the tile without its margins) reaches into
        ``region`` (y0, y1, x0, x1 of the slice, pixels; default the whole slice), row by row."""
        y0, y1, x0, x1 = region or (0, self.height, 0, self.width)
        core_h, core_w = self.tile_h - 2 * self.margin, self.tile_w - 2 * self.margin
        rows = [r * self.stride_h for r in range(self.rows)]
        cols = [c * self.stride_w for c in range(self.cols)]
        return [(r, c) for r in rows if r < y1 and r + core_h > y0 for c in cols if c < x1 and c + core_w > x0]

    def weight(self, views: int = 1) -> np.ndarray:
        """The blending weight of one of ``views`` outputs of a tile (read-only; made once per tile shape)."""
        return _tile_weight(self.tile_h, self.tile_w, self.margin, self.overlap, views)


def _ramp(side: int, margin: int, overlap: int) -> np.ndarray:
    """0 in the outer ``margin`` px (context only), a linear ramp over ``overlap`` px, 1 inside. Every pixel
    of a slice lies inside some tile's margins, so no weight sum is 0; and a tile whose margins alone reach
    into a block is not needed there."""
    from_edge = np.minimum(np.arange(side), np.arange(side)[::-1]).astype(np.float32)
    return np.clip((from_edge - margin + 1) / (overlap + 1), 0.0, 1.0)


@functools.lru_cache(maxsize=8)
def _tile_weight(tile_h: int, tile_w: int, margin: int, overlap: int, views: int) -> np.ndarray:
    weight = np.outer(_ramp(tile_h, margin, overlap), _ramp(tile_w, margin, overlap)) / views
    weight.flags.writeable = False
    return weight


def _axis(size: int, tile: int, margin: int, overlap: int) -> tuple[int, int]:
    """(tile origins' stride, number of tiles) along one axis of ``size`` px."""
    stride = tile - 2 * margin - overlap
    return stride, max(1, -(-(size + 2 * margin - tile) // stride) + 1)


@dataclass(frozen=True)
class Tiling:
    """How slices are cut into tiles, checked once on construction (a one-line error names the setting).

    ``tile``: tile side in pixels, a multiple of ``2**depth`` of the model, or None ("auto", see the module
    docstring); ``margin``: context border of each tile, pixels; ``overlap``: pixels over which neighbouring
    tiles are blended; ``tile_batch``: tiles per forward pass (sets peak memory). The defaults are the
    command line's.
    """

    tile: int | None = PredictConfig.tile
    margin: int = PredictConfig.margin
    overlap: int = PredictConfig.overlap
    tile_batch: int = PredictConfig.tile_batch

    def __post_init__(self):
        for name in ("tile", "margin", "overlap", "tile_batch"):
            check_value(PredictConfig.field(name), getattr(self, name), PredictConfig)
        check_tiling(self.tile, self.margin, self.overlap)

    @classmethod
    def of(cls, config: PredictConfig) -> Tiling:
        """The tiling of ``em-unet predict``'s settings."""
        return cls(config.tile, config.margin, config.overlap, config.tile_batch)

    def tile_side(self, size: int) -> int:
        """The tile side along an axis of ``size`` px: ``tile``, or the "auto" rule."""
        if self.tile:
            return self.tile
        whole = _round_up(size + 2 * self.margin)
        if whole <= AUTO_TILE_MAX:
            return whole
        core = AUTO_TILE_MAX - 2 * self.margin - self.overlap  # the most output one auto tile gives
        if core < TILE_MULTIPLE:  # margins that leave 1024 px tiles almost no core: the whole slice, one tile
            return whole
        count = -(-(size - self.overlap) // core)
        return _round_up(-(-(size + 2 * self.margin + (count - 1) * (2 * self.margin + self.overlap)) // count))

    def grid(self, height: int, width: int) -> TileGrid:
        """The tile grid of a ``height`` x ``width`` px slice."""
        tile_h, tile_w = self.tile_side(height), self.tile_side(width)
        stride_h, rows = _axis(height, tile_h, self.margin, self.overlap)
        stride_w, cols = _axis(width, tile_w, self.margin, self.overlap)
        return TileGrid(height, width, tile_h, tile_w, stride_h, stride_w, rows, cols, self.margin, self.overlap)

    def block_side(self, size: int) -> int:
        """The default block side of chunked prediction along an axis of ``size`` px: one tile's stride (its
        core less the overlap), so blocks follow the grid's tiles; at most ``size``."""
        return min(size, self.tile_side(size) - 2 * self.margin - self.overlap)
