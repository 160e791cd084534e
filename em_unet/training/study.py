"""The seed study: how depth, data augmentation, learning rate and optimizer shape U-Net training.

``tuning/seed-study.toml`` defines the experiments; each varies one factor (a
:class:`~em_unet.training.train.TrainConfig` field) and holds the rest fixed. :func:`run_study` trains every
variant, then :func:`write_report` draws the figures and judges each of the original study's
conclusions by a stated rule on the recorded numbers.

Variants run through :func:`em_unet.training.train.train` directly, not through a KerasTuner GridSearch:
a grid over one factor is only a list, and each variant needs its whole per-epoch history and its
ISBI scores, which ``train`` already records. A variant's folder is then an ordinary training run
that TensorBoard, ``em-unet plot`` and ``em-unet predict`` read like any other.
Resuming is by that record: a variant whose ``scores.json`` exists is finished and not run again.
Variants with the same full configuration (Adam 1e-4 with augmentation at depth 4 appears in all four
experiments of the seed study) are trained once and their run folder is copied.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from em_unet.config import NAMING_FIELDS, TrainConfig, shipped_toml
from em_unet.errors import ConfigError, EmUnetError
from em_unet.io.files import atomic_output
from em_unet.machine import machine_description, resolve_precision
from em_unet.reporting.history import read_history, read_json
from em_unet.reporting.plot import plot_runs
from em_unet.settings import check_value
from em_unet.training.assembly import prepare_data
from em_unet.training.train import train

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STUDY_CONFIG = "seed-study.toml"  # ships inside the package, as em_unet/tuning/seed-study.toml
SETTABLE_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - set(NAMING_FIELDS)
DEFAULT_RULES = {"fell": 0.10, "stagnation": 0.05, "divergence": 0.10, "spike": 0.20, "worse": 0.10}


# ---------------------------------------------------------------- configuration


def _check_settings(settings: dict, where: str) -> dict:
    """Refuse unknown keys and bad values (each checked as the flag of the same name would be)."""
    TrainConfig.check_keys(settings, where, sorted(SETTABLE_FIELDS))
    for name, value in settings.items():
        try:
            check_value(TrainConfig.field(name), value, TrainConfig)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return settings


def load_study(path: str | Path | None = None, quick: bool = False) -> dict:
    """Read and check a study TOML. Returns ``{"settings", "rules", "experiments", "path", "quick"}``;
    with ``quick`` the ``[quick]`` table overrides ``[study]``."""
    path = Path(path) if path else Path(STUDY_CONFIG)
    try:
        spec = tomllib.loads(
            path.read_text(encoding="utf-8") if str(path) != STUDY_CONFIG else shipped_toml(STUDY_CONFIG)
        )
    except FileNotFoundError:
        raise EmUnetError(f"{path}: no such study file") from None
    except IsADirectoryError:
        raise EmUnetError(f"{path}: is a folder, not a study file") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise EmUnetError(f"{path}: not valid TOML ({err})") from None
    settings = dict(_check_settings(spec.get("study", {}), f"{path} [study]"))
    if quick:
        settings.update(_check_settings(spec.get("quick", {}), f"{path} [quick]"))
    rules = {**DEFAULT_RULES, **spec.get("rules", {})}
    if set(rules) - set(DEFAULT_RULES):
        raise EmUnetError(f"{path} [rules]: unknown rules {sorted(set(rules) - set(DEFAULT_RULES))}")
    experiments = {}
    for name, experiment in spec.get("experiments", {}).items():
        where = f"{path} [experiments.{name}]"
        factor, values = experiment.get("factor"), experiment.get("values")
        if factor not in SETTABLE_FIELDS:
            raise EmUnetError(f"{where}: factor {factor!r} is not a training setting")
        if not isinstance(values, list) or len(values) < 2:
            raise EmUnetError(f"{where}: values must list at least two settings of {factor}")
        for value in values:
            _check_settings({factor: value}, where)
        labels = experiment.get("labels") or [f"{factor} {value}" for value in values]
        if len(labels) != len(values) or len(set(labels)) != len(labels):
            raise EmUnetError(f"{where}: labels must name each of the {len(values)} values once")
        experiments[name] = {
            "title": experiment.get("title", name),
            "factor": factor,
            "values": values,
            "labels": labels,
            "folders": [folder_name(label) for label in labels],
            "fixed": _check_settings(experiment.get("fixed", {}), where),
            "original": experiment.get("original", ""),
            "claim": experiment.get("claim", name),
        }
    if not experiments:
        raise EmUnetError(f"{path}: no [experiments.<name>] tables")
    return {"path": str(path), "quick": quick, "settings": settings, "rules": rules, "experiments": experiments}


def folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")


@dataclass
class Variant:
    experiment: str
    label: str
    value: object
    config: TrainConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.logs_dir) / self.config.run_name

    @property
    def key(self) -> str:
        """Equal for variants that would train identically."""
        return json.dumps(comparable(self.config.to_dict()), sort_keys=True)


def comparable(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if k in SETTABLE_FIELDS}


def plan_variants(
    study: dict,
    data: str,
    labels: str,
    root: Path,
    experiments: list[str] | None = None,
    epochs: int | None = None,
    precision: str | None = None,
    label_convention: str = "auto",
) -> list[Variant]:
    """Every variant of the chosen experiments, in the order the study lists them."""
    chosen = experiments or list(study["experiments"])
    unknown = [name for name in chosen if name not in study["experiments"]]
    if unknown:
        raise EmUnetError(f"unknown experiments {unknown}: {study['path']} defines {list(study['experiments'])}")
    variants = []
    for name in chosen:
        experiment = study["experiments"][name]
        for value, label, folder in zip(experiment["values"], experiment["labels"], experiment["folders"]):
            # the judgements read validation curves epoch by epoch: validate every epoch unless the file says otherwise
            settings = {"val_every": 1, **study["settings"], **experiment["fixed"], experiment["factor"]: value}
            if epochs:
                settings["epochs"] = epochs
            if precision:
                settings["precision"] = precision
            config = TrainConfig.from_dict(
                settings,
                f"{study['path']} [experiments.{name}] {label}",
                sorted(SETTABLE_FIELDS),
                data=str(data),
                labels=str(labels),
                label_convention=label_convention,
                logs_dir=str(root / name),
                run_name=folder,
            )
            variants.append(Variant(name, label, value, config))
    return variants


# ---------------------------------------------------------------- running


def _is_finished(run_dir: Path) -> bool:
    return (run_dir / "scores.json").is_file()


def _check_finished_matches(variant: Variant) -> None:
    recorded = comparable(read_json(variant.run_dir / "config.json"))
    wanted = comparable(variant.config.to_dict())
    # a setting the run's config.json lacks came into em-unet after that run: its behaviour then is not a difference
    differences = [
        f"{k}: {recorded[k]!r} there, {v!r} now" for k, v in wanted.items() if k in recorded and recorded[k] != v
    ]
    if differences:
        raise EmUnetError(
            f"{variant.run_dir} holds a finished run with other settings ({'; '.join(differences[:3])}): "
            f"choose another --logs-dir or move that folder away"
        )


def _set_aside(run_dir: Path, root: Path) -> Path | None:
    """Move an interrupted run out of the study (into ``<root>/.interrupted/``) so it is kept, not mixed in."""
    if not run_dir.exists():
        return None
    if not any(run_dir.iterdir()):
        run_dir.rmdir()
        return None
    target = root / ".interrupted" / f"{run_dir.parent.name}-{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(target)
    return target


def _copy_run(source: Path, target: Path) -> None:
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    partial.rename(target)


def _write_json(path: Path, record: dict) -> None:
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str))


def study_root(logs_dir: str | Path, quick: bool) -> Path:
    """``logs/study/``, or ``logs/study-quick/`` so a smoke test never mixes with the real study."""
    return Path(logs_dir) / ("study-quick" if quick else "study")


def run_study(
    data: str | Path,
    labels: str | Path,
    config: str | Path | None = None,
    experiments: list[str] | None = None,
    epochs: int | None = None,
    quick: bool = False,
    logs_dir: str | Path = "logs",
    report_dir: str | Path | None = None,
    precision: str | None = None,
    label_convention: str = "auto",
    verbose: int = 2,
) -> dict:
    """Train every variant not yet finished, then write the report. Returns the report's contents.

    Run folders: ``<logs_dir>/study/<experiment>/<variant>/`` (``study-quick`` with ``quick``).
    The report (figures, summary.csv, report.md) goes to ``report_dir`` (default ``<root>/report``)
    and is redrawn from the logs on every call, so it always covers every finished experiment.
    """
    study = load_study(config, quick)
    root = study_root(logs_dir, quick)
    variants = plan_variants(study, str(data), str(labels), root, experiments, epochs, precision, label_convention)
    prepare_data(variants[0].config)  # a bad stack, label file or slice range fails here, before any folder is made
    for variant in variants:
        if _is_finished(variant.run_dir):
            _check_finished_matches(variant)
    root.mkdir(parents=True, exist_ok=True)
    record_path = root / "study.json"
    record = read_json(record_path)
    record.update(
        {
            "config": study["path"],
            "quick": quick,
            "settings": study["settings"],
            "rules": study["rules"],
            "experiments": {
                name: {k: spec[k] for k in ("title", "factor", "values", "labels", "original", "claim")}
                | {"variants": spec["folders"]}
                for name, spec in study["experiments"].items()
            },
            "precision": resolve_precision(variants[0].config.precision),
        }
    )
    record.setdefault("seconds", {})
    _write_json(record_path, record)

    finished = {v.key: v.run_dir for v in variants if _is_finished(v.run_dir)}
    for index, variant in enumerate(variants, 1):
        name = f"[{index}/{len(variants)}] {variant.experiment} / {variant.label}"
        if _is_finished(variant.run_dir):
            print(f"{name}: finished earlier, kept", flush=True)
            continue
        moved = _set_aside(variant.run_dir, root)
        if moved:
            print(f"{name}: an interrupted run was moved to {moved}", flush=True)
        if variant.key in finished:
            _copy_run(finished[variant.key], variant.run_dir)
            print(f"{name}: same settings as {finished[variant.key]}, copied", flush=True)
            continue
        print(f"{name}: training {variant.config.epochs} epochs", flush=True)
        start = time.monotonic()
        train(variant.config, verbose=verbose, export=False)
        record["seconds"][f"{variant.experiment}/{variant.label}"] = round(time.monotonic() - start, 1)
        _write_json(record_path, record)
        finished[variant.key] = variant.run_dir
    return write_report(root, report_dir)


# ---------------------------------------------------------------- judging the original conclusions


@dataclass
class Check:
    claim: str
    rule: str
    measured: str
    holds: bool


TAIL_EPOCHS = 5  # "final" in the rules: the mean of the last 5 epochs, so one noisy epoch cannot decide


def tail(curve: np.ndarray) -> float:
    """The mean of the last ``TAIL_EPOCHS`` epochs."""
    return float(curve[-TAIL_EPOCHS:].mean())


def late_trend(curve: np.ndarray) -> float:
    """Relative change over the second half of the epochs of a straight line fitted to them
    (negative: falling). A fit, not two single epochs, so epoch-to-epoch noise does not decide."""
    half = curve[len(curve) // 2 :]
    if len(half) < 2:
        return 0.0
    slope, intercept = np.polyfit(np.arange(len(half)), half, 1)
    return float(slope * (len(half) - 1) / intercept) if intercept > 0 else 0.0


def worst_jump(curve: np.ndarray) -> tuple[float, int]:
    """The largest rise above the running minimum in the second half, and its epoch (1-based)."""
    running = np.minimum.accumulate(curve)
    half = len(curve) // 2
    jumps = curve[half:] / running[half:] - 1.0
    index = int(np.argmax(jumps))
    return float(jumps[index]), half + index + 1


class Judge:
    """The rules of ``[rules]`` as checks on curves, each stating its rule and the numbers it used."""

    def __init__(self, rules: dict):
        self.rules = rules

    def fell(self, claim: str, curve: np.ndarray) -> Check:
        ratio = tail(curve) / curve[0]
        return Check(
            claim,
            f"mean of last {TAIL_EPOCHS} epochs <= {1 - self.rules['fell']:.0%} of epoch 1",
            f"{curve[0]:.4g} -> {tail(curve):.4g} ({ratio:.0%})",
            bool(ratio <= 1 - self.rules["fell"]),
        )

    def did_not_fall(self, claim: str, curve: np.ndarray) -> Check:
        check = self.fell(claim, curve)
        return Check(
            claim,
            f"mean of last {TAIL_EPOCHS} epochs > {1 - self.rules['fell']:.0%} of epoch 1",
            check.measured,
            not check.holds,
        )

    def _trend(self, claim: str, curve: np.ndarray, rule: str, holds) -> Check:
        trend = late_trend(curve)
        return Check(claim, f"2nd-half trend {rule}", f"{trend:+.1%}", bool(holds(trend)))

    def stagnated(self, claim: str, curve: np.ndarray) -> Check:
        limit = self.rules["stagnation"]
        return self._trend(claim, curve, f"> -{limit:.0%}", lambda t: t > -limit)

    def kept_falling(self, claim: str, curve: np.ndarray) -> Check:
        limit = self.rules["stagnation"]
        return self._trend(claim, curve, f"<= -{limit:.0%}", lambda t: t <= -limit)

    def rose(self, claim: str, curve: np.ndarray) -> Check:
        limit = self.rules["divergence"]
        return self._trend(claim, curve, f"> +{limit:.0%}", lambda t: t > limit)

    def jumped(self, claim: str, curve: np.ndarray) -> Check:
        jump, epoch = worst_jump(curve)
        return Check(
            claim,
            f"a 2nd-half epoch > {1 + self.rules['spike']:.0%} of the best so far",
            f"+{jump:.0%} at epoch {epoch}",
            jump > self.rules["spike"],
        )

    def fell_smoothly(self, claim: str, curve: np.ndarray) -> Check:
        falling, (jump, epoch) = self.kept_falling(claim, curve), worst_jump(curve)
        smooth = jump <= self.rules["spike"]
        return Check(
            claim,
            f"2nd-half trend <= -{self.rules['stagnation']:.0%} and no 2nd-half epoch "
            f"> {1 + self.rules['spike']:.0%} of the best so far",
            f"{falling.measured}, worst +{jump:.0%} at epoch {epoch}",
            falling.holds and smooth,
        )

    def clearly_worse(self, claim: str, worse: float, better: float) -> Check:
        return Check(
            claim,
            f"min val loss > {1 + self.rules['worse']:.0%} of the other's",
            f"{worse:.4g} vs {better:.4g} ({worse / better:.0%})",
            bool(worse > (1 + self.rules["worse"]) * better),
        )

    @staticmethod
    def lowest(claim: str, what: str, values: dict[str, float], winner: str) -> Check:
        best = min(values, key=values.get)
        return Check(
            claim,
            f"lowest {what} of all variants",
            ", ".join(f"{k} {v:.4g}" for k, v in values.items()),
            best == winner,
        )


def _depth(j: Judge, runs: dict) -> list[Check]:
    shallow, deep = runs[3], runs[4]
    return [
        j.fell("depth 3: training loss fell", shallow["loss"]),
        j.stagnated("depth 3: validation loss stagnated", shallow["val_loss"]),
        j.kept_falling("depth 4: training loss kept falling", deep["loss"]),
        j.kept_falling("depth 4: validation loss kept falling", deep["val_loss"]),
    ]


def _augmentation(j: Judge, runs: dict) -> list[Check]:
    raw, augmented = runs[False], runs[True]
    return [
        Judge.lowest(
            "raw: lower training loss than augmented",
            f"training loss (mean of last {TAIL_EPOCHS})",
            {"raw": tail(raw["loss"]), "augmented": tail(augmented["loss"])},
            "raw",
        ),
        j.rose("raw: validation loss started to rise", raw["val_loss"]),
        j.kept_falling("augmented: training loss kept falling", augmented["loss"]),
        j.kept_falling("augmented: validation loss kept falling", augmented["val_loss"]),
    ]


def _learning_rate(j: Judge, runs: dict) -> list[Check]:
    low, mid, high = runs[1e-5], runs[1e-4], runs[1e-3]
    best = {f"{k:.0e}": float(runs[k]["val_loss"].min()) for k in (1e-5, 1e-4, 1e-3)}
    return [
        j.clearly_worse("1e-5 did not reach a low loss", float(low["val_loss"].min()), float(mid["val_loss"].min())),
        j.rose("1e-3 diverged (validation loss shot up)", high["val_loss"]),
        Judge.lowest("1e-4 was best", "minimum validation loss", best, "1e-04"),
    ]


def _optimizer(j: Judge, runs: dict) -> list[Check]:
    final = {name: tail(runs[name]["loss"]) for name in ("sgd", "adam", "adamax")}
    return [
        j.did_not_fall("SGD did not reduce the loss", runs["sgd"]["loss"]),
        Judge.lowest("Adam reached the lowest loss", f"training loss (mean of last {TAIL_EPOCHS})", final, "adam"),
        j.jumped("Adam: validation loss showed signs of divergence", runs["adam"]["val_loss"]),
        j.fell_smoothly("Adamax: validation loss fell smoothly", runs["adamax"]["val_loss"]),
    ]


# claim name -> (the values the original compared, its checks)
ORIGINAL_CONCLUSIONS = {
    "depth": ((3, 4), _depth),
    "augmentation": ((False, True), _augmentation),
    "lr": ((1e-5, 1e-4, 1e-3), _learning_rate),
    "optimizer": (("sgd", "adam", "adamax"), _optimizer),
}


def judge_experiment(experiment: dict, runs: dict, rules: dict) -> tuple[str, list[Check]]:
    """``(verdict, checks)``: verdict is "holds", "partly holds", "does not hold" or "not checked"."""
    needed, checks_of = ORIGINAL_CONCLUSIONS.get(experiment.get("claim", ""), (None, None))
    if checks_of is None:
        return "not checked (no original conclusion for this experiment)", []
    if not all(value in runs for value in needed):
        return f"not checked (the original compared {list(needed)})", []
    checks = checks_of(Judge(rules), runs)
    held = sum(check.holds for check in checks)
    verdict = "holds" if held == len(checks) else ("does not hold" if held == 0 else "partly holds")
    return verdict, checks


# ---------------------------------------------------------------- report


SUMMARY_COLUMNS = (
    "experiment",
    "variant",
    "factor",
    "value",
    "epochs",
    "min_val_loss",
    "min_val_epoch",
    "final_train_loss",
    "final_val_loss",
    "overfitting_gap",
    "v_rand",
    "v_info",
    "pixel_error",
)


def epoch_noise(curves: list[np.ndarray]) -> float:
    """Median relative change of a loss from one epoch to the next, over all ``curves``."""
    changes = np.concatenate([np.abs(np.diff(c)) / c[:-1] for c in curves if len(c) > 1] or [np.zeros(1)])
    return float(np.median(changes))


def variant_summary(history: dict, scores: dict) -> dict:
    """Per variant: minimum validation loss and its epoch (1-based), final losses, their gap, ISBI scores."""
    loss, val = history["loss"], history["val_loss"]
    validated = np.flatnonzero(~np.isnan(val))  # epochs with a validation (all, unless --val-every > 1)
    best = int(validated[np.argmin(val[validated])]) if validated.size else 0
    last = int(validated[-1]) if validated.size else len(val) - 1
    return {
        "epochs": len(loss),
        "min_val_loss": float(val[best]),
        "min_val_epoch": best + 1,
        "final_train_loss": float(loss[-1]),
        "final_val_loss": float(val[last]),
        "overfitting_gap": float(val[last] - loss[last]),
        "v_rand": scores.get("v_rand"),
        "v_info": scores.get("v_info"),
        "pixel_error": scores.get("pixel_error"),
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_report(root: str | Path, report_dir: str | Path | None = None) -> dict:
    """Figures, ``summary.csv`` and ``report.md`` of every finished experiment under ``root``."""
    root = Path(root)
    record = read_json(root / "study.json")
    if not record:
        raise EmUnetError(f"{root}: no study.json (not a study folder)")
    report_dir = Path(report_dir) if report_dir else root / "report"
    rows, judged, curves = [], {}, []
    for name, experiment in record["experiments"].items():
        folders = [root / name / folder for folder in experiment["variants"]]
        if not all(_is_finished(folder) for folder in folders):
            continue
        runs = {}
        for value, label, folder in zip(experiment["values"], experiment["labels"], folders):
            history = read_history(folder)
            # the judgements read a curve per validation: leave out epochs without one (--val-every > 1)
            runs[value] = {
                key: curve[~np.isnan(curve)] if key.startswith("val_") else curve for key, curve in history.items()
            }
            curves.append(runs[value]["val_loss"])
            rows.append(
                {
                    "experiment": name,
                    "variant": label,
                    "factor": experiment["factor"],
                    "value": value,
                    **variant_summary(history, read_json(folder / "scores.json")),
                }
            )
        judged[name] = judge_experiment(experiment, runs, {**DEFAULT_RULES, **record["rules"]})
    if not rows:
        raise EmUnetError(f"{root}: no experiment has finished all its variants yet")
    figures = plot_runs(root, report_dir)

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_output(report_dir / "summary.csv", overwrite=True) as tmp:
        tmp.write_text(buffer.getvalue())
    with atomic_output(report_dir / "report.md", overwrite=True) as tmp:
        tmp.write_text(_report_markdown(record, rows, judged, figures, epoch_noise(curves)))
    return {
        "report_dir": report_dir,
        "rows": rows,
        "figures": figures,
        "verdicts": {name: verdict for name, (verdict, _) in judged.items()},
    }


def _report_markdown(record: dict, rows: list[dict], judged: dict, figures: list[Path], noise: float) -> str:
    s, rules = record["settings"], {**DEFAULT_RULES, **record["rules"]}
    total = sum(record.get("seconds", {}).values())
    slices = f"slices {s['slices'][0]}-{s['slices'][1]}, " if s.get("slices") else ""
    val = s.get("val_slices") or ("", "")
    lines = [
        "# Seed study: depth, augmentation, learning rate, optimizer",
        "",
        f"Budget: {s.get('epochs')} epochs of {s.get('steps_per_epoch', 'one pass of')} batches x "
        f"{s.get('batch_size')} patches of {s.get('patch_size')} x {s.get('patch_size')} px; "
        f"base filters {s.get('base_filters')}; loss {s.get('loss', 'bce')}; {slices}validation slices "
        f"{val[0]}-{val[1]}; precision {record.get('precision')}; seed {s.get('seed', 0)}"
        f"{'; quick mode' if record.get('quick') else ''}.",
        f"Training time: {total / 60:.1f} min for {len(record.get('seconds', {}))} trained variants on "
        f"{machine_description()} "
        "(variants with identical settings were trained once and copied).",
        f"Config: `{Path(record['config']).name}`. Redraw the figures with `em-unet plot <study logs folder>`.",
        "",
        "## How the original conclusions are judged",
        "",
        "Each conclusion is split into checks on the recorded per-epoch losses; it *holds* when every check "
        f"holds. Single epochs are noisy (in this run the validation loss changes by a median {noise:.0%} from "
        "one epoch to the next), so the rules use fitted trends and means, not single epochs:",
        f"- a loss **fell**: the mean of its last {TAIL_EPOCHS} epochs is at most {1 - rules['fell']:.0%} of "
        "its first epoch;",
        f"- the **2nd-half trend** is the relative change of a straight line fitted to the second half of the "
        f"epochs: a loss **kept falling** when it is <= -{rules['stagnation']:.0%}, **stagnated** when it is "
        f"> -{rules['stagnation']:.0%}, and **rose** (diverged) when it is > +{rules['divergence']:.0%};",
        f"- **signs of divergence**: in the second half, an epoch more than {rules['spike']:.0%} above the best "
        "value so far; a loss **fell smoothly** when it kept falling without such an epoch;",
        f"- a variant is **clearly worse**: its minimum validation loss exceeds the other's by more than "
        f"{rules['worse']:.0%}.",
        "",
        "| experiment | verdict |",
        "| --- | --- |",
        *[f"| {record['experiments'][name]['title']} | **{verdict}** |" for name, (verdict, _) in judged.items()],
        "",
    ]
    if any(path.name == "overview.png" for path in figures):
        lines += ["![overview](overview.png)", ""]
    for name, (verdict, checks) in judged.items():
        experiment = record["experiments"][name]
        lines += [f"## {experiment['title']}", "", f"![{name}]({name}.png)", ""]
        if experiment.get("original"):
            lines += [f"Original study: {experiment['original']}", ""]
        lines += [
            "| variant | min val loss (epoch) | final train loss | final val loss | gap | V_rand | V_info |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['variant']} | {_fmt(r['min_val_loss'])} ({r['min_val_epoch']}) | {_fmt(r['final_train_loss'])} "
            f"| {_fmt(r['final_val_loss'])} | {_fmt(r['overfitting_gap'])} | {_fmt(r['v_rand'])} "
            f"| {_fmt(r['v_info'])} |"
            for r in rows
            if r["experiment"] == name
        ]
        lines += ["", f"On this run the original conclusion **{verdict}**.", ""]
        if checks:
            lines += ["| check | rule | measured | holds |", "| --- | --- | --- | --- |"]
            lines += [f"| {c.claim} | {c.rule} | {c.measured} | {'yes' if c.holds else 'no'} |" for c in checks]
            lines.append("")
    return "\n".join(lines)
