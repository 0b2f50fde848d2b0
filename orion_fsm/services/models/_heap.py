"""The process heap: pages a large piece of work freed, handed back to the operating system."""

from __future__ import annotations

import ctypes

__all__ = ["release_freed_heap"]

def release_freed_heap() -> None:
    """Hand the heap's freed pages back to the OS (glibc's malloc_trim; elsewhere nothing).
    glibc keeps what a large piece of work freed (an unloaded model's buffers, the tensors of
    thousands of embedding batches) mapped, so RSS keeps the peak; call it after such work."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
