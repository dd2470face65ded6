"""consumerd (consumerd/daemon.py, consumerd/sinks.py) in process, driven the
way sessiond drives it: typed operations (tracewire.ops) over a SEQPACKET
socketpair, ring buffers made with tracewire.ringbuf and filled by hand.

What is checked: the control plane (a malformed operation is refused in one
line and consumerd keeps serving; an unknown session or trace is a refusal; a
bug is reported as an internal error with its traceback in the log; the
descriptors of a refused message are closed; a request whose descriptors were
cut off in transit is answered, not dropped), both sinks behind it (a local
directory, continued by a restarted consumerd; a relay, run in process with
serve_relayd, with its spool removed with the session), hostile rings (a bad
magic quarantines the stream at add_stream, a replay included; corrupt control
words break it mid-stream and close its descriptors; the other streams go on),
and descriptors (a stream of an exited app, written out, keeps none: nor does
its trace).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from consumerd.daemon import Consumerd, ConsumerdConfig, serve_consumerd
from relayd.daemon import RelaydConfig, serve_relayd
from tracewire import ctf
from tracewire.consumer_ops import (
    AddStreamOp,
    AddTraceOp,
    DoneReply,
    ErrorReply,
    FlushOp,
    HelloOp,
    HelloReply,
    MetadataOp,
    Op,
    ProducerGoneOp,
    ReleasedReply,
    RemoveSessionOp,
    Reply,
    SessionOp,
    StatusOp,
    StreamsReply,
    StreamStats,
    TraceReply,
    decode_reply,
)
from tracewire.ctf import EventDecl, TraceInfo
from tracewire.ops import encode
from tracewire.ringbuf import (
    Q_CONSUMED,
    Q_SLOTS,
    Q_WAITING,
    SLOT_END,
    SLOT_TS,
    SLOT_WORDS,
    BufferSpec,
    Producer,
    create_buffer,
)
from tracewire.seqpacket import MAX_FDS, SeqPacket

DEADLINE = 60.0  # per test; generous for a loaded 2-core machine
HOST = "cdhost"
SESSION = "cdsess"
CREATED = "20260102T030405"
TRACE_PATH = f"ust/pid/app-77-{CREATED}"
TRACE_UUID = uuid.UUID("0b7e1c2d-3333-4444-8555-0123456789ab")
START_TS = 1_000_000_000
SPEC = BufferSpec(4096, 4)
TICK = EventDecl("demo:tick", 0, (("seq", ctf.FieldType.INT), ("msg", ctf.FieldType.STR)))


def metadata_text() -> str:
    info = TraceInfo(
        uuid=TRACE_UUID.bytes, hostname=HOST, trace_name=SESSION, creation_datetime=CREATED,
        procname="app", vpid=77, clock_offset_ns=1_700_000_000_000_000_000, channels=("channel0",),
    )
    return ctf.metadata_preamble(info) + ctf.metadata_event(TICK)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Ring:
    """A ring buffer and its eventfd, written by hand as the tracer would."""

    def __init__(self) -> None:
        self.memfd = create_buffer(SPEC, START_TS)
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.producer = Producer(self.memfd, self.efd)
        self.ts = START_TS
        self.seq = 0

    def emit(self, n: int) -> None:
        """``n`` demo:tick events (seq continues); every one must fit."""
        for _ in range(n):
            self.ts += 1000
            data = ctf.encode_event(TICK.id, self.ts, 0, (self.seq, f"m{self.seq}"), TICK.fields)
            off = self.producer.reserve(len(data))
            assert off >= 0, "the ring is full: the consumer did not keep up"
            self.producer.view[off:off + len(data)] = data
            self.producer.commit(len(data), self.ts)
            self.seq += 1

    def close(self) -> None:
        self.producer.close()
        os.close(self.memfd)
        os.close(self.efd)


class Client:
    """sessiond's side of the control socket."""

    def __init__(self, conn: SeqPacket, cd: Consumerd) -> None:
        self.conn = conn
        self.cd = cd
        self.seq = 0

    async def raw(self, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> dict[str, Any]:
        self.seq += 1
        await self.conn.send(dict(msg, seq=self.seq), fds)
        got = await self.conn.receive()
        assert got is not None
        reply, rfds = got
        assert rfds == [] and reply["seq"] == self.seq, reply
        return reply

    async def call(self, op: Op, fds: tuple[int, ...] = ()) -> Reply:
        return decode_reply(type(op), await self.raw(encode(op), fds))

    async def ok(self, op: Op, fds: tuple[int, ...] = ()) -> Reply:
        reply = await self.call(op, fds)
        assert not isinstance(reply, ErrorReply), reply
        return reply


@asynccontextmanager
async def consumerd() -> AsyncIterator[Client]:
    """serve_consumerd on one end of a socketpair; the client on the other.
    Leaving closes the client's end: consumerd drains and returns."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = SeqPacket(trio.socket.from_stdlib_socket(ours))
    async with trio.open_nursery() as nursery:
        cd = await nursery.start(serve_consumerd, ConsumerdConfig(theirs.detach()))
        try:
            yield Client(conn, cd)
        finally:
            conn.close()


def session_op(sink: str, **kw: Any) -> SessionOp:
    return SessionOp(session=SESSION, session_id=1, created=CREATED, sink=sink, hostname=HOST,
                     uid=os.getuid(), gid=os.getgid(), **kw)


def stream_op(**kw: Any) -> AddStreamOp:
    fields: dict[str, Any] = dict(key="s0", trace_id="t0", session=SESSION, channel="channel0", stream_class=0,
                                  subbuf_size=SPEC.subbuf_size, num_subbuf=SPEC.num_subbuf)
    return AddStreamOp(**(fields | kw))


async def declare(c: Client, sink: str, ring: Ring, *, replay: bool = False, **kw: Any) -> None:
    await c.ok(session_op(sink, **kw))
    await c.ok(AddTraceOp(trace_id="t0", session=SESSION, path=TRACE_PATH, uuid=TRACE_UUID.hex))
    await c.ok(MetadataOp(trace_id="t0", text=metadata_text()))
    await c.ok(stream_op(replay=replay), (ring.memfd, ring.efd))


def read_seqs(root: Path) -> list[int]:
    seqs = []
    for item in ctf.read_trace(root):
        assert isinstance(item, ctf.Event), item
        seq = item.fields["seq"]
        assert isinstance(seq, int)
        seqs.append(seq)
    return seqs


# ------------------------------------------------------------------ control plane
def assert_nothing_lost(reply: object) -> None:
    """A removed session's reply: its streams' counters, nothing left behind."""
    assert isinstance(reply, StreamsReply), reply
    assert all(st.unacked == 0 and st.ring_unread == 0 for st in reply.streams), reply


@pytest.mark.parametrize("msg, why", [
    ({"op": "no_such_op"}, "unknown operation"),
    ({"op": "add_trace", "trace_id": "t0", "session": "s"}, "missing field"),
    ({"op": "flush", "session": 3}, "'session'"),
    ({"op": "status", "session": "s", "extra": 1}, "unknown field"),
    ({"op": "add_trace", "trace_id": "t0", "session": "s", "path": "p", "uuid": "xyz"}, "uuid"),
])
async def test_malformed_operation_is_refused_and_consumerd_keeps_serving(
        msg: dict[str, Any], why: str) -> None:
    with trio.fail_after(DEADLINE):
        async with consumerd() as c:
            r, w = os.pipe()
            before = open_fds()
            reply = await c.raw(msg, (r, w))
            assert open_fds() == before, "the descriptors of a refused message were kept"
            os.close(r)
            os.close(w)
            assert reply["ok"] is False and why in reply["error"], reply
            assert reply["internal"] is False and "\n" not in reply["error"]
            assert await c.call(HelloOp()) == HelloReply(os.getpid())


async def test_unknown_session_and_trace_are_refusals(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with consumerd() as c:
            ring = Ring()
            reply = await c.call(AddTraceOp(trace_id="t0", session="nope", path="a", uuid="00" * 16))
            assert reply == ErrorReply("unknown session 'nope'")
            reply = await c.call(MetadataOp(trace_id="nope", text="x"))
            assert reply == ErrorReply("unknown trace 'nope'")
            before = open_fds()
            reply = await c.call(stream_op(), (ring.memfd, ring.efd))
            assert reply == ErrorReply("unknown trace 't0'")
            assert open_fds() == before
            # Nothing to flush or show in a session consumerd never saw.
            assert await c.call(FlushOp(session="nope")) == StreamsReply(())
            assert await c.call(StatusOp(session="nope")) == StreamsReply(())
            assert await c.call(RemoveSessionOp(session="nope")) == StreamsReply(())
            ring.close()


@pytest.mark.parametrize("sink, why", [
    ("relative/dir", "is not an absolute directory"),
    ("ftp://relay", "bad relay URL"),
])
async def test_bad_sink_is_a_refusal(sink: str, why: str) -> None:
    with trio.fail_after(DEADLINE):
        async with consumerd() as c:
            reply = await c.call(session_op(sink))
            assert isinstance(reply, ErrorReply) and why in reply.error and not reply.internal


async def test_bug_is_an_internal_error_with_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken(op: MetadataOp) -> DoneReply:
        replies: dict[str, DoneReply] = {}
        return replies[op.trace_id]  # a KeyError: a bug

    with trio.fail_after(DEADLINE):
        async with consumerd() as c:
            await c.ok(session_op(str(tmp_path)))
            c.cd.op_metadata = broken  # type: ignore[method-assign]
            with caplog.at_level(logging.ERROR, logger="consumerd.daemon"):
                reply = await c.call(MetadataOp(trace_id="t0", text="x"))
            assert isinstance(reply, ErrorReply) and reply.internal, reply
            assert reply.error.startswith("internal error: KeyError")
            [record] = [r for r in caplog.records if r.exc_info]
            assert "metadata" in record.getMessage()
            assert await c.call(HelloOp()) == HelloReply(os.getpid())


# ------------------------------------------------------------------ local sink
async def test_local_sink_and_a_restarted_consumerd(tmp_path: Path) -> None:
    """Packets, index and metadata land in the directory; a second consumerd,
    given everything again (replay), continues the same files: the next seq,
    the metadata not written twice, every event once."""
    td = tmp_path / TRACE_PATH
    ring = Ring()
    with trio.fail_after(DEADLINE):
        async with consumerd() as c:
            await declare(c, str(tmp_path), ring)
            ring.emit(150)
            reply = await c.ok(FlushOp(session=SESSION))
            assert isinstance(reply, StreamsReply)
            [st] = reply.streams
            assert st.key == "s0" and st.path == str(td / "channel0_0") and st.error is None
            assert st.packets >= 2 and st.raw_bytes == st.wire_bytes == (td / "channel0_0").stat().st_size
            assert await c.ok(StatusOp(session=SESSION)) == reply
            assert await c.ok(AddTraceOp(trace_id="t0", session=SESSION, path=TRACE_PATH,
                                         uuid=TRACE_UUID.hex)) == TraceReply(str(td))
        first = st.packets
        async with consumerd() as c:  # the first one exited: sessiond replays
            await declare(c, str(tmp_path), ring, replay=True)
            await c.ok(MetadataOp(trace_id="t0", text="/* more */\n", offset=len(metadata_text().encode())))
            ring.emit(100)
            assert await c.ok(ProducerGoneOp(key="s0")) == ReleasedReply(True)
            reply = await c.ok(FlushOp(session=SESSION))
            assert isinstance(reply, StreamsReply) and reply.streams[0].producer == "gone"
            assert_nothing_lost(await c.ok(RemoveSessionOp(session=SESSION)))
            assert await c.ok(StatusOp(session=SESSION)) == StreamsReply(())
    ring.close()
    assert (td / "metadata").read_text() == metadata_text() + "/* more */\n"
    entries = ctf.read_index((td / "index" / "channel0_0.idx").read_bytes())
    assert [e.packet_seq_num for e in entries] == list(range(len(entries)))
    assert len(entries) > first
    assert read_seqs(tmp_path) == list(range(250))


# ------------------------------------------------------------------ relay sink
@asynccontextmanager
async def running_relay(output: Path) -> AsyncIterator[int]:
    cfg = RelaydConfig(output=str(output), listen_host="127.0.0.1", listen_port=0)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_relayd, cfg)
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


async def test_relay_sink_flush_waits_for_the_relay(tmp_path: Path) -> None:
    out, spool = tmp_path / "relay", tmp_path / "spool"
    ring = Ring()
    with trio.fail_after(DEADLINE):
        async with running_relay(out) as port, consumerd() as c:
            url = f"tw://127.0.0.1:{port}"
            await declare(c, url, ring, spool_dir=str(spool))
            ring.emit(200)
            reply = await c.ok(FlushOp(session=SESSION))
            assert isinstance(reply, StreamsReply)
            [st] = reply.streams
            assert st.path == f"{url}/{TRACE_PATH}/channel0_0"
            assert st.packets >= 2 and st.unacked == 0 and st.error is None
            assert 0 < st.wire_bytes < st.raw_bytes  # zstd
            assert spool.is_dir()
            assert_nothing_lost(await c.ok(RemoveSessionOp(session=SESSION)))
            assert not spool.exists()
    ring.close()
    assert read_seqs(out) == list(range(200))


# ------------------------------------------------------------------ truncated descriptors
async def test_too_many_descriptors_are_answered_with_an_error() -> None:
    """More descriptors than a message may carry: the kernel cuts them off
    (MSG_CTRUNC); the request is answered, those that came are closed."""
    with trio.fail_after(DEADLINE):
        async with consumerd() as c:
            fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(MAX_FDS + 1)]
            before = open_fds()
            reply = await c.raw(encode(stream_op()), tuple(fds))
            assert open_fds() == before, "the descriptors that did arrive were kept"
            close_all(fds)
            assert reply["ok"] is False and "out of file descriptors" in reply["error"], reply
            assert await c.call(HelloOp()) == HelloReply(os.getpid())


async def test_blocking_stream_wakes_its_producer_and_lets_the_pipe_go(tmp_path: Path) -> None:
    """A blocking channel's stream comes with a third descriptor, the space
    pipe's write end: a release the producer waits for writes one byte to
    it; once the stream is closed (its session removed), consumerd holds no
    write end (the producer's read end sees end of file)."""
    ring = Ring()
    rd, wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with trio.fail_after(DEADLINE):
            async with consumerd() as c:
                await c.ok(session_op(str(tmp_path)))
                await c.ok(AddTraceOp(trace_id="t0", session=SESSION, path=TRACE_PATH, uuid=TRACE_UUID.hex))
                await c.ok(MetadataOp(trace_id="t0", text=metadata_text()))
                await c.ok(stream_op(), (ring.memfd, ring.efd, wr))
                os.close(wr)  # consumerd holds its own
                wr = -1
                ring.producer.q[Q_WAITING] = SPEC.subbuf_size  # "I wait for sub-buffer 0's release"
                ring.emit(150)  # closes sub-buffer 0: consumerd reads and releases it
                await trio.lowlevel.wait_readable(rd)
                assert os.read(rd, 4096).startswith(b"\1")
                ring.producer.q[Q_WAITING] = 0
                assert_nothing_lost(await c.ok(RemoveSessionOp(session=SESSION)))
                assert os.read(rd, 4096) in (b"", b"\1")
                assert os.read(rd, 4096) == b""  # end of file: no write end left
    finally:
        ring.close()
        os.close(rd)
        if wr >= 0:
            os.close(wr)
    assert read_seqs(tmp_path) == list(range(150))


async def test_out_of_descriptors_is_answered_with_an_error(tmp_path: Path) -> None:
    """consumerd at its descriptor limit: the ring's descriptors cannot be
    received, yet add_stream is answered (sessiond would wait 60 s for it
    otherwise); with room again the same stream is added."""
    ring = Ring()
    with trio.fail_after(DEADLINE):
        async with consumerd() as c:
            await c.ok(session_op(str(tmp_path)))
            await add_app(c, 0, None)
            with descriptor_limit_reached():
                reply = await c.call(stream_op(key="s0", trace_id="t0"), (ring.memfd, ring.efd))
            assert isinstance(reply, ErrorReply) and "out of file descriptors" in reply.error, reply
            assert not reply.internal
            await c.ok(stream_op(key="s0", trace_id="t0"), (ring.memfd, ring.efd))
            ring.emit(20)
            await c.ok(FlushOp(session=SESSION))
    ring.close()
    assert read_seqs(tmp_path) == list(range(20))


# ------------------------------------------------------------------ hostile rings
async def test_bad_magic_at_add_stream_is_quarantined(tmp_path: Path) -> None:
    """A ring whose magic the app overwrote: add_stream is done (not refused),
    the stream is quarantined (status says why, producer_gone releases it,
    its descriptors are closed), and another stream goes on."""
    good, bad = Ring(), Ring()
    bad.producer.view[0:4] = b"EVIL"
    with trio.fail_after(DEADLINE):
        async with consumerd() as c:
            await c.ok(session_op(str(tmp_path)))
            await add_app(c, 0, good)
            before = open_fds()
            await add_app(c, 1, bad)
            assert open_fds() == before, "a quarantined stream's descriptors were kept"
            good.emit(50)
            reply = await c.ok(FlushOp(session=SESSION))
            assert isinstance(reply, StreamsReply)
            by_key = {st.key: st for st in reply.streams}
            assert by_key["s0"].error is None and by_key["s0"].packets >= 1
            assert by_key["s1"].error is not None and by_key["s1"].error.startswith("quarantined: ")
            assert "magic" in by_key["s1"].error and by_key["s1"].path == str(tmp_path / app_path(1) / "channel0_0")
            assert await c.ok(ProducerGoneOp(key="s1")) == ReleasedReply(True)
            [st] = [st for st in (await status(c)) if st.key == "s1"]
            assert st.producer == "gone"
            assert c.cd.broken_streams == 1
            assert_nothing_lost(await c.ok(RemoveSessionOp(session=SESSION)))
            assert not c.cd.quarantined
    good.close()
    bad.close()
    assert read_seqs(tmp_path / app_path(0)) == list(range(50))


async def test_a_ring_its_app_could_shrink_is_quarantined(tmp_path: Path) -> None:
    """A ring memfd not sealed against resizing (the app could shrink it under
    consumerd's mapping: SIGBUS) is quarantined; a sealed one cannot be shrunk."""
    good = Ring()
    with pytest.raises(PermissionError):
        os.ftruncate(good.memfd, 4096)
    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.write(unsealed, os.pread(good.memfd, SPEC.total_size, 0))
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    with trio.fail_after(DEADLINE):
        async with consumerd() as c:
            await c.ok(session_op(str(tmp_path)))
            await add_app(c, 1, None)
            assert await c.ok(app_stream_op(1), (unsealed, efd)) == DoneReply()
            [st] = await status(c)
            assert st.error is not None and "not sealed" in st.error, st
    close_all([unsealed, efd])
    good.close()


async def test_replay_carries_on_past_a_corrupt_ring(tmp_path: Path) -> None:
    """A restarted consumerd is given everything again; one app overwrote its
    ring's magic meanwhile.  Every operation of the replay is done, that
    stream is quarantined, and the good app's stream continues with every
    event once."""
    good, bad = Ring(), Ring()
    with trio.fail_after(DEADLINE):
        async with consumerd() as c:
            await c.ok(session_op(str(tmp_path)))
            await add_app(c, 0, good)
            await add_app(c, 1, bad)
            good.emit(40)
            bad.emit(40)
            await c.ok(FlushOp(session=SESSION))
        bad.producer.view[0:4] = b"EVIL"  # while no consumerd runs
        async with consumerd() as c:
            await c.ok(session_op(str(tmp_path)))
            await add_app(c, 0, good, replay=True)
            await add_app(c, 1, bad, replay=True)
            assert await c.ok(ProducerGoneOp(key="s1")) == ReleasedReply(True)
            good.emit(60)
            reply = await c.ok(FlushOp(session=SESSION))
            assert isinstance(reply, StreamsReply)
            errors = {st.key: st.error for st in reply.streams}
            assert errors["s0"] is None and (errors["s1"] or "").startswith("quarantined: bad ring buffer magic")
    good.close()
    bad.close()
    assert read_seqs(tmp_path / app_path(0)) == list(range(100))
    assert read_seqs(tmp_path / app_path(1)) == list(range(40))  # what was read before it broke


async def test_corrupt_control_words_break_one_stream_and_close_it(tmp_path: Path) -> None:
    """The app makes a slot say its sub-buffer closed past its end: that
    stream is broken, counted, and its descriptors (eventfd, mapping, files)
    are closed; the other stream and consumerd go on."""
    good, bad = Ring(), Ring()
    with trio.fail_after(DEADLINE):
        async with consumerd() as c:
            await c.ok(session_op(str(tmp_path)))
            await add_app(c, 0, good)
            await add_app(c, 1, bad)
            good.emit(30)
            bad.emit(30)
            await c.ok(FlushOp(session=SESSION))
            before = open_fds()
            corrupt_slot(bad)
            while not c.cd.streams["s1"].closed:  # the eventfd wakes its task
                await trio.sleep(0.01)
            # Its eventfd, the mapping's descriptor and the stream file and index.
            assert open_fds() == before - 4
            good.emit(30)
            reply = await c.ok(FlushOp(session=SESSION))
            assert isinstance(reply, StreamsReply)
            errors = {st.key: st.error for st in reply.streams}
            assert errors["s0"] is None and "closed past its end" in (errors["s1"] or ""), errors
            assert c.cd.broken_streams == 1
            assert await c.ok(ProducerGoneOp(key="s1")) == ReleasedReply(True)
            assert await c.call(HelloOp()) == HelloReply(os.getpid())
    good.close()
    bad.close()
    assert read_seqs(tmp_path / app_path(0)) == list(range(60))
    assert read_seqs(tmp_path / app_path(1)) == list(range(30))


# ------------------------------------------------------------------ descriptors per app
APPS = 200


async def test_exited_apps_keep_no_descriptor(tmp_path: Path) -> None:
    """200 short-lived apps, each its own trace and stream: once each one's
    producer_gone is answered (released), consumerd holds no descriptor of
    it, nor of its trace; nor does a restarted consumerd given their traces
    again (replay, the rings freed)."""
    with trio.fail_after(DEADLINE * 2):
        async with consumerd() as c:
            await c.ok(session_op(str(tmp_path)))
            before = open_fds()
            await run_short_lived_apps(c, APPS)
            assert open_fds() == before, f"{open_fds() - before} descriptors kept for {APPS} exited apps"
        async with consumerd() as c:
            await c.ok(session_op(str(tmp_path)))
            before = open_fds()
            for i in range(APPS):
                await add_app(c, i, None, replay=True)
                await c.ok(app_stream_op(i, replay=True, gone=True))
            assert open_fds() == before, "a replay of dead apps' traces kept descriptors"
            await c.ok(MetadataOp(trace_id="t7", text="/* more */\n", offset=len(metadata_text().encode())))
    for i in (0, APPS - 1):
        assert read_seqs(tmp_path / app_path(i)) == list(range(5))
    assert (tmp_path / app_path(7) / "metadata").read_text() == metadata_text() + "/* more */\n"


async def test_exited_apps_keep_no_spool_descriptor(tmp_path: Path) -> None:
    """The relay sink: a dead app's stream, once the relay has acknowledged
    it all, keeps no spool segment open."""
    out, spool = tmp_path / "relay", tmp_path / "spool"
    with trio.fail_after(DEADLINE * 2):
        async with running_relay(out) as port, consumerd() as c:
            await c.ok(session_op(f"tw://127.0.0.1:{port}", spool_dir=str(spool)))
            await run_short_lived_apps(c, 30)
            await c.ok(FlushOp(session=SESSION))  # every packet acknowledged
            assert descriptors_below(spool) == [], "spool segments of exited apps kept open"
            assert_nothing_lost(await c.ok(RemoveSessionOp(session=SESSION)))
    counts = {d.name: len(read_seqs(d)) for d in sorted(p.parent for p in out.rglob("metadata"))}
    assert list(counts.values()) == [5] * 30, counts


# ------------------------------------------------------------------ helpers
def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def app_path(i: int) -> str:
    return f"ust/pid/app-{i}-{CREATED}"


def app_stream_op(i: int, **kw: Any) -> AddStreamOp:
    return stream_op(key=f"s{i}", trace_id=f"t{i}", **kw)


async def add_app(c: Client, i: int, ring: Ring | None, *, replay: bool = False) -> None:
    """App ``i``: its trace ``t{i}``, metadata and, given a ring, stream ``s{i}``."""
    await c.ok(AddTraceOp(trace_id=f"t{i}", session=SESSION, path=app_path(i), uuid=TRACE_UUID.hex))
    await c.ok(MetadataOp(trace_id=f"t{i}", text=metadata_text()))
    if ring is not None:
        assert await c.ok(app_stream_op(i, replay=replay), (ring.memfd, ring.efd)) == DoneReply()


async def run_short_lived_apps(c: Client, n: int) -> None:
    """``n`` apps one after the other: each emits 5 events and exits."""
    for i in range(n):
        ring = Ring()
        await add_app(c, i, ring)
        ring.emit(5)
        ring.close()
        assert await c.ok(ProducerGoneOp(key=f"s{i}")) == ReleasedReply(True)


async def status(c: Client) -> tuple[StreamStats, ...]:
    reply = await c.ok(StatusOp(session=SESSION))
    assert isinstance(reply, StreamsReply)
    return reply.streams


def corrupt_slot(ring: Ring) -> None:
    """Write, as a hostile app would, that the sub-buffer being read closed
    past its end, and announce it on the eventfd."""
    q = ring.producer.q
    j = q[Q_CONSUMED] // SPEC.subbuf_size
    k = Q_SLOTS + SLOT_WORDS * (j % SPEC.num_subbuf)
    q[k + SLOT_TS] = 2**62
    q[k + SLOT_END] = (j + 1) * SPEC.subbuf_size - 1
    os.eventfd_write(ring.efd, 1)


def descriptors_below(directory: Path) -> list[str]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor
        if target.startswith(str(directory) + "/"):
            out.append(target)
    return out


@contextmanager
def descriptor_limit_reached() -> Iterator[None]:
    """No new descriptor can be opened inside (RLIMIT_NOFILE lowered to the
    lowest free descriptor number)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.dup(0)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
