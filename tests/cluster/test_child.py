"""i2l.cluster.child: a stage called in a process of its own returns its result, raises its own errors here, and
neither outlives its caller nor dies silently."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from i2l.cluster.child import ChildProcessDied, call_in_child, start_in_child

REPO = Path(__file__).resolve().parents[2]


def test_runs_in_another_process_and_returns_its_result():
    assert call_in_child("os:getpid") != os.getpid()
    assert call_in_child("json:dumps", {"a": [1, 2]}, sort_keys=True) == '{"a": [1, 2]}'


def test_the_childs_exception_is_raised_here_with_its_type_and_traceback():
    with pytest.raises(json.JSONDecodeError) as info:  # callers catch the stage's own error types
        call_in_child("json:loads", "{not json")
    assert any("raised in the child process that ran json:loads" in n and "Traceback" in n
               for n in info.value.__notes__)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        call_in_child("os:listdir", "/nowhere/at/all")


def test_a_child_that_dies_without_an_answer_is_an_error_naming_the_signal():
    with pytest.raises(ChildProcessDied, match="signal:raise_signal.*SIGKILL"):
        call_in_child("signal:raise_signal", signal.SIGKILL)  # as the kernel's OOM killer would


def test_a_started_child_works_while_its_caller_goes_on(tmp_path):
    """start_in_child returns at once: the child does its work before anyone asks for its result."""
    made = tmp_path / "made"
    child = start_in_child("os:mkdir", str(made))
    deadline = time.monotonic() + 60
    while not made.exists():  # the caller waits on the work itself, not on the result
        assert time.monotonic() < deadline, "the child never did its work"
        time.sleep(0.05)
    assert child.result() is None
    assert child.result() is None  # asked again: the same answer


def test_a_terminated_child_is_gone_and_its_result_says_so():
    child = start_in_child("time:sleep", 300)
    pid = child._proc.pid
    child.terminate()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(ChildProcessDied, match="time:sleep.*SIGTERM"):
        child.result()


@pytest.mark.parametrize("target", ["os.getpid", "os:", ":getpid", "os:get pid"])
def test_a_malformed_target_is_refused_before_a_process_starts(target):
    with pytest.raises(ValueError, match="package.module:function"):
        call_in_child(target)


def test_the_child_dies_with_its_caller():
    """A caller killed hard (SIGKILL: no cleanup runs in it) takes its child with it, not an orphan that goes on
    training."""
    script = "from i2l.cluster.child import call_in_child; call_in_child('time:sleep', 300)"
    caller = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while not (children := psutil.Process(caller.pid).children()):
            assert caller.poll() is None and time.monotonic() < deadline, "the caller never started its child"
            time.sleep(0.1)
        time.sleep(2)  # past the child's start-up, where it asks to die with its parent
        caller.send_signal(signal.SIGKILL)
        caller.wait(30)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"orphaned: {[p.pid for p in alive]}"
    finally:
        if caller.poll() is None:
            caller.kill()


def test_a_callers_script_without_a_main_guard_is_not_run_again(tmp_path):
    """A user's script that calls a flow at top level (no `if __name__ == "__main__"`): the child must run the
    call, not the script (multiprocessing's spawn would re-import it, and refuse)."""
    script = tmp_path / "user_script.py"
    marker = tmp_path / "runs.txt"
    script.write_text(f"from i2l.cluster.child import call_in_child\n"
                      f"open({str(marker)!r}, 'a').write('script ran\\n')\n"
                      f"print(call_in_child('math:factorial', 5))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["120"] and marker.read_text() == "script ran\n"
