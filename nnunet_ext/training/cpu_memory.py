"""CPU training: keep freed tensor memory in the process for the next step (glibc ``malloc``).

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves blocks above its mmap threshold (at most
32 MiB) with freshly mapped pages and unmaps them when they are freed, so each large activation of a training step is
page-faulted in (and zeroed by the kernel) again in the next step. Intel's PyTorch CPU performance guide recommends
jemalloc or TCMalloc (``LD_PRELOAD``) for this reason; ``keep_freed_memory`` gets the same reuse from glibc itself,
with ``mallopt``: ``M_MMAP_MAX = 0`` (every block from the heap) and ``M_TRIM_THRESHOLD`` at its maximum (the heap is
not shrunk). Freed blocks are then reused without page faults; the price is that the process keeps its high-water
mark of memory until it exits, which a training run reaches in its first step anyway.

Measured on 2 cores (CPU, torch 2.14, 256^2, batch 4), three training steps each, glibc's defaults -> freed memory
kept: SCRNet 1.3-2.0 million page faults and 7.6-9.8 s per step -> 0-53 thousand faults and 6.0-6.6 s; nnU-Net's 2D
network 0.55 million faults and 2.2 s -> 0-49 thousand and 1.8 s (``benchmarks/scrnet.py`` measures both settings).

``nnUNetExtTrainer`` calls it when it trains on the CPU; ``NNUNET_EXT_KEEP_FREED_MEMORY=0`` turns it off. Elsewhere
(another C library, macOS, Windows) it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1

DISABLE_VARIABLE = "NNUNET_EXT_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (module docstring); True if it was set, False where glibc is not the C
    library or ``NNUNET_EXT_KEEP_FREED_MEMORY=0``."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the process's own symbols: glibc's mallopt, without searching for the library
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX))
