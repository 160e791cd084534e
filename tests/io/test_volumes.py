import json
import pickle

import h5py
import numpy as np
import pytest
import zarr

from em_unet.errors import DataError
from em_unet.io.stacks import iter_image_slices, iter_slices, read_stack, to_unit_range
from em_unet.io.volumes import (
    Volume,
    VolumeAddress,
    create_volume,
    is_volume_address,
    open_volume,
    parse_address,
)


def ramp(shape=(5, 20, 30), dtype=np.uint16):
    return (np.arange(np.prod(shape)) % 1000).reshape(shape).astype(dtype)


def message(excinfo) -> str:
    """The error's message, which must be one line."""
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


def chunk_files(array_folder):
    """The chunk files of a Zarr array (v2 or v3), every file that is not metadata."""
    return sorted(
        p for p in array_folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != "zarr.json"
    )


def write_zarr(path, data, chunks, zarr_format=3, **kwargs):
    array = zarr.create_array(
        store=str(path), shape=data.shape, dtype=data.dtype, chunks=chunks, zarr_format=zarr_format, **kwargs
    )
    array[...] = data
    return array


def write_pyramid(path, data, zarr_format, axes="zyx", scale_factors=(2, 4)):
    """A multiscale OME-Zarr image written by the ome-zarr package itself."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    fmt = FormatV04() if zarr_format == 2 else FormatV05()
    write_image(data, group, scale_factors=list(scale_factors), axes=axes, fmt=fmt)
    return group


def ome_reader_shapes(path):
    """Shapes of the levels of the multiscale image ome-zarr's own reader finds at ``path``."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    nodes = list(Reader(parse_url(str(path)))())
    images = [node for node in nodes if any(isinstance(spec, Multiscales) for spec in node.specs)]
    assert images, nodes
    return [tuple(level.shape) for level in images[0].data]


# ------------------------------------------------------------------ addresses


@pytest.mark.parametrize(
    "address, path, key, kind, level",
    [
        ("vol.h5", "vol.h5", None, "hdf5", 0),
        ("vol.h5:/raw", "vol.h5", "raw", "hdf5", 0),
        ("data/vol.HDF5:/volumes/raw", "data/vol.HDF5", "volumes/raw", "hdf5", 0),
        ("vol.hdf:raw", "vol.hdf", "raw", "hdf5", 0),
        ("store.zarr", "store.zarr", None, "zarr", 0),
        ("store.zarr/", "store.zarr", None, "zarr", 0),
        ("/x/store.zarr/a/b", "/x/store.zarr", "a/b", "zarr", 0),
        ("store.zarr/1", "store.zarr", "1", "zarr", 0),
        ("img.ome.zarr", "img.ome.zarr", None, "ome-zarr", 0),
        ("img.ome.zarr/2", "img.ome.zarr", None, "ome-zarr", 2),
        ("img.ome.zarr/0/1", "img.ome.zarr", "0/1", "ome-zarr", 0),
        ("run.zarr/vol.h5", "run.zarr", "vol.h5", "zarr", 0),
    ],
)
def test_parse_address(address, path, key, kind, level):
    assert is_volume_address(address)
    parsed = parse_address(address)
    assert parsed == VolumeAddress(parsed.path, key, kind, level)
    assert str(parsed.path) == path


def test_key_argument_replaces_the_key_and_tiffs_are_not_volumes(tmp_path):
    assert parse_address("vol.h5:/raw", key="/labels/").key == "labels"
    assert parse_address("img.ome.zarr/1", key="0").level == 0
    assert parse_address(tmp_path / "store.zarr", key="a").key == "a"
    for path in ("stack.tif", "slices", "a.png", "vol.h5x", "vol.h5/raw", "x.zarr.tif", tmp_path):
        assert not is_volume_address(path)
    with pytest.raises(DataError) as excinfo:
        parse_address("stack.tif")
    assert "stack.tif: not a volume address" in message(excinfo)


# ------------------------------------------------------------------ round trips

FORMATS = [
    # address, create_volume keyword arguments, dtype, on-disk (zarr_format, OME-NGFF version or None)
    ("vol.h5:/volumes/raw", {}, np.uint16, None),
    ("store.zarr/raw", {"zarr_format": 2}, np.float32, (2, "0.4")),
    ("store.zarr/a/raw", {"zarr_format": 3}, np.int16, (3, "0.5")),
    ("img.ome.zarr", {"zarr_format": 2}, np.uint8, (2, "0.4")),
    ("img.ome.zarr", {"zarr_format": 3}, bool, (3, "0.5")),
]


