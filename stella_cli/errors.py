"""The expected failures of `stella`: each one is a single line for the user and an exit code.

`cli.main` prints `error: <message>` and exits with `exit_code`; anything else is a bug and keeps its traceback.
Exit codes: 0 done, 2 bad input (recipe, data, checkpoint, run directory) or a file that cannot be written (a full
disk), 3 training diverged (non-finite values), 130 interrupted (Ctrl-C / SIGTERM, with what was kept and how to
continue).
"""

from __future__ import annotations


class StellaError(Exception):
    """An expected failure: the message names the file, key or step and says what to do."""

    exit_code = 2


class CheckpointError(StellaError):
    """A checkpoint file that cannot be used (missing, empty, truncated, not ours, another model or method)."""


class WriteFailed(StellaError):
    """A file could not be written (a full disk, a quota, a file-size limit, a folder that cannot be written): `what`
    names the file, the reason and the free space; the partial file is gone and the last good version kept.
    `advice` says how to continue; a caller that knows more (train: the last good checkpoint) replaces it."""

    def __init__(self, what: str, advice: str = "make room (or fix the cause) and run the same command again"):
        super().__init__(what, advice)  # both in args, so a prep worker's failure pickles back to the parent
        self.what, self.advice = what, advice

    def __str__(self) -> str:
        return f"{self.what}; {self.advice}"

    def with_advice(self, advice: str) -> WriteFailed:
        return WriteFailed(self.what, advice)


class FolderInUse(StellaError):
    """Another process holds the folder (a run directory, a prep's --out, a reproduction's table): the message names
    it (host, pid, since when, command)."""


class DivergenceError(StellaError, FloatingPointError):
    """Training produced a non-finite value; the message names the step, the values and the last good checkpoint."""

    exit_code = 3


class Interrupted(StellaError):
    """A requested stop (signal, --stop-after, Ctrl-C); the message says what was kept and how to continue."""

    exit_code = 130
