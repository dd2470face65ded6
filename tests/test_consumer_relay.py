"""consumerd's network sink (consumerd/net.py: NetSession) against the real relay
(relayd/daemon.py), in process.

The relay is run with its public entry point, ``serve_relayd``, on 127.0.0.1
port 0, and the NetSession reaches it over loopback TCP through its ``opener``
hook.  (relayd/daemon.py does have a per-connection handler,
``RelayServer.handle``, but RelayServer is not part of the module's public API
-- its ``__all__`` and docstring list RelaydConfig, serve_relayd,
parse_auth_keys, RelaydStartupError, AuthKeyError only -- so these tests do not
build on it.)  The opener is where the tests break connections: it can fail a
number of times, or hand out a stream that breaks after N bytes, in the middle
of a frame.

The packets are real CTF packets built with tracewire.ctf; what the relay
writes is read back with ctf.read_trace (and the index with ctf.read_index).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock, memory_stream_pair, wait_all_tasks_blocked

import consumerd.net as net_module
from consumerd.net import NetSession, SinkError, _FileSend
from consumerd.spool import Spool
from relayd.daemon import RelaydConfig, serve_relayd
from tracewire import ctf, wire
from tracewire.ctf import EventDecl, TraceInfo
from tracewire.ops import RelayState
from tracewire.url import RelayURL

from clocks import fail_after_wall

DEADLINE = 60.0  # per test; generous for a loaded 2-core machine



HOST = "relhost"
SESSION = "netsess"
CREATED = "20260102T030405"
PROC = "myapp"
PID = 4242
TRACE_PATH = f"ust/pid/{PROC}-{PID}-{CREATED}"
TRACE_UUID = uuid.UUID("6e3b8a7c-1111-4222-8333-0123456789ab").bytes
T0 = 1_000_000_000

TICK = EventDecl("demo:tick", 0, (("seq", int), ("msg", str)))
BT2 = shutil.which("babeltrace2")


# --------------------------------------------------------------------------
# CTF material
# --------------------------------------------------------------------------


def metadata_text(channels: tuple[str, ...] = ("channel0",)) -> bytes:
    info = TraceInfo(
        uuid=TRACE_UUID, hostname=HOST, trace_name=SESSION, creation_datetime=CREATED,
        procname=PROC, vpid=PID, clock_offset_ns=1_700_000_000_000_000_000, channels=channels,
    )
    return (ctf.metadata_preamble(info) + ctf.metadata_event(TICK)).encode()


def make_packets(n_packets: int, per_packet: int, *, first_event: int = 0, stream_id: int = 0,
                 msg: str = "payload-") -> list[tuple[bytes, int, int, int, int]]:
    """``n_packets`` CTF packets of ``per_packet`` demo:tick events each (seq
    ``first_event``...), as (raw, packet seq, ts_begin, ts_end, discarded)."""
    out = []
    ev = first_event
    for pseq in range(n_packets):
        body = bytearray()
        ts_begin = T0 + ev * 1000
        prev = ts_begin
        for _ in range(per_packet):
            ts = T0 + ev * 1000
            body += ctf.encode_event(TICK.id, ts, prev, (ev, f"{msg}{ev % 97}"), TICK.fields)
            prev = ts
            ev += 1
        header = ctf.pack_packet_header(TRACE_UUID, stream_id, 0, ts_begin, prev, len(body), pseq, 0)
        out.append((header + bytes(body), pseq, ts_begin, prev, 0))
    return out


def read_seqs(root: Path) -> list[int]:
    """Every demo:tick seq under ``root`` as ctf.read_trace reads them."""
    seqs = []
    for item in ctf.read_trace(root):
        assert isinstance(item, ctf.Event), item
        assert item.name == "demo:tick"
        seqs.append(item.fields["seq"])
    return seqs


def trace_dir(out: Path) -> Path:
    return out / HOST / f"{SESSION}-{CREATED}" / TRACE_PATH


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------
# Relay, session and opener
# --------------------------------------------------------------------------


@asynccontextmanager
async def running_relay(output: Path, **config) -> AsyncIterator[int]:
    """serve_relayd on 127.0.0.1, a free port; yields the port."""
    cfg = RelaydConfig(output=str(output), listen_host="127.0.0.1", listen_port=0, **config)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_relayd, cfg)
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


class BreakingStream(trio.abc.Stream):
    """A TCP stream that breaks hard once ``limit`` bytes have been sent: the
    bytes up to the limit go out (usually the head of a frame), then the
    socket is closed and the sender gets BrokenResourceError.  It counts
    what it hands to the session (``received``; ``receipt`` is set, and
    replaced, on each delivery)."""

    def __init__(self, inner: trio.abc.Stream, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.sent = 0
        self.received = 0
        self.receipt = trio.Event()
        self.broken = False
        self.deaf = False  # True: receive nothing more (acks get lost)

    async def send_all(self, data) -> None:
        if self.broken:
            raise trio.BrokenResourceError("test: connection broken")
        room = self.limit - self.sent
        if len(data) > room:
            if room > 0:
                await self.inner.send_all(bytes(data[:room]))
            self.sent = self.limit
            self.broken = True
            await self.inner.aclose()
            raise trio.BrokenResourceError("test: connection broken mid-frame")
        await self.inner.send_all(data)
        self.sent += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        while True:
            data = await self.inner.receive_some(max_bytes)
            if not self.deaf or not data:
                self.received += len(data)
                self.receipt.set()
                self.receipt = trio.Event()
                return data

    async def aclose(self) -> None:
        self.broken = True
        await self.inner.aclose()


class Opener:
    """NetSession's opener: TCP to the relay; refuses the first ``fail_first``
    calls; the i-th successful connection breaks after ``break_after[i]``
    bytes (None or missing: never)."""

    def __init__(self, port: int, *, fail_first: int = 0, break_after: list[int | None] | None = None) -> None:
        self.port = port
        self.fail_left = fail_first
        self.break_after = list(break_after or [])
        self.calls = 0
        self.connections = 0
        self.streams: list[trio.abc.Stream] = []

    async def __call__(self) -> trio.abc.Stream:
        self.calls += 1
        if self.fail_left > 0:
            self.fail_left -= 1
            raise ConnectionRefusedError(errno.ECONNREFUSED, "test: connection refused")
        tcp = await trio.open_tcp_stream("127.0.0.1", self.port)
        limit = self.break_after[self.connections] if self.connections < len(self.break_after) else None
        self.connections += 1
        stream = tcp if limit is None else BreakingStream(tcp, limit)
        self.streams.append(stream)
        return stream


def new_session(opener, *, compress: bool = True, **kw) -> NetSession:
    return NetSession(
        name=SESSION, session_id=1, created=CREATED, url=RelayURL("127.0.0.1", 1, False),
        hostname=HOST, compress=compress, opener=opener, connect_timeout=10.0, **kw,
    )


@asynccontextmanager
async def running(net: NetSession) -> AsyncIterator[NetSession]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net.run)
        try:
            yield net
        finally:
            net.close()


def declare(net: NetSession, key: str = "s0", channel: str = "channel0") -> None:
    net.add_trace("t0", TRACE_PATH)
    net.add_metadata("t0", metadata_text())
    net.add_stream(key, "t0", channel)


def submit_all(net: NetSession, packets, key: str = "s0") -> None:
    for raw, seq, b, e, d in packets:
        net.submit(key, raw, seq, b, e, d)


def check_trace(out: Path, n_events: int, n_packets: int) -> None:
    """The relay's trace holds every event once, in order, and an index entry
    per packet."""
    td = trace_dir(out)
    assert (td / "metadata").is_file()
    assert read_seqs(out) == list(range(n_events))
    entries = ctf.read_index((td / "index" / "channel0_0.idx").read_bytes())
    assert [e.packet_seq_num for e in entries] == list(range(n_packets))
    assert sum(e.packet_size for e in entries) // 8 == (td / "channel0_0").stat().st_size


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["zstd", "none"])
async def test_every_event_reaches_the_relay(tmp_path: Path, compress: bool) -> None:
    out = tmp_path / "relay"
    packets = make_packets(40, 500)
    with trio.fail_after(DEADLINE):
        async with running_relay(out) as port:
            net = new_session(Opener(port), compress=compress)
            async with running(net):
                declare(net)
                submit_all(net, packets[:10])
                await net.wait_all_acked()
                # More metadata and packets on the established connection.
                net.add_metadata("t0", b"/* appended later */\n")
                submit_all(net, packets[10:])
                await net.wait_all_acked()
                stats = net.stats("s0")
    check_trace(out, 40 * 500, 40)
    assert (trace_dir(out) / "metadata").read_bytes() == metadata_text() + b"/* appended later */\n"
    raw_total = sum(len(p[0]) for p in packets)
    assert stats["packets"] == 40 and stats["raw_bytes"] == raw_total and stats["unacked"] == 0
    if compress:
        assert stats["wire_bytes"] < raw_total / 2, stats
    else:
        assert stats["wire_bytes"] > raw_total, stats  # raw payload plus frame headers
    assert net.unacked_bytes == 0


async def test_compression_in_the_drain_loop_keeps_the_ring_order(tmp_path: Path, monkeypatch) -> None:
    """A packet that compresses cheaply is compressed in submit() itself
    once the packets before it showed it cheap (the first ones go to the
    worker thread, which measures them), but never ahead of one still with
    the thread: while a batch is there, later packets wait behind it, so
    packets are saved (and their ring space goes back) in the ring's order."""
    out = tmp_path / "relay"
    packets = make_packets(40, 300)
    entered, release = threading.Event(), threading.Event()
    real = net_module._compress_all

    def held(cctx, raws):
        entered.set()
        release.wait(DEADLINE)
        return real(cctx, raws)

    saved: list[int] = []
    with trio.fail_after(DEADLINE):
        async with running_relay(out) as port:
            net = new_session(Opener(port), on_saved=lambda key, pos, ts: saved.append(pos))
            async with running(net):
                declare(net)
                sent = 0

                def submit() -> None:
                    nonlocal sent
                    raw, seq, b, e, d = packets[sent]
                    sent += 1
                    net.submit("s0", raw, seq, b, e, d, ring_end=sent)

                # One at a time: the cost is not known at first (the first
                # compression also sets zstd up), then measured cheap.
                while net.compressed_inline == 0 and sent < 30:
                    submit()
                    await net.wait_all_acked()
                assert net.compressed_inline == 1 and saved == list(range(1, sent + 1)), (sent, saved)
                monkeypatch.setattr(net_module, "_compress_all", held)
                net.inline_compress_ns = 0  # the next packet goes to the thread, which holds it
                submit()
                await trio.to_thread.run_sync(entered.wait, DEADLINE)
                net.inline_compress_ns = 10**12
                submit()
                submit()  # cheap, but the thread has the one before: they wait behind it
                assert saved == list(range(1, sent - 2)) and net.compressed_inline == 1
                release.set()
                await net.wait_all_acked()
                submit()  # the compressor is idle again
                await net.wait_all_acked()
    assert saved == list(range(1, sent + 1))
    assert net.compressed_inline == 2
    check_trace(out, sent * 300, sent)


