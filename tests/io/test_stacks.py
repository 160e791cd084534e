import numpy as np
import pytest
import tifffile
from PIL import Image

from em_unet.errors import DataError
from em_unet.io.stacks import load_labelled_stack, membrane_target, read_stack, to_unit_range

# ------------------------------------------------------------------ reading


def test_reads_multipage_2d_tiff_and_numeric_folder(tmp_path):
    stack = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    assert np.array_equal(read_stack(tmp_path / "stack.tif"), stack)
    tifffile.imwrite(tmp_path / "one.tif", stack[0], photometric="minisblack")
    assert read_stack(tmp_path / "one.tif").shape == (1, 8, 8)

    folder = tmp_path / "slices"
    folder.mkdir()
    for index in (10, 2, 1):
        Image.fromarray(np.full((8, 8), index, np.uint8)).save(folder / f"{index}.png")
    tifffile.imwrite(folder / "3.tif", np.full((8, 8), 3, np.uint8), photometric="minisblack")
    assert read_stack(folder)[:, 0, 0].tolist() == [1, 2, 3, 10]


def test_intensity_scaling():
    assert to_unit_range(np.array([[[0, 255]]], np.uint8)).tolist() == [[[0.0, 1.0]]]
    assert to_unit_range(np.array([[[0, 65535]]], np.uint16)).tolist() == [[[0.0, 1.0]]]
    floats = np.array([[[0.2, 0.4]]], np.float32)
    assert np.allclose(to_unit_range(floats), floats)
    assert np.allclose(to_unit_range(np.array([[[-5.0, 5.0]]])), [[[0.0, 1.0]]])
    assert to_unit_range(np.zeros((1, 4, 4), np.uint8)).dtype == np.float32


def test_label_conventions():
    isbi = np.array([[[0, 255], [255, 255]]], np.uint8)
    assert membrane_target(isbi).tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    mask = np.array([[[1, 0], [0, 0]]], np.uint8)
    assert membrane_target(mask).tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    assert membrane_target(isbi, convention="isbi").tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    with pytest.raises(DataError, match=r"label values \{0, 7, 255\}"):
        membrane_target(np.array([[[0, 7, 255]]], np.uint8))
    with pytest.raises(DataError, match="do not fit the mask convention"):
        membrane_target(isbi, convention="mask")


def test_real_isbi_stack(isbi_dir):
    images, targets = load_labelled_stack(isbi_dir / "train-volume.tif", isbi_dir / "train-labels.tif")
    assert images.shape == targets.shape == (20, 512, 512)
    assert images.dtype == np.float32 and 0.0 <= images.min() and images.max() <= 1.0
    assert 0.2 < targets.mean() < 0.26  # README: about 23 % membrane


# ------------------------------------------------------------------ bad inputs, one line each


def one_line(err):
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as err:
        read_stack(tmp_path / "nope.tif")
    assert "nope.tif: no such file" in one_line(err)


