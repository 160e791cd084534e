"""Running the em-unet command as a user would: in a subprocess."""

import os
import signal
import subprocess
import sys

import tifffile


def run_cli(*args, env=None, timeout=600):
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "em_unet.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


def error_line(result):
    """The one error line em-unet printed (TensorFlow's own start-up chatter ignored)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("em-unet: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


def small_isbi(isbi_dir, folder, slices=3, size=64):
    """The first ISBI slices cropped small, written as the user's stack and labels."""
    tifffile.imwrite(
        folder / "img.tif",
        tifffile.imread(isbi_dir / "train-volume.tif")[:slices, :size, :size],
        photometric="minisblack",
    )
    tifffile.imwrite(
        folder / "lab.tif",
        tifffile.imread(isbi_dir / "train-labels.tif")[:slices, :size, :size],
        photometric="minisblack",
    )


def tiny_flags(folder, steps=1, **flags):
    """Training flags of a tiny, fast run on ``small_isbi``'s files in ``folder`` (flags override them)."""
    values = {
        "--data": folder / "img.tif",
        "--labels": folder / "lab.tif",
        "--val-slices": "2-2",
        "--depth": 2,
        "--base-filters": 4,
        "--patch-size": 32,
        "--batch-size": 2,
        "--steps-per-epoch": steps,
        "--precision": "float32",
        **{f"--{k.replace('_', '-')}": v for k, v in flags.items()},
    }
    return [str(x) for pair in values.items() for x in pair]


def interruptible():
    """A ``preexec_fn`` that gives the child Ctrl-C as a terminal does, even when the tests were started with
    SIGINT ignored (a shell's background job inherits that, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
