"""A termination signal ends the run: even when it lands in a finalizer, and even inside a Ray wait.

Python runs a signal's handler in the main thread at its next bytecode; Prefect's SIGTERM handler (and Python's
SIGINT one) turn the signal into an exception there. When that bytecode belongs to a finalizer (`__del__`, e.g.
a tqdm bar collected mid-stage), the exception is "ignored": Python hands it to `sys.unraisablehook`, prints it,
and the run goes on as if never signalled. Seen under load: a SIGTERMed `i2l run` finished its evaluation and
exited 0. `signals_end_the_run()` delivers such a signal again, from another thread, so the handler runs once more
at the main thread's next bytecode outside the finalizer (again if that one is a finalizer too).

Inside a Ray wait (`ray.get`, `ray.wait`, Ray Train's `fit()`), the handler runs in Ray's C++ wait loop, which
ends the wait only for a KeyboardInterrupt or a SystemExit. Any other exception (Prefect's TerminationSignal) is
left pending until the wait ends by itself, and then comes out as a SystemError. Measured: a SIGTERM during
training, in an `i2l run` whose Ray was started by an earlier stage, was not acted on for 60 s, until the driver
gave up on its (killed) cluster. `terminable()` makes SIGTERM raise a SystemExit inside its block.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator


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


class Terminated(SystemExit):
    """SIGTERM (or another termination signal) as an exception: a SystemExit, so that it ends a Ray wait. Its exit
    code is the shell's 128 + signal, should nothing catch it; `signal` says which signal."""

    def __init__(self, sig: int):
        super().__init__(128 + sig)
        self.signal = sig


@contextlib.contextmanager
def terminable(raise_as: Callable[[int], BaseException] = Terminated,
               on_signal: Callable[[], None] | None = None,
               on_receipt: Callable[[], None] | None = None) -> Iterator[Callable | None]:
    """While in the block, a SIGTERM raises `raise_as(SIGTERM)` in the main thread, and ends a Ray wait too.

    raise_as must make a SystemExit or KeyboardInterrupt (what Ray's wait ends for). Ray raises an exception of its
    own from the ended wait (a new SystemExit): whatever leaves the block after a SIGTERM arrived is replaced by
    `raise_as(SIGTERM)`, so the caller sees one kind (flows: Prefect's TerminationSignal, which Prefect's engine
    records as a crash or a cancellation). `on_signal()` runs first (e.g. `i2l.cluster.stop_ray`). `on_receipt()`
    runs in the handler itself, at the first signal, before anything unwinds: for what must be on record even if
    the process dies while it unwinds (a SIGTERM sent to the whole process group stops Ray's daemons at the same
    moment, and the driver may not outlive them); its errors are printed, not raised. Yields the handler it
    installed. The previous handler is back after the block. Outside the main thread (where Python runs
    no signal handler) the block changes nothing and yields None."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    received: list[int] = []

    def handler(sig: int, frame) -> None:
        first = not received
        received.append(sig)  # before on_receipt: a second signal landing inside it must not run it again
        if first and on_receipt is not None:
            try:
                on_receipt()
            except Exception as e:  # noqa: BLE001 - the signal still ends the block
                print(f"on {signal.Signals(sig).name}: {type(e).__name__}: {e}", file=sys.stderr)
        raise raise_as(sig)

    def after_signal() -> None:
        if on_signal is not None:
            try:
                on_signal()
            except Exception as cleanup:  # noqa: BLE001 - the signal still ends the block, as raise_as
                print(f"after {signal.Signals(received[0]).name}: {type(cleanup).__name__}: {cleanup}",
                      file=sys.stderr)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    except BaseException as e:
        if not received:
            raise
        after_signal()
        if signal_of(e) == received[0]:
            raise
        raise raise_as(received[0]) from e  # Ray's stand-in for ours
    else:
        if received:  # something in the block caught the signal's exception and went on: the block still ends
            after_signal()
            raise raise_as(received[0])
    finally:
        # None: a handler not set from Python (Ray's C++ failure handler, which turns SIGTERM into an abort)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def sigterm_kept() -> Iterator[None]:
    """The SIGTERM handler in place before the block is in place after it (main thread): `ray.init` installs its
    own (a SystemExit, then `ray.shutdown()` at exit: ~10 s after a SIGTERM that reached the cluster too) and Ray's
    C++ failure handler (SIGTERM becomes an abort, exit -6, with a stack trace in the log)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def exit_by(sig: int) -> None:
    """End this process by `sig` with its default action, as a shell expects of a signalled program (status -sig,
    not a code): after the caller has unwound and stopped its Ray (`i2l.cluster.stop_ray`), so that nothing more
    runs (not a second `ray.shutdown()` at exit, which waits ~10 s on a cluster the signal stopped already)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    time.sleep(5)  # the signal is delivered at once; never reached
    os._exit(128 + sig)
