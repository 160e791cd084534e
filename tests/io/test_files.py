import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from em_unet.errors import EmUnetError
from em_unet.io.files import atomic_output, check_free_space, check_writable, exclusive, lock_path, new_folder


def snapshot(root):
    """Every file and folder below ``root`` with the bytes of each file: what a refusal must not change."""
    found = {}
    for folder, folders, files in os.walk(root):
        for name in folders:
            found[os.path.relpath(os.path.join(folder, name), root)] = "folder"
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = handle.read()
    return found


def one_line(err):
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture
def tree(tmp_path):
    """An earlier result, a file where a folder might be expected, and a folder."""
    (tmp_path / "old.tif").write_bytes(b"earlier result")
    (tmp_path / "blocker").write_text("a file")
    (tmp_path / "folder").mkdir()
    return tmp_path


# ------------------------------------------------------------------ check_writable looks, never creates


@pytest.mark.parametrize(
    "relative, overwrite, expected",
    [
        ("old.tif", False, "old.tif already exists: choose another output path or pass --overwrite"),
        ("folder", False, "folder is a folder: name a file to write"),
        ("folder", True, "folder is a folder: name a file to write"),
        ("blocker/out.tif", False, "blocker is a file, not a folder"),
        ("blocker/deeper/still/out.tif", True, "blocker is a file, not a folder"),
        ("new/blocker/out.tif", False, ""),  # a missing folder on the way is fine: made at write time
    ],
)
def test_check_writable_refuses_without_creating_anything(tree, relative, overwrite, expected):
    before = snapshot(tree)
    if not expected:
        assert check_writable(tree / relative, overwrite) == tree / relative
    else:
        with pytest.raises(EmUnetError) as err:
            check_writable(tree / relative, overwrite)
        assert expected in one_line(err)
        assert str(tree / relative.split("/")[0]) in one_line(err)
    assert snapshot(tree) == before


@pytest.mark.parametrize(
    "path", ["/proc/em-unet-probe.tif", "/proc/self/em-unet/out.tif", "/sys/em-unet.tif", "/sys/kernel/new/out.json"]
)
def test_kernel_interfaces_are_refused(path):
    with pytest.raises(EmUnetError) as err:
        check_writable(path, overwrite=True)
    assert one_line(err).startswith(f"{path}: /") and "not a place for output files" in one_line(err)
    assert not os.path.lexists(path)


def test_read_only_and_unwritable_folders_are_refused(tmp_path, monkeypatch):
    before = snapshot(tmp_path)
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, stats):
            self.stats = stats

        def __getattr__(self, name):
            return os.ST_RDONLY if name == "f_flag" else getattr(self.stats, name)

    # a read-only mount cannot be made in a test; statvfs reports one as this does
    with monkeypatch.context() as patch:
        patch.setattr(os, "statvfs", lambda path: ReadOnly(real_statvfs(path)))
        for target in (tmp_path / "out.tif", tmp_path / "missing" / "out.tif"):
            with pytest.raises(EmUnetError) as err:
                check_writable(target)
            assert f"{target}: folder {tmp_path} is on a read-only file system" == one_line(err)
    # root may write anywhere, so permissions are simulated the way os.access would report them
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda path, mode: False)
        with pytest.raises(EmUnetError) as err:
            check_writable(tmp_path / "a" / "b.tif")
        assert one_line(err) == f"{tmp_path / 'a' / 'b.tif'}: folder {tmp_path} is not writable"
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ atomic_output


def test_atomic_output_makes_missing_folders_and_renames_into_place(tmp_path):
    with atomic_output(tmp_path / "a" / "b" / "scores.json") as tmp:
        assert tmp.parent == tmp_path / "a" / "b" and tmp.name.startswith(".scores.json.")
        tmp.write_text("{}")
    assert snapshot(tmp_path) == {"a": "folder", "a/b": "folder", "a/b/scores.json": b"{}"}
    with atomic_output(tmp_path / "a" / "b" / "scores.json", overwrite=True) as tmp:
        tmp.write_text("[]")
    assert (tmp_path / "a" / "b" / "scores.json").read_text() == "[]"


@pytest.mark.parametrize(
    "failure, expected",
    [
        (ValueError("the model failed"), ValueError),
        (KeyboardInterrupt(), KeyboardInterrupt),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), EmUnetError),
        (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), EmUnetError),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), EmUnetError),
    ],
)
@pytest.mark.parametrize("relative", ["old.tif", "new/deeper/out.tif", "folder/new/out.tif"])
def test_a_failed_write_leaves_everything_as_it_was(tree, failure, expected, relative):
    before = snapshot(tree)
    target = tree / relative
    with pytest.raises(expected) as err, atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"half a result")
        raise failure
    if expected is EmUnetError:
        assert one_line(err) == f"{target}: {failure.strerror}"
    assert snapshot(tree) == before


