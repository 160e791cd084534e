import keras
import numpy as np
import pytest

from em_unet.errors import EmUnetError
from em_unet.history import find_runs, read_history
from em_unet.model import build_unet


def record_run(run_dir, epochs=3):
    """A real (tiny) Keras run with the callbacks em-unet's training uses."""
    keras.utils.set_random_seed(0)
    model = build_unet(depth=2, base_filters=4)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    images = np.random.default_rng(0).random((4, 16, 16, 1), dtype=np.float32)
    masks = (images > 0.5).astype(np.float32)
    run_dir.mkdir(parents=True)
    history = model.fit(images, masks, validation_data=(images, masks), epochs=epochs, verbose=0,
                        callbacks=[keras.callbacks.TensorBoard(str(run_dir)),
                                   keras.callbacks.CSVLogger(str(run_dir / "history.csv"))])
    return history.history


def test_history_from_csv_and_from_tensorboard_events_agree(tmp_path):
    fitted = record_run(tmp_path / "run")
    from_csv = read_history(tmp_path / "run")
    (tmp_path / "run" / "history.csv").unlink()
    from_events = read_history(tmp_path / "run")
    for key in ("loss", "val_loss"):
        assert len(from_csv[key]) == len(from_events[key]) == 3
        np.testing.assert_allclose(from_csv[key], fitted[key], rtol=1e-6)
        np.testing.assert_allclose(from_events[key], fitted[key], rtol=1e-6)


def test_find_runs_skips_hidden_folders_and_names_an_empty_root(tmp_path):
    for name in ("a/run1", "a/run2", ".interrupted/old"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "history.csv").write_text("epoch,loss,val_loss\n0,1.0,1.0\n")
    assert [p.relative_to(tmp_path).as_posix() for p in find_runs(tmp_path)] == ["a/run1", "a/run2"]
    assert find_runs(tmp_path / "a" / "run1") == [tmp_path / "a" / "run1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmUnetError, match="empty: no training run found"):
        find_runs(tmp_path / "empty")
