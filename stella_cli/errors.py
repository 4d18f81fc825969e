"""The expected failures of `stella`: each one is a single line for the user and an exit code.

`cli.main` prints `error: <message>` and exits with `exit_code`; anything else is a bug and keeps its traceback.
Exit codes: 0 done, 2 bad input (recipe, data, checkpoint, run directory), 3 training diverged (non-finite
values), 130 interrupted (Ctrl-C / SIGTERM, with what was kept and how to continue).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys


class StellaError(Exception):
    """An expected failure: the message names the file, key or step and says what to do."""

    exit_code = 2


class CheckpointError(StellaError):
    """A checkpoint file that cannot be used (missing, empty, truncated, not ours, another model or method)."""


class DivergenceError(StellaError, FloatingPointError):
    """Training produced a non-finite value; the message names the step, the values and the last good checkpoint."""

    exit_code = 3


class Interrupted(StellaError):
    """A requested stop (signal, --stop-after, Ctrl-C); the message says what was kept and how to continue."""

    exit_code = 130


def rank_prefix() -> str:
    """'[rank N] ' on the non-zero ranks of a torchrun job, so their lines can be told apart; '' otherwise."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" or os.environ.get("WORLD_SIZE", "1") == "1" else f"[rank {rank}] "


def is_rank_zero() -> bool:
    """True outside torchrun and on its rank 0 (the one that prints tables and progress)."""
    return os.environ.get("RANK", "0") == "0"


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the kernel kills this process when its parent dies (even by kill -9), and Ctrl-C is left
    to the parent, which stops the pool itself. Linux only (prctl); elsewhere the pool's own clean-up applies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
