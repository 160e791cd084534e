import json

import numpy as np
from PIL import Image

from em_unet.reporting.plot import SERIES_KEY, plot_runs
from tests.helpers import error_line, run_cli


def series(png):
    return json.loads(Image.open(png).text[SERIES_KEY])


def write_history(run_dir, loss, val_loss):
    run_dir.mkdir(parents=True)
    rows = "".join(f"{i},{a},{b}\n" for i, (a, b) in enumerate(zip(loss, val_loss)))
    (run_dir / "history.csv").write_text("epoch,loss,val_loss\n" + rows)


def test_one_figure_per_group_and_an_overview(tmp_path):
    write_history(tmp_path / "depth" / "d3", [1.0, 0.5, 0.3], [1.0, 0.8, 0.8])
    write_history(tmp_path / "depth" / "d4", [1.0, 0.4, 0.2], [1.0, 0.6, 0.4])
    write_history(tmp_path / "lr" / "fast", [1.0, 0.01, 0.001], [1.0, 2.0, 5.0])
    paths = plot_runs(tmp_path)
    assert [p.name for p in paths] == ["depth.png", "lr.png", "overview.png"]
    assert series(paths[0]) == ["d3/loss", "d3/val_loss", "d4/loss", "d4/val_loss"]
    assert series(paths[1]) == ["fast/loss", "fast/val_loss"]
    assert sorted(series(paths[2])) == sorted(series(paths[0]) + series(paths[1]))
    assert all(p.parent == tmp_path / "report" for p in paths)


def test_log_scale_only_where_losses_span_decades(tmp_path):
    from matplotlib.figure import Figure

    from em_unet.reporting.plot import draw_curves

    narrow, wide = Figure().subplots(1, 2)
    draw_curves(narrow, {"a": {"loss": np.array([0.7, 0.5]), "val_loss": np.array([0.7, 0.6])}}, "narrow")
    draw_curves(wide, {"a": {"loss": np.array([0.7, 0.001]), "val_loss": np.array([0.7, 0.6])}}, "wide")
    assert (narrow.get_yscale(), wide.get_yscale()) == ("linear", "log")


def test_plotting_leaves_the_users_matplotlib_backend_alone(tmp_path):
    """A notebook user's backend survives importing em_unet and drawing figures; pyplot is never involved."""
    import os
    import subprocess
    import sys

    write_history(tmp_path / "run", [1.0, 0.5], [1.0, 0.7])
    script = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "import em_unet.reporting.plot\n"
        f"paths = em_unet.reporting.plot.plot_runs({str(tmp_path / 'run')!r})\n"
        "assert matplotlib.rcParams['backend'] == 'svg', matplotlib.rcParams['backend']\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "print(len(paths))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "1"
    assert Image.open(tmp_path / "run" / "report" / "run.png").format == "PNG"


def test_plot_command_and_its_errors(tmp_path):
    write_history(tmp_path / "run", [1.0, 0.5], [1.0, 0.7])
    result = run_cli("plot", tmp_path / "run", "-o", tmp_path / "figures")
    assert result.returncode == 0, result.stderr
    assert series(tmp_path / "figures" / "run.png") == ["run/loss", "run/val_loss"]
    missing = run_cli("plot", tmp_path / "nothing")
    assert missing.returncode == 2 and "nothing: no such folder" in error_line(missing)
    (tmp_path / "empty").mkdir()
    empty = run_cli("plot", tmp_path / "empty")
    assert empty.returncode == 2 and "no training run found" in error_line(empty)
