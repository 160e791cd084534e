"""Neurons from a membrane-probability map: seeded watershed, then agglomeration of the
region-adjacency graph by mean boundary probability.

Per 2-D slice:

1. Seeds: the 4-connected regions where the membrane probability, smoothed by a Gaussian of
   ``sigma_px`` pixels, is below ``min + seed_threshold x (max - min)`` of the smoothed slice (cell
   interiors). The level follows each slice's own range, so a map whose cell interiors sit at 0.1-0.3
   (a weakly trained model, or another scaling) still seeds every cell; on a map that spans 0-1 it is
   ``seed_threshold`` itself. A slice left with one segment is named in a warning.
2. Watershed: the seeds flood the unsmoothed membrane probability (4-connected, no watershed
   lines), so every pixel belongs to a region and region borders follow the membrane ridges.
3. Agglomeration: scikit-image's region-adjacency graph with, on each edge, the mean membrane
   probability along the shared boundary (``skimage.graph.rag_boundary``); the weakest edge is
   merged while its mean stays below ``merge_threshold`` (``skimage.graph.merge_hierarchical``),
   re-averaging the boundaries of merged regions by length. This undoes the over-segmentation
   of step 1 where the membrane between two regions is faint.

scikit-image is used because its watershed and RAG are well kept, already an em-unet dependency
and fast enough for 2-D slices (about 0.2 s a 512 x 512 slice); the defaults were chosen by
measurement on ISBI 2012 validation slices 15-19 (``benchmarks/segment_params.py``; README, "Quality").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage import graph
from skimage.measure import label
from skimage.segmentation import relabel_sequential, watershed
from tqdm import tqdm

from em_unet import __version__
from em_unet.errors import EmUnetError, warn
from em_unet.io.stacks import read_stack
from em_unet.io.writers import check_output, check_output_space, open_output
from em_unet.segmentation.labels import label_dtype, label_offsets
from em_unet.segmentation.metrics import SEGMENTS_SOFTWARE, as_probability, check_probability
from em_unet.settings import Settings, setting


@dataclass(frozen=True)
class SegmentParams(Settings):
    """The segmentation's parameters; see the module docstring for what each does."""

    sigma_px: float = setting(
        1.0,
        "Gaussian smoothing of the membrane probability before seeding, pixels",
        flag="--sigma",
        group="segmentation",
        minimum=0.0,
        maximum=100.0,
        metavar="PX",
    )
    seed_threshold: float = setting(
        0.05,
        "seeds are regions whose smoothed membrane probability is below min + P x (max - min) of its slice",
        group="segmentation",
        minimum=0.0,
        maximum=1.0,
        metavar="P",
    )
    merge_threshold: float = setting(
        0.5,
        "merge neighbouring regions while the mean membrane probability on "
        "their shared boundary is below P; 0 merges nothing",
        group="segmentation",
        minimum=0.0,
        maximum=1.0,
        metavar="P",
    )


def _weight_boundary(graph, src, dst, neighbour):
    """Mean boundary probability of the merged region's edge to ``neighbour``, weighted by boundary length."""
    default = {"weight": 0.0, "count": 0}
    a, b = graph[src].get(neighbour, default), graph[dst].get(neighbour, default)
    count = a["count"] + b["count"]
    return {"count": count, "weight": (a["count"] * a["weight"] + b["count"] * b["weight"]) / count}


def _merge_nothing(graph, src, dst):
    pass


def seed_regions(smooth_probability: np.ndarray, seed_threshold: float) -> np.ndarray:
    """Labelled seeds (4-connected, 0 = none) of one smoothed slice: where it is below
    ``min + seed_threshold x (max - min)`` of the slice."""
    low, high = float(smooth_probability.min()), float(smooth_probability.max())
    return label(smooth_probability < low + seed_threshold * (high - low), connectivity=1)


