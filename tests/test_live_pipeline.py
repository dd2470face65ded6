"""A live session in process: consumerd (serve_consumerd, a hand-written
ring) streaming to serve_relayd with a live port, read by a viewer speaking
tracewire.live.  Covers what the subprocess tests cannot pin down: the
beacons' times (consumerd's clock is injected), StreamClose and
SessionClose reaching the viewer as HUP."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from liveview import Viewer
from test_consumerd import CREATED, HOST, SESSION, SPEC, TRACE_PATH, TRACE_UUID, Client, Ring, metadata_text

from consumerd.daemon import ConsumerdConfig, serve_consumerd
from relayd.daemon import RelaydConfig, serve_relayd
from relayd.live import LiveConfig
from tracewire import ctf
from tracewire.consumer_ops import AddStreamOp, AddTraceOp, MetadataOp, ProducerGoneOp, RemoveSessionOp, SessionOp
from tracewire.live import (
    AttachSession,
    Connect,
    GetNewStreams,
    GetNextIndex,
    IndexReply,
    IndexStatus,
    ListSessions,
    NewStreamsStatus,
)
from tracewire.seqpacket import SeqPacket

DEADLINE = 60.0
MARGIN_NS = 100_000_000  # consumerd's _BEACON_MIN_MARGIN_MS


class FakeClock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@asynccontextmanager
async def pipeline(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[Client, int, int]]:
    """A relay with a live port, and a consumerd whose beacons read ``clock``."""
    cfg = RelaydConfig(output=str(tmp_path / "out"), listen_host="127.0.0.1", listen_port=0,
                       live=LiveConfig(listen_host="127.0.0.1", listen_port=0))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = SeqPacket(trio.socket.from_stdlib_socket(ours))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_relayd, cfg)
        cd = await nursery.start(serve_consumerd, ConsumerdConfig(theirs.detach(), clock=clock))
        try:
            yield Client(conn, cd), listeners[0].socket.getsockname()[1], listeners.live[0].socket.getsockname()[1]
        finally:
            conn.close()
            nursery.cancel_scope.cancel()


def index_entries(root: Path) -> list[ctf.IndexEntry]:
    (idx,) = root.rglob("channel0_0.idx")
    return ctf.read_index(idx.read_bytes())


async def wait_for(pred, what: str) -> None:
    """Polls ``pred`` (the relay writes in worker threads) until it holds
    (``what`` names it; the caller's fail_after bounds the wait)."""
    while not pred():
        await trio.sleep(0.01)


async def test_idle_beacons_and_the_end_of_a_live_session_reach_the_viewer(tmp_path: Path) -> None:
    clock = FakeClock(0)
    ring = Ring()
    out = tmp_path / "out"
    with trio.fail_after(DEADLINE):
        async with pipeline(tmp_path, clock) as (c, port, live_port):
            await c.ok(SessionOp(session=SESSION, session_id=1, created=CREATED, sink=f"tw://127.0.0.1:{port}",
                                 hostname=HOST, uid=os.getuid(), gid=os.getgid(), live=True,
                                 spool_dir=str(tmp_path / "spool")))
            await c.ok(AddTraceOp(trace_id="t0", session=SESSION, path=TRACE_PATH, uuid=TRACE_UUID.hex))
            await c.ok(MetadataOp(trace_id="t0", text=metadata_text()))
            await c.ok(AddStreamOp(key="s0", trace_id="t0", session=SESSION, channel="channel0", stream_class=0,
                                   subbuf_size=SPEC.subbuf_size, num_subbuf=SPEC.num_subbuf, switch_timer_ms=10),
                       (ring.memfd, ring.efd))
            ring.emit(5)
            last_event = ring.ts
            # The timer hands the partial sub-buffer over; with the clock not
            # past the last event by the margin, no beacon follows it.
            clock.now = last_event
            await wait_for(lambda: out.exists() and any(out.rglob("channel0_0.idx"))
                           and len(index_entries(out)) >= 1, "the first packet")
            assert len(index_entries(out)) == 1
            # Time passes, nothing is emitted: a beacon, the clock less the margin.
            clock.now = last_event + 5 * MARGIN_NS
            await wait_for(lambda: len(index_entries(out)) >= 2, "a beacon")
            first, beacon = index_entries(out)[:2]
            assert first.content_size > 84 * 8 and first.timestamp_end == last_event
            assert beacon.content_size == beacon.packet_size == 84 * 8  # no event
            assert (beacon.timestamp_begin, beacon.timestamp_end) == (last_event, clock.now - MARGIN_NS)
            # The viewer reads both, then is told the stream's time so far.
            v = Viewer(await trio.open_tcp_stream("127.0.0.1", live_port))
            await v.ask(Connect())
            (info,) = (await v.ask(ListSessions())).sessions
            assert (info.hostname, info.name) == (HOST, SESSION)
            attached = await v.ask(AttachSession(info.session_id))
            data = [s for s in attached.streams if not s.metadata]
            assert len(data) == 1 and len(attached.streams) == 2
            sid = data[0].stream_id
            assert (await v.ask(GetNextIndex(sid))).status is IndexStatus.OK
            assert (await v.ask(GetNextIndex(sid))).ts_end == clock.now - MARGIN_NS
            r = await v.ask(GetNextIndex(sid))
            assert r == IndexReply(IndexStatus.INACTIVE, ts_end=clock.now - MARGIN_NS)
            # The app exits: its stream is closed once acknowledged, so the
            # viewer hangs it up; the session goes on until it is removed.
            await c.ok(ProducerGoneOp(key="s0"))
            while (r := await v.ask(GetNextIndex(sid))).status is not IndexStatus.HUP:
                await trio.sleep(0.01)
            assert (await v.ask(GetNewStreams(info.session_id))).status == NewStreamsStatus.NO_NEW
            await c.ok(RemoveSessionOp(session=SESSION))
            while (n := await v.ask(GetNewStreams(info.session_id))).status == NewStreamsStatus.NO_NEW:
                await trio.sleep(0.01)
            assert n.status == NewStreamsStatus.HUP
            await v.stream.aclose()
    ring.close()
    seqs = [item.fields["seq"] for item in ctf.read_trace(out)]
    assert seqs == list(range(5))  # beacons hold no event


async def test_a_session_that_is_not_live_sends_no_beacon_and_is_not_listed(tmp_path: Path) -> None:
    clock = FakeClock(0)
    ring = Ring()
    out = tmp_path / "out"
    with trio.fail_after(DEADLINE):
        async with pipeline(tmp_path, clock) as (c, port, live_port):
            await c.ok(SessionOp(session=SESSION, session_id=1, created=CREATED, sink=f"tw://127.0.0.1:{port}",
                                 hostname=HOST, uid=os.getuid(), gid=os.getgid(),
                                 spool_dir=str(tmp_path / "spool")))
            await c.ok(AddTraceOp(trace_id="t0", session=SESSION, path=TRACE_PATH, uuid=TRACE_UUID.hex))
            await c.ok(MetadataOp(trace_id="t0", text=metadata_text()))
            await c.ok(AddStreamOp(key="s0", trace_id="t0", session=SESSION, channel="channel0", stream_class=0,
                                   subbuf_size=SPEC.subbuf_size, num_subbuf=SPEC.num_subbuf, switch_timer_ms=10),
                       (ring.memfd, ring.efd))
            ring.emit(5)
            clock.now = ring.ts + 10 * MARGIN_NS
            await wait_for(lambda: out.exists() and any(out.rglob("channel0_0.idx"))
                           and len(index_entries(out)) >= 1, "the first packet")
            v = Viewer(await trio.open_tcp_stream("127.0.0.1", live_port))
            await v.ask(Connect())
            assert (await v.ask(ListSessions())).sessions == ()
            await v.stream.aclose()
            await trio.sleep(0.2)  # twenty 10 ms timer ticks, idle: a live stream would beacon
            await c.ok(RemoveSessionOp(session=SESSION))
    ring.close()
    assert len(index_entries(out)) == 1
