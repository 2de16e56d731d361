"""A termination signal that lands in a finalizer (`__del__`) still ends the run: the CLI and every flow install
`signals_end_the_run`. Each case runs in a fresh process: a finalizer signals its own process and keeps running
bytecode, so the handler's exception is raised inside the finalizer, where Python ignores it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import contextlib, os, signal, sys, time

    install, sig = sys.argv[1], getattr(signal, sys.argv[2])
    if install == "cli":  # what every `i2l` command does first
        from i2l.cli import main
        assert main(["info", "--preset", "debug", "--no-models"]) == 0
    elif install == "flow":  # what every flow does first
        from flows.stages import StageContext
        StageContext.open("debug", [], sys.argv[3])
    elif install == "module":
        from i2l.cluster.signals import signals_end_the_run
        signals_end_the_run()

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # the handler runs at one of these bytecodes: inside __del__
                pass

    # SIGTERM: Prefect's own bridge, as a flow run has it; SIGINT: Python's KeyboardInterrupt
    if sig == signal.SIGTERM:
        from prefect.utilities.engine import capture_sigterm
        scope = capture_sigterm()
    else:
        scope = contextlib.nullcontext()
    with scope:
        Finalized()  # collected at once
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.01)
    print("SURVIVED the signal")
""")


def run(install: str, sig: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", SCRIPT, install, sig, str(tmp_path / "data")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env, check=False)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_swallowed_by_a_finalizer_is_lost_without_the_hook(sig, tmp_path):
    # the failure the hook exists for: Python prints "Exception ignored" and carries on
    r = run("none", sig, tmp_path)
    assert r.returncode == 0 and "SURVIVED" in r.stdout, r.stderr[-2000:]
    assert "Exception ignored" in r.stderr


@pytest.mark.parametrize("install", ["module", "cli", "flow"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_swallowed_by_a_finalizer_still_ends_the_run(install, sig, tmp_path):
    r = run(install, sig, tmp_path)
    assert "SURVIVED" not in r.stdout, r.stderr[-2000:]
    assert r.returncode != 0
    # it ended by the signal's own exception, raised again outside the finalizer
    raised = "TerminationSignal" if sig == "SIGTERM" else "KeyboardInterrupt"
    assert r.stderr.count(raised) >= 2, r.stderr[-2000:]  # once ignored in __del__, once ending the process


def test_other_unraisable_exceptions_reach_the_previous_hook(monkeypatch):
    from i2l.cluster import signals

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(type(u.exc_value)))
    redelivered = []
    monkeypatch.setattr(signals, "_redeliver", redelivered.append)
    signals.signals_end_the_run()
    signals.signals_end_the_run()  # the hook in place already: it does not wrap itself

    class Broken:
        def __del__(self):
            raise ValueError("not a signal")

    Broken()
    assert seen == [ValueError] and redelivered == []
    assert signals.signal_of(KeyboardInterrupt()) == 2 and signals.signal_of(ValueError()) is None


RAY_WAIT = textwrap.dedent("""
    import os, signal, sys, threading, time
    from i2l.cluster import ensure_ray, stop_ray
    from i2l.cluster.signals import terminable

    class Stop(SystemExit):  # what a caller asks for, e.g. the flows' TerminationSignal that is also a SystemExit
        def __init__(self, sig):
            super().__init__(3)
            self.signal = sig

    class TerminationLike(BaseException):  # what Prefect's SIGTERM handler raises in a flow run
        pass

    def prefect_like(sig, frame):
        raise TerminationLike(sig)

    signal.signal(signal.SIGTERM, prefect_like)
    ray = ensure_ray(1)
    print("kept:", signal.getsignal(signal.SIGTERM) is prefect_like, flush=True)

    @ray.remote
    def slow(seconds):
        time.sleep(seconds)

    def wait(guarded):
        ref = slow.remote(float(sys.argv[1]))
        ray.get(ray.put(0))  # the task is queued; the wait below is Ray's
        threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t = time.monotonic()
        try:
            if guarded:
                with terminable(raise_as=Stop, on_signal=stop_ray):
                    ray.get(ref)
            else:
                ray.get(ref)
        except BaseException as e:
            print(f"{'guarded' if guarded else 'plain'}: {type(e).__name__} after {time.monotonic() - t:.1f} s",
                  flush=True)

    wait(False)
    wait(True)
    print("ray running:", ray.is_initialized(), "handler back:", signal.getsignal(signal.SIGTERM) is prefect_like)
""")


def test_sigterm_ends_a_ray_wait_only_inside_terminable(tmp_path):
    """In a Ray wait, a SIGTERM handler's exception ends the wait only if it is a SystemExit (or KeyboardInterrupt):
    Prefect's TerminationSignal stayed pending until the task ended (a whole training), then surfaced as a
    SystemError. Inside `terminable`, the wait ends at once with the caller's exception, and Ray is stopped."""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    task_s = 8
    r = subprocess.run([sys.executable, "-c", RAY_WAIT, str(task_s)], cwd=REPO, capture_output=True, text=True,
                       timeout=180, env=env, check=False)
    out = r.stdout
    assert "kept: True" in out, out + r.stderr[-3000:]  # ray.init left the SIGTERM handler as it was
    plain = [line for line in out.splitlines() if line.startswith("plain:")]
    guarded = [line for line in out.splitlines() if line.startswith("guarded:")]
    assert plain and guarded, out + r.stderr[-3000:]
    # the failure terminable exists for: the signal waited for the task's end and came out as another error
    assert "SystemError" in plain[0] and float(plain[0].split()[-2]) >= task_s - 3, plain
    assert guarded[0].startswith("guarded: Stop after") and float(guarded[0].split()[-2]) < 4, guarded
    assert "ray running: False handler back: True" in out, out


def _sigterm_self() -> None:
    import os
    import signal
    import time

    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)  # the handler runs at the first bytecode after the signal: in here


def test_terminable_raises_what_the_caller_asks_even_for_another_exception_or_none():
    import signal

    from i2l.cluster.signals import Terminated, terminable

    class Stop(SystemExit):
        def __init__(self, sig):
            super().__init__(1)
            self.signal = sig

    before = signal.getsignal(signal.SIGTERM)
    stopped = []
    # what Ray does: the handler's exception ends the wait, and another one comes out
    with pytest.raises(Stop) as got, terminable(raise_as=Stop, on_signal=lambda: stopped.append(1)):
        try:
            _sigterm_self()
        except SystemExit:
            raise ValueError("Ray's own exception") from None
    assert isinstance(got.value.__cause__, ValueError) and stopped == [1]
    # code in the block caught the signal's exception and went on: the block still ends
    with pytest.raises(Terminated) as got, terminable(on_signal=lambda: stopped.append(2)):
        try:
            _sigterm_self()
        except SystemExit:
            pass
    assert got.value.signal == signal.SIGTERM and got.value.code == 128 + signal.SIGTERM and stopped == [1, 2]
    # no signal: nothing changes, errors pass through as they are
    with pytest.raises(KeyError), terminable(on_signal=lambda: stopped.append(3)):
        raise KeyError("x")
    assert stopped == [1, 2] and signal.getsignal(signal.SIGTERM) is before
