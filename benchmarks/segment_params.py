"""Choose `em-unet segment`'s defaults by measurement: a grid over its three parameters on one or more
membrane-probability maps of the same labelled validation slices (e.g. from models trained with
different seeds), scored with Fiji's V_rand and V_info.

    em-unet predict saved_models/em_unet val.tif -o val-probability.tif     # slices 15-19
    python benchmarks/segment_params.py val-labels.tif seed0-probability.tif seed1-probability.tif

Prints each map's own best-threshold scores, then the parameter sets sorted by their mean V_rand + V_info
over the maps (each map's V_rand beside it), and the current defaults' row. A default that holds across
models matters more than the peak on one: the defaults in `em_unet.segmentation.watershed.SegmentParams` are the third
row of this table on the two seeds of the README's quality recipe (README, "Quality"), 0.0005 below the
best, which differs only in smoothing; the 1 px smoothing is kept for noisier maps.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from em_unet.io.stacks import membrane_target, read_stack  # noqa: E402
from em_unet.segmentation.metrics import as_probability, evaluate_segments, evaluate_stack  # noqa: E402
from em_unet.segmentation.watershed import SegmentParams, segment_stack  # noqa: E402

SIGMAS = (0.0, 1.0, 2.0)
SEED_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3)
MERGE_THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labels", help="labels of the slices (ISBI convention or a 0/1 membrane mask)")
    parser.add_argument("probability", nargs="+", help="membrane-probability TIFFs of those slices")
    args = parser.parse_args(argv)
    target = membrane_target(read_stack(args.labels), source=args.labels)
    maps = [as_probability(read_stack(path), path) for path in args.probability]
    start = time.perf_counter()
    for path, probability in zip(args.probability, maps):
        scores = evaluate_stack(probability, target)
        print(
            f"{path}: map V_rand {scores['v_rand']:.4f} (threshold {scores['v_rand_threshold']:.1f}), "
            f"V_info {scores['v_info']:.4f} (threshold {scores['v_info_threshold']:.1f})"
        )
    rows = []
    for sigma, seed, merge in itertools.product(SIGMAS, SEED_THRESHOLDS, MERGE_THRESHOLDS):
        params = SegmentParams(sigma, seed, merge)
        results = [evaluate_segments(segment_stack(probability, params), target) for probability in maps]
        v_rand = [r["v_rand"] for r in results]
        v_info = [r["v_info"] for r in results]
        rows.append((sum(v_rand) / len(maps), sum(v_info) / len(maps), params, v_rand))
    rows.sort(key=lambda row: -(row[0] + row[1]))
    print(
        f"{'sigma px':>8s} {'seed <':>7s} {'merge <':>7s} {'V_rand':>7s} {'V_info':>7s}   V_rand of each map "
        f"({len(rows)} sets, {time.perf_counter() - start:.0f} s)"
    )
    defaults = SegmentParams()
    for v_rand, v_info, params, each in rows[:15] + [row for row in rows[15:] if row[2] == defaults]:
        mark = "  <- default" if params == defaults else ""
        print(
            f"{params.sigma_px:8.1f} {params.seed_threshold:7.2f} {params.merge_threshold:7.2f} {v_rand:7.4f} "
            f"{v_info:7.4f}   {' '.join(f'{x:.4f}' for x in each)}{mark}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
