"""relayd/live.py: the registry the ingest path updates, and the live port
served over loopback from files written with StreamFile (no consumer)."""

from __future__ import annotations

import os
import struct
from functools import partial
from pathlib import Path

import pytest
import trio
from liveview import Viewer

from relayd.live import LiveConfig, LiveRegistry, complete_metadata, serve_live
from tracewire import ctf
from tracewire.live import (
    AttachSession,
    AttachStatus,
    Command,
    Connect,
    ConnectReply,
    CreateSession,
    DetachSession,
    GetMetadata,
    GetNewStreams,
    GetNextIndex,
    GetPacket,
    IndexFlag,
    IndexReply,
    IndexStatus,
    ListSessions,
    MetadataReply,
    MetadataStatus,
    NewStreamsStatus,
    PacketReply,
    PacketStatus,
    SessionsReply,
    StatusReply,
    StreamsReply,
    encode_request,
)
from tracewire.streamfile import StreamFile

UUID = bytes(range(16))
META_1 = "/* CTF 1.8 */\n\ntrace {\n\tmajor = 1;\n};\n\n"
META_2 = "event {\n\tname = \"a\";\n};\n\n"


class Target:
    """What the ingest path would have written, and told the registry."""

    def __init__(self, root: Path, reg: LiveRegistry) -> None:
        self.reg = reg
        self.session_dir = str(root / "tgt1" / "s1-x")
        self.trace_dir = os.path.join(self.session_dir, "ust", "pid", "app-1-x")
        os.makedirs(self.trace_dir)
        self.rel = os.path.relpath(self.trace_dir, root)
        reg.session_declared("tgt1", "s1", self.session_dir)
        self.meta = b""
        self.file = StreamFile(self.trace_dir, "channel0_0", flush_every=None)
        self.path = self.file.path
        self.packets: list[bytes] = []

    def metadata(self, text: str) -> None:
        with open(os.path.join(self.trace_dir, "metadata"), "ab") as f:
            f.write(text.encode())
        self.meta += text.encode()
        self.reg.metadata_written(self.session_dir, self.trace_dir, self.rel, len(self.meta))

    def stream(self) -> None:
        self.reg.stream_declared(self.session_dir, self.trace_dir, self.rel, "channel0_0", self.path,
                                 self.file.index_path, 0)

    def packet(self, ts_begin: int, ts_end: int, body: bytes = b"") -> None:
        seq = self.file.next_seq
        raw = ctf.pack_packet_header(UUID, 0, 0, ts_begin, ts_end, len(body), seq, 0) + body
        self.file.append([raw], ts_begin, ts_end, 0, stream_id=0)
        self.file.flush()
        self.packets.append(raw)
        self.reg.indexed(self.path, seq + 1)

    def close(self) -> None:
        self.file.close()


@pytest.fixture
def target(tmp_path):
    t = Target(tmp_path, LiveRegistry())
    yield t
    t.close()


async def _serve(nursery, reg, **kw):
    listeners = await nursery.start(partial(serve_live, LiveConfig(listen_host="127.0.0.1", listen_port=0, **kw), reg))
    return listeners[0].socket.getsockname()[1]


class Net:
    """Connections to the live port, closed at teardown."""

    def __init__(self) -> None:
        self.open: list[trio.SocketStream] = []

    async def connect(self, port: int) -> trio.SocketStream:
        s = await trio.open_tcp_stream("127.0.0.1", port)
        self.open.append(s)
        return s

    async def viewer(self, port: int, connect: bool = True) -> Viewer:
        v = Viewer(await self.connect(port))
        if connect:
            r = await v.ask(Connect())
            assert isinstance(r, ConnectReply) and r.major == 2
        return v


@pytest.fixture
async def net():
    n = Net()
    yield n
    for s in n.open:
        await s.aclose()


def test_complete_metadata_stops_at_the_last_whole_declaration():
    assert complete_metadata(b"") == 0
    assert complete_metadata(META_1.encode()) == len(META_1)
    assert complete_metadata((META_1 + "event {\n\tname = ").encode()) == len(META_1)


