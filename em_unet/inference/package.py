"""bioimage.io model packages: ``em-unet package`` writes one from an export, ``em-unet predict`` runs one.

A package is a zip (or a folder) with an ``rdf.yaml`` in the bioimage.io model format 0.5 and the files it
names, so that Fiji (deepImageJ), ilastik, napari and bioimage.io's own tools run the model without em-unet:

- weights: ``tensorflow_saved_model_bundle``, the float32 SavedModel em-unet exports (zipped, as the format
  wants); ``keras_v3``, the Keras model with em-unet's one custom layer (an input-size check) replaced by
  Keras' ``Identity``, so that plain Keras loads it; ``onnx``, converted from the SavedModel by tf2onnx and kept
  only when onnxruntime reproduces the SavedModel within :data:`ONNX_TOLERANCE`. Every format but the
  original names it as its ``parent``. All give the SavedModel's outputs on the test input (the differences
  are measured and written into the package's README).
- tensors: ``image`` (batch, y, x, channel: the SavedModel's own layout, one channel) whose sides are a
  minimum plus a multiple of ``2**depth`` px; its preprocessing is em-unet's intensity rule
  (:func:`em_unet.io.stacks.to_unit_range`) for the training data's type written with the format's own
  operations (8-bit: ``scale_linear`` by 1/255); ``membrane_probability`` (1 = membrane), same shape, with a
  halo of em-unet's default tile margin, which consumers pad (mirrored) and crop: predicting a whole slice
  so gives em-unet's own whole-slice prediction.
- test tensors: a crop of the first validation slice, mirror-padded by the halo as em-unet pads it, and
  em-unet's prediction of it (the crop's own prediction once the halo is cropped); a cover image (input
  beside membrane probability); a README.md from the run's ``config.json`` and ``scores.json``.
"""

from __future__ import annotations

import dataclasses
import getpass
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from em_unet import __version__
from em_unet.config import TrainConfig
from em_unet.errors import ConfigError, DependencyError, EmUnetError, warn
from em_unet.inference.predict import keras_predictor, load_keras_model, load_saved_model, resolve_model_path
from em_unet.inference.serving import INPUT_NAME, OUTPUT_NAME, SIGNATURE
from em_unet.inference.tiling import Tiling
from em_unet.io.files import atomic_output, check_free_space, check_writable, human_size, new_folder
from em_unet.io.stacks import FIXED_RANGES, iter_slices, stack_shape
from em_unet.settings import to_flags

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")  # the description's file names the format allows
DEFAULT_LICENSE = "CC-BY-4.0"
TEST_SIDE = 256  # px: side of the test input (the crop plus the halo on each side), at most
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4  # max |ONNX - SavedModel| on the test input for the ONNX weights to be shipped
ONNX_TIMEOUT_S = 900
TAGS = (
    "electron-microscopy",
    "2d",
    "cell-membrane",
    "membrane",
    "neurons",
    "brain",
    "connectomics",
    "tensorflow",
    "deepimagej",
    "ilastik",
    "unet",
    "semantic-segmentation",
    "em-unet",
)
UNET_CITATION = {
    "text": "Ronneberger O., Fischer P., Brox T. (2015). U-Net: Convolutional Networks for Biomedical Image "
    "Segmentation. MICCAI 2015, LNCS 9351, 234-241.",
    "doi": "10.1007/978-3-319-24574-4_28",
}
NAME_CHARACTERS = re.compile(r"[A-Za-z0-9_+\- ()]{5,128}")  # the format's rule for a model's name
AXES = ("batch", "y", "x", "channel")  # em-unet's SavedModel layout, as the package's axis ids

# The files of a package (names inside the zip).
SAVED_MODEL_FILE = "tensorflow_saved_model_bundle.zip"
KERAS_FILE = "keras_model.keras"
ONNX_FILE = "model.onnx"
TEST_INPUT, TEST_OUTPUT = "test_input.npy", "test_output.npy"
SAMPLE_INPUT, SAMPLE_OUTPUT = "sample_input.tif", "sample_output.tif"
COVER, DOCUMENTATION = "cover.png", "README.md"


# ---------------------------------------------------------------- what a package holds


@dataclass
class PackageReport:
    """What :func:`package_model` wrote: ``path`` (the zip or folder), its ``size_bytes``, the weight
    ``formats`` in it, each format's max |difference| from the SavedModel on the test input
    (``max_difference``, probability units), why ONNX was left out (``onnx_skipped``, None if it is in), the
    ``seconds`` it took and the ``warnings`` the format's validator gave."""

    path: Path
    size_bytes: int
    formats: list[str]
    max_difference: dict[str, float]
    onnx_skipped: str | None
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Source:
    """The model to package: the SavedModel folder, the Keras model, and what is known of its training."""

    saved_model: Path
    keras_model: Any  # keras.Model, or None when the export holds no model.keras
    original: str  # the weights format the others were converted from
    depth: int
    base_filters: int | None
    parameters: int | None
    config: dict | None  # the run's config.json
    scores: dict | None  # the run's scores.json
    run_dir: Path | None


@dataclass
class _TestData:
    """The test tensors and where they came from."""

    raw: np.ndarray  # (T, T) in the data's own type: the crop mirror-padded by the halo
    preprocessed: np.ndarray  # (T, T) float32, what the model takes
    expected: np.ndarray  # (T, T) float32 membrane probability
    origin: str  # for the documentation
    ops: list[dict]  # the preprocessing, as the format writes it


# ---------------------------------------------------------------- preprocessing: em-unet's intensity rule


def preprocessing_for(dtype: np.dtype, values: np.ndarray | None = None) -> list[dict]:
    """em-unet's intensity rule (:func:`em_unet.io.stacks.to_unit_range`) for raw data of ``dtype``, as the
    bioimage.io format's preprocessing operations: 8- and 16-bit data divided by 255 or 65535, floats in [0, 1]
    kept, anything else (``values`` outside [0, 1], other integer types) rescaled by its minimum and maximum (per
    slice here; em-unet's own rule takes the stack's)."""
    dtype = np.dtype(dtype)
    ops: list[dict] = [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]
    if dtype in FIXED_RANGES:
        low, high = FIXED_RANGES[dtype]
        if (low, high) != (0.0, 1.0):
            ops.append(
                {"id": "scale_linear", "kwargs": {"gain": 1.0 / (high - low), "offset": 0.0 - low / (high - low)}}
            )
    elif not (np.issubdtype(dtype, np.floating) and (values is None or (values.min() >= 0 and values.max() <= 1))):
        ops.append(
            {"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": 0.0, "max_percentile": 100.0}}
        )
    ops.append({"id": "ensure_dtype", "kwargs": {"dtype": "float32"}})
    return ops