async def test_a_packet_that_takes_long_to_compress_goes_to_the_worker_thread(
        tmp_path: Path, monkeypatch) -> None:
    """The drain loop compresses a packet only if the packets before it took
    little CPU to compress: with every compression taking a second of CPU,
    each packet goes to the worker thread."""

    class SlowCpu:
        now = 0

        def thread_time_ns(self) -> int:
            self.now += 10**9  # each reading a second after the one before
            return self.now

    monkeypatch.setattr(net_module, "time", SlowCpu())
    out = tmp_path / "relay"
    packets = make_packets(5, 300)
    with trio.fail_after(DEADLINE):
        async with running_relay(out) as port:
            net = new_session(Opener(port))
            async with running(net):
                declare(net)
                for p in packets:
                    submit_all(net, [p])
                    await net.wait_all_acked()
    assert net.compressed_inline == 0
    check_trace(out, 5 * 300, 5)


async def test_a_flush_does_not_wait_for_the_relays_sync_window(tmp_path: Path) -> None:
    """A relay in fsync mode acknowledges once per sync window (here far
    longer than the test's deadline): a flush (wait_all_acked) asks where a
    stream stands once everything is sent, which the relay answers only
    after syncing, so the acks come at once."""
    out = tmp_path / "relay"
    packets = make_packets(12, 200)
    with trio.fail_after(DEADLINE):
        async with running_relay(out, fsync=True, fsync_interval=10_000.0) as port:
            net = new_session(Opener(port))
            async with running(net):
                declare(net)
                submit_all(net, packets)
                await net.wait_all_acked()
                assert net.stats("s0")["unacked"] == 0
    check_trace(out, 12 * 200, 12)