def test_registry_forgets_an_ended_session_with_its_last_viewer(target):
    reg = target.reg
    target.metadata(META_1)
    target.stream()
    (sess,) = reg.sessions.values()
    assert sess.stream_count() == 1 and reg.is_live(target.session_dir)
    reg.attach(sess)
    reg.session_closed(target.session_dir)
    assert sess.ended and sess.session_id in reg.sessions  # its viewer still reads
    reg.detach(sess)
    assert not reg.sessions and not reg.by_id and not reg.is_live(target.session_dir)
    # Ingest calls about forgotten (or never live) sessions are no-ops.
    reg.indexed(target.path, 5)
    reg.metadata_written(target.session_dir, target.trace_dir, target.rel, 10)
    reg.stream_declared("/nowhere", "/nowhere/t", "t", "c_0", "/nowhere/t/c_0", "/x", 0)
    assert not reg.sessions


async def test_a_session_followed_from_attach_to_hangup(nursery, net, target):
    port = await _serve(nursery, target.reg)
    with trio.fail_after(30):
        v = await net.viewer(port)
        assert await v.ask(CreateSession()) == StatusReply(1, Command.CREATE_SESSION)
        sessions = await v.ask(ListSessions())
        assert isinstance(sessions, SessionsReply)
        (info,) = sessions.sessions
        assert (info.hostname, info.name, info.live_timer_us > 0) == ("tgt1", "s1", True)
        a = await v.ask(AttachSession(info.session_id))
        assert a == StreamsReply(AttachStatus.OK, (), Command.ATTACH_SESSION)  # no stream with metadata yet
        assert (await v.ask(GetNewStreams(info.session_id))).status == NewStreamsStatus.NO_NEW
        target.stream()
        assert (await v.ask(GetNewStreams(info.session_id))).status == NewStreamsStatus.NO_NEW  # no metadata
        target.metadata(META_1)
        new = await v.ask(GetNewStreams(info.session_id))
        assert new.status == NewStreamsStatus.OK
        meta, data = new.streams
        assert meta.metadata and meta.channel == "metadata" and not data.metadata
        assert meta.ctf_trace_id == data.ctf_trace_id and data.channel == "channel0_0"
        assert data.path == target.rel
        assert await v.ask(GetNextIndex(data.stream_id)) == IndexReply(IndexStatus.RETRY)  # no packet yet
        assert await v.ask(GetMetadata(meta.stream_id)) == MetadataReply(MetadataStatus.OK, META_1.encode())
        assert await v.ask(GetMetadata(meta.stream_id)) == MetadataReply(MetadataStatus.NO_NEW)
        target.packet(100, 200, b"\1" * 16)
        target.metadata(META_2[:10])  # half a declaration: not served yet
        r = await v.ask(GetNextIndex(data.stream_id))
        assert (r.status, r.offset, r.packet_size, r.ts_begin, r.ts_end) == (IndexStatus.OK, 0, 100 * 8, 100, 200)
        assert r.flags == IndexFlag.NEW_METADATA
        assert await v.ask(GetMetadata(meta.stream_id)) == MetadataReply(MetadataStatus.NO_NEW)
        target.metadata(META_2[10:])
        assert await v.ask(GetMetadata(meta.stream_id)) == MetadataReply(
            MetadataStatus.OK, b"/* CTF 1.8 */\n" + META_2.encode())  # a later batch, parsed alone
        p = await v.ask(GetPacket(data.stream_id, 0, 100))
        assert p == PacketReply(PacketStatus.OK, target.packets[0])
        # Only what an index entry sent covers can be read.
        assert (await v.ask(GetPacket(data.stream_id, 0, 101))).status is PacketStatus.ERROR
        assert (await v.ask(GetPacket(data.stream_id, 100, 84))).status is PacketStatus.ERROR
        # Caught up: INACTIVE with the stream's time so far (a beacon).
        assert await v.ask(GetNextIndex(data.stream_id)) == IndexReply(IndexStatus.INACTIVE, ts_end=200)
        target.packet(200, 300)  # an empty beacon packet moves it on
        assert (await v.ask(GetNextIndex(data.stream_id))).ts_end == 300
        assert await v.ask(GetNextIndex(data.stream_id)) == IndexReply(IndexStatus.INACTIVE, ts_end=300)
        # Unknown ids.
        assert (await v.ask(GetNextIndex(999))).status is IndexStatus.ERROR
        assert (await v.ask(GetMetadata(data.stream_id))).status is MetadataStatus.ERROR
        assert (await v.ask(GetPacket(999, 0, 1))).status is PacketStatus.ERROR
        assert (await v.ask(AttachSession(999))).status == AttachStatus.UNKNOWN
        assert (await v.ask(AttachSession(info.session_id))).status == AttachStatus.ALREADY
        # A second stream (another CPU, another app): flagged on the next OK index.
        other = StreamFile(target.trace_dir, "channel0_1", flush_every=None)
        try:
            target.reg.stream_declared(target.session_dir, target.trace_dir, target.rel, "channel0_1", other.path,
                                       other.index_path, 0)
            target.packet(300, 400)
            r = await v.ask(GetNextIndex(data.stream_id))
            assert r.status is IndexStatus.OK and r.flags == IndexFlag.NEW_STREAM
            new = await v.ask(GetNewStreams(info.session_id))
            assert new.status == NewStreamsStatus.OK and [s.channel for s in new.streams] == ["channel0_1"]
            assert await v.ask(GetNextIndex(new.streams[0].stream_id)) == IndexReply(IndexStatus.RETRY)
        finally:
            other.close()
        # The target destroys the session: everything was read, so hang up.
        target.packet(400, 500)
        target.reg.session_closed(target.session_dir)
        assert (await v.ask(GetNextIndex(data.stream_id))).status is IndexStatus.OK
        assert (await v.ask(GetNextIndex(data.stream_id))).status is IndexStatus.HUP
        assert (await v.ask(GetNewStreams(info.session_id))).status == NewStreamsStatus.HUP
        assert target.reg.sessions  # kept while attached
        assert await v.ask(DetachSession(info.session_id)) == StatusReply(1, Command.DETACH_SESSION)
        assert not target.reg.sessions
        assert (await v.ask(ListSessions())).sessions == ()


