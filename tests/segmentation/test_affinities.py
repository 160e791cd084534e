import json

import numpy as np
import pytest
import tifffile

from em_unet import cli
from em_unet.errors import DataError
from em_unet.segmentation.affinities import (
    MutexParams,
    affinities_from_cells,
    cell_ids,
    is_affinity_map,
    merge_small_segments,
    mutex_watershed,
    read_affinity_file,
    resolve_offsets,
    segment_affinity_stack,
)
from em_unet.segmentation.metrics import evaluate_segments
from em_unet.segmentation.offsets import DEFAULT_OFFSETS, check_offsets, offsets_text, parse_offsets
from tests.helpers import error_line, run_cli

SMALL_OFFSETS = ((-1, 0), (0, -1), (-4, 0), (0, -4), (-4, -4), (4, -4))


def random_cells(rng, shape=(48, 56), cells=12):
    """Voronoi cells of random centres with 1-px membranes where neighbouring cells meet: (membrane, ids)."""
    centres = rng.uniform(0, shape, size=(cells, 2))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    nearest = np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2, axis=-1)
    membrane = np.zeros(shape, bool)
    membrane[:-1] |= nearest[:-1] != nearest[1:]
    membrane[:, :-1] |= nearest[:, :-1] != nearest[:, 1:]
    return membrane, cell_ids(membrane)


def brute_force_affinities(cells, offsets):
    """Affinities by a loop over pixels: the plain definition."""
    height, width = cells.shape
    targets = np.zeros((len(offsets), height, width), np.float32)
    inside = np.zeros_like(targets)
    for c, (dy, dx) in enumerate(offsets):
        for y in range(height):
            for x in range(width):
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    inside[c, y, x] = 1
                    other = cells[y + dy, x + dx]
                    targets[c, y, x] = float(cells[y, x] > 0 and cells[y, x] == other)
    return targets, inside


def test_affinities_from_cells_follow_the_definition():
    rng = np.random.default_rng(0)
    for trial in range(4):
        cells = rng.integers(0, 4, size=(13, 17))  # 0 = membrane, ids 1-3 scattered: many pairs of each kind
        offsets = SMALL_OFFSETS if trial % 2 else ((-1, 0), (0, 1), (3, -2), (-12, 0))
        targets, inside = affinities_from_cells(cells, offsets)
        expected_targets, expected_inside = brute_force_affinities(cells, offsets)
        assert np.array_equal(targets, expected_targets) and np.array_equal(inside, expected_inside)
    assert targets.sum() > 0 and (1 - targets).sum() > 0


def test_cell_ids_are_the_4_connected_interiors():
    membrane = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], bool)  # the corners touch diagonally only
    ids = cell_ids(membrane)
    assert ids[0, 0] != ids[1, 1] and ids[1, 1] == ids[0, 2] == ids[2, 0] and (ids[membrane] == 0).all()
    assert cell_ids(np.stack([membrane, ~membrane])).shape == (2, 3, 3)


@pytest.mark.parametrize(
    ("text", "patch", "message"),
    [
        ("0,0 -1,0", None, "pairs a pixel with itself"),
        ("-1,0 0,-1 -1,0", None, "repeated"),
        ("-1,0 1,0", None, "repeated"),  # an offset and its negative are the same pairs
        ("-1,0 0,-64", 64, "does not fit in the 64 px patch"),
        ("-1,0 -300,0", 256, "does not fit"),
    ],
)
def test_bad_offsets_are_refused(text, patch, message):
    with pytest.raises(ValueError, match=message):
        check_offsets(parse_offsets(text), patch)


@pytest.mark.parametrize("text", ["", "1", "a,b", "-1,0 2", "1.5,0"])
def test_offsets_that_are_not_pairs_are_refused(text):
    with pytest.raises(ValueError):
        parse_offsets(text)


def test_offsets_text_round_trips():
    assert parse_offsets(offsets_text(DEFAULT_OFFSETS)) == DEFAULT_OFFSETS
    assert parse_offsets("(-1,0); (0,-1)") == ((-1, 0), (0, -1))