@pytest.mark.skipif(BT2 is None, reason="babeltrace2 is not installed")
async def test_relay_output_opens_in_babeltrace2(tmp_path: Path) -> None:
    out = tmp_path / "relay"
    with trio.fail_after(DEADLINE):
        async with running_relay(out) as port:
            net = new_session(Opener(port))
            async with running(net):
                declare(net)
                submit_all(net, make_packets(5, 200))
                await net.wait_all_acked()
    r = subprocess.run([BT2, str(out)], capture_output=True, text=True, timeout=120)  # noqa: ASYNC221 (relay done)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sum(" demo:tick: " in ln for ln in r.stdout.splitlines()) == 1000


async def test_opener_failures_are_retried(tmp_path: Path) -> None:
    out = tmp_path / "relay"
    packets = make_packets(8, 300)
    with trio.fail_after(DEADLINE):
        async with running_relay(out) as port:
            opener = Opener(port, fail_first=3)
            net = new_session(opener)
            async with running(net):
                declare(net)
                submit_all(net, packets)
                await net.wait_all_acked()
    assert opener.calls == 4 and opener.connections == 1
    assert net.last_failure is not None and "refused" in net.last_failure
    check_trace(out, 8 * 300, 8)


@pytest.mark.parametrize("compress", [True, False], ids=["zstd", "none"])
async def test_resume_after_connection_breaks_mid_stream(tmp_path: Path, compress: bool) -> None:
    """The connection breaks in the middle of a frame, twice, and the opener
    fails in between: the session reconnects, asks where the stream stands,
    resends the rest; the relay has every packet exactly once."""
    out = tmp_path / "relay"
    packets = make_packets(60, 400)
    # The first two connections break after some tens of KiB: a few packets
    # (compressed or not) are through, the next frame is cut.
    limit = 40_000 if compress else 150_000
    with trio.fail_after(DEADLINE):
        async with running_relay(out) as port:
            opener = Opener(port, break_after=[limit, limit])
            net = new_session(opener, compress=compress)
            async with running(net):
                declare(net)
                submit_all(net, packets[:30])
                # Let the first connection break before more is queued, then
                # make the next attempts fail a couple of times.
                while opener.connections < 2:
                    await trio.sleep(0.01)
                opener.fail_left = 2
                submit_all(net, packets[30:])
                await net.wait_all_acked()
    assert opener.connections >= 3, "the connection was expected to break twice"
    assert all(s.broken for s in opener.streams[:2])
    assert net.last_failure is not None
    check_trace(out, 60 * 400, 60)