async def test_two_viewers_read_the_same_session_independently(nursery, net, target):
    target.metadata(META_1)
    target.stream()
    target.packet(1, 2)
    port = await _serve(nursery, target.reg)
    with trio.fail_after(30):
        for _ in range(2):
            v = await net.viewer(port)
            (info,) = (await v.ask(ListSessions())).sessions
            a = await v.ask(AttachSession(info.session_id))
            assert a.status == AttachStatus.OK and len(a.streams) == 2
            assert (await v.ask(GetNextIndex(a.streams[1].stream_id))).status is IndexStatus.OK


async def _closed(stream: trio.SocketStream) -> bool:
    """Whether the relay closed the connection (reads until EOF)."""
    while True:
        try:
            data = await stream.receive_some(1 << 16)
        except trio.BrokenResourceError:
            return True
        if not data:
            return True


@pytest.mark.parametrize("junk", [
    encode_request(ListSessions()),  # before CONNECT
    struct.pack(">QII", 0, 77, 0),
    struct.pack(">QII", 2**50, 1, 0),
    encode_request(Connect(major=1)),
    encode_request(Connect()) + encode_request(Connect()),
])
async def test_junk_closes_that_connection_only(nursery, net, target, junk):
    target.metadata(META_1)
    port = await _serve(nursery, target.reg)
    with trio.fail_after(30):
        good = await net.viewer(port)
        bad = await net.connect(port)
        await bad.send_all(junk)
        assert await _closed(bad)
        assert len((await good.ask(ListSessions())).sessions) == 1


async def test_viewer_limits(nursery, net, target, autojump_clock):
    port = await _serve(nursery, target.reg, max_viewers=2, idle_timeout=60, connect_timeout=5, send_timeout=5)
    with trio.fail_after(300):
        a = await net.viewer(port)
        b = await net.viewer(port, connect=False)
        c = await net.connect(port)  # one too many
        assert await _closed(c)
        assert isinstance(await a.ask(ListSessions()), SessionsReply)
        # No CONNECT within connect_timeout: dropped; its place is free again.
        t0 = trio.current_time()
        assert await _closed(b.stream)
        assert 5 <= trio.current_time() - t0 < 60
        # Connected, then idle past idle_timeout: dropped.
        assert await _closed(a.stream)
        assert trio.current_time() - t0 >= 60
        d = await net.viewer(port)
        assert isinstance(await d.ask(ListSessions()), SessionsReply)


