import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
ISBI_DIR = Path(os.environ.get("EM_UNET_ISBI_DIR", REPO.parent / "shared" / "data" / "isbi2012"))
FIJI_REFERENCE_DIR = Path(
    os.environ.get("EM_UNET_FIJI_REFERENCE_DIR", REPO.parent / "shared" / "data" / "fiji-reference")
)


@pytest.fixture(scope="session")
def isbi_dir() -> Path:
    """ISBI 2012 slices 0-19 (set EM_UNET_ISBI_DIR to use another copy). Never downloaded."""
    missing = [n for n in ("train-volume.tif", "train-labels.tif") if not (ISBI_DIR / n).exists()]
    if missing:
        pytest.fail(f"ISBI 2012 data not found in {ISBI_DIR} (missing {missing}); set EM_UNET_ISBI_DIR")
    return ISBI_DIR


@pytest.fixture(scope="session")
def fiji_reference_dir() -> Path:
    """Three membrane maps with the scores Fiji's own Java code gives them (set EM_UNET_FIJI_REFERENCE_DIR
    to use another copy). Never downloaded."""
    if not (FIJI_REFERENCE_DIR / "fiji-scores.json").exists():
        pytest.fail(f"Fiji reference scores not found in {FIJI_REFERENCE_DIR}; set EM_UNET_FIJI_REFERENCE_DIR")
    return FIJI_REFERENCE_DIR
