"""Worker processes for `stella prep`: a pool that dies with its parent, or the same jobs in this process.

fork starts in milliseconds (spawn re-imports torch in every worker: seconds); it is safe because every worker
runs torch on one thread, so none enters an OpenMP region inherited from the parent. Leaving the pool (done, an
error, Ctrl-C) terminates the workers at once, and the kernel kills them if the parent dies (even by kill -9).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Any, Callable, Iterable, Iterator

import torch

from stella_cli.audio import one_torch_thread

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """In a worker: the kernel kills this process when its parent dies (even by kill -9), and Ctrl-C is left to
    the parent, which stops the pool itself. Linux only (prctl); elsewhere the pool's own clean-up applies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _start_worker(parent_pid: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    die_with_parent(parent_pid)
    torch.set_num_threads(1)  # one clip per process; the processes are the parallelism
    if initializer is not None:
        initializer(*initargs)


def run_jobs(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int, *,
             initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[Any]:
    """fn(job) for every job: in this process on one torch thread when workers <= 1 (results in job order), else in
    a pool of `workers` processes (results as they finish). `initializer(*initargs)` runs once per process first."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        with one_torch_thread():
            yield from map(fn, jobs)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, _start_worker, (os.getpid(), initializer, initargs)) as pool:
        yield from pool.imap_unordered(fn, jobs)
