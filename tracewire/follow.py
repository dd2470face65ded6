"""`tracewire view --follow net://RELAY[:PORT]/host/HOST/SESSION`: the
project's own live viewer, over the LTTng live protocol (tracewire.live) of
a relay's live port.

Public API: LiveURL, parse_live_url, follow, FollowError.

Theory of operation
===================

A blocking client (one TCP connection, every wait bounded by ``timeout``)
drives the same sequence babeltrace2 does: CONNECT, LIST_SESSIONS (the
sessions of HOST named SESSION), ATTACH each, then rounds of:

* for every stream that has nothing queued and is not hung up,
  GET_NEXT_INDEX: OK -> GET_PACKET, decoded with tracewire.ctf (after
  GET_METADATA when the index says NEW_METADATA) into the stream's queue, and
  the stream's *horizon* (no later event of it can be older) moves to the
  packet's end; INACTIVE moves the horizon only; RETRY leaves it; HUP ends
  the stream;
* GET_NEW_STREAMS when an index said NEW_STREAM, when a round got nothing,
  or while the session has no stream;
* print, in time order, every queued item no stream can still precede: an
  item is printed once every live stream either has a queued item at least as
  old or a horizon at or past it.

The lines are tracewire.ctf.format_event's, as `tracewire view` prints them
for the relay's files.  The viewer ends when the relay says the session is
over (GET_NEW_STREAMS HUP) and every stream hung up.  A round that got
nothing waits ``poll_interval`` before the next.
"""

from __future__ import annotations

import heapq
import itertools
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tracewire import ctf
from tracewire.ctf.stream_reader import item_time
from tracewire.live import (
    AttachSession,
    AttachStatus,
    Closed,
    Connect,
    ConnectReply,
    CreateSession,
    GetMetadata,
    GetNewStreams,
    GetNextIndex,
    GetPacket,
    IndexFlag,
    IndexReply,
    IndexStatus,
    ListSessions,
    LiveProtocolError,
    MetadataReply,
    MetadataStatus,
    NewStreamsStatus,
    PacketReply,
    PacketStatus,
    Reply,
    ReplyDecoder,
    Request,
    SessionsReply,
    StreamInfo,
    StreamsReply,
    encode_request,
)

__all__ = ["DEFAULT_LIVE_PORT", "FollowError", "LiveURL", "follow", "parse_live_url"]

DEFAULT_LIVE_PORT = 6344
_CTF_PREFIX = "/* CTF 1.8 */\n"
_URL = re.compile(r"^net://(?P<host>\[[^\]]+\]|[^/:\[\]]+)(?::(?P<port>\d{1,5}))?/host/(?P<target>[^/]+)/(?P<session>[^/]+)/?$")
_MAX_PACKET = 64 * 1024 * 1024  # the largest sub-buffer, so the largest packet
_CHUNK = 1024 * 1024  # bytes asked per GET_PACKET


class FollowError(Exception):
    """The live session cannot be followed (the text says why, in one line)."""


@dataclass(frozen=True, slots=True)
class LiveURL:
    host: str
    port: int
    target: str  # the traced host's name
    session: str


def parse_live_url(url: str) -> LiveURL:
    """``net://RELAY[:PORT]/host/HOST/SESSION`` (PORT: 6344 by default).

    Raises:
        FollowError: the text is not such a URL.
    """
    m = _URL.match(url)
    if m is None:
        raise FollowError(f"{url!r} is not net://RELAY[:PORT]/host/HOST/SESSION")
    port = int(m["port"]) if m["port"] else DEFAULT_LIVE_PORT
    if not 0 < port < 65536:
        raise FollowError(f"port {port} in {url!r} is not in 1..65535")
    return LiveURL(m["host"].strip("[]"), port, m["target"], m["session"])


@dataclass(slots=True, eq=False)
class _Trace:
    trace_id: int
    text: str = ""
    meta: ctf.TraceMeta | None = None


