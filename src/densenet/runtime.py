"""Shared runtime helpers for every command: the device, autocast, glibc's allocator policy, the
process's memory (the one reader of it), the CPU's name and the environment record of a run.

Commands import these from here, never from one another.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

from densenet.errors import ConfigError

ALLOCATORS = ("default", "retain", "release")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def fast_amp(device: torch.device) -> str:
    """What ``--amp auto`` means on ``device``: ``bf16`` where bf16 autocast is fast, else ``none``.

    CUDA GPUs with bf16 support, and CPUs whose cores compute in bf16 natively: AMX tiles (Intel
    Sapphire Rapids and later) or the AVX-512 BF16 instructions (AMD Zen 4 and later, Intel Cooper
    Lake), where oneDNN runs bf16 convolutions. A training step of densenet-cpu-m took 0.54 of the
    float32 time on this project's 2-core AMX machine and 0.67 on its 2-core AMD Zen 4 machine. On the
    first sessions' AMD machine, whose flags were not recorded, bf16 was 7x slower than float32
    (docs/TRAINING.md, lever table).
    """
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    if device.type != "cpu":
        return "none"
    native = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return "bf16" if any(check is not None and check() for check in native) else "none"


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto`` (or None) is CUDA when present, else the CPU; asking for CUDA without it is an error."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} asked for, but no CUDA device is available (use cpu or auto)")
    elif name != "cpu":
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu or cuda")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"invalid device {name!r}: {exc}") from None


def autocast(device: torch.device, amp: str):
    """An autocast context for ``amp`` (``none``, ``bf16`` or ``fp16``); a null context for none."""
    if amp not in AMP_DTYPES:
        raise ConfigError(f"unknown --amp {amp!r}; choose none, bf16 or fp16")
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])




def set_malloc_policy(policy: str) -> bool:
    """Set glibc malloc's policy for big blocks, process-wide; returns False where unavailable.

    ``retain``: keep freed memory for reuse. Big tensors are otherwise handed back to the kernel
    when freed and faulted in again, page by page, when the next step allocates them: faster,
    but the resident memory stays at its peak.
    ``release``: give every block of 64 KiB or more back to the kernel as soon as it is freed,
    so that the resident memory follows the memory actually in use (glibc's default raises this
    threshold as big blocks are freed, and then freed memory can stay resident, fragmented).
    ``default``: leave glibc's adaptive behaviour alone.
    """
    if policy not in ALLOCATORS:
        raise ConfigError(f"allocator policy must be one of {', '.join(ALLOCATORS)}, got {policy!r}")
    if policy == "default":
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        if policy == "retain":
            return bool(libc.mallopt(m_trim_threshold, 2**30)) and bool(libc.mallopt(m_mmap_threshold, 2**30))
        return bool(libc.mallopt(m_mmap_threshold, 64 * 2**10)) and bool(libc.mallopt(m_trim_threshold, 128 * 2**10))
    except (OSError, AttributeError):
        return False


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux this is ``VmHWM`` of /proc/self/status: ``ru_maxrss`` would do, except that Linux
    carries the parent's peak over into a child across fork and exec, so a child started by a
    big process would report at least the parent's size. Elsewhere ``ru_maxrss`` (macOS: bytes).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def current_rss_mb() -> float:
    """Resident set size now, in MiB (the peak so far where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA's allocator peak on a GPU, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """What a run's ``config.json`` records of where it ran: versions, platform, device, threads, git commit."""
    from densenet import __version__

    env = {
        "densenet": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
    }
    return env
