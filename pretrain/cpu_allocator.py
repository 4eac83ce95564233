"""Keep freed host memory in the process, as a GPU's caching allocator does.

PyTorch on CPU allocates through malloc. glibc serves every block above its mmap threshold (at most 32 MB)
with fresh pages from the kernel and returns them on free, so a long sequence's activations are faulted in
again on every step: the time per token grows with the size of each tensor, not with the work. Told to
never mmap and never trim, glibc keeps freed blocks in its heap and the next step reuses them; the
process's resident memory then stays at its peak, which a training run reaches on every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

CPU_ALLOCATORS = ("reuse", "system")

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def use_cpu_allocator(kind: str, device_type: str = "cpu") -> bool:
    """Apply `kind` ("reuse": no mmap, no trim; "system": leave malloc as configured) for a run on
    `device_type`. Returns whether malloc's settings were changed: False for "system", for a run on an
    accelerator (its tensors are not malloc's) and where the C library is not glibc."""
    if kind not in CPU_ALLOCATORS:
        raise ValueError(f"cpu allocator must be one of {CPU_ALLOCATORS}, got {kind!r}")
    libc = _glibc() if kind == "reuse" and device_type == "cpu" else None
    if libc is None:
        return False
    # mallopt returns 1 on success; both take effect for every later allocation
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
