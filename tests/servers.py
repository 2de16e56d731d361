"""Real local servers for tests (a Prefect server, a Ray head): free ports, wait until up, stop the whole group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """n distinct free localhost ports (all held at once while choosing, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float = 240) -> None:
    """Poll url until it answers; fail with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s  # a first start may create its database: slow on a busy machine
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{what} did not come up"
            time.sleep(1)


def stop_group(proc: subprocess.Popen, wait_s: float = 30) -> None:
    """SIGTERM the process's session (the server and its children), then SIGKILL what is left."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
