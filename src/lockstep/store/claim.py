"""Claiming a directory for a new dump: create it, lock it, and overwrite nothing but a dump.

The rules (docs/format.md, "Writing a dump: paths, overwrite and concurrency"):

* the dump path itself must not be a symbolic link, and ``index.jsonl``/``data.bin`` inside
  it are never followed if they are links;
* a new or empty directory is used as it is; a non-empty one only with ``overwrite``, and
  only when it holds exactly a lockstep dump: an ``index.jsonl`` that begins with a lockstep
  header (or is empty: a writer died before its header) and at most a ``data.bin``, both
  regular files, nothing else. Such a dump is truncated in place, never removed;
* the writer holds an exclusive ``flock`` on ``index.jsonl`` from before it looks at the
  directory until it closes, so a second writer of the same path, in this process or
  another, is refused instead of mixing its records with the first one's.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import UsageError
from ..jsontext import JSONTextError, loads

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

__all__ = ["claim_dump_dir", "INDEX_FILE", "DATA_FILE", "FORMAT_NAME"]

FORMAT_NAME = "lockstep-dump"
INDEX_FILE = "index.jsonl"
DATA_FILE = "data.bin"
_HEAD = 1 << 20  # bytes of index.jsonl read to find the header line
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _cannot(path: Path, exc: OSError) -> UsageError:
    why = exc.strerror or str(exc)
    if exc.errno == errno.ELOOP:
        why = "it is a symbolic link, which a dump writer never follows"
    return UsageError(f"cannot create the dump {path}: {why}")


def _busy(path: Path) -> UsageError:
    return UsageError(f"another process is recording to {path} (its {INDEX_FILE} is locked); "
                      "wait for it to finish or choose another dump path")


def _lock(fd: int, path: Path) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _busy(path) from None


def _not_busy(path: Path) -> None:
    """Raise the "another process is recording" error if a writer holds the index now."""
    try:
        # (non-blocking: a FIFO in its place must not wait for a writer)
        probe = os.open(path / INDEX_FILE, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _cannot(path, exc) from None
    _lock(probe, path)
    os.close(probe)


def _entries(path: Path) -> set[str]:
    try:
        return set(os.listdir(path))
    except OSError as exc:
        raise _cannot(path, exc) from None


def _is_dump_index(fd: int) -> bool:
    """The open index begins with a lockstep header line, or is empty."""
    os.lseek(fd, 0, os.SEEK_SET)
    head = os.read(fd, _HEAD)
    if not head:
        return True
    line = head.split(b"\n", 1)[0]
    try:
        obj = loads(line)
    except JSONTextError:
        return False
    return isinstance(obj, dict) and obj.get("type") == "header" and \
        obj.get("format") == FORMAT_NAME


def _regular(path: Path, name: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path / name).st_mode)
    except FileNotFoundError:
        return True  # gone: nothing to keep
    except OSError:
        return False


def _empty(file: Path) -> bool:
    try:
        st = os.lstat(file)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def _check_contents(path: Path, overwrite: bool, fd: int | None) -> None:
    """Refuse unless ``path`` is empty, or (``overwrite``) holds exactly a lockstep dump."""
    entries = _entries(path)
    if not entries or (entries == {INDEX_FILE} and _empty(path / INDEX_FILE)):
        return  # new, or an index just created (by us, or by a writer that lost the race)
    if not overwrite:
        raise UsageError(f"{path} already exists and is not empty; choose a new dump path "
                         "or pass overwrite=True (--overwrite)")
    others = sorted(entries - {INDEX_FILE, DATA_FILE})
    if INDEX_FILE not in entries:
        raise UsageError(f"{path} is not a lockstep dump (no {INDEX_FILE}), so it is not "
                         "overwritten; choose another path")
    if others:
        shown = ", ".join(repr(n) for n in others[:3]) + (" ..." if len(others) > 3 else "")
        raise UsageError(f"{path} holds more than a lockstep dump ({shown}), so it is not "
                         "overwritten; choose another path or remove them yourself")
    if not all(_regular(path, n) for n in (INDEX_FILE, DATA_FILE)):
        raise UsageError(f"{path}: {INDEX_FILE} or {DATA_FILE} is not a regular file, so the "
                         "directory is not overwritten; choose another path")
    if fd is not None and not _is_dump_index(fd):
        raise UsageError(f"{path}: {INDEX_FILE} does not begin with a lockstep header, so the "
                         "directory is not overwritten; choose another path")


def claim_dump_dir(path: Path, overwrite: bool) -> tuple[int, int]:
    """Make ``path`` an empty dump directory that this process alone writes; returns the
    open, locked index and the open data file descriptors (both empty, positioned at 0)."""
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _cannot(path, exc) from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{path} is a symbolic link; a dump is never written through one: "
                         "give the directory it points to")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} exists and is not a directory; choose another dump path")
    if st is None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _cannot(path, exc) from None
    index = path / INDEX_FILE
    _not_busy(path)  # a writer there now is named before anything else is said
    try:
        _check_contents(path, overwrite, None)  # before a file is created in the user's folder
    except UsageError:
        _not_busy(path)  # a writer that started meanwhile (open, not yet locked) is named too
        raise
    try:
        fd = os.open(index, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
    except OSError as exc:
        raise _cannot(path, exc) from None
    _lock(fd, path)
    try:
        _check_contents(path, overwrite, fd)  # again, under the lock: what we will replace
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.open(path / DATA_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW,
                       0o666)
    except OSError as exc:
        os.close(fd)
        raise _cannot(path, exc) from None
    except BaseException:
        os.close(fd)
        raise
    return fd, data
