"""Row parallelism on the CPU: a task per thread, each with one intra-op thread.

Splitting a batch into one contiguous chunk of rows per core and running every chunk through
its own sequence of single-threaded ops replaces the two-thread barrier of each small op (one
per GEMM and elementwise call, thousands per call of a deep flow, each a scheduling wait when
the cores are shared) with one synchronisation per task, and each core keeps its own tile in
its own L2.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch

_worker = threading.local()  # set while a thread runs a task of on_threads: no nesting


def in_worker() -> bool:
    """True on a thread that is running a task of :func:`on_threads` (do not nest them)."""
    return getattr(_worker, "active", False)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers(count: int) -> ThreadPoolExecutor:
    """A persistent pool of at least ``count`` threads (a fresh thread per call pays the BLAS
    library's per-thread set-up again: measured ~13 ms per call at L=8, B=1024)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < count:
            old, _pool = _pool, ThreadPoolExecutor(count, thread_name_prefix="fastnvp-rows")
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def on_threads(task, count: int) -> list:
    """``[task(0), ..., task(count - 1)]``, each on its own thread with one intra-op thread.

    ``task(0)`` runs on the caller's thread, the others on a persistent pool; the caller's
    intra-op thread count is restored before returning; the first error is re-raised.
    """
    threads = torch.get_num_threads()

    def work(k: int):
        _worker.active = True
        try:
            torch.set_num_threads(1)
            return task(k)
        finally:
            _worker.active = False

    try:
        futures = [_workers(count - 1).submit(work, k) for k in range(1, count)]
        try:
            first = work(0)
        finally:
            wait(futures)
        return [first] + [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)


def over_shares(count: int, task, least: int = 1) -> list:
    """``[task(first, last), ...]`` over contiguous shares of ``range(count)``.

    One share per intra-op thread (run by :func:`on_threads`) when there are several threads,
    each share has at least ``least`` items and no enclosing task runs; otherwise one share on
    the caller's thread.
    """
    threads = min(torch.get_num_threads(), count // max(1, least))
    if threads < 2 or in_worker():
        return [task(0, count)]
    bounds = [count * k // threads for k in range(threads + 1)]
    return on_threads(lambda k: task(bounds[k], bounds[k + 1]), threads)
