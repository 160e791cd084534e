"""Neurons from a membrane-probability map: seeded watershed, then agglomeration of the
region-adjacency graph by mean boundary probability.

Per 2-D slice:

1. Seeds: the 4-connected regions where the membrane probability, smoothed by a Gaussian of
   ``sigma_px`` pixels, is below ``seed_threshold`` (cell interiors).
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

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from em_unet.config import Settings, setting
from em_unet.errors import EmUnetError
from em_unet.segmentation.metrics import SEGMENTS_SOFTWARE, as_probability, check_probability


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
        "seeds are regions whose smoothed membrane probability is below P",
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


def segment_slice(membrane_probability: np.ndarray, params: SegmentParams = SegmentParams()) -> np.ndarray:
    """int32 labels 1..k of the neuron sections in one 2-D membrane-probability slice (values in [0, 1])."""
    from scipy.ndimage import gaussian_filter
    from skimage import graph
    from skimage.measure import label
    from skimage.segmentation import relabel_sequential, watershed

    probability = np.asarray(membrane_probability, np.float32)
    if probability.ndim != 2:
        raise EmUnetError(f"segment_slice takes one 2-D slice, got shape {probability.shape}")
    smooth = gaussian_filter(probability, params.sigma_px) if params.sigma_px > 0 else probability
    seeds = label(smooth < params.seed_threshold, connectivity=1)
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
    membrane_probability: np.ndarray, params: SegmentParams = SegmentParams(), progress: bool = False
) -> np.ndarray:
    """uint32 labels of a ``(z, y, x)`` membrane-probability stack, each slice segmented in 2-D and
    labels unique across the stack (slice z's labels follow slice z-1's)."""
    from tqdm import tqdm

    stack = np.asarray(membrane_probability, np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise EmUnetError(f"a membrane-probability stack is (z, y, x), got shape {stack.shape}")
    check_probability(stack, "membrane probability")
    labels = np.zeros(stack.shape, np.uint32)
    offset = 0
    for z in tqdm(range(len(stack)), desc="segmenting", unit="slice", disable=not progress):
        section = segment_slice(stack[z], params)
        labels[z] = section + offset
        offset += int(section.max())
    return labels


def write_segments(
    path: str | Path, labels: np.ndarray, params: SegmentParams, source: str, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write labels as a TIFF stack that opens in Fiji (uint16 where the labels fit, else uint32) and
    the parameters beside it as ``<name>.json``; both or neither (temporary names, then renames)."""
    import tifffile

    from em_unet import __version__
    from em_unet.io.files import atomic_output, check_writable

    path = Path(path)
    sidecar = path.with_suffix(".json")
    check_writable(path, overwrite)
    check_writable(sidecar, overwrite)
    fits16 = labels.max(initial=0) < 2**16
    data = labels.astype(np.uint16 if fits16 else np.uint32)
    record = {
        "segment_params": asdict(params),
        "membrane_probability": source,
        "labels": int(labels.max(initial=0)),
        "dtype": str(data.dtype),
        "em_unet_version": __version__,
    }
    with atomic_output(sidecar, overwrite) as tmp_json, atomic_output(path, overwrite) as tmp_tif:
        # ImageJ's hyperstack format has no 32-bit integers: uint32 labels go in a plain TIFF.
        tifffile.imwrite(tmp_tif, data, imagej=fits16, software=f"{SEGMENTS_SOFTWARE} {__version__}", compression=None)
        tmp_json.write_text(json.dumps(record, indent=2))
    return path, sidecar


def check_segment_outputs(output_path: str | Path, overwrite: bool = False) -> Path:
    """One-line error unless the label TIFF and its ``.json`` beside it can be written (before long work)."""
    from em_unet.io.files import check_writable

    output_path = Path(output_path)
    if output_path.suffix.lower() not in (".tif", ".tiff"):
        raise EmUnetError(f"{output_path}: segments are written as TIFF: name the output .tif or .tiff")
    check_writable(output_path, overwrite)
    check_writable(output_path.with_suffix(".json"), overwrite)
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
    from em_unet.io.stacks import read_stack

    output_path = check_segment_outputs(output_path, overwrite)
    probability = as_probability(read_stack(probability_path), str(probability_path))
    labels = segment_stack(probability, params, progress=progress)
    return write_segments(output_path, labels, params, str(probability_path), overwrite)