async def test_a_viewer_that_never_reads_is_dropped(nursery, net, target):
    # Real time (the replies are read from files in worker threads, which an
    # autojump clock would not wait for): a short send timeout.
    target.metadata(META_1)
    target.stream()
    target.packet(1, 2, b"\1" * (1 << 20))  # every GET_PACKET of it is a 1 MiB reply
    port = await _serve(nursery, target.reg, send_timeout=0.5, max_request=64)
    with trio.fail_after(60):
        v = await net.viewer(port)
        (info,) = (await v.ask(ListSessions())).sessions
        a = await v.ask(AttachSession(info.session_id))
        sid = a.streams[1].stream_id
        r = await v.ask(GetNextIndex(sid))
        assert r.status is IndexStatus.OK
        ask = encode_request(GetPacket(sid, 0, r.packet_size // 8))
        with trio.move_on_after(30):
            try:
                while True:  # asks again and again, never reads a reply
                    await v.stream.send_all(ask)
            except trio.BrokenResourceError:
                pass  # dropped
        assert await _closed(v.stream)
        assert not any(s.viewers for s in target.reg.sessions.values())  # detached when dropped


def test_relayd_live_port_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live port that cannot be bound is a startup failure (exit 3, one
    line); --live-listen off runs without one."""
    import logging
    import socket

    from click.testing import CliRunner

    from relayd.main import main as relayd_main

    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)
    runner = CliRunner()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = runner.invoke(relayd_main, ["--output", str(tmp_path / "out"), "--listen", "127.0.0.1:0",
                                        "--live-listen", f"127.0.0.1:{port}"])
    assert r.exit_code == 3, r.output
    assert f"tracewire-relayd: cannot listen for live viewers on 127.0.0.1:{port}" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(relayd_main, ["--output", str(tmp_path), "--live-listen", "of"])
    assert r.exit_code == 2 and "HOST:PORT" in r.output


async def test_live_allow_keeps_other_networks_out(nursery, net, target):
    import ipaddress

    target.metadata(META_1)
    with trio.fail_after(30):
        closed = await _serve(nursery, target.reg, allow=(ipaddress.ip_network("192.0.2.0/24"),))
        s = await net.connect(closed)
        await s.send_all(encode_request(Connect()))
        assert await _closed(s)
        open_ = await _serve(nursery, target.reg, allow=(ipaddress.ip_network("192.0.2.0/24"),
                                                         ipaddress.ip_network("127.0.0.0/8")))
        v = await net.viewer(open_)
        assert len((await v.ask(ListSessions())).sessions) == 1


def test_live_allow_flag_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from click.testing import CliRunner

    from relayd.main import main as relayd_main

    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)

    r = CliRunner().invoke(relayd_main, ["--output", str(tmp_path), "--live-allow", "10.0.0.0/33"])
    assert r.exit_code == 2 and "--live-allow" in r.output and "Traceback" not in r.output


def test_a_session_whose_target_vanished_ends_after_the_grace(target):
    reg = target.reg
    target.metadata(META_1)
    target.stream()
    (sess,) = reg.sessions.values()
    reg.attach(sess)
    reg.session_released(target.session_dir, 100.0)  # its connection broke
    reg.end_orphans(159.0, 60.0)
    assert not sess.ended
    # A reconnect within the grace keeps it going.
    reg.session_declared("tgt1", "s1", target.session_dir)
    reg.end_orphans(1000.0, 60.0)
    assert not sess.ended and list(reg.sessions.values()) == [sess]
    reg.session_released(target.session_dir, 1000.0)
    reg.end_orphans(1060.0, 60.0)
    assert sess.ended and all(st.closed for tr in sess.traces.values() for st in tr.streams)
    # The target comes back later: a new session for new viewers; the old
    # one stays readable by its viewer until it detaches.
    reg.session_declared("tgt1", "s1", target.session_dir)
    target.stream()
    new = [s for s in reg.sessions.values() if s is not sess]
    assert len(new) == 1 and not new[0].ended and new[0].session_id != sess.session_id
    assert sess.session_id in reg.sessions
    assert all(st.stream_id in reg.by_id for st in sess.traces[target.trace_dir].streams)
    reg.detach(sess)
    assert list(reg.sessions.values()) == new
