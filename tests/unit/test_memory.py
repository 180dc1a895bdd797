"""Memory the engine frees goes back to the system (src/engine/memory.py), and the KV cache
holds only its own keys and values (src/models/transformer.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from src.engine.memory import MemoryReleaser, release_free_memory
from src.models.transformer import KV_BLOCK, KVCache, kv_capacity

pytestmark = pytest.mark.unit


def test_free_memory_is_released_when_the_batch_empties_and_every_interval_while_busy():
    now, calls = [0.0], []
    releaser = MemoryReleaser(
        5.0, release=lambda: calls.append(now[0]) or True, clock=lambda: now[0]
    )
    releaser.after_round(busy=False)
    assert calls == []  # idle with nothing done: nothing to give back
    for second in range(12):
        now[0] = second
        releaser.after_round(busy=True)
    assert calls == [5, 10]  # busy: at most every 5 s
    now[0] = 11.5
    releaser.after_round(busy=False)
    assert calls == [5, 10, 11.5]  # the batch emptied: at once
    now[0] = 30
    releaser.after_round(busy=False)
    assert len(calls) == 3 and releaser.releases == 3  # still idle: nothing more

    only_when_idle = MemoryReleaser(0, release=lambda: calls.append("idle") or True)
    for _ in range(5):
        only_when_idle.after_round(busy=True)
    only_when_idle.after_round(busy=False)
    assert calls[3:] == ["idle"]


def test_releasing_works_on_glibc_and_does_nothing_elsewhere():
    released = release_free_memory()
    if sys.platform.startswith("linux"):
        import platform

        assert released == (platform.libc_ver()[0] == "glibc")
    else:
        assert released is False


FREED_BLOCKS = """
import ctypes, sys, torch
from src.engine.memory import return_large_blocks_at_once

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (2.33 and later)
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_mb():  # memory malloc serves in pages of their own (mmap)
    return libc.mallinfo2().hblkhd / 2**20

def resident_mb():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024

if sys.argv[1] == "fixed":
    assert return_large_blocks_at_once()
big = torch.ones(16 << 20, dtype=torch.uint8)
del big  # glibc's own rule now serves blocks up to 16 MB from the heap
before_mapped, before = mapped_mb(), resident_mb()
blocks = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(16)]  # 64 MB
mapped = mapped_mb() - before_mapped
del blocks
print(mapped, resident_mb() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_freed_large_tensors_go_back_to_the_system_at_once(tmp_path):
    """With glibc's own rule, 4 MB tensors come from the heap, where what is freed may stay
    (whether it does depends on what lies above it); with the threshold fixed, each has pages
    of its own, returned the moment it is freed."""
    import platform
    import subprocess

    from src.config import REPO_ROOT

    if platform.libc_ver()[0] != "glibc" or tuple(map(int, platform.libc_ver()[1].split("."))) < (
        2,
        33,
    ):
        pytest.skip("glibc 2.33 or later (mallinfo2)")

    def measure(mode: str) -> tuple[float, float]:
        result = subprocess.run(
            [sys.executable, "-c", FREED_BLOCKS, mode],
            capture_output=True, text=True, cwd=REPO_ROOT, check=True,
        )  # fmt: skip
        mapped, kept = map(float, result.stdout.split())
        return mapped, kept

    mapped, _ = measure("default")
    assert mapped < 8  # the 64 MB came from the heap
    mapped, kept = measure("fixed")
    assert mapped >= 60 and kept < 8  # pages of their own, gone once freed


def test_the_kv_cache_copies_what_it_is_handed_and_sizes_buffers_in_blocks():
    """Keys and values arrive as views of the whole q/k/v projection: keeping the views would
    keep the projections alive (several times the cache's size)."""
    projection = torch.randn(2, 3 * 4, 37, 8)  # (B, q + k + v heads, S, head size)
    keys, values = projection[:, 4:8], projection[:, 8:12]
    cache = KVCache(1)
    stored_keys, stored_values = cache.layers[0].append(keys, values)
    assert torch.equal(stored_keys, keys) and torch.equal(stored_values, values)
    buffer = cache.layers[0]._keys
    assert buffer.untyped_storage().data_ptr() != projection.untyped_storage().data_ptr()
    assert buffer.shape[2] == kv_capacity(37) and kv_capacity(37) % KV_BLOCK == 0
    assert kv_capacity(64) == 128 and kv_capacity(63) == 64  # always room for one more

    # Appending one token at a time writes into the buffer; the results never change.
    for step in range(40):
        token_keys, token_values = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)
        keys, values = torch.cat([keys, token_keys], 2), torch.cat([values, token_values], 2)
        stored_keys, stored_values = cache.layers[0].append(token_keys, token_values)
        assert torch.equal(stored_keys, keys) and torch.equal(stored_values, values), step
    assert cache.layers[0]._keys.shape[2] % KV_BLOCK == 0
