"""Recorded loss curves: read a run's per-epoch history from ``history.csv`` or, when that is
missing, from its TensorBoard event files (``train/`` and ``validation/``, tag ``epoch_<metric>``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from em_unet.errors import EmUnetError

EVENT_FOLDERS = {"train": "", "validation": "val_"}


def is_run(folder: Path) -> bool:
    """A training run's folder: it holds ``history.csv`` or TensorBoard epoch events."""
    return (folder / "history.csv").is_file() or any((folder / "train").glob("events.out.tfevents.*"))


def find_runs(root: str | Path) -> list[Path]:
    """``root`` itself if it is a run, else every run below it (hidden folders skipped), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise EmUnetError(f"{root}: no such folder")
    if is_run(root):
        return [root]
    runs = [
        folder
        for folder in sorted(root.rglob("*"))
        if folder.is_dir()
        and is_run(folder)
        and not any(part.startswith(".") for part in folder.relative_to(root).parts)
    ]
    if not runs:
        raise EmUnetError(f"{root}: no training run found (no history.csv or TensorBoard train/ events below it)")
    return runs


HISTORY_COLUMNS = "epoch, loss, val_loss, ... as Keras's CSVLogger writes them"
NOT_MEASURED = "NA"  # CSVLogger's value for a metric an epoch did not log: validation with --val-every > 1


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    """Per-epoch columns of a ``history.csv``; a malformed file is a one-line error naming it."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            # blank lines, e.g. a trailing one, hold no epoch; line numbers are the file's, for the message
            rows = [(reader.line_num, row) for row in reader if row]
    except UnicodeDecodeError:
        raise EmUnetError(f"{path}: not a text CSV file (binary data); expected columns {HISTORY_COLUMNS}") from None
    except csv.Error as err:  # e.g. NUL bytes
        raise EmUnetError(f"{path}: not a readable CSV file ({err}); expected columns {HISTORY_COLUMNS}") from None
    except OSError as err:
        raise EmUnetError(f"{path}: cannot read ({err.strerror})") from None
    if not rows:
        raise EmUnetError(f"{path}: empty file; expected columns {HISTORY_COLUMNS}")
    header, records = [name.strip() for name in rows[0][1]], rows[1:]
    if "loss" not in header:
        raise EmUnetError(
            f"{path}: no 'loss' column (columns found: {', '.join(map(repr, header))[:200]}); "
            f"expected columns {HISTORY_COLUMNS}"
        )
    if not records:
        raise EmUnetError(f"{path}: no epochs recorded (only the header line)")
    columns: dict[str, list[float]] = {name: [] for name in header if name != "epoch"}
    for line, record in records:
        if len(record) != len(header):
            raise EmUnetError(
                f"{path}: line {line} has {len(record)} values but the header has {len(header)} "
                "columns (a ragged or cut row)"
            )
        for name, text in zip(header, record):
            if name == "epoch":
                continue
            if text == NOT_MEASURED:
                columns[name].append(np.nan)
                continue
            try:
                columns[name].append(float(text))  # "nan" and "inf" are real records of a diverged run
            except ValueError:
                raise EmUnetError(f"{path}: line {line}, column {name!r}: {text[:40]!r} is not a number") from None
    return {name: np.array(values) for name, values in columns.items()}


def _read_events(folder: Path, prefix: str) -> dict[str, np.ndarray]:
    import tensorflow as tf  # lazy: only runs without history.csv need TensorFlow's event-file reader

    values: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        try:
            for record in tf.data.TFRecordDataset(str(path)):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if not value.tag.startswith("epoch_"):
                        continue
                    number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                    values.setdefault(prefix + value.tag[len("epoch_") :], {})[int(event.step)] = number
        except tf.errors.DataLossError:
            continue  # a run killed while writing leaves a truncated last record; the epochs before it count
    # epochs without validation (--val-every) have no validation event: NaN keeps index = epoch - 1
    epochs = 1 + max((step for steps in values.values() for step in steps), default=-1)
    return {key: np.array([steps.get(s, np.nan) for s in range(epochs)]) for key, steps in values.items()}


def read_history(run_dir: str | Path) -> dict[str, np.ndarray]:
    """Per-epoch values of a run, e.g. ``{"loss": [...], "val_loss": [...], ...}`` (index 0 = epoch 1)."""
    run_dir = Path(run_dir)
    if (run_dir / "history.csv").is_file():
        return _read_csv(run_dir / "history.csv")
    history: dict[str, np.ndarray] = {}
    for folder, prefix in EVENT_FOLDERS.items():
        history.update(_read_events(run_dir / folder, prefix))
    if "loss" not in history:
        raise EmUnetError(f"{run_dir}: neither history.csv nor TensorBoard epoch_loss events")
    return history


def read_json(path: Path) -> dict:
    """A run's JSON record (config.json, scores.json), or {} when it is absent; a malformed one is a
    one-line error naming it."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise EmUnetError(f"{path}: not a text JSON file (binary data)") from None
    except json.JSONDecodeError as err:
        raise EmUnetError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except OSError as err:
        raise EmUnetError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(record, dict):
        raise EmUnetError(f"{path}: expected a JSON object ({{...}}), found a {type(record).__name__}")
    return record
