"""Map a function over cases with a pool of spawned worker processes and a progress bar."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def resolve_workers(workers: int | None, default: int = 0) -> int:
    """``None`` -> ``default``; ``0`` -> the number of CPU cores; otherwise ``workers`` (at least 1)."""
    n = default if workers is None else workers
    return max(1, os.cpu_count() or 1) if n == 0 else max(1, int(n))


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of ``workers`` *spawned* processes (safe with threads, the same on every OS), or None for 1.

    Functions run in it must be module-level, and scripts using it need an ``if __name__ == "__main__"``
    guard. One pool can serve several :func:`map_cases` calls (each worker starts once).
    """
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        yield pool


def map_cases(
    fn: Callable[..., T], tasks: Sequence[tuple[Any, ...]], pool: ProcessPoolExecutor | None, desc: str
) -> Iterator[T]:
    """Yield ``fn(*task)`` for every task, in completion order, with a tqdm bar.

    A worker runs one task at a time, so at most one case per worker is in memory; with ``pool=None`` the
    tasks run here, one after the other. On the first failure the pending tasks are cancelled and the
    exception is raised.
    """
    # `-q` (log level WARNING) also silences the bar
    quiet = not logging.getLogger("pipeline").isEnabledFor(logging.INFO)
    bar = tqdm(total=len(tasks), desc=desc, unit="case", dynamic_ncols=True, disable=quiet)
    try:
        if pool is None or len(tasks) <= 1:
            for task in tasks:
                yield fn(*task)
                bar.update()
            return
        pending = {pool.submit(fn, *task) for task in tasks}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    yield future.result()
                    bar.update()
        finally:
            for future in pending:
                future.cancel()
    finally:
        bar.close()


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MB (``VmHWM``; Linux only, else None)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
