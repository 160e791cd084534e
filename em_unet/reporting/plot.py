"""Figures of loss curves: training (solid) and validation (dashed) loss per epoch for each run,
one figure per group of runs and an overview of all groups. ``em-unet plot`` calls :func:`plot_runs`.

Figures are :class:`matplotlib.figure.Figure` objects rendered straight to PNG, never through
pyplot: importing em_unet leaves the user's matplotlib backend (e.g. a notebook's) as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from em_unet.io.files import atomic_output
from em_unet.reporting.history import find_runs, read_history, read_json

Curves = dict[str, dict[str, np.ndarray]]  # run label -> per-epoch history
LOG_SCALE_SPAN = 10.0  # use a log loss axis when the plotted losses span more than this factor


def draw_curves(ax, curves: Curves, title: str, ylabel: str = "loss") -> None:
    """Training loss solid, validation loss dashed, one colour per run."""
    colours = matplotlib.colormaps["tab10"]
    values = []
    for index, (label, history) in enumerate(curves.items()):
        colour = colours(index % 10)
        for key, style in (("loss", "-"), ("val_loss", "--")):
            if key in history:
                epochs = np.arange(1, len(history[key]) + 1)
                shown = ~np.isnan(history[key])  # epochs without validation (--val-every); the line joins the rest
                ax.plot(epochs[shown], history[key][shown], style, color=colour, linewidth=1.5, gid=f"{label}/{key}")
                values.append(history[key])
        ax.plot([], [], "-", color=colour, linewidth=4, label=label)
    finite = np.concatenate(values) if values else np.array([])
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if finite.size and finite.max() / finite.min() > LOG_SCALE_SPAN:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    legend = ax.legend(loc="upper right", fontsize=8, title="run", title_fontsize=8)
    ax.add_artist(legend)
    ax.legend(
        handles=[
            Line2D([], [], color="grey", linestyle="-", label="training"),
            Line2D([], [], color="grey", linestyle="--", label="validation"),
        ],
        loc="lower left",
        fontsize=8,
    )


SERIES_KEY = "em-unet series"  # PNG text chunk: the "<run>/<loss|val_loss>" series drawn, as JSON


def _save(figure, path: Path) -> Path:
    series = [line.get_gid() for ax in figure.axes for line in ax.lines if line.get_gid()]
    with atomic_output(path, overwrite=True) as tmp:
        figure.savefig(tmp, format="png", dpi=120, metadata={SERIES_KEY: json.dumps(series)})
    return path


def plot_curves(curves: Curves, title: str, path: str | Path, ylabel: str = "loss") -> Path:
    """One figure: every run's training and validation loss per epoch."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    draw_curves(ax, curves, title, ylabel)
    return _save(figure, Path(path))


def plot_overview(groups: dict[str, Curves], path: str | Path, ylabel: str = "loss") -> Path:
    """All groups side by side, two per row."""
    columns = min(2, len(groups))
    rows = -(-len(groups) // columns)
    figure = Figure(figsize=(6.5 * columns, 4.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax, (title, curves) in zip(axes.flat, groups.items()):
        draw_curves(ax, curves, title, ylabel)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    return _save(figure, Path(path))


def loss_label(run_dir: Path) -> str:
    loss = read_json(run_dir / "config.json").get("loss")
    names = {
        "bce": "binary cross-entropy",
        "dice": "Dice loss",
        "bce_dice": "cross-entropy + Dice",
        "weighted_bce": "border-weighted cross-entropy",
    }
    return f"loss ({names[loss]})" if loss in names else "loss"


def plot_runs(root: str | Path, output_dir: str | Path | None = None) -> list[Path]:
    """Redraw figures from recorded histories (``history.csv``, else TensorBoard events), no training.

    Runs are grouped by the folder that holds them: one ``<group>.png`` per group (for a study,
    one per experiment) and ``overview.png`` when there is more than one group. Figures go to
    ``output_dir`` (default ``<root>/report``), replacing earlier drawings of the same figures.
    """
    root = Path(root)
    runs = find_runs(root)
    experiments = read_json(root / "study.json").get("experiments", {})
    titles = {name: spec.get("title", name) for name, spec in experiments.items()}
    # a study's figures follow its config: experiments and variants in the order it lists them
    rank = {name: i for i, name in enumerate(experiments)}
    order = {(name, label): i for name, spec in experiments.items() for i, label in enumerate(spec.get("variants", []))}
    runs.sort(
        key=lambda run: (
            rank.get(run.parent.name, len(rank)),
            run.parent.name,
            order.get((run.parent.name, run.name), len(order)),
            run.name,
        )
    )
    groups: dict[str, Curves] = {}
    for run in runs:
        group = run.parent.name if run != root else root.name
        spec = experiments.get(run.parent.name, {})
        label = dict(zip(spec.get("variants", []), spec.get("labels", []))).get(run.name, run.name)
        groups.setdefault(group, {})[label] = read_history(run)
    output_dir = Path(output_dir) if output_dir else root / "report"
    ylabel = loss_label(runs[0])
    paths = [
        plot_curves(curves, titles.get(group, group), output_dir / f"{group}.png", ylabel)
        for group, curves in groups.items()
    ]
    if len(groups) > 1:
        paths.append(
            plot_overview({titles.get(g, g): c for g, c in groups.items()}, output_dir / "overview.png", ylabel)
        )
    return paths