@pytest.mark.parametrize("address, options, dtype, stored", FORMATS)
def test_round_trip(tmp_path, address, options, dtype, stored):
    data = ramp(dtype=dtype) if dtype is not bool else ramp() % 3 == 0
    address = f"{tmp_path}/{address}"
    with create_volume(address, data.shape, data.dtype, (2, 8, 64), **options) as volume:
        assert volume.shape == data.shape and volume.dtype == data.dtype
        assert volume.chunks == (2, 8, 30)  # clipped to the shape
        for z in range(0, 5, 2):  # block by block, as a blockwise writer does
            volume[z : z + 2] = data[z : z + 2]
    with open_volume(address) as volume:
        assert volume.shape == data.shape and volume.dtype == data.dtype and volume.chunks == (2, 8, 30)
        assert np.array_equal(volume[:], data)
        assert volume[:].dtype == data.dtype
    if stored is None:
        with h5py.File(tmp_path / "vol.h5") as file:
            assert file["volumes/raw"].chunks == (2, 8, 30)
        return
    zarr_format, version = stored
    store, _, key = address.partition(".zarr")
    image = zarr.open_group(store + ".zarr" + key, mode="r")
    assert image.metadata.zarr_format == zarr_format
    attrs = image.attrs.asdict()
    multiscales = attrs["ome"]["multiscales"] if version == "0.5" else attrs["multiscales"]
    if version == "0.5":
        assert attrs["ome"]["version"] == "0.5"
    else:
        assert multiscales[0]["version"] == "0.4"
    assert multiscales[0]["axes"] == [{"name": n, "type": "space"} for n in "zyx"]
    assert multiscales[0]["datasets"] == [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}
    ]
    level0 = image["0"]
    assert level0.chunks == (2, 8, 30) and np.array_equal(level0[:], data)
    assert ome_reader_shapes(store + ".zarr" + key) == [data.shape]


def test_zarr_v2_output_follows_ome_ngff_0_4(tmp_path):
    create_volume(tmp_path / "out.zarr", (3, 4, 5), np.uint8, (1, 4, 5), zarr_format=2)
    meta = json.loads((tmp_path / "out.zarr" / "0" / ".zarray").read_text())
    assert meta["dimension_separator"] == "/" and meta["compressor"]["id"] == "blosc"
    create_volume(tmp_path / "out3.zarr", (3, 4, 5), np.uint8, (1, 4, 5))
    meta = json.loads((tmp_path / "out3.zarr" / "0" / "zarr.json").read_text())
    assert meta["dimension_names"] == ["z", "y", "x"]


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_reads_zarr_arrays_written_by_others(tmp_path, zarr_format):
    data = ramp(dtype=np.float64)
    write_zarr(tmp_path / "root.zarr", data, (2, 10, 10), zarr_format)
    with open_volume(tmp_path / "root.zarr") as volume:
        assert volume.chunks == (2, 10, 10) and np.array_equal(volume[:], data)
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w", zarr_format=zarr_format)
    group.create_array("volumes/raw", shape=data.shape, dtype=data.dtype, chunks=(5, 5, 5))[...] = data
    for address, key in ((f"{tmp_path}/group.zarr/volumes/raw", None), (tmp_path / "group.zarr", "volumes/raw")):
        assert np.array_equal(open_volume(address, key=key)[1:3], data[1:3])
    # the store's only array needs no key, and is named in messages
    only = open_volume(tmp_path / "group.zarr")
    assert only.address == f"{tmp_path}/group.zarr/volumes/raw"


def test_reads_hdf5_written_by_others(tmp_path):
    data = ramp()
    with h5py.File(tmp_path / "vol.h5", "w") as file:
        file.create_dataset("raw", data=data)  # contiguous, not chunked
        file.create_dataset("deep/er/gz", data=data, chunks=(1, 10, 10), compression="gzip")
    with open_volume(tmp_path / "vol.h5", key="raw") as volume:
        assert volume.chunks == (1, 20, 30)  # contiguous: one slice
        assert np.array_equal(volume[:], data)
    with open_volume(f"{tmp_path}/vol.h5:/deep/er/gz") as volume:
        assert volume.chunks == (1, 10, 10) and np.array_equal(volume[2:, 5], data[2:, 5])
    with h5py.File(tmp_path / "one.h5", "w") as file:
        file["only"] = data
    volume = open_volume(tmp_path / "one.h5")
    assert volume.address == f"{tmp_path}/one.h5:/only"


