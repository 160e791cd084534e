"""Blockwise segmentation of chunked volumes on a real dask.distributed LocalCluster."""

import sys

import numpy as np
import pytest
import tifffile

from em_unet.io.volumes import create_volume, open_volume
from em_unet.io.writers import ResumeMarkers
from em_unet.segmentation.blockwise import segment_volume


@pytest.fixture(scope="module")
def volume(isbi_dir):
    """Three ISBI slices cropped to 150 x 200 px: several chunks, partial ones at the edges."""
    return tifffile.imread(isbi_dir / "train-volume.tif")[:3, :150, :200]


def write(address, array, chunks):
    with create_volume(address, array.shape, array.dtype, chunks) as out:
        out[...] = array


@pytest.mark.slow
def test_segment_volume_equals_segment_stack(volume, tmp_path):
    from em_unet.segmentation.watershed import SegmentParams, segment_stack

    rng = np.random.default_rng(0)
    probability = np.clip(1.0 - volume / 255.0 + rng.normal(0, 0.02, volume.shape), 0, 1).astype(np.float32)
    write(f"{tmp_path}/p.zarr", probability, (1, 64, 64))
    params = SegmentParams(sigma_px=1.0, seed_threshold=0.3, merge_threshold=0.5)
    out = segment_volume(f"{tmp_path}/p.zarr", f"{tmp_path}/neurons.ome.zarr", params, workers=2, progress=False)
    labels = open_volume(out)[...]
    assert labels.dtype == np.uint32 and np.array_equal(labels, segment_stack(probability, params))
    assert not ResumeMarkers(out).folder.exists()


@pytest.mark.slow
def test_segmentation_workers_do_not_import_tensorflow(volume, tmp_path):
    from distributed import Client, LocalCluster

    write(f"{tmp_path}/p.zarr", (volume / 255.0).astype(np.float32), (1, 64, 64))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        segment_volume(f"{tmp_path}/p.zarr", f"{tmp_path}/n.zarr", scheduler=cluster.scheduler_address, progress=False)
        with Client(cluster) as client:
            loaded = client.run(lambda: sorted(m for m in ("tensorflow", "keras") if m in sys.modules))
    assert list(loaded.values()) == [[]]
