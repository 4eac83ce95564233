"""The CPU allocator setting: with "reuse", a large tensor comes from malloc's heap, not a fresh mmap."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from pretrain.cpu_allocator import use_cpu_allocator

# In a fresh interpreter (mallopt changes the whole process): allocate a 64 MB tensor, then count the
# blocks malloc serves by mmap (mallinfo2's hblks).
PROBE = textwrap.dedent("""
    import ctypes, sys, torch
    from pretrain.cpu_allocator import use_cpu_allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    changed = use_cpu_allocator(sys.argv[1])
    before = libc.mallinfo2().hblks
    x = torch.ones(16 * 2**20)  # 64 MB: above glibc's largest mmap threshold
    print(int(changed), libc.mallinfo2().hblks - before)
""")


LIBC, LIBC_VERSION = platform.libc_ver()


@pytest.mark.skipif(LIBC != "glibc" or tuple(map(int, LIBC_VERSION.split("."))) < (2, 33),
                    reason="mallopt settings are glibc's; mallinfo2 is glibc 2.33's")
@pytest.mark.parametrize("kind,expected", [("reuse", "1 0"), ("system", "0 1")])
def test_reuse_serves_large_tensors_from_the_heap(kind, expected):
    out = subprocess.run([sys.executable, "-c", PROBE, kind], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == expected.split()


def test_unknown_allocator_is_named():
    with pytest.raises(ValueError, match="got 'jemalloc'"):
        use_cpu_allocator("jemalloc")