def test_2d_arrays_are_one_slice(tmp_path):
    plane = ramp((20, 30))
    with h5py.File(tmp_path / "plane.h5", "w") as file:
        file["p"] = plane
    write_zarr(tmp_path / "plane.zarr", plane, (8, 8))
    for address in (f"{tmp_path}/plane.h5:/p", tmp_path / "plane.zarr"):
        with open_volume(address) as volume:
            assert volume.shape == (1, 20, 30) and volume.chunks == (1, 8, 8) or volume.chunks == (1, 20, 30)
            assert np.array_equal(volume[:], plane[None])
            assert np.array_equal(volume[0, 3:9, ::-2], plane[3:9, ::-2])
            assert np.array_equal(volume[-1], plane)
            assert volume[1:].shape == (0, 20, 30)
        assert np.array_equal(read_stack(address), plane[None])
    with open_volume(tmp_path / "plane.zarr", mode="r+") as volume:
        volume[0, 0, :] = 7
        volume[1:, 0, :] = 9  # selects nothing
    assert (zarr.open(str(tmp_path / "plane.zarr"))[0] == 7).all()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_zarr_levels(tmp_path, zarr_format):
    data = ramp((8, 32, 32), np.uint8)
    group = write_pyramid(tmp_path / "img.ome.zarr", data, zarr_format)
    attrs = group.attrs.asdict()
    datasets = (attrs["ome"] if zarr_format == 3 else attrs)["multiscales"][0]["datasets"]
    levels = [group[d["path"]][:] for d in datasets]
    assert len(levels) == 3 and datasets[1]["path"] != "1"  # the writer names levels s0, s1, ...: not a key
    assert levels[0].shape == data.shape and levels[2].shape[1] == 8  # the writer downsampled y and x
    for level, expected in enumerate(levels):
        assert np.array_equal(open_volume(tmp_path / "img.ome.zarr", level=level)[:], expected)
        assert np.array_equal(open_volume(f"{tmp_path}/img.ome.zarr/{level}")[:], expected)
    assert np.array_equal(read_stack(f"{tmp_path}/img.ome.zarr/1"), levels[1])
    assert open_volume(tmp_path / "img.ome.zarr").address == f"{tmp_path}/img.ome.zarr"
    # an image inside a plain store, with levels named otherwise than 0, 1, ...
    store = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=zarr_format)
    image = store.create_group("pred")
    for name, part in (("s0", levels[0]), ("s1", levels[1])):
        image.create_array(name, shape=part.shape, dtype=part.dtype, chunks=(4, 16, 16))[...] = part
    datasets = [{"path": p, "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}]} for p in ("s0", "s1")]
    axes = [{"name": n, "type": "space"} for n in "zyx"]
    image.attrs.update(
        {"multiscales": [{"version": "0.4", "datasets": datasets, "axes": axes}]}
        if zarr_format == 2
        else {"ome": {"version": "0.5", "multiscales": [{"datasets": datasets, "axes": axes}]}}
    )
    assert np.array_equal(open_volume(f"{tmp_path}/s.zarr/pred", level=1)[:], levels[1])
    assert np.array_equal(open_volume(f"{tmp_path}/s.zarr/pred/s1")[:], levels[1])


def test_indexing_matches_numpy(tmp_path):
    data = ramp((6, 9, 11), np.int32)
    write_zarr(tmp_path / "v.zarr", data, (4, 4, 4))
    with h5py.File(tmp_path / "v.h5", "w") as file:
        file.create_dataset("v", data=data, chunks=(4, 4, 4))
    indices = [
        (),
        ...,
        2,
        -1,
        (slice(1, 4), slice(2, 8), slice(3, 10)),
        (slice(None, None, -1),),
        (..., slice(10, 2, -3)),
        (1, ..., 4),
        (slice(5, 1, -2), 3, slice(None, None, 2)),
        (slice(3, 3), 1),
        (np.int64(2), slice(-3, None)),
        (slice(-100, 100), slice(None, None, 5)),
    ]
    for path in ("v.zarr", "v.h5:/v"):
        volume = open_volume(f"{tmp_path}/{path}")
        for index in indices:
            got = volume[index]
            assert np.array_equal(got, data[index]) and np.shape(got) == np.shape(data[index]), (path, index)
        with pytest.raises(IndexError):
            volume[6]
        with pytest.raises(IndexError):
            volume[0, 0, 0, 0]
        with pytest.raises(TypeError):
            volume[[0, 1]]
        with pytest.raises(ValueError, match="read-only"):
            volume[0] = 1


def test_writing_matches_numpy(tmp_path):
    for address in (f"{tmp_path}/w.h5:/w", f"{tmp_path}/w.zarr"):
        expected = np.zeros((6, 9, 11), np.float32)
        volume = create_volume(address, expected.shape, expected.dtype, (4, 4, 4))
        for index, value in (
            ((slice(5, 1, -2), 3, slice(None, None, 2)), np.arange(12).reshape(2, 6)),
            ((2, slice(None, None, -1)), np.arange(99).reshape(9, 11)),
            ((...,), 0.5),
            ((1, 2, 3), 7),
            ((slice(3, 3),), 5),
        ):
            expected[index] = value
            volume[index] = value
            assert np.array_equal(volume[:], expected), (address, index)


# ------------------------------------------------------------------ laziness and pickling


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_reading_touches_only_the_chunks_needed(tmp_path, zarr_format):
    data = ramp((4, 16, 16), np.uint16)
    write_zarr(tmp_path / "v.zarr", data, (2, 8, 8), zarr_format)
    files = chunk_files(tmp_path / "v.zarr")
    assert len(files) == 8
    kept = [f for f in files if f.relative_to(tmp_path / "v.zarr").as_posix().replace("/", ".").endswith("1.0.1")]
    assert len(kept) == 1
    for file in files:
        if file not in kept:
            file.write_bytes(b"not a compressed chunk")
    volume = open_volume(tmp_path / "v.zarr")  # metadata only: the damaged chunks are not touched
    assert np.array_equal(volume[2:4, 0:8, 8:16], data[2:4, 0:8, 8:16])
    assert np.array_equal(volume[3, 2:5, 9], data[3, 2:5, 9])
    with pytest.raises(DataError) as excinfo:
        volume[0:3, 0:8, 8:16]  # also needs chunk (0, 0, 1)
    assert f"{tmp_path}/v.zarr: cannot read z 0-2, y 0-7, x 8-15" in message(excinfo)


def test_hdf5_reading_touches_only_the_chunks_needed(tmp_path):
    data = ramp((4, 16, 16), np.uint16)
    with h5py.File(tmp_path / "v.h5", "w") as file:
        dataset = file.create_dataset("v", data=data, chunks=(2, 8, 8), compression="gzip")
        chunks = [dataset.id.get_chunk_info(i) for i in range(dataset.id.get_num_chunks())]
    assert len(chunks) == 8
    with open(tmp_path / "v.h5", "r+b") as raw:
        for chunk in chunks:
            if chunk.chunk_offset != (2, 0, 8):
                raw.seek(chunk.byte_offset)
                raw.write(b"\xff" * chunk.size)
    volume = open_volume(f"{tmp_path}/v.h5:/v")
    assert np.array_equal(volume[2:4, 0:8, 8:16], data[2:4, 0:8, 8:16])
    with pytest.raises(DataError) as excinfo:
        volume[:, :, :]
    assert f"{tmp_path}/v.h5:/v: cannot read z 0-3, y 0-15, x 0-15" in message(excinfo)


@pytest.mark.parametrize("address", ["v.h5:/g/v", "v.zarr/v", "v.ome.zarr"])
def test_pickled_volumes_open_again(tmp_path, address):
    data = ramp()
    address = f"{tmp_path}/{address}"
    written = create_volume(address, data.shape, data.dtype, (2, 10, 10))
    payload = pickle.dumps(written)
    assert len(payload) < 1000  # an address, not data or a file handle
    copy = pickle.loads(payload)
    copy[1:3] = data[1:3]  # a writable volume stays writable
    copy.close()
    written.close()
    reader = open_volume(address)
    clone = pickle.loads(pickle.dumps(reader))
    reader.close()
    assert clone.address == reader.address and not clone.writable
    assert np.array_equal(clone[1:3], data[1:3]) and not clone[0].any()
    clone.close()


def test_dask_reads_volumes_in_worker_processes(tmp_path):
    da = pytest.importorskip("dask.array")
    import dask

    data = ramp((6, 20, 30), np.float32)
    with h5py.File(tmp_path / "v.h5", "w") as file:
        file.create_dataset("v", data=data, chunks=(2, 10, 10))
    volume = open_volume(f"{tmp_path}/v.h5:/v")
    blocks = da.from_array(volume, chunks=volume.chunks)
    with dask.config.set(scheduler="processes", num_workers=2):
        total = (blocks * 2).sum(axis=0).compute()
    np.testing.assert_allclose(total, data.sum(axis=0) * 2, rtol=1e-6)
    out = create_volume(tmp_path / "out.zarr", data.shape, data.dtype, volume.chunks)
    da.store(blocks + 1, out, lock=False, scheduler="threads")
    assert np.array_equal(open_volume(tmp_path / "out.zarr")[:], data + 1)


# ------------------------------------------------------------------ em_unet.io.stacks reads volumes


@pytest.mark.parametrize("address, options, dtype, stored", FORMATS)
def test_iter_slices_and_read_stack_read_volumes(tmp_path, monkeypatch, address, options, dtype, stored):
    data = ramp(dtype=dtype) if dtype is not bool else ramp() % 3 == 0
    address = f"{tmp_path}/{address}"
    create_volume(address, data.shape, data.dtype, (2, 8, 8), **options)[...] = data
    slices = list(iter_slices(address))
    assert len(slices) == 5 and all(s.shape == (20, 30) and s.dtype == data.dtype for s in slices)
    assert np.array_equal(np.stack(slices), data)
    assert np.array_equal(read_stack(address), data)
    monkeypatch.setattr("em_unet.io.stacks.VOLUME_SLAB_BYTES", 1)  # one slice at a time
    assert np.array_equal(read_stack(address), data)


def test_image_slices_of_a_volume_scale_as_the_stack(tmp_path):
    data = ramp(dtype=np.int32) - 300
    create_volume(f"{tmp_path}/v.h5:/v", data.shape, data.dtype, (2, 8, 8))[...] = data
    scaled = np.stack(list(iter_image_slices(f"{tmp_path}/v.h5:/v")))
    np.testing.assert_allclose(scaled, to_unit_range(data))


# ------------------------------------------------------------------ bad inputs


def refused(address, **kwargs) -> str:
    with pytest.raises(DataError) as excinfo:
        open_volume(address, **kwargs)
    return message(excinfo)


def test_missing_files_and_stores(tmp_path):
    assert refused(f"{tmp_path}/none.h5:/raw") == f"{tmp_path}/none.h5: no such file"
    assert refused(f"{tmp_path}/none.zarr/raw") == f"{tmp_path}/none.zarr: no such Zarr store"
    assert refused(f"{tmp_path}/none.ome.zarr") == f"{tmp_path}/none.ome.zarr: no such Zarr store"
    with pytest.raises(DataError, match="no such file"):
        read_stack(f"{tmp_path}/none.hdf5")
    (tmp_path / "text.h5").write_text("hello")
    assert refused(tmp_path / "text.h5") == f"{tmp_path}/text.h5: not a readable HDF5 file (file signature not found)"
    (tmp_path / "empty.zarr").mkdir()
    assert "empty.zarr: not a Zarr store (no zarr.json, .zgroup or .zarray" in refused(tmp_path / "empty.zarr")
    (tmp_path / "file.zarr").write_text("x")
    assert refused(tmp_path / "file.zarr") == f"{tmp_path}/file.zarr is a file, not a Zarr store (a folder)"
    (tmp_path / "folder.h5").mkdir()
    assert refused(tmp_path / "folder.h5") == f"{tmp_path}/folder.h5 is a folder, not an HDF5 file"


def test_missing_keys(tmp_path):
    with h5py.File(tmp_path / "vol.h5", "w") as file:
        file["raw2"] = np.zeros((2, 3, 4))
        file["labels/a"] = np.zeros((2, 3, 4))
        file.create_group("empty")
    path = tmp_path / "vol.h5"
    assert refused(f"{path}:/raw") == f"{path}: no dataset '/raw' (datasets: /labels/a, /raw2)"
    assert refused(path, key="labels/b") == f"{path}: no dataset '/labels/b' (datasets: /labels/a, /raw2)"
    assert (
        refused(path)
        == f"{path}: name the dataset to read, e.g. {path}:/raw or --key /raw (datasets: /labels/a, /raw2)"
    )
    with h5py.File(tmp_path / "none.h5", "w"):
        pass
    assert "(the file holds no datasets)" in refused(f"{tmp_path}/none.h5:/raw")
    store = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    for name in ("raw2", "seg/labels"):
        store.create_array(name, shape=(2, 3, 4), dtype="u1")
    assert refused(f"{tmp_path}/s.zarr/raw") == f"{tmp_path}/s.zarr: no array 'raw' (arrays: raw2, seg/labels)"
    assert refused(f"{tmp_path}/s.zarr/seg/x") == f"{tmp_path}/s.zarr: no array 'seg/x' (arrays: raw2, seg/labels)"
    assert "name the array to read, e.g." in refused(tmp_path / "s.zarr")
    write_zarr(tmp_path / "root.zarr", np.zeros((2, 3, 4)), (1, 3, 4))
    assert "the store root is an array (shape (2, 3, 4)), which holds no 'raw'" in refused(f"{tmp_path}/root.zarr/raw")
    many = zarr.open_group(str(tmp_path / "many.zarr"), mode="w")
    for i in range(12):
        many.create_array(f"a{i:02d}", shape=(1, 1, 1), dtype="u1")
    assert "(arrays: a00, a01, a02, a03, a04, a05, a06, a07, a08, a09, ... (12 in all))" in refused(
        f"{tmp_path}/many.zarr/b"
    )


def test_groups_are_not_arrays(tmp_path):
    with h5py.File(tmp_path / "vol.h5", "w") as file:
        file["volumes/raw"] = np.zeros((2, 3, 4))
        file.create_group("empty")
    path = tmp_path / "vol.h5"
    assert refused(f"{path}:/volumes") == f"{path}: /volumes is a group, not a dataset (datasets in it: /volumes/raw)"
    assert refused(f"{path}:/empty") == f"{path}: /empty is a group, not a dataset (it holds no datasets)"
    store = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=2)
    store.create_array("volumes/raw", shape=(2, 3, 4), dtype="u1")
    store.create_group("empty")
    assert refused(f"{tmp_path}/s.zarr/volumes") == (
        f"{tmp_path}/s.zarr: 'volumes' is a group, not an array (arrays in it: volumes/raw)"
    )
    assert (
        refused(f"{tmp_path}/s.zarr", key="empty")
        == f"{tmp_path}/s.zarr: 'empty' is a group, not an array (it holds no arrays)"
    )


def test_arrays_that_are_not_2d_or_3d(tmp_path):
    with h5py.File(tmp_path / "vol.h5", "w") as file:
        file["channels"] = np.zeros((2, 3, 4, 5), np.uint8)
        file["line"] = np.zeros(5)
        file["scalar"] = 3.0
    path = tmp_path / "vol.h5"
    text = refused(f"{path}:/channels")
    assert text.startswith(f"{path}:/channels: 4-D array of shape (2, 3, 4, 5); em-unet reads 3-D (z, y, x)")
    assert "drop channel or time axes" in text
    assert "1-D array of shape (5,); expected a 3-D (z, y, x) or 2-D (y, x) array" in refused(f"{path}:/line")
    assert "0-D array of shape ()" in refused(f"{path}:/scalar")
    write_zarr(tmp_path / "c.zarr", np.zeros((2, 3, 4, 5)), (1, 3, 4, 5), dimension_names=["c", "z", "y", "x"])
    assert "4-D array of shape (2, 3, 4, 5) (axes c, z, y, x)" in refused(tmp_path / "c.zarr")
    write_pyramid(tmp_path / "tczyx.ome.zarr", np.zeros((1, 2, 4, 16, 16), np.uint8), 3, "tczyx", (2,))
    text = refused(tmp_path / "tczyx.ome.zarr")
    assert text.startswith(f"{tmp_path}/tczyx.ome.zarr: 5-D array of shape (1, 2, 4, 16, 16) (axes t, c, z, y, x)")


def test_values_that_are_not_real_numbers(tmp_path):
    with h5py.File(tmp_path / "vol.h5", "w") as file:
        file["complex"] = np.zeros((2, 3, 4), np.complex64)
        file.create_dataset("text", data=np.full((1, 2, 2), "a", object), dtype=h5py.string_dtype())
        file["bytes"] = np.full((1, 2, 2), b"ab")
        file["compound"] = np.zeros((1, 2, 2), [("a", "f4"), ("b", "i4")])
    path = tmp_path / "vol.h5"
    assert refused(f"{path}:/complex") == (
        f"{path}:/complex: complex numbers are not real numbers; volumes hold integers, floats or booleans"
    )
    assert "/text: object values are not real numbers" in refused(f"{path}:/text")
    assert "/bytes: |S2 values are not real numbers" in refused(f"{path}:/bytes")
    assert "/compound: [('a', '<f4'), ('b', '<i4')] values are not real numbers" in refused(f"{path}:/compound")
    write_zarr(tmp_path / "c.zarr", np.zeros((2, 3, 4), np.complex128), (1, 3, 4))
    assert "c.zarr: complex numbers are not real numbers" in refused(tmp_path / "c.zarr")
    zarr.create_array(str(tmp_path / "s.zarr"), shape=(2, 3, 4), dtype=str, chunks=(1, 3, 4))
    assert "s.zarr: StringDType() values are not real numbers" in refused(tmp_path / "s.zarr")
    with pytest.raises(DataError, match="complex numbers are not real numbers"):
        create_volume(tmp_path / "out.zarr", (2, 3, 4), np.complex64, (1, 3, 4))
    assert not (tmp_path / "out.zarr").exists()


def test_empty_arrays(tmp_path):
    with h5py.File(tmp_path / "vol.h5", "w") as file:
        file.create_dataset("empty", shape=(0, 3, 4), dtype="f4")
        file.create_dataset("null", data=h5py.Empty("f4"))
    path = tmp_path / "vol.h5"
    assert (
        refused(f"{path}:/empty") == f"{path}:/empty: empty array (shape (0, 3, 4)); a volume needs at least one voxel"
    )
    assert refused(f"{path}:/null") == f"{path}:/null: empty dataset (no shape): a volume needs (z, y, x) values"
    zarr.create_array(str(tmp_path / "e.zarr"), shape=(3, 0, 4), dtype="u1", chunks=(1, 1, 4))
    assert "e.zarr: empty array (shape (3, 0, 4))" in refused(tmp_path / "e.zarr")
    with pytest.raises(DataError) as excinfo:
        create_volume(f"{tmp_path}/out.h5:/v", (3, 0, 4), np.uint8, (1, 1, 1))
    assert "shape (3, 0, 4) is empty" in message(excinfo)
    with pytest.raises(DataError) as excinfo:
        create_volume(f"{tmp_path}/out.h5:/v", (3, 4), np.uint8, (1, 1, 1))
    assert "shape must be three voxel counts (z, y, x), got (3, 4)" in message(excinfo)


def test_ome_zarr_without_metadata_and_missing_levels(tmp_path):
    plain = zarr.open_group(str(tmp_path / "plain.ome.zarr"), mode="w")
    plain.create_array("0", shape=(2, 3, 4), dtype="u1")
    assert refused(tmp_path / "plain.ome.zarr") == (
        f"{tmp_path}/plain.ome.zarr: no OME-Zarr multiscales metadata, so no image levels (arrays in it: 0)"
    )
    write_pyramid(tmp_path / "series.ome.zarr" / "0", np.zeros((4, 16, 16), np.uint8), 3)  # a bioformats2raw layout
    zarr.open_group(str(tmp_path / "series.ome.zarr"), mode="a")
    text = refused(tmp_path / "series.ome.zarr")
    assert "no OME-Zarr multiscales metadata, so no image levels (images in it: 0; name one, e.g. --key 0)" in text
    assert open_volume(tmp_path / "series.ome.zarr", key="0").shape == (4, 16, 16)

    write_pyramid(tmp_path / "img.ome.zarr", np.zeros((4, 16, 16), np.uint8), 3, scale_factors=(2,))
    image = tmp_path / "img.ome.zarr"
    assert refused(image, level=2) == f"{image}: no level 2 (levels: 0 ('s0'), 1 ('s1'))"
    assert refused(f"{image}/5") == f"{image}: no level 5 (levels: 0 ('s0'), 1 ('s1'))"
    assert refused(f"{image}/0", level=-1) == f"{image}: level -1 is negative; level 0 is full resolution"
    write_zarr(tmp_path / "a.zarr", np.zeros((2, 3, 4)), (1, 3, 4))
    assert (
        refused(tmp_path / "a.zarr", level=1)
        == f"{tmp_path}/a.zarr is an array, not a multiscale image: it has no level 1"
    )
    with h5py.File(tmp_path / "v.h5", "w") as file:
        file["v"] = np.zeros((2, 3, 4))
    assert "HDF5 datasets have no resolution levels; drop level 1" in refused(f"{tmp_path}/v.h5:/v", level=1)
    broken = zarr.open_group(str(tmp_path / "broken.ome.zarr"), mode="w", zarr_format=2)
    broken.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}], "axes": ["z", "y", "x"]}]
    assert "level 0 ('0') is in the multiscales metadata but not an array" in refused(tmp_path / "broken.ome.zarr")


