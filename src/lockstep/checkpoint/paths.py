"""Which files a checkpoint may make us read: regular files inside the checkpoint, or the
file the user named.

* The path the user names is read wherever a link takes it, but it must be a regular file
  (a FIFO would block the read forever) or a directory.
* Inside a checkpoint directory, a file found by a pattern or named by an index
  (``model.safetensors.index.json``'s ``weight_map``) must be a plain relative name that stays
  in the directory (no ``..``, not absolute) and a regular file. A symbolic link is
  followed only when it lands inside the directory, or, for a Hugging Face cache snapshot
  (``.../snapshots/<revision>/``), inside that model's ``blobs/`` folder, where the cache keeps
  every file a snapshot links to.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from ..jsontext import JSONTextError, loads
from .errors import CheckpointError

__all__ = ["named_file", "member", "inside", "read_json"]

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
MAX_JSON = 100 << 20  #: bytes of a JSON file we read at the most


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _stat(path: Path, *, follow: bool, missing: str) -> os.stat_result:
    try:
        return os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(path, missing) from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None


def _regular(path: Path, st: os.stat_result, hint: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(path, f"not a regular file ({_kind(st.st_mode)}); {hint}")


def named_file(path: Path) -> os.stat_result:
    """The file the user named: any link followed, but it must be a regular file."""
    st = _stat(path, follow=True, missing="no such file or directory")
    _regular(path, st, "give a checkpoint file or directory")
    return st


def _roots(root: Path) -> list[Path]:
    roots = [root.resolve()]
    if root.parent.name == "snapshots":  # a Hugging Face cache: snapshots link into blobs/
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def inside(root: Path, path: Path) -> Path:
    """``path`` (found in ``root``) checked: a regular file, and a link only into ``root``
    (or a Hugging Face cache's blobs); returns it."""
    st = _stat(path, follow=False, missing="is missing")
    if stat.S_ISLNK(st.st_mode):
        try:
            target = path.resolve()
        except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop
            raise CheckpointError(path, "is a symbolic link that loops; refused") from None
        if not any(target.is_relative_to(r) for r in _roots(root)):
            raise CheckpointError(path, "is a symbolic link that leads out of the checkpoint "
                                        "directory; refused (inspect the file itself if "
                                        "you mean it)")
        st = _stat(path, follow=True, missing="is a broken symbolic link")
    _regular(path, st, "a checkpoint's tensor files must be files")
    return path


def member(root: Path, name: Any, where: Path) -> Path:
    """The file an index in ``root`` names: a relative path that stays in ``root``."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(where, f"a shard name must be a non-empty string, got "
                                     f"{type(name).__name__}")
    try:
        os.fsencode(name)
    except UnicodeEncodeError:  # a lone surrogate: no file can have that name
        raise CheckpointError(where, f"shard name {name[:200]!r} is not a valid file "
                                     "name") from None
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or "\0" in name:
        raise CheckpointError(where, f"shard {name[:200]!r} is outside the checkpoint "
                                     "directory; refused")
    return inside(root, root.joinpath(*parts))


def read_json(path: Path, root: Path | None = None) -> Any:
    """A small JSON file of the checkpoint (an index, a config); CheckpointError if it is
    not a readable regular file of JSON."""
    if root is None:
        named_file(path)
    else:
        inside(root, path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON + 1)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_JSON:
        raise CheckpointError(path, f"over {MAX_JSON >> 20} MiB: not a JSON index or config")
    try:
        return loads(raw)
    except JSONTextError as exc:
        raise CheckpointError(path, f"cannot read JSON: {exc}") from None
