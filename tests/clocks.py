"""Test helpers for trio code run on a MockClock."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import trio


@contextmanager
def fail_after_wall(seconds: float) -> Iterator[None]:
    """trio.fail_after on the wall clock, for a test run on a MockClock (whose
    deadlines expire only when the test jumps it): a hang still ends."""
    token = trio.lowlevel.current_trio_token()
    with trio.CancelScope() as scope:
        timer = threading.Timer(seconds, token.run_sync_soon, (scope.cancel,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            timer.join()
    if scope.cancelled_caught:
        raise trio.TooSlowError(f"not done within {seconds} s of wall-clock time")