def test_create_refuses_to_replace_without_overwrite(tmp_path):
    old = ramp((2, 3, 4), np.uint8)
    with h5py.File(tmp_path / "vol.h5", "w") as file:
        file["raw"] = old
        file["keep"] = old
    with pytest.raises(DataError) as excinfo:
        create_volume(f"{tmp_path}/vol.h5:/raw", (5, 5, 5), np.float32, (5, 5, 5))
    assert message(excinfo) == (
        f"{tmp_path}/vol.h5: dataset /raw already exists (shape (2, 3, 4), uint8): choose another key or pass "
        "--overwrite"
    )
    assert np.array_equal(open_volume(f"{tmp_path}/vol.h5:/raw")[:], old)
    with h5py.File(tmp_path / "vol.h5", "a") as file:
        file.create_group("group")
    with pytest.raises(DataError, match="vol.h5: /group is a group, not a dataset: choose another key"):
        create_volume(f"{tmp_path}/vol.h5", (5, 5, 5), np.float32, (5, 5, 5), key="/group", overwrite=True)
    replaced = create_volume(f"{tmp_path}/vol.h5:/raw", (5, 5, 5), np.float32, (5, 5, 5), overwrite=True)
    replaced.close()
    assert open_volume(f"{tmp_path}/vol.h5:/raw").shape == (5, 5, 5)
    assert np.array_equal(open_volume(f"{tmp_path}/vol.h5:/keep")[:], old)

    for zarr_format in (2, 3):
        store = f"{tmp_path}/s{zarr_format}.zarr"
        create_volume(f"{store}/pred", old.shape, old.dtype, (1, 3, 4), zarr_format=zarr_format)[...] = old
        create_volume(f"{store}/other", old.shape, old.dtype, (1, 3, 4), zarr_format=zarr_format)[...] = old
        with pytest.raises(DataError) as excinfo:
            create_volume(f"{store}/pred", (5, 5, 5), np.float32, (5, 5, 5), zarr_format=zarr_format)
        assert message(excinfo) == (
            f"{store}/pred: an OME-Zarr image already exists there (1 level(s)): choose another key or pass --overwrite"
        )
        assert np.array_equal(open_volume(f"{store}/pred")[:], old)
        create_volume(f"{store}/pred", (5, 5, 5), np.float32, (5, 5, 5), overwrite=True, zarr_format=zarr_format)
        assert open_volume(f"{store}/pred").dtype == np.float32
        assert np.array_equal(open_volume(f"{store}/other")[:], old)
        with pytest.raises(DataError, match="a group holding other arrays .*other/0, pred/0.*, not an image"):
            create_volume(store, (5, 5, 5), np.float32, (5, 5, 5), zarr_format=zarr_format, overwrite=True)

    write_zarr(tmp_path / "root.zarr", old, (1, 3, 4))
    with pytest.raises(DataError) as excinfo:
        create_volume(tmp_path / "root.zarr", (5, 5, 5), np.float32, (5, 5, 5))
    assert "root.zarr: array already exists (shape (2, 3, 4), uint8): choose another path or pass --overwrite" in (
        message(excinfo)
    )
    with pytest.raises(DataError, match="the store root is an array, so it cannot hold 'x'"):
        create_volume(f"{tmp_path}/root.zarr/x", (5, 5, 5), np.float32, (5, 5, 5), overwrite=True)
    assert np.array_equal(open_volume(tmp_path / "root.zarr")[:], old)
    create_volume(tmp_path / "root.zarr", (5, 5, 5), np.float32, (5, 5, 5), overwrite=True)
    assert open_volume(tmp_path / "root.zarr").shape == (5, 5, 5)
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain.create_array("raw", shape=old.shape, dtype=old.dtype)[...] = old
    plain.create_array("keep", shape=old.shape, dtype=old.dtype)[...] = old
    with pytest.raises(DataError, match=r"plain.zarr/raw: array already exists \(shape \(2, 3, 4\), uint8\)"):
        create_volume(f"{tmp_path}/plain.zarr/raw", (5, 5, 5), np.float32, (5, 5, 5))
    create_volume(f"{tmp_path}/plain.zarr/raw", (5, 5, 5), np.float32, (5, 5, 5), overwrite=True)
    assert open_volume(f"{tmp_path}/plain.zarr/raw").shape == (5, 5, 5)
    assert np.array_equal(open_volume(f"{tmp_path}/plain.zarr/keep")[:], old)


