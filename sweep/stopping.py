"""How a `gradinv` command stops on Ctrl-C or SIGTERM: as `Stopped`, a KeyboardInterrupt that says which
signal came, ending in one line and the exit code a shell gives that signal (130, 143).

From the start of `main` a signal raises Stopped where it lands: start-up (imports, reading the study,
starting Ray) has nothing to save. The loops that collect results record it instead and stop at their
next wait (sweep/task_loop.py, TaskLoop.stopping_on_signals).
"""

from __future__ import annotations

import contextlib
import signal
import threading

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # a shell gives a signal 128 + its number

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM reached the driver; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(stop: KeyboardInterrupt) -> int:
    """130 for Ctrl-C (a plain KeyboardInterrupt too), 143 for SIGTERM."""
    return EXIT_TERMINATED if getattr(stop, "signum", signal.SIGINT) == signal.SIGTERM else EXIT_INTERRUPTED


def _raise_stopped(signum, frame):
    for each in SIGNALS:  # once: a second signal must not interrupt the stop (a traceback from the handler)
        signal.signal(each, _ignore)  # not SIG_IGN, which a process started now would inherit
    raise Stopped(signum)


def _ignore(signum, frame):
    pass


@contextlib.contextmanager
def raising_on_signals():
    """Inside, Ctrl-C and SIGTERM raise Stopped where they land, the first one only; the handlers that
    were in place before come back on leaving (a test's process stays as it was)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {each: signal.signal(each, _raise_stopped) for each in SIGNALS}
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)


def keep_driver_sigterm_handler() -> None:
    """Make ray.init leave the driver's SIGTERM handler in place while `raising_on_signals` holds.

    ray.init replaces it twice: with its own Python handler, sys.exit(15) (SIGTERM while Ray started
    ended the command with status 15 and no word, not 143 with a line), and, as its core worker starts,
    with a C handler that logs the signal and aborts the process on its way out. The first goes through
    ``ray._private.utils.set_sigterm_handler``, looked up at each call; the second is undone by a hook
    Ray runs at the end of every init. Applied once per process; outside `raising_on_signals` Ray does
    what it did.
    """
    from ray._private import utils, worker

    if getattr(utils.set_sigterm_handler, "keeps_driver_handler", False):
        return
    ray_sets = utils.set_sigterm_handler

    def set_unless_the_driver_handles(handler) -> None:
        if signal.getsignal(signal.SIGTERM) is not _raise_stopped:
            ray_sets(handler)

    set_unless_the_driver_handles.keeps_driver_handler = True
    utils.set_sigterm_handler = set_unless_the_driver_handles
    worker._post_init_hooks.append(_reinstall_driver_handler)


def _reinstall_driver_handler() -> None:
    """The driver's handler again at the C level, where Ray's core worker put its own."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _raise_stopped:
        signal.signal(signal.SIGTERM, _raise_stopped)
