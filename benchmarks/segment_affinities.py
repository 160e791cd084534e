"""The mutex watershed's parameters (issue 19): chosen on one seed's affinity map, reported on the others.

    em-unet predict saved_models/em_unet val.tif -o val-probability.tif --affinities val-affinities.tif  # 15-19
    python benchmarks/segment_affinities.py val-labels.tif seed0-affinities.tif seed1-affinities.tif [...]

Each (long-range bias, minimum size) of the grid segments the first map; the best by Fiji's per-slice V_rand
(then V_info) is chosen there and applied unchanged to the other maps, so their figures carry no selection.
Prints one JSON line per run (V_rand, V_info, VOI split / merge, segments, seconds) and the CPU model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from em_unet.io.stacks import membrane_target, read_stack  # noqa: E402
from em_unet.segmentation.affinities import MutexParams, read_affinity_file, segment_affinity_stack  # noqa: E402
from em_unet.segmentation.metrics import evaluate_segments  # noqa: E402

BIASES = (-0.1, -0.05, 0.0, 0.05, 0.1, 0.2)
MIN_SIZES = (0, 50, 200)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def score(affinities, offsets, truth, params: MutexParams) -> dict:
    start = time.perf_counter()
    labels = segment_affinity_stack(affinities, offsets, params)
    scores = evaluate_segments(labels, truth)
    keys = ("v_rand", "v_info", "voi_split", "voi_merge", "segments", "truth_segments")
    return {
        "long_range_bias": params.long_range_bias,
        "min_size_px": params.min_size_px,
        **{key: round(float(scores[key]), 4) for key in keys},
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", help="label stack of the maps' slices")
    parser.add_argument("maps", nargs="+", help="affinity maps: the first chooses the parameters")
    args = parser.parse_args()
    print(json.dumps({"cpu": cpu_model()}))
    truth = membrane_target(read_stack(args.labels)).astype(np.float32)
    first, *others = args.maps
    affinities, offsets = read_affinity_file(first)
    runs = []
    for bias, size in itertools.product(BIASES, MIN_SIZES):
        runs.append(score(affinities, offsets, truth, MutexParams(long_range_bias=bias, min_size_px=size)))
        print(json.dumps({"map": first, **runs[-1]}), flush=True)
    best = max(runs, key=lambda run: (run["v_rand"], run["v_info"]))
    chosen = MutexParams(long_range_bias=best["long_range_bias"], min_size_px=best["min_size_px"])
    print(json.dumps({"chosen on": first, **best}))
    for path in others:
        affinities, offsets = read_affinity_file(path)
        print(json.dumps({"map": path, **score(affinities, offsets, truth, chosen)}), flush=True)
    default = MutexParams()
    for path in args.maps:
        affinities, offsets = read_affinity_file(path)
        print(json.dumps({"map": path, "defaults": True, **score(affinities, offsets, truth, default)}), flush=True)


if __name__ == "__main__":
    main()
