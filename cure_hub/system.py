"""Facts about the machine a run is on, and the process settings a run makes on it: the cores
the process may use, glibc's handling of freed memory, the hardware and the checkout's commit."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
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