def test_create_refuses_unwritable_locations(tmp_path):
    (tmp_path / "file").write_text("x")
    for address in (f"{tmp_path}/file/out.h5:/v", f"{tmp_path}/file/out.zarr", f"{tmp_path}/file/sub/out.ome.zarr"):
        with pytest.raises(DataError) as excinfo:
            create_volume(address, (2, 3, 4), np.uint8, (1, 3, 4))
        assert message(excinfo).endswith(f": {tmp_path}/file is a file, not a folder")
    with h5py.File(tmp_path / "vol.h5", "w") as file:
        file["raw"] = np.zeros((2, 3, 4))
    with pytest.raises(DataError) as excinfo:
        create_volume(f"{tmp_path}/vol.h5:/raw/pred", (2, 3, 4), np.uint8, (1, 3, 4))
    assert message(excinfo) == f"{tmp_path}/vol.h5: /raw is a dataset, so it cannot hold /raw/pred: choose another key"
    with pytest.raises(DataError) as excinfo:
        create_volume(f"{tmp_path}/vol.h5", (2, 3, 4), np.uint8, (1, 3, 4))
    assert "vol.h5: name the dataset to write, e.g." in message(excinfo)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(DataError, match="text.h5: exists but is not an HDF5 file"):
        create_volume(f"{tmp_path}/text.h5:/v", (2, 3, 4), np.uint8, (1, 3, 4))
    assert (tmp_path / "text.h5").read_text() == "hello"
    plain = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    plain.create_array("raw", shape=(2, 3, 4), dtype="u1")
    with pytest.raises(DataError) as excinfo:
        create_volume(f"{tmp_path}/s.zarr/raw/pred", (2, 3, 4), np.uint8, (1, 3, 4))
    assert message(excinfo) == f"{tmp_path}/s.zarr: 'raw' is an array, so it cannot hold 'raw/pred': choose another key"
    with pytest.raises(DataError) as excinfo:
        create_volume(f"{tmp_path}/s.zarr/pred", (2, 3, 4), np.uint8, (1, 3, 4), zarr_format=2)
    assert message(excinfo) == (
        f"{tmp_path}/s.zarr: a Zarr v3 store, so it cannot hold a Zarr v2 image: write Zarr v3 there or choose "
        "another store"
    )
    (tmp_path / "tiffs.zarr").mkdir()
    (tmp_path / "tiffs.zarr" / "0.tif").write_text("x")
    with pytest.raises(DataError, match="tiffs.zarr: a folder that is not a Zarr store"):
        create_volume(tmp_path / "tiffs.zarr", (2, 3, 4), np.uint8, (1, 3, 4))
    assert isinstance(create_volume(f"{tmp_path}/new/deeper/out.h5:/a/b", (2, 3, 4), np.uint8, (1, 3, 4)), Volume)


