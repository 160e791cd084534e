import keras
import numpy as np
import pytest
import tensorflow as tf

from em_unet.config import TrainConfig
from em_unet.errors import EmUnetError
from em_unet.training.assembly import (
    StepAugmentedModel,
    TrainingBackup,
    build_model,
    read_backup,
    record_callbacks,
    restore_training_state,
    run_callbacks,
)
from em_unet.training.augment import AugmentConfig
from em_unet.training.model import build_unet
from tests.training.test_augment import PY_OPS


def test_augmentation_inside_the_training_step():
    """The accelerator placement, exercised on the CPU: augmentation runs in the compiled train step."""
    keras.utils.set_random_seed(0)
    unet = build_unet(depth=2, base_filters=4)
    model = StepAugmentedModel(unet, AugmentConfig(), seed=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.random((4, 32, 32, 1), dtype=np.float32)
    masks = (images > 0.5).astype(np.float32)
    history = model.fit(images, masks, batch_size=2, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    spec = tf.TensorSpec([2, 32, 32, 1], tf.float32)
    graph = tf.function(model.train_step).get_concrete_function((spec, spec)).graph
    ops = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        ops |= {node.op for node in function.node_def}
    assert {"StatelessRandomNormalV2", "GatherV2"} <= ops
    assert not ops & PY_OPS
    # inference goes through the inner U-Net unchanged
    assert np.allclose(model.predict(images, verbose=0), unet.predict(images, verbose=0))


def test_config_carries_the_augmentation_flags():
    config = TrainConfig(data="d", labels="l", elastic_sigma_px=4.0, elastic_points=5, rotation_degrees=15.0)
    augment = config.augment_config()
    assert (augment.elastic_sigma_px, augment.elastic_points, augment.rotation_degrees) == (4.0, 5, 15.0)
    assert TrainConfig(data="d", labels="l", elastic_sigma_px=0).augment_config().elastic is False
    assert TrainConfig(data="d", labels="l", augment=False).augment_config() is None


def test_time_limit_ends_training_before_the_next_epoch():
    from em_unet.training.assembly import TimeLimit

    model = build_unet(depth=2, base_filters=4)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    images = np.random.default_rng(0).random((4, 16, 16, 1), dtype=np.float32)
    history = model.fit(images, (images > 0.5).astype(np.float32), epochs=5, verbose=0, callbacks=[TimeLimit(0.0)])
    assert len(history.history["loss"]) == 1
    history = model.fit(images, (images > 0.5).astype(np.float32), epochs=3, verbose=0, callbacks=[TimeLimit(60.0)])
    assert len(history.history["loss"]) == 3


def test_precision_auto_follows_the_hardware(monkeypatch):
    import tensorflow as tf

    from em_unet import machine as train_module

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(train_module, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert train_module.resolve_precision("auto") == "mixed_bfloat16"
    monkeypatch.setattr(train_module, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert train_module.resolve_precision("auto") == "float32"
    assert train_module.resolve_precision("mixed_float16") == "mixed_float16"
    gpu = object()
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [gpu])
    for capability, expected in (((7, 5), "mixed_float16"), ((8, 0), "mixed_bfloat16")):
        monkeypatch.setattr(
            tf.config.experimental,
            "get_device_details",
            lambda device, c=capability: {"compute_capability": c},
        )
        assert train_module.resolve_precision("auto") == expected


def test_cosine_schedule_warms_up_then_decays_to_one_percent():
    from em_unet.training.optimizers import learning_rate_schedule

    assert learning_rate_schedule(3e-4, "constant", 1000) == 3e-4
    schedule = learning_rate_schedule(1e-3, "cosine", 1000)  # 20 warm-up steps (2 %), then 980 of decay
    rate = [float(schedule(step)) for step in (0, 10, 20, 510, 1000)]
    assert rate[0] == pytest.approx(0.0) and rate[1] == pytest.approx(5e-4) and rate[2] == pytest.approx(1e-3)
    assert rate[3] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5), rel=1e-3)  # half-way down the cosine
    assert rate[4] == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="--lr-schedule = 'linear': must be one of constant, cosine"):
        TrainConfig(data="d", labels="l", lr_schedule="linear")


