"""A termination signal ends the run even when it lands in a finalizer.

Python runs a signal's handler in the main thread at its next bytecode; Prefect's SIGTERM handler (and Python's
SIGINT one) turn the signal into an exception there. When that bytecode belongs to a finalizer (`__del__`, e.g.
a tqdm bar collected mid-stage), the exception is "ignored": Python hands it to `sys.unraisablehook`, prints it,
and the run goes on as if never signalled. Seen under load: a SIGTERMed `i2l run` finished its evaluation and
exited 0. `signals_end_the_run()` delivers such a signal again, from another thread, so the handler runs once more
at the main thread's next bytecode outside the finalizer (again if that one is a finalizer too).
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import time


def signal_of(exc: BaseException | None) -> int | None:
    """The signal an exception stands for: KeyboardInterrupt -> SIGINT; a BaseException (not an Exception) with
    an int `signal` attribute, as Prefect's TerminationSignal carries -> that signal; else None."""
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    sig = getattr(exc, "signal", None)
    return sig if isinstance(sig, int) and not isinstance(exc, Exception) else None


def _kill_soon(sig: int) -> None:
    time.sleep(0.01)  # let the main thread leave the hook and the finalizer first
    os.kill(os.getpid(), sig)


def _redeliver(sig: int) -> None:
    # From a new thread, started without waiting for it (threading.Thread.start waits in Python code, where the
    # handler would run inside this hook, and an exception there is lost for good). Should the signal land in
    # another finalizer, this hook sends it again.
    try:
        _thread.start_new_thread(_kill_soon, (sig,))
    except RuntimeError:  # interpreter shutting down: no new threads; it is exiting anyway
        pass


def signals_end_the_run() -> None:
    """Install the `sys.unraisablehook` that re-delivers a signal swallowed by a finalizer, unless it is the hook
    in place already; every other unraisable exception goes to the hook that was there before."""
    previous = sys.unraisablehook
    if getattr(previous, "redelivers_signals", False):
        return

    def hook(unraisable) -> None:
        previous(unraisable)  # still printed: it says where the signal landed
        sig = signal_of(unraisable.exc_value)
        if sig is not None:
            _redeliver(sig)  # the last thing the hook does

    hook.redelivers_signals = True
    sys.unraisablehook = hook
