"""Giving memory the daemon freed back to the system, after migrations.

Measured (bench/bench_rss.py, two daemons, 1,000 migrations): RSS grew ~2 MB per 1,000 migrations while the live
Python heap (tracemalloc) stayed flat, and glibc's malloc_trim(0) gave all of it back and ~1.5 MB more: a migration
allocates and frees a few MB (chunks, plans, TLS and Cap'n Proto buffers) in a pattern glibc keeps as free pages
inside the heap rather than returning them. So: whoever finishes a unit of such work calls `note_work()` (a
migration ending on either side), and `trimmer` - one task per daemon - calls malloc_trim(0) at most once per
`interval` seconds after there was work, in a worker thread (it takes about a millisecond on a 50 MB heap). Not
glibc (musl, or no libc found): nothing to do, said once at debug level. Written by hand because no library here
exposes malloc_trim; ctypes is the standard way to reach it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

import trio

log = logging.getLogger("invariantd.memory")

_work = [0]            # units of work finished in this process (any daemon in it)


def note_work() -> None:
    _work[0] += 1


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


async def trimmer(interval: float = 1.0, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    trim = _malloc_trim()
    task_status.started()
    if trim is None:
        log.debug("malloc_trim is not available (not glibc): freed memory stays with the allocator")
        return
    seen = _work[0]
    while True:
        await trio.sleep(interval)
        if _work[0] != seen:
            seen = _work[0]
            await trio.to_thread.run_sync(trim, 0)
