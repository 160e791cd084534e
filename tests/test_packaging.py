"""What a user gets from `pip install .` (not -e): the TOML files ship inside the package."""

import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_ships_its_tomls(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, REPO], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr
    wheel = next(wheels.glob("em_unet-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    # The dependencies (TensorFlow, ...) come from this environment's site-packages, appended after the
    # fresh venv's own; em_unet itself only from the wheel (no path to the checkout, whose .pth files
    # are not processed from here).
    fresh_site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    ours = [p for p in site.getsitepackages() + [sysconfig.get_path("purelib")] if Path(p).is_dir()]
    (fresh_site / "borrowed-dependencies.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"}

    where = subprocess.run(
        [python, "-c", "import em_unet; print(em_unet.__file__)"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert where.returncode == 0 and where.stdout.startswith(str(fresh_site)), where.stdout + where.stderr
    help_ = subprocess.run(
        [venv / "bin" / "em-unet", "study", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert help_.returncode == 0 and "seed-study.toml" in help_.stdout, help_.stderr
    loaded = subprocess.run(
        [
            python,
            "-c",
            "from em_unet.training.study import load_study; from em_unet.training.tune import load_search_space; "
            "s = load_study(); print(sorted(s['experiments'])); print(load_search_space()['space'])",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "['augmentation', 'depth', 'lr', 'optimizer']" in loaded.stdout and "adamax" in loaded.stdout
