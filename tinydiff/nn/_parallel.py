"""Data parallelism inside an op: batch chunks of NumPy work on a small thread pool.

NumPy's ufuncs are single-threaded, and OpenBLAS's threads only help inside one GEMM. tinydiff's
large ops (convolutions, group norm, swish) are instead split along the batch axis: each thread
takes a contiguous run of sample chunks and does all of the op's work for them (gather, GEMM,
scatter, normalise), with OpenBLAS set to one thread for the duration (two threads that each
run single-threaded GEMMs on half the batch beat one thread running two-threaded GEMMs: no
synchronisation inside the GEMMs, and the elementwise parts scale too). NumPy and OpenBLAS release
the GIL while they work. Each chunk writes its own slice of the outputs; sums over the batch (a
weight gradient) are kept per chunk and added in chunk order, so results do not depend on the
number of threads. Small arrays and other backends (CuPy, the strict stand-in) run inline.

The number of threads is ``TINYDIFF_NUM_THREADS`` if set, else the number of CPUs (at most 8);
``set_num_threads(n)`` changes it (1: no pool, BLAS left alone).

Memory. A training step allocates and frees the same large arrays (patch matrices, activations)
every step. With glibc's default settings, arrays of a few MB are mmap'ed and returned to the
system when freed, so every step pays page faults on fresh pages again (about 1 ms per 5 MB here).
The first large op therefore asks glibc (Linux only) to keep freed memory for reuse, as PyTorch's
caching allocators do for device memory: ``mallopt(M_MMAP_THRESHOLD, 256 MB)`` and
``mallopt(M_TRIM_THRESHOLD, 1 GB)``. The process's resident memory then stays near its peak.
Set ``TINYDIFF_KEEP_FREED_MEMORY=0`` to leave the allocator alone.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_state = {"threads": None, "pool": None, "malloc_tuned": False, "blas": None, "blas_depth": 0,
          "blas_saved": []}
_blas_lock = threading.Lock()
_local = threading.local()     # .busy: this thread is already running chunks (no nesting)
MIN_ELEMENTS = 150_000       # below this an op runs inline: the pool's overhead (~50 us) would dominate
CHUNK_BYTES = 4 << 20        # at most this many bytes of an elementwise op's main array per chunk


def get_num_threads():
    if _state["threads"] is None:
        env = os.environ.get("TINYDIFF_NUM_THREADS")
        _state["threads"] = max(1, int(env)) if env else max(1, min(8, os.cpu_count() or 1))
    return _state["threads"]


def set_num_threads(n):
    """Use ``n`` threads for tinydiff's batch-parallel work (1: no pool)."""
    n = max(1, int(n))
    if n != _state["threads"] and _state["pool"] is not None:
        _state["pool"].shutdown(wait=True)
        _state["pool"] = None
    _state["threads"] = n


def keep_freed_memory():
    """Ask glibc to reuse freed large blocks instead of returning them to the OS (see above).
    Returns True if the setting was applied (Linux with glibc), False otherwise."""
    if _state["malloc_tuned"] is not False:
        return bool(_state["malloc_tuned"])
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


def _blas_controls():
    """(get_num_threads, set_num_threads) of every OpenBLAS loaded in this process (found in
    /proc/self/maps, as threadpoolctl does); empty where that is not possible."""
    if _state["blas"] is not None:
        return _state["blas"]
    controls = []
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f
                                if "openblas" in line.lower() and ".so" in line})
        except OSError:
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix in ("scipy_openblas", "openblas"):
                for suffix in ("64_", ""):
                    get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                    put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                    if get is not None and put is not None:
                        get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                        controls.append((get, put))
                        break
                else:
                    continue
                break
    _state["blas"] = controls
    return controls


@contextlib.contextmanager
def single_threaded_blas():
    """OpenBLAS limited to one thread per call inside the block (restored when the outermost
    block exits). Two-threaded GEMMs leave OpenBLAS's worker spinning for a while afterwards,
    which would take a core from the pool's threads, so every BLAS call of a tinydiff op runs in
    here while the pool is in use."""
    controls = _blas_controls()
    with _blas_lock:
        if _state["blas_depth"] == 0:
            _state["blas_saved"] = [get() for get, _ in controls]
            for _, put in controls:
                put(1)
        _state["blas_depth"] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _state["blas_depth"] -= 1
            if _state["blas_depth"] == 0:
                for (_, put), n in zip(controls, _state["blas_saved"]):
                    put(n)


def pooled(method):
    """Decorator for an op's forward/backward: on NumPy with more than one tinydiff thread, the
    whole method runs with single-threaded OpenBLAS (the pool provides the parallelism)."""
    @functools.wraps(method)
    def wrapper(self, first, *args, **kwargs):
        if type(first) is np.ndarray and get_num_threads() > 1:
            with single_threaded_blas():
                return method(self, first, *args, **kwargs)
        return method(self, first, *args, **kwargs)
    return wrapper


def _pool():
    if _state["pool"] is None:
        _state["pool"] = ThreadPoolExecutor(max_workers=get_num_threads(),
                                            thread_name_prefix="tinydiff")
    return _state["pool"]


def for_chunks(fn, bounds, like, size=None, min_size=None):
    """Call ``fn(lo, hi)`` for every (lo, hi) in ``bounds``: inline when ``like`` (the op's main
    array; ``size`` overrides its size as the measure of work) is small or not a NumPy array, else
    on the pool, one contiguous run of chunks per thread, with OpenBLAS single-threaded. ``fn``
    must only write its own outputs."""
    size = like.size if size is None else size
    min_size = MIN_ELEMENTS if min_size is None else min_size
    if type(like) is not np.ndarray or size < min_size or getattr(_local, "busy", False):
        for lo, hi in bounds:
            fn(lo, hi)
        return
    if _state["malloc_tuned"] is False:
        keep_freed_memory()
    k = min(get_num_threads(), len(bounds))
    if k <= 1:
        for lo, hi in bounds:
            fn(lo, hi)
        return
    runs = [bounds[i * len(bounds) // k:(i + 1) * len(bounds) // k] for i in range(k)]

    def run(chunks):
        _local.busy = True
        try:
            for lo, hi in chunks:
                fn(lo, hi)
        finally:
            _local.busy = False
    with single_threaded_blas():
        futures = [_pool().submit(run, r) for r in runs[1:]]
        try:
            run(runs[0])                    # this thread takes the first run itself
        finally:
            for f in futures:
                f.result()


def for_batch_chunks(fn, like, n=None, min_size=None):
    """``for_chunks`` over the leading (batch) axis of ``like``, cut into chunks of at most
    CHUNK_BYTES (and at least one per thread)."""
    n = like.shape[0] if n is None else n
    min_size = MIN_ELEMENTS if min_size is None else min_size
    if type(like) is not np.ndarray or like.size < min_size or n < 2 or getattr(_local, "busy", False):
        fn(0, n)
        return
    per_row = max(1, like.nbytes // n)
    rows = max(1, min(-(-n // get_num_threads()), CHUNK_BYTES // per_row))
    for_chunks(fn, [(lo, min(n, lo + rows)) for lo in range(0, n, rows)], like, min_size=min_size)