async def relay_in(out: Path, scope: trio.CancelScope, port: int,
                   task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A relay writing to ``out`` on ``port`` (0: any), until ``scope`` is
    cancelled: a test stops it and starts another there, a relay restart."""
    with scope:
        await serve_relayd(RelaydConfig(output=str(out), listen_host="127.0.0.1", listen_port=port),
                           task_status=task_status)


async def test_resume_after_relay_restart(tmp_path: Path) -> None:
    """The relay goes away (its server cancelled: every connection closed)
    while packets are queued, and a new one comes back on the same port and
    output: the session reconnects, the new relay recovers the stream file
    and says where it stands, and the trace ends complete, no duplicate."""
    out = tmp_path / "relay"
    packets = make_packets(30, 300)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as relays:
            first = trio.CancelScope()
            relay = functools.partial(relay_in, out)

            listeners = await relays.start(relay, first, 0)
            port = listeners[0].socket.getsockname()[1]
            opener = Opener(port)
            net = new_session(opener)
            async with running(net):
                declare(net)
                submit_all(net, packets[:10])
                await net.wait_all_acked()
                first.cancel()  # the relay stops
                submit_all(net, packets[10:])
                while net.last_failure is None:
                    await trio.sleep(0.02)
                second = trio.CancelScope()
                await relays.start(relay, second, port)  # and comes back
                await net.wait_all_acked()
            second.cancel()
    assert opener.connections >= 2
    check_trace(out, 30 * 300, 30)


async def test_resume_when_everything_was_written_but_not_acked(tmp_path: Path) -> None:
    """The relay writes packets but their Acks never reach the consumer; the
    connection then breaks.  After the reconnect the relay says where the
    stream stands, the consumer forgets what is written, and no packet is
    written twice."""
    out = tmp_path / "relay"
    packets = make_packets(15, 200)
    with trio.fail_after(DEADLINE):
        async with running_relay(out) as port:
            opener = Opener(port, break_after=[10**12])  # a wrapper that can go deaf
            net = new_session(opener)
            async with running(net):
                declare(net)
                while not net.connected:
                    await trio.sleep(0.01)
                first = opener.streams[0]
                first.deaf = True  # acks are no longer read
                submit_all(net, packets[:10])
                idx = trace_dir(out) / "index" / "channel0_0.idx"
                while not (idx.exists() and len(ctf.read_index(idx.read_bytes())) == 10):
                    await trio.sleep(0.02)
                assert net.stats("s0")["unacked"] == 10
                await first.inner.aclose()  # the connection breaks
                submit_all(net, packets[10:])
                await net.wait_all_acked()
    assert opener.connections == 2
    check_trace(out, 15 * 200, 15)


@pytest.mark.parametrize("with_key", [False, True], ids=["no-key", "wrong-key"])
async def test_refusing_relay_raises_sink_error(tmp_path: Path, with_key: bool) -> None:
    out = tmp_path / "relay"
    keys = {"k1": (b"s" * 40, ("*",))}
    with trio.fail_after(DEADLINE):
        async with running_relay(out, auth_keys=keys) as port:
            opener = Opener(port)
            auth = ("k1", b"w" * 40) if with_key else None
            net = new_session(opener, auth=auth)
            run_returned = trio.Event()

            async def run() -> None:
                await net.run()
                run_returned.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                declare(net)
                submit_all(net, make_packets(3, 100))
                with pytest.raises(SinkError) as info:
                    await net.wait_all_acked()
                # A refusal is final: run() returns by itself (nobody closed
                # the session), so no reconnect loop is left to try again, and
                # none did before.
                await run_returned.wait()
                assert opener.calls == 1
    text = str(info.value)
    if with_key:
        assert "AUTH_FAILED" in text and "k1" in text, text
    else:
        assert "requires a key" in text, text
    assert "\n" not in text
    assert net.error == text
    assert not net.has_room()
    assert files_under(out) == []


async def test_forbidden_host_raises_sink_error(tmp_path: Path) -> None:
    out = tmp_path / "relay"
    keys = {"k1": (b"s" * 40, ("otherhost",))}
    with trio.fail_after(DEADLINE):
        async with running_relay(out, auth_keys=keys) as port:
            net = new_session(Opener(port), auth=("k1", b"s" * 40))
            async with running(net):
                declare(net)
                submit_all(net, make_packets(2, 10))
                with pytest.raises(SinkError, match=r"FORBIDDEN.*relhost"):
                    await net.wait_all_acked()
    assert files_under(out) == []


async def test_right_key_is_accepted(tmp_path: Path) -> None:
    out = tmp_path / "relay"
    keys = {"k1": (b"s" * 40, (HOST,))}
    with trio.fail_after(DEADLINE):
        async with running_relay(out, auth_keys=keys) as port:
            net = new_session(Opener(port), auth=("k1", b"s" * 40))
            async with running(net):
                declare(net)
                submit_all(net, make_packets(4, 100))
                await net.wait_all_acked()
    check_trace(out, 400, 4)


def _submit_while_room(net: NetSession, packets) -> int:
    """The drain loop's contract: submit while there is room; how many went."""
    submitted = 0
    while net.has_room():
        net.submit("s0", *packets[submitted])
        submitted += 1
    return submitted


async def _submit_the_rest(net: NetSession, packets, submitted: int) -> None:
    """Submit ``packets[submitted:]``, each once there is room for it."""
    for packet in packets[submitted:]:
        while not net.has_room():
            await net.wait_change()
        net.submit("s0", *packet)


async def test_max_unacked_bytes_bounds_memory(tmp_path: Path) -> None:
    """has_room() goes False once max_unacked_bytes are kept, and True again
    (with an on_room call) once the relay acknowledged them."""
    out = tmp_path / "relay"
    packets = make_packets(12, 400)
    size = len(packets[0][0])
    rooms = []
    saved = []
    all_saved = trio.Event()

    def on_saved(key: str, ring_end: int, ts_end: int) -> None:
        saved.append(key)
        if len(saved) == 4:
            all_saved.set()

    with trio.fail_after(DEADLINE):
        async with running_relay(out) as port:
            opener = Opener(port, fail_first=1_000_000)  # relay unreachable for now
            net = new_session(opener, compress=False, max_unacked_bytes=4 * size,
                              on_room=lambda: rooms.append(net.unacked_bytes), on_saved=on_saved)
            async with running(net):
                declare(net)
                submitted = _submit_while_room(net, packets)
                assert submitted == 4
                assert net.unacked_bytes >= net.max_unacked_bytes
                # Once the compressor is through with the four packets (it
                # calls on_saved after accounting for each), codec none has
                # freed nothing: only an acknowledgement could make room.
                await all_saved.wait()
                assert net.unacked_bytes == sum(len(p[0]) for p in packets[:4])
                assert not net.has_room()
                opener.fail_left = 0  # the relay is reachable now
                while not net.has_room():
                    await net.wait_change()
                assert rooms, "on_room was not called when room came back"
                await _submit_the_rest(net, packets, submitted)
                await net.wait_all_acked()
                assert net.has_room() and net.unacked_bytes == 0
    check_trace(out, 12 * 400, 12)


async def test_a_full_spool_calls_on_room_when_acknowledgements_empty_it(tmp_path: Path) -> None:
    """The spool's cap, not max_unacked_bytes, stops the drain loop: the
    acknowledgements that recycle its segments must still call on_room.
    (They did not: the room check ran after the spool was emptied, saw room
    already, and consumerd left the rings unread until the app exited.)"""
    out = tmp_path / "relay"
    packets = make_packets(40, 2000)
    seg = 64 * 1024
    rooms: list[int] = []
    with trio.fail_after(DEADLINE):
        async with running_relay(out) as port:
            opener = Opener(port, fail_first=1_000_000)  # relay unreachable for now
            spool = Spool(str(tmp_path / "spool"), 2 * seg, segment_size=seg)
            net = new_session(opener, compress=False, max_unacked_bytes=1 << 30, spool=spool,
                              on_room=lambda: rooms.append(spool.size))
            async with running(net):
                declare(net)
                submitted = _submit_while_room(net, packets)
                assert 0 < submitted < len(packets)
                assert not spool.has_room() and net.unacked_bytes < net.max_unacked_bytes
                opener.fail_left = 0  # the relay is reachable now
                while not rooms:
                    await net.wait_change()
                assert net.has_room()
                await _submit_the_rest(net, packets, submitted)
                await net.wait_all_acked()
    assert len(rooms) >= 2  # the spool filled again, and room came back again
    check_trace(out, 40 * 2000, 40)


async def test_keepalive_holds_a_quiet_session_past_the_relay_idle_timeout(
    tmp_path: Path, mock_clock: MockClock
) -> None:
    """A session with nothing to send asks where a stream stands now and
    then, so a relay with a short idle timeout never drops it.

    The session's keepalive and the relay's idle timeout are trio timers in
    this process, run here on a MockClock that moves only when the test jumps
    it: they see exactly the idle time the test lets pass, however loaded the
    machine is.  The wall clock only bounds the test."""
    out = tmp_path / "relay"
    packets = make_packets(4, 100)
    idle_timeout, keepalive = 1.0, 0.3
    step = 0.4  # past the keepalive interval, well short of the idle timeout
    with fail_after_wall(DEADLINE):
        async with running_relay(out, idle_timeout=idle_timeout) as port:
            opener = Opener(port, break_after=[10**12])  # never breaks; counts what the relay sends
            net = new_session(opener, keepalive=keepalive)
            async with running(net):
                declare(net)
                submit_all(net, packets[:2])
                await net.wait_all_acked()
                stream = opener.streams[0]
                assert isinstance(stream, BreakingStream)
                quiet = 0.0
                while quiet < 3 * idle_timeout:  # three idle timeouts of silence from the app
                    # Everything waits: the session's keepalive timer was armed
                    # at the current (virtual) time, and so was the relay's
                    # idle timer at the earliest, after its last answer.  So
                    # the jump fires the keepalive, never the relay's timer.
                    await wait_all_tasks_blocked()
                    answered = stream.receipt
                    mock_clock.jump(step)
                    quiet += step
                    await answered.wait()  # the relay answered the keepalive
                submit_all(net, packets[2:])
                await net.wait_all_acked()
    assert opener.connections == 1
    check_trace(out, 4 * 100, 4)


# --------------------------------------------------------------------------
# A scripted relay: Retry, transient Errors, the reconnect backoff
# --------------------------------------------------------------------------


class FakeRelay:
    """A relay the test scripts, speaking the real protocol through
    wire.Connection(Role.RELAY) over trio memory streams (its ``opener`` hands
    NetSession one end of a new pair each time).

    It keeps stream "files" as lists of the seqs written, per channel, across
    connections, and does with a Packet what the protocol says: a duplicate
    is acked again, the next seq is written and acked -- unless its channel
    is in ``full``: then it answers Retry(NO_SPACE) and drops, without a word,
    the stream's packets with another seq until that seq comes again.
    The Packets of a channel in ``silent`` get no answer at all (a relay
    still busy with them).  ``errors`` are Errors to answer, one per
    connection, to the session's declaration (then it closes).  Every Packet
    received is logged as (connection number, channel, seq)."""

    TEXT = "No space left on device"

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.full: set[str] = set()
        self.silent: set[str] = set()
        self.errors: list[tuple[wire.ErrorCode, str]] = []
        self.files: dict[str, list[int]] = {}
        self.packets: list[tuple[int, str, int]] = []
        self.retries: list[tuple[str, int]] = []  # (channel, seq) of each Retry sent
        self.opened: list[float] = []  # trio.current_time() of each connection
        self.ends: list[trio.abc.Stream] = []  # the relay's end of each connection

    async def opener(self) -> trio.abc.Stream:
        ours, theirs = memory_stream_pair()
        self.opened.append(trio.current_time())
        self.ends.append(theirs)
        self.nursery.start_soon(self._serve, len(self.ends) - 1, theirs)
        return ours

    def seqs(self, channel: str, since: int = 0) -> list[int]:
        """The seqs of the Packets of ``channel`` received, in order, from
        the ``since``-th Packet of the log on."""
        return [seq for _, ch, seq in self.packets[since:] if ch == channel]

    async def _serve(self, number: int, stream: trio.abc.Stream) -> None:
        conn = wire.Connection(wire.Role.RELAY)
        channels: dict[int, str] = {}
        awaiting: dict[int, int] = {}  # stream id -> seq of its Retry, until it comes again

        async def send(msg: wire.Message) -> None:
            for part in conn.send_parts(msg):
                await stream.send_all(part)

        try:
            await self._answer(stream, conn, send, channels, awaiting, number)
        except trio.ClosedResourceError:
            return  # the test closed this end (while reading, or answering)

    async def _answer(self, stream: trio.abc.Stream, conn: wire.Connection,
                      send: Callable[[wire.Message], Awaitable[None]], channels: dict[int, str],
                      awaiting: dict[int, int], number: int) -> None:
        while True:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            while (msg := conn.next_event()) is not None:
                match msg:
                    case wire.ConnectionClosed():
                        return
                    case wire.Hello():
                        await send(wire.Welcome(wire.PROTOCOL_VERSION, None))
                    case wire.SessionDecl() if self.errors:
                        await send(wire.Error(*self.errors.pop(0)))
                        await stream.aclose()
                        return
                    case wire.StreamDecl():
                        channels[msg.stream_id] = msg.channel
                    case wire.StreamStateRequest():
                        written = self.files.get(channels[msg.stream_id], [])
                        await send(wire.StreamState(msg.stream_id, len(written)))
                    case wire.Packet():
                        await self._packet(number, msg, channels[msg.stream_id], awaiting, send)

    async def _packet(self, number: int, msg: wire.Packet, channel: str, awaiting: dict[int, int],
                      send) -> None:
        self.packets.append((number, channel, msg.seq))
        if channel in self.silent:
            return
        if awaiting.get(msg.stream_id, msg.seq) != msg.seq:
            return  # in flight when the Retry left: dropped, not an error
        written = self.files.setdefault(channel, [])
        assert msg.seq <= len(written), f"{channel}: gap, seq {msg.seq} after {len(written)} written"
        if msg.seq < len(written):
            await send(wire.Ack(msg.stream_id, len(written) - 1))
        elif channel in self.full:
            awaiting[msg.stream_id] = msg.seq
            self.retries.append((channel, msg.seq))
            await send(wire.Retry(msg.stream_id, msg.seq, wire.RetryReason.NO_SPACE, self.TEXT))
        else:
            awaiting.pop(msg.stream_id, None)
            written.append(msg.seq)
            await send(wire.Ack(msg.stream_id, msg.seq))


def fake_session(relay: FakeRelay, channels: tuple[str, ...] = ("channel0", "channel1"), **kw) -> NetSession:
    """A session to ``relay`` with one stream per channel (``s0``, ``s1``...),
    packets sent raw (no worker thread: what runs is only trio tasks)."""
    net = new_session(relay.opener, compress=False, **kw)
    net.add_trace("t0", TRACE_PATH)
    net.add_metadata("t0", metadata_text(channels))
    for i, ch in enumerate(channels):
        net.add_stream(f"s{i}", "t0", ch)
    return net


async def connected(net: NetSession) -> None:
    while not net.connected:
        await net.wait_change()


async def settle(clock: MockClock, seconds: float = 0.0) -> None:
    """Let every task run until all wait, jump the clock, and again."""
    await wait_all_tasks_blocked()
    if seconds:
        clock.jump(seconds)
        await wait_all_tasks_blocked()


@asynccontextmanager
async def s0_full_after_two(a: list) -> AsyncIterator[tuple[FakeRelay, NetSession]]:
    """A FakeRelay and a session on it whose stream s0 had packets ``a[:2]``
    acknowledged; then the relay's disk is full for channel0 (s0)."""
    async with trio.open_nursery() as nursery:
        relay = FakeRelay(nursery)
        net = fake_session(relay)
        nursery.start_soon(net.run)
        await connected(net)
        submit_all(net, a[:2], "s0")
        await net.wait_all_acked()
        relay.full.add("channel0")
        yield relay, net


async def test_retry_holds_one_stream_then_probes_and_resends_the_rest_once(mock_clock: MockClock) -> None:
    """The relay answers a packet of s0 with Retry: s0 sends nothing for its
    backoff (0.25 s, then 0.5 s, 1 s after each failed probe), then its probe
    alone -- the packet the Retry named; once the probe is acknowledged the
    rest goes, in order, each packet once.  s1, on the same connection,
    never waits.  The backoff is back to 0.25 s afterwards.  Time is a
    MockClock the test jumps: what is checked is the order of events."""
    a = make_packets(10, 10)  # s0, channel0
    b = make_packets(6, 10, stream_id=1)  # s1, channel1
    with fail_after_wall(DEADLINE):
        async with s0_full_after_two(a) as (relay, net):
            submit_all(net, a[2:6], "s0")
            submit_all(net, b[:3], "s1")
            await settle(mock_clock)
            assert relay.retries == [("channel0", 2)]
            sent = relay.seqs("channel0")  # 2, and what was in flight behind it
            assert sent == list(range(len(sent))) and len(sent) >= 3, sent
            assert relay.files["channel1"] == [0, 1, 2]
            assert net.relay_state("s0") == (RelayState.FULL, FakeRelay.TEXT)
            assert net.relay_state("s1") == (None, None)

            mark = len(relay.packets)
            submit_all(net, a[6:8], "s0")
            submit_all(net, b[3:], "s1")
            await settle(mock_clock)
            assert relay.seqs("channel0", mark) == []  # held
            assert relay.files["channel1"] == list(range(6))  # s1 goes on
            assert net.stats("s0")["unacked"] == 6 and net.stats("s1")["unacked"] == 0

            await settle(mock_clock, 0.2)
            assert relay.seqs("channel0", mark) == []  # still held
            await settle(mock_clock, 0.1)
            assert relay.seqs("channel0", mark) == [2]  # the probe, alone; refused again
            assert relay.retries == [("channel0", 2)] * 2
            await settle(mock_clock, 0.4)
            assert relay.seqs("channel0", mark) == [2]  # held longer: 0.5 s
            await settle(mock_clock, 0.2)
            assert relay.seqs("channel0", mark) == [2, 2]
            relay.full.clear()  # the relay's disk has room again
            await settle(mock_clock, 0.9)
            assert relay.seqs("channel0", mark) == [2, 2]  # held for 1 s
            await settle(mock_clock, 0.2)
            assert relay.seqs("channel0", mark) == [2, 2, 2, 3, 4, 5, 6, 7]
            assert relay.files["channel0"] == list(range(8))
            assert net.relay_state("s0") == (None, None)
            await net.wait_all_acked()

            relay.full.add("channel0")  # full again: the backoff starts from 0.25 s again
            mark = len(relay.packets)
            submit_all(net, a[8:], "s0")
            await settle(mock_clock)
            assert relay.retries[-1] == ("channel0", 8)
            relay.full.clear()
            await settle(mock_clock, 0.3)
            assert relay.seqs("channel0", mark)[-2:] == [8, 9]
            await net.wait_all_acked()
            net.close()
    assert relay.files == {"channel0": list(range(10)), "channel1": list(range(6))}
    assert len(relay.opened) == 1


async def test_held_and_probing_streams_across_a_reconnect(mock_clock: MockClock) -> None:
    """A held stream keeps its timer over a reconnect and sends nothing on
    the new connection until it ends; a probing stream whose probe got no
    answer sends it again on the next connection."""
    a = make_packets(6, 10)
    b = make_packets(4, 10, stream_id=1)
    with fail_after_wall(DEADLINE):
        async with s0_full_after_two(a) as (relay, net):
            submit_all(net, a[2:4], "s0")
            await settle(mock_clock)
            assert relay.retries == [("channel0", 2)]

            mark = len(relay.packets)
            await relay.ends[0].aclose()  # the connection breaks while s0 is held
            await settle(mock_clock, 0.1)  # the reconnect's first backoff
            assert len(relay.opened) == 2 and net.connected
            submit_all(net, b[:2], "s1")
            await settle(mock_clock)
            assert relay.files["channel1"] == [0, 1]
            assert relay.seqs("channel0", mark) == []  # 0.1 s of 0.25 s held
            await settle(mock_clock, 0.1)
            assert relay.seqs("channel0", mark) == []
            relay.silent.add("channel0")  # the next probe gets no answer
            await settle(mock_clock, 0.1)
            assert relay.packets[mark:] == [(1, "channel1", 0), (1, "channel1", 1), (1, "channel0", 2)]

            relay.silent.clear()
            relay.full.clear()
            mark = len(relay.packets)
            await relay.ends[1].aclose()  # breaks while s0 probes
            await settle(mock_clock, 0.1)
            assert len(relay.opened) == 3
            await net.wait_all_acked()
            submit_all(net, a[4:], "s0")
            submit_all(net, b[2:], "s1")
            await net.wait_all_acked()
            assert [(c, seq) for n, c, seq in relay.packets[mark:] if c == "channel0"] == [
                ("channel0", 2), ("channel0", 3), ("channel0", 4), ("channel0", 5)]
            assert {n for n, _, _ in relay.packets[mark:]} == {2}
            net.close()
    assert relay.files == {"channel0": list(range(6)), "channel1": list(range(4))}


@pytest.mark.parametrize("code", [wire.ErrorCode.RETRY, wire.ErrorCode.TIMEOUT])
async def test_transient_relay_errors_reconnect(mock_clock: MockClock, code: wire.ErrorCode) -> None:
    """An Error whose code is in TRANSIENT_ERRORS is no refusal: the session
    reconnects with backoff and delivers everything."""
    mock_clock.autojump_threshold = 0
    with fail_after_wall(DEADLINE):
        async with trio.open_nursery() as nursery:
            relay = FakeRelay(nursery)
            relay.errors = [(code, "No space left on device")] * 2
            net = fake_session(relay, channels=("channel0",))
            nursery.start_soon(net.run)
            submit_all(net, make_packets(5, 10), "s0")
            await net.wait_all_acked()
            net.close()
    assert len(relay.opened) == 3
    assert net.error is None
    assert net.last_failure == f"relay: {code.name}: No space left on device"
    assert relay.files == {"channel0": list(range(5))}


async def test_final_relay_error_is_a_refusal_that_keeps_the_count(mock_clock: MockClock) -> None:
    """AUTH_FAILED (not in TRANSIENT_ERRORS) fails the session for good: no
    reconnect, and what was left unacknowledged stays counted."""
    mock_clock.autojump_threshold = 0
    with fail_after_wall(DEADLINE):
        async with trio.open_nursery() as nursery:
            relay = FakeRelay(nursery)
            relay.errors = [(wire.ErrorCode.AUTH_FAILED, "unknown key")]
            net = fake_session(relay, channels=("channel0",))
            nursery.start_soon(net.run)
            submit_all(net, make_packets(3, 10), "s0")
            with pytest.raises(SinkError, match=r"relay refused \(AUTH_FAILED\): unknown key"):
                await net.wait_all_acked()
            net.close()
    assert len(relay.opened) == 1
    assert net.stats("s0")["unacked"] == 3 and net.stats("s0")["unacked_bytes"] > 0
    assert net.relay_state("s0") == (RelayState.REFUSED, "relay refused (AUTH_FAILED): unknown key")


async def test_reconnect_backoff_starts_again_after_a_working_connection(mock_clock: MockClock) -> None:
    """0.1 s, 0.2 s, 0.4 s between failed attempts; once a connection was
    declared and then broke, the next attempt comes 0.1 s later again.
    The clock jumps straight to each timer: the gaps are the backoffs."""
    mock_clock.autojump_threshold = 0
    with fail_after_wall(DEADLINE):
        async with trio.open_nursery() as nursery:
            relay = FakeRelay(nursery)
            relay.errors = [(wire.ErrorCode.RETRY, "No space left on device")] * 3
            net = fake_session(relay, channels=("channel0",))
            nursery.start_soon(net.run)
            submit_all(net, make_packets(2, 10), "s0")
            await net.wait_all_acked()
            await relay.ends[3].aclose()
            while len(relay.opened) < 5 or not net.connected:
                await net.wait_change()
            net.close()
    gaps = [b - a for a, b in zip(relay.opened, relay.opened[1:])]
    assert gaps == pytest.approx([0.1, 0.2, 0.4, 0.1])



async def test_a_chunk_is_archived_once_across_a_relay_restart_during_the_rotation(tmp_path: Path) -> None:
    """A rotation at the NetSession's level (what RelaySink does): the old
    chunk's last packets are submitted while the relay is down, the next
    chunk's stream starts at once; once the relay is back the old chunk is
    acknowledged, dropped and moved by ChunkClose, and each chunk holds its
    own events exactly once."""
    out = tmp_path / "relay"
    old, new = make_packets(20, 300), make_packets(10, 300, first_event=20 * 300)
    archive = "archives/20260102T030405+0000-20260102T030500+0000-0"
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as relays:
            first = trio.CancelScope()
            relay = functools.partial(relay_in, out)

            listeners = await relays.start(relay, first, 0)
            port = listeners[0].socket.getsockname()[1]
            net = new_session(Opener(port))
            async with running(net):
                declare(net)
                submit_all(net, old[:10])
                await net.wait_all_acked()
                first.cancel()  # the relay stops
                submit_all(net, old[10:])  # the old chunk's last packets, not acknowledged yet
                net.add_trace("t0~c1", "active-chunk-1/" + TRACE_PATH)  # the switch
                net.add_metadata("t0~c1", metadata_text())
                net.add_stream("s0~c1", "t0~c1", "channel0")
                submit_all(net, new, key="s0~c1")
                while net.last_failure is None:
                    await trio.sleep(0.02)
                second = trio.CancelScope()
                async with trio.open_nursery() as rot:
                    async def close() -> None:
                        await net.wait_acked(["s0"])
                        net.drop_stream("s0")
                        net.drop_trace("t0")
                        await net.close_chunk("ust", f"{archive}/ust")
                    rot.start_soon(close)
                    await relays.start(relay, second, port)  # the relay comes back
                await net.wait_all_acked()
                assert sorted(net.streams) == ["s0~c1"] and sorted(net.traces) == ["t0~c1"]
            second.cancel()
    sdir = out / HOST / f"{SESSION}-{CREATED}"
    assert sorted(p.name for p in sdir.iterdir()) == ["active-chunk-1", "archives"]
    assert read_seqs(sdir / archive) == list(range(20 * 300))
    assert read_seqs(sdir / "active-chunk-1") == list(range(20 * 300, 30 * 300))


async def test_an_older_relay_gets_protocol_1_and_a_rotation_through_it_fails_with_one_line(
        mock_clock: MockClock) -> None:
    """A relay that knows only protocol 1 refuses Hello(2) with
    Error(VERSION): the session connects again saying 1, streams as before,
    and a ChunkClose is refused locally with a clear text, the session
    itself unharmed."""
    mock_clock.autojump_threshold = 0
    hellos: list[int] = []

    async def old_relay(stream: trio.abc.Stream) -> None:
        conn = wire.Connection(wire.Role.RELAY)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                conn.receive_data(await stream.receive_some(65536))
                while (msg := conn.next_event()) is not None:
                    match msg:
                        case wire.ConnectionClosed():
                            return
                        case wire.Hello() if msg.version != 1:
                            hellos.append(msg.version)
                            await stream.send_all(conn.send(wire.Error(wire.ErrorCode.VERSION, "unsupported")))
                            await stream.aclose()
                            return
                        case wire.Hello():
                            hellos.append(msg.version)
                            await stream.send_all(conn.send(wire.Welcome(1, None)))
                        case wire.StreamStateRequest():
                            await stream.send_all(conn.send(wire.StreamState(msg.stream_id, 0)))

    async with trio.open_nursery() as nursery:
        async def opener() -> trio.abc.Stream:
            ours, theirs = memory_stream_pair()
            nursery.start_soon(old_relay, theirs)
            return ours

        net = new_session(opener, compress=False)
        async with running(net):
            declare(net)
            await connected(net)
            assert hellos == [2, 1] and net.error is None
            with pytest.raises(SinkError, match="speaks protocol 1: it cannot archive trace chunks"):
                await net.close_chunk("ust", "archives/a-b-0/ust")
            assert net.error is None and net.connected
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("full_at_first", [False, True])
def test_a_packet_sent_from_memory_goes_on_from_the_spool_where_the_socket_stopped(
        tmp_path: Path, full_at_first: bool) -> None:
    """A packet just spooled is sent from its parts in memory (one sendmsg of
    the frame's head and the parts); what a full socket did not take, even
    part of the head, follows from the spool file, byte for byte."""
    spool = Spool(str(tmp_path / "spool"), 1 << 24)
    parts = [bytes(range(256)) * 4, memoryview(bytes(range(255, -1, -1)) * 2048)]  # ~0.5 MiB
    ref = spool.append("s0", parts, 0, 0, 0, 0, 0, 0, 0).ref
    head = b"H" * 100
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        a.setblocking(False)
        b.setblocking(False)
        junk = b""
        if full_at_first:
            with contextlib.suppress(BlockingIOError):
                while True:
                    junk += b"j" * a.send(b"j" * 4096)
        job = _FileSend(head, ref)
        done = job.send_from(a, parts)
        assert not done  # more than the socket holds
        got = bytearray()
        while not done:
            with contextlib.suppress(BlockingIOError):
                while chunk := b.recv(1 << 16):
                    got += chunk
            done = job.push(a)
        a.shutdown(socket.SHUT_WR)
        b.setblocking(True)
        while chunk := b.recv(1 << 16):
            got += chunk
    assert bytes(got) == junk + head + b"".join(parts)
    spool.close()


@pytest.mark.parametrize("size", [3500, 60_000, 200_000], ids=["small", "read-back-in-pieces", "large"])
def test_a_spooled_packet_goes_out_whole_through_a_socket_that_takes_little_at_a_time(
        tmp_path: Path, size: int) -> None:
    """The sender's path for a spooled packet (push): one of at most 64 KiB
    is read back and sent with its frame's head in one sendmsg, a larger
    one by sendfile, its last part (small by then) read back; through a
    socket full at first that takes a few KiB at a time, every byte arrives
    once, in order."""
    spool = Spool(str(tmp_path / "spool"), 1 << 24)
    spool.append("s0", [b"x" * 1000], 0, 0, 0, 0, 0, 0, 0)  # the packet does not start the segment
    data = bytes(i * 7 % 251 for i in range(size))
    ref = spool.append("s0", [data], 1, 0, 0, 0, 0, 0, 0).ref
    head = b"H" * 70
    with socket.create_server(("127.0.0.1", 0)) as server:
        b = socket.socket()
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        b.connect(server.getsockname())
        a = server.accept()[0]
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.setblocking(False)
        b.setblocking(False)
        junk = b""
        with contextlib.suppress(BlockingIOError):
            while True:  # full at first
                junk += b"j" * a.send(b"j" * 512)
        job = _FileSend(head, ref)
        got = bytearray()
        pushes = 1
        while not job.push(a):
            pushes += 1
            with contextlib.suppress(BlockingIOError):
                got += b.recv(1500)  # room for a little at a time
        a.shutdown(socket.SHUT_WR)
        b.setblocking(True)
        while chunk := b.recv(1 << 16):
            got += chunk
    assert pushes >= 2  # the socket was full at first
    if size > 10_000:
        assert pushes > 2  # and the packet went in pieces
    assert bytes(got) == junk + head + data
    spool.close()
