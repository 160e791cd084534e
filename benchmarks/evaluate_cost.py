"""What scoring costs: wall time and peak memory of ``em-unet evaluate`` (and ``segment``) on 5 ISBI slices,
this checkout against an earlier revision, side by side in one run.

The earlier revision (default: the last one before the layout of issue 20, whose ``em_unet.data`` loaded
TensorFlow to read a TIFF) is checked out into a temporary git worktree and run from there. Each command
runs in a fresh interpreter, as a user runs it; peak resident memory is the kernel's figure for that
process. The inputs are slices 15-19 of ISBI 2012: the labels, a membrane map made from them (blurred, with
noise, a gap in a membrane) and the neurons ``em-unet segment`` finds in it.

    python benchmarks/evaluate_cost.py [--before 863dcbf] [--repeats 3]

Target (issue 20): ``evaluate`` under 1.5 s and under 300 MB on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from isbi_data import ISBI  # benchmarks/, beside this script
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
RUN = (
    "import resource, sys; from em_unet import cli; status = cli.main(sys.argv[1:]); "
    "print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(status)"
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def inputs(folder: Path) -> None:
    labels = tifffile.imread(ISBI / "train-labels.tif")[15:20]
    membrane = (labels == 0).astype(np.float32)
    rng = np.random.default_rng(0)
    probability = np.clip(
        ndimage.gaussian_filter(membrane, (0, 1.5, 1.5)) * 2 + rng.normal(0, 0.05, membrane.shape), 0, 1
    )
    probability[0, 250:253, :] *= 0.2  # a faint membrane: merges at some thresholds
    tifffile.imwrite(folder / "labels.tif", labels)
    tifffile.imwrite(folder / "probability.tif", probability.astype(np.float32))


def measure(source: Path, argv: list[str], folder: Path) -> tuple[float, float]:
    """(wall seconds, peak MB) of one ``em-unet ARGV`` run from the checkout ``source``."""
    environment = {**os.environ, "PYTHONPATH": str(source), "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", RUN, *argv], capture_output=True, text=True, cwd=folder, env=environment
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{source}: em-unet {' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    peak_kb = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("peak_kb"))
    return seconds, peak_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="863dcbf", help="the earlier revision to compare with")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command; the fastest counts")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs(folder)
        before = folder / "before"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(before), args.before], check=True
        )
        try:
            commands = {
                "evaluate a membrane map": ["evaluate", "probability.tif", "labels.tif"],
                "segment it": ["segment", "probability.tif", "-o", "neurons.tif", "--overwrite"],
                "evaluate the neurons": ["evaluate", "neurons.tif", "labels.tif"],
            }
            print(f"{'5 ISBI slices, 512 x 512 px':28s} {'before':>18s} {'now':>18s} {'now / before':>16s}")
            for name, argv in commands.items():
                results = {}
                for label, source in (("before", before), ("now", REPO)):
                    runs = [measure(source, argv, folder) for _ in range(args.repeats)]
                    results[label] = (min(s for s, _ in runs), max(m for _, m in runs))
                (s0, m0), (s1, m1) = results["before"], results["now"]
                print(f"{name:28s} {s0:7.2f} s {m0:6.0f} MB {s1:7.2f} s {m1:6.0f} MB {s1 / s0:6.2f}x {m1 / m0:6.2f}x")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False)


if __name__ == "__main__":
    main()
