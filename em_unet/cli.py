"""The ``em-unet`` command: parse arguments, call one library function, report errors in one line."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from em_unet import __version__  # noqa: E402
from em_unet.errors import EmUnetError  # noqa: E402


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="STACK",
                        help="EM image stack: multi-page TIFF, 2-D TIFF, or folder of per-slice TIFF/PNG files")
    parser.add_argument("--labels", required=True, metavar="STACK",
                        help="label stack of the same shape (ISBI 0 = membrane / 255 = interior, or a 0/1 membrane mask)")
    parser.add_argument("--label-convention", choices=("auto", "isbi", "mask"), default="auto",
                        help="how to read the labels (default: auto, from the values found)")


def add_augment_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("augmentation")
    group.add_argument("--elastic-sigma", type=float, default=10.0, metavar="PX",
                       help="std. dev. of control-point displacements, pixels (default 10; 0 turns elastic off)")
    group.add_argument("--elastic-points", type=int, default=3, metavar="N",
                       help="control points per side of the elastic grid (default 3)")
    group.add_argument("--elastic-backend", choices=("tensorflow", "elasticdeform"), default="tensorflow",
                       help="tensorflow: in-graph ops (GPU-capable, default); elasticdeform: the host-side reference op")
    group.add_argument("--rotation", type=float, default=180.0, metavar="DEG",
                       help="rotations drawn from +-DEG degrees (default 180)")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--val-slices", metavar="FIRST-LAST",
                       help="contiguous validation slices, e.g. 15-19 (default: the last quarter)")
    group.add_argument("--val-fraction", type=float, help="fraction of slices taken from the end for validation")
    group.add_argument("--depth", type=int, default=4, help="contracting levels of the U-Net (default 4)")
    group.add_argument("--base-filters", type=int, default=16, help="filters of the first level (default 16)")
    group.add_argument("--batch-norm", action="store_true", help="batch normalisation after each convolution")
    group.add_argument("--patch-size", type=int, default=256, metavar="PX", help="training crop side (default 256)")
    group.add_argument("--batch-size", type=int, default=4, help="crops per batch (default 4)")
    group.add_argument("--epochs", type=int, default=40, help="epochs (default 40)")
    group.add_argument("--steps-per-epoch", type=int, help="batches per epoch (default: the training area once)")
    group.add_argument("--optimizer", choices=("sgd", "adam", "adamax"), default="adam", help="default adam")
    group.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4)")
    group.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                       help="cosine: 2 %% linear warm-up to --lr, then cosine decay to 1 %% of it at the last epoch "
                            "of --epochs (default constant)")
    group.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0: plain SGD)")
    group.add_argument("--loss", choices=("bce", "dice", "bce_dice", "weighted_bce"), default="bce",
                       help="weighted_bce: the U-Net paper's border-weighted cross-entropy (default bce)")
    group.add_argument("--no-augment", action="store_true", help="train on raw crops")
    group.add_argument("--augment-placement", choices=("auto", "pipeline", "step"), default="auto",
                       help="augment in the tf.data pipeline or the training step (auto: step on GPU)")
    group.add_argument("--precision", choices=("auto", "float32", "mixed_bfloat16", "mixed_float16"),
                       default="auto", help="auto: bfloat16 where the CPU/GPU supports it, else float32")
    group.add_argument("--strategy", choices=("auto", "one-device", "mirrored", "multi-worker"), default="auto",
                       help="tf.distribute strategy: mirrored = all local GPUs; multi-worker = the cluster in "
                            "TF_CONFIG (auto: multi-worker if TF_CONFIG names several tasks, mirrored on several "
                            "GPUs, else one device). --batch-size is the global batch")
    group.add_argument("--early-stopping", type=int, default=0, metavar="EPOCHS",
                       help="stop after this many epochs without val_loss improvement (default 0: off)")
    group.add_argument("--max-minutes", type=float, metavar="MIN",
                       help="stop before an epoch would end past this wall time (default: no limit)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--run-name", help="name of the run folder under --logs-dir (default: train-<time>)")
    group.add_argument("--logs-dir", default="logs", help="default: logs")
    group.add_argument("--models-dir", default="saved_models", help="default: saved_models")
    group.add_argument("--model-name", default="em_unet", help="exported as MODELS_DIR/NAME/<version> (default em_unet)")


def augment_config_from_args(args):
    from em_unet.train import TrainConfig

    return TrainConfig(data=args.data, labels=args.labels, elastic_backend=args.elastic_backend,
                       elastic_sigma_px=args.elastic_sigma, elastic_points=args.elastic_points,
                       rotation_degrees=args.rotation).augment_config()


def cmd_augment_preview(args) -> int:
    from em_unet.preview import augment_preview

    path = augment_preview(
        args.data, args.labels, args.output, n_samples=args.samples, patch_size=args.patch_size,
        seed=args.seed, config=augment_config_from_args(args), label_convention=args.label_convention,
        overwrite=args.overwrite,
    )
    print(f"wrote {path}")
    return 0


def train_config_from_args(args):
    from em_unet.data import parse_slice_range
    from em_unet.train import TrainConfig

    return TrainConfig(
        data=args.data, labels=args.labels, label_convention=args.label_convention,
        val_slices=parse_slice_range(args.val_slices) if args.val_slices else None, val_fraction=args.val_fraction,
        depth=args.depth, base_filters=args.base_filters, batch_norm=args.batch_norm, patch_size=args.patch_size,
        batch_size=args.batch_size, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        optimizer=args.optimizer, learning_rate=args.lr, lr_schedule=args.lr_schedule, momentum=args.momentum,
        loss=args.loss,
        augment=not args.no_augment, augment_placement=args.augment_placement,
        elastic_backend=args.elastic_backend, elastic_sigma_px=args.elastic_sigma,
        elastic_points=args.elastic_points, rotation_degrees=args.rotation, precision=args.precision, strategy=args.strategy,
        early_stopping=args.early_stopping,
        max_minutes=args.max_minutes,
        seed=args.seed, run_name=args.run_name, logs_dir=args.logs_dir, models_dir=args.models_dir,
        model_name=args.model_name,
    )


def cmd_train(args) -> int:
    from em_unet.train import train

    result = train(train_config_from_args(args), verbose=1 if sys.stdout.isatty() else 2)
    if result["run_dir"] is None:
        print("worker done: the chief writes the logs, the best model and the export")
        return 0
    scores = result["scores"]
    print(f"validation: V_rand {scores['v_rand']:.4f}, V_info {scores['v_info']:.4f}, "
          f"pixel error {scores['pixel_error']:.4f}")
    print(f"run folder (config, history, TensorBoard logs): {result['run_dir']}")
    print(f"best model: {result['best_model']}")
    print(f"SavedModel for TF Serving: {result['export_dir']}")
    print(f"watch it: tensorboard --logdir {args.logs_dir}")
    return 0


def cmd_tune(args) -> int:
    from em_unet.tune import tune

    result = tune(train_config_from_args(args), search_space=args.search_space, algorithm=args.tuner,
                  max_trials=args.max_trials, max_epochs=args.max_epochs, project=args.project,
                  overwrite=args.overwrite, verbose=1 if sys.stdout.isatty() else 2, tuner_id=args.tuner_id,
                  oracle_ip=args.oracle_ip, oracle_port=args.oracle_port, worker_timeout_s=args.worker_timeout)
    if result["role"] == "worker":
        print(f"worker done: no trial left; the chief writes {result['run_dir'] / 'results.csv'} and exports")
        return 0
    columns = list(dict.fromkeys(key for row in result["rows"] for key in row))
    print("  ".join(f"{c:>14s}" for c in columns))
    for row in result["rows"]:
        print("  ".join(f"{row.get(c, ''):>14.4g}" if isinstance(row.get(c), float) else f"{str(row.get(c, '')):>14s}"
                        for c in columns))
    print(f"best hyperparameters: {result['best_hyperparameters']}")
    print(f"results table: {result['run_dir'] / 'results.csv'}")
    print(f"SavedModel for TF Serving: {result['export_dir']}")
    print(f"watch it: tensorboard --logdir {args.logs_dir}")
    return 0


def segment_params_from_args(args):
    from em_unet.segment import SegmentParams

    return SegmentParams(sigma_px=args.sigma, seed_threshold=args.seed_threshold,
                         merge_threshold=args.merge_threshold)


def add_segment_args(parser: argparse.ArgumentParser) -> None:
    from em_unet.segment import SegmentParams

    defaults = SegmentParams()
    group = parser.add_argument_group("segmentation (seeded watershed + agglomeration; defaults measured on "
                                      "ISBI 2012 slices 15-19)")
    group.add_argument("--sigma", type=float, default=defaults.sigma_px, metavar="PX",
                       help="Gaussian smoothing of the membrane probability before seeding, pixels "
                            "(default %(default)s)")
    group.add_argument("--seed-threshold", type=float, default=defaults.seed_threshold, metavar="P",
                       help="seeds are regions whose smoothed membrane probability is below P (default %(default)s)")
    group.add_argument("--merge-threshold", type=float, default=defaults.merge_threshold, metavar="P",
                       help="merge neighbouring regions while the mean membrane probability on their shared "
                            "boundary is below P; 0 merges nothing (default %(default)s)")


def cmd_predict(args) -> int:
    from em_unet.predict import predict_file

    params = None
    if args.segment:  # checked before the long prediction starts
        from em_unet.segment import check_segment_outputs, segment_file

        params = segment_params_from_args(args)
        if args.binary or args.isbi:
            raise EmUnetError("--segment needs the membrane probability: leave out --binary and --isbi")
        check_segment_outputs(args.segment, args.overwrite)
    path = predict_file(args.model, args.stack, args.output, tile=args.tile, margin=args.margin,
                        overlap=args.overlap, tile_batch=args.tile_batch, tta=args.tta, binary=args.binary,
                        isbi=args.isbi, overwrite=args.overwrite)
    print(f"wrote {path}")
    if params is not None:
        segments, sidecar = segment_file(path, args.segment, params, overwrite=args.overwrite)
        print(f"wrote {segments} (parameters: {sidecar})")
    return 0


def cmd_segment(args) -> int:
    from em_unet.segment import segment_file

    segments, sidecar = segment_file(args.probability, args.output, segment_params_from_args(args),
                                     overwrite=args.overwrite)
    print(f"wrote {segments} (parameters: {sidecar})")
    return 0


def cmd_evaluate(args) -> int:
    import json

    from em_unet.metrics import evaluate_files
    from em_unet.outputs import atomic_output, check_writable

    if args.output:
        check_writable(args.output, args.overwrite)
    scores = evaluate_files(args.prediction, args.labels, args.isbi, args.label_convention,
                            segments=True if args.segments else None)
    if scores["kind"] == "segments":
        print(f"V_rand      {scores['v_rand']:.4f}  (split {scores['v_rand_split']:.4f}, "
              f"merge {scores['v_rand_merge']:.4f})")
        print(f"V_info      {scores['v_info']:.4f}  (split {scores['v_info_split']:.4f}, "
              f"merge {scores['v_info_merge']:.4f})")
    else:
        print(f"V_rand      {scores['v_rand']:.4f}  (threshold {scores['v_rand_threshold']:.1f})")
        print(f"V_info      {scores['v_info']:.4f}  (threshold {scores['v_info_threshold']:.1f})")
        print(f"pixel error {scores['pixel_error']:.4f}  (threshold {scores['pixel_error_threshold']:.1f})")
    if args.output:
        with atomic_output(args.output, args.overwrite) as tmp:
            tmp.write_text(json.dumps(scores, indent=2))
        print(f"wrote {args.output}")
    return 0


def cmd_study(args) -> int:
    from em_unet.study import run_study

    experiments = [name.strip() for name in args.experiments.split(",") if name.strip()] if args.experiments else None
    report = run_study(args.data, args.labels, config=args.config, experiments=experiments, epochs=args.epochs,
                       quick=args.quick, logs_dir=args.logs_dir, report_dir=args.report, precision=args.precision,
                       label_convention=args.label_convention, verbose=1 if sys.stdout.isatty() else 2)
    for name, verdict in report["verdicts"].items():
        print(f"{name:>14s}: the original conclusion {verdict}")
    print(f"report: {report['report_dir'] / 'report.md'} (figures and summary.csv beside it)")
    print(f"watch the curves: tensorboard --logdir {report['report_dir'].parent}")
    return 0


def cmd_plot(args) -> int:
    from em_unet.plot import plot_runs

    for path in plot_runs(args.folder, args.output):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="em-unet",
        description="Train, tune and serve U-Nets that segment neuronal membranes in EM stacks.",
    )
    parser.add_argument("--version", action="version", version=f"em-unet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    preview = commands.add_parser(
        "augment-preview", help="write a PNG grid of augmented crops with the mask outlined",
        description="Write a PNG grid of augmented training crops from a real stack, mask outlined, "
                    "so you see what training sees.",
    )
    add_data_args(preview)
    preview.add_argument("-o", "--output", default="augment-preview.png", help="PNG to write (default: %(default)s)")
    preview.add_argument("--samples", type=int, default=6, help="rows of the grid (default 6)")
    preview.add_argument("--patch-size", type=int, default=256, metavar="PX", help="crop side in pixels (default 256)")
    preview.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    preview.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_augment_args(preview)
    preview.set_defaults(func=cmd_augment_preview)

    train = commands.add_parser(
        "train", help="train a U-Net, score it on the validation slices and export it for TF Serving",
        description="Train a U-Net on an EM stack; TensorBoard logs and the run's configuration go to "
                    "logs/<run>/, the best model (lowest val_loss) is exported to saved_models/<name>/<version>/.",
    )
    add_data_args(train)
    add_training_args(train)
    add_augment_args(train)
    train.set_defaults(func=cmd_train)

    tune = commands.add_parser(
        "tune", help="KerasTuner search over optimizer, learning rate (and depth, augmentation)",
        description="Search hyperparameters with KerasTuner; re-running the same command resumes. "
                    "Trials and TensorBoard logs go to logs/tune/<project>/, the best model to saved_models/.",
    )
    add_data_args(tune)
    add_training_args(tune)
    add_augment_args(tune)
    tune.add_argument("--search-space", metavar="TOML", help="search space file (default: tuning/default.toml)")
    tune.add_argument("--tuner", choices=("hyperband", "bayesian", "random", "grid"),
                      help="search algorithm (default: from the TOML, hyperband)")
    tune.add_argument("--max-trials", type=int, help="trials for bayesian/random/grid (default: from the TOML)")
    tune.add_argument("--max-epochs", type=int, help="epochs of the longest trial (default: from the TOML)")
    tune.add_argument("--project", default="default", help="name of the search under logs/tune/ (default: default)")
    tune.add_argument("--overwrite", action="store_true", help="start the search anew instead of resuming")
    distributed = tune.add_argument_group(
        "distributed tuning (KerasTuner chief and workers; default: the KERASTUNER_* variables, else one process)")
    distributed.add_argument("--tuner-id", help="'chief' serves the oracle; any other id (tuner0, tuner1, ...) "
                                                "is a worker that runs trials (KERASTUNER_TUNER_ID)")
    distributed.add_argument("--oracle-ip", help="address of the chief (KERASTUNER_ORACLE_IP)")
    distributed.add_argument("--oracle-port", type=int, help="port of the chief (KERASTUNER_ORACLE_PORT)")
    distributed.add_argument("--worker-timeout", type=float, default=120.0, metavar="SEC",
                             help="chief: a worker silent this long loses its trial to the others (default 120)")
    tune.set_defaults(func=cmd_tune)

    predict = commands.add_parser(
        "predict", help="membrane probabilities of a stack (any slice size) as a float32 TIFF",
        description="Predict a stack with overlap-tile prediction and write a TIFF stack that opens in Fiji.",
    )
    predict.add_argument("model", help="SavedModel folder (a version, or its parent: newest version) or .keras file")
    predict.add_argument("stack", help="EM stack to segment")
    predict.add_argument("-o", "--output", required=True, help="TIFF to write")
    predict.add_argument("--tile", type=int, metavar="PX",
                         help="tile side in pixels, a multiple of 2**depth (default: the whole slice plus margins, "
                              "up to 1024 px a side; larger slices are tiled)")
    predict.add_argument("--margin", type=int, default=32, metavar="PX",
                         help="context border of each tile, not used for output (default 32)")
    predict.add_argument("--overlap", type=int, default=16, metavar="PX",
                         help="pixels over which neighbouring tiles are blended (default 16)")
    predict.add_argument("--tile-batch", type=int, default=4, metavar="N", help="tiles per forward pass (default 4)")
    predict.add_argument("--tta", action="store_true", help="average the 8 flips/rotations (8x slower)")
    predict.add_argument("--binary", action="store_true", help="write uint8 0/255 thresholded at 0.5")
    predict.add_argument("--isbi", action="store_true",
                         help="ISBI 2012 submission convention: 1 (or 255) = cell interior")
    predict.add_argument("--segment", metavar="SEGMENTS.tif",
                         help="also segment the prediction into neurons and write the labels here "
                              "(as em-unet segment does, with the segmentation options below)")
    predict.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_segment_args(predict)
    predict.set_defaults(func=cmd_predict)

    segment = commands.add_parser(
        "segment", help="neuron labels from a membrane-probability map (watershed + agglomeration)",
        description="Segment a membrane-probability TIFF (from em-unet predict) into one integer label per neuron "
                    "section: 2-D per slice, labels unique across the stack, written as a uint16 (or uint32) TIFF "
                    "that opens in Fiji, with the parameters used in a JSON file beside it.",
    )
    segment.add_argument("probability", help="membrane-probability TIFF stack: float in [0, 1], or 8/16-bit")
    segment.add_argument("-o", "--output", required=True, metavar="SEGMENTS.tif", help="label TIFF to write")
    segment.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_segment_args(segment)
    segment.set_defaults(func=cmd_segment)

    evaluate = commands.add_parser(
        "evaluate", help="ISBI 2012 scores (V_rand, V_info, pixel error) of a prediction or of neuron segments",
        description="Score a membrane-probability stack against labels as the ISBI 2012 challenge does (Fiji's "
                    "foreground-restricted V_rand and V_info after border thinning, best over thresholds 0.0-1.0), "
                    "or a label image of neuron segments directly (no threshold, no thinning).",
    )
    evaluate.add_argument("prediction", help="membrane-probability TIFF stack (from em-unet predict), or a label "
                                             "image (from em-unet segment, or any with --segments)")
    evaluate.add_argument("labels", help="label stack of the same shape")
    evaluate.add_argument("--isbi", action="store_true", help="the prediction is in the ISBI convention (1 = cell)")
    evaluate.add_argument("--segments", action="store_true",
                          help="score PREDICTION as a label image (0 = boundary, 1, 2, ... = segments); automatic "
                               "for em-unet segment's TIFFs and 32/64-bit integer images")
    evaluate.add_argument("--label-convention", choices=("auto", "isbi", "mask"), default="auto")
    evaluate.add_argument("-o", "--output", help="JSON file to write the scores to")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    evaluate.set_defaults(func=cmd_evaluate)
    study = commands.add_parser(
        "study", help="rerun the depth / augmentation / learning-rate / optimizer study, with figures and a report",
        description="Train every variant of the study's experiments (tuning/seed-study.toml), log each to "
                    "logs/study/<experiment>/<variant>/, then write figures, summary.csv and report.md, which judges "
                    "each of the original study's conclusions by a stated rule. Re-running resumes: finished "
                    "variants are kept, and the report is redrawn from the logs.",
    )
    add_data_args(study)
    study.add_argument("--config", metavar="TOML", help="study definition (default: tuning/seed-study.toml)")
    study.add_argument("--experiments", metavar="A,B", help="comma-separated experiments to run (default: all; "
                                                            "the seed study has depth,augmentation,lr,optimizer)")
    study.add_argument("--epochs", type=int, help="epochs per variant (default: from the TOML, 40)")
    study.add_argument("--quick", action="store_true",
                       help="smoke test: the TOML's [quick] settings (tiny model, 2 epochs, 2 slices), logged to "
                            "logs/study-quick/")
    study.add_argument("--precision", choices=("auto", "float32", "mixed_bfloat16", "mixed_float16"),
                       help="default: from the TOML, else auto")
    study.add_argument("--logs-dir", default="logs", help="default: logs")
    study.add_argument("--report", metavar="DIR", help="report folder (default: LOGS_DIR/study/report)")
    study.set_defaults(func=cmd_study)

    plot = commands.add_parser(
        "plot", help="redraw loss-curve figures from recorded runs, without training",
        description="Redraw training (solid) and validation (dashed) loss curves from history.csv or TensorBoard "
                    "event files: one figure per folder of runs (per experiment for a study) and an overview.",
    )
    plot.add_argument("folder", help="a run folder (logs/<run>) or a folder of runs (logs/study)")
    plot.add_argument("-o", "--output", metavar="DIR", help="where the PNGs go (default: FOLDER/report)")
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EmUnetError as err:
        print(f"em-unet: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("em-unet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
