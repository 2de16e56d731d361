"""Real local servers for tests (a Prefect server, a Ray head): free ports, wait until up, stop the whole group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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


def tagged(tag: str) -> list:
    """Live processes started by a run of ours: they inherit its I2L_FAULT_TAG (Ray's workers too, which Ray
    starts in process groups of their own)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("I2L_FAULT_TAG") == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def stop_group(proc: subprocess.Popen, wait_s: float = 30) -> None:
    """SIGTERM the server (it stops its children in order), then SIGKILL what is left of its process group.

    Only the leader is signalled: a SIGTERM to the whole group at once left a `ray start --head --block` waiting
    ~60 s on children that were already gone (3 s when the leader alone is told)."""
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # nothing left: the leader stopped every child
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def prefect_env(home: Path, api_url: str | None = None) -> dict:
    """An environment with its own Prefect home (never the user's profile) and this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_AUTH_MODE="disabled",
               HF_HUB_OFFLINE="1", PATH=f"{BIN}:{env['PATH']}", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextlib.contextmanager
def start_prefect_server(home: Path) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 with its own home (database, log); yields its API URL; stopped after."""
    home.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    url, log_path = f"http://127.0.0.1:{port}/api", home / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                 str(port)], env=prefect_env(home), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until_up(f"{url}/health", proc, log_path, "prefect server")
        yield url
    finally:
        stop_group(proc)  # the server and its uvicorn children (a session of their own)
