"""Blockwise segmentation of chunked volumes on a real dask.distributed LocalCluster."""

import sys

import numpy as np
import pytest
import tifffile

from em_unet import cli
from em_unet.io.volumes import create_volume, open_volume
from em_unet.io.writers import ResumeMarkers
from em_unet.segmentation.blockwise import segment_volume
from tests.helpers import error_line, run_cli
from tests.segmentation.test_watershed import cells_map


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


@pytest.mark.slow
def test_a_failing_worker_is_one_line_with_its_log_and_leaves_a_marked_output_that_resumes(volume, tmp_path, capsys):
    import zarr

    from em_unet import cli
    from em_unet.segmentation.watershed import SegmentParams, segment_stack

    probability = (volume / 255.0).astype(np.float32)
    broken = probability.copy()
    broken[2, 5, 7] = np.nan
    write(f"{tmp_path}/p.zarr", broken, (1, 64, 64))
    output = tmp_path / "n.ome.zarr"
    result = run_cli("segment", f"{tmp_path}/p.zarr", "-o", output, "--workers", "1")
    assert result.returncode == 2
    line = error_line(result)
    log = ResumeMarkers(str(output)).log_path
    assert "p.zarr: NaN or infinite value at slice 2 (nan at row 5, column 7)" in line
    assert f"{output} is unfinished: " in line and "of 6 slice steps (2 per slice) done" in line
    assert f"rerun the same command to resume (the workers' log: {log})" in line
    assert "Compute Failed" not in result.stderr
    assert "Compute Failed" in log.read_text() and "check_finite" in log.read_text()  # the traceback, kept
    attrs = zarr.open_group(str(output), mode="r").attrs.asdict()
    assert attrs["ome"]["multiscales"][0]["name"].startswith("UNFINISHED")  # napari's layer name says it
    from em_unet.training.model import build_unet

    build_unet(depth=2, base_filters=4).save(tmp_path / "m.keras")
    for argv in (
        ["segment", str(output), "-o", str(tmp_path / "again.tif")],
        ["segment", str(output), "-o", str(tmp_path / "again.ome.zarr")],
        ["evaluate", str(output), str(tmp_path / "any.tif")],
        ["predict", str(tmp_path / "m.keras"), str(output), "-o", str(tmp_path / "q.ome.zarr")],
        ["predict", str(tmp_path / "m.keras"), str(output), "-o", str(tmp_path / "q.tif"), "--segment", "s.tif"],
        ["train", "--data", str(output), "--labels", str(output), "--logs-dir", str(tmp_path / "logs")],
    ):
        assert cli.main(argv) == 2, argv
        assert f"{output} is unfinished, not a result: written by em-unet segment" in capsys.readouterr().err
    refused_outputs = ("again.tif", "again.ome.zarr", "q.ome.zarr", "q.tif", "logs")
    assert not any((tmp_path / name).exists() for name in refused_outputs)
    with open_volume(f"{tmp_path}/p.zarr", mode="r+") as fixed:  # the user mends the input and reruns
        fixed[2, 5, 7] = 0.5
    probability[2, 5, 7] = 0.5
    assert run_cli("segment", f"{tmp_path}/p.zarr", "-o", output, "--workers", "1").returncode == 0
    assert np.array_equal(open_volume(str(output))[...], segment_stack(probability, SegmentParams()))
    assert not ResumeMarkers(str(output)).folder.exists()
    assert not zarr.open_group(str(output), mode="r").attrs.asdict()["ome"]["multiscales"][0]["name"].startswith("UN")


@pytest.mark.slow
def test_maps_with_cell_interiors_above_zero_give_one_segment_per_cell_blockwise(tmp_path, capsys):
    probability, truth = cells_map(interior=0.2)
    write(f"{tmp_path}/p.zarr", probability, (1, 64, 64))
    labels = open_volume(segment_volume(f"{tmp_path}/p.zarr", f"{tmp_path}/n.zarr", workers=1, progress=False))[...]
    assert [len(np.unique(s)) for s in labels] == [len(np.unique(t)) - 1 for t in truth]
    flat = np.full((2, 64, 64), 0.4, np.float32)  # no cell interior at all: one segment, and a warning
    write(f"{tmp_path}/flat.zarr", flat, (1, 64, 64))
    segment_volume(f"{tmp_path}/flat.zarr", f"{tmp_path}/f.zarr", workers=1, progress=False)
    assert "flat.zarr: 2 slice(s) came out as one segment (slice 0, 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_affinity_volumes_segment_blockwise_as_in_memory(tmp_path, capsys):
    from em_unet.segmentation.affinities import MutexParams, affinities_from_cells, segment_affinity_stack
    from tests.segmentation.test_affinities import SMALL_OFFSETS, random_cells

    rng = np.random.default_rng(5)
    stack = []
    for _ in range(3):
        _, cells = random_cells(rng, (70, 90), cells=15)
        stack.append(np.clip(affinities_from_cells(cells, SMALL_OFFSETS)[0] + rng.normal(0, 0.1, (6, 70, 90)), 0, 1))
    stack = np.stack(stack).astype(np.float32)  # (z, c, y, x)
    params = MutexParams(min_size_px=10)
    expected = segment_affinity_stack(stack, SMALL_OFFSETS, params)
    attributes = {"affinity_offsets": [list(o) for o in SMALL_OFFSETS]}
    with create_volume(
        f"{tmp_path}/aff.ome.zarr",
        stack.shape[:1] + stack.shape[2:],
        np.float32,
        (1, 32, 32),
        channels=6,
        attributes=attributes,
    ) as out:
        out[...] = np.moveaxis(stack, 1, 0)
    out = segment_volume(f"{tmp_path}/aff.ome.zarr", f"{tmp_path}/n.zarr", params, workers=2, progress=False)
    labels = open_volume(out)[...]
    assert labels.dtype == np.uint32 and np.array_equal(labels, expected)  # unique across slices, as in memory
    # the command: it recognises the affinity volume; HDF5 without recorded offsets takes --offsets
    with create_volume(f"{tmp_path}/aff.h5:/aff", (3, 70, 90), np.float32, (1, 70, 90), channels=6) as out:
        out[...] = np.moveaxis(stack, 1, 0)
    flag = "--offsets=" + " ".join(f"{dy},{dx}" for dy, dx in SMALL_OFFSETS)
    assert cli.main(["segment", f"{tmp_path}/aff.h5:/aff", "-o", f"{tmp_path}/m.zarr", flag, "--workers", "1"]) == 0
    assert np.array_equal(open_volume(f"{tmp_path}/m.zarr")[...], expected)
    for args, message in (
        ([], "records no affinity offsets"),
        (["--offsets=-1,0 0,-1"], "6 affinity channels but 2 offsets"),
    ):
        result = run_cli("segment", f"{tmp_path}/aff.h5:/aff", "-o", f"{tmp_path}/bad.zarr", *args)
        assert result.returncode == 2 and message in error_line(result)
        assert not (tmp_path / "bad.zarr").exists()
