"""Stopping signals as exceptions, so that `finally` blocks run (checkpoints saved, temporary files removed).

Ctrl-C already raises KeyboardInterrupt. `sigterm_as_interrupt()` makes SIGTERM (a job scheduler's stop, `kill`)
raise `Terminated`, a KeyboardInterrupt, in the main thread. The CLI exits 130 after Ctrl-C and 143 after
SIGTERM, as shells report a process killed by those signals.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM was received; unwinds like Ctrl-C."""

    exit_code = 128 + signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread; elsewhere (other threads, where Python
    allows no signal handler) the block runs unchanged. The previous handler is restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
