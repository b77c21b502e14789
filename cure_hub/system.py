"""Facts about the machine a run is on, and the process settings a run makes on it: the cores
the process may use, glibc's handling of freed memory, a disk that fills, the hardware and the
checkout's commit."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h


def keep_freed_heap_memory() -> bool:
    """Stop glibc from handing freed memory back to the operating system during training.

    By default glibc unmaps every block of 32 MiB or more when it is freed, and gives the top of
    its heap back once more than twice its (self-adjusting) mmap threshold lies free there; every
    page taken again after that is a page fault. A training step that frees and re-allocates that
    much each step (a CURE step does: a retained graph, a revision forward pass on a double batch)
    pays tens to hundreds of thousands of faults a step, 3-8 % of a step on a CPU. With this
    setting, like PyTorch's CUDA caching allocator, the process keeps its peak memory and reuses
    it. Returns whether the setting was applied (Linux with glibc only).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def process_umask() -> int:
    """This process's umask (read by setting it, so set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The mode this process gives a new file (0o644 under the usual umask 022). Writers that go
    through a private temporary file (safetensors: 0o600) are given it back."""
    return 0o666 & ~process_umask()


class DiskFullError(OSError):
    """A write that the disk had no room for: where, what, and the space it needs."""


#: What a full disk says through writers that do not pass its errno on: Python's and the Rust
#: writers' (safetensors) messages, and torch.save's zip writer, whose short write loses it.
_DISK_FULL_MESSAGES = ("No space left on device", "os error 28", "Disk quota exceeded", "unexpected pos")


def readable_size(size: int) -> str:
    """``size`` bytes in the largest binary unit it reaches: "186.7 KiB"."""
    power, unit = next((p, u) for p, u in ((3, "GiB"), (2, "MiB"), (1, "KiB")) if size >= 1024**p) if size >= 1024 else (0, "")
    return f"{size / 1024**power:.1f} {unit}" if power else f"{size} bytes"


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def _disk_full(err: BaseException) -> bool:
    while err is not None:
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(m in str(err) for m in _DISK_FULL_MESSAGES):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def disk_space_for(folder: Path, what: str, needed: Callable[[], str] | None = None, then: str = "run the command again"):
    """A write of ``what`` into ``folder`` that fills its disk ends in one :class:`DiskFullError`
    naming the folder, its free space, ``needed()`` (the space the write takes, as "about 2.1 GiB"
    or "more than ...", where known) and ``then`` (what to do once there is room), rather than in the
    writer's own error."""
    try:
        yield
    except Exception as err:
        if not _disk_full(err):
            raise
        free = readable_size(shutil.disk_usage(_existing(Path(folder))).free)
        room = f"which takes {needed()}: free that much there" if needed else "free some space there"
        raise DiskFullError(f"the disk of {folder} is full ({free} free) writing {what}, {room}, then {then}") from None


def _existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def usable_cpu_cores() -> list[int]:
    """The CPU cores this process may run on: its affinity where the system reports one (a
    container's or ``taskset``'s share of the machine), else all of the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def git_commit() -> str | None:
    """The commit of the cure-hub checkout that trained the model, if it is one."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def describe_hardware(accelerator) -> str:
    """The processes and the device they train on, for logs and summaries."""
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{accelerator.num_processes} x {name}"
