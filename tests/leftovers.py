"""What a writer killed mid-file leaves behind: an i2l.io.atomic_tmp temporary whose writer has exited."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from i2l.io import atomic_tmp


def dead_pid() -> int:
    """The pid of a process that has exited (not reused within a test, in practice)."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


def dead_writer_tmp(path: str | os.PathLike, pid: int | None = None, data: bytes = b"half a file") -> Path:
    """Write the temporary of `path` that a writer with (exited) `pid` would have left mid-write; returns it."""
    live = atomic_tmp(path)
    left = live.with_name(live.name.replace(f".{os.getpid()}.", f".{pid or dead_pid()}."))
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_bytes(data)
    return left
