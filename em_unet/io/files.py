"""Writing results without losing earlier ones or leaving debris behind.

:func:`check_writable` only looks (a refused command creates nothing); :func:`atomic_output` writes
to a temporary name and renames it into place, and :func:`new_folder` makes a folder: both remove,
when their block fails, what they created.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from em_unet.errors import EmUnetError, warn

SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"))  # kernel interfaces: writing there is never an output


def _nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest ancestor that does (relative stays relative)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _is_read_only(folder: Path) -> bool:
    """True when ``folder`` lies on a file system mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): os.access alone decides
        return False


def check_writable(path: str | Path, overwrite: bool = False) -> Path:
    """Raise a one-line :class:`EmUnetError` unless a file could be written at ``path``; create nothing.

    Refused: an existing ``path`` (unless ``overwrite``), a ``path`` that is a folder, a path below
    ``/proc`` or ``/sys``, and a path whose nearest existing ancestor is a file, is not writable or
    lies on a read-only file system. Missing folders on the way are fine: :func:`atomic_output`
    makes them when it writes.
    """
    path = Path(path)
    if path.is_dir():
        raise EmUnetError(f"{path} is a folder: name a file to write, e.g. {path / 'output'}")
    if path.exists() and not overwrite:
        raise EmUnetError(f"{path} already exists: choose another output path or pass --overwrite")
    resolved = Path(os.path.realpath(path))
    for system in SYSTEM_FOLDERS:
        if resolved == system or system in resolved.parents:
            raise EmUnetError(
                f"{path}: {system} is a kernel interface, not a place for output files: "
                "choose a path in your own folders"
            )
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        raise EmUnetError(f"{path}: {folder} is a file, not a folder")
    if _is_read_only(folder):
        raise EmUnetError(f"{path}: folder {folder} is on a read-only file system")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EmUnetError(f"{path}: folder {folder} is not writable")
    return path


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty; a folder that gained files stays."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): its ancestors are not empty either


@contextlib.contextmanager
def new_folder(path: str | Path) -> Iterator[Path]:
    """Create the folder ``path`` and its missing parents; yield ``path``.

    If the block raises (including Ctrl-C), the folders this call created are removed again where
    they are still empty, and the error propagates. Folders that existed before are never touched.
    A folder that cannot be made is a one-line :class:`EmUnetError`.
    """
    path = Path(path)
    missing = []
    ancestor = path
    while not ancestor.is_dir() and ancestor != ancestor.parent:
        missing.append(ancestor)
        ancestor = ancestor.parent
    created: list[Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                _remove_empty(created)
                raise EmUnetError(f"{path}: cannot create folder {folder}: a file of that name exists") from None
            continue  # made meanwhile by someone else: not ours to remove
        except OSError as err:
            _remove_empty(created)
            raise EmUnetError(f"{path}: cannot create folder {folder} ({err.strerror})") from None
        created.append(Path(os.path.abspath(folder)))  # removable even if the block changes directory
    try:
        yield path
    except BaseException:
        _remove_empty(created)
        raise


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    Missing parent folders are created first. If the block fails, the temporary file and the
    folders created for it are removed, so an earlier ``path`` is kept unchanged and nothing new is
    left behind. An :class:`OSError` (disk full, permissions) becomes a one-line
    :class:`EmUnetError` naming the file, e.g. ``out.tif: No space left on device``.
    """
    path = check_writable(path, overwrite)
    tmp = None
    try:
        with new_folder(path.parent):
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + path.suffix, dir=path.parent)
            os.close(fd)
            tmp = Path(name)
            try:
                yield tmp
                os.replace(tmp, path)
            finally:
                if tmp.exists():
                    tmp.unlink()  # before new_folder looks whether its folders are empty
    except OSError as err:
        # a file named in the error other than ours is the block's own input: name that one
        ours = {os.path.abspath(p) for p in (path, tmp) if p is not None}
        other = err.filename is not None and os.path.abspath(os.fsdecode(err.filename)) not in ours
        named = os.fsdecode(err.filename) if other else path
        raise EmUnetError(f"{named}: {err.strerror or err}") from None


def human_size(n_bytes: float) -> str:
    """``n_bytes`` as a short human-readable size (powers of 1024, up to TiB)."""
    if n_bytes < 1024:
        return f"{n_bytes:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n_bytes /= 1024
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}"


def free_space(path: str | Path) -> tuple[Path, int]:
    """The folder whose file system would hold ``path`` (its nearest existing ancestor), and its free bytes."""
    folder = _nearest_existing(Path(path))
    if not folder.is_dir():
        folder = folder.parent
    stats = os.statvfs(folder)
    return folder, stats.f_bavail * stats.f_frsize


def check_free_space(path: str | Path, needed_bytes: int, what: str) -> int:
    """Raise a one-line :class:`EmUnetError` unless ``needed_bytes`` (bytes) are free where ``path`` would go.

    ``path`` need not exist: its nearest existing ancestor's file system is asked. ``what`` names the
    data in the message (e.g. ``"the run's checkpoints"``). Returns the free bytes.
    """
    folder, free = free_space(path)
    if free < needed_bytes:
        raise EmUnetError(
            f"{folder}: {human_size(free)} free but {human_size(needed_bytes)} needed for {what}: "
            "free some space or choose another folder"
        )
    return free


LOCK_SUFFIX = ".lock"


def lock_path(path: str | Path) -> Path:
    """The lock file that guards the output or run folder ``path``: ``path.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _lock_owner(lock: Path) -> dict | None:
    """What a lock file says of its owner (pid, host, command), or None if it is gone or unreadable."""
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[Path]:
    """Hold the lock of ``path`` (an output or a run folder, ``what`` names it in messages) for the block.

    The lock is a file ``path.lock`` made with ``O_EXCL`` that records this process's PID, host and command
    line, and is removed when the block ends. Another process that holds it is named in a one-line
    :class:`EmUnetError`. A stale lock, whose process on this host is gone, is taken over with a notice on
    stderr; a lock from another host is never judged stale (its process cannot be asked)."""
    lock = lock_path(path)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv), "since": time.time()}
    with new_folder(lock.parent):
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _lock_owner(lock)
                if owner is None:  # being written this instant, or emptied: look again
                    time.sleep(0.1)
                    owner = _lock_owner(lock) or {}
                pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and isinstance(pid, int) and not _process_alive(pid):
                    warn(f"{lock}: process {pid} that held {what} is gone; taking its lock over")
                    lock.unlink(missing_ok=True)
                    continue
                raise EmUnetError(
                    f"{path}: {what} is in use by process {pid} on {host} ({owner.get('command', '?')}): wait for "
                    f"it to end, or delete {lock} if that process is gone"
                ) from None
            except OSError as err:
                raise EmUnetError(f"{lock}: cannot create the lock of {what} ({err.strerror})") from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            break
        else:
            raise EmUnetError(f"{lock}: cannot take the lock of {what}; another process keeps taking it")
        try:
            yield lock
        finally:
            if (_lock_owner(lock) or {}).get("pid") == me["pid"]:
                lock.unlink(missing_ok=True)
