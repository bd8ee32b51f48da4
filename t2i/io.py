"""Atomic file writes: every result, report and metadata file is written to a unique temporary name
in the same folder, flushed, and renamed over the target, so a reader (or a process killed mid-write)
sees the old file or the new one, never a torn one. Two writers of one file never share a temp name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable


def atomic_write(path: str | Path, write: Callable[[Path], object], fsync: bool = False) -> Path:
    """Call `write(tmp)` on a fresh temporary path next to `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are read by others
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), fsync=fsync)


def write_json(path: str | Path, obj, indent: int = 2, fsync: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n", fsync=fsync)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line (GenEval's metadata and results files)."""
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
