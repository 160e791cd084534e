"""The ``em-unet`` command: flags derived from :mod:`em_unet.config`, one library call per command,
every failure reported as one line (``--debug`` shows the traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

# Before TensorFlow is imported anywhere: keep its C++ start-up chatter (oneDNN notices, absl lines)
# off stderr. Level 2 still lets TensorFlow's own errors through.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from em_unet import __version__  # noqa: E402
from em_unet.config import (  # noqa: E402
    TUNE_EXCLUDED,
    EvaluateOptions,
    ExportOptions,
    PackageOptions,
    PlotOptions,
    PredictConfig,
    PreviewOptions,
    SearchConfig,
    SegmentOptions,
    StudyOptions,
    TrainConfig,
    VolumeOptions,
    check_folder_name,
)
from em_unet.errors import EmUnetError  # noqa: E402
from em_unet.inference.blockwise import CHUNKED_TILING, predict_volume  # noqa: E402
from em_unet.inference.package import check_package_output  # noqa: E402
from em_unet.inference.predict import model_margin, predict_file  # noqa: E402
from em_unet.inference.tiling import Tiling  # noqa: E402
from em_unet.io.files import atomic_output, check_writable  # noqa: E402
from em_unet.io.volumes import is_volume_address, parse_address  # noqa: E402
from em_unet.io.writers import output_kind  # noqa: E402
from em_unet.machine import import_tensorflow_quietly  # noqa: E402
from em_unet.segmentation.affinities import MutexParams, is_affinity_map, segment_affinity_file  # noqa: E402
from em_unet.segmentation.blockwise import segment_volume  # noqa: E402
from em_unet.segmentation.metrics import MIN_OVERLAP_PX, evaluate_files  # noqa: E402
from em_unet.segmentation.watershed import SegmentParams, check_segment_outputs, segment_file  # noqa: E402
from em_unet.settings import add_arguments, check_value, from_args, given  # noqa: E402

TENSORFLOW_FREE = ("evaluate", "segment", "plot")  # the commands that run no model never load TensorFlow

PREVIEW_FIELDS = (
    "data",
    "labels",
    "label_convention",
    "patch_size",
    "seed",
    "elastic_sigma_px",
    "elastic_points",
    "elastic_backend",
    "rotation_degrees",
    "model",
    "z_context",
    "z_flips",
    "missing_sections",
    "misaligned_sections",
    "misalign_px",
    "section_jitter",
)
EXPORT_FIELDS = ("models_dir", "model_name", "export_precision")
STUDY_FIELDS = ("data", "labels", "label_convention", "epochs", "precision", "logs_dir")


class Parser(argparse.ArgumentParser):
    """argparse with usage errors in em-unet's one-line form."""

    def error(self, message: str):
        self.exit(2, f"em-unet: error: {message} (see {self.prog} --help)\n")


def _verbosity() -> int:
    return 1 if sys.stdout.isatty() else 2


def _segment_params(args):
    return from_args(SegmentParams, args)


def _mutex_params(args):
    return from_args(MutexParams, args)


# ---------------------------------------------------------------- the commands


def cmd_augment_preview(args) -> int:
    from em_unet.training.preview import augment_preview  # lazy: training loads TensorFlow

    config = from_args(TrainConfig, args)
    options = from_args(PreviewOptions, args)
    path = augment_preview(
        config.data,
        config.labels,
        options.output,
        n_samples=options.samples,
        patch_size=config.patch_size,
        seed=config.seed,
        config=config.augment_config(),
        label_convention=config.label_convention,
        overwrite=options.overwrite,
        z_context=config.z_context,
        volumetric=config.model == "unet3d",
    )
    print(f"wrote {path}")
    return 0