@dataclass(slots=True, eq=False)
class _Stream:
    stream_id: int
    name: str
    trace: _Trace
    order: int  # ties print in announcement order
    queue: deque[ctf.Event | ctf.Discarded] = field(default_factory=deque)
    horizon: int = -1  # ns since the Epoch: none of its items to come is older
    prev_discarded: int | None = None
    hup: bool = False


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # A relay's replies are bounded before their bytes are awaited.
        self.decoder = ReplyDecoder(max_sessions=10_000, max_streams=16_384, max_data=_MAX_PACKET)

    def ask(self, req: Request) -> Reply:
        self.decoder.expect(req.command)
        self.sock.sendall(encode_request(req))
        while True:
            reply = self.decoder.next_event()
            if isinstance(reply, Closed):
                raise FollowError("the relay closed the live connection")
            if reply is not None:
                return reply
            self.decoder.receive_data(self.sock.recv(1 << 20))


class _Follower:
    def __init__(self, client: _Client, emit: Callable[[ctf.Event | ctf.Discarded], None]) -> None:
        self.client = client
        self.emit = emit
        self.sessions: set[int] = set()
        self.ended: set[int] = set()
        self.traces: dict[int, _Trace] = {}
        self.streams: dict[int, _Stream] = {}
        self.meta_ids: dict[int, int] = {}  # ctf_trace_id -> its metadata stream's id
        self.order = itertools.count()

    def add_streams(self, infos: tuple[StreamInfo, ...]) -> None:
        for info in infos:
            tr = self.traces.setdefault(info.ctf_trace_id, _Trace(info.ctf_trace_id))
            if info.metadata:
                self.meta_ids[tr.trace_id] = info.stream_id
            elif info.stream_id not in self.streams:
                self.streams[info.stream_id] = _Stream(info.stream_id, info.channel, tr, next(self.order))

    def metadata(self, tr: _Trace) -> None:
        """GET_METADATA until NO_NEW, then parse the whole text."""
        stream_id = self.meta_ids.get(tr.trace_id)
        if stream_id is None:
            raise FollowError(f"trace {tr.trace_id} has no metadata stream")
        grew = False
        while True:
            r = self.client.ask(GetMetadata(stream_id))
            assert isinstance(r, MetadataReply)
            if r.status is MetadataStatus.NO_NEW:
                break
            if r.status is not MetadataStatus.OK:
                raise FollowError(f"the relay refused the metadata of trace {tr.trace_id}")
            text = r.data.decode("utf-8", "replace")
            if tr.text and text.startswith(_CTF_PREFIX):
                text = text[len(_CTF_PREFIX):]
            tr.text += text
            grew = True
        if grew or tr.meta is None:
            try:
                tr.meta = ctf.parse_metadata(tr.text)
            except ctf.CTFError as exc:
                raise FollowError(f"metadata of trace {tr.trace_id}: {exc}") from None

    def new_streams(self) -> None:
        for sid in sorted(self.sessions - self.ended):
            r = self.client.ask(GetNewStreams(sid))
            assert isinstance(r, StreamsReply)
            if r.status == NewStreamsStatus.OK:
                self.add_streams(r.streams)
            elif r.status == NewStreamsStatus.HUP:
                self.ended.add(sid)
            elif r.status == NewStreamsStatus.ERROR:
                raise FollowError(f"the relay refused new streams of session {sid}")

    def poll(self, st: _Stream) -> tuple[bool, bool]:
        """One GET_NEXT_INDEX (and packet) of ``st``.

        Returns:
            (whether anything moved, whether new streams were announced).
        """
        r = self.client.ask(GetNextIndex(st.stream_id))
        assert isinstance(r, IndexReply)
        if r.status is IndexStatus.HUP:
            st.hup = True
            return True, False
        if r.status in (IndexStatus.ERROR, IndexStatus.EOF):
            raise FollowError(f"the relay refused the index of stream {st.name}")
        offset_ns = st.trace.meta.clock_offset_ns if st.trace.meta is not None else 0
        if r.status is IndexStatus.INACTIVE:
            moved = r.ts_end + offset_ns > st.horizon
            st.horizon = max(st.horizon, r.ts_end + offset_ns)
            return moved, False
        if r.status is not IndexStatus.OK:
            return False, False  # RETRY
        if r.flags & IndexFlag.NEW_METADATA or st.trace.meta is None:
            self.metadata(st.trace)
        assert st.trace.meta is not None
        size = r.packet_size // 8
        if size > _MAX_PACKET:
            raise FollowError(f"a packet of stream {st.name} is {size} bytes, more than {_MAX_PACKET}")
        data = bytearray()
        while len(data) < size:  # in pieces: a relay serves at most a few MiB at once
            n = min(_CHUNK, size - len(data))
            p = self.client.ask(GetPacket(st.stream_id, r.offset + len(data), n))
            assert isinstance(p, PacketReply)
            if p.status is not PacketStatus.OK or len(p.data) != n:
                raise FollowError(f"the relay refused a packet of stream {st.name}")
            data += p.data
        try:
            items, st.prev_discarded = ctf.read_packet(bytes(data), st.trace.meta, st.name, st.prev_discarded)
        except ctf.CTFError as exc:
            raise FollowError(str(exc)) from None
        st.queue.extend(items)
        st.horizon = max(st.horizon, r.ts_end + st.trace.meta.clock_offset_ns)
        return True, bool(r.flags & IndexFlag.NEW_STREAM)

    def print_ready(self) -> None:
        """Prints every queued item no live stream can still precede."""
        heads = [(item_time(st.queue[0]), st.order, st) for st in self.streams.values() if st.queue]
        heapq.heapify(heads)
        waiting = [st for st in self.streams.values() if not st.queue and not st.hup]
        while heads:
            t, _, st = heads[0]
            if any(w.horizon < t for w in waiting):
                return
            heapq.heappop(heads)
            self.emit(st.queue.popleft())
            if st.queue:
                heapq.heappush(heads, (item_time(st.queue[0]), st.order, st))
            elif not st.hup:
                waiting.append(st)

    def done(self) -> bool:
        return self.sessions <= self.ended and all(st.hup and not st.queue for st in self.streams.values())