def test_mutex_watershed_recovers_known_cells_from_noisy_affinities():
    rng = np.random.default_rng(1)
    membrane, truth = random_cells(rng)
    targets, _ = affinities_from_cells(truth, DEFAULT_OFFSETS)
    noisy = np.clip(targets + rng.normal(0, 0.15, targets.shape), 0, 1)
    labels = mutex_watershed(noisy, DEFAULT_OFFSETS, MutexParams(min_size_px=0))
    scores = evaluate_segments(labels[None], membrane[None].astype(np.float32))
    assert scores["v_rand"] > 0.99, scores["v_rand"]
    assert labels.dtype == np.int32 and labels.min() == 1


def test_long_range_bias_splits_across_a_faint_membrane():
    """Two cells whose shared membrane is faint (nearest-neighbour affinity 0.6 across it): the long-range
    affinities, which see that the far pixels are in other cells, keep them apart; without long-range
    evidence they merge."""
    cells = np.ones((20, 30), np.int32)
    cells[:, 15:] = 2
    offsets = ((-1, 0), (0, -1), (0, -6))
    affinities, _ = affinities_from_cells(cells, offsets)
    affinities[1][cells != np.roll(cells, 1, axis=1)] = 0.6  # the faint membrane
    apart = mutex_watershed(affinities, offsets, MutexParams(long_range_bias=0.3, min_size_px=0))
    assert len(np.unique(apart)) == 2
    merged = mutex_watershed(affinities[:2], offsets[:2], MutexParams(min_size_px=0))
    assert len(np.unique(merged)) == 1


def test_small_segments_merge_into_their_best_neighbour():
    labels = np.ones((10, 10), np.int64)
    labels[:, 6:] = 2
    labels[4:6, 2:4] = 3  # 4 px inside segment 1
    labels[0, 9] = 4  # 1 px in segment 2's corner
    affinities = np.full((2, 10, 10), 0.9, np.float32)
    affinities[1][:, 6] = 0.1  # weak between 1 and 2
    merged = merge_small_segments(labels, affinities, ((-1, 0), (0, -1)), 5)
    assert len(np.unique(merged)) == 2
    assert merged[4, 2] == merged[0, 0] and merged[0, 9] == merged[0, 7] != merged[0, 0]
    assert np.array_equal(merge_small_segments(labels, affinities, ((-1, 0), (0, -1)), 1), labels)


def test_segment_affinity_stack_checks_channels_and_values():
    rng = np.random.default_rng(2)
    good = rng.random((2, len(SMALL_OFFSETS), 16, 16)).astype(np.float32)
    labels = segment_affinity_stack(good, SMALL_OFFSETS, MutexParams(min_size_px=0))
    assert labels.shape == (2, 16, 16) and labels[1].min() > labels[0].max()  # unique across slices
    with pytest.raises(DataError, match="5 affinity channels but 6 offsets"):
        segment_affinity_stack(good[:, :5], SMALL_OFFSETS)
    for bad, message in ((good * 2, "not probabilities in \\[0, 1\\]"), (good - 0.5, "not probabilities")):
        with pytest.raises(DataError, match=message):
            segment_affinity_stack(bad, SMALL_OFFSETS)
    with_nan = good.copy()
    with_nan[1, 0, 3, 3] = np.nan
    with pytest.raises(DataError, match="NaN .*slice 1"):
        segment_affinity_stack(with_nan, SMALL_OFFSETS)
    with pytest.raises(DataError, match="no nearest neighbour"):
        segment_affinity_stack(good[:, 2:], SMALL_OFFSETS[2:])


def test_offsets_from_the_file_or_the_flag():
    assert resolve_offsets(SMALL_OFFSETS, None, "f") == SMALL_OFFSETS
    assert resolve_offsets(None, SMALL_OFFSETS, "f") == SMALL_OFFSETS
    assert resolve_offsets(SMALL_OFFSETS, SMALL_OFFSETS, "f") == SMALL_OFFSETS
    with pytest.raises(DataError, match="records no affinity offsets"):
        resolve_offsets(None, None, "f")
    with pytest.raises(DataError, match="but --offsets gives"):
        resolve_offsets(SMALL_OFFSETS, SMALL_OFFSETS[:2], "f")


def write_affinity_tiff(path, affinities, offsets=None):
    metadata = {"axes": "ZCYX"}
    if offsets is not None:
        metadata["Info"] = json.dumps({"affinity_offsets": [list(o) for o in offsets]})
    tifffile.imwrite(path, affinities, imagej=True, metadata=metadata)


