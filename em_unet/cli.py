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


def augment_config_from_args(args):
    from em_unet.augment import AugmentConfig

    return AugmentConfig(
        rotation_degrees=args.rotation,
        elastic=args.elastic_sigma > 0,
        elastic_sigma_px=args.elastic_sigma,
        elastic_points=args.elastic_points,
        elastic_backend=args.elastic_backend,
    )


def cmd_augment_preview(args) -> int:
    from em_unet.preview import augment_preview

    path = augment_preview(
        args.data, args.labels, args.output, n_samples=args.samples, patch_size=args.patch_size,
        seed=args.seed, config=augment_config_from_args(args), label_convention=args.label_convention,
        overwrite=args.overwrite,
    )
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
