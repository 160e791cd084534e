import keras
import pytest

from em_unet.errors import EmUnetError
from em_unet.training.keras_patches import CHECKED_KERAS, check_keras_version, multi_worker_fit


@pytest.mark.parametrize("version", ["3.12.0", "3.16.0", "4.0.1", "2.15.0"])
def test_unchecked_keras_versions_are_refused_for_multi_worker(version):
    with pytest.raises(EmUnetError, match=f"this is Keras {version}"):
        check_keras_version(version)


def test_the_installed_keras_is_a_checked_one_and_setup_py_bounds_it():
    from pathlib import Path

    check_keras_version(keras.__version__)
    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    assert f'"keras>={CHECKED_KERAS[0]},<3.{int(CHECKED_KERAS[-1].split(".")[1]) + 1}"' in setup


def test_outside_multi_worker_keras_is_left_alone():
    from keras.src.backend.tensorflow import trainer as keras_trainer

    from em_unet.training.model import build_unet

    original = keras_trainer.reduce_per_replica
    model = build_unet(depth=2, base_filters=4)
    with multi_worker_fit(model, None):
        assert keras_trainer.reduce_per_replica is original
    assert "_maybe_symbolic_build" not in vars(model)