def cmd_train(args) -> int:
    from em_unet.training.train import train  # lazy: training loads TensorFlow

    config = from_args(TrainConfig, args)
    if config.package:
        check_package_output(config.package)  # before training, like every output
    result = train(config, verbose=_verbosity())
    if result["run_dir"] is None:
        print("worker done: the chief writes the logs, the best model and the export")
        return 0
    if result["resumed_from"] is not None:
        print(f"resumed {result['run_dir']} after epoch {result['resumed_from']} of {config.epochs}")
    scores = result["scores"]
    print(
        f"validation: V_rand {scores['v_rand']:.4f}, V_info {scores['v_info']:.4f}, "
        f"pixel error {scores['pixel_error']:.4f}"
    )
    print(f"run folder (config, history, TensorBoard logs): {result['run_dir']}")
    print(f"best model: {result['best_model']}")
    print(f"SavedModel for TF Serving: {result['export_dir']}")
    _package_export(config, result["export_dir"], result["run_dir"])
    print(f"watch it: tensorboard --logdir {config.logs_dir}")
    return 0


def cmd_tune(args) -> int:
    from em_unet.training.tune import search_settings, tune  # lazy: training loads TensorFlow

    base = from_args(TrainConfig, args)
    search = search_settings(given=given(args, SearchConfig))
    if base.package:
        check_package_output(base.package)  # before the search, like every output
    result = tune(base, search, verbose=_verbosity())
    if result.get("recycled"):
        from em_unet.training.distribute import RECYCLE_STATUS  # lazy: training loads TensorFlow

        print(f"worker leaves after {result['recycled']} trial(s): a fresh process takes its place")
        return RECYCLE_STATUS
    if result["role"] == "worker":
        print(f"worker done: no trial left; the chief writes {result['run_dir'] / 'results.csv'} and exports")
        return 0
    columns = list(dict.fromkeys(key for row in result["rows"] for key in row))
    print("  ".join(f"{c:>14s}" for c in columns))
    for row in result["rows"]:
        print(
            "  ".join(
                f"{row.get(c, ''):>14.4g}" if isinstance(row.get(c), float) else f"{str(row.get(c, '')):>14s}"
                for c in columns
            )
        )
    print(f"best hyperparameters: {result['best_hyperparameters']}")
    print(f"results table: {result['run_dir'] / 'results.csv'}")
    print(f"SavedModel for TF Serving: {result['export_dir']}")
    _package_export(base, result["export_dir"], None)
    print(f"watch it: tensorboard --logdir {base.logs_dir}")
    return 0


def _package_export(config: TrainConfig, export_dir, run_dir) -> None:
    """``--package``: the bioimage.io package of a run's or search's export (documented from ``run_dir``)."""
    if config.package and export_dir:
        from em_unet.inference.package import describe_report, package_model  # lazy: loads bioimage.io

        print(describe_report(package_model(export_dir, config.package, run_dir=run_dir, data=config.data)))


def cmd_export(args) -> int:
    from em_unet.inference.export import export_keras_file  # lazy: exporting loads TensorFlow

    options = from_args(ExportOptions, args)
    outputs = {name: getattr(TrainConfig, name) for name in EXPORT_FIELDS}
    for name, value in given(args, TrainConfig).items():
        if name in EXPORT_FIELDS:  # not "model": the positional model file shares its name with --model
            outputs[name] = check_value(TrainConfig.field(name), value, TrainConfig)
    check_folder_name("model_name", outputs["model_name"])
    path = export_keras_file(options.model, outputs["model_name"], outputs["models_dir"], outputs["export_precision"])
    print(f"SavedModel for TF Serving: {path}")
    return 0


def cmd_package(args) -> int:
    from em_unet.inference.package import describe_report, package_model  # lazy: loads TensorFlow and bioimageio

    options = from_args(PackageOptions, args)
    report = package_model(
        options.model,
        options.output or options.output_dir,
        folder=options.output_dir is not None,
        run_dir=options.run,
        data=options.data,
        authors=(options.author or "").split(";"),
        license=options.license,
        cite=options.cite,
        name=options.name,
        github_user=options.github_user,
        onnx=options.onnx,
        overwrite=options.overwrite,
    )
    print(describe_report(report))
    return 0