def _scalar(value: Any, op: str, name: str) -> float:
    """A kwarg given as a number or as a one-element list (one channel)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{op}: {name} has {len(value)} values; em-unet's models take one channel")
        value = value[0]
    return float(value)


def apply_preprocessing(image: np.ndarray, ops: Sequence[dict], where: str = "package") -> np.ndarray:
    """A 2-D slice (y, x) through the bioimage.io preprocessing ``ops`` (as ``rdf.yaml`` writes them) that
    em-unet applies: ensure_dtype, scale_linear, scale_range, zero_mean_unit_variance,
    fixed_zero_mean_unit_variance and clip, each computed over the whole slice (one sample). Returns float32."""
    x = np.asarray(image)
    for op in ops:
        name, kwargs = op.get("id"), op.get("kwargs") or {}
        try:
            if name == "ensure_dtype":
                x = x.astype(kwargs.get("dtype", "float32"))
            elif name == "scale_linear":
                x = x * np.float32(_scalar(kwargs.get("gain", 1.0), name, "gain")) + np.float32(
                    _scalar(kwargs.get("offset", 0.0), name, "offset")
                )
            elif name == "scale_range":
                if kwargs.get("reference_tensor") not in (None, INPUT_NAME):
                    raise ValueError("scale_range with a reference_tensor: em-unet reads one tensor")
                low, high = np.percentile(
                    x, [float(kwargs.get("min_percentile", 0.0)), float(kwargs.get("max_percentile", 100.0))]
                )
                x = (x - np.float32(low)) / np.float32(high - low + float(kwargs.get("eps", 1e-6)))
            elif name == "zero_mean_unit_variance":
                x = (x - np.float32(x.mean())) / np.float32(x.std() + float(kwargs.get("eps", 1e-6)))
            elif name == "fixed_zero_mean_unit_variance":
                mean = _scalar(kwargs.get("mean", 0.0), name, "mean")
                std = _scalar(kwargs.get("std", 1.0), name, "std")
                x = (x - np.float32(mean)) / np.float32(std + float(kwargs.get("eps", 1e-6)))
            elif name == "clip":
                x = np.clip(x, kwargs.get("min"), kwargs.get("max"))
            else:
                raise ValueError(
                    f"preprocessing step {name!r} is not one em-unet applies (it applies ensure_dtype, "
                    "scale_linear, scale_range, zero_mean_unit_variance, fixed_zero_mean_unit_variance, clip)"
                )
        except (TypeError, ValueError) as err:
            raise EmUnetError(f"{where}: {err}") from None
    return x.astype(np.float32, copy=False)


# ---------------------------------------------------------------- reading a package (em-unet predict)


def is_package(path: str | Path) -> bool:
    """Whether ``path`` is a bioimage.io package: a ``.zip`` file, or a folder holding an ``rdf.yaml``."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".zip"
    return path.is_dir() and any((path / name).is_file() for name in RDF_NAMES)


class _Files:
    """The files of a package, zipped or a folder, read by their names in ``rdf.yaml``."""

    def __init__(self, path: Path):
        self.path = path
        self.zipped = not path.is_dir()
        if not self.zipped:
            self.names = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
            return
        try:
            with zipfile.ZipFile(path) as archive:
                self.names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError) as err:
            raise EmUnetError(f"{path}: not a bioimage.io package (not a readable zip archive: {err})") from None

    def read(self, name: str) -> bytes:
        name = str(name).removeprefix("./")
        if name not in self.names:
            raise EmUnetError(f"{self.path}: rdf.yaml names {name}, which the package does not hold")
        try:
            if not self.zipped:
                return (self.path / name).read_bytes()
            with zipfile.ZipFile(self.path) as archive:
                return archive.read(name)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise EmUnetError(f"{self.path}: cannot read {name} from the package ({err})") from None


def _source_of(entry: Any) -> str | None:
    """A file entry of ``rdf.yaml``: ``{source: NAME, sha256: ...}`` or a bare name."""
    if isinstance(entry, dict):
        return entry.get("source")
    return entry if isinstance(entry, str) else None


@dataclass
class PackageModel:
    """A bioimage.io package opened for :func:`em_unet.inference.predict.predict_file`: its description, its
    preprocessing and its halo (px)."""

    path: Path
    rdf: dict
    preprocessing: list[dict]
    halo: int
    files: _Files

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """One raw 2-D slice through the package's preprocessing: float32, what its model takes."""
        return apply_preprocessing(image, self.preprocessing, str(self.path))


def _axes_of(tensor: dict, where: str, kind: str) -> list[dict]:
    """The axes of a tensor description, checked to be em-unet's layout (batch, y, x, one channel)."""
    axes = tensor.get("axes")
    if not isinstance(axes, list):
        raise EmUnetError(f"{where}: {kind} tensor {tensor.get('id')!r} has no axes list (a bioimage.io 0.4 package?)")
    types = [a.get("type") if isinstance(a, dict) else a for a in axes]
    channel = next((a for a in axes if isinstance(a, dict) and a.get("type") == "channel"), {})
    if types != ["batch", "space", "space", "channel"] or len(channel.get("channel_names") or []) != 1:
        shown = ", ".join(str(a.get("id", a.get("type")) if isinstance(a, dict) else a) for a in axes)
        raise EmUnetError(
            f"{where}: {kind} axes ({shown}): em-unet runs packages whose {kind} is (batch, y, x, channel) "
            "with one channel, as em-unet's own packages are"
        )
    return axes


