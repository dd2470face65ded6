"""Tests for relayd: a real relay on 127.0.0.1 driven by a wire.Connection
client sending real CTF packets; the output is read back with ctf.read_trace
and babeltrace2.  Hostile peers, auth, TLS, the key file and the CLI too.

Every async test runs under trio.fail_after(TIMEOUT) (trio_mode is on), or
fail_after_wall(TIMEOUT) when it runs on a MockClock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import cbor2
import pytest
import trio
import trio.testing
import trustme
import zstandard
from click.testing import CliRunner
from trio.testing import MockClock

from relayd import AuthKeyError, RelaydConfig, parse_auth_keys, serve_relayd
from relayd.main import main as relayd_main
from tracewire import ctf, wire
from tracewire.ctf import EventDecl, TraceInfo
from tracewire.wire import (
    FRAME_HEADER,
    MAGIC,
    Ack,
    Auth,
    Bye,
    Challenge,
    Codec,
    Connection,
    ConnectionClosed,
    Error,
    ErrorCode,
    Hello,
    Metadata,
    Packet,
    Role,
    SessionClose,
    SessionDecl,
    StreamClose,
    StreamDecl,
    StreamState,
    StreamStateRequest,
    Welcome,
)

from clocks import fail_after_wall

TIMEOUT = 60.0  # generous: a loaded 2-core machine starts Python slowly
BABELTRACE2 = shutil.which("babeltrace2")
TICK = EventDecl("demo:tick", 0, (("seq", ctf.FieldType.INT), ("msg", ctf.FieldType.STR)))
EVENTS_PER_PACKET = 5
CREATED = "20261129T101500"
OFFSET_NS = 1_700_000_000_000_000_000
SECRET_A = b"a" * 40
SECRET_B = b"b" * 40


# --------------------------------------------------------------------------
# Building traces
# --------------------------------------------------------------------------


class Trace:
    """One traced process with one channel: its metadata and packets."""

    def __init__(self, host: str, session: str = "s1", channel: str = "channel0", pad: int = 0) -> None:
        self.host = host
        self.pad = pad  # extra bytes per event, to make big packets
        self.session = session
        self.channel = channel
        self.uuid = uuid.uuid4().bytes
        info = TraceInfo(self.uuid, host, session, CREATED, "demo", 4242, OFFSET_NS, (channel,))
        self.metadata = (ctf.metadata_preamble(info) + ctf.metadata_event(TICK)).encode()
        self.trace_path = f"ust/pid/demo-4242-{CREATED}"

    def trace_dir(self, out: Path) -> Path:
        return out / self.host / f"{self.session}-{CREATED}" / self.trace_path

    def packet(self, n: int) -> bytes:
        """Packet n: events n*EPP .. n*EPP+EPP-1, timestamps increasing."""
        ts_begin = 1_000_000 + n * 1_000
        body, prev = b"", ts_begin
        for i in range(EVENTS_PER_PACKET):
            seq = n * EVENTS_PER_PACKET + i
            ts = ts_begin + 10 * i
            body += ctf.encode_event(0, ts, prev, [seq, f"m{seq}" + "x" * self.pad], TICK.fields)
            prev = ts
        header = ctf.pack_packet_header(self.uuid, 0, 0, ts_begin, ts_begin + 999, len(body), n, 0)
        return header + body


def packet_msg(stream_id: int, seq: int, raw: bytes, *, compress: bool = True) -> Packet:
    """A Packet message whose fields agree with the raw packet's header."""
    h = ctf.unpack_packet_header(raw)
    return Packet(
        stream_id, seq, Codec.ZSTD if compress else Codec.NONE, len(raw), h.timestamp_begin, h.timestamp_end,
        h.events_discarded, h.content_size, h.packet_size, h.packet_seq_num,
        wire.compress_packet(raw) if compress else raw,
    )


def raw_frame(fields: dict[str, object], payload: bytes = b"") -> bytes:
    """A frame built by hand, bypassing the message checks."""
    header = cbor2.dumps(fields)
    return FRAME_HEADER.pack(MAGIC, len(header), len(payload)) + header + payload


def event_seqs(out: Path) -> list[int]:
    return [e.fields["seq"] for e in ctf.read_trace(out) if isinstance(e, ctf.Event)]


async def babeltrace2_lines(path: Path) -> list[str]:
    """The events babeltrace2 prints for the trace(s) under path."""
    if BABELTRACE2 is None:
        pytest.skip("babeltrace2 is not installed")
    r = await trio.run_process([BABELTRACE2, str(path)], capture_stdout=True, capture_stderr=True, check=False)
    assert r.returncode == 0, r.stderr.decode()
    return [line for line in r.stdout.decode().splitlines() if "demo:tick" in line]


# --------------------------------------------------------------------------
# A relay and a client
# --------------------------------------------------------------------------


@asynccontextmanager
async def running_relay(output: Path, **options: object) -> AsyncIterator[int]:
    """Runs serve_relayd on 127.0.0.1; yields its port."""
    config = RelaydConfig(output=str(output), listen_host="127.0.0.1", listen_port=0, **options)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_relayd, config)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


