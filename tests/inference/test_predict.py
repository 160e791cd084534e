import io
import re
import shutil
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
import tifffile

from em_unet.errors import EmUnetError
from em_unet.inference.export import export_saved_model
from em_unet.inference.predict import (
    _dihedral,
    load_predictor,
    predict_file,
    predict_slice,
    predict_stack,
    resolve_model_path,
    view_channels,
)
from em_unet.inference.tiling import Tiling
from em_unet.io.stacks import read_channel_stack
from em_unet.segmentation.affinities import shifted
from em_unet.training.model import build_unet


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(1)
    return build_unet(depth=2, base_filters=4)


def test_tiled_equals_whole_slice_beyond_receptive_field(tiny_model):
    image = np.random.default_rng(0).random((100, 130)).astype(np.float32)
    tiled = predict_slice(
        lambda t: tiny_model.predict(t, verbose=0), image, tiling=Tiling(tile=96, margin=32, overlap=8)
    )
    assert tiled.shape == image.shape and tiled.dtype == np.float32
    # whole-slice reference: the same slice padded to a multiple of 4 px
    whole = tiny_model.predict(np.pad(image, ((0, 4), (0, 2)), mode="reflect")[None, ..., None], verbose=0)
    whole = whole[0, :100, :130, 0]
    # depth 2, 3x3 convolutions: zero padding reaches about 23 px in; compare beyond 32 px of the slice edge
    assert np.abs(tiled - whole)[32:-32, 32:-32].max() < 1e-4


def test_auto_tile_is_the_whole_slice_where_it_fits_and_tiles_beyond():
    def tile_shape(height, width, tile, margin, overlap=16):
        tiling = Tiling(tile, margin, overlap)
        return tiling.tile_side(height), tiling.tile_side(width)

    assert tile_shape(512, 512, None, 32) == (576, 576)
    assert tile_shape(100, 70, None, 8) == (128, 96)
    # beyond 1024 px: the fewest tiles of at most 1024 px, each as small as covers the slice (was 1024 px
    # tiles, whose last one could be mostly mirror padding: 3000 px took 4 x 1024 px, now 4 x 832 px)
    assert tile_shape(3000, 40, None, 32) == (832, 128)
    assert Tiling(None, 32, 16).grid(3000, 40).rows == 4
    assert tile_shape(100, 70, 64, 8) == (64, 64)
    shapes = []

    def identity(tiles):
        shapes.extend([tiles.shape[1:3]] * len(tiles))
        return tiles

    tall = np.random.default_rng(0).random((1500, 50)).astype(np.float32)
    assert np.allclose(predict_slice(identity, tall, tiling=Tiling(margin=16, overlap=8)), tall, atol=1e-6)
    assert set(shapes) == {(800, 96)} and len(shapes) == 2  # two tiles of 800 px (were 1024 px)
    shapes.clear()
    assert np.allclose(
        predict_slice(identity, tall[:100], tta=True, tiling=Tiling(margin=16, overlap=8)), tall[:100], atol=1e-6
    )
    assert sorted(set(shapes)) == [(96, 160), (160, 96)] and len(shapes) == 8  # one tile, 8 flips/rotations


