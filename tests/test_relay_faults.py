"""The relay under faults of its output filesystem: full, read-only, frozen,
restarted while full, and the fsync mode's ordering.

A real relay (serve_relayd on 127.0.0.1) is driven by the wire-level client
of tests/test_relayd.py; the output is a small tmpfs (or a loop-mounted ext4
that is frozen), mounted by tests/faultfs.py, so these tests need root and
are skipped elsewhere.  The fsync ordering and StreamFile tests need nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import pytest
import trio
from faultfs import fill, frozen_ext4, small_tmpfs
from test_relayd import (
    EVENTS_PER_PACKET,
    TIMEOUT,
    Client,
    Trace,
    babeltrace2_lines,
    event_seqs,
    expected_seqs,
    packet_msg,
    running_relay,
)

from relayd.daemon import _OpenStream, _write_packets, retry_reason
from tracewire import ctf
from tracewire.streamfile import StreamFile
from tracewire.wire import (
    Ack,
    ErrorCode,
    Retry,
    RetryReason,
    SessionClose,
    StreamClose,
    Welcome,
)

RELAY_LOGGER = "relayd.daemon"


async def _connect(port: int, trace: Trace) -> Client:
    c = await Client.connect(port)
    assert isinstance(await c.handshake(trace.host), Welcome)
    await c.open_stream(trace)
    return c


async def _until_retry(c: Client) -> Retry:
    """Reads (recording acks) until the relay's Retry."""
    event = await c.recv_data()
    assert isinstance(event, Retry), event
    return event


def _index_seqs(trace: Trace, out: Path) -> list[int]:
    tdir = trace.trace_dir(out)
    return [e.packet_seq_num for e in ctf.read_index((tdir / "index" / "channel0_0.idx").read_bytes())]


def _whole(trace: Trace, out: Path) -> int:
    """Asserts the stream file holds exactly its indexed packets, in order;
    returns how many."""
    tdir = trace.trace_dir(out)
    n = len(_index_seqs(trace, out))
    assert _index_seqs(trace, out) == list(range(n))
    assert (tdir / "channel0_0").read_bytes() == b"".join(trace.packet(i) for i in range(n))
    return n


async def _finish(c: Client, trace: Trace, start: int, stop: int) -> None:
    for n in range(start, stop):
        await c.send(packet_msg(1, n, trace.packet(n)))
    await c.wait_ack(1, stop - 1)
    await c.send(StreamClose(1))
    await c.send(SessionClose(1))
    await c.bye()


# --------------------------------------------------------------------------
# A disk that fills, then grows
# --------------------------------------------------------------------------


async def test_full_disk_asks_to_retry_then_takes_everything(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, RELAY_LOGGER)
    out = tmp_path / "out"
    trace = Trace("host-a", pad=30_000)  # ~150 kB packets: a 1 MiB tmpfs holds a few
    total = 20
    with trio.fail_after(TIMEOUT), small_tmpfs(out, "1m") as fs:
        async with running_relay(out) as port:
            c = await _connect(port, trace)
            for n in range(total):  # all of it, faster than it can be written
                await c.send(packet_msg(1, n, trace.packet(n)))
            retry = await _until_retry(c)
            assert retry.stream_id == 1 and retry.reason is RetryReason.NO_SPACE
            assert "No space left on device" in retry.text
            written = _whole(trace, out)  # no partial packet, whatever failed
            assert 0 < written == retry.seq < total
            assert c.acks[1] == written - 1  # acknowledged: exactly what is written

            # The packets in flight after the Retry are dropped without an
            # error; the same ones, sent again before space returns, fail again.
            await c.send(packet_msg(1, retry.seq, trace.packet(retry.seq)))
            again = await _until_retry(c)
            assert again.seq == retry.seq and _whole(trace, out) == written

            fs.resize("8m")
            await _finish(c, trace, retry.seq, total)
        assert event_seqs(out) == expected_seqs(range(total))
        assert len(await babeltrace2_lines(out)) == total * EVENTS_PER_PACKET
    held = [r for r in caplog.records if "holding back" in r.getMessage()]
    cleared = [r for r in caplog.records if "writable again" in r.getMessage()]
    assert len(held) == 1 and "No space left on device" in held[0].getMessage()
    assert len(cleared) == 1 and "2 writes were refused" in cleared[0].getMessage()


async def test_read_only_filesystem_is_retried(tmp_path: Path) -> None:
    # A filesystem with files open for writing cannot be remounted read-only
    # by hand (EBUSY), so the relay meets it when it opens files: new streams.
    out = tmp_path / "out"
    trace = Trace("host-a")
    with trio.fail_after(TIMEOUT), small_tmpfs(out, "8m") as fs:
        async with running_relay(out) as port:
            fs.read_only(True)
            c = await _connect(port, trace)
            error = await c.expect_error()
            assert error.code == ErrorCode.RETRY and "Read-only file system" in error.text
            fs.read_only(False)
            c = await _connect(port, trace)
            await _finish(c, trace, 0, 12)
        assert event_seqs(out) == expected_seqs(range(12))


