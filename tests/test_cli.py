import numpy as np
import tifffile

from tests.helpers import error_line, run_cli


def test_help_lists_commands_and_each_has_help():
    result = run_cli("--help")
    assert result.returncode == 0
    commands = ["augment-preview"]
    for command in commands:
        assert command in result.stdout
        sub = run_cli(command, "--help")
        assert sub.returncode == 0 and "usage: em-unet " + command in sub.stdout


def test_augment_preview_writes_png_and_never_overwrites(isbi_dir, tmp_path):
    out = tmp_path / "preview.png"
    args = ["augment-preview", "--data", isbi_dir / "train-volume.tif", "--labels", isbi_dir / "train-labels.tif",
            "-o", out, "--samples", "2", "--patch-size", "128"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = out.read_bytes()
    again = run_cli(*args)
    assert again.returncode == 2
    assert "already exists" in error_line(again)
    assert out.read_bytes() == before


def test_bad_input_gives_one_line_error(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((2, 64, 64), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", np.full((2, 64, 64), 7, np.uint8), photometric="minisblack")
    cases = [
        (["--data", tmp_path / "missing.tif", "--labels", tmp_path / "lab.tif"], "missing.tif: no such file"),
        (["--data", tmp_path / "img.tif", "--labels", tmp_path / "lab.tif"], "label values {7}"),
    ]
    for args, expected in cases:
        result = run_cli("augment-preview", *args, "-o", tmp_path / "p.png", "--patch-size", "32")
        assert result.returncode == 2
        assert expected in error_line(result)
    assert not (tmp_path / "p.png").exists()


def test_broken_elasticdeform_says_how_to_fix(tmp_path, isbi_dir):
    fake = tmp_path / "fake" / "elasticdeform"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("numpy.core.multiarray failed to import")\n')
    result = run_cli(
        "augment-preview", "--data", isbi_dir / "train-volume.tif", "--labels", isbi_dir / "train-labels.tif",
        "-o", tmp_path / "p.png", "--elastic-backend", "elasticdeform",
        env={"PYTHONPATH": str(tmp_path / "fake")},
    )
    assert result.returncode == 2
    line = error_line(result)
    assert "numpy.core.multiarray failed to import" in line
    assert "pip install --force-reinstall --no-binary elasticdeform elasticdeform" in line
