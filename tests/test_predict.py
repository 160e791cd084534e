import keras
import numpy as np
import pytest
import tifffile

from em_unet.errors import EmUnetError
from em_unet.export import export_saved_model
from em_unet.model import build_unet
from em_unet.predict import _dihedral, load_predictor, predict_file, predict_slice, resolve_model_path


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(1)
    return build_unet(depth=2, base_filters=4)


def test_tiled_equals_whole_slice_beyond_receptive_field(tiny_model):
    image = np.random.default_rng(0).random((100, 130)).astype(np.float32)
    tiled = predict_slice(lambda t: tiny_model.predict(t, verbose=0), image, tile=96, margin=32, overlap=8)
    assert tiled.shape == image.shape and tiled.dtype == np.float32
    # whole-slice reference: the same slice padded to a multiple of 4 px
    whole = tiny_model.predict(np.pad(image, ((0, 4), (0, 2)), mode="reflect")[None, ..., None], verbose=0)
    whole = whole[0, :100, :130, 0]
    # depth 2, 3x3 convolutions: zero padding reaches about 23 px in; compare beyond 32 px of the slice edge
    assert np.abs(tiled - whole)[32:-32, 32:-32].max() < 1e-4


def test_auto_tile_is_the_whole_slice_where_it_fits_and_tiles_beyond():
    from em_unet.predict import tile_shape

    assert tile_shape(512, 512, None, 32) == (576, 576)
    assert tile_shape(100, 70, None, 8) == (128, 96)
    assert tile_shape(3000, 40, None, 32) == (1024, 128)
    assert tile_shape(100, 70, 64, 8) == (64, 64)
    shapes = []

    def identity(tiles):
        shapes.extend([tiles.shape[1:3]] * len(tiles))
        return tiles

    tall = np.random.default_rng(0).random((1500, 50)).astype(np.float32)
    assert np.allclose(predict_slice(identity, tall, margin=16, overlap=8), tall, atol=1e-6)
    assert set(shapes) == {(1024, 96)} and len(shapes) == 2
    shapes.clear()
    assert np.allclose(predict_slice(identity, tall[:100], margin=16, overlap=8, tta=True), tall[:100], atol=1e-6)
    assert sorted(set(shapes)) == [(96, 160), (160, 96)] and len(shapes) == 8  # one tile, 8 flips/rotations


def test_dihedral_inverse():
    tiles = np.random.default_rng(0).random((2, 8, 8, 1))
    for k in range(8):
        assert np.array_equal(_dihedral(_dihedral(tiles, k), k, inverse=True), tiles)
    assert len({_dihedral(tiles, k).tobytes() for k in range(8)}) == 8


def test_tta_of_a_symmetric_predictor_is_unchanged():
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    plain = predict_slice(lambda t: t, image, tile=32, margin=4, overlap=4)
    assert np.allclose(plain, image, atol=1e-6)
    assert np.allclose(predict_slice(lambda t: t, image, tile=32, margin=4, overlap=4, tta=True), image, atol=1e-6)


def test_predict_file_writes_fiji_tiff_from_savedmodel_parent(tiny_model, tmp_path):
    version = export_saved_model(tiny_model, "m", tmp_path / "models")
    assert resolve_model_path(tmp_path / "models" / "m") == version
    stack = np.random.default_rng(0).integers(0, 255, (2, 70, 90), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    out = predict_file(tmp_path / "models" / "m", tmp_path / "stack.tif", tmp_path / "prob.tif",
                       tile=64, margin=16, overlap=8, progress=False)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej
        probability = tif.asarray()
    assert probability.shape == (2, 70, 90) and probability.dtype == np.float32
    keras_prob = predict_file(version / "model.keras", tmp_path / "stack.tif", tmp_path / "k.tif",
                              tile=64, margin=16, overlap=8, progress=False)
    assert np.allclose(tifffile.imread(keras_prob), probability, atol=1e-5)
    isbi = predict_file(version, tmp_path / "stack.tif", tmp_path / "isbi.tif", tile=64, margin=16, overlap=8,
                        binary=True, isbi=True, progress=False)
    mask = tifffile.imread(isbi)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, (1 - probability) > 0.5)


def test_bad_model_paths(tmp_path):
    with pytest.raises(EmUnetError, match="no such model"):
        load_predictor(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmUnetError, match="not a SavedModel folder"):
        load_predictor(tmp_path / "empty")
    (tmp_path / "weights.h5").write_text("x")
    with pytest.raises(EmUnetError, match="not a model"):
        load_predictor(tmp_path / "weights.h5")


def test_existing_or_unwritable_output_is_refused(tiny_model, tmp_path):
    version = export_saved_model(tiny_model, "m", tmp_path)
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((1, 64, 64), np.uint8), photometric="minisblack")
    (tmp_path / "prob.tif").write_bytes(b"earlier result")
    with pytest.raises(EmUnetError, match="already exists"):
        predict_file(version, tmp_path / "s.tif", tmp_path / "prob.tif", tile=64, progress=False)
    assert (tmp_path / "prob.tif").read_bytes() == b"earlier result"
    (tmp_path / "blocker").write_text("file")
    with pytest.raises(EmUnetError, match="cannot create folder"):
        predict_file(version, tmp_path / "s.tif", tmp_path / "blocker" / "p.tif", tile=64, progress=False)


def test_rgb_stack_is_refused(tiny_model, tmp_path):
    from em_unet.errors import DataError

    version = export_saved_model(tiny_model, "m", tmp_path)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with pytest.raises(DataError, match="samples per pixel"):
        predict_file(version, tmp_path / "rgb.tif", tmp_path / "p.tif", tile=64, progress=False)


def test_tile_the_model_cannot_take(tiny_model, tmp_path):
    version = export_saved_model(tiny_model, "m", tmp_path)
    predictor = load_predictor(version)
    with pytest.raises(EmUnetError, match=r"cannot take tiles of shape \(30, 30, 1\)"):
        predictor(np.zeros((1, 30, 30, 1), np.float32))
    keras_predictor = load_predictor(version / "model.keras")
    with pytest.raises(EmUnetError, match="multiple of 2\\*\\*depth"):
        keras_predictor(np.zeros((1, 30, 30, 1), np.float32))
