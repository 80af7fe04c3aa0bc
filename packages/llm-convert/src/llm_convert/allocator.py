"""Keep freed buffers for reuse while a conversion streams.

A conversion allocates and frees one 64 MB slab after another. glibc returns such large blocks to
the kernel on free (they are memory-mapped), and the next allocation's pages are then zeroed by the
kernel as they are first touched: on the DeepSeek-V3-shaped export in `benchmarks/convert.py` that
zeroing took a third of the time. Raising glibc's mmap and trim thresholds for the length of a
conversion (`mallopt`) lets freed slabs be reused (native-to-hf 14.6 s -> 9.9 s on 4.6 GB), at
the cost of up to `KEEP_BYTES` of freed memory staying in the process meanwhile. Afterwards
both thresholds go back to their documented defaults (glibc no longer adjusts the mmap
threshold by itself once it has been set), and the kept memory is trimmed. Elsewhere than
glibc this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_DEFAULT = 128 * 1024  # both thresholds' documented defaults
KEEP_BYTES = 1 << 30


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_buffers() -> Iterator[None]:
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT)
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)  # hand the kept buffers back now
