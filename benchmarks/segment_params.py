"""Choose `em-unet segment`'s defaults by measurement: a grid over its three parameters on a
membrane-probability map of labelled validation slices, scored with Fiji's V_rand and V_info.

    em-unet predict saved_models/em_unet val.tif -o val-probability.tif     # slices 15-19
    python benchmarks/segment_params.py val-probability.tif val-labels.tif

Prints the map's own best-threshold scores, then every parameter set sorted by V_rand + V_info, and
the current defaults' row. The defaults in `em_unet.segment.SegmentParams` are the best row of this
table on the README's quality model (README, "Neurons").
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from em_unet.data import membrane_target, read_stack  # noqa: E402
from em_unet.metrics import as_probability, evaluate_segments, evaluate_stack  # noqa: E402
from em_unet.segment import SegmentParams, segment_stack  # noqa: E402

SIGMAS = (0.0, 1.0, 2.0)
SEED_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3)
MERGE_THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probability", help="membrane-probability TIFF of labelled slices")
    parser.add_argument("labels", help="their labels (ISBI convention or a 0/1 membrane mask)")
    args = parser.parse_args(argv)
    probability = as_probability(read_stack(args.probability), args.probability)
    target = membrane_target(read_stack(args.labels), source=args.labels)
    start = time.perf_counter()
    scores = evaluate_stack(probability, target)
    print(f"membrane map: V_rand {scores['v_rand']:.4f} (threshold {scores['v_rand_threshold']:.1f}), "
          f"V_info {scores['v_info']:.4f} (threshold {scores['v_info_threshold']:.1f}), "
          f"pixel error {scores['pixel_error']:.4f}")
    rows = []
    for sigma, seed, merge in itertools.product(SIGMAS, SEED_THRESHOLDS, MERGE_THRESHOLDS):
        params = SegmentParams(sigma, seed, merge)
        result = evaluate_segments(segment_stack(probability, params), target)
        rows.append((result["v_rand"] + result["v_info"], params, result))
    rows.sort(key=lambda row: -row[0])
    print(f"{'sigma px':>8s} {'seed <':>7s} {'merge <':>7s} {'V_rand':>7s} {'V_info':>7s} "
          f"{'split':>7s} {'merge':>7s}   ({len(rows)} sets, {time.perf_counter() - start:.0f} s)")
    defaults = SegmentParams()
    for _, params, result in rows[:15] + [row for row in rows[15:] if row[1] == defaults]:
        mark = "  <- default" if params == defaults else ""
        print(f"{params.sigma_px:8.1f} {params.seed_threshold:7.2f} {params.merge_threshold:7.2f} "
              f"{result['v_rand']:7.4f} {result['v_info']:7.4f} {result['v_rand_split']:7.4f} "
              f"{result['v_rand_merge']:7.4f}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
