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
