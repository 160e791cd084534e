"""How `em-unet segment` seeds cells: today's seed level relative to each slice's range, against the
earlier absolute level and h-minima, on real maps of labelled slices and on synthetic maps whose cell
interiors sit above 0 (issue 21: "Seeds that adapt").

    em-unet predict saved_models/em_unet val.tif -o val-probability.tif     # slices 15-19
    python benchmarks/segment_seeds.py val-labels.tif val-probability.tif [more maps ...]

For each rule, with the other segmentation defaults: each real map's segment V_rand / V_info (Fiji's, per
slice averaged), and for synthetic maps of square cells on 0.9 membranes with interiors at 0.0-0.3 the
segments found per slice against the cells there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from skimage.measure import label  # noqa: E402
from skimage.morphology import h_minima  # noqa: E402

from em_unet.io.stacks import membrane_target, read_stack  # noqa: E402
from em_unet.segmentation import watershed  # noqa: E402
from em_unet.segmentation.metrics import as_probability, evaluate_segments  # noqa: E402

TODAY = watershed.seed_regions


def absolute(smooth: np.ndarray, threshold: float) -> np.ndarray:
    """em-unet up to issue 21: below ``threshold`` itself."""
    return label(smooth < threshold, connectivity=1)


def h_minima_seeds(smooth: np.ndarray, threshold: float) -> np.ndarray:
    """Regional minima at least 0.1 deep (h-minima), whatever their level."""
    return label(h_minima(smooth.astype(np.float64), 0.1), connectivity=1)


RULES = {"relative (today)": TODAY, "absolute (before)": absolute, "h-minima, h = 0.1": h_minima_seeds}


@contextlib.contextmanager
def seeding(rule):
    watershed.seed_regions = rule
    try:
        yield
    finally:
        watershed.seed_regions = TODAY


def synthetic(interior: float, slices: int = 4, size: int = 256, cell: int = 32) -> tuple[np.ndarray, int]:
    """Square cells on 3 px membranes at 0.9, interiors at ``interior``, noise 0.02; and the cells per slice."""
    membrane = np.zeros((size, size), bool)
    for k in range(0, size, cell):
        membrane[k : k + 3, :] = membrane[:, k : k + 3] = True
    rng = np.random.default_rng(0)
    maps = [np.where(membrane, 0.9, interior) + rng.normal(0, 0.02, membrane.shape) for _ in range(slices)]
    return np.clip(np.stack(maps), 0, 1).astype(np.float32), (size // cell) ** 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labels", help="labels of the slices (ISBI convention or a 0/1 membrane mask)")
    parser.add_argument("probability", nargs="+", help="membrane-probability TIFFs of those slices")
    args = parser.parse_args(argv)
    target = membrane_target(read_stack(args.labels), source=args.labels)
    maps = {path: as_probability(read_stack(path), path) for path in args.probability}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(f"CPU: {cpu}; {len(maps)} map(s) of {target.shape[0]} slices; defaults {watershed.SegmentParams()}\n")
    synthetic_maps = {interior: synthetic(interior) for interior in (0.0, 0.1, 0.2, 0.3)}
    print("| seeds | " + " | ".join(f"{os.path.basename(p)} V_rand / V_info" for p in maps), end=" | ")
    print(" | ".join(f"interiors {i}: segments per slice (cells)" for i in synthetic_maps) + " | seconds |")
    print("|---" * (len(maps) + len(synthetic_maps) + 2) + "|")
    for name, rule in RULES.items():
        start = time.perf_counter()
        cells = []
        with seeding(rule):
            for probability in maps.values():
                scores = evaluate_segments(watershed.segment_stack(probability, source="map"), target)
                cells.append(f"{scores['v_rand']:.4f} / {scores['v_info']:.4f}")
            for probability, count in synthetic_maps.values():
                found = [len(np.unique(s)) for s in watershed.segment_stack(probability, source="synthetic")]
                cells.append(f"{min(found)}-{max(found)} ({count})")
        print(f"| {name} | " + " | ".join(cells) + f" | {time.perf_counter() - start:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
