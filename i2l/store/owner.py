"""Which process owns a run, told apart from a later process that got the same pid.

A run is 'running' in the store until its process finishes it. A process killed outright (SIGKILL, the kernel's
OOM killer, a worker's kill 30 s after its SIGTERM) finishes nothing, and the store said 'running' for ever (CI,
2026-12-05: a cancelled deployment run's train run). So each run records its owner, and a later writer on the same
machine marks failed the runs whose owner is gone (`fail_orphaned_runs`).

The owner token is `linux:<boot id>:<pid namespace>:<pid>:<start time>`. The start time (in clock ticks since boot,
/proc/<pid>/stat) tells a reused pid apart; the boot id and the pid namespace say whether this process can see the
owner at all: another machine that shares the store file (NFS) or a container with its own pids cannot, and its runs
are left alone. Without /proc (not Linux) there is no token, and no run is judged.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from i2l.io import pid_exists
from i2l.store.rows import now_utc

if TYPE_CHECKING:
    from i2l.store.results import Store

_PREFIX = "linux"
_GONE, _HIDDEN = "gone", "hidden"  # what _start_ticks says instead of a start time


def _start_ticks(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); _GONE if the process has ended (or is a
    zombie), _HIDDEN if it may run but its start time cannot be read (another user's, /proc mounted hidepid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except PermissionError:
        return _HIDDEN
    except (FileNotFoundError, ProcessLookupError):
        # gone, or hidden from /proc (hidepid): the kernel still says whether the pid exists
        return _HIDDEN if pid_exists(pid) else _GONE
    # the command name (field 2) is in parentheses and may hold spaces or ')': split after its last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # field 3, the state: a zombie has ended, only its parent has not reaped it yet
        return _GONE
    return fields[19]


@lru_cache(maxsize=1)
def _machine() -> tuple[str, str] | None:
    """(boot id, pid namespace) of this process, or None where /proc does not tell them."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink("/proc/self/ns/pid")  # 'pid:[4026531836]'
    except OSError:
        return None
    return boot, ns.removeprefix("pid:").strip("[]")


def owner_token(pid: int | None = None) -> str | None:
    """This process's owner token (or `pid`'s, same machine and namespace); None where it cannot be made."""
    machine = _machine()
    if machine is None:
        return None
    pid = os.getpid() if pid is None else pid
    ticks = _start_ticks(pid)
    return None if ticks in (_GONE, _HIDDEN) else ":".join((_PREFIX, *machine, str(pid), ticks))


def owner_gone(token: str | None) -> bool | None:
    """True: the token's process has ended. False: it still runs. None: this process cannot tell (no token, an
    unknown form, another machine or pid namespace, a process of that pid whose start time is hidden from us)."""
    parts = (token or "").split(":")
    machine = _machine()
    if len(parts) != 5 or parts[0] != _PREFIX or machine is None or tuple(parts[1:3]) != machine:
        return None
    try:
        pid = int(parts[3])
    except ValueError:
        return None
    ticks = _start_ticks(pid)
    return None if ticks == _HIDDEN else ticks != parts[4]


def fail_orphaned_runs(store: Store) -> list[str]:
    """Mark failed, with a note, the runs still 'running' whose process has ended without finishing them (killed
    outright: SIGKILL, the OOM killer); returns their ids. Only runs started on this machine and pid namespace are
    judged; runs of live processes, of other machines and of older i2l are left alone. Every store opened for
    writing does this once (Store(..., auto_migrate=True))."""
    host = socket.gethostname()
    candidates = store.rows("SELECT run_id, owner FROM runs WHERE status = 'running' AND host = ? "
                            "AND owner IS NOT NULL", [host])
    gone = [(run_id, owner) for run_id, owner in candidates if owner_gone(owner)]
    if not gone:
        return []
    marked = []
    with store.transaction() as con:
        for run_id, owner in gone:
            note = (f"its process (pid {owner.split(':')[3]} on {host}) ended without finishing it: killed "
                    f"outright? (marked failed by pid {os.getpid()} at {now_utc():%Y-%m-%d %H:%M:%S} UTC)")
            # the status and owner are checked again: another writer may have marked it, or a resumed run taken it
            n = con.execute("UPDATE runs SET status = 'failed', finished_at = ?, note = ? "
                            "WHERE run_id = ? AND status = 'running' AND owner = ?",
                            [now_utc(), note, run_id, owner]).fetchall()[0][0]
            if n:
                marked.append(run_id)
    return marked