def _chunked_output(input_address: str, output_address: str, volume: VolumeOptions, made: str) -> bool:
    """Whether ``output_address`` is a chunked volume (``made`` from a chunked input, on the cluster) or a
    TIFF written in one piece; refuses what does not fit together."""
    if output_kind(output_address) == "volume":
        if not is_volume_address(input_address):
            raise EmUnetError(
                f"{input_address}: a chunked output is {made} from a chunked input "
                "(FILE.h5:/KEY, STORE.zarr/KEY, STORE.ome.zarr); write a TIFF output for a TIFF input"
            )
        return True
    if volume.scheduler or volume.workers:
        raise EmUnetError(
            f"--scheduler and --workers are for chunked outputs (OUT.zarr, OUT.ome.zarr, OUT.h5:/KEY); "
            f"{output_address} is written in one piece"
        )
    return False


def _address(path: str, key: str | None) -> str:
    """An input's address with ``--key`` applied."""
    return str(parse_address(path, key)) if key else path


def cmd_predict(args) -> int:
    options = from_args(PredictConfig, args)
    volume = from_args(VolumeOptions, args)
    params = _segment_params(args)  # checked before the long prediction starts, like every option
    mutex = _mutex_params(args)
    tiling = Tiling.of(options)
    chunked = _chunked_output(options.stack, options.output, volume, "predicted block by block")
    if chunked and options.binary:
        raise EmUnetError("--binary is for TIFF outputs: a chunked output holds the membrane probability")
    if chunked and options.segment:
        raise EmUnetError("--segment with a chunked output: run em-unet segment on the output afterwards")
    if not chunked and options.block:
        raise EmUnetError(f"--block is for chunked outputs; {options.output} is written in one piece")
    if not chunked and options.segment:  # checked before the long prediction starts
        check_segment_outputs(options.segment, options.overwrite)
    if "margin" not in given(args, PredictConfig):  # a bioimage.io package states its own margin: its halo
        tiling = dataclasses.replace(tiling, margin=model_margin(options.model, tiling.margin))
    if chunked:
        if "overlap" not in given(args, PredictConfig):
            tiling = dataclasses.replace(tiling, overlap=CHUNKED_TILING.overlap)  # see --overlap's help
        address = predict_volume(
            options.model,
            options.stack,
            options.output,
            key=volume.key,
            tiling=tiling,
            tta=options.tta,
            isbi=options.isbi,
            block=options.block,
            affinities_address=options.affinities,
            scheduler=volume.scheduler,
            workers=volume.workers,
            overwrite=options.overwrite,
        )
        print(f"wrote {address}")
        return 0
    path = predict_file(
        options.model,
        _address(options.stack, volume.key),
        options.output,
        tiling=tiling,
        tta=options.tta,
        binary=options.binary,
        isbi=options.isbi,
        overwrite=options.overwrite,
        affinities_path=options.affinities,
    )
    print(f"wrote {path}")
    if options.affinities:
        print(f"wrote {options.affinities}")
    if options.segment and options.affinities:  # the affinities, by the mutex watershed
        segments, sidecar = segment_affinity_file(
            options.affinities, options.segment, mutex, overwrite=options.overwrite
        )
        print(f"wrote {segments} (parameters: {sidecar})")
    elif options.segment:
        segments, sidecar = segment_file(path, options.segment, params, overwrite=options.overwrite)
        print(f"wrote {segments} (parameters: {sidecar})")
    return 0


