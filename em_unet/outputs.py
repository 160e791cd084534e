"""Writing results without losing earlier ones: refuse to overwrite, write to a temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from em_unet.errors import EmUnetError


def check_writable(path: str | Path, overwrite: bool = False) -> Path:
    """Raise a one-line error if ``path`` exists (unless ``overwrite``) or its folder cannot be written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise EmUnetError(f"{path} already exists: choose another output path or pass --overwrite")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EmUnetError(f"{path}: cannot create folder {folder} ({err.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise EmUnetError(f"{path}: folder {folder} is not writable")
    return path


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = False):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on failure delete it."""
    path = check_writable(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
