"""tracewire/iothread.py: a thread of one's own for blocking work."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from tracewire.iothread import IoThread

TIMEOUT = 30


async def test_jobs_run_in_order_in_one_other_thread_and_return_their_results() -> None:
    io = IoThread("test-io")
    seen: list[tuple[int, int]] = []

    def job(n: int) -> int:
        seen.append((n, threading.get_ident()))
        return n * n

    with trio.fail_after(TIMEOUT):
        results = [await io.run(lambda n=n: job(n)) for n in range(5)]
    io.close()
    assert results == [0, 1, 4, 9, 16]
    assert [n for n, _ in seen] == list(range(5))
    threads = {t for _, t in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads


async def test_a_jobs_exception_is_raised_in_the_caller_and_the_thread_goes_on() -> None:
    io = IoThread("test-io")

    def fail() -> None:
        raise OSError(28, "No space left on device")

    with trio.fail_after(TIMEOUT):
        with pytest.raises(OSError, match="No space left"):
            await io.run(fail)
        assert await io.run(lambda: "after") == "after"
    io.close()


async def test_a_cancelled_caller_waits_for_its_job_to_end() -> None:
    """As trio.to_thread.run_sync: the job has the connection's files until
    it ends, so a cancelled caller returns only after it."""
    io = IoThread("test-io")
    gate, started, finished = threading.Event(), threading.Event(), threading.Event()

    def slow() -> int:
        started.set()
        gate.wait(TIMEOUT)
        finished.set()
        return 7

    results: list[int] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            cancelled = trio.CancelScope()

            async def caller() -> None:
                with cancelled:
                    results.append(await io.run(slow))
                    await trio.sleep_forever()  # the cancel lands here, after the job

            nursery.start_soon(caller)
            await trio.to_thread.run_sync(started.wait, TIMEOUT)
            cancelled.cancel()
            await trio.testing.wait_all_tasks_blocked()  # the caller meets the cancel
            assert not finished.is_set() and not results
            gate.set()
    assert finished.is_set() and results == [7]
    io.close()


async def test_closing_ends_the_thread_after_its_job_even_one_stuck_on_a_disk() -> None:
    io = IoThread("test-io")
    gate, started = threading.Event(), threading.Event()

    def stuck() -> None:
        started.set()
        gate.wait(TIMEOUT)

    with trio.fail_after(TIMEOUT):
        assert await io.run(lambda: 1) == 1
        thread = io._thread
        assert thread is not None and thread.is_alive()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(io.run, stuck)
            await trio.to_thread.run_sync(started.wait, TIMEOUT)
            io.close()  # returns at once: never waits for the stuck job
            assert thread.is_alive()
            gate.set()
        await trio.to_thread.run_sync(thread.join, TIMEOUT)
    assert not thread.is_alive()
    with pytest.raises(trio.ClosedResourceError):
        await io.run(lambda: 2)


def test_an_unused_thread_is_never_started() -> None:
    io = IoThread("test-io")
    io.close()
    io.close()
    assert io._thread is None


async def test_without_a_thread_to_be_had_jobs_go_to_trios_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    io = IoThread("test-io")
    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", refuse)
        with trio.fail_after(TIMEOUT):
            assert await io.run(lambda: threading.get_ident()) != threading.get_ident()
    assert io._thread is None
    with trio.fail_after(TIMEOUT):
        assert await io.run(lambda: 3) == 3  # still trio's: one way per IoThread
    assert io._thread is None
    io.close()
