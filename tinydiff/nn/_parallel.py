"""Run elementwise work on NumPy arrays in batch chunks, on a small thread pool.

NumPy's ufuncs are single-threaded but release the GIL in their inner loops, so splitting the batch
axis over threads gives the elementwise parts of an op (normalisation, activation, col2im) the
same cores that BLAS uses for the GEMMs, as PyTorch's intra-op parallelism does. Chunks are
independent (each writes its own slice of the outputs), so results do not depend on the number of
threads. Small arrays and non-NumPy backends (CuPy, the strict stand-in) run inline, unchunked.

The number of threads is ``TINYDIFF_NUM_THREADS`` if set, else the number of CPUs (at most 8);
``set_num_threads(n)`` changes it (1 disables the pool).

Memory. A training step allocates and frees the same large arrays (patch matrices, activations)
every step. With glibc's default settings, arrays of a few MB are mmap'ed and returned to the
system when freed, so every step pays page faults on fresh pages again (about 1 ms per 5 MB here).
The first large op therefore asks glibc (Linux only) to keep freed memory for reuse, as PyTorch's
caching allocators do for device memory: ``mallopt(M_MMAP_THRESHOLD, 256 MB)`` and
``mallopt(M_TRIM_THRESHOLD, 1 GB)``. The process's resident memory then stays near its peak.
Set ``TINYDIFF_KEEP_FREED_MEMORY=0`` to leave the allocator alone.
"""
from __future__ import annotations

import ctypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_state = {"threads": None, "pool": None, "malloc_tuned": False}
MIN_ELEMENTS = 150_000       # below this an op runs inline: the pool's overhead (~50 us) would dominate
CHUNK_BYTES = 4 << 20       # at most this many bytes of the op's main array per chunk


def get_num_threads():
    if _state["threads"] is None:
        env = os.environ.get("TINYDIFF_NUM_THREADS")
        _state["threads"] = max(1, int(env)) if env else max(1, min(8, os.cpu_count() or 1))
    return _state["threads"]


def set_num_threads(n):
    """Use ``n`` threads for tinydiff's chunked elementwise work (1: no pool)."""
    n = max(1, int(n))
    if n != _state["threads"] and _state["pool"] is not None:
        _state["pool"].shutdown(wait=True)
        _state["pool"] = None
    _state["threads"] = n


def keep_freed_memory():
    """Ask glibc to reuse freed large blocks instead of returning them to the OS (see above).
    Returns True if the setting was applied (Linux with glibc), False otherwise."""
    if _state["malloc_tuned"] is not False:
        return _state["malloc_tuned"]
    _state["malloc_tuned"] = None
    if os.environ.get("TINYDIFF_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 256 << 20) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    _state["malloc_tuned"] = ok
    return ok


def _pool():
    if _state["pool"] is None:
        _state["pool"] = ThreadPoolExecutor(max_workers=get_num_threads(),
                                            thread_name_prefix="tinydiff")
    return _state["pool"]


def for_batch_chunks(fn, like, n=None, block=True):
    """Call ``fn(lo, hi)`` over chunks [lo, hi) of the leading (batch) axis of ``like``.

    Chunks go to the thread pool when ``like`` is a large NumPy array; otherwise one call
    ``fn(0, n)`` runs here. With ``block`` the chunks are also cut to about CHUNK_BYTES (cache
    blocking); without it there is one chunk per thread. ``fn`` must only write its own rows of
    its outputs.
    """
    n = like.shape[0] if n is None else n
    if type(like) is not np.ndarray or like.size < MIN_ELEMENTS:
        fn(0, n)
        return
    if _state["malloc_tuned"] is False:
        keep_freed_memory()
    threads = get_num_threads()
    per_row = max(1, like.nbytes // n)
    rows = -(-n // threads)
    if block:
        rows = max(1, min(rows, CHUNK_BYTES // per_row))
    bounds = [(lo, min(n, lo + rows)) for lo in range(0, n, rows)]
    # split the chunks into one contiguous run per thread, so each thread walks its part in order
    k = min(threads, len(bounds))
    runs = [bounds[i * len(bounds) // k:(i + 1) * len(bounds) // k] for i in range(k)]

    def run(chunks):
        for lo, hi in chunks:
            fn(lo, hi)
    if k == 1:
        run(bounds)
        return
    futures = [_pool().submit(run, r) for r in runs[1:]]
    run(runs[0])                    # this thread takes the first run itself
    for f in futures:
        f.result()
