"""Keep freed memory in the process instead of returning it to the kernel after every step.

glibc serves large blocks (a training step's activations and gradients, hundreds of MB) with mmap and gives them
back on free, so every step faults the same pages in again: measured on the 2-core development VM
(benchmarks/train_step_cost.py), 2.3M minor faults and 8 s of kernel time in a 30 s fp32 step of the default
training, a third of the step. Raising glibc's mmap and trim thresholds (what MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ do, here set from inside the process) keeps the memory mapped; the price is that the
process's resident memory stays at its peak. No effect, and no error, where the C library is not glibc."""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory; True when it accepted."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Blocks up to 1 GiB come from the heap instead of their own mapping, and the heap's top is never trimmed
    # (the largest int: a C int parameter, so a larger Python int would wrap around to a small threshold).
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