def follow(url: LiveURL, emit: Callable[[ctf.Event | ctf.Discarded], None], *, timeout: float = 60.0,
           poll_interval: float = 0.1) -> None:
    """Follows a live session until the relay says it is over.

    Args:
        url: the session (relay address, traced host, session name).
        emit: called with every item, in time order.
        timeout: seconds any one exchange with the relay may take.
        poll_interval: seconds between two rounds that got nothing.

    Raises:
        FollowError: the relay cannot be reached, has no such live session,
            or broke the protocol (the text says which).
    """
    try:
        sock = socket.create_connection((url.host, url.port), timeout=timeout)
    except OSError as exc:
        raise FollowError(f"cannot reach the relay's live port {url.host}:{url.port}: "
                          f"{exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _run(_Client(sock), url, emit, poll_interval)
    except LiveProtocolError as exc:
        raise FollowError(f"live protocol error from {url.host}:{url.port}: {exc.message}") from None
    except TimeoutError:
        raise FollowError(f"the relay at {url.host}:{url.port} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise FollowError(f"live connection to {url.host}:{url.port} failed: {exc.strerror or exc}") from None
    finally:
        sock.close()


def _run(client: _Client, url: LiveURL, emit: Callable[[ctf.Event | ctf.Discarded], None],
         poll_interval: float) -> None:
    r = client.ask(Connect())
    assert isinstance(r, ConnectReply)
    if r.major != 2:
        raise FollowError(f"the relay speaks live protocol {r.major}.{r.minor}, not 2.x")
    client.ask(CreateSession())
    sessions = client.ask(ListSessions())
    assert isinstance(sessions, SessionsReply)
    wanted = [s for s in sessions.sessions if s.hostname == url.target and s.name == url.session]
    if not wanted:
        raise FollowError(f"no live session {url.session!r} of host {url.target!r} on {url.host}:{url.port}")
    f = _Follower(client, emit)
    for s in wanted:
        a = client.ask(AttachSession(s.session_id))
        assert isinstance(a, StreamsReply)
        if a.status != AttachStatus.OK:
            raise FollowError(f"the relay refused to attach session {s.name!r}: {AttachStatus(a.status).name}")
        f.sessions.add(s.session_id)
        f.add_streams(a.streams)
    want_new = not f.streams
    while not f.done():
        moved = False
        if want_new:
            f.new_streams()
            want_new = False
        for st in list(f.streams.values()):
            if st.queue or st.hup:
                continue
            m, new = f.poll(st)
            moved |= m
            want_new |= new
        f.print_ready()
        if not moved and not f.done():
            want_new = True
            time.sleep(poll_interval)

