"""A run whose process was killed outright (SIGKILL, the OOM killer) is marked failed, with a note, by the next
store opened for writing on that machine; live processes' runs, other machines' and older i2l's are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from i2l.store import Store
from i2l.store.owner import owner_gone, owner_token

REPO = Path(__file__).resolve().parents[2]

# start a run in the store named by argv[1], say so, then wait (argv[2] == 'wait') or die by SIGKILL at once
STARTER = textwrap.dedent("""
    import os, signal, sys, time
    from i2l.store import Store
    Store(sys.argv[1]).start_run("train", "debug", {})
    print("started", flush=True)
    if sys.argv[2] == "wait":
        time.sleep(120)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _starter(store: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", STARTER, str(store), mode], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "started"
    return proc


def _runs(path: Path) -> list[tuple]:
    return Store(path, read_only=True).rows("SELECT status, note FROM runs")


def test_a_killed_run_is_marked_failed_by_the_next_writer_with_a_note(tmp_path):
    path = tmp_path / "results.duckdb"
    proc = _starter(path, "die")
    assert proc.wait(30) == -signal.SIGKILL
    assert _runs(path) == [("running", None)]  # nothing marks it while only readers open the store
    Store(path)
    [(status, note)] = _runs(path)
    assert status == "failed"
    assert f"pid {proc.pid}" in note and "ended without finishing it" in note


def test_a_live_process_keeps_its_run_running_until_it_is_killed(tmp_path):
    path = tmp_path / "results.duckdb"
    proc = _starter(path, "wait")
    try:
        assert Store(path).fail_orphaned_runs() == []
        assert _runs(path) == [("running", None)]
    finally:
        proc.kill()
        proc.wait(30)
    assert len(Store(path).fail_orphaned_runs()) == 0  # the writer's open already marked it
    assert _runs(path)[0][0] == "failed"


def test_only_runs_this_machine_can_judge_are_marked(tmp_path):
    store = Store(tmp_path / "results.duckdb")
    mine = owner_token()
    boot, ns, pid, ticks = mine.split(":")[1:]
    owners = {
        "reused-pid": f"linux:{boot}:{ns}:{pid}:{int(ticks) + 1}",  # this pid, a different start: gone
        "alive": mine,
        "other-namespace": f"linux:{boot}:1:{pid}:{int(ticks) + 1}",  # another container's pids
        "other-boot": f"linux:not-this-boot:{ns}:{pid}:{int(ticks) + 1}",  # another machine
        "older-i2l": None,  # recorded before runs had owners
        "unknown-form": "darwin:42",
    }
    for run_id, owner in owners.items():
        store.start_run("eval", "debug", {}, run_id=run_id)
        with store.transaction() as con:
            con.execute("UPDATE runs SET owner = ? WHERE run_id = ?", [owner, run_id])
    store.start_run("eval", "debug", {}, run_id="other-host")
    with store.transaction() as con:  # another machine's name: never judged, even with a gone-looking owner
        con.execute("UPDATE runs SET host = 'elsewhere', owner = ? WHERE run_id = 'other-host'",
                    [owners["reused-pid"]])
    assert store.fail_orphaned_runs() == ["reused-pid"]
    status = dict(store.rows("SELECT run_id, status FROM runs"))
    assert status.pop("reused-pid") == "failed"
    assert set(status.values()) == {"running"}, status
    # starting a known run again makes this process its owner and clears an old note
    store.start_run("eval", "debug", {}, run_id="reused-pid")
    assert store.rows("SELECT status, owner, note FROM runs WHERE run_id = 'reused-pid'") == [("running", mine, None)]


def test_owner_tokens_tell_a_zombie_and_a_reused_pid_from_a_live_process():
    assert owner_gone(owner_token()) is False
    assert owner_gone(None) is None and owner_gone("linux:x") is None and owner_gone("") is None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    token = owner_token(child.pid)  # taken while it runs
    assert token is not None and owner_gone(token) is False
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped by us: a zombie
    assert Path(f"/proc/{child.pid}").exists()
    assert owner_gone(token) is True
    child.wait()
    assert owner_gone(f"linux:{':'.join(owner_token().split(':')[1:4])}:0") is True


def test_a_process_hidden_from_proc_is_not_judged(monkeypatch):
    """/proc mounted hidepid: another user's process has no /proc entry, but the kernel still says it exists (EPERM
    to signal 0); its run must not be taken for orphaned. A pid the kernel does not know is gone."""
    from i2l.store import owner

    token = owner_token()
    real_read = Path.read_text

    def hidden(self, *a, **k):
        if self.name == "stat" and self.parent.name.isdigit():
            raise FileNotFoundError(self)
        return real_read(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", hidden)
    monkeypatch.setattr(owner.os, "kill", lambda pid, sig: (_ for _ in ()).throw(PermissionError(pid)))
    assert owner_gone(token) is None
    monkeypatch.setattr(owner.os, "kill", lambda pid, sig: (_ for _ in ()).throw(ProcessLookupError(pid)))
    assert owner_gone(token) is True
