"""Write aside, then rename: an interrupted save or a full disk never leaves a half-written file or folder that a
later step would read as whole; and a lock so that two runs never write one folder at once."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def staging_path(path: Path, tag: str = "writing") -> Path:
    """The hidden sibling ``.NAME.TAG`` of ``path`` (same parent, so the final rename stays on one file system)."""
    path = Path(path)
    return path.parent / f".{path.name}.{tag}"


def swap_in(staging: Path, path: Path) -> Path:
    """Replace ``path`` by ``staging``: the old version is moved aside first and deleted only after the rename."""
    staging, path = Path(staging), Path(path)
    old = staging_path(path, "old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists() or path.is_symlink():
        path.rename(old)
    staging.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty hidden sibling folder to write into; it replaces ``path`` only when the block succeeds.

    On any exception (a ``KeyboardInterrupt`` included) the sibling is removed and ``path`` is left as it was; a
    full disk is raised as :class:`DiskFull` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise DiskFull(errno.ENOSPC, disk_full_message(path)) from err
        raise
    swap_in(staging, path)


class DiskFull(OSError):
    """A write failed because the disk is full; the message names the file, the free space and the fix."""

    def __str__(self) -> str:
        return str(self.strerror)  # the one line, without OSError's "[Errno 28]" prefix


DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# What torch.save / safetensors say when a write fails underneath them: their C++ writers drop the errno.
STREAM_WRITE_FAILURES = ("PytorchStreamWriter failed writing", "file write failed", "unexpected pos",
                         "No space left on device")


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` (or an exception it was raised from) is a failed write for want of space."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFull) or (isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS):
            return True
        if isinstance(err, RuntimeError) and any(s in str(err) for s in STREAM_WRITE_FAILURES):
            return True
        err = err.__cause__ or err.__context__
    return False


def free_mib(path: str | Path) -> float | None:
    """Free space (MiB) on the disk holding ``path`` or its nearest existing parent; None when it cannot be read."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free / 2**20
    except OSError:
        return None


def disk_full_message(path: str | Path, what: str = "writing") -> str:
    """One line for a write that ran out of space: where, how much is free, and what to do."""
    free = free_mib(path)
    left = f"{free:,.0f} MiB free there" if free is not None else "free space unknown"
    return (f"{path}: the disk is full ({left}) while {what}; free some space (or point the output folder at "
            "another disk) and run it again")


def atomic_write(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` to a hidden sibling, flush it to disk, then rename it over ``path``.

    A reader sees the old file or the new one, never a part: an interrupted or failed write (a full disk) leaves
    ``path`` as it was and removes the sibling. A full disk raises :class:`DiskFull` with one line naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(path, f"{os.getpid()}.tmp")
    raw = data.encode(encoding) if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and is_disk_full(err):
            raise DiskFull(err.errno, disk_full_message(path)) from None
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """:func:`atomic_write` of ``obj`` as indented JSON with a final newline."""
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock; the message names the folder, the holder and the fix."""


LOCK_FILE = ".lock"


@contextmanager
def folder_lock(folder: str | Path, fix: str = "wait for it to finish or use another folder") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (``FOLDER/.lock``) for the block, or raise :class:`FolderBusy` at once.

    The lock is the operating system's (``fcntl.flock``): it is released when the process ends, however it ends,
    so a killed run never leaves a stale lock behind. The file records the holder's pid for the message.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise FolderBusy(f"{folder}: another run (pid {holder}) is writing there; {fix}") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield folder
    finally:
        handle.close()  # the file stays: unlinking it would let a waiting process lock a file no one else sees
