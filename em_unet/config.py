"""em-unet's settings: every setting of every command declared once (its default, valid values and help
text), and the checks between settings.

Each command's settings are a dataclass whose fields are declared with :func:`~em_unet.settings.setting`;
:mod:`em_unet.settings` derives from them the checks, the flags and ``--help``, the reading and writing of
``config.json`` and of the study and search-space TOML files, and the README's flag tables
(``python -m em_unet.config`` prints them; a test keeps the README equal to them).

The settings stay one flat namespace per command, grouped (data, model, optimisation, augmentation,
runtime, outputs) only for ``--help`` and the README, so a study TOML or ``config.json`` names a setting
exactly as the flag does, with underscores.

A choice list that a module implements comes from that module's registry (a loss is one entry in
:mod:`em_unet.training.losses`). This module imports nothing heavy: the registries that import TensorFlow
are read only when their names are first needed (:class:`~em_unet.settings.RegistryNames`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from em_unet.errors import ConfigError
from em_unet.io.stacks import LABEL_CONVENTIONS
from em_unet.machine import PRECISIONS
from em_unet.segmentation.offsets import DEFAULT_OFFSETS, Offsets, check_offsets, offsets_text, parse_offsets
from em_unet.settings import (
    RegistryNames,
    Settings,
    describe,
    flag_of,
    flags_markdown,
    parse_slice_range,
    setting,
)

# ---------------------------------------------------------------- the choice lists

# From the registries of the modules that implement them: adding a loss, an optimizer, a schedule, an elastic
# backend or a strategy is one entry there. Those modules import TensorFlow, so their names are read only when
# a value is checked against them or they are listed (an error, --help, the README's tables): declaring these
# settings or building a command's parser imports none of them.
OPTIMIZERS = RegistryNames("em_unet.training.optimizers", "OPTIMIZERS")
LR_SCHEDULES = RegistryNames("em_unet.training.optimizers", "LR_SCHEDULES")
LOSSES = RegistryNames("em_unet.training.losses", "LOSSES")
ELASTIC_BACKENDS = RegistryNames("em_unet.training.augment", "ELASTIC_BACKENDS")
AUGMENT_PLACEMENTS = RegistryNames("em_unet.training.augment", "PLACEMENTS")
STRATEGIES = RegistryNames("em_unet.training.distribute", "STRATEGIES", first=("auto",))
# PRECISIONS comes from em_unet.machine (imported above: it imports TensorFlow only to resolve "auto").
# Declared here and imported by the modules that act on them (io.stacks, inference.export, training.tune):
EXPORT_PRECISIONS = RegistryNames("em_unet.inference.export", "EXPORT_PRECISIONS")
TARGETS = ("boundary", "affinities")
MODELS = ("unet", "unet3d")
ALGORITHMS = ("hyperband", "bayesian", "random", "grid")
OBJECTIVES = ("val_loss", "loss")
SAMPLINGS = ("linear", "log")


def shipped_toml(name: str) -> str:
    """The text of a TOML file that ships inside the package (``em_unet.tuning``: the top-level ``tuning/``)."""
    return resources.files("em_unet.tuning").joinpath(name).read_text(encoding="utf-8")


# ---------------------------------------------------------------- training


@dataclass
class TrainConfig(Settings):
    """Everything a training run depends on; written to ``<run dir>/config.json``.

    Sizes in pixels; slice ranges inclusive (first, last). The defaults are the preset chosen by
    measurement on ISBI 2012 (README, "Quality"): 16 base filters and Adam 3e-4 beat 32 filters at
    the same wall time, because they train about 3x as many epochs in it; a constant 3e-4 beat
    cosine decay from 3e-4 and from 1e-3 at 95 epochs.
    """

    data: str = setting(
        help="EM image stack: multi-page TIFF, 2-D TIFF, folder of per-slice TIFF/PNG files, or a chunked volume "
        "(FILE.h5:/KEY, STORE.zarr/KEY, STORE.ome.zarr)",
        group="data",
        metavar="STACK",
    )
    labels: str = setting(
        help="label stack of the same shape and kind (ISBI 0 = membrane / 255 = interior, or a 0/1 membrane mask)",
        group="data",
        metavar="STACK",
    )
    label_convention: str = setting(
        "auto", "how to read the labels; auto: from the values found", group="data", choices=LABEL_CONVENTIONS
    )
    val_slices: tuple[int, int] | None = setting(
        None,
        "contiguous validation slices, inclusive",
        group="data",
        metavar="FIRST-LAST",
        parse=parse_slice_range,
        default_text="the last quarter of the slices",
    )
    val_fraction: float | None = setting(
        None,
        "fraction of the slices taken from the end for validation",
        group="data",
        above=0.0,
        below=1.0,
        metavar="F",
        default_text="0.25 unless --val-slices is given",
    )
    slices: tuple[int, int] | None = setting(
        None,
        "use only these slices of the stack (training and validation)",
        group="data",
        metavar="FIRST-LAST",
        parse=parse_slice_range,
        default_text="all",
    )
    depth: int = setting(4, "contracting levels of the U-Net", group="model", minimum=1, maximum=8)
    base_filters: int = setting(
        16, "filters of the first level; they double per level", group="model", minimum=1, maximum=1024
    )
    batch_norm: bool = setting(False, "batch normalisation after each convolution", group="model")
    patch_size: int = setting(
        256, "training crop side, pixels (a multiple of 2**depth)", group="optimisation", minimum=2, metavar="PX"
    )
    batch_size: int = setting(
        4, "crops per batch (the global batch, split across replicas)", group="optimisation", minimum=1
    )
    epochs: int = setting(
        40, "epochs (for tune: of each trial; Hyperband's longest trial)", group="optimisation", minimum=1
    )
    steps_per_epoch: int | None = setting(
        None, "batches per epoch", group="optimisation", minimum=1, default_text="the training slices' area once"
    )
    optimizer: str = setting("adam", "optimizer", group="optimisation", choices=OPTIMIZERS)
    learning_rate: float = setting(3e-4, "learning rate", flag="--lr", group="optimisation", above=0.0, maximum=10.0)
    lr_schedule: str = setting(
        "constant",
        "cosine: 2 % linear warm-up to --lr, then cosine decay to 1 % of it at the last epoch",
        group="optimisation",
        choices=LR_SCHEDULES,
    )
    momentum: float = setting(0.0, "SGD momentum (0: plain SGD)", group="optimisation", minimum=0.0, below=1.0)
    loss: str = setting(
        "bce", "weighted_bce: the U-Net paper's border-weighted cross-entropy", group="optimisation", choices=LOSSES
    )
    model: str = setting(
        "unet",
        "unet: the 2-D U-Net (with --z-context K: 2.5-D, the K sections around the one predicted as its input "
        "channels); unet3d: an anisotropic 3-D U-Net that predicts every section of K-section z-patches, with "
        "(1,3,3) kernels and (1,2,2) pooling until the voxel is about isotropic (--voxel-size)",
        group="model",
        choices=MODELS,
    )
    z_context: int = setting(
        1,
        "sections in z the U-Net sees: for unet an odd K (1: one section, 2-D); for unet3d the z-patch, a multiple "
        "of 2 per z-pooling. Context is mirrored at the ends of the stack and of the training and validation blocks",
        group="model",
        minimum=1,
        maximum=64,
        metavar="K",
    )
    voxel_size: str | None = setting(
        None,
        "voxel size Z,Y,X in nm, for unet3d's anisotropy (ISBI 2012: 50,4,4)",
        group="model",
        metavar="Z,Y,X",
        default_text="an OME-Zarr input's metadata; else required by unet3d",
    )
    target: str = setting(
        "boundary",
        "what the U-Net learns: boundary = the membrane probability; affinities = also, for each pixel and "
        "each of --offsets, whether it is in the same cell as the pixel at that offset (for em-unet segment's "
        "mutex watershed)",
        group="model",
        choices=TARGETS,
    )
    offsets: str = setting(
        offsets_text(DEFAULT_OFFSETS),
        "affinity offsets, pairs DY,DX of pixels separated by spaces (with --target affinities); the default is "
        "the mutex-watershed paper's ISBI set: nearest neighbours, 9 px in eight directions, 27 px along the axes",
        group="model",
        metavar="DY,DX ...",
    )
    ema: float = setting(
        0.0,
        "weight averaging: validate, keep and export the exponential moving average of the weights with this "
        "momentum per step (Keras' use_ema; 0: off; 0.999 averages about the last 1000 steps)",
        group="optimisation",
        minimum=0.0,
        below=1.0,
        metavar="M",
    )
    early_stopping: int = setting(
        0,
        "stop after this many epochs without val_loss improvement, rounded up to whole --val-every "
        "periods (0: off; for tune: per trial)",
        group="optimisation",
        minimum=0,
        metavar="EPOCHS",
    )
    val_every: int = setting(
        4,
        "validate every N epochs, and always after the first and the last; best.keras and "
        "--early-stopping see the validated epochs (a validation costs about a quarter of a training epoch "
        "at the defaults)",
        group="optimisation",
        minimum=1,
        maximum=10000,
        metavar="N",
    )
    max_minutes: float | None = setting(
        None,
        "stop before an epoch would end past this wall time, minutes (for "
        "tune: no trial starts after it and the running one stops)",
        group="optimisation",
        above=0.0,
        metavar="MIN",
        default_text="no limit",
    )
    seed: int = setting(
        0,
        "random seed: the same seed gives the same crops, augmentations and initial weights "
        "(and for tune the same trials)",
        group="optimisation",
        minimum=0,
    )
    augment: bool = setting(True, "augment the training crops (off: train on raw crops)", group="augmentation")
    augment_placement: str = setting(
        "auto",
        "augment in the tf.data pipeline or the training step (auto: step on GPU)",
        group="augmentation",
        choices=AUGMENT_PLACEMENTS,
    )
    elastic_backend: str = setting(
        "tensorflow",
        "tensorflow: in-graph ops (GPU-capable); elasticdeform: the host-side reference op",
        group="augmentation",
        choices=ELASTIC_BACKENDS,
    )
    elastic_sigma_px: float = setting(
        10.0,
        "std. dev. of control-point displacements, pixels (0 turns elastic deformation off)",
        flag="--elastic-sigma",
        group="augmentation",
        minimum=0.0,
        maximum=100.0,
        metavar="PX",
    )
    elastic_points: int = setting(
        3, "control points per side of the elastic grid", group="augmentation", minimum=2, maximum=64, metavar="N"
    )
    rotation_degrees: float = setting(
        180.0,
        "rotations drawn from +-DEG degrees",
        flag="--rotation",
        group="augmentation",
        minimum=0.0,
        maximum=180.0,
        metavar="DEG",
    )
    z_flips: bool = setting(
        True,
        "with --z-context: reverse the sections' order in half the crops",
        group="augmentation",
    )
    missing_sections: float = setting(
        0.05,
        "with --z-context: probability that a crop has one section blanked (0, as a lost section), 0 = off",
        group="augmentation",
        minimum=0.0,
        maximum=1.0,
        metavar="P",
    )
    misaligned_sections: float = setting(
        0.1,
        "with --z-context: probability that the sections past a random cut are shifted as one slab by up to "
        "--misalign-px (a registration error), 0 = off",
        group="augmentation",
        minimum=0.0,
        maximum=1.0,
        metavar="P",
    )
    misalign_px: float = setting(
        8.0,
        "largest shift of a misaligned slab, pixels",
        group="augmentation",
        minimum=0.0,
        maximum=256.0,
        metavar="PX",
    )
    section_jitter: float = setting(
        0.05,
        "with --z-context: each section's own brightness shift (+-J) and contrast factor (1 +- 2J), 0 = off",
        group="augmentation",
        minimum=0.0,
        maximum=0.5,
        metavar="J",
    )
    precision: str = setting(
        "auto", "auto: bfloat16 where the CPU/GPU supports it, else float32", group="runtime", choices=PRECISIONS
    )
    strategy: str = setting(
        "auto",
        "tf.distribute strategy: mirrored = all local GPUs; multi-worker = the cluster "
        "in TF_CONFIG (auto: multi-worker if TF_CONFIG names several tasks, mirrored "
        "on several GPUs, else one device)",
        group="runtime",
        choices=STRATEGIES,
    )
    run_name: str | None = setting(
        None, "name of the run folder under --logs-dir", group="outputs", default_text="train-<time>"
    )
    resume: str | None = setting(
        None,
        "continue an interrupted run from the backup in its folder: RUN is that folder (or its name in "
        "--logs-dir); --resume alone (or 'last') takes the newest unfinished run in --logs-dir (the one "
        "--run-name names, if given); the other settings must be the run's own",
        group="outputs",
        metavar="RUN",
        default_text="a new run",
        bare="last",
    )
    logs_dir: str = setting(
        "logs", "where run folders (config, history, TensorBoard logs) go", group="outputs", metavar="DIR"
    )
    models_dir: str = setting("saved_models", "where SavedModels for TF Serving go", group="outputs", metavar="DIR")
    model_name: str = setting("em_unet", "exported as MODELS_DIR/NAME/<version>", group="outputs", metavar="NAME")
    export_precision: str = setting(
        "float32",
        "float32: the exported SavedModel computes in float32 whatever the "
        "training precision (fast on every CPU/GPU TF Serving runs on); "
        "trained: keep the training precision",
        group="outputs",
        choices=EXPORT_PRECISIONS,
    )
    package: str | None = setting(
        None,
        "also package the export at the end as a bioimage.io model (as em-unet package does, documented from "
        "this run), for Fiji (deepImageJ), ilastik and napari",
        group="outputs",
        metavar="NAME.zip",
        default_text="none",
    )

    def check(self) -> None:
        if self.val_slices is not None and self.val_fraction is not None:
            raise ConfigError("--val-slices and --val-fraction both given: give one of them")
        step = 2**self.depth
        if self.patch_size % step:
            lower, upper = max(step, self.patch_size // step * step), -(-self.patch_size // step) * step
            raise ConfigError(
                f"--patch-size {self.patch_size}: must be a multiple of 2**depth = {step} px at "
                f"--depth {self.depth} (nearest: {lower} or {upper})"
            )
        for name in ("run_name", "model_name"):
            check_folder_name(name, getattr(self, name))
        self.affinity_offsets()
        if self.model == "unet" and self.z_context % 2 == 0:
            raise ConfigError(
                f"--z-context {self.z_context}: the 2-D U-Net predicts the middle section of its K input sections, "
                f"so K must be odd (e.g. {self.z_context - 1} or {self.z_context + 1})"
            )
        if self.model == "unet3d" and self.target == "affinities":
            raise ConfigError("--model unet3d learns the membrane probability only: train it with --target boundary")
        if self.voxel_size is not None:
            self.voxel_size_nm()

    def voxel_size_nm(self) -> tuple[float, float, float] | None:
        """``voxel_size`` parsed: (z, y, x) nm, or None when not given."""
        if self.voxel_size is None:
            return None
        try:
            values = tuple(float(v) for v in self.voxel_size.replace(" ", "").split(","))
        except ValueError:
            values = ()
        if len(values) != 3 or not all(0.0 < v < float("inf") for v in values):
            raise ConfigError(
                f"--voxel-size {self.voxel_size!r}: must be three positive numbers Z,Y,X in nm, e.g. 50,4,4"
            )
        return values

    def affinity_offsets(self) -> Offsets:
        """The offsets the U-Net learns affinities for: none with ``target`` boundary (checked either way)."""
        try:
            offsets = check_offsets(parse_offsets(self.offsets), self.patch_size)
        except ValueError as err:
            raise ConfigError(f"{describe(TrainConfig.field('offsets'))} = {self.offsets!r}: {err}") from None
        return offsets if self.target == "affinities" else ()

    def augment_config(self):
        """The :class:`~em_unet.training.augment.AugmentConfig` this run trains with, or None when ``augment``
        is off."""
        from em_unet.training.augment import AugmentConfig  # here, not above: it imports TensorFlow

        if not self.augment:
            return None
        return AugmentConfig(
            rotation_degrees=self.rotation_degrees,
            elastic=self.elastic_sigma_px > 0,
            elastic_sigma_px=self.elastic_sigma_px,
            elastic_points=self.elastic_points,
            elastic_backend=self.elastic_backend,
            z_flips=self.z_flips,
            missing_sections=self.missing_sections,
            misaligned_sections=self.misaligned_sections,
            misalign_px=self.misalign_px,
            section_jitter=self.section_jitter,
        )


def check_folder_name(name: str, value: str | None) -> None:
    """One-line error unless the TrainConfig field ``name`` (a run or model name) is a folder name, not a path."""
    if value is not None and (value in (".", "..") or "/" in value or "\\" in value):
        raise ConfigError(
            f"{describe(TrainConfig.field(name))} = {value!r}: must be a folder name, "
            "not a path (use --logs-dir / --models-dir for the place)"
        )


# Settings that name what is read and where things go, not how a model trains: a study cannot vary them.
NAMING_FIELDS = (
    "data",
    "labels",
    "label_convention",
    "run_name",
    "resume",
    "logs_dir",
    "models_dir",
    "model_name",
    "export_precision",
    "package",
)
# What a search space may search: architecture and optimizer (chosen in HyperModel.build) and
# training-time settings (chosen in HyperModel.fit).
BUILD_FIELDS = (
    "depth",
    "base_filters",
    "batch_norm",
    "optimizer",
    "learning_rate",
    "lr_schedule",
    "momentum",
    "loss",
    "target",
    "offsets",
    "ema",
)
FIT_FIELDS = ("augment", "elastic_sigma_px", "elastic_points", "rotation_degrees", "batch_size", "patch_size")


# ---------------------------------------------------------------- tuning


@dataclass
class SearchConfig(Settings):
    """How ``em-unet tune`` searches; the search-space TOML's ``[tuner]`` table sets the ones marked for it,
    flags override the TOML."""

    search_space: str | None = setting(
        None,
        "search-space TOML: [tuner] settings and the [space] to search",
        group="search",
        metavar="TOML",
        toml=False,
        default_text="the built-in default.toml: optimizer and learning rate",
    )
    algorithm: str = setting("hyperband", "search algorithm", flag="--tuner", group="search", choices=ALGORITHMS)
    objective: str = setting("val_loss", "what the search minimises", group="search", choices=OBJECTIVES)
    max_trials: int = setting(12, "trials for bayesian / random / grid", group="search", minimum=1)
    hyperband_factor: int = setting(3, "Hyperband's reduction factor between brackets", group="search", minimum=2)
    project: str = setting(
        "default",
        "name of the search under LOGS_DIR/tune/; re-running the same project resumes it",
        group="search",
        toml=False,
    )
    overwrite: bool = setting(False, "start the search anew instead of resuming", group="search", toml=False)
    workers: int = setting(
        0,
        "worker processes on this machine that run the trials, with this process as their chief (0: trials run "
        "in this process); one GPU each where there are GPUs, else the CPU cores split between them",
        group="distributed",
        minimum=0,
        maximum=64,
        metavar="N",
        toml=False,
    )
    recycle_after: int = setting(
        1,
        "with --workers: a worker process leaves after this many trials and a fresh one takes its place, so "
        "memory stays flat (Keras keeps about 27 MB per trial in a process); 0: never",
        group="distributed",
        minimum=0,
        maximum=10000,
        metavar="TRIALS",
        toml=False,
    )
    tuner_id: str | None = setting(
        None,
        "'chief' serves the oracle; any other id (tuner0, tuner1, ...) is a "
        "worker that runs trials (KERASTUNER_TUNER_ID)",
        group="distributed",
        toml=False,
    )
    oracle_ip: str | None = setting(
        None, "address of the chief (KERASTUNER_ORACLE_IP)", group="distributed", toml=False
    )
    oracle_port: int | None = setting(
        None, "port of the chief (KERASTUNER_ORACLE_PORT)", group="distributed", minimum=1, maximum=65535, toml=False
    )
    worker_timeout: float = setting(
        120.0,
        "chief: a worker silent this long, seconds, loses its trial to the others",
        group="distributed",
        above=0.0,
        metavar="SEC",
        toml=False,
    )

    def check(self) -> None:
        if self.project in (".", "..") or "/" in self.project:
            raise ConfigError(f"--project {self.project!r}: must be a folder name, not a path")
        clashing = [
            flag_of(self.field(name)) for name in ("tuner_id", "oracle_ip", "oracle_port") if getattr(self, name)
        ]
        if self.workers and clashing:
            raise ConfigError(
                f"--workers {self.workers} starts its own chief and workers on this machine: leave out "
                f"{', '.join(clashing)} (they join a search started elsewhere)"
            )


# Flags of `train` that `tune` does not offer: a search names its folder with --project, and resumes by itself.
TUNE_EXCLUDED = ("run_name", "resume")


# ---------------------------------------------------------------- prediction and segmentation


@dataclass
class PredictConfig(Settings):
    """How ``em-unet predict`` cuts slices into tiles; the library functions take the same names, with these
    defaults."""

    model: str = setting(
        help="SavedModel folder (a version, or its parent: newest version), .keras file, or bioimage.io package "
        "(.zip, e.g. from em-unet package)",
        positional=True,
    )
    stack: str = setting(help="EM stack to segment", positional=True)
    output: str = setting(help="TIFF to write", flag="-o", metavar="OUT.tif")
    tile: int | None = setting(
        None,
        "tile side in pixels, a multiple of 2**depth",
        group="prediction",
        minimum=16,
        maximum=16384,
        metavar="PX",
        default_text="the whole slice plus margins, up to 1024 px a side; larger slices get the fewest tiles of "
        "at most 1024 px that cover them",
    )
    margin: int = setting(
        16,
        "context border of each tile, pixels, not used for output",
        group="prediction",
        minimum=0,
        maximum=4096,
        metavar="PX",
    )
    overlap: int = setting(
        16,
        "pixels over which neighbouring tiles are blended",
        default_text="16; 0 for chunked outputs, whose blocks follow the tiles: there an overlap makes each block "
        "also predict the neighbouring tiles that reach into it",
        group="prediction",
        minimum=0,
        maximum=4096,
        metavar="PX",
    )
    tile_batch: int = setting(
        4, "tiles per forward pass (sets peak memory)", group="prediction", minimum=1, maximum=1024, metavar="N"
    )
    tta: bool = setting(False, "average the 8 flips/rotations (8x slower)", group="prediction")
    binary: bool = setting(False, "write uint8 0/255 thresholded at 0.5", group="prediction")
    isbi: bool = setting(False, "ISBI 2012 submission convention: 1 (or 255) = cell interior", group="prediction")
    segment: str | None = setting(
        None,
        "also segment the prediction into neurons and write the labels here (as "
        "em-unet segment does, with the segmentation options below)",
        metavar="SEGMENTS.tif",
        group="prediction",
    )
    affinities: str | None = setting(
        None,
        "also write an affinity U-Net's affinities here: a TIFF hyperstack (z, c, y, x; the offsets in its Info) or "
        "a chunked volume (c, z, y, x; the offsets in its attributes), for em-unet segment",
        metavar="AFFINITIES",
        group="prediction",
    )
    overwrite: bool = setting(False, "replace existing output files")
    block: int | None = setting(
        None,
        "block side, pixels, of blockwise prediction",
        group="volumes",
        minimum=64,
        maximum=16384,
        metavar="PX",
        default_text="along the auto tiles' cores (a block per tile); with --tile, the input's chunk side, else 512",
    )

    def check(self) -> None:
        check_tiling(self.tile, self.margin, self.overlap)
        if self.segment and (self.binary or self.isbi):
            raise ConfigError("--segment needs the membrane probability: leave out --binary and --isbi")
        if self.affinities is not None and self.affinities == self.output:
            raise ConfigError(f"--affinities {self.affinities}: the same path as --output: name another file")


def check_tiling(tile: int | None, margin: int, overlap: int) -> None:
    """Refuse a tile (pixels) that leaves no core once ``margin`` and ``overlap`` are taken off."""
    if tile is not None and tile - 2 * margin - overlap < 1:
        raise ConfigError(
            f"--tile {tile} px leaves no core after 2 x --margin {margin} px and --overlap "
            f"{overlap} px: choose --tile >= {2 * margin + overlap + 16} or a smaller margin"
        )


@dataclass
class VolumeOptions(Settings):
    """Where chunked volumes are worked on (``predict`` and ``segment`` with HDF5 / Zarr / OME-Zarr data)."""

    key: str | None = setting(
        None,
        "the input's array inside an HDF5 file or Zarr store (instead of FILE.h5:/KEY or STORE.zarr/KEY)",
        group="volumes",
        metavar="KEY",
    )
    scheduler: str | None = setting(
        None,
        "address of a running Dask scheduler to work on (e.g. tcp://10.0.0.5:8786; a SLURM or Kubernetes cluster)",
        group="volumes",
        metavar="ADDRESS",
        default_text="a LocalCluster on this machine",
    )
    workers: int | None = setting(
        None,
        "worker processes of the LocalCluster",
        group="volumes",
        minimum=1,
        maximum=1024,
        metavar="N",
        default_text="one per GPU, else one per core",
    )

    def check(self) -> None:
        if self.scheduler and self.workers:
            raise ConfigError(
                "--scheduler and --workers both given: --workers sizes the LocalCluster that --scheduler replaces"
            )


# ---------------------------------------------------------------- the other commands' own options


@dataclass
class PreviewOptions(Settings):
    output: str = setting("augment-preview.png", "PNG to write", flag="-o")
    samples: int = setting(6, "rows of the grid", minimum=1, maximum=64)
    overwrite: bool = setting(False, "replace an existing output file")


@dataclass
class ExportOptions(Settings):
    model: str = setting(help="a Keras model file, e.g. a run's logs/<run>/best.keras", positional=True)


@dataclass
class EvaluateOptions(Settings):
    prediction: str = setting(
        help="membrane-probability TIFF stack (from em-unet predict), or a label image (from "
        "em-unet segment, or any with --segments)",
        positional=True,
    )
    labels: str = setting(help="label stack of the same shape", positional=True)
    isbi: bool = setting(False, "the prediction is in the ISBI convention (1 = cell)")
    segments: bool = setting(
        False,
        "score PREDICTION as a label image (0 = boundary, 1, 2, ... = segments); "
        "automatic for em-unet segment's TIFFs and 32/64-bit integer images",
    )
    label_convention: str = setting(
        "auto", "how to read the labels; auto: from the values found", choices=LABEL_CONVENTIONS
    )
    output: str | None = setting(None, "JSON file to write the scores to", flag="-o", metavar="OUT.json")
    overwrite: bool = setting(False, "replace an existing output file")


@dataclass
class PackageOptions(Settings):
    model: str = setting(
        help="SavedModel folder (a version, or its parent: newest version) or .keras file", positional=True
    )
    output: str | None = setting(None, "bioimage.io package to write (a zip)", flag="-o", metavar="NAME.zip")
    output_dir: str | None = setting(None, "write the package unzipped into this folder instead", metavar="DIR")
    run: str | None = setting(
        None,
        "the training run folder whose config.json and scores.json document the model",
        metavar="LOGS_DIR/RUN",
        default_text="the .keras file's folder",
    )
    data: str | None = setting(
        None,
        "stack whose last slice gives the test tensors and the cover",
        metavar="STACK",
        default_text="the run's data, its first validation slice",
    )
    name: str | None = setting(
        None, "model name: 5-128 letters, digits, spaces, _+-()", default_text="EM membrane U-Net (em-unet depth D)"
    )
    author: str | None = setting(
        None, "authors' names, separated by ';'", metavar="NAME[;NAME]", default_text="your login name"
    )
    github_user: str | None = setting(
        None,
        "the first author's GitHub account, the maintainer the Model Zoo asks for (checked online)",
        metavar="USER",
    )
    license: str = setting("CC-BY-4.0", "SPDX license id of the package", metavar="ID")
    cite: str | None = setting(
        None, "a citation besides the U-Net paper's: TEXT|DOI or TEXT|URL", metavar="TEXT|DOI", default_text="none"
    )
    onnx: bool = setting(True, "leave out the ONNX weights (converted with tf2onnx, checked with onnxruntime)")
    overwrite: bool = setting(False, "replace an existing output")

    def check(self) -> None:
        if (self.output is None) == (self.output_dir is None):
            raise ConfigError("give -o NAME.zip or --output-dir DIR (one of them)")


@dataclass
class SegmentOptions(Settings):
    probability: str = setting(
        help="membrane-probability TIFF stack (float in [0, 1], or 8/16-bit), or an affinity map (from predict "
        "--affinities: segmented by the mutex watershed)",
        positional=True,
    )
    output: str = setting(help="label TIFF to write", flag="-o", metavar="SEGMENTS.tif")
    offsets: str | None = setting(
        None,
        "the affinity map's offsets, pairs DY,DX separated by spaces, one per channel (for a map that does not "
        "record them; one that does must agree)",
        metavar="DY,DX ...",
        default_text="those the map records",
        group="mutex",
    )
    overwrite: bool = setting(False, "replace existing output files")

    def affinity_offsets(self) -> Offsets | None:
        """``offsets`` parsed and checked, or None when not given."""
        if self.offsets is None:
            return None
        try:
            return check_offsets(parse_offsets(self.offsets))
        except ValueError as err:
            raise ConfigError(f"{describe(SegmentOptions.field('offsets'))} = {self.offsets!r}: {err}") from None

    def check(self) -> None:
        self.affinity_offsets()


@dataclass
class StudyOptions(Settings):
    config: str | None = setting(
        None, "study definition", metavar="TOML", group="study", default_text="the built-in seed-study.toml"
    )
    experiments: str | None = setting(
        None,
        "comma-separated experiments to run (the seed study has depth, augmentation, lr, optimizer)",
        metavar="A,B",
        group="study",
        default_text="all",
    )
    quick: bool = setting(
        False,
        "smoke test: the TOML's [quick] settings (tiny model, 2 epochs, 2 slices), logged to LOGS_DIR/study-quick/",
        group="study",
    )
    report: str | None = setting(
        None, "report folder", metavar="DIR", group="study", default_text="LOGS_DIR/study/report"
    )


@dataclass
class PlotOptions(Settings):
    folder: str = setting(help="a run folder (logs/<run>) or a folder of runs (logs/study)", positional=True)
    output: str | None = setting(None, "where the PNGs go", flag="-o", metavar="DIR", default_text="FOLDER/report")


# ---------------------------------------------------------------- the README's flag tables


README_TABLES = {
    "train": (TrainConfig, None, ()),
    "tune": (SearchConfig, None, ()),
    "predict": (PredictConfig, None, ()),
}


def main() -> None:  # pragma: no cover - ``python -m em_unet.config`` prints the README's tables
    for name, (cls, include, exclude) in README_TABLES.items():
        print(f"<!-- flags:{name} -->\n{flags_markdown(cls, include, exclude)}\n<!-- /flags:{name} -->\n")


if __name__ == "__main__":  # pragma: no cover
    main()
