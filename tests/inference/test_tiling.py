"""The one Tiling value: checked once, the command line's defaults, and one grid whatever the container."""

import dataclasses
import inspect

import numpy as np
import pytest
import tifffile

from em_unet.config import PredictConfig
from em_unet.errors import EmUnetError
from em_unet.inference import blockwise, predict
from em_unet.inference.tiling import Tiling
from em_unet.io.volumes import create_volume, open_volume


def test_tiling_is_frozen_and_checked_once_on_construction():
    tiling = Tiling()
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiling.margin = 3
    for values, message in [
        ({"tile": 8}, "--tile"),
        ({"tile": 20000}, "--tile"),
        ({"margin": -1}, "--margin"),
        ({"overlap": -2}, "--overlap"),
        ({"tile_batch": 0}, "--tile-batch"),
        ({"tile": 40, "margin": 16, "overlap": 16}, "--tile 40 px leaves no core"),
        ({"tile": 64, "margin": 32}, "--tile 64 px leaves no core"),
    ]:
        with pytest.raises(EmUnetError, match=message) as err:
            Tiling(**values)
        assert "\n" not in str(err.value)


def test_library_defaults_are_the_command_lines():
    cli_defaults = PredictConfig(model="m", stack="s", output="o.tif")
    assert Tiling() == Tiling.of(cli_defaults)
    assert (Tiling().tile, Tiling().margin, Tiling().overlap, Tiling().tile_batch) == (None, 16, 16, 4)
    for function in (predict.predict_slice, predict.predict_stack, predict.predict_file, blockwise.predict_volume):
        parameters = inspect.signature(function).parameters
        chunked = function is blockwise.predict_volume
        expected = blockwise.CHUNKED_TILING if chunked else Tiling()
        assert parameters["tiling"].default == expected, function.__name__
        for name in ("tta", "isbi", "binary", "overwrite", "block"):
            if name in parameters:
                assert parameters[name].default == getattr(cli_defaults, name), (function.__name__, name)


def test_auto_tiles_cover_wide_slices_with_little_twice():
    tiling = Tiling()
    assert tiling.grid(512, 512).tile_h == 544 and tiling.grid(512, 512).rows == 1  # ISBI: one whole-slice tile
    for side in (1000, 1100, 2048, 4096, 10000):
        grid = tiling.grid(side, 64)
        assert grid.tile_h <= 1024 and grid.tile_h % 32 == 0
        assert (grid.rows - 1) * grid.stride_h + grid.tile_h >= side + 2 * tiling.margin  # covered
        assert grid.rows * grid.tile_h < 1.1 * (side + 2 * tiling.margin * grid.rows)  # little predicted twice
        assert tiling.block_side(side) == min(side, grid.stride_h)


def predict_both(tmp_path, name, stack, tiff_flags=(), zarr_flags=()):
    """``em-unet predict`` of ``stack`` as a TIFF and as a Zarr volume (chunks of 128 px, one worker)."""
    from em_unet import cli

    tifffile.imwrite(tmp_path / f"{name}.tif", stack, photometric="minisblack")
    with create_volume(f"{tmp_path}/{name}.zarr", stack.shape, stack.dtype, (1, 128, 128)) as volume:
        volume[...] = stack
    model = str(tmp_path / "m.keras")
    tiff_out, zarr_out = tmp_path / f"{name}-p.tif", f"{tmp_path}/{name}-p.zarr"
    assert cli.main(["predict", model, str(tmp_path / f"{name}.tif"), "-o", str(tiff_out), *tiff_flags]) == 0
    assert cli.main(["predict", model, f"{tmp_path}/{name}.zarr", "-o", zarr_out, "--workers", "1", *zarr_flags]) == 0
    return tifffile.imread(tiff_out), open_volume(zarr_out)


@pytest.mark.slow
def test_a_stack_gives_the_same_map_as_tiff_and_as_zarr(tmp_path, isbi_dir):
    """A user who converts a stack to Zarr gets the same map: one tile grid, whatever the container."""
    import keras

    from em_unet.training.model import build_unet

    keras.utils.set_random_seed(2)
    build_unet(depth=2, base_filters=4).save(tmp_path / "m.keras")
    isbi = tifffile.imread(isbi_dir / "train-volume.tif")[:2]
    # ISBI's slices fit one tile: the same map at the defaults of both
    as_tiff, as_zarr = predict_both(tmp_path, "isbi", isbi)
    assert np.abs(as_tiff - as_zarr[...]).max() < 1e-5 and as_zarr.chunks == (1, 512, 512)  # a block per tile
    # a slice wider than one auto tile: the same map with the same overlap (blending across blocks and other
    # block sides: tests/inference/test_blockwise.py)
    wide = np.concatenate([isbi, isbi[:, :, ::-1], isbi], axis=2)[:, :300, :1100]
    assert Tiling().grid(300, 1100).cols == 2
    as_tiff, as_zarr = predict_both(tmp_path, "wide", wide, tiff_flags=["--overlap", "0"])
    assert np.abs(as_tiff - as_zarr[...]).max() < 1e-5
    assert as_zarr.chunks == (1, 300, 576) == (1, 300, blockwise.CHUNKED_TILING.block_side(1100))
