"""A thread of one's own for blocking work, cheaper per job than trio's.

The relay writes a connection's packets (and syncs them, in fsync mode) in a
thread, so that a disk that stalls holds that connection only, never the
event loop; consumerd compresses a session's packets in one, since zstd
releases the GIL.  ``trio.to_thread.run_sync`` costs about 125 us of CPU per
round trip on this project's 2-core VM (its thread cache, a limiter token,
thread naming, a wake-up through trio's socketpair), and a busy connection
or session makes about one per packet or batch.  A thread that belongs to
the connection (or session) and waits on a queue, answering through an
eventfd the event loop waits on, costs about half of that (docs/design.md,
"Where the relay's CPU goes").

The semantics are ``trio.to_thread.run_sync``'s with the default
``abandon_on_cancel=False``: the calling task waits for the job to finish
even if it is cancelled meanwhile (the connection's files are in the job's
hands until then), and the job's exception is raised in the caller.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

__all__ = ["IoThread"]

_T = TypeVar("_T")


class IoThread:
    """Runs one job at a time in a thread of its own, started at the first
    job.  ``close()`` lets the thread end once no job is running or waited
    for.  The thread closes its eventfd itself, as it ends: a job stuck on a
    frozen disk never writes into a descriptor number the process has
    reused, and the event loop is never left waiting on a closed one."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._done = -1  # the eventfd the thread signals a finished job on
        self._result: tuple[bool, object] | None = None  # (ok, value or exception)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy = False  # a job is running, or its caller has not taken the result yet
        self._fallback = False  # no thread could be started: jobs go to trio's worker threads

    async def run(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` in the thread; its result, or its exception raised here.

        Raises:
            trio.ClosedResourceError: the thread was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("this I/O thread is closed")
        if self._busy:
            raise trio.BusyResourceError("another task is running a job in this I/O thread")
        if self._fallback:
            return await trio.to_thread.run_sync(fn)
        if self._thread is None:
            done = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            thread = threading.Thread(target=self._work, args=(done,), name=self._name, daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no thread to be had (threads-max, RLIMIT_NPROC): trio's, as before
                os.close(done)
                self._fallback = True
                return await trio.to_thread.run_sync(fn)
            self._done, self._thread = done, thread
        self._busy = True
        self._jobs.put(fn)
        try:
            with trio.CancelScope(shield=True):  # the job has the files until it ends
                while True:
                    await trio.lowlevel.wait_readable(self._done)
                    try:
                        os.eventfd_read(self._done)
                        break
                    except BlockingIOError:  # pragma: no cover - a spurious wake-up
                        continue
        finally:
            self._busy = False
            if self._closed:  # close() came meanwhile: the thread may end now
                self._jobs.put(None)
        result, self._result = self._result, None
        assert result is not None
        ok, value = result
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value  # type: ignore[return-value]

    def close(self) -> None:
        """Let the thread end (once the job it runs, if any, has ended and
        its caller has its result).  Idempotent; never waits."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None and not self._busy:
            self._jobs.put(None)

    def _work(self, done: int) -> None:
        try:
            while (fn := self._jobs.get()) is not None:
                try:
                    self._result = (True, fn())
                except BaseException as exc:  # raised in the caller, as trio.to_thread does
                    self._result = (False, exc)
                os.eventfd_write(done, 1)
        finally:
            os.close(done)