def segment_slice(membrane_probability: np.ndarray, params: SegmentParams = SegmentParams()) -> np.ndarray:
    """int32 labels 1..k of the neuron sections in one 2-D membrane-probability slice (values in [0, 1])."""
    probability = np.asarray(membrane_probability, np.float32)
    if probability.ndim != 2:
        raise EmUnetError(f"segment_slice takes one 2-D slice, got shape {probability.shape}")
    smooth = gaussian_filter(probability, params.sigma_px) if params.sigma_px > 0 else probability
    seeds = seed_regions(smooth, params.seed_threshold)
    if seeds.max() == 0:
        return np.ones(probability.shape, np.int32)
    regions = watershed(probability, markers=seeds, connectivity=1)
    if regions.max() > 1 and params.merge_threshold > 0:
        rag = graph.rag_boundary(regions, probability.astype(np.float64))
        regions = graph.merge_hierarchical(
            regions,
            rag,
            thresh=params.merge_threshold,
            rag_copy=False,
            in_place_merge=True,
            merge_func=_merge_nothing,
            weight_func=_weight_boundary,
        )
    return relabel_sequential(regions.astype(np.int32) + 1)[0].astype(np.int32)


def segment_stack(
    membrane_probability: np.ndarray,
    params: SegmentParams = SegmentParams(),
    progress: bool = False,
    source: str = "membrane probability",
) -> np.ndarray:
    """uint32 labels of a ``(z, y, x)`` membrane-probability stack, each slice segmented in 2-D and
    labels unique across the stack (slice z's follow slice z-1's, :func:`~.labels.label_offsets`);
    ``source`` names the map in the warning of :func:`warn_single_segments`."""
    stack = np.asarray(membrane_probability, np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise EmUnetError(f"a membrane-probability stack is (z, y, x), got shape {stack.shape}")
    check_probability(stack, source)
    sections = [
        segment_slice(section, params) for section in tqdm(stack, desc="segmenting", unit="slice", disable=not progress)
    ]
    counts = [int(section.max()) for section in sections]
    warn_single_segments(counts, source)
    offsets = label_offsets(counts)
    return np.stack([section.astype(np.uint32) + np.uint32(offset) for section, offset in zip(sections, offsets)])


SEED_HINT = "the map has no cell interior below the seed level there; raise --seed-threshold (or lower --sigma)"


def warn_single_segments(counts: list[int], source: str, hint: str = SEED_HINT) -> None:
    """Warn, naming the slices, when slices of a stack came out as one segment (``counts``: segments per slice);
    ``hint`` says why that may be and which flag changes it."""
    single = [z for z, count in enumerate(counts) if count == 1]
    if single:
        shown = ", ".join(str(z) for z in single[:10]) + (", ..." if len(single) > 10 else "")
        warn(f"{source}: {len(single)} slice(s) came out as one segment (slice {shown}): {hint}")


def write_segments(
    path: str | Path,
    labels: np.ndarray,
    params: Settings,
    source: str,
    overwrite: bool = False,
    source_kind: str = "membrane_probability",
) -> tuple[Path, Path]:
    """Write labels as a TIFF stack that opens in Fiji (uint16 where the labels fit, else uint32) and
    the parameters beside it as ``<name>.json`` (``source`` under ``source_kind``: what was segmented); both or
    neither."""
    path = Path(path)
    dtype = label_dtype(int(labels.max(initial=0)))
    record = {
        "segment_params": asdict(params),
        source_kind: source,
        "labels": int(labels.max(initial=0)),
        "dtype": str(dtype),
        "em_unet_version": __version__,
    }
    software = f"{SEGMENTS_SOFTWARE} {__version__}"
    with open_output(path, dtype=dtype, sidecar=record, software=software, overwrite=overwrite) as writer:
        writer.write(labels)
    return path, path.with_suffix(".json")


def check_segment_outputs(output_path: str | Path, overwrite: bool = False) -> Path:
    """One-line error unless the label TIFF and its ``.json`` beside it can be written (before long work)."""
    output_path = Path(output_path)
    if output_path.suffix.lower() not in (".tif", ".tiff"):
        raise EmUnetError(f"{output_path}: segments are written as TIFF: name the output .tif or .tiff")
    check_output(output_path, overwrite, sidecar=True)
    return output_path


def segment_file(
    probability_path: str | Path,
    output_path: str | Path,
    params: SegmentParams = SegmentParams(),
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, Path]:
    """``em-unet segment``: read a membrane-probability TIFF (float in [0, 1], or 8/16-bit), segment it,
    write the labels and their parameters (:func:`write_segments`)."""
    output_path = check_segment_outputs(output_path, overwrite)
    probability = as_probability(read_stack(probability_path), str(probability_path))
    check_output_space(output_path, probability.shape, np.uint16)  # labels take at least 16 bits
    labels = segment_stack(probability, params, progress=progress, source=str(probability_path))
    return write_segments(output_path, labels, params, str(probability_path), overwrite)
