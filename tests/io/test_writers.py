"""The one writer interface: TIFF stacks and chunked volumes, complete or absent."""

import json
import os

import numpy as np
import pytest
import tifffile

from em_unet import cli
from em_unet.errors import EmUnetError
from em_unet.io.volumes import create_volume, open_volume
from em_unet.io.writers import ResumeMarkers, check_output, check_output_space, open_output, output_kind


def test_output_kind_is_a_volume_for_volume_addresses_and_a_tiff_otherwise(tmp_path):
    assert output_kind(tmp_path / "a.tif") == output_kind(tmp_path / "b.TIFF") == output_kind("c") == "tiff"
    for address in (f"{tmp_path}/a.zarr", f"{tmp_path}/a.ome.zarr/raw", f"{tmp_path}/a.h5:/p", "v.hdf5"):
        assert output_kind(address) == "volume"


def test_tiff_is_written_slice_by_slice_and_opens_as_a_stack(tmp_path):
    path = tmp_path / "sub" / "p.tif"
    with open_output(path, dtype=np.float32) as writer:
        for z in range(3):
            writer.write(np.full((4, 5), z, np.float64))
        assert not path.exists()  # only once complete
    stack = tifffile.imread(path)
    assert stack.shape == (3, 4, 5) and stack.dtype == np.float32 and stack[2].max() == 2
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej


def test_a_failed_tiff_keeps_the_earlier_file_and_leaves_no_debris(tmp_path):
    path = tmp_path / "p.tif"
    tifffile.imwrite(path, np.ones((1, 2, 2), np.uint8))
    before = path.read_bytes()
    for failure in (RuntimeError("model failed"), KeyboardInterrupt()):
        with pytest.raises(type(failure)):
            with open_output(path, dtype=np.uint8, sidecar={"a": 1}, overwrite=True) as writer:
                writer.write(np.zeros((2, 2)))
                raise failure
        assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["p.tif"]
    with pytest.raises(EmUnetError, match="already exists"):
        check_output(path)
    with pytest.raises(EmUnetError, match="already exists"):
        with open_output(path, dtype=np.uint8):
            pass


def test_labels_with_sidecar_are_written_both_or_neither(tmp_path):
    path = tmp_path / "n.tif"
    labels = np.arange(2 * 3 * 3, dtype=np.uint32).reshape(2, 3, 3) + 70000
    with open_output(path, dtype=np.uint32, sidecar={"labels": 7}, software="em-unet segment 0") as writer:
        writer.write(labels)
    assert np.array_equal(tifffile.imread(path), labels)
    assert json.loads((tmp_path / "n.json").read_text()) == {"labels": 7}
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].tags["Software"].value == "em-unet segment 0" and not tif.is_imagej
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(EmUnetError, match="m.json already exists"):
        check_output(tmp_path / "m.tif", sidecar=True)
    assert not (tmp_path / "m.tif").exists()


def test_a_volume_output_resumes_refuses_other_settings_and_cleans_up(tmp_path):
    address = f"{tmp_path}/out.zarr"
    record = {"model": "m", "tile": 64}
    markers = ResumeMarkers(address)
    with pytest.raises(RuntimeError):  # killed after one piece: output and markers stay, to resume
        with open_output(address, shape=(2, 8, 8), dtype=np.float32, chunks=(1, 8, 8), record=record) as (out, m):
            out[0:1] = np.ones((1, 8, 8))
            m.mark("0-0-0")
            raise RuntimeError("killed")
    assert markers.done() == {"0-0-0": ""} and markers.recorded() == record
    with pytest.raises(EmUnetError, match=r"other settings \(tile\)"):
        with open_output(address, shape=(2, 8, 8), dtype=np.float32, chunks=(1, 8, 8), record={**record, "tile": 32}):
            pass
    with open_output(address, shape=(2, 8, 8), dtype=np.float32, chunks=(1, 8, 8), record=record) as (out, m):
        assert set(m.done()) == {"0-0-0"}  # resumed, not started anew
        out[1:2] = np.full((1, 8, 8), 2.0)
    assert not markers.folder.exists()
    assert open_volume(address)[...].tolist() == np.stack([np.ones((8, 8)), np.full((8, 8), 2.0)]).tolist()
    with pytest.raises(EmUnetError, match="already exists"):
        with open_output(address, shape=(2, 8, 8), dtype=np.float32, chunks=(1, 8, 8), record=record):
            pass