def test_segment_command_on_affinity_tiffs(tmp_path, capsys):
    rng = np.random.default_rng(3)
    membrane, truth = random_cells(rng, (40, 48))
    targets, _ = affinities_from_cells(truth, SMALL_OFFSETS)
    stack = np.stack([targets, targets]).astype(np.float32)
    write_affinity_tiff(tmp_path / "aff.tif", stack, SMALL_OFFSETS)
    assert is_affinity_map(tmp_path / "aff.tif")
    assert cli.main(["segment", str(tmp_path / "aff.tif"), "-o", str(tmp_path / "n.tif"), "--min-size", "0"]) == 0
    labels = tifffile.imread(tmp_path / "n.tif")
    record = json.loads((tmp_path / "n.json").read_text())
    assert record["affinities"] == str(tmp_path / "aff.tif") and record["segment_params"]["min_size_px"] == 0
    assert evaluate_segments(labels, np.stack([membrane, membrane]).astype(np.float32))["v_rand"] > 0.999
    # a map without offsets takes them from --offsets
    write_affinity_tiff(tmp_path / "bare.tif", stack)
    flag = "--offsets=" + offsets_text(SMALL_OFFSETS)
    assert cli.main(["segment", str(tmp_path / "bare.tif"), "-o", str(tmp_path / "m.tif"), flag]) == 0
    assert read_affinity_file(tmp_path / "aff.tif")[1] == SMALL_OFFSETS


def test_segment_command_refuses_bad_affinity_maps(tmp_path):
    rng = np.random.default_rng(4)
    stack = rng.random((2, len(SMALL_OFFSETS), 16, 16)).astype(np.float32)  # ZCYX: one slice would read as CYX
    write_affinity_tiff(tmp_path / "bare.tif", stack)
    write_affinity_tiff(tmp_path / "five.tif", stack[:, :5], SMALL_OFFSETS)
    write_affinity_tiff(tmp_path / "high.tif", stack * 3, SMALL_OFFSETS)
    write_affinity_tiff(tmp_path / "good.tif", stack, SMALL_OFFSETS)
    tifffile.imwrite(tmp_path / "prob.tif", stack[0, :2])
    cases = [
        (["bare.tif"], "records no affinity offsets: give them with --offsets"),
        (["five.tif"], "5 affinity channels but 6 offsets"),
        (["high.tif"], "not probabilities in [0, 1]"),
        (["good.tif", "--offsets=-1,0 0,-1"], "but --offsets gives -1,0 0,-1"),
        (["good.tif", "--offsets=0,0"], "pairs a pixel with itself"),
        (["prob.tif", "--offsets=-1,0 0,-1"], "--offsets is for affinity maps"),
    ]
    for args, message in cases:
        result = run_cli(
            "segment", *[str(tmp_path / a) if a.endswith(".tif") else a for a in args], "-o", tmp_path / "n.tif"
        )
        assert result.returncode == 2, result.stderr
        assert message in error_line(result)
        assert not (tmp_path / "n.tif").exists() and not (tmp_path / "n.json").exists()


def test_membrane_maps_are_not_taken_for_affinity_maps(tmp_path):
    stack = np.random.default_rng(6).random((5, 16, 16)).astype(np.float32)
    with tifffile.TiffWriter(tmp_path / "old.tif", imagej=True) as tif:  # as em-unet wrote slice stacks before
        for section in stack:
            tif.write(section, contiguous=True)
    with tifffile.TiffFile(tmp_path / "old.tif") as tif:
        assert tif.series[0].axes == "CYX"  # tifffile's header named the slices channels
    tifffile.imwrite(tmp_path / "plain.tif", stack)
    assert not is_affinity_map(tmp_path / "old.tif") and not is_affinity_map(tmp_path / "plain.tif")
    write_affinity_tiff(tmp_path / "one.tif", stack[None], [(0, k + 1) for k in range(5)])
    assert is_affinity_map(tmp_path / "one.tif")
    assert cli.main(["segment", str(tmp_path / "old.tif"), "-o", str(tmp_path / "n.tif")]) == 0  # the watershed