def read_package(path: str | Path) -> PackageModel:
    """Open a bioimage.io package (zip or folder) for prediction, or a one-line error saying why em-unet cannot
    run it: no ``rdf.yaml``, a format before 0.5, not one input and one output in em-unet's layout, a
    preprocessing step em-unet does not apply."""
    path = Path(path)
    files = _Files(path)
    rdf_name = next((name for name in RDF_NAMES if name in files.names), None)
    if rdf_name is None:
        raise EmUnetError(f"{path}: not a bioimage.io package (it holds no {' or '.join(RDF_NAMES)})")
    try:
        rdf = yaml.safe_load(files.read(rdf_name))
    except yaml.YAMLError as err:
        raise EmUnetError(f"{path}: {rdf_name} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise EmUnetError(f"{path}: {rdf_name} does not describe a model")
    version = str(rdf.get("format_version", ""))
    if not version.startswith("0.5"):
        raise EmUnetError(
            f"{path}: bioimage.io format {version or '?'}; em-unet reads format 0.5 packages "
            "(update it with: bioimageio update-format)"
        )
    inputs, outputs = rdf.get("inputs") or [], rdf.get("outputs") or []
    if len(inputs) != 1 or len(outputs) != 1:
        raise EmUnetError(
            f"{path}: the model has {len(inputs)} inputs and {len(outputs)} outputs; em-unet runs one image "
            "to one membrane-probability map"
        )
    _axes_of(inputs[0], str(path), "input")
    out_axes = _axes_of(outputs[0], str(path), "output")
    halos = {int(a.get("halo", 0)) for a in out_axes if a.get("type") == "space"}
    if len(halos) != 1:
        raise EmUnetError(f"{path}: the output's y and x halos differ ({sorted(halos)}); em-unet needs one margin")
    post = [op.get("id") for op in outputs[0].get("postprocessing") or []]
    if any(op != "ensure_dtype" for op in post):
        raise EmUnetError(
            f"{path}: the output's postprocessing ({', '.join(map(str, post))}) is not one em-unet applies; "
            "em-unet takes a model whose output is the membrane probability itself"
        )
    return PackageModel(path, rdf, list(inputs[0].get("preprocessing") or []), halos.pop(), files)


def package_predictor(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """Tiles -> membrane probabilities through a package's weights: its ``tensorflow_saved_model_bundle``
    (em-unet's signature), else its ``keras_v3`` file; a one-line error if it has neither."""
    package = read_package(path)
    files = package.files
    weights = package.rdf.get("weights") or {}
    with tempfile.TemporaryDirectory(prefix="em-unet-package-") as tmp:
        # TensorFlow reads a SavedModel's variables when it loads it, and Keras a .keras file: the unpacked
        # copies can go once loaded.
        if (source := _source_of(weights.get("tensorflow_saved_model_bundle"))) is not None:
            folder = Path(tmp) / "saved_model"
            data = files.read(source)
            if zipfile.is_zipfile(io.BytesIO(data)):
                with zipfile.ZipFile(io.BytesIO(data)) as archive:
                    archive.extractall(folder)
            elif package.path.is_dir() and (package.path / source).is_dir():
                shutil.copytree(package.path / source, folder)
            else:
                raise EmUnetError(f"{package.path}: its SavedModel {source} is not a zip archive of the folder")
            found = sorted(folder.rglob("saved_model.pb"), key=lambda p: len(p.parts))
            if not found:
                raise EmUnetError(f"{package.path}: its SavedModel {source} holds no saved_model.pb")
            return load_saved_model(found[0].parent)[0]
        if (source := _source_of(weights.get("keras_v3"))) is not None:
            keras_file = Path(tmp) / "model.keras"
            keras_file.write_bytes(files.read(source))
            return keras_predictor(load_keras_model(keras_file))
    found = ", ".join(sorted(weights)) or "none"
    raise EmUnetError(
        f"{package.path}: no weights em-unet can run (the package has: {found}); em-unet runs "
        "tensorflow_saved_model_bundle or keras_v3 weights"
    )


def package_slices(path: str | Path, stack_path: str | Path) -> Iterator[np.ndarray]:
    """The slices of a stack as a package's model takes them: raw slices through its preprocessing."""
    package = read_package(path)
    for image in iter_slices(stack_path):
        yield package.preprocess(image)


# ---------------------------------------------------------------- writing a package: the inputs


def _require_bioimageio():
    """bioimageio.spec, or a one-line error saying how to install it."""
    try:
        import bioimageio.spec  # lazy: an optional extra, needed only to write packages
    except ImportError as err:
        raise DependencyError(
            f"em-unet package needs bioimageio.spec ({err}): pip install -e '.[cpu,bioimageio]'"
        ) from None
    return bioimageio.spec


def check_package_output(output: str | Path, folder: bool = False, overwrite: bool = False) -> Path:
    """Refuse, creating nothing, an output a package could not be written to: a zip not named ``*.zip``, an
    existing output without ``overwrite``, a path under a file or in a read-only folder. ``folder``: the
    unzipped package goes to the folder ``output``. Train and tune call this before they train."""
    output = Path(output)
    if folder:
        if output.exists() and not output.is_dir():
            raise EmUnetError(f"--output-dir {output} is a file: name a folder for the unzipped package")
        if output.exists() and not overwrite:
            raise EmUnetError(f"--output-dir {output} already exists: choose another folder or pass --overwrite")
        check_writable(output / RDF_NAMES[0], overwrite=True)
        return output
    if output.suffix.lower() != ".zip":
        raise EmUnetError(
            f"{output}: a bioimage.io package is a zip file: name it NAME.zip (or pass --output-dir DIR for a folder)"
        )
    return check_writable(output, overwrite)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _unet_shape(model: Any) -> tuple[int, int | None]:
    """(depth, base filters) of an em-unet Keras U-Net."""
    layers = list(getattr(model, "layers", ()))
    check = next((layer for layer in layers if type(layer).__name__ == "InputSizeCheck"), None)
    pools = sum(type(layer).__name__ == "MaxPooling2D" for layer in layers)
    depth = int(getattr(check, "depth", 0) or pools)
    first = next((layer for layer in layers if type(layer).__name__ == "Conv2D"), None)
    return depth, getattr(first, "filters", None)


def _probe_depth(predictor: Callable[[np.ndarray], np.ndarray]) -> int:
    """The depth of a SavedModel without its Keras model: the smallest side it takes is ``2**depth``."""
    for depth in range(1, 9):
        try:
            predictor(np.zeros((1, 2**depth, 2**depth, 1), np.float32))
        except Exception:  # the model's size check: too small, try the next power of two
            continue
        return depth
    raise EmUnetError("the SavedModel takes no square input of up to 256 px: not an em-unet U-Net")


def _channels(saved_model: Path) -> tuple[int | None, int | None]:
    """Channels of the serving signature's input and output, read from saved_model.pb (None if unknown)."""
    from tensorflow.core.protobuf import saved_model_pb2  # lazy: TensorFlow only where a model is packaged

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model / "saved_model.pb").read_bytes())
    for graph in proto.meta_graphs:
        if SIGNATURE in graph.signature_def:
            signature = graph.signature_def[SIGNATURE]
            dims = [
                signature_map[name].tensor_shape.dim
                for signature_map, name in ((signature.inputs, INPUT_NAME), (signature.outputs, OUTPUT_NAME))
            ]
            return tuple(d[-1].size if len(d) == 4 and d[-1].size > 0 else None for d in dims)
    return None, None