class Client:
    """A consumer built on wire.Connection(Role.CONSUMER)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = Connection(Role.CONSUMER)
        self.acks: dict[int, int] = {}

    @classmethod
    async def connect(cls, port: int, tls: ssl.SSLContext | None = None) -> Client:
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_hostname="localhost")
        return cls(stream)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def send(self, msg: wire.Message) -> None:
        for part in self.conn.send_parts(msg):
            await self.stream.send_all(part)

    async def recv(self) -> wire.Event:
        """The next message from the relay (ConnectionClosed at EOF)."""
        while (event := self.conn.next_event()) is None:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.conn.receive_data(data)
        return event

    async def recv_data(self) -> wire.Event:
        """Like recv, but records Acks and returns the first other message."""
        while isinstance(event := await self.recv(), Ack):
            self.acks[event.stream_id] = event.seq
        return event

    async def handshake(self, hostname: str, key: tuple[str, bytes] | None = None) -> wire.Event:
        """Hello [Challenge Auth]; returns the relay's last answer."""
        await self.send(Hello(1, hostname, key[0] if key else None))
        reply = await self.recv()
        if key is not None and isinstance(reply, Challenge):
            await self.send(Auth(wire.compute_auth_mac(key[1], reply.nonce, hostname, key[0])))
            reply = await self.recv()
        return reply

    async def wait_ack(self, stream_id: int, seq: int) -> None:
        while self.acks.get(stream_id, -1) < seq:
            event = await self.recv()
            if not isinstance(event, Ack):
                raise AssertionError(f"expected Ack({stream_id}, {seq}), got {event!r}")
            self.acks[event.stream_id] = event.seq

    async def expect_error(self) -> Error:
        """Reads (skipping acks) until the relay's Error; then EOF must follow.
        Closes the client."""
        try:
            event = await self.recv_data()
            assert isinstance(event, Error), event
            assert isinstance(await self.recv(), ConnectionClosed)
            return event
        finally:
            await self.aclose()

    async def open_stream(self, trace: Trace, *, session_id: int = 1, stream_id: int = 1) -> None:
        await self.send(SessionDecl(session_id, trace.session, CREATED, False))
        await self.send(Metadata(session_id, trace.trace_path, 0, trace.metadata))
        await self.send(StreamDecl(stream_id, session_id, trace.trace_path, trace.channel, 0))

    async def stream_state(self, stream_id: int) -> int:
        await self.send(StreamStateRequest(stream_id))
        event = await self.recv_data()
        assert isinstance(event, StreamState) and event.stream_id == stream_id, event
        return event.next_seq

    async def bye(self) -> None:
        await self.send(Bye())
        assert isinstance(await self.recv_data(), Bye)
        await self.aclose()


async def send_trace(
    port: int, trace: Trace, packets: range, *, tls: ssl.SSLContext | None = None,
    key: tuple[str, bytes] | None = None, pause: float = 0.0,
) -> None:
    """A well-behaved consumer: handshake, declarations, packets (zstd and raw
    alternately), acks, orderly close."""
    c = await Client.connect(port, tls)
    assert isinstance(await c.handshake(trace.host, key), Welcome)
    await c.open_stream(trace)
    assert await c.stream_state(1) == packets.start
    for n in packets:
        await c.send(packet_msg(1, n, trace.packet(n), compress=n % 2 == 0))
        await trio.sleep(pause)
    await c.wait_ack(1, packets[-1])
    assert c.acks[1] == packets[-1]
    await c.send(StreamClose(1))
    await c.send(SessionClose(1))
    await c.bye()


def expected_seqs(packets: range) -> list[int]:
    return list(range(packets.start * EVENTS_PER_PACKET, packets.stop * EVENTS_PER_PACKET))




# --------------------------------------------------------------------------
# Normal operation
# --------------------------------------------------------------------------


