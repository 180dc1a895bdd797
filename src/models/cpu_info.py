"""What this CPU is and which instruction sets it reports (Linux's /proc/cpuinfo): our int4 and
int8 kernels check the flags they need, and the benchmark prints them beside every table."""

from __future__ import annotations

import platform
from pathlib import Path

# The flags that decide which kernels can run here, and which crash llama.cpp's native
# build (AMX: see README "Performance"), as /proc/cpuinfo names them.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                  "amx_tile", "amx_bf16", "amx_int8")  # fmt: skip


def _cpuinfo_field(name: str) -> str | None:
    """The first value of ``name`` in /proc/cpuinfo; None where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_flags() -> list[str] | None:
    """The CPU's flags, or None where /proc/cpuinfo cannot be read (not Linux)."""
    flags = _cpuinfo_field("flags")
    return None if flags is None else flags.split()


def x86_kernel_unavailable(features: tuple[str, ...]) -> str | None:
    """Why a C kernel of ours for x86-64 Linux that needs the instruction sets ``features``
    (as /proc/cpuinfo names them) cannot run on this machine, or None if it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"they are for x86-64 Linux, not {platform.system()} {platform.machine()}"
    flags = cpu_flags()
    if flags is None:
        return "cannot read /proc/cpuinfo"
    missing = [feature for feature in features if feature not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def cpu_description() -> str:
    """The CPU's model name and its relevant flags, e.g. "Intel(R) Xeon(R) Processor
    (avx2 avx512f ... amx_tile)"."""
    name = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    flags = cpu_flags()
    if flags is None:
        return name
    present = [flag for flag in RELEVANT_FLAGS if flag in flags]
    return f"{name} ({' '.join(present) or 'none of ' + ', '.join(RELEVANT_FLAGS)})"