def test_precision_policy_is_restored_however_the_block_ends():
    from em_unet.machine import precision_policy

    keras.mixed_precision.set_global_policy("float32")
    with precision_policy("mixed_bfloat16") as name:
        assert name == "mixed_bfloat16" and keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"
    with pytest.raises(RuntimeError):
        with precision_policy("mixed_float16"):
            raise RuntimeError("training failed")
    assert keras.mixed_precision.global_policy().name == "float32"


def test_a_failed_checkpoint_keeps_the_previous_best(tmp_path, monkeypatch):
    """A full disk while saving leaves the earlier best.keras whole and no partial file."""
    import errno

    from em_unet.training.assembly import BestUnetCheckpoint

    unet = build_unet(depth=2, base_filters=4)
    checkpoint = BestUnetCheckpoint(unet, tmp_path / "best.keras")
    checkpoint.on_epoch_end(0, {"val_loss": 0.5})
    saved = (tmp_path / "best.keras").read_bytes()

    def full_disk(path, *args, **kwargs):
        open(path, "wb").write(b"PK\x03\x04 half")  # what a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(unet, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.on_epoch_end(1, {"val_loss": 0.4})
    assert (tmp_path / "best.keras").read_bytes() == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras"]


def test_a_chunked_volume_trains_on_the_same_crops_read_lazily(isbi_dir, tmp_path):
    """Zarr / HDF5 training data are never read whole: crops and validation tiles come from the store,
    and they equal the crops of the same data as a TIFF."""
    import tifffile

    from em_unet.config import TrainConfig
    from em_unet.io.volumes import create_volume
    from em_unet.training.assembly import make_datasets, prepare_data
    from em_unet.training.data import LazyImages

    images = tifffile.imread(isbi_dir / "train-volume.tif")[:4, :128, :96]
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[:4, :128, :96]
    tifffile.imwrite(tmp_path / "img.tif", images, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    for address, array in ((f"{tmp_path}/v.zarr/raw", images), (f"{tmp_path}/l.h5:/labels", labels)):
        with create_volume(address, array.shape, array.dtype, (1, 32, 32)) as volume:
            volume[...] = array
    common = {"val_slices": (3, 3), "patch_size": 64, "batch_size": 2}
    tiff = TrainConfig(data=str(tmp_path / "img.tif"), labels=str(tmp_path / "lab.tif"), **common)
    chunked = TrainConfig(data=f"{tmp_path}/v.zarr/raw", labels=f"{tmp_path}/l.h5:/labels", **common)
    in_memory, lazy = prepare_data(tiff), prepare_data(chunked)
    assert isinstance(lazy.train_images, LazyImages) and lazy.train_images.shape == (3, 128, 96)
    for expected, got in zip(make_datasets(tiff, in_memory, "pipeline"), make_datasets(chunked, lazy, "pipeline")):
        for (x0, y0), (x1, y1) in zip(expected.take(4), got.take(4)):
            assert np.array_equal(x0.numpy(), x1.numpy()) and np.array_equal(y0.numpy(), y1.numpy())
    with pytest.raises(EmUnetError, match="give both the images and the labels as chunked volumes"):
        prepare_data(TrainConfig(data=f"{tmp_path}/v.zarr/raw", labels=str(tmp_path / "lab.tif"), **common))


def test_validation_epochs_always_include_the_first_and_the_last():
    from em_unet.training.assembly import validation_epochs

    assert validation_epochs(1, 10, 4) == [1, 4, 8, 10]
    assert validation_epochs(1, 8, 4) == [1, 4, 8]
    assert validation_epochs(1, 1, 4) == [1]
    assert validation_epochs(1, 3, 1) == [1, 2, 3]
    assert validation_epochs(6, 14, 5) == [6, 10, 14]  # a Hyperband trial resumed at epoch 6


def test_early_stopping_patience_counts_whole_validation_periods():
    from em_unet.training.assembly import ValidatedEarlyStopping, run_callbacks

    def patience(early_stopping, val_every):
        config = TrainConfig(data="a.tif", labels="b.tif", early_stopping=early_stopping, val_every=val_every)
        (stopper,) = [c for c in run_callbacks(config) if isinstance(c, ValidatedEarlyStopping)]
        return stopper.patience

    assert [patience(1, 1), patience(3, 1), patience(1, 4), patience(4, 4), patience(5, 4)] == [1, 3, 1, 1, 2]


def test_history_has_an_entry_for_every_epoch_in_each_validation_metric():
    from em_unet.training.assembly import epoch_aligned

    history = keras.callbacks.History()
    history.epoch = [0, 1, 2, 3, 4]
    history.history = {"loss": [5.0, 4.0, 3.0, 2.0, 1.0], "val_loss": [4.5, 2.5, 1.5]}
    aligned = epoch_aligned(history, [1, 4, 5]).history
    assert aligned["loss"] == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert np.isnan(aligned["val_loss"]).tolist() == [False, True, True, False, False]
    assert [aligned["val_loss"][i] for i in (0, 3, 4)] == [4.5, 2.5, 1.5]
    stopped = keras.callbacks.History()  # early stopping after epoch 3 of a fit validating 1, 2 and 4
    stopped.epoch, stopped.history = [0, 1, 2], {"loss": [3.0, 2.0, 1.0], "val_loss": [3.5, 2.5]}
    assert np.isnan(epoch_aligned(stopped, [1, 2, 4]).history["val_loss"]).tolist() == [False, False, True]


def test_ema_validates_and_keeps_the_averaged_weights(tmp_path):
    """--ema: validation (Keras' SwapEMAWeights) and best.keras see the optimizer's moving average; training and the
    backup go on with the raw weights, and a restored backup brings the average back."""
    config = TrainConfig(data="d", labels="l", depth=2, base_filters=4, patch_size=32, ema=0.5, seed=0)
    keras.utils.set_random_seed(0)
    model, unet = build_model(config, steps=3, placement="pipeline")
    rng = np.random.default_rng(0)
    images = rng.random((6, 32, 32, 1)).astype(np.float32)
    targets = (rng.random((6, 32, 32, 1)) < 0.3).astype(np.float32)
    seen = {}

    class Capture(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):  # after SwapEMAWeights put the average in
            seen["validated"] = [w.copy() for w in unet.get_weights()]

        def on_epoch_end(self, epoch, logs=None):
            seen["raw"] = [w.copy() for w in unet.get_weights()]
            seen["average"] = [v.numpy().copy() for v in model.optimizer._model_variables_moving_average]

    callbacks = run_callbacks(config) + [Capture()]
    callbacks += record_callbacks(tmp_path, unet, averaged=True) + [TrainingBackup(tmp_path / "backup", epochs=1)]
    model.fit(
        images, targets, batch_size=2, epochs=1, validation_data=(images, targets), callbacks=callbacks, verbose=0
    )
    trainable = [i for i, w in enumerate(unet.weights) if w.trainable]
    best = keras.saving.load_model(tmp_path / "best.keras", compile=False).get_weights()
    for position, index in enumerate(trainable):
        assert np.allclose(best[index], seen["average"][position])
        assert np.allclose(seen["validated"][index], seen["average"][position])
    assert not all(np.allclose(seen["raw"][i], seen["average"][p]) for p, i in enumerate(trainable))
    restored, _ = build_model(config, steps=3, placement="pipeline")
    restore_training_state(restored, read_backup(tmp_path / "backup"))
    for position, index in enumerate(trainable):
        assert np.allclose(restored.get_weights()[index], seen["raw"][index])
        assert np.allclose(
            restored.optimizer._model_variables_moving_average[position].numpy(), seen["average"][position]
        )
