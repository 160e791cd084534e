"""Memory across tuning trials: today's in-process search against `tune --workers` with recycled worker
processes, side by side in one run.

Each variant is one `em-unet tune` command in its own subprocess, on the first ISBI slices cropped to
128 px, a depth-3 U-Net with 8 base filters, a random search of 8 trials (``--trials``) of one epoch:

- in-process: the trials run in the `tune` process, as without --workers;
- workers: `tune --workers 1 --recycle-after 1` (``--workers``): the `tune` process serves the oracle and a
  fresh worker process runs each trial.

Every 0.2 s this script adds up the resident memory (VmRSS, /proc) of the `tune` process and all its live
descendants (the workers); for each trial (from one "trial k of N finished" line of the chief to the next)
it keeps the peak. It prints those peaks, the growth from the second trial to the last, the trend and the
spread over trials 2..N, and whether the workers variant stays flat within 50 MB (growth, trend x trials
and spread). Shared pages (TensorFlow's libraries) count once per process, as RSS does.

    python benchmarks/tune_memory.py [--trials 10] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isbi_data import ISBI  # benchmarks/, beside this script

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAT_MB = 50.0
PROGRESS = re.compile(r"^em-unet: trial (\d+) of (\d+) finished")
SAMPLE_S = 0.2  # seconds between readings of the process tree's memory


def tree_rss_mb(root: int) -> float:
    """Resident memory, MB, of process ``root`` and every live process below it."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    total_kb = 0
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # ended meanwhile
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total_kb += int(match.group(1)) if match else 0
    return total_kb / 1024.0


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index (MB per trial)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sum((i - mean_x) ** 2 for i in range(n))


def write_setup(folder: Path, trials: int) -> list[str]:
    """The stack, labels and search space of the benchmark in ``folder``; the common `tune` flags."""
    import tifffile

    for name, source in (("img.tif", "train-volume.tif"), ("lab.tif", "train-labels.tif")):
        tifffile.imwrite(folder / name, tifffile.imread(ISBI / source)[:4, :128, :128], photometric="minisblack")
    (folder / "space.toml").write_text(
        f'[tuner]\nalgorithm = "random"\nmax_trials = {trials}\n\n'
        '[space]\noptimizer = ["sgd", "adam", "adamax"]\nlearning_rate = { min = 1e-5, max = 1e-3 }\n'
    )
    flags = {
        "--data": folder / "img.tif",
        "--labels": folder / "lab.tif",
        "--val-slices": "3-3",
        "--depth": 3,
        "--base-filters": 8,
        "--patch-size": 64,
        "--steps-per-epoch": 4,
        "--epochs": 1,
        "--precision": "float32",
        "--search-space": folder / "space.toml",
        "--logs-dir": folder / "logs",
        "--models-dir": folder / "models",
    }
    return ["tune", *[str(x) for pair in flags.items() for x in pair]]


def run_variant(command: list[str], log: Path) -> tuple[list[float], float]:
    """Run one `tune` command; the peak RSS (MB) of its process tree during each trial (sampled every
    ``SAMPLE_S`` seconds, from one "trial k of N finished" line to the next), and the wall time (s)."""
    import threading

    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.monotonic()
    peaks, current = [], [0.0]
    with open(log, "w") as transcript:
        process = subprocess.Popen(
            [sys.executable, "-m", "em_unet.cli", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment,
        )

        def sample() -> None:
            while process.poll() is None:
                current[0] = max(current[0], tree_rss_mb(process.pid))
                time.sleep(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for line in process.stdout:
            transcript.write(line)
            if PROGRESS.match(line):
                peaks.append(current[0])
                current[0] = 0.0
        status = process.wait()
        sampler.join()
    if status != 0:
        raise SystemExit(f"{' '.join(command[:1])} failed with status {status}: see {log}")
    return peaks, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    from em_unet.cli import import_tensorflow_quietly
    from em_unet.machine import machine_description

    import_tensorflow_quietly()
    print(f"machine: {machine_description()}")
    folder = Path(tempfile.mkdtemp(prefix="tune-memory-"))
    common = write_setup(folder, args.trials)
    variants = {
        "in-process": [*common, "--project", "inprocess"],
        f"--workers {args.workers} --recycle-after 1": [
            *common,
            "--project",
            "workers",
            "--workers",
            str(args.workers),
            "--recycle-after",
            "1",
        ],
    }
    results = {}
    for name, command in variants.items():
        results[name] = run_variant(command, folder / f"{command[command.index('--project') + 1]}.log")
    print(f"{args.trials} trials of 1 epoch, random search, ISBI 4 x 128 x 128, depth 3, 8 filters, 64-px crops")
    print("peak total RSS (MB) of tune and its child processes during each trial:")
    for name, (samples, seconds) in results.items():
        later = samples[1:]
        growth = samples[-1] - samples[1]
        print(f"  {name:30s} {' '.join(f'{s:.0f}' for s in samples)}")
        print(
            f"  {'':30s} growth trial 2 -> {len(samples)}: {growth:+.0f} MB; trend (least squares over trials "
            f"2..{len(samples)}): {slope(later):+.1f} MB/trial; spread: {max(later) - min(later):.0f} MB; "
            f"wall {seconds:.0f} s ({seconds / len(samples):.1f} s/trial)"
        )
    samples = results[list(results)[1]][0]
    growth, trend = samples[-1] - samples[1], slope(samples[1:]) * (len(samples) - 2)
    spread = max(samples[1:]) - min(samples[1:])
    flat = max(abs(growth), abs(trend), spread) <= FLAT_MB
    print(
        f"workers variant flat within {FLAT_MB:.0f} MB (growth trial 2 -> {len(samples)}, trend x trials and "
        f"spread): {'yes' if flat else 'no'}"
    )
    print(f"logs: {folder}")


if __name__ == "__main__":
    main()
