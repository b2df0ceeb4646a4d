"""glibc malloc settings for a long-running server such as the Space (written by hand: no library sets them)."""

import ctypes

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_THRESHOLD = -3
# Measured on the Space with a bfloat16 ViT-L/14 at 518 px (benchmarks/bench_memory.py and the GLIBC_TUNABLES
# grid in the README): from 4 MiB up, buffers (the 8-11 MiB attention and MLP activations of every layer) go back
# to the system when freed. Lower thresholds also map the 2.8 MiB hidden states, allocated a dozen times per
# layer, and each request pays 0.2-0.5 s of page faults.
MMAP_THRESHOLD = 4 * 2**20
# Fixing the mmap threshold also fixes the trim threshold at 128 KiB, which would hand the heap's top back, and
# fault it in again, on every request.
TRIM_THRESHOLD = 64 * 2**20


def return_large_buffers_to_the_system() -> bool:
    """Make glibc's malloc give freed buffers of 4 MiB and more back to the system instead of keeping them.

    By default glibc raises its mmap threshold up to 32 MiB after the first large buffer is freed, so every
    activation of a forward pass is then carved from heap memory that it keeps (and fragments) for good.
    Returns False, changing nothing, where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