def test_disk_full_while_writing_names_the_output(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with pytest.raises(EmUnetError) as err, atomic_output(tmp_path / "run" / "prob.tif") as tmp:
        tmp.write_bytes(b"partial")
        with open("/dev/full", "wb") as full:  # every write there fails with ENOSPC, as on a full disk
            full.write(b"x" * 65536)
    assert one_line(err) == f"{tmp_path / 'run' / 'prob.tif'}: No space left on device"
    assert os.listdir(tmp_path) == []


def test_an_error_about_another_file_names_that_file(tmp_path):
    with pytest.raises(EmUnetError) as err, atomic_output(tmp_path / "out" / "prob.tif"):
        (tmp_path / "missing-input.tif").read_bytes()
    assert one_line(err) == f"{tmp_path / 'missing-input.tif'}: No such file or directory"
    assert os.listdir(tmp_path) == []


def test_a_folder_that_gained_other_files_is_kept(tmp_path):
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "a" / "b" / "out.tif"):
        (tmp_path / "a" / "other.txt").write_text("written meanwhile by someone else")
        raise RuntimeError("failed")
    assert snapshot(tmp_path) == {"a": "folder", "a/other.txt": b"written meanwhile by someone else"}


# ------------------------------------------------------------------ new_folder


def test_new_folder_makes_the_folder_and_keeps_it_on_success(tmp_path):
    with new_folder(tmp_path / "logs" / "run") as run:
        assert run.is_dir()
        (run / "config.json").write_text("{}")
    assert snapshot(tmp_path) == {"logs": "folder", "logs/run": "folder", "logs/run/config.json": b"{}"}
    with new_folder(tmp_path / "logs" / "run"):  # an existing folder is fine, and left alone
        pass
    assert (tmp_path / "logs" / "run" / "config.json").exists()


@pytest.mark.parametrize("existing", [[], ["logs"], ["logs", "logs/study"], ["logs", "logs/study", "logs/study/run"]])
@pytest.mark.parametrize("failure", [RuntimeError("training failed"), KeyboardInterrupt(), EmUnetError("refused")])
def test_new_folder_removes_only_what_it_made_when_the_block_fails(tmp_path, existing, failure):
    for name in existing:
        (tmp_path / name).mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(type(failure)), new_folder(tmp_path / "logs" / "study" / "run"):
        raise failure
    assert snapshot(tmp_path) == before


def test_new_folder_keeps_a_folder_that_holds_files(tmp_path):
    with pytest.raises(RuntimeError), new_folder(tmp_path / "logs" / "run") as run:
        (run / "events.out.tfevents.1").write_bytes(b"epoch 1")
        raise RuntimeError("diverged")
    assert (tmp_path / "logs" / "run" / "events.out.tfevents.1").read_bytes() == b"epoch 1"


@pytest.mark.parametrize("relative", ["blocker/run", "blocker/a/b/run", "blocker"])
def test_new_folder_under_a_file_is_refused_and_makes_nothing(tree, relative):
    before = snapshot(tree)
    with pytest.raises(EmUnetError) as err, new_folder(tree / relative):
        pytest.fail("the block must not run")
    assert one_line(err).startswith(f"{tree / relative}: cannot create folder")
    assert snapshot(tree) == before


# ------------------------------------------------------------------ check_free_space


def test_free_space(tmp_path):
    free = check_free_space(tmp_path / "not" / "yet" / "made", 1, "the run's checkpoints")
    assert free > 0
    assert not (tmp_path / "not").exists()
    for needed in (free + 2**40, 2**62):
        with pytest.raises(EmUnetError) as err:
            check_free_space(tmp_path / "run", needed, "the run's checkpoints")
        message = one_line(err)
        assert message.startswith(f"{tmp_path}: ") and "free but" in message
        assert "needed for the run's checkpoints" in message and "iB" in message
    assert os.listdir(tmp_path) == []


HOLD_LOCK = """
import sys, time
from em_unet.io.files import exclusive
with exclusive(sys.argv[1], "the test output"):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(path):
    """A real process that holds the lock of ``path`` until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_process_is_refused_naming_the_first_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    target = tmp_path / "out.zarr"
    holder = hold_lock(target)
    try:
        for _ in range(2):  # refused, and refused again: a refusal does not disturb the holder's lock
            with pytest.raises(EmUnetError, match=rf"in use by process {holder.pid} on {socket.gethostname()}"):
                with exclusive(target, "the test output"):
                    pass
        assert json.loads(lock_path(target).read_text())["pid"] == holder.pid
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, stale
        holder.wait()
    assert lock_path(target).exists()
    with exclusive(target, "the test output") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"process {holder.pid} that held the test output is gone; taking its lock over" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # released: nothing left behind


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    lock_path(tmp_path / "run").write_text(json.dumps({"pid": 1, "host": "node7", "command": "em-unet train"}))
    with pytest.raises(EmUnetError, match=r"in use by process 1 on node7 \(em-unet train\).*delete .*run.lock"):
        with exclusive(tmp_path / "run", "the training run"):
            pass
    assert lock_path(tmp_path / "run").exists()
