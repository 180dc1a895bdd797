"""Our C kernels (src/models/kernels/*.c): built once per machine, loaded with ctypes.

A kernel's library is compiled (under a second) into MODEL_CACHE_DIR/kernels/, named by a
digest of its source and flags, and later starts load it; a machine that has the library (a
container image, say: ``python -m src.models.native`` builds them all ahead) needs no
compiler. Where one cannot be built, ``load_function`` says why and the caller keeps
PyTorch's version of the operation: never an error.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KERNELS_DIR = Path(__file__).parent / "kernels"
SHARED_LIBRARY_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")


@dataclass(frozen=True)
class CSource:
    """A C file and the compiler flags it needs beyond ``SHARED_LIBRARY_FLAGS``."""

    source: Path
    flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.source.stem


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


def library_path(cache_dir: Path, kernel: CSource) -> Path:
    """Where the library for this source, the headers beside it and these flags lives (built
    or not)."""
    flags = " ".join(SHARED_LIBRARY_FLAGS + kernel.flags)
    headers = b"".join(path.read_bytes() for path in sorted(kernel.source.parent.glob("*.h")))
    digest = hashlib.sha256(kernel.source.read_bytes() + headers + flags.encode()).hexdigest()
    return Path(cache_dir) / "kernels" / f"{kernel.name}-{digest[:16]}.so"


def build(cache_dir: Path, kernel: CSource) -> Path:
    """The compiled library, built now if this source and these flags have none yet. Raises
    RuntimeError without a compiler, OSError or subprocess.CalledProcessError if the build
    fails."""
    library = library_path(cache_dir, kernel)
    if library.is_file():
        return library
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc, or $CC) to build it with")
    library.parent.mkdir(parents=True, exist_ok=True)
    temporary = library.with_suffix(f".tmp{os.getpid()}")  # renamed into place: atomic
    command = [cc, *SHARED_LIBRARY_FLAGS, *kernel.flags, "-o", str(temporary), str(kernel.source)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        os.replace(temporary, library)
    finally:
        temporary.unlink(missing_ok=True)
    return library


def load_function(cache_dir: Path, kernel: CSource, name: str) -> tuple[object | None, str]:
    """The C function ``name`` of ``kernel``'s library (built now if need be), or None and
    why not."""
    try:
        return getattr(ctypes.CDLL(str(build(Path(cache_dir), kernel))), name), ""
    except subprocess.CalledProcessError as exc:
        return None, f"the build failed: {exc.stderr.strip()[-500:]}"
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
        return None, f"the build failed: {exc}"


def load_typed_function(
    cache_dir: Path,
    kernel: CSource,
    name: str,
    argtypes: list[Any],
    restype: Any,
    logger: logging.Logger,
    fallback: str,
) -> Any | None:
    """``load_function`` with the C function's ctypes signature set; None where it cannot be
    built, logged as "``fallback`` (ours cannot run: why)"."""
    function, reason = load_function(Path(cache_dir), kernel, name)
    if function is None:
        logger.info("%s (ours cannot run: %s)", fallback, reason)
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


class Bf16Matmul:
    """A C matrix kernel of ours, ``int f(x, weights, scales, out, M, N, K, threads)`` (bf16
    x and out; 0, or -1 when out of memory), called as ``(x, weights, scales, n) -> y``: x
    (..., K) bf16, y (..., n) bf16. ``address`` is the C function's, for C code that calls
    it (norm_then_matmul.c)."""

    def __init__(self, function: Any, label: str) -> None:
        function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        function.restype = ctypes.c_int
        self.function, self.label = function, label
        self.address = ctypes.cast(function, ctypes.c_void_p).value

    def __call__(self, x: Any, weights: Any, scales: Any, n: int) -> Any:
        import torch

        x = x.contiguous()
        out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
        rows, threads = x.numel() // x.shape[-1], torch.get_num_threads()
        status = self.function(x.data_ptr(), weights.data_ptr(), scales.data_ptr(),
                               out.data_ptr(), rows, n, x.shape[-1], threads)  # fmt: skip
        if status != 0:
            raise MemoryError(f"{self.label}: out of memory")
        return out


def our_kernels() -> list[CSource]:
    """Every C kernel of the project (each module that has one lists its sources)."""
    from src.models.int4_kernel import KERNEL_SOURCES
    from src.models.int8_kernel import INT8_AVX2_SOURCE
    from src.models.norm_kernel import NORM_THEN_MATMUL_SOURCE, RMS_NORM_SOURCE
    from src.models.rope_kernel import ROPE_CACHE_SOURCE

    return [*KERNEL_SOURCES.values(), INT8_AVX2_SOURCE, RMS_NORM_SOURCE,
            NORM_THEN_MATMUL_SOURCE, ROPE_CACHE_SOURCE]  # fmt: skip


def use_kernels(
    model: Any,
    cache_dir: Path,
    int4_kernel: str = "auto",
    int8_kernel: str = "auto",
    norm_kernel: str = "auto",
    rope_kernel: str = "auto",
) -> list[str]:
    """The settings INT4_KERNEL, INT8_KERNEL, NORM_KERNEL and ROPE_KERNEL applied to
    ``model``: each layer gets our C kernel where the setting is "auto" and it can run. What
    is in use, described."""
    from src.models.int4_kernel import kernel_source
    from src.models.norm_kernel import use_norm_kernel
    from src.models.quantize import use_int4_kernel, use_int8_kernel
    from src.models.rope_kernel import use_rope_kernel

    in_use = []
    if use_int4_kernel(model, int4_kernel, cache_dir):
        in_use.append(f"our {kernel_source().instructions} int4 kernel")
    if use_int8_kernel(model, int8_kernel, cache_dir):
        in_use.append("our AVX2 integer int8 kernel")
    if use_norm_kernel(model, norm_kernel, cache_dir):
        in_use.append("RMSNorm in C")
    if use_rope_kernel(model, rope_kernel, cache_dir):
        in_use.append("rotary embedding and KV-cache write in C")
    return in_use


if __name__ == "__main__":
    # python -m src.models.native: build every library into MODEL_CACHE_DIR now (the
    # Dockerfile does, so that the image needs no compiler); any x86-64 CPU can build them.
    from src.config import load_settings

    for kernel in our_kernels():
        print(build(Path(load_settings().model_cache_dir), kernel))
