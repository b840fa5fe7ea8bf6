"""Process-level settings that make CPU training faster.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB by default) with a
fresh mmap and unmaps it on free. Training allocates the same large tensors every step, notably
the gradients after `zero_grad(set_to_none=True)`: an MoE layer with 64 experts allocates
E * D * H weight gradients three times per step. Each fresh mapping is zero-filled page by page
on first touch, which cost this project's 2-core benchmark a third of an MoE layer's backward.
Raising the mmap and trim thresholds keeps freed blocks in the heap for reuse, the same effect
PyTorch's CPU performance guide gets from tcmalloc or jemalloc. Nothing changes but speed and
how soon freed memory goes back to the system.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Tune glibc malloc as above; False where it does not apply (not glibc, or refused)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1
    return libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) == 1 and ok