def test_a_volume_start_that_fails_before_any_piece_leaves_nothing(tmp_path):
    for address in (f"{tmp_path}/new.zarr", f"{tmp_path}/new.ome.zarr", f"{tmp_path}/new.h5:/p"):
        with pytest.raises(ValueError):
            with open_output(address, shape=(1, 4, 4), dtype=np.uint32, chunks=(1, 4, 4), record={}):
                raise ValueError("no scheduler")
    assert list(tmp_path.iterdir()) == []
    create_volume(f"{tmp_path}/old.zarr", (1, 4, 4), np.uint8, (1, 4, 4)).close()
    with pytest.raises(ValueError):  # an existing output, replaced: the failure does not delete it
        with open_output(
            f"{tmp_path}/old.zarr", shape=(1, 4, 4), dtype=np.uint8, chunks=(1, 4, 4), record={}, overwrite=True
        ):
            raise ValueError("no scheduler")
    assert (tmp_path / "old.zarr").exists()


@pytest.mark.parametrize("name", ["out.ome.zarr", "out.h5:/p"])
def test_an_unfinished_output_is_marked_and_refused_as_an_input_until_finished(tmp_path, name):
    address = f"{tmp_path}/{name}"
    record = {"command": "em-unet predict", "model": "m"}
    shape = dict(shape=(2, 8, 8), dtype=np.float32, chunks=(1, 8, 8), record=record, pieces=(2, "blocks"))
    with pytest.raises(RuntimeError) as failure:
        with open_output(address, **shape) as (out, m):
            out[0:1] = np.ones((1, 8, 8))
            m.mark("0-0-0")
            raise RuntimeError("a worker failed")
    assert failure.value.__notes__ == [f"{address} is unfinished: 1 of 2 blocks done; rerun the same command to resume"]
    with pytest.raises(EmUnetError, match=r"is unfinished, not a result: written by em-unet predict.*rerun"):
        open_volume(address)
    if name.endswith(".zarr"):  # napari shows the image's name as the layer's name
        import zarr

        attrs = zarr.open_group(f"{tmp_path}/out.ome.zarr", mode="r").attrs.asdict()
        assert attrs["ome"]["multiscales"][0]["name"] == "UNFINISHED image"
    with open_output(address, **shape) as (out, m):  # the same run resumes it
        out[1:2] = np.full((1, 8, 8), 2.0)
    assert open_volume(address)[...].max() == 2.0  # finished: readable, the mark gone
    if name.endswith(".zarr"):
        attrs = zarr.open_group(f"{tmp_path}/out.ome.zarr", mode="r").attrs.asdict()
        assert attrs["ome"]["multiscales"][0]["name"] == "image"


def test_outputs_that_do_not_fit_on_disk_are_refused_or_warned_of_before_any_work(tmp_path, monkeypatch, capsys):
    import em_unet.io.files as files

    free = {"bytes": 100_000}
    real_statvfs = os.statvfs

    def small_disk(path):
        stats = real_statvfs(path)
        return os.statvfs_result((*stats[:4], free["bytes"] // stats.f_frsize, *stats[5:]))

    monkeypatch.setattr(files.os, "statvfs", small_disk)
    for name, shape, dtype in (("p.tif", (3, 512, 512), np.float32), ("n.tif", (30, 100, 100), np.uint16)):
        with pytest.raises(EmUnetError, match=rf"free but .* needed for .*{name} \(.* voxels of {np.dtype(dtype)}\)"):
            check_output_space(tmp_path / name, shape, dtype)
    check_output_space(tmp_path / "fits.tif", (1, 10, 10), np.uint8)
    check_output_space(f"{tmp_path}/p.zarr", (3, 512, 512), np.float32)  # compressed: a warning only
    assert "it may not fit" in capsys.readouterr().err
    stack = np.full((2, 64, 64), 0.5, np.float32)  # the segment command: refused, nothing written
    tifffile.imwrite(tmp_path / "map.tif", stack)
    free["bytes"] = 4096
    assert cli.main(["segment", str(tmp_path / "map.tif"), "-o", str(tmp_path / "out" / "n.tif")]) == 2
    assert "needed for" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_tiff_stacks_open_in_fiji_as_slices_and_affinities_as_channels(tmp_path):
    with open_output(tmp_path / "p.tif", dtype=np.float32) as writer:
        for z in range(5):
            writer.write(np.full((6, 7), z, np.float32))
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert tif.imagej_metadata["slices"] == 5 and "channels" not in tif.imagej_metadata
        assert tif.series[0].axes == "ZYX" and tif.series[0].shape == (5, 6, 7)
    with open_output(
        tmp_path / "a.tif",
        dtype=np.float32,
        channels=3,
        attributes={"affinity_offsets": [[-1, 0]]},
        channel_names=["a", "b", "c"],
    ) as writer:
        for z in range(2):
            writer.write(np.full((3, 6, 7), z, np.float32))
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        assert tif.series[0].axes == "ZCYX" and tif.series[0].shape == (2, 3, 6, 7)
        assert tif.imagej_metadata["Labels"] == ["a", "b", "c"] * 2
        assert json.loads(tif.imagej_metadata["Info"]) == {"affinity_offsets": [[-1, 0]]}
