"""Blockwise prediction and segmentation of chunked volumes on a real dask.distributed LocalCluster."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from em_unet.errors import EmUnetError
from em_unet.inference.blockwise import predict_volume
from em_unet.inference.tiling import Tiling
from em_unet.io.volumes import create_volume, open_volume
from em_unet.io.writers import ResumeMarkers
from tests.helpers import error_line, interruptible, run_cli

SETTINGS = {"tile": 64, "margin": 8, "overlap": 8, "tile_batch": 3}
TILING = Tiling(**SETTINGS)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    import keras

    from em_unet.training.model import build_unet

    keras.utils.set_random_seed(1)
    path = tmp_path_factory.mktemp("model") / "m.keras"
    build_unet(depth=2, base_filters=4).save(path)
    return path


@pytest.fixture(scope="module")
def volume(isbi_dir):
    """Three ISBI slices cropped to 150 x 200 px: several chunks and blocks, partial ones at the edges."""
    return tifffile.imread(isbi_dir / "train-volume.tif")[:3, :150, :200]


def in_memory(model_path, images, isbi=False):
    from em_unet.inference.predict import load_predictor, predict_stack
    from em_unet.io.stacks import to_unit_range

    probability = np.stack(list(predict_stack(load_predictor(model_path), to_unit_range(images), TILING)))
    return 1.0 - probability if isbi else probability


def write(address, array, chunks):
    with create_volume(address, array.shape, array.dtype, chunks) as out:
        out[...] = array


@pytest.mark.slow
def test_blockwise_equals_in_memory_prediction_on_two_workers(model_path, volume, tmp_path):
    write(f"{tmp_path}/raw.zarr", volume, (1, 64, 64))
    expected = in_memory(model_path, volume)
    out = predict_volume(
        model_path, f"{tmp_path}/raw.zarr", f"{tmp_path}/p.ome.zarr", workers=2, progress=False, tiling=TILING
    )
    got = open_volume(out)
    assert got.shape == volume.shape and got.chunks == (1, 64, 64) and got.dtype == np.float32
    assert np.abs(got[...] - expected).max() < 1e-5
    assert not ResumeMarkers(out).folder.exists()  # complete: no markers left
    # HDF5 in, HDF5 out (written by the client), a float input rescaled by its range, the ISBI convention,
    # on a cluster that was already running (--scheduler)
    from distributed import Client, LocalCluster

    float_volume = volume.astype(np.float32) * 3.0 + 7.0
    write(f"{tmp_path}/raw.h5:/em/raw", float_volume, (1, 64, 64))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        out = predict_volume(
            model_path,
            f"{tmp_path}/raw.h5",
            f"{tmp_path}/p.h5:/probability",
            key="/em/raw",
            isbi=True,
            scheduler=cluster.scheduler_address,
            block=128,
            progress=False,
            tiling=TILING,
        )
        with Client(cluster) as client:  # each worker that predicted loaded the model once
            loaded = client.run(lambda: len(__import__("em_unet.inference.blockwise").inference.blockwise._PREDICTORS))
        assert sorted(loaded.values()) in ([1, 1], [0, 1])
    assert np.abs(open_volume(out)[...] - in_memory(model_path, float_volume, isbi=True)).max() < 1e-5


@pytest.mark.slow
def test_a_killed_run_resumes_and_finishes_with_the_same_result(model_path, volume, tmp_path, capsys):
    big = np.concatenate([volume] * 4)  # 12 slices x 6 blocks
    write(f"{tmp_path}/raw.zarr", big, (1, 64, 64))
    output = f"{tmp_path}/p.zarr"
    command = [
        sys.executable,
        "-m",
        "em_unet.cli",
        "predict",
        model_path,
        f"{tmp_path}/raw.zarr",
        "-o",
        output,
        "--workers",
        "1",
        *[f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()],
    ]
    process = subprocess.Popen(
        list(map(str, command)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    markers = ResumeMarkers(output).folder
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if markers.is_dir() and len([p for p in markers.iterdir() if p.name[0].isdigit()]) >= 5:
                break
            time.sleep(0.1)
        assert process.poll() is None, "the prediction ended before it could be killed"
        with pytest.raises(EmUnetError, match=rf"this output is in use by process {process.pid} on "):
            predict_volume(model_path, f"{tmp_path}/raw.zarr", output, workers=1, progress=False, tiling=TILING)
        os.killpg(process.pid, signal.SIGKILL)  # the command and its Dask workers, without warning
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    done_before = {p.name for p in markers.iterdir() if p.name[0].isdigit()}
    assert 5 <= len(done_before) < 72
    with pytest.raises(EmUnetError, match="other settings"):  # a different command does not mix in
        predict_volume(
            model_path,
            f"{tmp_path}/raw.zarr",
            output,
            workers=1,
            progress=False,
            tiling=Tiling(**{**SETTINGS, "margin": 16}),
        )
    with pytest.raises(EmUnetError, match="is unfinished, not a result"):  # nothing reads it as a result yet
        open_volume(output)
    predict_volume(model_path, f"{tmp_path}/raw.zarr", output, workers=2, progress=False, tiling=TILING)
    assert f"process {process.pid} that held this output is gone; taking its lock over" in capsys.readouterr().err
    assert np.abs(open_volume(output)[...] - in_memory(model_path, big)).max() < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr", "raw.zarr"]  # no lock, no markers left
    with pytest.raises(EmUnetError, match="already exists"):  # finished: like any existing output
        predict_volume(model_path, f"{tmp_path}/raw.zarr", output, workers=1, progress=False, tiling=TILING)


@pytest.mark.slow
def test_ctrl_c_stops_the_command_and_its_workers_with_one_line_and_the_output_marked(model_path, volume, tmp_path):
    write(f"{tmp_path}/raw.zarr", np.concatenate([volume] * 4), (1, 64, 64))
    output = tmp_path / "p.zarr"
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    command = [sys.executable, "-m", "em_unet.cli", "predict", model_path, f"{tmp_path}/raw.zarr", "-o", output]
    process = subprocess.Popen(
        [*map(str, command), "--workers", "1", *settings],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=interruptible,
    )
    markers = ResumeMarkers(str(output)).folder
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if markers.is_dir() and len([p for p in markers.iterdir() if p.name[0].isdigit()]) >= 3:
                break
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"em-unet: interrupted; {output} is unfinished: \d+ of 144 blocks done; rerun the same command to resume"
        r"( \(the workers' log: .*\))?",
        last,
    ), last
    with pytest.raises(EmUnetError, match="is unfinished, not a result"):
        open_volume(str(output))


@pytest.mark.slow
def test_a_corrupt_chunk_is_one_line_naming_the_log_and_the_unfinished_output(model_path, volume, tmp_path):
    write(f"{tmp_path}/raw.zarr", volume, (1, 64, 64))
    chunk = tmp_path / "raw.zarr" / "0" / "c" / "2" / "2" / "3"  # the last slice's last chunk
    chunk.write_bytes(b"not zstd data" * 10)
    output = tmp_path / "p.zarr"
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    result = run_cli("predict", model_path, f"{tmp_path}/raw.zarr", "-o", output, "--workers", "1", *settings)
    assert result.returncode == 2
    line = error_line(result)
    log = ResumeMarkers(str(output)).log_path
    assert "raw.zarr: cannot read z 2-2, y" in line
    assert re.search(rf"{output} is unfinished: \d+ of 36 blocks done; rerun the same command to resume", line)
    assert line.endswith(f"(the workers' log: {log})")
    assert "Compute Failed" not in result.stderr and "Compute Failed" in log.read_text()
    with pytest.raises(EmUnetError, match="is unfinished, not a result"):
        open_volume(str(output))


def test_bad_volumes_and_outputs_are_refused_before_any_work(model_path, tmp_path, capsys):
    from em_unet import cli

    write(f"{tmp_path}/raw.zarr/em", np.zeros((2, 256, 256), np.uint8), (1, 32, 32))
    import zarr

    zarr.create_array(f"{tmp_path}/four.zarr", shape=(2, 2, 64, 64), dtype="uint8", chunks=(1, 1, 32, 32))
    zarr.create_array(f"{tmp_path}/complex.zarr", shape=(2, 64, 64), dtype="complex64", chunks=(1, 32, 32))
    write(f"{tmp_path}/done.zarr", np.ones((2, 64, 64), np.float32), (1, 32, 32))
    tifffile.imwrite(tmp_path / "raw.tif", np.zeros((2, 64, 64), np.uint8))
    (tmp_path / "file").write_text("a file")
    base = ["predict", model_path]
    cases = [
        ([f"{tmp_path}/raw.zarr/nope", "-o", f"{tmp_path}/o.zarr"], "nope"),
        ([f"{tmp_path}/raw.zarr", "--key", "missing", "-o", f"{tmp_path}/o.zarr"], "missing"),
        ([f"{tmp_path}/none.h5:/raw", "-o", f"{tmp_path}/o.zarr"], "none.h5"),
        ([f"{tmp_path}/four.zarr", "-o", f"{tmp_path}/o.zarr"], "(2, 2, 64, 64)"),
        ([f"{tmp_path}/complex.zarr", "-o", f"{tmp_path}/o.zarr"], "complex numbers"),
        ([f"{tmp_path}/raw.zarr/em", "-o", f"{tmp_path}/file/o.zarr"], "file"),
        ([f"{tmp_path}/raw.zarr/em", "-o", f"{tmp_path}/done.zarr"], "already exists"),
        ([f"{tmp_path}/raw.zarr/em", "-o", f"{tmp_path}/o.zarr", "--block", "100"], "--block 100 px does not divide"),
        ([f"{tmp_path}/raw.zarr/em", "-o", f"{tmp_path}/o.zarr", "--block", "10"], "--block = 10"),
        ([f"{tmp_path}/raw.zarr/em", "-o", f"{tmp_path}/o.zarr", "--binary"], "--binary is for TIFF outputs"),
        ([f"{tmp_path}/raw.tif", "-o", f"{tmp_path}/o.zarr"], "from a chunked input"),
        ([f"{tmp_path}/raw.zarr/em", "-o", f"{tmp_path}/o.tif", "--workers", "2"], "are for chunked outputs"),
        (
            [
                f"{tmp_path}/raw.zarr/em",
                "-o",
                f"{tmp_path}/o.zarr",
                "--scheduler",
                "tcp://127.0.0.1:1",
                "--workers",
                "2",
            ],
            "--scheduler and --workers both given",
        ),
    ]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done_before = open_volume(f"{tmp_path}/done.zarr")[...]
    for extra, message in cases:
        assert cli.main([str(a) for a in base + extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert np.array_equal(open_volume(f"{tmp_path}/done.zarr")[...], done_before)


def test_a_scheduler_that_does_not_answer_is_one_line(model_path, tmp_path, capsys, monkeypatch):
    from em_unet import cli, cluster

    monkeypatch.setattr(cluster, "SCHEDULER_TIMEOUT_S", 2.0)
    write(f"{tmp_path}/raw.zarr", np.zeros((1, 64, 64), np.uint8), (1, 64, 64))
    argv = [
        "predict",
        model_path,
        f"{tmp_path}/raw.zarr",
        "-o",
        f"{tmp_path}/p.zarr",
        "--scheduler",
        "tcp://127.0.0.1:9",
    ]
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scheduler tcp://127.0.0.1:9: no Dask scheduler answers there" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.zarr"]  # no output, no markers


@pytest.mark.slow
def test_blockwise_affinities_equal_in_memory_and_record_their_offsets(volume, tmp_path):
    import keras

    from em_unet.inference.predict import load_predictor, predict_stack
    from em_unet.io.stacks import to_unit_range
    from em_unet.training.model import build_unet

    keras.utils.set_random_seed(3)
    offsets = ((-1, 0), (0, -1), (-9, -4))
    build_unet(depth=2, base_filters=4, affinity_offsets=offsets).save(tmp_path / "aff.keras")
    write(f"{tmp_path}/raw.zarr", volume, (1, 64, 64))
    predict_volume(
        tmp_path / "aff.keras",
        f"{tmp_path}/raw.zarr",
        f"{tmp_path}/p.zarr",
        workers=2,
        progress=False,
        tiling=TILING,
        affinities_address=f"{tmp_path}/a.ome.zarr",
    )
    expected = np.stack(
        list(predict_stack(load_predictor(tmp_path / "aff.keras"), to_unit_range(volume), TILING, channels=True)),
        axis=1,
    )
    affinities = open_volume(f"{tmp_path}/a.ome.zarr", channels=True)
    assert affinities.shape == (3, *volume.shape) and affinities.attributes["affinity_offsets"] == [
        list(o) for o in offsets
    ]
    assert np.abs(affinities[...] - expected[1:]).max() < 1e-5
    assert np.abs(open_volume(f"{tmp_path}/p.zarr")[...] - expected[0]).max() < 1e-5
    assert not ResumeMarkers(f"{tmp_path}/a.ome.zarr").folder.exists()
    # the blockwise affinities segment as the TIFF path does
    assert run_cli("segment", f"{tmp_path}/a.ome.zarr", "-o", f"{tmp_path}/n.zarr", "--workers", "1").returncode == 0


@pytest.mark.slow
def test_blockwise_z_context_equals_in_memory_across_z_blocks(volume, tmp_path, isbi_dir):
    """2.5-D (K = 3) and 3-D (z-patch 4) U-Nets, blocks of 2 sections: each block reads its z halo (mirrored at
    the volume's ends), so block boundaries in z do not show."""
    import keras

    from em_unet.inference.predict import load_predictor, predict_stack
    from em_unet.io.stacks import to_unit_range
    from em_unet.training.model import build_unet, build_unet3d

    stack = tifffile.imread(isbi_dir / "train-volume.tif")[:5, :150, :200]
    write(f"{tmp_path}/raw.zarr", stack, (2, 64, 64))
    keras.utils.set_random_seed(5)
    build_unet(depth=2, base_filters=4, channels=3).save(tmp_path / "k3.keras")
    build_unet3d(depth=2, base_filters=4, voxel_size=(12, 4, 4), z_context=4).save(tmp_path / "u3d.keras")
    for name in ("k3", "u3d"):
        out = predict_volume(
            tmp_path / f"{name}.keras",
            f"{tmp_path}/raw.zarr",
            f"{tmp_path}/{name}.zarr",
            workers=2,
            progress=False,
            tiling=TILING,
        )
        predictor = load_predictor(tmp_path / f"{name}.keras")
        expected = np.stack(list(predict_stack(predictor, to_unit_range(stack), TILING)))
        got = open_volume(out)[...]
        assert got.shape == stack.shape and np.abs(got - expected).max() < 1e-5, name
        # the halo matters: predicted without it, the sections at the blocks' edges differ
        assert (
            np.abs(expected[1] - np.stack(list(predict_stack(predictor, to_unit_range(stack[:2]), TILING)))[1]).max()
            > 1e-4
        )
