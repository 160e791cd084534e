import json

import numpy as np
import pytest
import tifffile

from em_unet import cli
from em_unet.errors import EmUnetError
from em_unet.segmentation.metrics import evaluate_segments, truth_segments
from em_unet.segmentation.watershed import SegmentParams, segment_slice, segment_stack


def cell_grid(size=64, cell=16, faint=None):
    """Membrane target of square cells on 3-px lines, and a probability map of it with noise whose lines
    have a ridge (0.8, 0.95, 0.8 across), as a U-Net's output has.
    ``faint``: (row, col0, col1) of a horizontal line stretch drawn at (0.25, 0.3, 0.25) instead."""
    target = np.zeros((size, size), np.float32)
    ridge = np.zeros((size, size), np.float32)
    for k in range(0, size, cell):
        for offset, value in ((0, 0.8), (1, 0.95), (2, 0.8)):
            ridge[k + offset, :] = np.maximum(ridge[k + offset, :], value)
            ridge[:, k + offset] = np.maximum(ridge[:, k + offset], value)
        target[k : k + 3, :] = 1
        target[:, k : k + 3] = 1
    rng = np.random.default_rng(0)
    probability = np.clip(np.where(target > 0, ridge, 0.01) + rng.normal(0, 0.01, target.shape), 0, 1)
    if faint:
        row, col0, col1 = faint
        for offset, value in ((0, 0.25), (1, 0.3), (2, 0.25)):
            probability[row + offset, col0:col1] = value
    return probability.astype(np.float32), target


def cells_map(interior: float, slices: int = 2, size: int = 64, cell: int = 16):
    """A map of square cells on 3-px membranes at 0.9 whose interiors sit at ``interior`` (with noise of
    0.02), as a weakly trained model or a map scaled differently gives; and its ground-truth labels
    (0 on membranes, one label per cell)."""
    _, target = cell_grid(size, cell)
    rng = np.random.default_rng(1)
    clean = np.where(target > 0, 0.9, interior)
    maps = [np.clip(clean + rng.normal(0, 0.02, target.shape), 0, 1) for _ in range(slices)]
    truth = truth_segments(target)
    return np.stack(maps).astype(np.float32), np.stack([truth] * slices)


@pytest.mark.parametrize("interior", [0.0, 0.1, 0.2, 0.3])
def test_cell_interiors_above_zero_still_give_one_segment_per_cell(interior, tmp_path, capsys):
    probability, truth = cells_map(interior)
    labels = segment_stack(probability)
    for section, cells in zip(labels, truth):
        assert len(np.unique(section)) == cells.max() == 16
        assert evaluate_segments(section, (cells == 0).astype(np.float32))["v_rand"] == pytest.approx(1.0)
    tifffile.imwrite(tmp_path / "p.tif", probability)  # and through the command, TIFF in, TIFF out
    assert cli.main(["segment", str(tmp_path / "p.tif"), "-o", str(tmp_path / "n.tif")]) == 0
    assert tifffile.imread(tmp_path / "n.tif").max() == 32
    assert "warning" not in capsys.readouterr().err


def test_a_slice_that_comes_out_as_one_segment_is_named_in_a_warning(capsys):
    probability, _ = cells_map(0.1, slices=3)
    probability[1] = 0.5  # nothing to seed: one segment
    labels = segment_stack(probability, source="p.tif")
    assert len(np.unique(labels[1])) == 1 and len(np.unique(labels[0])) == 16
    err = capsys.readouterr().err
    assert "em-unet: warning: p.tif: 1 slice(s) came out as one segment (slice 1)" in err and "--seed-threshold" in err


def test_segments_recover_the_cells_of_a_clean_map():
    probability, target = cell_grid()
    labels = segment_slice(probability)
    assert labels.dtype == np.int32 and labels.min() == 1
    assert labels.max() == truth_segments(target).max() == 16
    assert evaluate_segments(labels, target)["v_rand"] == pytest.approx(1.0)


def test_agglomeration_merges_across_faint_membrane_only_below_the_threshold():
    # the membrane between the two cells of column 2 in rows 0 and 1 is faint (0.3) along its whole length
    probability, _ = cell_grid(faint=(16, 19, 32))
    kept = segment_slice(probability, SegmentParams(merge_threshold=0.2))
    merged = segment_slice(probability, SegmentParams(merge_threshold=0.5))
    assert kept.max() == 16 and merged.max() == 15
    assert merged[8, 24] == merged[24, 24] and kept[8, 24] != kept[24, 24]
    assert merged[8, 8] != merged[24, 8]  # strong membranes stay
    assert segment_slice(probability, SegmentParams(merge_threshold=0.0)).max() == 16


def test_stack_labels_are_unique_across_slices():
    probability, _ = cell_grid()
    labels = segment_stack(np.stack([probability, probability[::-1]]))
    assert labels.dtype == np.uint32
    assert set(np.unique(labels[0])).isdisjoint(np.unique(labels[1]))
    assert labels.max() == 32