async def test_trace_written_acked_and_readable(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        trace = Trace("host-a", pad=30_000)  # 150 kB packets, over the inline limit set here:
        async with running_relay(out, inline_decompress_max=64 * 1024) as port:  # in a thread
            await send_trace(port, trace, range(8))
        tdir = trace.trace_dir(out)
        assert sorted(os.listdir(tdir)) == ["channel0_0", "index", "metadata"]
        assert (tdir / "metadata").read_bytes() == trace.metadata
        assert (tdir / "channel0_0").read_bytes() == b"".join(trace.packet(n) for n in range(8))
        entries = ctf.read_index((tdir / "index" / "channel0_0.idx").read_bytes())
        assert [e.packet_seq_num for e in entries] == list(range(8))
        assert event_seqs(out) == expected_seqs(range(8))
        lines = await babeltrace2_lines(out)
        assert len(lines) == 8 * EVENTS_PER_PACKET
        assert "seq = 39" in lines[-1]
        assert len(lines[-1]) > 30_000


@pytest.mark.parametrize("fsync", [False, True])
async def test_many_targets_at_once(tmp_path: Path, fsync: bool) -> None:
    """32 consumers at once, with packets over 64 KiB (received straight into
    their own buffers, which are then reused): every trace is complete."""
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        traces = [Trace(f"host-{i}", pad=14_000) for i in range(32)]  # ~70 kB packets
        synced: list[int] = []
        async with running_relay(out, fsync=fsync, fsync_interval=0.01, fdatasync=synced.append) as port:
            async with trio.open_nursery() as nursery:
                for t in traces:
                    nursery.start_soon(partial(send_trace, port, t, range(6), pause=0.001))
        for t in traces:
            assert event_seqs(t.trace_dir(out)) == expected_seqs(range(6))
            assert (t.trace_dir(out) / "channel0_0").read_bytes() == b"".join(t.packet(n) for n in range(6))
        assert bool(synced) == fsync


async def test_two_hosts_at_once(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        a, b = Trace("host-a"), Trace("host-b")
        async with running_relay(out) as port:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: send_trace(port, a, range(20), pause=0.001))
                nursery.start_soon(lambda: send_trace(port, b, range(15), pause=0.001))
        assert sorted(os.listdir(out)) == ["host-a", "host-b"]
        assert event_seqs(a.trace_dir(out)) == expected_seqs(range(20))
        assert event_seqs(b.trace_dir(out)) == expected_seqs(range(15))
        assert len(await babeltrace2_lines(a.trace_dir(out))) == 20 * EVENTS_PER_PACKET


async def test_resend_after_reconnect_and_relay_restart(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        t = Trace("host-a")
        async with running_relay(out) as port:
            # First connection: half the metadata, 5 packets, then it dies.
            c = await Client.connect(port)
            assert isinstance(await c.handshake(t.host), Welcome)
            await c.send(SessionDecl(1, t.session, CREATED, False))
            half = len(t.metadata) // 2
            await c.send(Metadata(1, t.trace_path, 0, t.metadata[:half]))
            await c.send(StreamDecl(1, 1, t.trace_path, t.channel, 0))
            for n in range(5):
                await c.send(packet_msg(1, n, t.packet(n)))
            await c.wait_ack(1, 4)
            await c.aclose()

            # Second connection resends from where it thinks it stands.
            c = await Client.connect(port)
            assert isinstance(await c.handshake(t.host), Welcome)
            await c.send(SessionDecl(7, t.session, CREATED, False))
            await c.send(Metadata(7, t.trace_path, 0, t.metadata))  # overlaps: idempotent
            await c.send(StreamDecl(3, 7, t.trace_path, t.channel, 0))
            assert await c.stream_state(3) == 5
            for n in range(3, 10):  # 3 and 4 are duplicates
                await c.send(packet_msg(3, n, t.packet(n), compress=False))
            await c.wait_ack(3, 9)
            await c.bye()

        async with running_relay(out) as port:  # a restarted relay recovers
            c = await Client.connect(port)
            assert isinstance(await c.handshake(t.host), Welcome)
            await c.open_stream(t)
            assert await c.stream_state(1) == 10
            await c.send(packet_msg(1, 10, t.packet(10)))
            await c.wait_ack(1, 10)
            await c.bye()

        assert (t.trace_dir(out) / "metadata").read_bytes() == t.metadata
        assert event_seqs(out) == expected_seqs(range(11))
        assert len(await babeltrace2_lines(out)) == 11 * EVENTS_PER_PACKET


async def test_duplicate_is_acked_not_written(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        t = Trace("host-a")
        async with running_relay(out) as port:
            await send_trace(port, t, range(3))
            c = await Client.connect(port)
            await c.handshake(t.host)
            await c.open_stream(t)
            await c.send(packet_msg(1, 1, t.packet(1)))
            await c.wait_ack(1, 2)  # the ack says what the relay holds
            await c.bye()
        assert event_seqs(out) == expected_seqs(range(3))


async def test_client_killed_mid_frame(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        dead, good = Trace("host-dead"), Trace("host-good")
        async with running_relay(out) as port:
            c = await Client.connect(port)
            await c.handshake(dead.host)
            await c.open_stream(dead)
            for n in range(3):
                await c.send(packet_msg(1, n, dead.packet(n), compress=False))
            await c.wait_ack(1, 2)  # three whole packets are written
            frame = b"".join(bytes(p) for p in c.conn.send_parts(packet_msg(1, 3, dead.packet(3), compress=False)))
            await c.stream.send_all(frame[: len(frame) // 2])
            # Killed: its kernel resets the connection (SO_LINGER 0: RST, no FIN).
            assert isinstance(c.stream, trio.SocketStream)
            c.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await c.aclose()
            await send_trace(port, good, range(4))  # the relay carries on
        assert event_seqs(dead.trace_dir(out)) == expected_seqs(range(3))
        assert len(await babeltrace2_lines(dead.trace_dir(out))) == 3 * EVENTS_PER_PACKET
        assert event_seqs(good.trace_dir(out)) == expected_seqs(range(4))


async def test_stream_taken_over_by_new_connection(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        t = Trace("host-a")
        async with running_relay(out) as port:
            old = await Client.connect(port)
            await old.handshake(t.host)
            await old.open_stream(t)
            for n in range(2):
                await old.send(packet_msg(1, n, t.packet(n)))
            await old.wait_ack(1, 1)
            new = await Client.connect(port)
            await new.handshake(t.host)
            await new.open_stream(t)
            assert await new.stream_state(1) == 2
            await new.send(packet_msg(1, 2, t.packet(2)))
            await new.wait_ack(1, 2)
            await old.send(packet_msg(1, 2, t.packet(2)))  # stale owner
            assert (await old.expect_error()).code == ErrorCode.BAD_STATE
            await new.send(packet_msg(1, 3, t.packet(3)))
            await new.wait_ack(1, 3)
            await new.bye()
        assert event_seqs(out) == expected_seqs(range(4))


async def _send_until_closed(c: Client, trace: Trace) -> None:
    """Sends stream 1's packets 0, 1, 2... as fast as the relay takes them,
    until it closes the connection (its Error may fail the client's core
    before the socket does)."""
    n = 0
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, wire.LocalProtocolError):
        while True:
            await c.send(packet_msg(1, n, trace.packet(n), compress=False))
            n += 1


@pytest.mark.parametrize("fsync", [False, True])
async def test_stream_taken_over_while_its_owner_streams(tmp_path: Path, fsync: bool) -> None:
    """A new connection takes a stream over while the old one still sends
    packets as fast as it can (the old connection's I/O thread is then in a
    packet run, which holds the stream's writer): the takeover waits for the
    write under way, the old connection's next packet is refused, and the
    file holds every packet once, in order."""
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        t = Trace("host-a")
        async with running_relay(out, fsync=fsync, fsync_interval=0.01) as port:
            old = await _established(port, t.host, t)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_until_closed, old, t)
                await old.wait_ack(1, 50)
                new = await _established(port, t.host, t)
                taken = await new.stream_state(1)
                assert taken > 50
                error = await old.recv_data()  # (not expect_error: the sender may fail the client's core first)
                assert isinstance(error, Error) and error.code == ErrorCode.BAD_STATE, error
                await old.aclose()
            for n in range(taken, taken + 5):
                await new.send(packet_msg(1, n, t.packet(n)))
            await new.wait_ack(1, taken + 4)
            await new.bye()
        assert event_seqs(out) == expected_seqs(range(taken + 5))


async def test_takeover_waits_for_the_sync_a_packet_run_is_in(tmp_path: Path) -> None:
    """fsync mode: the old owner's I/O thread is stuck in the fdatasync of a
    packet run when a new connection takes the stream over.  The takeover
    waits for it (the stream's writer is held during the whole run), so the
    packet that sync makes durable is the new owner's starting point, and
    the file holds every packet once."""
    stuck, release = threading.Event(), threading.Event()
    hold: list[bool] = [False]

    def fdatasync(fd: int) -> None:
        if hold[0]:
            hold[0] = False
            stuck.set()
            release.wait(TIMEOUT)

    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        t = Trace("host-a")
        async with running_relay(out, fsync=True, fsync_interval=0.01, fdatasync=fdatasync) as port:
            old = await Client.connect(port)
            await old.handshake(t.host)
            await old.open_stream(t)
            for n in range(3):
                await old.send(packet_msg(1, n, t.packet(n), compress=False))
            await old.wait_ack(1, 2)
            hold[0] = True
            await old.send(packet_msg(1, 3, t.packet(3), compress=False))
            await trio.to_thread.run_sync(stuck.wait, TIMEOUT)
            new = await Client.connect(port)
            await new.handshake(t.host)
            await new.open_stream(t)
            await new.send(StreamStateRequest(1))
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the takeover is under way: it waits
            release.set()
            event = await new.recv_data()
            assert isinstance(event, StreamState) and event.next_seq == 4, event
            await new.send(packet_msg(1, 4, t.packet(4)))
            await new.wait_ack(1, 4)
            await new.bye()
            await old.aclose()
        assert event_seqs(out) == expected_seqs(range(5))


async def test_drain_while_a_consumer_streams(tmp_path: Path) -> None:
    """The relay drains while a consumer sends packets as fast as it can
    (its connection's I/O thread in a packet run): what the relay took is
    written and acknowledged before Error(RETRY), the file holds exactly
    that, and serve_relayd returns."""
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        t = Trace("host-a")
        config = RelaydConfig(output=str(out), listen_host="127.0.0.1", listen_port=0)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_relayd, config)
            c = await _established(listeners[0].socket.getsockname()[1], t.host, t)
            nursery.start_soon(_send_until_closed, c, t)
            await c.wait_ack(1, 50)
            listeners.server.request_drain()
            error = await c.recv_data()
            assert isinstance(error, Error) and error.code == ErrorCode.RETRY, error
            await c.aclose()
        assert c.acks[1] > 50
        assert event_seqs(out) == expected_seqs(range(c.acks[1] + 1))


async def test_a_consumer_that_reads_no_acks_does_not_hold_the_relays_shutdown(tmp_path: Path) -> None:
    """A consumer sends packets and never reads the relay's Acks.  Once its
    socket is full, a packet run leaves the rest of its Acks to the event
    loop, whose send can be cancelled: cancelling the relay (a second
    SIGTERM, the end of a drain's time) ends it at once, not after
    idle_timeout (here far longer than the test's own limit)."""
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        t = Trace("host-a")
        async with trio.open_nursery() as nursery:
            async with running_relay(out, idle_timeout=10 * TIMEOUT) as port:
                sock = trio.socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
                await sock.connect(("127.0.0.1", port))
                c = Client(trio.SocketStream(sock))
                assert isinstance(await c.handshake(t.host), Welcome)
                await c.open_stream(t)
                nursery.start_soon(_send_until_closed, c, t)  # and never reads
                # Both sides stuck: the consumer in its send, the relay in its Acks'.
                await trio.testing.wait_all_tasks_blocked(cushion=0.2)
            nursery.cancel_scope.cancel()
        await c.aclose()
        assert event_seqs(out)  # packets went through before it stuck


async def test_tls(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        ca = trustme.CA()
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost").configure_cert(server_ctx)
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        out = tmp_path / "out"
        t = Trace("host-tls")
        async with running_relay(out, tls=server_ctx) as port:
            await send_trace(port, t, range(5), tls=client_ctx)
            # A plain-TCP peer on the TLS port gets nowhere and writes nothing.
            plain = await trio.open_tcp_stream("127.0.0.1", port)
            await plain.send_all(wire.encode(Hello(1, "host-plain")))
            reply = b""
            with contextlib.suppress(trio.BrokenResourceError):
                while data := await plain.receive_some():
                    reply += data
            assert MAGIC.to_bytes(4, "big") not in reply
            await plain.aclose()
        assert os.listdir(out) == ["host-tls"]
        assert event_seqs(out) == expected_seqs(range(5))


# --------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------

AUTH_KEYS = {"key-a": (SECRET_A, ("host-a",)), "key-any": (SECRET_B, ("*",))}


@pytest.mark.parametrize(
    ("hostname", "key", "code"),
    [
        ("host-a", ("key-a", SECRET_B), ErrorCode.AUTH_FAILED),  # wrong secret
        ("host-a", ("key-nope", SECRET_A), ErrorCode.AUTH_FAILED),  # unknown key id
        ("host-a", None, ErrorCode.AUTH_FAILED),  # no key at all
        ("host-b", ("key-a", SECRET_A), ErrorCode.FORBIDDEN),  # another key's host
    ],
)
async def test_auth_refused_writes_nothing(
    tmp_path: Path, hostname: str, key: tuple[str, bytes] | None, code: ErrorCode
) -> None:
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        async with running_relay(out, auth_keys=AUTH_KEYS) as port:
            c = await Client.connect(port)
            reply = await c.handshake(hostname, key)
            assert isinstance(reply, Error) and reply.code == code, reply
            assert isinstance(await c.recv(), ConnectionClosed)
            await c.aclose()
        assert os.listdir(out) == []


async def test_auth_accepted(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        async with running_relay(out, auth_keys=AUTH_KEYS) as port:
            await send_trace(port, Trace("host-a"), range(3), key=("key-a", SECRET_A))
            await send_trace(port, Trace("host-z"), range(2), key=("key-any", SECRET_B))
        assert sorted(os.listdir(out)) == ["host-a", "host-z"]
        assert len(event_seqs(out)) == 5 * EVENTS_PER_PACKET


# --------------------------------------------------------------------------
# Hostile peers
# --------------------------------------------------------------------------


async def _established(port: int, host: str, trace: Trace | None = None) -> Client:
    c = await Client.connect(port)
    assert isinstance(await c.handshake(host), Welcome)
    if trace is not None:
        await c.open_stream(trace)
    return c


async def _expect_code(c: Client, code: ErrorCode) -> None:
    assert (await c.expect_error()).code == code


class TimeGate:
    """Says when the hostile-peer test may let (MockClock) time pass.

    That test runs on a MockClock that moves only when the test jumps it, so
    the relay's short timeouts cannot drop the good client however loaded the
    machine is.  A hostile peer that waits to be timed out opens the gate
    (``with gate.open():``); while it is open, the good client jumps the
    clock by less than the relay's idle timeout, each time right after a
    round trip with the relay (which then waits on the good connection since
    the current time at the earliest).  ``done``: the hostile peer is
    through."""

    def __init__(self) -> None:
        self.is_open = False
        self.done = False
        self._changed = trio.Event()

    def _change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        self.is_open = True
        self._change()
        try:
            yield
        finally:
            self.is_open = False
            self._change()

    def finish(self) -> None:
        self.done = True
        self._change()

    async def wait_change(self) -> None:
        await self._changed.wait()


async def hostile_random_bytes(port: int, out: Path, gate: TimeGate) -> None:
    c = await Client.connect(port)
    await c.stream.send_all(random.Random(1).randbytes(3000))
    await _expect_code(c, ErrorCode.PROTOCOL)


async def hostile_huge_frame(port: int, out: Path, gate: TimeGate) -> None:
    c = await Client.connect(port)
    await c.stream.send_all(FRAME_HEADER.pack(MAGIC, 20, 2**31))
    await _expect_code(c, ErrorCode.FRAME_TOO_LARGE)


async def hostile_junk_cbor(port: int, out: Path, gate: TimeGate) -> None:
    c = await Client.connect(port)
    await c.stream.send_all(FRAME_HEADER.pack(MAGIC, 6, 0) + b"\xff\xfe\x1f\xbf\x00\x9b")
    await _expect_code(c, ErrorCode.PROTOCOL)


async def hostile_zstd_bomb(port: int, out: Path, gate: TimeGate) -> None:
    t = Trace("host-bomb")
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(8 << 20))  # declares 8 MiB
    raw = t.packet(0)
    c = await _established(port, t.host, t)
    # raw_len says one small packet, the frame declares 8 MiB
    await c.send(dataclasses.replace(packet_msg(1, 0, raw), data=bomb))
    await _expect_code(c, ErrorCode.DECOMPRESS)
    c = await _established(port, t.host, t)  # honest about its 8 MiB, over max_raw_packet
    await c.send(Packet(1, 0, Codec.ZSTD, 8 << 20, 0, 0, 0, 8 << 23, 8 << 23, 0, bomb))
    await _expect_code(c, ErrorCode.DECOMPRESS)


async def hostile_names(port: int, out: Path, gate: TimeGate) -> None:
    for host in ("../evil", "a/b", "..", ".hidden"):
        c = await Client.connect(port)
        await c.stream.send_all(raw_frame({"t": 1, "v": 1, "h": host, "k": None}))
        await _expect_code(c, ErrorCode.BAD_NAME)
    for name in ("..", "../../evil", "x/y"):
        c = await _established(port, "host-names")
        await c.stream.send_all(raw_frame({"t": 5, "s": 1, "nm": name, "c": CREATED, "l": False}))
        await _expect_code(c, ErrorCode.BAD_NAME)
    for path, channel in (("../../../../evil", "ch"), ("/tmp/evil", "ch"), ("a/../b", "ch"), ("a", "../ch")):
        c = await _established(port, "host-names")
        await c.send(SessionDecl(1, "s", CREATED, False))
        decl = {"t": 6, "i": 1, "s": 1, "p": path, "ch": channel, "x": 0, "fs": None, "fc": None}
        await c.stream.send_all(raw_frame(decl))
        await _expect_code(c, ErrorCode.BAD_NAME)


async def hostile_bad_packets(port: int, out: Path, gate: TimeGate) -> None:
    t = Trace("host-badpkt")
    raw = t.packet(0)
    bad_magic = b"\0\0\0\0" + raw[4:]
    c = await _established(port, t.host, t)
    await c.send(packet_msg(1, 0, bad_magic, compress=False))
    await _expect_code(c, ErrorCode.PROTOCOL)
    c = await _established(port, t.host, t)  # header and message disagree
    good = packet_msg(1, 0, raw)
    await c.send(dataclasses.replace(good, ts_end=good.ts_end + 1))
    await _expect_code(c, ErrorCode.PROTOCOL)
    c = await _established(port, t.host, t)  # a gap
    await c.send(packet_msg(1, 1, t.packet(1)))
    await _expect_code(c, ErrorCode.PROTOCOL)
    c = await _established(port, t.host, t)  # metadata past the end
    await c.send(Metadata(1, t.trace_path, len(t.metadata) + 1, b"x"))
    await _expect_code(c, ErrorCode.PROTOCOL)
    c = await _established(port, t.host, t)  # metadata rewriting what is there
    await c.send(Metadata(1, t.trace_path, 10, b"different"))
    await _expect_code(c, ErrorCode.PROTOCOL)
    assert (t.trace_dir(out) / "metadata").read_bytes() == t.metadata
    assert (t.trace_dir(out) / "channel0_0").stat().st_size == 0  # no bad packet written


async def hostile_stalls(port: int, out: Path, gate: TimeGate) -> None:
    c = await Client.connect(port)  # never says Hello
    with gate.open():
        await _expect_code(c, ErrorCode.TIMEOUT)
    c = await _established(port, "host-stall")  # (the clock stands still meanwhile)
    await c.stream.send_all(raw_frame({"t": 14})[:7])  # stops mid-frame
    with gate.open():
        await _expect_code(c, ErrorCode.TIMEOUT)


Hostile = Callable[[int, Path, TimeGate], Awaitable[None]]


@pytest.mark.parametrize(
    "hostile",
    [hostile_random_bytes, hostile_huge_frame, hostile_junk_cbor, hostile_zstd_bomb, hostile_names,
     hostile_bad_packets, hostile_stalls],
)
async def test_hostile_peer_dropped_others_carry_on(tmp_path: Path, hostile: Hostile, mock_clock: MockClock) -> None:
    """A hostile peer gets its Error and is dropped; a good client connected
    all along carries on.  The relay's timeouts are short, for the stalling
    peers; time is a MockClock's that moves only while a hostile peer waits
    to be timed out (see TimeGate), so the good client never is."""
    with fail_after_wall(TIMEOUT):
        out = tmp_path / "out"
        good = Trace("host-good")
        idle_timeout = 0.5
        options = {"handshake_timeout": 1.0, "idle_timeout": idle_timeout, "max_raw_packet": 1 << 20}
        gate = TimeGate()

        async def run_hostile() -> None:
            try:
                await hostile(port, out, gate)
            finally:
                gate.finish()

        async with running_relay(out, **options) as port:
            c = await _established(port, good.host, good)
            assert await c.stream_state(1) == 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_hostile)
                n = 0
                while n < 40 or not gate.done:
                    if n < 40:  # packets, zstd and raw alternately, each acked
                        await c.send(packet_msg(1, n, good.packet(n), compress=n % 2 == 0))
                        await c.wait_ack(1, n)
                        n += 1
                    elif gate.is_open:  # all sent; a round trip before each jump
                        assert await c.stream_state(1) == 40
                    else:
                        await gate.wait_change()
                        continue
                    if gate.is_open:
                        mock_clock.jump(idle_timeout / 2)
            assert c.acks[1] == 39
            await c.send(StreamClose(1))
            await c.send(SessionClose(1))
            await c.bye()
        assert event_seqs(good.trace_dir(out)) == expected_seqs(range(40))
        assert os.listdir(tmp_path) == ["out"]  # nothing escaped the output directory
        for _dirpath, dirnames, filenames in os.walk(out):
            for name in dirnames + filenames:
                assert "evil" not in name and not name.startswith(".")


async def test_symlink_out_of_output_refused(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
        out.mkdir()
        elsewhere.mkdir()
        (out / "host-link").symlink_to(elsewhere)
        t = Trace("host-link")
        async with running_relay(out) as port:
            c = await _established(port, t.host)
            await c.send(SessionDecl(1, t.session, CREATED, False))
            error = await c.expect_error()
            assert error.code == ErrorCode.BAD_NAME and "outside the output directory" in error.text
        assert os.listdir(elsewhere) == []


# --------------------------------------------------------------------------
# Key file and command line
# --------------------------------------------------------------------------


def _key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "keys"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_parse_auth_keys(tmp_path: Path) -> None:
    secret = "s" * 32
    path = _key_file(tmp_path, f"# relay keys\n\nk1 {secret} host-a host-b  # two hosts\nk2 {secret}#x *\n")
    assert parse_auth_keys(path) == {
        "k1": (secret.encode(), ("host-a", "host-b")),
        "k2": ((secret + "#x").encode(), ("*",)),
    }


@pytest.mark.parametrize(
    ("text", "mode", "match"),
    [
        (f"k1 {'s' * 32} h\n", 0o640, "accessible by group or others"),
        (f"k1 {'s' * 32} h\n", 0o604, "accessible by group or others"),
        (f"k1 {'s' * 31} h\n", 0o600, r"keys:1: secret .* shorter than 32"),
        (f"# c\nk1 {'s' * 32}\n", 0o600, r"keys:2: expected 'KEY_ID SECRET HOST\.\.\.'"),
        (f"k1 {'s' * 32} h\nk1 {'t' * 32} h\n", 0o600, "appears twice"),
        (f"k1 {'s' * 32} ../h\n", 0o600, "host"),
        ("# nothing\n", 0o600, "holds no key"),
    ],
)
def test_parse_auth_keys_refuses(tmp_path: Path, text: str, mode: int, match: str) -> None:
    with pytest.raises(AuthKeyError, match=match):
        parse_auth_keys(_key_file(tmp_path, text, mode))


def test_cli_startup_failures_exit_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # keep the root logger as pytest set it
    runner = CliRunner()
    keys = _key_file(tmp_path, f"k1 {'s' * 32} h\n", 0o644)
    r = runner.invoke(relayd_main, ["--output", str(tmp_path / "out"), "--auth-keys", str(keys)])
    assert r.exit_code == 3 and "tracewire-relayd: auth key file" in r.output and "Traceback" not in r.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = runner.invoke(relayd_main, ["--output", str(tmp_path / "out"), "--listen", f"127.0.0.1:{port}"])
    assert r.exit_code == 3 and "tracewire-relayd: cannot listen on 127.0.0.1" in r.output, r.output
    (tmp_path / "file").write_text("")
    r = runner.invoke(relayd_main, ["--output", str(tmp_path / "file" / "out"), "--listen", "127.0.0.1:0"])
    assert r.exit_code == 3 and "tracewire-relayd: cannot create output directory" in r.output, r.output
    r = runner.invoke(relayd_main, ["--output", str(tmp_path), "--listen", "nonsense"])
    assert r.exit_code == 2 and "HOST:PORT" in r.output


def test_cli_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relayd", "--output", str(out), "--listen", "127.0.0.1:0", "--live-listen", "off",
         "--log-level", "warning"],
        # Unbuffered: select() must see every line still to read (a buffered
        # reader could hold "listening on" behind the warning it read first).
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, bufsize=0,
    )
    try:
        assert proc.stderr is not None
        line = ""
        while "listening on" not in line:
            ready, _, _ = select.select([proc.stderr], [], [], TIMEOUT)
            assert ready, "relayd did not start"
            line = proc.stderr.readline().decode()
            assert line, "relayd exited early"
        assert f", writing to {out}" in line
        port = int(line.split("listening on 127.0.0.1:")[1].split(",")[0])
        t = Trace("host-cli")
        trio.run(lambda: send_trace(port, t, range(3)))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert b"Traceback" not in proc.stderr.read()
        assert event_seqs(out) == expected_seqs(range(3))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


# --------------------------------------------------------------------------
# Trace chunks (rotation)
# --------------------------------------------------------------------------


async def _chunk_client(port: int, t: Trace, version: int = 2) -> Client:
    c = await Client.connect(port)
    await c.send(Hello(version, t.host))
    assert isinstance(await c.recv(), Welcome)
    await c.send(SessionDecl(1, t.session, CREATED, False))
    return c


async def test_chunk_close_moves_the_chunk_once_even_when_resent_after_a_restart(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        t = Trace("host-a")
        sdir = out / t.host / f"{t.session}-{CREATED}"
        target = "archives/20261202T101500+0000-20261202T101600+0000-0/ust"
        async with running_relay(out) as port:
            c = await _chunk_client(port, t)
            await c.send(Metadata(1, t.trace_path, 0, t.metadata))
            await c.send(StreamDecl(1, 1, t.trace_path, t.channel, 0))
            for n in range(3):
                await c.send(packet_msg(1, n, t.packet(n)))
            await c.wait_ack(1, 2)
            # The stream is not closed first: the relay closes its files itself.
            await c.send(wire.ChunkClose(1, "ust", target))
            assert await c.recv_data() == wire.ChunkClosed(1, target)
            # The next chunk goes on in its own directory, on the same connection.
            nxt = "active-chunk-1/" + t.trace_path
            await c.send(Metadata(1, nxt, 0, t.metadata))
            await c.send(StreamDecl(2, 1, nxt, t.channel, 0))
            assert await c.stream_state(2) == 0
            await c.send(packet_msg(2, 0, t.packet(3)))
            await c.wait_ack(2, 0)
            await c.aclose()
        async with running_relay(out) as port:  # restarted: the answer was lost, the consumer asks again
            c = await _chunk_client(port, t)
            await c.send(wire.ChunkClose(1, "ust", target))
            assert await c.recv_data() == wire.ChunkClosed(1, target)
            await c.bye()
        assert sorted(os.listdir(sdir)) == ["active-chunk-1", "archives"]
        assert event_seqs(sdir / target) == expected_seqs(range(3))
        assert event_seqs(sdir / "active-chunk-1") == expected_seqs(range(3, 4))
        if BABELTRACE2:
            assert len(await babeltrace2_lines(sdir / target)) == 3 * EVENTS_PER_PACKET


async def test_chunk_close_removes_the_emptied_chunk_directory(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        t = Trace("host-a")
        sdir = out / t.host / f"{t.session}-{CREATED}"
        async with running_relay(out) as port:
            c = await _chunk_client(port, t)
            path = "active-chunk-3/" + t.trace_path
            await c.send(Metadata(1, path, 0, t.metadata))
            await c.send(StreamDecl(1, 1, path, t.channel, 0))
            await c.send(packet_msg(1, 0, t.packet(0)))
            await c.wait_ack(1, 0)
            await c.send(StreamClose(1))
            await c.send(wire.ChunkClose(1, "active-chunk-3/ust", "archives/a-b-3/ust"))
            assert await c.recv_data() == wire.ChunkClosed(1, "archives/a-b-3/ust")
            await c.bye()
        assert os.listdir(sdir) == ["archives"]
        assert event_seqs(sdir / "archives" / "a-b-3") == expected_seqs(range(1))


@pytest.mark.parametrize(("source", "target", "code", "match"), [
    ("ust", "ust/inside", ErrorCode.PROTOCOL, "overlaps"),
    ("archives/x", "archives", ErrorCode.PROTOCOL, "overlaps"),
    ("ust", "ust", ErrorCode.PROTOCOL, "overlaps"),
])
async def test_chunk_close_refusals(tmp_path: Path, source: str, target: str, code: ErrorCode, match: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_relay(tmp_path / "out") as port:
            c = await _chunk_client(port, Trace("host-a"))
            await c.send(wire.ChunkClose(1, source, target))
            err = await c.expect_error()
            assert err.code == code and match in err.text, err


async def test_chunk_close_onto_an_existing_archive_is_refused(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        out = tmp_path / "out"
        t = Trace("host-a")
        sdir = out / t.host / f"{t.session}-{CREATED}"
        (sdir / "ust").mkdir(parents=True)
        (sdir / "archives" / "a-b-0" / "ust").mkdir(parents=True)
        async with running_relay(out) as port:
            c = await _chunk_client(port, t)
            await c.send(wire.ChunkClose(1, "ust", "archives/a-b-0/ust"))
            err = await c.expect_error()
            assert err.code == ErrorCode.PROTOCOL and "exists already" in err.text, err
        assert (sdir / "ust").is_dir()  # nothing moved


async def test_chunk_close_needs_protocol_2(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_relay(tmp_path / "out") as port:
            c = await _chunk_client(port, Trace("host-a"), version=1)
            c.conn = Connection(Role.CONSUMER)  # a v1 peer that sends it anyway, bytes as they are
            await c.stream.send_all(wire.encode(wire.ChunkClose(1, "ust", "archives/x/ust")))
            raw = b""
            with trio.move_on_after(TIMEOUT / 2):
                while chunk := await c.stream.receive_some(65536):
                    raw += chunk
            await c.aclose()
            d = wire.FrameDecoder()
            d.receive_data(raw)
            err = d.next_event()
            assert isinstance(err, Error) and err.code == ErrorCode.BAD_STATE and "needs protocol 2" in err.text
