"""Atomic, durable file writes and content digests: the one place every stage writes a file that must be whole
or absent after a crash or a full disk (write to a temporary name beside it that names its writer, fsync, rename
over), and tells a dead writer's leftovers from a live one's in-flight file."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"  # no dots: the temp name is split on them
FOREIGN_TMP_STALE_S = 24 * 3600  # another host's temp file untouched this long is a leftover (its pid is not ours)


class DiskFullError(OSError):
    """No space left on a device while writing `filename`; the partial file was removed. Built by `disk_full`
    (OSError's own arguments, so that it crosses process boundaries: Ray actors)."""

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full(path: str | os.PathLike) -> DiskFullError:
    return DiskFullError(errno.ENOSPC, f"no space left on device writing {path}: nothing half-written was kept; "
                                       "free space (or choose another output folder) and re-run, finished files "
                                       "are kept", str(path))


def disk_full_cause(e: BaseException) -> BaseException | None:
    """The out-of-space error behind `e` (its causes and contexts, a Ray task error's cause), else None.
    safetensors reports ENOSPC as `SafetensorError(... os error 28)`, pyarrow as OSError(28), Python as ENOSPC."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(getattr(x, "cause", None), BaseException):  # a Ray task error: look at what the task raised
            todo.append(x.cause)
            continue
        if isinstance(x, DiskFullError) or (isinstance(x, OSError) and x.errno == errno.ENOSPC):
            return x
        if not isinstance(x, OSError) and re.search(r"No space left on device|os error 28\b", str(x)):
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def as_disk_full(e: BaseException, path: str | os.PathLike) -> DiskFullError | None:
    """The DiskFullError to raise for `e` (its own, naming the file, or one naming `path`); None if `e` is not
    about a full disk."""
    full = disk_full_cause(e)
    if full is None:
        return None
    return full if isinstance(full, DiskFullError) else disk_full(path)


@contextlib.contextmanager
def naming_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Turn an out-of-space error raised in the block into a DiskFullError naming `path` (others pass through)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if disk_full_cause(e) is None:
            raise
        raise disk_full(path) from e


def atomic_tmp(path: str | os.PathLike) -> Path:
    """`.<name>.<host>.<pid>.<random>.tmp` beside `path`: unique to this call (so concurrent writers never share
    one) and naming its writer, so that a cleaner removes only the leftovers of writers that are gone."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def tmp_writer_alive(tmp: str | os.PathLike) -> bool:
    """Whether the process writing temporary file `tmp` (an `atomic_tmp` name) may still be running: its pid is
    alive on this host, or (another host's file) it was touched within FOREIGN_TMP_STALE_S. A name that does not
    say its writer (older formats) is a leftover."""
    tmp = Path(tmp)
    parts = tmp.name.removesuffix(".tmp").rsplit(".", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return False
    host, pid = parts[1], int(parts[2])
    if host != _HOST:
        try:
            return time.time() - tmp.stat().st_mtime < FOREIGN_TMP_STALE_S
        except FileNotFoundError:
            return False
    return pid_exists(pid)


def pid_exists(pid: int) -> bool:
    """Whether process `pid` exists on this machine (another user's counts: the kernel says so even where /proc
    hides it)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_dead_tmp(paths: Iterable[Path]) -> list[Path]:
    """Delete the temporaries among `paths` whose writer is gone (see tmp_writer_alive): files (atomic_path) and
    directories (atomic_files, which a kill mid-save leaves behind); returns them."""
    gone = []
    for p in list(paths):  # listed first: removing a directory must not disturb a walk that found it
        if (p.is_file() or p.is_dir()) and not tmp_writer_alive(p):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished temporary file over `path`, flushed first: after a crash it is whole or absent."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mkdir: bool = True) -> Iterator[Path]:
    """`with atomic_path(p) as tmp: write(tmp)`: tmp replaces p when the block succeeds; on any error tmp is
    removed and p is left as it was (a full disk raises DiskFullError naming p). For writers that take a path
    (safetensors, parquet, PIL)."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_tmp(path)
    try:
        with naming_disk_full(path):
            yield tmp
            replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_files(out_dir: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_files(d) as tmp: writer(tmp)`: for writers that lay out several files under a directory
    (`save_pretrained`). They go to a temporary directory beside d (dot-named, as atomic_tmp); when the block
    succeeds each file is renamed to its place under d, so every file at a final name is whole. On any error the
    temporary directory is removed and d is left as it was."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a save killed mid-write (no `finally` runs under SIGKILL, nor in a thread the interpreter abandons) left its
    # temporary directory here: a later save of the same directory clears those whose writer is gone
    remove_dead_tmp(out.parent.glob(f".{glob.escape(out.name)}.*.tmp"))
    tmp = atomic_tmp(out)
    tmp.mkdir()
    try:
        with naming_disk_full(out):
            yield tmp
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                dest = out / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                replace_durably(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 1, sort_keys: bool = True) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))


def require_regular_file(path: str | os.PathLike, what: str, give: str = "a file") -> None:
    """Refuse, naming `what`, anything at `path` but a regular file: nothing (FileNotFoundError), a directory
    (IsADirectoryError, saying to give `give`), a pipe, socket or device such as /dev/zero (ValueError: reading one
    would block or never end). Only `stat` is used: nothing is opened."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory, give {give}")
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file (a pipe, socket or device): give a file")


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


SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on its JSON header


class NotSafetensors(ValueError):
    """A file whose framing is not a whole safetensors file; the message says why (without the file's name)."""


def safetensors_table(path: str | os.PathLike) -> tuple[dict[str, dict], int, int]:
    """(tensor table without __metadata__, the file's size, the size its header declares) from the 8-byte length and
    the JSON header alone: no tensor is read, so a file of any size costs the same. NotSafetensors when the framing
    is wrong or the file is shorter than it declares; OSError (missing, a directory, unreadable) as it comes."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > SAFETENSORS_MAX_HEADER:
            raise NotSafetensors(f"not a safetensors file ({size} bytes, no valid header)")
        if 8 + n > size:
            raise NotSafetensors(f"truncated ({size} bytes, its header alone declares {8 + n})")
        try:
            table = json.loads(f.read(n))
            table.pop("__metadata__", None)
            declared = 8 + n + max((v["data_offsets"][1] for v in table.values()), default=0)
        except (ValueError, AttributeError, KeyError, TypeError, IndexError):  # not JSON, or not a tensor table
            raise NotSafetensors("not a safetensors file (its header is not a tensor table)") from None
    if size < declared:
        raise NotSafetensors(f"truncated ({size} of {declared} bytes)")
    return table, size, declared