def test_no_seed_gives_one_segment_and_bad_parameters_are_refused():
    assert (segment_slice(np.ones((16, 16), np.float32)) == 1).all()
    for kwargs, message in [
        ({"sigma_px": -1.0}, "--sigma"),
        ({"sigma_px": float("nan")}, "--sigma"),
        ({"seed_threshold": 1.5}, "--seed-threshold"),
        ({"merge_threshold": -0.1}, "--merge"),
    ]:
        with pytest.raises(EmUnetError, match=message):
            SegmentParams(**kwargs)


def error_of(capsys, argv):
    assert cli.main([str(a) for a in argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("em-unet: error:")]
    assert len(lines) == 1
    return lines[0]


def test_segment_command_writes_fiji_tiff_and_parameters_and_evaluate_scores_it(tmp_path, capsys):
    probability, target = cell_grid()
    tifffile.imwrite(tmp_path / "prob.tif", np.stack([probability] * 3), photometric="minisblack")
    labels = np.where(np.stack([target] * 3) > 0, 0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    out = tmp_path / "out" / "segments.tif"
    assert cli.main(["segment", str(tmp_path / "prob.tif"), "-o", str(out), "--merge-threshold", "0.4"]) == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej and tif.pages[0].tags["Software"].value.startswith("em-unet segment")
        segments = tif.asarray()
    assert segments.dtype == np.uint16 and segments.shape == (3, 64, 64) and segments.max() == 48
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["segment_params"] == {"sigma_px": 1.0, "seed_threshold": 0.05, "merge_threshold": 0.4}
    capsys.readouterr()

    assert cli.main(["evaluate", str(out), str(tmp_path / "labels.tif"), "-o", str(tmp_path / "s.json")]) == 0
    assert "split" in capsys.readouterr().out
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["kind"] == "segments" and scores["v_rand"] == pytest.approx(1.0)

    before = out.read_bytes()
    assert "already exists" in error_of(capsys, ["segment", tmp_path / "prob.tif", "-o", out])
    assert out.read_bytes() == before


def test_segment_command_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    probability, target = cell_grid()
    cases = {
        "nan.tif": np.where(target > 0, np.nan, probability),
        "over-one.tif": probability * 2,
        "negative.tif": probability - 0.5,
        "labels.tif": np.stack([truth_segments(target)] * 2).astype(np.int32),
    }
    for name, values in cases.items():
        tifffile.imwrite(tmp_path / name, values, photometric="minisblack")
    tifffile.imwrite(tmp_path / "good.tif", probability, photometric="minisblack")
    expected = [
        (["nan.tif"], "nan.tif: NaN or infinite value at slice 0"),
        (["over-one.tif"], r"not probabilities in [0, 1]"),
        (["negative.tif"], "values from -0."),
        (["labels.tif"], "must be 8-bit, 16-bit or float, found int32"),
        (["missing.tif"], "missing.tif: no such file"),
        (["good.tif", "--seed-threshold", "2"], "--seed-threshold = 2.0: must be a finite number >= 0 and <= 1"),
        (["good.tif", "--sigma", "-3"], "--sigma (sigma_px) = -3.0: must be a finite number >= 0"),
        (["good.tif", "--merge-threshold", "nan"], "--merge-threshold = nan: must be a finite number"),
    ]
    for args, message in expected:
        line = error_of(capsys, ["segment", tmp_path / args[0], "-o", tmp_path / "seg.tif", *args[1:]])
        assert message in line, line
        assert not (tmp_path / "seg.tif").exists() and not (tmp_path / "seg.json").exists()
    line = error_of(capsys, ["segment", tmp_path / "good.tif", "-o", tmp_path / "seg.png"])
    assert "name the output .tif or .tiff" in line
    line = error_of(capsys, ["segment", tmp_path / "good.tif", "-o", tmp_path / "seg.zarr"])
    assert "a chunked output is segmented from a chunked input" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*cases, "good.tif"])


def test_predict_segment_checks_its_options_before_any_prediction(tmp_path, capsys):
    # the model does not exist: each of these must be refused before the model would be loaded
    base = ["predict", tmp_path / "no-model", tmp_path / "img.tif", "-o", tmp_path / "p.tif"]
    cases = [
        (["--segment", tmp_path / "n.tif", "--binary"], "--segment needs the membrane probability"),
        (["--segment", tmp_path / "n.tif", "--isbi"], "--segment needs the membrane probability"),
        (["--segment", tmp_path / "n.tif", "--seed-threshold", "3"], "--seed-threshold = 3.0: must be"),
        (["--segment", tmp_path / "n.h5"], "name the output .tif or .tiff"),
    ]
    (tmp_path / "taken.json").write_text("{}")
    cases.append((["--segment", tmp_path / "taken.tif"], "taken.json already exists"))
    for extra, message in cases:
        assert message in error_of(capsys, [*base, *extra])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.json"]
