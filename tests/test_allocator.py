"""Training returns the memory of large freed blocks to the OS (setup.return_large_frees): glibc
maps blocks of MMAP_THRESHOLD bytes or more on their own instead of serving them from its heap."""

import os
import platform
import subprocess
import sys

import pytest

from prefopt.training import setup

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Frees a 24 MiB block (glibc's own threshold then rises to 24 MiB: a later 8 MiB block comes from
# its heap), then prints how many bytes glibc holds in blocks mapped on their own (mallinfo2's
# hblkhd) before and after allocating an 8 MiB tensor, and after freeing it.
PROBE = """
import ctypes, sys
import torch
from prefopt.training.setup import return_large_frees

class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "set":
    assert return_large_frees()
big = torch.ones(24 << 20, dtype=torch.uint8)
del big
before = libc.mallinfo2().hblkhd
x = torch.ones(8 << 20, dtype=torch.uint8)
during = libc.mallinfo2().hblkhd
del x
print(before, during, libc.mallinfo2().hblkhd)
"""


def mapped_bytes(mode: str) -> tuple[int, int, int]:
    """PROBE's three readings in a fresh process, glibc configured only by its defaults."""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return tuple(int(v) for v in out)


def test_a_large_block_is_mapped_on_its_own_and_returned_when_freed():
    before, during, after = mapped_bytes("set")
    assert during - before >= 8 << 20  # the tensor's block is a mapping of its own...
    assert after == before  # ...unmapped, given back to the OS, when freed


def test_glibc_alone_serves_it_from_its_heap():
    """The probe can tell: without the setting the same block stays in glibc's heap."""
    before, during, after = mapped_bytes("unset")
    assert during == before == after


def test_a_threshold_the_user_set_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert setup.return_large_frees() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")
    assert setup.return_large_frees() is False
