"""Writing files that a full disk or a second process cannot spoil: atomic writes that fail in one line, folder locks.

Every file stella writes goes through `replacing` (a temp file beside it, renamed into place), `append_text` or
`write_failures` (a folder, a memory-mapped cache). An OSError while writing (a full disk, a quota, a file-size limit,
a folder that cannot be written) removes what was half-written and becomes one WriteFailed line naming the file,
the reason and the free space; the previous version of the file (the last good checkpoint, a finished cache row, a
report) is never touched. torch.save reports the OSError of the file object it writes to as the context of its own
RuntimeError, so checkpoints get the same line.

A folder that one command owns while it runs (a run directory, the --out of `stella prep`, a table folder of
`stella reproduce`) is held with `holding`: an flock on FOLDER/.stella.lock, which the kernel releases when the
holder exits or dies (kill -9 included), so a killed run never blocks its own --resume. A second process is refused
in one line naming the holder (host, pid, since when, command).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Iterator

from stella_cli.errors import FolderInUse, StellaError, WriteFailed

LOCK_NAME = ".stella.lock"  # in the held folder; left there (removing a lock file races with the next holder)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a file system without flock (some NFS mounts)
REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EFBIG: "file too large for the file-size limit, ulimit -f, or the file system"}


def size_text(n: float) -> str:
    """1234567 -> '1.2 MiB' (binary units), for messages."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_space(path: Path) -> str:
    """'12.3 MiB free on /mnt/data': the free space of the file system that holds `path` (or would hold it)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return f"{size_text(free)} free on {folder}"


def os_error_in(err: BaseException | None) -> OSError | None:
    """The OSError behind `err`: itself, or one in its chain of causes and contexts."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def write_failures(path: Path, partial: Path | None = None, needs: int | None = None) -> Iterator[None]:
    """An OSError in the block becomes a WriteFailed naming `path` (and the `needs` bytes it was to take);
    `partial`, the half-written file, is removed on any failure (Ctrl-C included)."""
    try:
        yield
    except BaseException as err:
        removed = False
        if partial is not None:
            with suppress(OSError):
                removed = Path(partial).exists()
                Path(partial).unlink(missing_ok=True)
        cause = None if isinstance(err, StellaError) else os_error_in(err)
        if cause is None:
            raise
        reason = REASONS.get(cause.errno) or cause.strerror or str(cause)
        if needs is not None:
            reason += f": it needs {size_text(needs)}"
        raise WriteFailed(f"{path}: cannot write it ({reason}; {free_space(path)})"
                          + ("; the partial file was removed" if removed else "")) from err


def make_dir(folder: Path) -> Path:
    """mkdir -p, failing in one line."""
    with write_failures(Path(folder)):
        Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


@contextmanager
def replacing(path: Path, *, sync: bool = False) -> Iterator[BinaryIO]:
    """A binary file object for `path`, written to PATH.tmp and renamed over `path` when the block ends, so a
    reader (or the next start) sees the old file or the new one, never a part. The folder is created if needed.
    sync: fsync before the rename (a checkpoint is whole on disk before it replaces the last good one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with write_failures(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            yield fh
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file + rename: readers never see a half-written file."""
    with replacing(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_text(path: Path, text: str) -> None:
    """Append to a log (metrics.jsonl); a write that fails part-way is cut off again, so every line stays whole."""
    path = Path(path)
    with write_failures(path):
        size = path.stat().st_size if path.exists() else 0
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(text)
        except OSError:
            with suppress(OSError):
                os.truncate(path, size)
            raise


def reserve(fh: BinaryIO, size: int) -> None:
    """Allocate the disk blocks of a new (sparse) file now (Linux fallocate), so that a full disk fails here, and
    not as a SIGBUS when a worker later writes into a hole of a memory-mapped cache. Where the file system has no
    fallocate (or elsewhere than Linux) the file stays sparse: no slow emulation that writes every block."""
    if not sys.platform.startswith("linux") or size <= 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = getattr(libc, "fallocate64", None) or libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fh.fileno(), 0, 0, size) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code))


# ----------------------------------------------------------------------------------------------------------
# folder locks


_HELD: set[int] = set()  # this process's lock descriptors


def _close_held_in_child() -> None:
    """In a forked child (a data-loader or prep worker): drop its copies of the parent's lock descriptors, so the
    lock goes with the parent (kill -9 included), not with the last worker to notice."""
    for fd in _HELD:
        with suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def holder_of(fd: int) -> str:
    """'pid 123 on host gpu01 since 2025-01-05 14:03:12 (2 min ago): stella train r.yaml', from the lock file."""
    for _ in range(40):  # the holder writes its line just after it takes the lock
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and "since" in info:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
            age = max(0.0, time.time() - info["since"])
            ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.1f} h"
            return f"pid {info.get('pid')} on host {info.get('host')} since {since}, {ago} ago: {info.get('command')}"
        time.sleep(0.05)
    return "its pid and host are not recorded"


def lock(folder: Path, advice: str) -> int | None:
    """Take FOLDER/.stella.lock, creating the folder; FolderInUse naming the holder when another process has it.
    Returns the descriptor that holds the lock (None on a file system without locks: then nothing is held)."""
    path = Path(folder) / LOCK_NAME
    while True:
        with write_failures(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_of(fd)
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by another stella process ({holder}); {advice}") from None
        except OSError as err:
            os.close(fd)
            if err.errno in NO_LOCKS:
                return None
            raise
        try:  # still the file at `path`: a holder that ends removes a folder it created and left empty
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "command": " ".join(["stella", *sys.argv[1:]])}
    with write_failures(path):
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD.add(fd)
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        _HELD.discard(fd)
        os.close(fd)


@contextmanager
def holding(folder: Path, *, advice: str) -> Iterator[None]:
    """Hold `folder` for the block (see the module docstring); `advice` ends the line a second process gets. The
    folders the lock created are removed again if the block leaves them empty, so a failed start leaves nothing."""
    folder = Path(folder)
    first_new = None
    for parent in (folder.absolute(), *folder.absolute().parents):
        if parent.exists():
            break
        first_new = parent
    fd = lock(folder, advice)
    try:
        yield
    finally:
        if first_new is not None:
            with suppress(OSError):
                if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
                    (folder / LOCK_NAME).unlink()
                    for empty in (folder.absolute(), *folder.absolute().parents):
                        empty.rmdir()
                        if empty == first_new:
                            break
        unlock(fd)