def test_hdf5_compression_this_library_cannot_decode(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "hdf5plugin", None)  # as if it were not installed
    with h5py.File(tmp_path / "lz4.h5", "w") as file:
        dataset = file.create_dataset(
            "v", shape=(2, 4, 4), dtype="u1", chunks=(1, 4, 4), compression=32004, allow_unknown_filter=True
        )
        dataset.id.write_direct_chunk((0, 0, 0), b"lz4 bytes")
    assert refused(f"{tmp_path}/lz4.h5:/v") == (
        f"{tmp_path}/lz4.h5:/v: compressed with LZ4 (HDF5 filter 32004), which this HDF5 library cannot decode: "
        "pip install hdf5plugin (em-unet then loads it), or save the dataset with gzip compression"
    )


def test_sharded_zarr_reports_shards_as_chunks(tmp_path):
    data = ramp((4, 16, 16), np.uint8)
    write_zarr(tmp_path / "s.zarr", data, (2, 8, 8), shards=(4, 16, 16))
    with open_volume(tmp_path / "s.zarr") as volume:
        assert volume.chunks == (4, 16, 16) and np.array_equal(volume[1:3, 4:12], data[1:3, 4:12])


def test_create_leaves_nothing_behind_when_it_fails(tmp_path, monkeypatch):
    def broken(group, zarr_format, channels=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("em_unet.io.volumes._write_multiscales", broken)
    with pytest.raises(DataError) as excinfo:
        create_volume(tmp_path / "new.zarr", (2, 3, 4), np.uint8, (1, 3, 4), key="pred")
    assert message(excinfo) == f"{tmp_path}/new.zarr/pred: cannot write (No space left on device)"
    assert not (tmp_path / "new.zarr").exists()
    with pytest.raises(DataError) as excinfo:
        create_volume("/proc/out.ome.zarr", (2, 3, 4), np.uint8, (1, 3, 4))
    assert "/proc is a kernel interface, not a place for output files" in message(excinfo)


def test_the_voxel_size_comes_from_ome_zarr_metadata_with_units(tmp_path):

    from em_unet.io.volumes import voxel_size_nm

    path = tmp_path / "em.ome.zarr"
    with create_volume(str(path), (4, 32, 32), np.uint8, (1, 32, 32)):
        pass
    assert voxel_size_nm(str(path)) is None  # em-unet's own outputs: scale 1, no units
    group = zarr.open_group(str(path), mode="r+")
    attrs = group.attrs.asdict()
    ome = attrs.get("ome", attrs)
    multiscales = ome["multiscales"]
    multiscales[0]["axes"] = [
        {"name": "z", "type": "space", "unit": "micrometer"},
        {"name": "y", "type": "space", "unit": "nanometer"},
        {"name": "x", "type": "space", "unit": "nanometer"},
    ]
    multiscales[0]["datasets"][0]["coordinateTransformations"] = [{"type": "scale", "scale": [0.05, 4.0, 4.0]}]
    if "ome" in attrs:
        group.attrs["ome"] = {**ome, "multiscales": multiscales}
    else:
        group.attrs["multiscales"] = multiscales
    assert voxel_size_nm(str(path)) == pytest.approx((50.0, 4.0, 4.0))
    assert voxel_size_nm(str(tmp_path / "missing.ome.zarr")) is None
    assert voxel_size_nm(f"{tmp_path}/x.h5:/raw") is None
