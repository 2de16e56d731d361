"""Atomic, durable file writes and content digests: the one place every stage writes a file that must be whole
or absent after a crash (write to a unique temporary name beside it, fsync, rename over)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def atomic_tmp(path: str | os.PathLike) -> Path:
    """A temporary name beside `path`, unique to this call (so concurrent writers never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished temporary file over `path`, flushed first: after a crash it is whole or absent."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mkdir: bool = True) -> Iterator[Path]:
    """`with atomic_path(p) as tmp: write(tmp)`: tmp replaces p when the block succeeds; on any error tmp is
    removed and p is left as it was. For writers that take a path (safetensors, parquet, PIL)."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_tmp(path)
    try:
        yield tmp
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 1, sort_keys: bool = True) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_digest(obj) -> str:
    """16 hex digits naming a JSON-able value (key order ignored): dataset ids, evaluation and baseline keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