def cmd_segment(args) -> int:
    options = from_args(SegmentOptions, args)
    volume = from_args(VolumeOptions, args)
    params, mutex = _segment_params(args), _mutex_params(args)
    source = _address(options.probability, volume.key)
    affinities = is_affinity_map(source)
    if not affinities and options.offsets:
        raise EmUnetError(f"--offsets is for affinity maps; {source} is a membrane-probability map")
    if _chunked_output(options.probability, options.output, volume, "segmented"):
        address = segment_volume(
            options.probability,
            options.output,
            mutex if affinities else params,
            key=volume.key,
            scheduler=volume.scheduler,
            workers=volume.workers,
            overwrite=options.overwrite,
            offsets=options.affinity_offsets(),
        )
        print(f"wrote {address}")
        return 0
    if affinities:
        segments, sidecar = segment_affinity_file(
            source, options.output, mutex, options.affinity_offsets(), overwrite=options.overwrite
        )
    else:
        segments, sidecar = segment_file(source, options.output, params, overwrite=options.overwrite)
    print(f"wrote {segments} (parameters: {sidecar})")
    return 0


def cmd_evaluate(args) -> int:
    options = from_args(EvaluateOptions, args)
    if options.output:
        check_writable(options.output, options.overwrite)
    scores = evaluate_files(
        options.prediction,
        options.labels,
        options.isbi,
        options.label_convention,
        segments=True if options.segments else None,
    )
    at = "" if scores["kind"] == "segments" else "  at threshold {:.1f}"
    print(
        f"V_rand      {scores['v_rand']:.4f}  (split {scores['v_rand_split']:.4f}, merge {scores['v_rand_merge']:.4f})"
        + at.format(scores.get("v_rand_threshold", 0))
    )
    print(
        f"V_info      {scores['v_info']:.4f}  (split {scores['v_info_split']:.4f}, merge {scores['v_info_merge']:.4f})"
        + at.format(scores.get("v_info_threshold", 0))
    )
    if scores["kind"] != "segments":
        print(f"pixel error {scores['pixel_error']:.4f}" + at.format(scores["pixel_error_threshold"]))
    print(
        f"(means over {scores['slices']} slices, as the ISBI 2012 challenge scores; "
        f"V_rand pooled over slices {scores['v_rand_pooled']:.4f})"
    )
    of = "" if scores["kind"] == "segments" else " (of the thinned map at the V_rand threshold)"
    print(
        f"VOI         split {scores['voi_split']:.4f}, merge {scores['voi_merge']:.4f} nats; "
        f"adapted Rand error {scores['adapted_rand_error']:.4f}{of}"
    )
    print(
        f"segments    {scores['segments']} found, {scores['truth_segments']} in the ground truth: "
        f"{scores['false_merges']} false merges, {scores['false_splits']} false splits "
        f"(overlaps >= {MIN_OVERLAP_PX} px)"
    )
    for kind, joined in (("merges", "ground-truth cells in one segment"), ("splits", "segments in one cell")):
        for row in scores[f"largest_false_{kind}"][:3]:
            print(
                f"  false {kind[:-1]:5s} slice {row['slice']} at (y {row['y']:.0f}, x {row['x']:.0f}): "
                f"{row['segments']} {joined}, {row['pixels']} px off"
            )
    if options.output:
        with atomic_output(options.output, options.overwrite) as tmp:
            tmp.write_text(json.dumps(scores, indent=2))
        print(f"wrote {options.output}")
    return 0


def cmd_study(args) -> int:
    from em_unet.training.study import run_study  # lazy: training loads TensorFlow

    settings = given(args, TrainConfig)
    for name, value in settings.items():  # the TOML supplies the rest; these are checked now, not per variant
        settings[name] = check_value(TrainConfig.field(name), value, TrainConfig)
    options = from_args(StudyOptions, args)
    experiments = (
        [name.strip() for name in options.experiments.split(",") if name.strip()] if options.experiments else None
    )
    report = run_study(
        settings["data"],
        settings["labels"],
        config=options.config,
        experiments=experiments,
        epochs=settings.get("epochs"),
        quick=options.quick,
        logs_dir=settings.get("logs_dir", "logs"),
        report_dir=options.report,
        precision=settings.get("precision"),
        label_convention=settings.get("label_convention", "auto"),
        verbose=_verbosity(),
    )
    for name, verdict in report["verdicts"].items():
        print(f"{name:>14s}: the original conclusion {verdict}")
    print(f"report: {report['report_dir'] / 'report.md'} (figures and summary.csv beside it)")
    print(f"watch the curves: tensorboard --logdir {report['report_dir'].parent}")
    return 0


