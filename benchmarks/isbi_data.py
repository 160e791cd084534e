"""Where the benchmarks find ISBI 2012, as the tests do: ``EM_UNET_ISBI_DIR``, else
``../shared/data/isbi2012`` beside the checkout."""

import os
from pathlib import Path

ISBI = Path(os.environ.get("EM_UNET_ISBI_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"))