def _run_record(model_path: Path, run_dir: str | Path | None) -> tuple[Path | None, dict | None, dict | None]:
    """The run folder whose config.json documents the model (``run_dir``, else the .keras file's folder),
    its config and its scores; Nones where there is none."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        config = _read_json(run_dir / "config.json")
        if config is None:
            raise EmUnetError(
                f"--run {run_dir}: no readable config.json there; name an em-unet train run folder (LOGS_DIR/<run>)"
            )
        return run_dir, config, _read_json(run_dir / "scores.json")
    if model_path.suffix == ".keras" and (config := _read_json(model_path.parent / "config.json")) is not None:
        return model_path.parent, config, _read_json(model_path.parent / "scores.json")
    return None, None, None


def _portable_keras(model: Any) -> Any:
    """``model`` (float32) with em-unet's input-size check replaced by Keras' ``Identity`` layer, so that Keras
    alone loads the package's .keras file; the package's axis sizes state the rule the check enforced."""
    import keras  # lazy: TensorFlow only where a model is packaged

    from em_unet.inference.export import float32_copy  # lazy: export imports TensorFlow at its top

    model = float32_copy(model)
    config = model.get_config()
    replaced = False
    for layer in config.get("layers", []):
        if layer.get("class_name") == "InputSizeCheck":
            inner = {k: v for k, v in layer["config"].items() if k in ("name", "trainable", "dtype")}
            layer.update(module="keras.layers", class_name="Identity", config=inner, registered_name=None)
            replaced = True
    if not replaced:
        return model
    portable = keras.Model.from_config(config)
    portable.set_weights(model.get_weights())
    return portable


def _source(model_path: Path, run_dir: str | Path | None, staging: Path) -> _Source:
    """What to package from a SavedModel folder or a .keras file (exported to ``staging`` first)."""
    run, config, scores = _run_record(model_path, run_dir)
    if model_path.suffix == ".keras":
        from em_unet.inference.export import export_saved_model  # lazy: export imports TensorFlow at its top

        model = load_keras_model(model_path)
        if len(model.input_shape) == 4 and (model.input_shape[-1] != 1 or model.output_shape[-1] != 1):
            raise EmUnetError(
                f"{model_path}: the model takes {model.input_shape[-1]} channels and gives {model.output_shape[-1]}; "
                "em-unet packages one-channel EM U-Nets with one membrane-probability output"
            )
        saved_model = export_saved_model(model, "model", staging / "export")
        original = "keras_v3"
    else:
        saved_model, original = model_path, "tensorflow_saved_model_bundle"
        model = load_keras_model(model_path / "model.keras") if (model_path / "model.keras").is_file() else None
    predictor, offsets = load_saved_model(saved_model)  # one-line errors for a SavedModel that is not em-unet's
    if offsets:
        raise EmUnetError(
            f"{model_path}: an affinity U-Net ({len(offsets)} affinity channels beside the membrane probability); "
            "em-unet packages boundary U-Nets only so far: package a model trained with --target boundary"
        )
    if predictor.volumetric:
        raise EmUnetError(
            f"{model_path}: a 3-D U-Net (z-patches of {predictor.z_context} sections); em-unet packages 2-D U-Nets "
            "only so far"
        )
    channels = _channels(saved_model)
    if channels != (1, 1):
        shown = ["?" if c is None else str(c) for c in channels]
        raise EmUnetError(
            f"{model_path}: the {SIGNATURE} signature takes {shown[0]} channels and gives {shown[1]}; em-unet "
            "packages one-channel EM U-Nets ([batch, y, x, 1] in, [batch, y, x, 1] out)"
        )
    if model is not None:
        depth, filters = _unet_shape(model)
        parameters = int(model.count_params())
    elif config and isinstance(config.get("depth"), int):
        depth, filters, parameters = config["depth"], config.get("base_filters"), None
    else:
        depth, filters, parameters = _probe_depth(predictor), None, None
    return _Source(saved_model, model, original, depth, filters, parameters, config, scores, run)


def _test_slice(source: _Source, data: str | Path | None) -> tuple[np.ndarray, str]:
    """A raw 2-D slice for the test tensors and the cover, and where it came from: ``data``'s, else the run's
    first validation slice; a synthetic image (said so) when neither is known."""
    index = None
    if data is None and source.config and source.config.get("data"):
        data = source.config["data"]
        val = source.config.get("val_slices_used") or []
        index = int(val[0]) if val else None
    if data is None:
        # No data to take a crop of: smooth noise stands in, so the package still tests every weight format.
        rng = np.random.default_rng(0)
        noise = rng.random((TEST_SIDE, TEST_SIDE)).astype(np.float32)
        for _ in range(4):
            noise = sum(np.roll(noise, shift, axis) for shift in (-1, 1) for axis in (0, 1)) / 5 + noise / 5
        noise = (noise - noise.min()) / (noise.max() - noise.min())
        return (noise * 255).astype(np.uint8), "a synthetic image (smoothed noise): no validation data was known"
    depth = stack_shape(data)[0]  # one-line errors for a missing or unreadable stack
    index = depth - 1 if index is None or index >= depth else index
    for i, image in enumerate(iter_slices(data)):
        if i == index:
            return image, f"slice {index} of {data}"
    raise EmUnetError(f"{data}: slice {index} could not be read")  # pragma: no cover - stack_shape counted it


def _test_data(source: _Source, predictor: Callable[[np.ndarray], np.ndarray], data: str | Path | None) -> _TestData:
    """A crop of the test slice mirror-padded by the halo, as em-unet pads, and em-unet's prediction of it."""
    image, origin = _test_slice(source, data)
    if image.ndim != 2:
        raise EmUnetError(f"{origin}: a slice of shape {image.shape}; em-unet packages models of 2-D 1-channel slices")
    halo, step = Tiling().margin, 2**source.depth
    side = -(-TEST_SIDE // step) * step
    while side - step >= 2 * halo + 1 and side - 2 * halo > min(image.shape):
        side -= step
    crop = side - 2 * halo
    if crop > min(image.shape):
        raise EmUnetError(
            f"{origin}: {image.shape[0]} x {image.shape[1]} px is too small for a test input of the model "
            f"({crop} px plus the {halo} px halo on each side): choose a larger --data stack"
        )
    y0, x0 = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
    padded = np.pad(image[y0 : y0 + crop, x0 : x0 + crop], halo, mode="reflect")
    ops = preprocessing_for(image.dtype, image)
    preprocessed = apply_preprocessing(padded, ops)
    expected = predictor(preprocessed[None, ..., None])[0, ..., 0].astype(np.float32)
    where = f"{origin}, the {crop} x {crop} px crop at y {y0}, x {x0}, mirror-padded by the {halo} px halo"
    return _TestData(padded, preprocessed, expected, where, ops)


# ---------------------------------------------------------------- writing a package: the files


def _zip_folder(folder: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    """Zip the contents of ``folder`` (not the folder itself) into ``target``."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if path.is_file() and relative.parts[0] not in skip:
                archive.write(path, str(relative))


def _onnx(saved_model: Path, target: Path, test: _TestData) -> tuple[float | None, str | None]:
    """Convert the SavedModel to ONNX with tf2onnx (in a child process: it rebuilds TensorFlow's graph state)
    and compare it with the SavedModel's test output through onnxruntime. Returns (max |difference|, None),
    or (None, why it is left out)."""
    missing = [name for name in ("tf2onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        return None, f"{' and '.join(missing)} not installed (pip install -e '.[cpu,bioimageio]')"
    command = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model), "--tag", "serve"]
    command += ["--signature_def", SIGNATURE, "--opset", str(ONNX_OPSET), "--output", str(target)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=ONNX_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return None, f"tf2onnx did not finish within {ONNX_TIMEOUT_S} s"
    if done.returncode != 0 or not target.is_file():
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no output")
        return None, f"tf2onnx {_version('tf2onnx')} failed on TensorFlow {_version('tensorflow')}: {reason[:300]}"
    import onnxruntime  # lazy: an optional extra, needed only to check the ONNX weights

    try:
        session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        out = session.run(None, {name: test.preprocessed[None, ..., None]})[0]
    except Exception as err:  # onnxruntime reports a model it cannot run in many exception types
        return None, f"onnxruntime cannot run tf2onnx's conversion ({type(err).__name__}: {str(err).splitlines()[0]})"
    if out.shape != (1, *test.expected.shape, 1):
        return None, f"the ONNX model gives shape {out.shape} for {(1, *test.expected.shape, 1)}"
    difference = float(np.abs(out[0, ..., 0] - test.expected).max())
    if not difference <= ONNX_TOLERANCE:
        return None, f"the ONNX model differs from the SavedModel by up to {difference:.2e} (> {ONNX_TOLERANCE:g})"
    return difference, None


def _version(module: str) -> str:
    try:
        from importlib.metadata import version  # stdlib; here so that the helper reads alone

        return version({"tensorflow": "tensorflow-cpu"}.get(module, module))
    except Exception:  # not installed under that distribution name
        try:
            return str(__import__(module).__version__)
        except Exception:  # not importable either
            return "?"


def _cover(test: _TestData, halo: int, path: Path) -> None:
    """The cover: the test crop beside its membrane probability (2:1, as bioimage.io shows covers)."""
    inner = (slice(halo, -halo or None), slice(halo, -halo or None))
    image = np.clip(test.preprocessed[inner], 0.0, 1.0)
    probability = np.clip(test.expected[inner], 0.0, 1.0)
    both = (np.hstack([image, probability]) * 255).round().astype(np.uint8)
    Image.fromarray(both).convert("RGB").save(path)


def _train_command(config: dict) -> str | None:
    """The ``em-unet train`` command of a run's config.json, every setting given, or None if it is not one."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        settings = TrainConfig.from_dict({k: v for k, v in config.items() if k in known}, "config.json")
    except (ConfigError, TypeError, ValueError):
        return None
    flags = to_flags(settings, exclude=("resume",))
    pairs, i = [], 0
    while i < len(flags):
        takes_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        pairs.append(shlex.join(flags[i : i + 2] if takes_value else flags[i : i + 1]))
        i += 2 if takes_value else 1
    return "em-unet train \\\n  " + " \\\n  ".join(pairs)


def _slices(values: Any) -> str:
    """``[15, 16, 17]`` as ``15-17`` (runs of consecutive slices joined)."""
    if not values:
        return "?"
    values, runs, start = sorted(int(v) for v in values), [], None
    for i, value in enumerate(values):
        start = value if start is None else start
        if i + 1 == len(values) or values[i + 1] != value + 1:
            runs.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ", ".join(runs)


def _documentation(
    name: str,
    source: _Source,
    test: _TestData,
    halo: int,
    minimum: int,
    max_difference: dict[str, float],
    onnx_skipped: str | None,
    package_name: str,
) -> str:
    """The package's README.md: what the model segments, its training, its scores, how to run it."""
    config, scores, step = source.config or {}, source.scores or {}, 2**source.depth
    filters = f"{source.base_filters} base filters" if source.base_filters else "base filters unknown"
    parameters = f", {source.parameters:,} parameters" if source.parameters else ""
    lines = [
        f"# {name}",
        "",
        "Neuronal membranes in 2-D electron-microscopy (EM) slices: for each pixel, the probability that it lies "
        f"on a cell membrane (1 = membrane, 0 = cell interior). A U-Net (depth {source.depth}, {filters}"
        f"{parameters}) trained with em-unet {__version__}; threshold the map or segment it "
        "into neurons (`em-unet segment`, a watershed).",
        "",
        "## Training data",
        "",
    ]
    if config:
        lines += [
            f"- images: `{config.get('data', '?')}`; labels: `{config.get('labels', '?')}` "
            f"(label convention {config.get('label_convention', '?')})",
            f"- training slices: {_slices(config.get('train_slices'))}; validation slices: "
            f"{_slices(config.get('val_slices_used'))}",
            f"- precision {config.get('resolved_precision', config.get('precision', '?'))}, "
            f"{config.get('epochs', '?')} epochs of {config.get('steps_per_epoch_used', '?')} steps, "
            f"patch {config.get('patch_size', '?')} px, seed {config.get('seed', '?')}",
            "",
            "## Training command",
            "",
            "```",
            _train_command(config) or "(config.json does not hold a complete em-unet train configuration)",
            "```",
        ]
    else:
        lines += [
            "Not recorded: the package was made without the training run's config.json (pass `--run LOGS_DIR/RUN` "
            "to `em-unet package` to document it)."
        ]
    lines += ["", "## Validation", ""]
    if scores:
        per_slice = scores.get("per_slice") or []
        slices = _slices(config.get("val_slices_used")) if config else "?"
        lines += [
            f"Scores on the {scores.get('slices', len(per_slice) or '?')} validation slices ({slices}), computed "
            "as the ISBI 2012 challenge's Fiji script does (foreground-restricted, after border thinning, the best "
            "threshold of 0.0-1.0), from em-unet's whole-slice prediction:",
            "",
            "| score | value | threshold |",
            "| --- | --- | --- |",
            f"| V_rand | {scores.get('v_rand', float('nan')):.4f} | {scores.get('v_rand_threshold', '?')} |",
            f"| V_info | {scores.get('v_info', float('nan')):.4f} | {scores.get('v_info_threshold', '?')} |",
            f"| pixel error | {scores.get('pixel_error', float('nan')):.4f} | "
            f"{scores.get('pixel_error_threshold', '?')} |",
            "",
            "Validate it on your own labelled slices with `em-unet predict` and `em-unet evaluate` (higher V_rand "
            "and V_info are better).",
        ]
    else:
        lines += [
            "No scores recorded (no scores.json of the training run was found). Validate the model on labelled "
            "slices of your own: `em-unet predict PACKAGE.zip images.tif -o probability.tif`, then "
            "`em-unet evaluate probability.tif labels.tif`.",
        ]
    rule = ", ".join(op["id"] + str(op.get("kwargs", "")) for op in test.ops)
    lines += [
        "",
        "## Input and output",
        "",
        f"- input `{INPUT_NAME}`: axes (batch, y, x, channel), one channel, type {test.raw.dtype}; y and x are "
        f"{minimum} + n x {step} px (multiples of 2^depth = {step}). Preprocessing (em-unet's intensity rule for "
        f"this type, as bioimage.io operations): {rule}. Data of another type needs the same mapping to [0, 1] "
        "(em-unet's rule: 8-bit / 255, 16-bit / 65535, floats in [0, 1] as they are, anything else by its "
        "minimum and maximum).",
        f"- output `{OUTPUT_NAME}`: float32 in [0, 1], the input's shape, 1 = membrane. Halo {halo} px: the "
        "outer 16 px on each side only give context. Consumers mirror-pad the input by the halo and crop it off "
        "the output, as em-unet does, so a whole-slice prediction equals `em-unet predict`'s.",
        f"- test tensors: {test.origin}; the expected output is em-unet's prediction of it.",
        "",
        "## Weights",
        "",
        "| format | file | converted from | max abs. difference from the SavedModel on the test input |",
        "| --- | --- | --- | --- |",
    ]
    files = {"tensorflow_saved_model_bundle": SAVED_MODEL_FILE, "keras_v3": KERAS_FILE, "onnx": ONNX_FILE}
    for weights, difference in max_difference.items():
        parent = "(original)" if weights == source.original else source.original
        if weights == "onnx":
            parent = "tensorflow_saved_model_bundle (tf2onnx)"
        lines.append(f"| {weights} | `{files[weights]}` | {parent} | {difference:.1e} |")
    if onnx_skipped:
        lines += ["", f"No ONNX weights: {onnx_skipped}."]
    lines += [
        "",
        "## How to run it",
        "",
        "- **Fiji**: deepImageJ 3.1 or later (Help > Update > Manage update sites > DeepImageJ), then "
        f"Plugins > DeepImageJ > DeepImageJ Install Model > from a local file: `{package_name}`. Open an EM slice, "
        "Plugins > DeepImageJ > DeepImageJ Run, choose the model: it runs the TensorFlow SavedModel "
        "(`tensorflow_saved_model_bundle`) and shows the membrane probability (deepImageJ pads by the halo and "
        "crops it itself). The SavedModel was written by TensorFlow " + _version("tensorflow") + "; a deepImageJ "
        "whose TensorFlow engine is much older may not load it.",
        "- **ilastik**: Neural Network Classification workflow; give it the .zip (or its bioimage.io id once "
        "uploaded). ilastik runs the ONNX weights where present.",
        "- **napari**: open the slice as a layer and run the Python lines below in napari's console, then "
        "`viewer.add_image(probability)`.",
        "- **Python** (and napari): `pip install bioimageio.core tensorflow` (or onnxruntime instead of "
        "tensorflow), then",
        "",
        "  ```python",
        "  from bioimageio.core import load_model_description, predict",
        "  import tifffile",
        f'  model = load_model_description("{package_name}")',
        "  image = tifffile.imread('slice.tif')[None, :, :, None]  # (batch, y, x, channel)",
        f'  result = predict(model=model, inputs={{"{INPUT_NAME}": image}})',
        f'  probability = result.as_arrays()["{OUTPUT_NAME}"][0, :, :, 0]',
        "  ```",
        "",
        "  (bioimage.io's TensorFlow backend unpacks the SavedModel into `./bioimageio_unzipped_tf_weights`.)",
        f"- **em-unet**: `em-unet predict {package_name} stack.tif -o membrane-probability.tif` (any slice size: "
        "overlap-tile prediction with the package's halo as the tile margin).",
        "",
        "## Limitations",
        "",
        "Trained on the data above only: EM of other tissue, species, section thickness or resolution may need "
        "fine-tuning. The membrane probability is not a neuron segmentation. Slices are predicted one by one "
        "(2-D).",
        "",
    ]
    return "\n".join(lines)


def _rdf(
    name: str,
    description: str,
    source: _Source,
    test: _TestData,
    halo: int,
    minimum: int,
    formats: dict[str, dict],
    authors: Sequence[str],
    github_user: str | None,
    license: str,
    citations: Sequence[dict],
) -> dict:
    """The package's description (format 0.5), naming the staged files by their package names."""
    from bioimageio.spec.model.v0_5 import ModelDescr  # lazy: an optional extra, needed only here

    step = 2**source.depth
    raw = np.dtype(test.raw.dtype)
    data: dict[str, Any] = {"type": raw.name}
    if raw in FIXED_RANGES:
        data["range"] = list(FIXED_RANGES[raw])
    return {
        "format_version": ModelDescr.implemented_format_version,
        "type": "model",
        "name": name,
        "description": description,
        "authors": [
            {"name": author, **({"github_user": github_user} if github_user and i == 0 else {})}
            for i, author in enumerate(authors)
        ],
        "cite": list(citations),
        "license": license,
        "tags": list(TAGS),
        "documentation": {"source": DOCUMENTATION},
        "covers": [{"source": COVER}],
        "inputs": [
            {
                "id": INPUT_NAME,
                "description": "2-D EM slice, one channel; preprocessing maps intensities to [0, 1] as em-unet does",
                "axes": [
                    {"type": "batch"},
                    {"type": "space", "id": "y", "size": {"min": minimum, "step": step}},
                    {"type": "space", "id": "x", "size": {"min": minimum, "step": step}},
                    {"type": "channel", "channel_names": ["em"]},
                ],
                "data": data,
                "pad": {"mode": "reflect"},
                "test_tensor": {"source": TEST_INPUT},
                "sample_tensor": {"source": SAMPLE_INPUT},
                "preprocessing": test.ops,
            }
        ],
        "outputs": [
            {
                "id": OUTPUT_NAME,
                "description": "membrane probability per pixel, float32 in [0, 1] (1 = membrane)",
                "axes": [
                    {"type": "batch"},
                    *(
                        {"type": "space", "id": axis, "size": {"tensor_id": INPUT_NAME, "axis_id": axis}, "halo": halo}
                        for axis in ("y", "x")
                    ),
                    {"type": "channel", "channel_names": ["membrane_probability"]},
                ],
                "data": {"type": "float32", "range": [0.0, 1.0]},
                "test_tensor": {"source": TEST_OUTPUT},
                "sample_tensor": {"source": SAMPLE_OUTPUT},
            }
        ],
        "weights": formats,
        "config": {
            "em_unet": {
                "version": __version__,
                "depth": source.depth,
                "base_filters": source.base_filters,
                "tile_margin": halo,
            }
        },
    }


def _weights(source: _Source, onnx_ok: bool) -> dict[str, dict]:
    """The ``weights`` entries of the staged files (``onnx_ok``: the ONNX file passed its check)."""
    import keras  # lazy: TensorFlow only where a model is packaged
    import tensorflow as tf

    converted = "tensorflow_saved_model_bundle" if source.original == "keras_v3" else "keras_v3"
    formats: dict[str, dict] = {
        "tensorflow_saved_model_bundle": {
            "source": SAVED_MODEL_FILE,
            "tensorflow_version": tf.__version__,
            "comment": f"em-unet's float32 export: signature {SIGNATURE}, input {INPUT_NAME}, output {OUTPUT_NAME}",
        }
    }
    if source.keras_model is not None:
        formats["keras_v3"] = {
            "source": KERAS_FILE,
            "keras_version": keras.__version__,
            "backend": ["tensorflow", tf.__version__],
            "comment": "float32; em-unet's input-size check layer replaced by keras.layers.Identity",
        }
    if onnx_ok:
        formats["onnx"] = {
            "source": ONNX_FILE,
            "opset_version": ONNX_OPSET,
            "parent": "tensorflow_saved_model_bundle",
            "comment": f"tf2onnx {_version('tf2onnx')} from the SavedModel, checked with onnxruntime "
            f"{_version('onnxruntime')} (max |difference| <= {ONNX_TOLERANCE:g} on the test input)",
        }
    if converted in formats:
        formats[converted]["parent"] = source.original
    return formats


def _problem(entry: Any) -> str:
    """One line for an entry of a validation summary: where (if anywhere) and what."""
    where = ".".join(map(str, entry.loc))
    return (f"{where}: " if where else "") + (str(entry.msg).strip().splitlines() or [""])[0]


def _summary_problems(descr: Any) -> tuple[list[str], list[str]]:
    """(errors, warnings of severity WARNING or above) of a description's validation summary, one line each."""
    errors, warnings = [], []
    for detail in descr.validation_summary.details:
        for entry in detail.errors:
            errors.append(_problem(entry))
        for entry in detail.warnings:
            if entry.severity >= 30:  # bioimageio.spec's WARNING: below it, cosmetic notes
                warnings.append(_problem(entry))
    return errors, warnings


# ---------------------------------------------------------------- writing a package


def package_model(
    model: str | Path,
    output: str | Path,
    *,
    folder: bool = False,
    run_dir: str | Path | None = None,
    data: str | Path | None = None,
    authors: Sequence[str] = (),
    license: str = DEFAULT_LICENSE,
    cite: str | None = None,
    name: str | None = None,
    github_user: str | None = None,
    onnx: bool = True,
    overwrite: bool = False,
) -> PackageReport:
    """Write a bioimage.io model package (format 0.5) of an em-unet model; see the module docstring.

    Args:
        model: a SavedModel version folder, its parent (the newest version is taken), or a ``.keras`` file.
        output: the ``.zip`` to write, or with ``folder`` the folder of the unzipped package.
        run_dir: the training run folder (``LOGS_DIR/<run>``) whose ``config.json`` and ``scores.json``
            document the model; default: the ``.keras`` file's folder. Without one the package documents what
            the model itself tells, and a warning says so once.
        data: the stack whose slice gives the test tensors and the cover; default: the run's data (its first
            validation slice); else its last slice; with neither, a synthetic image.
        authors: the authors' names; default: the login name.
        license: an SPDX license id.
        cite: ``"TEXT|DOI"`` or ``"TEXT|URL"``: a citation besides the U-Net paper's.
        name: the model's name (5-128 letters, digits, spaces, ``_+-()``).
        github_user: the first author's GitHub account, the maintainer the Model Zoo asks for (bioimage.io
            checks that it exists, on GitHub: online only).
        onnx: also convert to ONNX (kept only when onnxruntime reproduces the SavedModel).
        overwrite: replace an existing output.

    Raises:
        EmUnetError: a one-line message naming the file, flag or value; nothing is left behind.
    """
    started = time.monotonic()
    output = check_package_output(output, folder, overwrite)  # before anything loads: fail fast
    authors = [a.strip() for a in authors if a.strip()] or [getpass.getuser()]
    for author in authors:
        if "/" in author:
            raise EmUnetError(f"--author {author!r}: an author's name may not contain '/'")
    if name is not None and not NAME_CHARACTERS.fullmatch(name):
        raise EmUnetError(
            f"--name {name!r}: a bioimage.io model name is 5-128 letters, digits, spaces and _+-() characters"
        )
    citations = [UNET_CITATION]
    if cite:
        text, _, where = cite.rpartition("|")
        if not text.strip() or not where.strip():
            raise EmUnetError(f"--cite {cite!r}: give TEXT|DOI or TEXT|URL, e.g. 'Doe J. (2025) ...|10.1000/xyz'")
        citations.append({"text": text.strip(), ("url" if "://" in where else "doi"): where.strip()})
    spec = _require_bioimageio()
    import httpx  # lazy: bioimageio.spec's HTTP client, for its errors
    from bioimageio.spec._internal.license_id import LicenseId  # lazy: an optional extra, needed only here

    try:
        LicenseId(license)
    except ValueError:
        raise EmUnetError(
            f"--license {license!r}: not an SPDX license id bioimage.io knows (e.g. CC-BY-4.0, CC0-1.0, MIT, "
            "BSD-3-Clause, Apache-2.0)"
        ) from None
    model_path = resolve_model_path(model)
    if is_package(model_path):
        raise EmUnetError(f"{model_path}: already a bioimage.io package; package takes a SavedModel or a .keras file")
    size = sum(p.stat().st_size for p in model_path.rglob("*") if p.is_file()) if model_path.is_dir() else None
    check_free_space(output.parent, 4 * (size or model_path.stat().st_size) + (16 << 20), "the package")

    with tempfile.TemporaryDirectory(prefix="em-unet-package-") as tmp:
        staging = Path(tmp) / "package"
        staging.mkdir()
        source = _source(model_path, run_dir, Path(tmp))
        if source.config is None:
            warn(
                f"{model_path}: no config.json of its training run found (pass --run LOGS_DIR/RUN): the package "
                "documents only what the model tells (no training data, command or scores)"
                + ("" if data else ", and its test image is synthetic")
            )
        predictor = load_saved_model(source.saved_model)[0]
        test = _test_data(source, predictor, data)
        halo = Tiling().margin
        step = 2**source.depth
        minimum = step * (2 * halo // step + 1)  # the smallest side left with output once the halo is cropped

        _zip_folder(source.saved_model, staging / SAVED_MODEL_FILE, skip=("model.keras",))
        max_difference = {"tensorflow_saved_model_bundle": 0.0}
        if source.keras_model is not None:
            portable = _portable_keras(source.keras_model)
            portable.save(staging / KERAS_FILE)
            out = keras_predictor(portable)(test.preprocessed[None, ..., None])
            max_difference["keras_v3"] = float(np.abs(out[0, ..., 0] - test.expected).max())
        onnx_skipped = "not asked for (--no-onnx)" if not onnx else None
        if onnx:
            difference, onnx_skipped = _onnx(source.saved_model, staging / ONNX_FILE, test)
            if difference is not None:
                max_difference["onnx"] = difference
            else:
                (staging / ONNX_FILE).unlink(missing_ok=True)
                warn(f"{model_path}: the package has no ONNX weights: {onnx_skipped}")

        np.save(staging / TEST_INPUT, test.raw[None, ..., None])
        np.save(staging / TEST_OUTPUT, test.expected[None, ..., None])
        sample = test.raw if test.raw.dtype in (np.uint8, np.uint16) else test.preprocessed  # types TIFF readers take
        Image.fromarray(sample).save(staging / SAMPLE_INPUT)
        Image.fromarray(test.expected).save(staging / SAMPLE_OUTPUT)
        _cover(test, halo, staging / COVER)

        run_name = source.run_dir.name if source.run_dir else model_path.parent.name
        name = name or f"EM membrane U-Net (em-unet depth {source.depth})"
        filters = f", {source.base_filters} base filters" if source.base_filters else ""
        description = (
            f"Neuronal membrane probability in 2-D electron-microscopy slices: a U-Net (depth {source.depth}"
            f"{filters}) trained with em-unet"
            + (f" on {Path(str(source.config.get('data'))).name} ({run_name})" if source.config else "")
            + "."
        )
        package_name = output.name if not folder else f"{output.name}/"
        (staging / DOCUMENTATION).write_text(
            _documentation(name, source, test, halo, minimum, max_difference, onnx_skipped, package_name),
            encoding="utf-8",
        )
        formats = _weights(source, "onnx" in max_difference)
        rdf = _rdf(name, description, source, test, halo, minimum, formats, authors, github_user, license, citations)

        context = spec.ValidationContext(root=staging, file_name=RDF_NAMES[0], perform_io_checks=True)
        try:
            descr = spec.build_description(rdf, context=context)
        except httpx.HTTPError as err:  # bioimage.io looks --github-user up on GitHub
            raise EmUnetError(
                f"--github-user {github_user}: bioimage.io checks it on GitHub, which it cannot reach ({err}); "
                "package without --github-user offline"
            ) from None
        errors, warnings = _summary_problems(descr)
        if errors or isinstance(descr, spec.InvalidDescr):
            raise EmUnetError(f"bioimage.io refuses the package's description: {(errors or ['invalid'])[0]}")
        for line in warnings:
            warn(f"bioimage.io: {line}")
        try:
            if folder:
                with new_folder(output.parent):
                    built = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
                    try:
                        spec.save_bioimageio_package_as_folder(descr, output_path=built)
                        _replace_folder(built, output)
                    finally:
                        shutil.rmtree(built, ignore_errors=True)
            else:
                with atomic_output(output, overwrite) as partial:
                    spec.save_bioimageio_package(descr, output_path=partial)
        except httpx.HTTPError as err:  # its check of the written package looks --github-user up again
            raise EmUnetError(f"--github-user {github_user}: GitHub cannot be reached ({err})") from None
        except ValueError as err:  # the format's own check of the written package
            reason = str(err).splitlines()[0]
            raise EmUnetError(f"{output}: bioimage.io refuses the written package ({reason})") from None
    size_bytes = sum(p.stat().st_size for p in output.rglob("*") if p.is_file()) if folder else output.stat().st_size
    return PackageReport(
        output,
        size_bytes,
        list(formats),
        max_difference,
        onnx_skipped,
        time.monotonic() - started,
        warnings,
    )


def _replace_folder(built: Path, output: Path) -> None:
    """Rename the folder ``built`` to ``output``, an older ``output`` folder moved aside first and removed
    only once the new one is in place."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
        os.replace(output, old / "package")
    try:
        os.replace(built, output)
    except OSError:
        if old is not None:
            os.replace(old / "package", output)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def describe_report(report: PackageReport) -> str:
    """What ``em-unet package`` prints: the package, its size, its weights and their differences."""
    others = {k: v for k, v in report.max_difference.items() if k != "tensorflow_saved_model_bundle"}
    differences = ", ".join(f"{k} {v:.1e}" for k, v in others.items())
    lines = [
        f"wrote {report.path} ({human_size(report.size_bytes)}, {report.seconds:.0f} s): bioimage.io model with "
        f"weights {', '.join(report.formats)}",
        f"max |difference| from the SavedModel on the test input: {differences or 'no other formats'}",
    ]
    if report.onnx_skipped:
        lines.append(f"no ONNX weights: {report.onnx_skipped}")
    lines.append(f"test it: bioimageio test {report.path}")
    return "\n".join(lines)
