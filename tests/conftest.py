import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
ISBI_DIR = Path(os.environ.get("EM_UNET_ISBI_DIR", REPO.parent / "shared" / "data" / "isbi2012"))


@pytest.fixture(scope="session")
def isbi_dir() -> Path:
    """ISBI 2012 slices 0-19 (set EM_UNET_ISBI_DIR to use another copy). Never downloaded."""
    missing = [n for n in ("train-volume.tif", "train-labels.tif") if not (ISBI_DIR / n).exists()]
    if missing:
        pytest.fail(f"ISBI 2012 data not found in {ISBI_DIR} (missing {missing}); set EM_UNET_ISBI_DIR")
    return ISBI_DIR