async def test_declaring_on_a_full_disk_is_a_retry_error_and_the_relay_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "out"
    trace = Trace("host-a")
    with trio.fail_after(TIMEOUT), small_tmpfs(out, "1m"):
        async with running_relay(out) as port:
            filler = fill(out)
            c = await _connect(port, trace)  # the new index cannot get its header
            error = await c.expect_error()
            assert error.code == ErrorCode.RETRY and "No space left on device" in error.text
            filler.unlink()
            c = await _connect(port, trace)  # the same relay, later
            await _finish(c, trace, 0, 6)
        assert event_seqs(out) == expected_seqs(range(6))


async def test_restart_on_a_full_disk_recovers_by_cutting_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    trace = Trace("host-a", pad=30_000)  # ~150 kB packets: recovery frees less than one
    with trio.fail_after(TIMEOUT), small_tmpfs(out, "1m"):
        async with running_relay(out) as port:
            c = await _connect(port, trace)
            for n in range(4):
                await c.send(packet_msg(1, n, trace.packet(n)))
            await c.wait_ack(1, 3)
            await c.aclose()
        # A relay killed in the middle of a packet, and a full disk.
        tdir = trace.trace_dir(out)
        with open(tdir / "channel0_0", "ab") as f:
            f.write(trace.packet(4)[:100])
        with open(tdir / "index" / "channel0_0.idx", "ab") as f:
            f.write(b"\x01" * 7)  # a partial index entry
        fill(out)
        async with running_relay(out) as port:
            c = await _connect(port, trace)
            assert await c.stream_state(1) == 4
            assert _whole(trace, out) == 4
            await c.send(packet_msg(1, 4, trace.packet(4)))
            retry = await _until_retry(c)
            assert (retry.seq, retry.reason) == (4, RetryReason.NO_SPACE)
            await c.aclose()
        assert event_seqs(out) == expected_seqs(range(4))
        assert len(await babeltrace2_lines(tdir)) == 4 * EVENTS_PER_PACKET


# --------------------------------------------------------------------------
# A disk that stalls
# --------------------------------------------------------------------------


async def test_frozen_disk_holds_its_writer_only_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    a, b = Trace("host-a", pad=2000), Trace("host-b")
    with trio.fail_after(TIMEOUT), frozen_ext4(out, tmp_path / "fs.img") as fs:
        async with running_relay(out) as port:
            ca = await _connect(port, a)
            await ca.send(packet_msg(1, 0, a.packet(0)))
            await ca.wait_ack(1, 0)
            fs.freeze()
            try:
                for n in range(1, 10):
                    await ca.send(packet_msg(1, n, a.packet(n)))
                # While the writer waits on the frozen disk, the relay serves
                # others: a new target is welcomed and its keep-alive answered.
                cb = await Client.connect(port)
                assert isinstance(await cb.handshake(b.host), Welcome)
                await cb.aclose()
            finally:
                fs.thaw()
            await ca.wait_ack(1, 9)
            await _finish(ca, a, 10, 12)
        assert event_seqs(a.trace_dir(out)) == expected_seqs(range(12))


# --------------------------------------------------------------------------
# fsync mode
# --------------------------------------------------------------------------


