import keras
import numpy as np
import pytest
import tensorflow as tf

from em_unet.errors import ModelInputError
from em_unet.inference.predict import affinity_offsets_of
from em_unet.training.model import build_unet, check_input_size, unet_parameter_count


def conv_params(in_ch, out_ch, k):
    return k * k * in_ch * out_ch + out_ch


def closed_form_unet_params(depth, base, channels=1):
    """Original U-Net layout: 2 3x3 convs per level, 2x2 transposed convs up, 1x1 sigmoid out."""
    filters = [base * 2**i for i in range(depth + 1)]
    total, prev = 0, channels
    for f in filters[:-1]:
        total += conv_params(prev, f, 3) + conv_params(f, f, 3)
        prev = f
    total += conv_params(filters[-2], filters[-1], 3) + conv_params(filters[-1], filters[-1], 3)
    below = filters[-1]
    for f in reversed(filters[:-1]):
        total += conv_params(below, f, 2) + conv_params(2 * f, f, 3) + conv_params(f, f, 3)
        below = f
    return total + conv_params(base, 1, 1)


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_output_shapes(depth):
    model = build_unet(depth=depth, base_filters=4)
    step = 2**depth
    for height, width in [
        (step, step),
        (2 * step, 3 * step),
        (64 if step <= 64 else step, 96 if step <= 32 else 2 * step),
    ]:
        out = model(np.zeros((2, height, width, 1), np.float32))
        assert tuple(out.shape) == (2, height, width, 1)
        assert out.dtype == "float32"


def test_original_unet_parameter_count():
    model = build_unet(depth=4, base_filters=64)
    expected = closed_form_unet_params(4, 64)
    assert model.count_params() == expected
    assert 30.9e6 < expected < 31.1e6


def test_depth3_smaller_than_depth4():
    assert build_unet(depth=3, base_filters=32).count_params() < build_unet(depth=4, base_filters=32).count_params()


def test_layer_names_and_options():
    model = build_unet(depth=2, base_filters=4, batch_norm=True, bottleneck_dropout=0.5, up_mode="bilinear")
    names = {layer.name for layer in model.layers}
    assert {
        "enc1_conv1",
        "enc2_conv2",
        "bottleneck_conv2",
        "bottleneck_dropout",
        "dec1_up",
        "dec2_conv1",
        "enc1_bn1",
        "membrane_probability",
    } <= names
    assert model(np.zeros((1, 16, 16, 1), np.float32)).shape == (1, 16, 16, 1)
    assert getattr(model, "optimizer", None) is None  # the builder does not compile


def test_output_is_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_unet(depth=2, base_filters=4)
        assert model.get_layer("enc1_conv1").compute_dtype == "bfloat16"
        out = model(np.random.rand(1, 32, 32, 1).astype(np.float32))
        assert out.dtype == "float32"
        assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_wrong_size_names_size_and_nearest_valid_sizes():
    with pytest.raises(ModelInputError, match=r"height 100 px .* multiples of 16 px \(nearest valid: 96 or 112\)"):
        check_input_size(100, 96, depth=4)
    model = build_unet(depth=4, base_filters=4)
    with pytest.raises(Exception, match=r"width 70 px .*nearest valid: 64 or 80"):
        model(np.zeros((1, 64, 70, 1), np.float32))


def test_wrong_size_with_dynamic_shape_fails_in_graph():
    model = build_unet(depth=3, base_filters=4)
    serve = tf.function(model, input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
    assert serve(tf.zeros([1, 24, 32, 1])).shape == (1, 24, 32, 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiples of 8 px"):
        serve(tf.zeros([1, 20, 32, 1]))


def test_affinity_unet_outputs_membrane_then_affinities_and_keeps_its_offsets(tmp_path):
    offsets = ((-1, 0), (0, -1), (-9, 4))
    model = build_unet(2, 4, affinity_offsets=offsets)
    assert model.output_shape == (None, None, None, 4)
    assert model.count_params() == unet_parameter_count(2, 4, outputs=4)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    assert affinity_offsets_of(loaded) == offsets
    assert affinity_offsets_of(build_unet(2, 4)) == ()
    image = np.random.default_rng(0).random((1, 16, 16, 1)).astype(np.float32)
    assert np.allclose(loaded.predict(image, verbose=0), model.predict(image, verbose=0))


def test_anisotropic_levels_pool_z_only_once_the_voxel_is_about_isotropic():
    from em_unet.training.model import anisotropic_levels, z_step

    isbi = anisotropic_levels(4, (50, 4, 4))  # y/x 4, 8, 16, 32 nm: z 50 nm is within 2x at the fourth level
    assert [level.kernel for level in isbi] == [(1, 3, 3)] * 3 + [(3, 3, 3)] * 2
    assert [level.pool for level in isbi[:-1]] == [(1, 2, 2)] * 3 + [(2, 2, 2)] and z_step(isbi) == 2
    isotropic = anisotropic_levels(3, (8, 8, 8))
    assert all(level.kernel == (3, 3, 3) for level in isotropic) and z_step(isotropic) == 8
    assert z_step(anisotropic_levels(2, (1000, 4, 4))) == 1


def test_3d_unet_shapes_its_signature_and_shape_errors():
    from em_unet.inference.predict import z_context_of
    from em_unet.training.model import build_unet3d, check_z_size

    model = build_unet3d(depth=2, base_filters=4, voxel_size=(12, 4, 4), z_context=4)
    assert model.input_shape == (None, None, None, None, 1) and z_context_of(model) == (4, True)
    assert model(np.zeros((2, 4, 32, 48, 1), np.float32)).shape == (2, 4, 32, 48, 1)
    assert "Conv3D" in {type(layer).__name__ for layer in model.layers}
    for sections, nearest in ((3, "2 or 4"), (5, "4 or 6"), (1, "2")):
        with pytest.raises(ModelInputError, match=f"multiples of 2 sections \\(nearest valid: {nearest}\\)"):
            check_z_size(sections, 2)
        with pytest.raises(ModelInputError, match="multiples of 2 sections"):
            model(np.zeros((1, sections, 32, 32, 1), np.float32))
    with pytest.raises(ModelInputError, match="multiples of 4 px"):
        model(np.zeros((1, 4, 30, 32, 1), np.float32))
    reloaded = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert z_context_of(reloaded) == (4, True)
    planar = build_unet(depth=2, base_filters=4, channels=5)
    assert z_context_of(planar) == (5, False) and planar(np.zeros((1, 32, 32, 5), np.float32)).shape == (1, 32, 32, 1)


def test_the_parameter_count_of_2_5d_and_3d_unets_without_building_them():
    from em_unet.training.model import anisotropic_levels, build_unet3d

    assert unet_parameter_count(3, 4, channels=5) == build_unet(3, 4, channels=5).count_params()
    for voxel_size in ((50, 4, 4), (8, 8, 8)):
        levels = anisotropic_levels(3, voxel_size)
        built = build_unet3d(3, 4, voxel_size, batch_norm=True).count_params()
        assert unet_parameter_count(3, 4, True, levels=levels) == built, voxel_size
