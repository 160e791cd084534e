import keras
import numpy as np
import pytest

from em_unet.errors import EmUnetError
from em_unet.reporting.history import find_runs, read_history
from em_unet.training.model import build_unet


def record_run(run_dir, epochs=3):
    """A real (tiny) Keras run with the callbacks em-unet's training uses."""
    keras.utils.set_random_seed(0)
    model = build_unet(depth=2, base_filters=4)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    images = np.random.default_rng(0).random((4, 16, 16, 1), dtype=np.float32)
    masks = (images > 0.5).astype(np.float32)
    run_dir.mkdir(parents=True)
    history = model.fit(
        images,
        masks,
        validation_data=(images, masks),
        epochs=epochs,
        verbose=0,
        callbacks=[keras.callbacks.TensorBoard(str(run_dir)), keras.callbacks.CSVLogger(str(run_dir / "history.csv"))],
    )
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


# ------------------------------------------------------------------ malformed records: one line naming the file

MALFORMED_HISTORIES = [
    (b"", "empty file; expected columns epoch, loss, val_loss"),
    (b"\n\n", "empty file"),
    (b"epoch,loss,val_loss\n", "no epochs recorded (only the header line)"),
    (
        b"epoch,accuracy,val_accuracy\n0,0.5,0.4\n",
        "no 'loss' column (columns found: 'epoch', 'accuracy', 'val_accuracy')",
    ),
    (b"epoch;loss;val_loss\n0;0.5;0.4\n", "no 'loss' column (columns found: 'epoch;loss;val_loss')"),
    (b"epoch,loss,val_loss\n0,0.5,0.4\n1,abc,0.3\n", "line 3, column 'loss': 'abc' is not a number"),
    (b"epoch,loss,val_loss\n0,0.5,\n", "line 2, column 'val_loss': '' is not a number"),
    (b"epoch,loss,val_loss\n\n0,0.5,0.4\r\n1,0.4,1e-3x\n", "line 4, column 'val_loss': '1e-3x' is not a number"),
    (b"epoch,loss,val_loss\n0,0.5,0.4\n1,0.3\n", "line 3 has 2 values but the header has 3 columns"),
    (b"epoch,loss,val_loss\n0,0.5,0.4,0.9\n", "line 2 has 4 values but the header has 3 columns"),
    (bytes(range(256)) * 4, "not a text CSV file (binary data)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text CSV file (binary data)"),
    (b"epoch,loss\x00,val_loss\n0,1,1\n", "no 'loss' column (columns found: 'epoch', 'loss\\x00', 'val_loss')"),
    (b'"epoch\nloss",val\n0,1\n', "no 'loss' column (columns found: 'epoch\\nloss', 'val')"),
]


@pytest.mark.parametrize("content, expected", MALFORMED_HISTORIES)
def test_malformed_history_csv_is_one_line_naming_the_file(tmp_path, content, expected):
    from em_unet.reporting.plot import plot_runs

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.csv").write_bytes(content)
    for read in (read_history, plot_runs):
        with pytest.raises(EmUnetError) as err:
            read(tmp_path / "run")
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{tmp_path / 'run' / 'history.csv'}: ")
        assert expected in message
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["history.csv"]  # no report folder


def test_a_diverged_run_records_nan_and_is_still_read(tmp_path):
    (tmp_path / "history.csv").write_text("epoch,loss,val_loss\n0,0.7,0.6\n1,nan,inf\n")
    history = read_history(tmp_path)
    assert history["loss"][0] == 0.7 and np.isnan(history["loss"][1]) and np.isinf(history["val_loss"][1])
    assert "epoch" not in history


@pytest.mark.parametrize("name", ["config.json", "study.json"])
@pytest.mark.parametrize(
    "content, expected",
    [
        (b"{not json", "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
        (b"", "not valid JSON (Expecting value at line 1, column 1)"),
        (b"[1, 2]", "expected a JSON object ({...}), found a list"),
        (b"\xff\xfe\x00garbage", "not a text JSON file (binary data)"),
    ],
)
def test_malformed_json_records_are_one_line_naming_the_file(tmp_path, name, content, expected):
    from em_unet.reporting.plot import plot_runs

    (tmp_path / "history.csv").write_text("epoch,loss,val_loss\n0,0.7,0.6\n")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(EmUnetError) as err:
        plot_runs(tmp_path)
    assert str(err.value) == f"{tmp_path / name}: {expected}"
    assert not (tmp_path / "report").exists()