def cmd_plot(args) -> int:
    from em_unet.reporting.plot import plot_runs  # lazy: matplotlib's import alone takes about 0.5 s

    options = from_args(PlotOptions, args)
    for path in plot_runs(options.folder, options.output):
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error instead of one line",
    )
    parser = Parser(
        prog="em-unet",
        parents=[common],
        description="Train, tune and serve U-Nets that segment neuronal membranes in EM stacks, and "
        "segment neurons from their predictions.",
    )
    parser.add_argument("--version", action="version", version=f"em-unet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, func, help, description, *settings):
        sub = commands.add_parser(name, help=help, description=description, parents=[common])
        sub.set_defaults(uses_tensorflow=name not in TENSORFLOW_FREE)
        for cls, options in settings:
            add_arguments(sub, cls, **options)
        sub.set_defaults(func=func)
        return sub

    command(
        "augment-preview",
        cmd_augment_preview,
        "write a PNG grid of augmented crops with the mask outlined",
        "Write a PNG grid of augmented training crops from a real stack, mask outlined, so you see what training sees.",
        (TrainConfig, {"include": PREVIEW_FIELDS}),
        (PreviewOptions, {}),
    )
    command(
        "train",
        cmd_train,
        "train a U-Net, score it on the validation slices and export it for TF Serving",
        "Train a U-Net on an EM stack; TensorBoard logs and the run's configuration go to logs/<run>/, the "
        "best model (lowest val_loss) is exported to saved_models/<name>/<version>/.",
        (TrainConfig, {}),
    )
    command(
        "tune",
        cmd_tune,
        "KerasTuner search over the settings a search space lists (default: optimizer and learning rate)",
        "Search hyperparameters with KerasTuner; re-running the same command resumes. Trials and TensorBoard "
        "logs go to LOGS_DIR/tune/<project>/, the best model to MODELS_DIR/. Every training flag applies to "
        "each trial; --epochs is each trial's length (Hyperband: the longest), --max-minutes limits the whole "
        "search. --workers N runs the trials in N worker processes on this machine, each replaced by a fresh one "
        "after --recycle-after trials so that memory stays flat.",
        (TrainConfig, {"exclude": TUNE_EXCLUDED}),
        (SearchConfig, {}),
    )
    command(
        "export",
        cmd_export,
        "export a Keras model (e.g. a run's best.keras) as a SavedModel for TF Serving",
        "Export a .keras model as the next version of MODELS_DIR/NAME/, in TF Serving's layout, as train does at "
        "its end: for a run whose export failed, or a best.keras kept from an interrupted run.",
        (ExportOptions, {}),
        (TrainConfig, {"include": EXPORT_FIELDS}),
    )
    command(
        "package",
        cmd_package,
        "write a bioimage.io model package (zip) that Fiji (deepImageJ), ilastik and napari run",
        "Package an exported model (a SavedModel version folder, its parent, or a .keras file) for the bioimage.io "
        "Model Zoo: the SavedModel, Keras and ONNX weights (each checked against the SavedModel), test tensors from "
        "a validation crop, a cover and a README.md written from the run's config.json and scores.json.",
        (PackageOptions, {}),
    )
    command(
        "predict",
        cmd_predict,
        "membrane probabilities of a stack (any slice size) as a float32 TIFF, or of a chunked volume",
        "Predict a stack with overlap-tile prediction and write a TIFF stack that opens in Fiji; or a chunked "
        "volume (HDF5, Zarr, OME-Zarr) block by block on a Dask cluster into a chunked OME-Zarr or HDF5 output "
        "that opens in napari, resuming an interrupted run of the same command.",
        (PredictConfig, {}),
        (VolumeOptions, {}),
        (SegmentParams, {}),
        (MutexParams, {}),
    )
    command(
        "segment",
        cmd_segment,
        "neuron labels from a membrane-probability map (watershed + agglomeration) or affinities (mutex watershed)",
        "Segment a membrane-probability TIFF (from em-unet predict) into one integer label per neuron section: "
        "2-D per slice, labels unique across the stack, written as a uint16 (or uint32) TIFF that opens in "
        "Fiji, with the parameters used in a JSON file beside it. An affinity map (from predict --affinities) "
        "is segmented by the mutex watershed instead, with the mutex-watershed options.",
        (SegmentOptions, {}),
        (VolumeOptions, {}),
        (SegmentParams, {}),
        (MutexParams, {}),
    )
    command(
        "evaluate",
        cmd_evaluate,
        "ISBI 2012 scores (V_rand, V_info, pixel error) of a prediction or of neuron segments",
        "Score a membrane-probability stack against labels as the ISBI 2012 challenge does (Fiji's "
        "foreground-restricted V_rand and V_info after border thinning, best over thresholds 0.0-1.0), or a "
        "label image of neuron segments directly (no threshold, no thinning).",
        (EvaluateOptions, {}),
    )
    command(
        "study",
        cmd_study,
        "rerun the depth / augmentation / learning-rate / optimizer study, with figures and a report",
        "Train every variant of the study's experiments (the built-in seed-study.toml), log each to "
        "LOGS_DIR/study/<experiment>/<variant>/, then write figures, summary.csv and report.md, which judges "
        "each of the original study's conclusions by a stated rule. Re-running resumes: finished variants are "
        "kept, and the report is redrawn from the logs.",
        (
            TrainConfig,
            {
                "include": STUDY_FIELDS,
                "notes": {"epochs": "from the TOML, 40", "precision": "from the TOML, else auto"},
            },
        ),
        (StudyOptions, {}),
    )
    command(
        "plot",
        cmd_plot,
        "redraw loss-curve figures from recorded runs, without training",
        "Redraw training (solid) and validation (dashed) loss curves from history.csv or TensorBoard event "
        "files: one figure per folder of runs (per experiment for a study) and an overview.",
        (PlotOptions, {}),
    )
    return parser


def describe_error(err: BaseException) -> tuple[str, int]:
    """One line for an error, and the exit status: 2 for refused input and I/O failures, 1 for the unexpected."""
    if isinstance(err, EmUnetError):
        return str(err), getattr(err, "exit_status", 2)
    if isinstance(err, OSError):
        where = err.filename or ""
        cause = err.strerror or str(err)
        return (f"{where}: {cause}" if where else cause), 2
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    tf = sys.modules.get("tensorflow")  # only a command that loaded TensorFlow can run out of its memory
    if tf is not None and isinstance(err, tf.errors.ResourceExhaustedError):
        return f"out of memory ({first[:200]}): lower --batch-size, --patch-size or --tile-batch", 2
    return (
        f"{type(err).__name__}: {first[:300]} (unexpected: run with --debug for the traceback, and please report it)",
        1,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in argv if not word.startswith("-")), None)
    if command is not None and command not in TENSORFLOW_FREE:
        import_tensorflow_quietly()  # before parsing: the training flags' choices come from Keras registries
    args = build_parser().parse_args(argv)
    try:
        if args.uses_tensorflow:
            import_tensorflow_quietly()
        return args.func(args)
    except KeyboardInterrupt as err:
        print("; ".join(["em-unet: interrupted", *getattr(err, "__notes__", [])]), file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output left (e.g. `em-unet evaluate ... | head`): no more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail
        return 141
    except Exception as err:
        if getattr(args, "debug", False):
            raise
        message, status = describe_error(err)
        print("; ".join([f"em-unet: error: {message}", *getattr(err, "__notes__", [])]), file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