class _SyncGate:
    """An fdatasync that records each call and, while closed, blocks."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (fd, size of the file at the call)
        self.entered = threading.Event()
        self.open = threading.Event()

    def __call__(self, fd: int) -> None:
        self.calls.append((fd, os.fstat(fd).st_size))
        self.entered.set()
        self.open.wait()
        os.fdatasync(fd)


def _pending_acks(c: Client) -> list[object]:
    """The messages the relay has sent and the client not read, without waiting."""
    fd = c.stream.socket.fileno()  # type: ignore[attr-defined]  # non-blocking, as trio made it
    events: list[object] = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            break
        c.conn.receive_data(data)
        if not data:
            break
    while (event := c.conn.next_event()) is not None:
        events.append(event)
    return events


async def test_fsync_mode_acks_only_after_data_then_index_are_synced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    trace = Trace("host-a")
    gate = _SyncGate()
    with trio.fail_after(TIMEOUT):
        async with running_relay(out, fsync=True, fsync_interval=0.05, fdatasync=gate) as port:
            gate.open.set()  # the new stream file's first sync passes
            c = await _connect(port, trace)
            assert await c.stream_state(1) == 0
            gate.open.clear()
            gate.entered.clear()
            del gate.calls[:]
            try:
                for n in range(3):
                    await c.send(packet_msg(1, n, trace.packet(n)))
                await trio.to_thread.run_sync(gate.entered.wait)
                # The relay is inside the data file's fdatasync: nothing of
                # these packets may have been acknowledged, nor indexed.
                assert not [e for e in _pending_acks(c) if isinstance(e, Ack)]
                tdir = trace.trace_dir(out)
                assert (tdir / "index" / "channel0_0.idx").stat().st_size == len(ctf.INDEX_HEADER)
            finally:
                gate.open.set()
            await c.wait_ack(1, 2)
            data_size = (tdir / "channel0_0").stat().st_size
            index_size = len(ctf.INDEX_HEADER) + 3 * ctf.INDEX_ENTRY_SIZE
            assert [size for _, size in gate.calls[:2]] == [data_size, index_size]  # data first, then index
            await _finish(c, trace, 3, 5)
        assert event_seqs(out) == expected_seqs(range(5))


async def test_fsync_mode_acknowledges_as_soon_as_the_disk_has_synced(tmp_path: Path) -> None:
    """The sync window follows the disk: on one that syncs at once, each
    packet is synced and acknowledged as it comes, without the client asking
    where the stream stands (which forces a sync), long before
    --fsync-interval (here far beyond the test's deadline) runs out."""
    out = tmp_path / "out"
    trace = Trace("host-a")
    synced: list[int] = []
    with trio.fail_after(TIMEOUT):
        async with running_relay(out, fsync=True, fsync_interval=100 * TIMEOUT, fdatasync=synced.append) as port:
            c = await _connect(port, trace)
            for n in range(5):
                before = len(synced)
                await c.send(packet_msg(1, n, trace.packet(n)))
                await c.wait_ack(1, n)
                assert len(synced) > before  # the ack came after a sync that covered the packet
            await _finish(c, trace, 5, 6)
    assert event_seqs(out) == expected_seqs(range(6))


def test_the_sync_window_is_paced_by_the_fdatasyncs_alone(tmp_path: Path) -> None:
    """The worker-thread call that writes a batch and syncs reports how long
    the fdatasyncs took, which is what sets the next sync window: the wait
    for a worker thread or for the CPU is not the disk's (timing the whole
    call let one slow hand-off stretch a window to the whole interval, and a
    busy target's unacknowledged packets filled its spool)."""
    file = StreamFile(str(tmp_path), "c_0", flush_every=None)
    file.append([Trace("h").packet(0)], 0, 0, 0, stream_id=0)
    st = _OpenStream(None, "", file, None)  # type: ignore[arg-type]  # only the file is used
    calls: list[int] = []

    def slow_fdatasync(fd: int) -> None:
        calls.append(fd)
        threading.Event().wait(0.02)  # the disk takes 20 ms

    assert _write_packets([], True, None, slow_fdatasync) == ({}, {}, 0.0)  # no sync asked: none done
    assert calls == []
    failed, sync_failed, seconds = _write_packets([], False, [st], slow_fdatasync)
    assert (failed, sync_failed) == ({}, {})
    assert calls == [file.fd, file.ifd]
    assert seconds >= 0.04
    file.close()


# --------------------------------------------------------------------------
# StreamFile
# --------------------------------------------------------------------------


def test_streamfile_rollback_returns_to_the_last_indexed_packet(tmp_path: Path) -> None:
    trace = Trace("h")
    sf = StreamFile(str(tmp_path), "c_0", flush_every=None)
    for n in range(3):
        sf.append([trace.packet(n)], 0, 0, 0, stream_id=0)
    sf.flush()
    mark = sf.checkpoint()
    for n in range(3, 5):
        sf.append([trace.packet(n)], 0, 0, 0, stream_id=0)
    assert (sf.indexed_seq, sf.next_seq, sf.unindexed) == (2, 5, 2)
    sf.rollback()
    assert (sf.next_seq, sf.unindexed) == (3, 0)
    assert sf.checkpoint() == mark
    assert (tmp_path / "c_0").read_bytes() == b"".join(trace.packet(n) for n in range(3))
    sf.append([trace.packet(3)], 0, 0, 0, stream_id=0)
    sf.close()
    again = StreamFile(str(tmp_path), "c_0")
    assert (again.next_seq, again.recovered_bytes) == (4, 0)
    again.close()


async def test_connection_closed_while_retrying_keeps_the_file_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    trace = Trace("host-a", pad=30_000)
    with trio.fail_after(TIMEOUT), small_tmpfs(out, "1m"):
        async with running_relay(out) as port:
            c = await _connect(port, trace)
            for n in range(12):
                await c.send(packet_msg(1, n, trace.packet(n)))
            retry = await _until_retry(c)
            await c.aclose()
            c = await _connect(port, trace)  # the stream file, taken over
            assert await c.stream_state(1) == retry.seq
            await c.aclose()
        assert _whole(trace, out) == retry.seq


@pytest.mark.parametrize(("code", "reason"), [
    (errno.ENOSPC, RetryReason.NO_SPACE),
    (errno.EDQUOT, RetryReason.NO_SPACE),
    (errno.EROFS, RetryReason.READ_ONLY),
    (errno.EIO, RetryReason.IO_ERROR),
    (errno.EMFILE, RetryReason.BUSY),
    (errno.EACCES, RetryReason.BUSY),
    (errno.ENAMETOOLONG, None),
    (errno.ELOOP, None),
    (errno.EFBIG, None),
])
def test_which_write_errors_are_retried(code: int, reason: RetryReason | None) -> None:
    assert retry_reason(OSError(code, os.strerror(code))) is reason
