"""The package's layers, read from its imports: lower layers never import higher ones, there is no cycle,
and the commands that need no model never load TensorFlow."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

PACKAGE = Path(__file__).resolve().parents[1] / "em_unet"

# Each module's layer; a module may import its own layer's and lower layers' modules only.
LAYERS = [
    ("em_unet", "em_unet.errors", "em_unet.settings", "em_unet.machine", "em_unet.cluster"),
    ("em_unet.io",),
    ("em_unet.segmentation", "em_unet.reporting"),
    ("em_unet.config",),
    ("em_unet.inference",),
    ("em_unet.training",),
    ("em_unet.cli",),
]
# Upward imports made on purpose, each inside a function.
ALLOWED_UPWARD = {
    # a .keras file names the U-Net's custom layer: loading one registers it
    ("em_unet.inference.predict", "em_unet.training.model"),
    # TrainConfig.augment_config builds the augmentation settings it declares
    ("em_unet.config", "em_unet.training.augment"),
}
NO_TENSORFLOW_AT_IMPORT = ("em_unet.io", "em_unet.segmentation", "em_unet.reporting", "em_unet.inference")
EXPORTER = "em_unet.inference.export"  # writes SavedModels: TensorFlow throughout, imported by training only


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "em_unet" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, module
    return best[0]


def imports(path: Path):
    """(imported module, at module level?) for each import statement of ``path``."""
    tree = ast.parse(path.read_text())
    inside_functions = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "em_unet":  # from em_unet import __version__
                yield "em_unet", id(node) not in inside_functions
            else:
                yield node.module, id(node) not in inside_functions
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) not in inside_functions


def modules():
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "tuning" not in p.parts}


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for name, path in modules().items():
        for imported, _ in imports(path):
            if imported.startswith("em_unet") and layer_of(imported) > layer_of(name):
                if (name, imported) not in ALLOWED_UPWARD:
                    wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


def test_module_level_imports_have_no_cycle():
    found = modules()
    graph = {name: {i for i, top in imports(path) if top and i in found and i != name} for name, path in found.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for following in graph[node]:
            if state.get(following) == 1:
                raise AssertionError(" -> ".join([*trail, node, following]))
            if following not in state:
                visit(following, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_low_layers_do_not_import_tensorflow_at_module_level():
    wrong = [
        f"{name}: {imported}"
        for name, path in modules().items()
        if name.startswith(NO_TENSORFLOW_AT_IMPORT) and name != EXPORTER
        for imported, top in imports(path)
        if top and imported.split(".")[0] in ("tensorflow", "keras")
    ]
    assert not wrong, wrong


def test_lazy_imports_are_commented():
    """Imports inside functions are deliberate (TensorFlow, Dask, slow format backends) and say why."""
    silent = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                    if "#" not in here and not above.startswith("#") and "import" not in above:
                        silent.append(f"{name}:{node.lineno}: {here.strip()}")
    assert not silent, silent


def run_without_tensorflow(tmp_path, argv):
    """Run ``em-unet ARGV`` in a fresh interpreter; return the modules of TensorFlow and Keras it loaded."""
    code = (
        "import sys; from em_unet import cli; status = cli.main(sys.argv[1:]); "
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)); sys.exit(status)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_evaluate_segment_and_plot_do_not_load_tensorflow(tmp_path, isbi_dir):
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[15:17, :128, :128]
    probability = np.where(labels > 0, 0.1, 0.9).astype(np.float32)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    tifffile.imwrite(tmp_path / "probability.tif", probability)
    run = tmp_path / "logs" / "run"
    run.mkdir(parents=True)
    (run / "history.csv").write_text("epoch,loss,val_loss\n0,0.5,0.6\n1,0.4,0.5\n")
    for argv in (
        ["evaluate", "probability.tif", "labels.tif"],
        ["segment", "probability.tif", "-o", "neurons.tif"],
        ["evaluate", "neurons.tif", "labels.tif"],
        ["plot", "logs", "-o", "plots"],
    ):
        assert run_without_tensorflow(tmp_path, argv) == "[]", argv