def test_not_a_tiff(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("these are my notes, not an image")
    with pytest.raises(DataError) as err:
        read_stack(path)
    assert "notes.tif: not a readable TIFF" in one_line(err)


def test_truncated_tiff(tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(
        path,
        np.random.default_rng(0).integers(0, 255, (4, 64, 64), dtype=np.uint8),
        compression="zlib",
        photometric="minisblack",
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        read_stack(path)
    assert "cut.tif" in one_line(err)


def test_rgb_stack(tmp_path):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, np.zeros((2, 16, 16, 3), np.uint8), photometric="rgb")
    with pytest.raises(DataError) as err:
        read_stack(path)
    assert "rgb.tif: 3 samples per pixel" in one_line(err)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="PNG mode RGB"):
        read_stack(tmp_path / "rgb.png")


def test_empty_stack(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        read_stack(tmp_path / "empty")
    assert "empty stack" in one_line(err)
    tifffile.imwrite(tmp_path / "zero.tif", np.zeros((0, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(DataError, match="empty stack|no slices"):
        read_stack(tmp_path / "zero.tif")


def test_labels_with_other_values(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((2, 8, 8), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", np.full((2, 8, 8), 128, np.uint8), photometric="minisblack")
    with pytest.raises(DataError) as err:
        load_labelled_stack(tmp_path / "img.tif", tmp_path / "lab.tif")
    assert "lab.tif: label values {128}" in one_line(err)


def test_image_and_label_shapes_differ(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((2, 8, 8), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", np.zeros((3, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(DataError) as err:
        load_labelled_stack(tmp_path / "img.tif", tmp_path / "lab.tif")
    assert "label shape (3, 8, 8) differs from image shape (2, 8, 8)" in one_line(err)


def test_slices_are_read_one_at_a_time_with_the_stack_scaling(tmp_path):
    from em_unet.io.stacks import iter_image_slices, iter_slices

    stack = np.arange(3 * 4 * 5, dtype=np.int32).reshape(3, 4, 5) - 7
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    assert [s.shape for s in iter_slices(tmp_path / "s.tif")] == [(4, 5)] * 3
    slices = np.stack(list(iter_image_slices(tmp_path / "s.tif")))
    assert np.allclose(slices, to_unit_range(stack))  # the whole stack's range, not each slice's
    assert slices.min() == 0.0 and slices.max() == 1.0
    tifffile.imwrite(tmp_path / "u8.tif", stack.astype(np.uint8) + 10, photometric="minisblack")
    assert np.allclose(
        np.stack(list(iter_image_slices(tmp_path / "u8.tif"))), to_unit_range(read_stack(tmp_path / "u8.tif"))
    )


def test_folder_slices_of_different_shapes(tmp_path):
    tifffile.imwrite(tmp_path / "1.tif", np.zeros((8, 8), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "2.tif", np.zeros((8, 9), np.uint8), photometric="minisblack")
    with pytest.raises(DataError, match=r"2.tif: slice shape \(8, 9\) differs from \(8, 8\)"):
        read_stack(tmp_path)


# ------------------------------------------------------------------ every page of every series


def write_appended(path, slices):
    """A TIFF written slice by slice, as acquisition software does: one series per write."""
    for array in slices:
        tifffile.imwrite(path, array, photometric="minisblack", append=True)


def write_pil_pages(path, slices, **options):
    first, *rest = [Image.fromarray(array) for array in slices]
    first.save(path, save_all=True, append_images=rest, **options)


def write_with_thumbnail(path, slices):
    with tifffile.TiffWriter(path) as writer:
        writer.write(np.stack(slices), photometric="minisblack")
        writer.write(slices[0][::2, ::2], subfiletype=1, photometric="minisblack")  # a preview, not a slice


def numbered(n, shape):
    return [np.full(shape, index, np.uint8) for index in range(n)]


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.mark.parametrize(
    "write, n",
    [
        (lambda path, slices: write_appended(path, slices), 4),
        (lambda path, slices: write_appended(path, [np.stack(slices[:2]), np.stack(slices[2:])]), 5),
        (lambda path, slices: write_appended(path, [slices[0], np.stack(slices[1:4]), slices[4]]), 5),
        (lambda path, slices: write_pil_pages(path, slices), 3),
        (lambda path, slices: tifffile.imwrite(path, np.stack(slices), imagej=True), 3),
        (
            lambda path, slices: tifffile.imwrite(
                path, np.stack(slices), photometric="minisblack", tile=(len(slices), 16, 16)
            ),
            3,
        ),  # packed: one page, 3 slices
        (write_with_thumbnail, 3),
        (lambda path, slices: tifffile.imwrite(path, slices[0], photometric="minisblack"), 1),
    ],
)
def test_every_page_of_every_series_is_read_in_order(tmp_path, write, n):
    from em_unet.io.stacks import iter_slices

    slices = numbered(n, shape=(16, 16))
    write(tmp_path / "stack.tif", slices)
    assert [int(s[0, 0]) for s in iter_slices(tmp_path / "stack.tif")] == list(range(n))
    assert read_stack(tmp_path / "stack.tif").shape == (n, 16, 16)


@pytest.mark.parametrize(
    "write, expected",
    [
        (
            lambda p: write_appended(p, [np.zeros((8, 8), np.uint8)] * 2 + [np.zeros((8, 9), np.uint8)]),
            "page 2 is 8 x 9 px but page 0 is 8 x 8 px",
        ),
        (
            lambda p: write_appended(p, [np.zeros((8, 8), np.uint8), np.zeros((9, 8), np.uint8)]),
            "page 1 is 9 x 8 px but page 0 is 8 x 8 px",
        ),
        (
            lambda p: write_appended(p, [np.zeros((3, 8, 8), np.uint8), np.zeros((2, 7, 8), np.uint8)]),
            "page 3 is 7 x 8 px but page 0 is 8 x 8 px",
        ),
        (
            lambda p: write_pil_pages(
                p, [np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8), np.zeros((8, 6), np.uint8)]
            ),
            "page 2 is 8 x 6 px but page 0 is 8 x 8 px",
        ),
        (
            lambda p: write_appended(p, [np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint16)]),
            "page 1 holds uint16 values but page 0 holds uint8",
        ),
        (
            lambda p: write_appended(p, [np.zeros((8, 8), np.float32), np.zeros((2, 8, 8), np.float64)]),
            "page 1 holds float64 values but page 0 holds float32",
        ),
        (
            lambda p: [
                write_appended(p, [np.zeros((8, 8), np.uint8)]),
                tifffile.imwrite(p, np.zeros((8, 8, 3), np.uint8), photometric="rgb", append=True),
            ],
            "3 samples per pixel",
        ),
    ],
)
def test_pages_of_another_size_type_or_colour_are_refused(tmp_path, write, expected):
    from em_unet.io.stacks import iter_slices

    path = tmp_path / "stack.tif"
    write(path)
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as err:
        next(iter_slices(path))  # refused before the first slice, not after a long prediction
    assert one_line(err).startswith(f"{path}: ") and expected in one_line(err)
    assert snapshot(tmp_path) == before


def test_folder_slices_of_different_types(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "1.png")
    tifffile.imwrite(tmp_path / "2.tif", np.zeros((8, 8), np.uint16), photometric="minisblack")
    with pytest.raises(DataError) as err:
        read_stack(tmp_path)
    assert "2.tif: slices hold uint16 values but those of" in one_line(err) and "1.png hold uint8" in one_line(err)


# ------------------------------------------------------------------ compressed TIFFs (imagecodecs)


def pil_compressed(path, compression, dtype=np.uint8):
    Image.fromarray(np.arange(64, dtype=dtype).reshape(8, 8)).save(path, compression=compression)


@pytest.mark.parametrize(
    "write",
    [
        lambda p: pil_compressed(p, "tiff_lzw"),
        lambda p: tifffile.imwrite(
            p, np.arange(64, dtype=np.uint8).reshape(1, 8, 8), compression="lzw", photometric="minisblack"
        ),
        lambda p: tifffile.imwrite(
            p,
            np.arange(64, dtype=np.uint16).reshape(1, 8, 8),
            compression="lzw",
            predictor=True,
            photometric="minisblack",
        ),
        lambda p: tifffile.imwrite(
            p, np.arange(64, dtype=np.uint8).reshape(8, 8), compression="lzw", photometric="minisblack", append=True
        ),
    ],
)
def test_lzw_compressed_tiffs_read_with_imagecodecs(tmp_path, write):
    pytest.importorskip("imagecodecs")
    write(tmp_path / "lzw.tif")
    stack = read_stack(tmp_path / "lzw.tif")
    assert stack.shape == (1, 8, 8) and stack.ravel().tolist() == list(range(64))


@pytest.fixture
def without_imagecodecs(monkeypatch):
    """tifffile as it is when imagecodecs is not installed: its pure-Python fallback codecs only."""
    tifffile_module = pytest.importorskip("tifffile.tifffile")
    from tifffile import _imagecodecs

    monkeypatch.setattr(tifffile_module, "imagecodecs", _imagecodecs)
    monkeypatch.setattr(tifffile_module.TIFF, "DECOMPRESSORS", tifffile_module.CompressionCodec(encode=False))
    monkeypatch.setattr(tifffile_module.TIFF, "UNPREDICTORS", tifffile_module.PredictorCodec(encode=False))


@pytest.mark.parametrize(
    "compression, dtype, name",
    [
        ("tiff_lzw", np.uint8, "LZW"),
        ("tiff_lzw", np.uint16, "LZW"),
        ("jpeg", np.uint8, "JPEG"),
    ],
)
@pytest.mark.parametrize("reader", ["read_stack", "iter_image_slices", "load_image_stack"])
def test_missing_imagecodecs_says_to_install_it(tmp_path, without_imagecodecs, compression, dtype, name, reader):
    import em_unet.io.stacks
    from em_unet.errors import DependencyError

    path = tmp_path / "compressed.tif"
    pil_compressed(path, compression, dtype)
    with pytest.raises(DependencyError) as err:
        list(getattr(em_unet.io.stacks, reader)(path))
    message = one_line(err)
    assert message == (
        f"{path}: reading this TIFF's {name} compression needs the imagecodecs package, "
        "which is not installed: pip install imagecodecs"
    )
    assert "corrupt" not in message


# ------------------------------------------------------------------ NaN and infinite values


def float_stack_with(value, at_slice, n=4, in_unit_range=False):
    stack = np.random.default_rng(0).random((n, 6, 7)).astype(np.float32)
    stack = stack if in_unit_range else stack * 40 - 3
    stack[at_slice, 2, 3] = value
    if at_slice + 1 < n:
        stack[at_slice + 1, 0, 0] = value  # a later bad slice is not the one named
    return stack


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("at_slice", [0, 2, 3])
@pytest.mark.parametrize("in_unit_range", [False, True])
def test_nan_or_infinite_intensities_name_the_file_and_first_slice(tmp_path, value, at_slice, in_unit_range):
    from em_unet.io.stacks import iter_image_slices, load_image_stack

    path = tmp_path / "float.tif"
    tifffile.imwrite(path, float_stack_with(value, at_slice, in_unit_range=in_unit_range), photometric="minisblack")
    expected = (
        f"{path}: NaN or infinite value at slice {at_slice} ({value:g} at row 2, column 3); "
        "an EM image must hold finite intensities"
    )
    for read in (load_image_stack, lambda p: next(iter_image_slices(p))):  # refused before the first slice
        with pytest.raises(DataError) as err:
            read(path)
        assert one_line(err) == expected


def test_to_unit_range_refuses_what_it_would_turn_into_zeros():
    stack = np.ones((3, 4, 4), np.float64)
    stack[1, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"^stack.tif: NaN or infinite value at slice 1 \(nan at row 0, column 0\)"):
        to_unit_range(stack, source="stack.tif")
    with pytest.raises(DataError, match="image stack: NaN or infinite value at slice 1"):
        to_unit_range(stack)
    assert to_unit_range(np.ones((1, 2, 2), np.float32)).tolist() == [[[1.0, 1.0], [1.0, 1.0]]]


@pytest.mark.parametrize("value, at_slice", [(np.nan, 0), (np.nan, 2), (np.inf, 1), (-np.inf, 2)])
def test_float_labels_with_nan_are_refused(tmp_path, value, at_slice):
    labels = np.zeros((3, 8, 8), np.float32)
    labels[:, 4:] = 255
    labels[at_slice, 5, 6] = value
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((3, 8, 8), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    with pytest.raises(DataError) as err:
        load_labelled_stack(tmp_path / "img.tif", tmp_path / "lab.tif")
    assert one_line(err).startswith(
        f"{tmp_path / 'lab.tif'}: NaN or infinite value at slice {at_slice} ({value:g} at row 5, column 6)"
    )


# ------------------------------------------------------------------ labels without membrane or interior


@pytest.mark.parametrize(
    "value, convention, expected",
    [
        (255, "auto", "no membrane pixel (0 in the ISBI convention) in any slice: every label is 255"),
        (255, "isbi", "no membrane pixel (0 in the ISBI convention) in any slice: every label is 255"),
        (0, "mask", "no membrane pixel (1 in a 0/1 mask) in any slice: every label is 0"),
        (0, "isbi", "every pixel is membrane (0 in the ISBI convention): no cell interior pixel (255) in any slice"),
        (1, "auto", "every pixel is membrane (1 in a 0/1 mask): no cell interior pixel (0) in any slice"),
        (1, "mask", "every pixel is membrane (1 in a 0/1 mask): no cell interior pixel (0) in any slice"),
        (
            0,
            "auto",
            "every label is 0: all membrane in the ISBI convention (0 = membrane) and no membrane in a 0/1 mask",
        ),
        (255.0, "auto", "no membrane pixel (0 in the ISBI convention) in any slice: every label is 255.0"),
    ],
)
def test_labels_without_membrane_or_without_interior_are_refused(tmp_path, value, convention, expected):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((2, 8, 8), np.uint8), photometric="minisblack")
    dtype = np.float32 if isinstance(value, float) else np.uint8
    tifffile.imwrite(tmp_path / "lab.tif", np.full((2, 8, 8), value, dtype), photometric="minisblack")
    with pytest.raises(DataError) as err:
        load_labelled_stack(tmp_path / "img.tif", tmp_path / "lab.tif", convention)
    assert one_line(err).startswith(f"{tmp_path / 'lab.tif'}: {expected}")


def test_z_windows_read_each_section_once_and_mirror_at_the_ends():
    from em_unet.io.stacks import mirrored_sections, z_context_indices, z_windows

    assert mirrored_sections(np.arange(-3, 8), 5).tolist() == [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]
    assert mirrored_sections(np.arange(-2, 3), 1).tolist() == [0] * 5
    for count in (1, 2, 3, 8):
        for z_context in (1, 3, 4, 7):
            reads = []

            def slices(count=count, reads=reads):
                for i in range(count):
                    reads.append(i)
                    yield np.full((2, 3), i)

            windows = list(z_windows(slices(), count, z_context))
            assert reads == list(range(count)) and len(windows) == count
            for z, window in enumerate(windows):
                assert window.shape == (2, 3, z_context)
                assert window[0, 0].tolist() == z_context_indices(z, count, z_context).tolist()
