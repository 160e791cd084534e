"""What this machine is: CPU model and flags, cores, GPUs; used to pick defaults and to label measurements."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sys
import tempfile
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``amx_bf16``, ``avx512_bf16``, ...); empty where /proc/cpuinfo is missing."""
    return set(_cpuinfo().get("flags", "").split())


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """CPU threads for each of ``workers`` local worker processes: this machine's cores shared among them."""
    return max(1, cpu_cores() // max(1, workers))


def gpu_count() -> int:
    """The GPUs TensorFlow sees here."""
    import tensorflow as tf  # lazy: only callers that may place work on GPUs pay for TensorFlow

    return len(tf.config.list_physical_devices("GPU"))


def machine_description() -> str:
    """E.g. ``Intel(R) Xeon(R) Processor, 2 cores, AMX-BF16, TensorFlow 2.21.0, no GPU``."""
    import tensorflow as tf  # lazy: this module also serves commands that never load TensorFlow

    model = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    bf16 = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in cpu_flags()]
    gpus = tf.config.list_physical_devices("GPU")
    return ", ".join(
        [
            model,
            f"{cpu_cores()} cores",
            *bf16,
            f"TensorFlow {tf.__version__}",
            f"{len(gpus)} GPU" if gpus else "no GPU",
        ]
    )


# The precisions a run trains in (--precision): Keras dtype policies, and "auto", which resolve_precision
# turns into one of them on this machine.
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


def resolve_precision(precision: str) -> str:
    """``auto``: bfloat16 on CPUs with AMX or AVX512-BF16 and on GPUs of compute capability >= 8,
    float16 on older GPUs, float32 otherwise."""
    import tensorflow as tf  # lazy: this module also serves commands that never load TensorFlow

    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        return "mixed_bfloat16" if capability >= (8, 0) else "mixed_float16"
    return "mixed_bfloat16" if cpu_flags() & {"amx_bf16", "avx512_bf16"} else "float32"


@contextlib.contextmanager
def precision_policy(precision: str):
    """Set Keras' global dtype policy for the block (``auto`` resolved) and yield its name; the previous
    policy is restored however the block ends."""
    import keras  # lazy: this module also serves commands that never load TensorFlow

    previous = keras.mixed_precision.global_policy()
    resolved = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(resolved)
    try:
        yield resolved
    finally:
        keras.mixed_precision.set_global_policy(previous)


# TensorFlow's start-up lines that TF_CPP_MIN_LOG_LEVEL no longer reaches (absl's INFO lines, e.g. the
# oneDNN notice, and absl's preface to them); anything else TensorFlow prints while importing is kept.
STARTUP_CHATTER = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|I\d{4} [\d:.]+ +\d+ \S+:\d+\] )"
)


LOG_LINE = re.compile(r"^([IWEF]\d{4} |WARNING|ERROR|Traceback|\S+Warning)")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its start-up chatter kept off stderr (it writes to file descriptor 2
    directly, so ``sys.stderr`` cannot catch it); whatever else it prints is passed on."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401  # lazy: the point of this function
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
    kept, dropping = [], False
    for line in text.splitlines():
        if STARTUP_CHATTER.match(line):
            dropping = True  # and the lines that continue it, up to the next log line
        elif dropping and not LOG_LINE.match(line):
            continue
        else:
            dropping = False
            kept.append(line)
    if kept:
        print("\n".join(kept), file=sys.stderr)
