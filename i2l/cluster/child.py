"""Running one stage in a fresh process of its own. The pipeline's driver (the flow process) lives through every
stage and, while the predictor trains, waits next to the Ray Train worker: whatever a stage run in it imported
(torch, diffusers: ~0.7 GB) or left on its heap stays counted in the machine's peak. A stage called through
`call_in_child` leaves nothing behind when it returns, and its caller never imports the stage's module."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import traceback
from typing import Any

_PR_SET_PDEATHSIG = 1
# The child's whole program: the caller's import path, then main(). Not multiprocessing's spawn, which re-runs
# the caller's main script in the child: a user's script that calls a flow without an `if __name__ == "__main__"`
# guard would start the pipeline again there (multiprocessing refuses with "bootstrapping phase").
_BOOT = "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); from i2l.cluster.child import main; main()"


class ChildProcessDied(RuntimeError):
    """The child ended without a result (killed, out of memory, a crash in native code)."""


def call_in_child(target: str, /, *args, **kwargs) -> Any:
    """Call `target` ("package.module:function") with these arguments in a fresh Python process and return its
    result. An exception raised there is raised here (with the child's traceback as a note); a child that dies
    without an answer raises ChildProcessDied with its exit code. The child inherits stdout and stderr (its
    progress bars draw as the caller's would) and dies with its caller (SIGTERM on the caller's death)."""
    return start_in_child(target, *args, **kwargs).result()


def start_in_child(target: str, /, *args, **kwargs) -> ChildCall:
    """`call_in_child` without the wait: the child starts now and works while the caller goes on; its answer comes
    from `.result()`. A caller that leaves early (an error, a signal) stops it with `.terminate()`."""
    _resolve(target)  # a malformed target fails here, before a process starts
    call = pickle.dumps((target, args, kwargs, os.getpid()))
    read_fd, write_fd = os.pipe()  # the child's answer; its stdout stays the user's terminal
    try:
        proc = subprocess.Popen([sys.executable, "-c", _BOOT, json.dumps(sys.path), str(write_fd)],
                                stdin=subprocess.PIPE, pass_fds=(write_fd,), close_fds=True)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # only the child holds the writing end now: its exit gives EOF here
    child = ChildCall(target, proc, read_fd)
    try:
        proc.stdin.write(call)  # the child reads it first thing
        proc.stdin.close()
    except BaseException:
        child.terminate()
        raise
    return child


class ChildCall:
    """One call running in a child process (`start_in_child`)."""

    def __init__(self, target: str, proc: subprocess.Popen, read_fd: int):
        self.target, self._proc, self._read_fd = target, proc, read_fd
        self._outcome: tuple[str, Any] | None = None

    def result(self) -> Any:
        """Wait for the child's answer: its return value, or its exception raised here (see `call_in_child`)."""
        if self._outcome is None:
            reply = b""  # none, once terminated
            try:
                if self._read_fd is not None:
                    with os.fdopen(self._read_fd, "rb", closefd=False) as answer:
                        reply = answer.read()  # until the child exits (or closes the pipe having answered)
                code = self._proc.wait()
            finally:
                self.terminate()  # interrupted here (Ctrl-C, a signal's exception): the child goes too
            if not reply:
                why = f"{self.target} ended without a result (exit code {code}{_signal_name(code)})"
                self._outcome = ("error", ChildProcessDied(f"{why}: see its output above"))
            else:
                status, payload = pickle.loads(reply)  # our own child wrote it, over our own pipe
                self._outcome = (status, payload if status == "ok" else _rebuilt(self.target, payload))
        status, payload = self._outcome
        if status == "ok":
            return payload
        raise payload

    def terminate(self, wait_s: float = 10.0) -> None:
        """Stop the child if it still runs (SIGTERM, then SIGKILL after wait_s) and release its pipe."""
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def _resolve(target: str) -> tuple[str, str]:
    module, sep, name = target.partition(":")
    if not sep or not module or not name.isidentifier():
        raise ValueError(f"call_in_child target {target!r}: expected 'package.module:function'")
    return module, name


def main() -> None:
    """The child's side (see _BOOT): read the call from stdin, run it, write the answer to the pipe in argv[2]."""
    target, args, kwargs, parent_pid = pickle.loads(sys.stdin.buffer.read())  # our caller wrote it
    _die_with_parent(parent_pid)
    try:
        module, name = _resolve(target)
        message = ("ok", getattr(importlib.import_module(module), name)(*args, **kwargs))
    except BaseException as e:  # noqa: BLE001  (every failure goes back to the caller, KeyboardInterrupt too)
        message = ("error", _portable(e))
    try:
        data = pickle.dumps(message)
    except Exception as e:  # noqa: BLE001  (a result that does not pickle is the caller's error, not silence)
        data = pickle.dumps(("error", {"type": type(e).__name__, "text": f"{target} returned a result that "
                                       f"cannot be sent back: {e}", "traceback": traceback.format_exc(),
                                       "exception": None}))
    with os.fdopen(int(sys.argv[2]), "wb") as answer:
        answer.write(data)


def _portable(e: BaseException) -> dict:
    """The exception itself when it pickles (its type is kept: callers catch FileNotFoundError etc.), else its text."""
    record = {"type": type(e).__name__, "text": str(e),
              "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__)), "exception": None}
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:  # noqa: BLE001  (an exception type with a custom __init__ may not round-trip: its text goes)
        return record
    return {**record, "exception": e}


def _rebuilt(target: str, record: dict) -> BaseException:
    e = record["exception"]
    if e is None:
        e = RuntimeError(f"{record['type']}: {record['text']}")
    e.add_note(f"raised in the child process that ran {target}:\n{record['traceback'].rstrip()}")
    return e


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when its parent dies (Linux); a parent already gone means no one waits for us."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        libc = None
    if libc is not None and hasattr(libc, "prctl"):
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(1)


def _signal_name(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f", killed by {signal.Signals(-code).name}"
        except ValueError:
            return ""
    return ""