class CountingPredictor:
    """The tiny model's predictions, recording the shape of every forward pass."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, tiles):
        self.calls.append(tiles.shape)
        return self.model.predict(tiles, verbose=0)


def test_slices_smaller_than_a_tile_share_forward_passes(tiny_model):
    stack = np.random.default_rng(2).random((5, 60, 52)).astype(np.float32)
    one_by_one = [
        predict_slice(lambda t: tiny_model.predict(t, verbose=0), s, tiling=Tiling(margin=16, tile_batch=1))
        for s in stack
    ]
    for tile_batch, passes in ((3, [3, 2]), (5, [5]), (8, [5])):
        predictor = CountingPredictor(tiny_model)
        shared = list(predict_stack(predictor, stack, tiling=Tiling(margin=16, tile_batch=tile_batch)))
        assert [shape[0] for shape in predictor.calls] == passes
        assert len(shared) == 5 and all(a.shape == (60, 52) for a in shared)
        assert max(np.abs(a - b).max() for a, b in zip(shared, one_by_one)) < 1e-5


def test_tiles_of_a_slice_larger_than_a_tile_are_batched_with_the_next_slices(tiny_model):
    stack = np.random.default_rng(3).random((3, 100, 70)).astype(np.float32)
    predictor = CountingPredictor(tiny_model)
    shared = list(predict_stack(predictor, stack, tiling=Tiling(tile=48, margin=8, overlap=4, tile_batch=5)))
    single = [
        predict_slice(lambda t: tiny_model.predict(t, verbose=0), s, Tiling(48, 8, 4, tile_batch=1)) for s in stack
    ]
    per_slice = len(Tiling(48, 8, 4).grid(100, 70).origins())
    assert per_slice == 12  # 4 rows x 3 columns
    assert [shape[0] for shape in predictor.calls] == [5] * 7 + [1]  # full batches across slice boundaries
    assert max(np.abs(a - b).max() for a, b in zip(shared, single)) < 1e-5


def test_slices_are_read_only_one_batch_ahead():
    taken = []

    def slices():
        for i in range(100):
            taken.append(i)
            yield np.full((30, 30), i / 100, np.float32)

    results = predict_stack(lambda t: t, slices(), tiling=Tiling(margin=8, tile_batch=4))
    first = next(results)
    assert np.allclose(first, 0.0) and len(taken) <= 5
    rest = list(results)
    assert len(rest) == 99 and np.allclose(rest[-1], 0.99)


def test_tta_batches_the_views_and_averages_them(tiny_model):
    image = np.random.default_rng(4).random((40, 56)).astype(np.float32)  # one tile of 64 x 64 px: square
    predictor = CountingPredictor(tiny_model)
    averaged = predict_slice(predictor, image, tta=True, tiling=Tiling(margin=4, tile_batch=8))
    assert predictor.calls == [(8, 64, 64, 1)]  # the 8 views in one forward pass
    padded = np.pad(image, ((4, 20), (4, 4)), mode="reflect")[None, ..., None]
    views = [_dihedral(tiny_model.predict(_dihedral(padded, k), verbose=0), k, inverse=True) for k in range(8)]
    expected = np.mean(views, axis=0)[0, 4:44, 4:60, 0]
    assert np.abs(averaged - expected).max() < 1e-5
    predictor = CountingPredictor(tiny_model)
    wide = np.random.default_rng(5).random((40, 70)).astype(np.float32)
    predict_slice(
        predictor, wide, tta=True, tiling=Tiling(margin=4, tile_batch=8)
    )  # one tile of 64 x 96 px: not square
    assert sorted(shape[:3] for shape in predictor.calls) == [(4, 64, 96), (4, 96, 64)]


def test_dihedral_inverse():
    tiles = np.random.default_rng(0).random((2, 8, 8, 1))
    for k in range(8):
        assert np.array_equal(_dihedral(_dihedral(tiles, k), k, inverse=True), tiles)
    assert len({_dihedral(tiles, k).tobytes() for k in range(8)}) == 8


def test_tta_of_a_symmetric_predictor_is_unchanged():
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    plain = predict_slice(lambda t: t, image, tiling=Tiling(tile=32, margin=4, overlap=4))
    assert np.allclose(plain, image, atol=1e-6)
    assert np.allclose(
        predict_slice(lambda t: t, image, tta=True, tiling=Tiling(tile=32, margin=4, overlap=4)), image, atol=1e-6
    )


def test_predict_file_writes_fiji_tiff_from_savedmodel_parent(tiny_model, tmp_path):
    version = export_saved_model(tiny_model, "m", tmp_path / "models")
    assert resolve_model_path(tmp_path / "models" / "m") == version
    stack = np.random.default_rng(0).integers(0, 255, (2, 70, 90), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    out = predict_file(
        tmp_path / "models" / "m",
        tmp_path / "stack.tif",
        tmp_path / "prob.tif",
        progress=False,
        tiling=Tiling(tile=64, margin=16, overlap=8),
    )
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej
        probability = tif.asarray()
    assert probability.shape == (2, 70, 90) and probability.dtype == np.float32
    keras_prob = predict_file(
        version / "model.keras",
        tmp_path / "stack.tif",
        tmp_path / "k.tif",
        progress=False,
        tiling=Tiling(tile=64, margin=16, overlap=8),
    )
    assert np.allclose(tifffile.imread(keras_prob), probability, atol=1e-5)
    isbi = predict_file(
        version,
        tmp_path / "stack.tif",
        tmp_path / "isbi.tif",
        binary=True,
        isbi=True,
        progress=False,
        tiling=Tiling(tile=64, margin=16, overlap=8),
    )
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
        predict_file(version, tmp_path / "s.tif", tmp_path / "prob.tif", progress=False, tiling=Tiling(tile=128))
    assert (tmp_path / "prob.tif").read_bytes() == b"earlier result"
    (tmp_path / "blocker").write_text("file")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(EmUnetError, match="blocker is a file, not a folder"):
        predict_file(
            version, tmp_path / "s.tif", tmp_path / "blocker" / "p.tif", progress=False, tiling=Tiling(tile=128)
        )
    with pytest.raises(EmUnetError, match="is a folder: name a file to write"):
        predict_file(version, tmp_path / "s.tif", tmp_path, overwrite=True, progress=False, tiling=Tiling(tile=128))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_output_another_process_is_writing_is_refused_naming_it(tiny_model, tmp_path):
    from tests.io.test_files import hold_lock

    version = export_saved_model(tiny_model, "m", tmp_path)
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((1, 64, 64), np.uint8), photometric="minisblack")
    for output, overwrite in ((tmp_path / "prob.tif", False), (tmp_path / "old.tif", True)):
        holder = hold_lock(output)  # a real process writing it
        try:
            with pytest.raises(EmUnetError, match=rf"this output is in use by process {holder.pid} on "):
                predict_file(version, tmp_path / "s.tif", output, overwrite=overwrite, progress=False)
        finally:
            holder.kill()
            holder.wait()
        assert not output.exists()


def test_rgb_stack_is_refused(tiny_model, tmp_path):
    from em_unet.errors import DataError

    version = export_saved_model(tiny_model, "m", tmp_path)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with pytest.raises(DataError, match="samples per pixel"):
        predict_file(version, tmp_path / "rgb.tif", tmp_path / "p.tif", progress=False, tiling=Tiling(tile=128))


def test_tile_the_model_cannot_take(tiny_model, tmp_path):
    version = export_saved_model(tiny_model, "m", tmp_path)
    predictor = load_predictor(version)
    with pytest.raises(EmUnetError, match=r"cannot take tiles of shape \(30, 30, 1\)"):
        predictor(np.zeros((1, 30, 30, 1), np.float32))
    keras_predictor = load_predictor(version / "model.keras")
    with pytest.raises(EmUnetError, match="multiple of 2\\*\\*depth"):
        keras_predictor(np.zeros((1, 30, 30, 1), np.float32))


def test_a_stack_written_slice_by_slice_is_predicted_whole(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m.keras")
    for index in range(4):  # one series per slice, as acquisition software appends them
        tifffile.imwrite(
            tmp_path / "s.tif", np.full((32, 32), 60 * index, np.uint8), photometric="minisblack", append=True
        )
    out = predict_file(
        tmp_path / "m.keras",
        tmp_path / "s.tif",
        tmp_path / "p.tif",
        progress=False,
        tiling=Tiling(tile=32, margin=4, overlap=4),
    )
    probability = tifffile.imread(out)
    assert probability.shape == (4, 32, 32)
    assert len({p.tobytes() for p in probability}) == 4  # each slice its own prediction


def test_a_stack_with_a_bad_slice_writes_nothing(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m.keras")
    for shape in ((32, 32), (32, 32), (32, 40)):
        tifffile.imwrite(tmp_path / "s.tif", np.zeros(shape, np.uint8), photometric="minisblack", append=True)
    nan_stack = np.zeros((3, 32, 32), np.float32)
    nan_stack[1, 3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan_stack, photometric="minisblack")
    before = sorted(p.name for p in tmp_path.iterdir())
    for stack, expected in (
        ("s.tif", "s.tif: page 2 is 32 x 40 px but page 0 is 32 x 32 px"),
        ("nan.tif", "nan.tif: NaN or infinite value at slice 1 (nan at row 3, column 4)"),
    ):
        with pytest.raises(EmUnetError, match=re.escape(expected)):
            predict_file(
                tmp_path / "m.keras",
                tmp_path / stack,
                tmp_path / "out" / "p.tif",
                progress=False,
                tiling=Tiling(tile=32, margin=4, overlap=4),
            )
        assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------ models that cannot be loaded


def keras_file_variants(good: bytes):
    """Damaged .keras files, each with the cause its message must give."""
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}

    def rezip(**replaced):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, data in {**members, **replaced}.items():
                if data is not None:
                    archive.writestr(name, data)
        return buffer.getvalue()

    not_zip = "not a Keras model file (a .keras file is a zip archive; this one is not"
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # inside the weights: the zip's directory is intact, a checksum is not
    return {
        "empty": (b"", "empty file (0 bytes), not a Keras model"),
        "random bytes": (np.random.default_rng(0).bytes(4096), not_zip),
        "first half": (good[: len(good) // 2], not_zip),
        "last bytes cut": (good[:-10], not_zip),
        "a text file": (b"model weights: see the lab wiki\n", not_zip),
        "a zip of something else": (rezip(**dict.fromkeys(members), **{"notes.txt": b"x"}), "holds no config.json"),
        "a flipped byte": (bytes(flipped), "model.weights.h5 in it fails its checksum"),
        "garbage weights": (rezip(**{"model.weights.h5": b"garbage"}), "cannot load the Keras model ("),
        "garbage config": (rezip(**{"config.json": b"{not json"}), "cannot load the Keras model (JSONDecodeError"),
    }


@pytest.fixture(scope="module")
def good_keras(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "m.keras"
    tiny_model.save(path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "variant",
    [
        "empty",
        "random bytes",
        "first half",
        "last bytes cut",
        "a text file",
        "a zip of something else",
        "a flipped byte",
        "garbage weights",
        "garbage config",
    ],
)
def test_a_damaged_keras_file_is_one_line_naming_it(good_keras, tmp_path, variant):
    content, expected = keras_file_variants(good_keras)[variant]
    path = tmp_path / "model.keras"
    path.write_bytes(content)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(EmUnetError) as err:
        load_predictor(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and expected in message
    assert "File not found" not in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_damaged_keras_file_fails_predict_before_anything_is_written(good_keras, tmp_path):
    (tmp_path / "model.keras").write_bytes(good_keras[: len(good_keras) // 3])
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((1, 32, 32), np.uint8), photometric="minisblack")
    with pytest.raises(EmUnetError, match="model.keras: not a Keras model file"):
        predict_file(tmp_path / "model.keras", tmp_path / "s.tif", tmp_path / "out" / "p.tif", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras", "s.tif"]


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    return export_saved_model(tiny_model, "m", tmp_path_factory.mktemp("exported"))


def savedmodel_without_serving_default(folder):
    module = tf.Module()
    module.scale = tf.Variable(2.0)
    tf.saved_model.save(module, str(folder))


def savedmodel_with_other_names(folder):
    module = tf.Module()
    module.serve = tf.function(
        lambda pixels: {"logits": pixels * 2.0}, input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)]
    )
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})


def copy_of_export(exported, folder, damage):
    shutil.copytree(exported, folder)
    damage(folder)


@pytest.mark.parametrize(
    "make, expected",
    [
        (
            lambda f, e: copy_of_export(e, f, lambda d: (d / "saved_model.pb").write_bytes(b"")),
            "saved_model.pb: empty file (0 bytes), not a SavedModel",
        ),
        (
            lambda f, e: copy_of_export(e, f, lambda d: (d / "saved_model.pb").write_bytes(b"\xff" * 300)),
            "saved_model.pb: corrupt (not a SavedModel protocol buffer)",
        ),
        (
            lambda f, e: copy_of_export(e, f, lambda d: (d / "saved_model.pb").write_text("this is not a model")),
            "saved_model.pb: corrupt (not a SavedModel protocol buffer)",
        ),
        (
            lambda f, e: copy_of_export(
                e, f, lambda d: (d / "saved_model.pb").write_bytes((d / "saved_model.pb").read_bytes()[:2000])
            ),
            "saved_model.pb: corrupt (not a SavedModel protocol buffer)",
        ),
        (
            lambda f, e: copy_of_export(e, f, lambda d: shutil.rmtree(d / "variables")),
            "the SavedModel's weights (variables/ folder) are missing or incomplete",
        ),
        (
            lambda f, e: copy_of_export(e, f, lambda d: [p.write_bytes(b"") for p in (d / "variables").iterdir()]),
            "the SavedModel's weights (variables/ folder) are missing or incomplete",
        ),
        (
            lambda f, e: savedmodel_without_serving_default(f),
            "the SavedModel has no serving_default signature (signatures: none)",
        ),
        (
            lambda f, e: savedmodel_with_other_names(f),
            (
                "the serving_default signature takes ['pixels'] and returns ['logits']; em-unet needs input 'image' "
                "and output 'membrane_probability'"
            ),
        ),
    ],
)
def test_a_broken_savedmodel_is_one_line_naming_it(exported, tmp_path, make, expected):
    folder = tmp_path / "model"
    make(folder, exported)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(EmUnetError) as err:
        load_predictor(folder)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{folder}") and expected in message
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


TTA_OFFSETS = ((-1, 0), (0, -1), (-3, 0), (0, -3), (-3, -3), (3, -3), (-3, -1), (-1, -3), (1, -3), (3, -1))


def equivariant_affinities(tiles):
    """A predictor that turns with its input, as a perfectly trained one would: membrane = the image, affinity
    of p and p + o = 1 - |image(p) - image(p + o)|."""
    image = tiles[..., 0]
    channels = [image] + [1 - np.abs(image - shifted(image, offset, 0.5)) for offset in TTA_OFFSETS]
    return np.stack(channels, -1)


equivariant_affinities.affinity_offsets = TTA_OFFSETS


def test_tta_turns_the_affinity_offsets_with_the_views():
    image = np.random.default_rng(0).random((70, 90)).astype(np.float32)
    tiling = Tiling(tile=64, margin=8, overlap=8)
    plain = next(predict_stack(equivariant_affinities, [image], tiling, channels=True))
    averaged = next(predict_stack(equivariant_affinities, [image], tiling, tta=True, channels=True))
    assert plain.shape == (1 + len(TTA_OFFSETS), 70, 90)
    assert np.abs(plain - averaged).max() < 1e-5  # each view's channels, turned back, are the image's own
    for k in range(8):  # each of the view's channels lands on the image's offset or its negative
        assert sorted(j for j, _ in view_channels(TTA_OFFSETS, k)) == list(range(len(TTA_OFFSETS)))
    with pytest.raises(EmUnetError, match="--tta: affinity offset -3,-1 turns into"):
        view_channels(((-1, 0), (0, -1), (-3, -1)), 1)


def test_predict_writes_the_affinities_with_their_offsets(tmp_path):
    keras.utils.set_random_seed(2)
    offsets = ((-1, 0), (0, -1), (-9, 0), (0, -9))
    model = build_unet(2, 4, affinity_offsets=offsets)
    model.save(tmp_path / "aff.keras")
    stack = np.random.default_rng(3).integers(0, 255, (2, 40, 52), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", stack)
    predict_file(
        tmp_path / "aff.keras",
        tmp_path / "raw.tif",
        tmp_path / "p.tif",
        affinities_path=tmp_path / "a.tif",
        progress=False,
    )
    affinities, attributes = read_channel_stack(tmp_path / "a.tif")
    assert affinities.shape == (2, 4, 40, 52) and attributes["affinity_offsets"] == [list(o) for o in offsets]
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:  # an ImageJ hyperstack: Fiji opens it with 4 channels
        assert tif.imagej_metadata["channels"] == 4 and tif.imagej_metadata["slices"] == 2
    expected = np.stack(list(predict_stack(load_predictor(tmp_path / "aff.keras"), stack / 255.0, channels=True)))
    assert np.abs(affinities - expected[:, 1:]).max() < 1e-6
    assert np.abs(tifffile.imread(tmp_path / "p.tif") - expected[:, 0]).max() < 1e-6
    # a boundary U-Net has no affinities: one line, nothing written
    build_unet(2, 4).save(tmp_path / "boundary.keras")
    with pytest.raises(EmUnetError, match="--affinities needs an affinity U-Net"):
        predict_file(
            tmp_path / "boundary.keras", tmp_path / "raw.tif", tmp_path / "q.tif", affinities_path=tmp_path / "b.tif"
        )
    assert not (tmp_path / "q.tif").exists() and not (tmp_path / "b.tif").exists()


@pytest.mark.parametrize("kind", ["2.5-D", "3-D"])
def test_each_section_is_predicted_with_its_z_halo_mirrored_at_the_stack_ends(kind):
    """A section's tile holds the K // 2 sections each side, mirrored at the first and last sections; a 3-D
    U-Net's output for the middle section is kept."""
    from em_unet.inference.predict import keras_predictor
    from em_unet.io.stacks import z_context_indices
    from em_unet.training.model import build_unet3d

    keras.utils.set_random_seed(2)
    if kind == "2.5-D":
        model, z_context = build_unet(depth=2, base_filters=4, channels=3), 3
    else:
        model, z_context = build_unet3d(depth=2, base_filters=4, voxel_size=(12, 4, 4), z_context=4), 4
    images = np.random.default_rng(1).random((5, 64, 64)).astype(np.float32)
    predictor = keras_predictor(model)
    assert predictor.z_context == z_context
    tiling = Tiling(margin=16, overlap=16)  # one 96 px tile per slice
    got = np.stack(list(predict_stack(predictor, iter(images), tiling, count=5)))
    for z in range(5):
        window = np.stack([images[i] for i in z_context_indices(z, 5, z_context)], axis=-1)
        padded = np.pad(window, ((16, 16), (16, 16), (0, 0)), mode="reflect")
        if kind == "2.5-D":
            expected = model(padded[None])[0, 16:80, 16:80, 0]
        else:
            expected = model(np.moveaxis(padded, -1, 0)[None, ..., None])[0, z_context // 2, 16:80, 16:80, 0]
        assert np.abs(got[z] - np.asarray(expected)).max() < 1e-5, z
    assert [z_context_indices(0, 5, 3).tolist(), z_context_indices(4, 5, 3).tolist()] == [[1, 0, 1], [3, 4, 3]]
    # smaller tiles give the same map away from the tile seams' blending (the halo is the same in every tile)
    tiled = np.stack(list(predict_stack(predictor, images, Tiling(tile=48, margin=16, overlap=0))))
    assert tiled.shape == got.shape and np.isfinite(tiled).all()
    with pytest.raises(ValueError, match="give count"):
        next(predict_stack(predictor, iter(images), tiling))
