"""The relay's live port: LTTng live viewers (babeltrace2 -i lttng-live,
tracewire view --follow) follow live sessions while they are traced.

Public API: LiveConfig, LiveRegistry, serve_live.
"""

# Theory of operation
# ===================
#
# Two halves that share only a LiveRegistry, owned by the RelayServer:
#
#   ingest -> registry   The consumer connections (relayd/daemon.py) tell the
#                        registry, in plain synchronous calls that cost a
#                        dict look-up, what they have made readable: a live
#                        session declared (SessionDecl.live), a stream opened,
#                        metadata written up to N bytes, index entries on
#                        disk, a stream or session closed.  The registry holds
#                        no data: per stream a few integers and paths, per
#                        trace the metadata size.  Ingest never waits on a
#                        viewer and never holds a byte for one.
#
#   registry -> viewers  Each viewer connection (_Viewer) decodes requests
#                        with tracewire.live's sans-I/O RequestDecoder and
#                        answers from the registry and the files the relay
#                        has written: index entries and packets are read with
#                        pread in worker threads of the live port's own
#                        limiter (a slow disk or many viewers never take the
#                        ingest path's threads).  A viewer's state is its
#                        position in each stream (next index entry), the
#                        metadata bytes it was sent per trace, and which
#                        streams it was told about.
#
# What a viewer can cost is bounded: at most max_viewers connections (more
# are closed at once); a request buffer of max_request bytes (requests are
# fixed-size, a few dozen bytes); one reply in memory at a time, at most
# max_packet_read bytes of packet or one trace's metadata; a viewer that
# sends nothing for idle_timeout, or does not take a reply within
# send_timeout, is dropped.  Junk (an unknown command, a bad size, anything
# before CONNECT) closes that connection with one log line.
#
# Answers babeltrace2 2.0 needs (docs/protocol.md, "Live viewing"):
#   * a trace's streams are announced with exactly one metadata stream, and
#     only once its metadata has bytes;
#   * GET_METADATA serves complete top-level declarations only (up to the last
#     ";\n\n" the CTF writer ends each one with), a batch after the first
#     prefixed with "/* CTF 1.8 */" (babeltrace2 2.0 parses each batch alone);
#   * GET_NEXT_INDEX: the next entry (OK, flagged NEW_METADATA / NEW_STREAM),
#     or, caught up, HUP once the stream or session is closed, else INACTIVE
#     with the end time of the last packet (consumerd's empty beacon packets
#     keep that time moving for an idle stream), or RETRY before its first
#     packet;
#   * GET_NEW_STREAMS answers HUP once the session is closed and every
#     stream was announced, so the viewer ends by itself.
#
# A session closed (the target destroyed it) stays in the registry while a
# viewer is attached, and goes with its last viewer.  A session that no
# consumer connection has held for orphan_timeout (its target died or was cut
# off) is closed the same way, checked at each viewer request; a target that
# declares it again later gets a new live session (new ids) for new viewers.

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from tracewire import ctf
from tracewire.ctf.layout import INDEX_ENTRY
from tracewire.live import (
    AttachSession,
    AttachStatus,
    Closed,
    Connect,
    ConnectReply,
    CreateSession,
    CreateSessionStatus,
    DetachSession,
    DetachStatus,
    GetMetadata,
    GetNewStreams,
    GetNextIndex,
    GetPacket,
    IndexFlag,
    IndexReply,
    IndexStatus,
    ListSessions,
    LiveErrorCode,
    LiveProtocolError,
    MetadataReply,
    MetadataStatus,
    NewStreamsStatus,
    PacketReply,
    PacketStatus,
    Reply,
    Request,
    RequestDecoder,
    SessionInfo,
    SessionsReply,
    StatusReply,
    StreamInfo,
    StreamsReply,
    encode_reply,
)
from tracewire.live import Command as Cmd
from tracewire.ops import DEFAULT_LIVE_TIMER_US
from tracewire.url import format_hostport

__all__ = ["LiveConfig", "LiveRegistry", "serve_live"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_RECEIVE_SIZE = 4096
_CTF_PREFIX = b"/* CTF 1.8 */\n"
_DECL_END = b";\n\n"  # how the CTF writer ends every top-level declaration
_MAX_LISTED = 10_000  # sessions in one LIST_SESSIONS reply


@dataclass(frozen=True, slots=True)
class LiveConfig:
    """The live port's configuration (relay flags --live-*).

    Attributes:
        listen_host: address viewers connect to (127.0.0.1 by default: the
            live protocol has no authentication; docs/security.md).
        listen_port: TCP port; 0 picks a free one.
        max_viewers: viewer connections at once; more are closed at once.
        idle_timeout: a viewer that sends no request for this many seconds
            is dropped.
        connect_timeout: a connection that has not sent CONNECT within this
            many seconds is dropped (so idle connections cannot hold the
            max_viewers places for long); the relay's --handshake-timeout.
        send_timeout: a viewer that does not take a reply within this many
            seconds is dropped.
        max_request: bytes of requests buffered unanswered at most.
        max_packet_read: largest GET_PACKET length served.
        io_threads: worker threads reading files for viewers, relay-wide.
        orphan_timeout: a live session whose target has had no connection
            to the relay for this many seconds (and never closed it) is
            ended for its viewers.
        live_timer_us: the timer LIST_SESSIONS reports (the relay is not
            told a session's own; babeltrace2 only needs it non-zero).
        allow: networks viewers may connect from (a connection from
            elsewhere is closed at once); empty: any that reaches the port.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 6344
    max_viewers: int = 256
    idle_timeout: float = 600.0
    connect_timeout: float = 10.0
    send_timeout: float = 30.0
    max_request: int = 4096
    max_packet_read: int = 4 * 1024 * 1024
    io_threads: int = 4
    orphan_timeout: float = 60.0
    live_timer_us: int = DEFAULT_LIVE_TIMER_US
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.listen_port <= 65535:
            raise ValueError(f"listen_port {self.listen_port} not in 0..65535")
        for name in ("idle_timeout", "connect_timeout", "send_timeout", "orphan_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_viewers", "max_packet_read", "io_threads", "live_timer_us"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_request < 64:
            raise ValueError(f"max_request must be >= 64, got {self.max_request}")


# --------------------------------------------------------------------------
# Registry: what ingest has made readable
# --------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class LiveStream:
    """One data stream file of a live session."""

    stream_id: int
    trace: LiveTrace
    name: str  # the file's name, <channel>_<n>
    path: str
    index_path: str
    indexed: int = 0  # index entries on disk (packets readable)
    closed: bool = False


@dataclass(slots=True, eq=False)
class LiveTrace:
    """One trace directory (an app) of a live session: one metadata stream."""

    trace_id: int  # ctf_trace_id, and the id of its metadata stream
    session: LiveSession
    directory: str
    rel: str  # below the relay's output
    metadata_size: int = 0
    streams: list[LiveStream] = field(default_factory=list)

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.directory, "metadata")


@dataclass(slots=True, eq=False)
class LiveSession:
    session_id: int
    hostname: str
    name: str
    directory: str
    traces: dict[str, LiveTrace] = field(default_factory=dict)  # by directory
    ended: bool = False
    viewers: int = 0
    holders: int = 0  # consumer connections that declared it and did not close it
    orphan_since: float | None = None  # when its last such connection ended without SessionClose
    version: int = 0  # grows when a stream may be announced: a new one, a trace's first metadata

    def stream_count(self) -> int:
        return sum(len(tr.streams) for tr in self.traces.values())


class LiveRegistry:
    """What the ingest path has made readable, for the live port.

    Every method is synchronous and O(1) (or O(streams of one session) at
    its end): the ingest path calls them inline.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.sessions: dict[int, LiveSession] = {}
        self._by_dir: dict[str, LiveSession] = {}
        self._traces: dict[str, LiveTrace] = {}  # by directory
        self._streams: dict[str, LiveStream] = {}  # by data file path
        self.by_id: dict[int, LiveStream | LiveTrace] = {}  # viewer stream ids
        self._orphans: list[LiveSession] = []  # held by no connection (orphan_since set)

    # -- ingest side -------------------------------------------------------------
    def session_declared(self, hostname: str, name: str, directory: str) -> None:
        """A live session was declared on a connection (again, after a
        reconnect: the same one, unless viewers were told it had ended)."""
        sess = self._by_dir.get(directory)
        if sess is None or sess.ended:
            if sess is not None:  # its viewers were told it ended: a new one for new viewers
                self._unlink(sess)
                if sess.viewers == 0:
                    self._forget(sess)
            sess = LiveSession(next(self._ids), hostname, name, directory)
            self.sessions[sess.session_id] = sess
            self._by_dir[directory] = sess
        sess.holders += 1
        if sess.orphan_since is not None:
            sess.orphan_since = None
            self._orphans.remove(sess)

    def session_released(self, session_dir: str, now: float) -> None:
        """A connection that declared the session ended without closing it
        (a network failure, a target that died...)."""
        sess = self._by_dir.get(session_dir)
        if sess is None or sess.ended:
            return
        sess.holders = max(0, sess.holders - 1)
        if sess.holders == 0 and sess.orphan_since is None:
            sess.orphan_since = now
            self._orphans.append(sess)

    def end_orphans(self, now: float, grace: float) -> None:
        """Ends the sessions no connection has held for ``grace`` seconds:
        their target is taken as gone, and their viewers end once they have
        read everything."""
        while self._orphans:  # oldest first
            sess = self._orphans[0]
            since = sess.orphan_since
            assert since is not None
            if now - since < grace:
                return
            del self._orphans[0]
            sess.orphan_since = None
            logger.info("live session %s/%s: no target connection for %g s: ended for viewers",
                        sess.hostname, sess.name, now - since)
            self.session_closed(sess.directory)

    def is_live(self, session_dir: str) -> bool:
        return session_dir in self._by_dir

    def stream_declared(self, session_dir: str, trace_dir: str, rel: str, name: str, path: str,
                        index_path: str, indexed: int) -> None:
        """A stream of a live session is open, with ``indexed`` packets on disk."""
        sess = self._by_dir.get(session_dir)
        if sess is None:
            return
        tr = self._trace(sess, trace_dir, rel)
        st = self._streams.get(path)
        if st is None:
            st = LiveStream(next(self._ids), tr, name, path, index_path)
            self._streams[path] = st
            self.by_id[st.stream_id] = st
            tr.streams.append(st)
            sess.version += 1
        st.indexed = max(st.indexed, indexed)
        st.closed = False

    def metadata_written(self, session_dir: str, trace_dir: str, rel: str, size: int) -> None:
        """The metadata file of ``trace_dir`` holds ``size`` bytes."""
        sess = self._by_dir.get(session_dir)
        if sess is None:
            return
        tr = self._trace(sess, trace_dir, rel)
        if not tr.metadata_size and size:
            sess.version += 1
        tr.metadata_size = max(tr.metadata_size, size)

    def indexed(self, path: str, entries: int) -> None:
        """The stream file ``path`` has ``entries`` index entries on disk."""
        st = self._streams.get(path)
        if st is not None and entries > st.indexed:
            st.indexed = entries

    def stream_closed(self, path: str) -> None:
        st = self._streams.get(path)
        if st is not None:
            st.closed = True

    def session_closed(self, session_dir: str) -> None:
        """The target ended the session: viewers hang up once they have read
        everything; it goes when its last viewer does."""
        sess = self._by_dir.get(session_dir)
        if sess is None:
            return
        sess.ended = True
        if sess.orphan_since is not None:
            sess.orphan_since = None
            self._orphans.remove(sess)
        for tr in sess.traces.values():
            for st in tr.streams:
                st.closed = True
        if sess.viewers == 0:
            self._forget(sess)

    def _trace(self, sess: LiveSession, trace_dir: str, rel: str) -> LiveTrace:
        tr = sess.traces.get(trace_dir)
        if tr is None:
            tr = LiveTrace(next(self._ids), sess, trace_dir, rel)
            sess.traces[trace_dir] = tr
            self._traces[trace_dir] = tr
            self.by_id[tr.trace_id] = tr
        return tr

    # -- viewer side -----------------------------------------------------------------
    def attach(self, sess: LiveSession) -> None:
        sess.viewers += 1

    def detach(self, sess: LiveSession) -> None:
        sess.viewers -= 1
        if sess.viewers == 0 and sess.ended:
            self._forget(sess)

    def _unlink(self, sess: LiveSession) -> None:
        """Ingest no longer finds ``sess`` (its viewers still read it)."""
        if self._by_dir.get(sess.directory) is sess:
            del self._by_dir[sess.directory]
        for tr in sess.traces.values():
            if self._traces.get(tr.directory) is tr:
                del self._traces[tr.directory]
            for st in tr.streams:
                if self._streams.get(st.path) is st:
                    del self._streams[st.path]

    def _forget(self, sess: LiveSession) -> None:
        if self.sessions.pop(sess.session_id, None) is None:
            return
        self._unlink(sess)
        for tr in sess.traces.values():
            self.by_id.pop(tr.trace_id, None)
            for st in tr.streams:
                self.by_id.pop(st.stream_id, None)


# --------------------------------------------------------------------------
# Viewers
# --------------------------------------------------------------------------


def complete_metadata(data: bytes) -> int:
    """How many bytes of ``data`` (metadata text) end on a complete
    top-level declaration (0: none yet)."""
    end = data.rfind(_DECL_END)
    return 0 if end < 0 else end + len(_DECL_END)


@dataclass(slots=True, eq=False)
class _Position:
    """A viewer's place in one data stream."""

    stream: LiveStream
    next: int = 0  # the index entry GET_NEXT_INDEX answers next
    last_ts_end: int = 0
    class_id: int = 0
    readable_end: int = 0  # bytes of the file covered by entries sent


class _Hangup(Exception):
    """End this viewer's connection (logged with the text)."""


class LiveServer:
    """State shared by the viewer connections of one serve_live() call."""

    def __init__(self, config: LiveConfig, registry: LiveRegistry) -> None:
        self.config = config
        self.registry = registry
        self.limiter = trio.CapacityLimiter(config.io_threads)
        self.viewers = 0
        self._conn_ids = itertools.count(1)

    async def run_io(self, fn: Callable[[], _T]) -> _T:
        return await trio.to_thread.run_sync(fn, limiter=self.limiter)

    def allowed(self, stream: trio.SocketStream) -> bool:
        """Whether the peer's address is in ``allow`` (or there is none)."""
        if not self.config.allow:
            return True
        try:
            addr = ipaddress.ip_address(stream.socket.getpeername()[0])
        except (OSError, ValueError, IndexError):
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.config.allow)

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serves one viewer connection; never raises but Cancelled."""
        conn_id = next(self._conn_ids)
        if not self.allowed(stream):
            logger.warning("viewer#%d %s: refused: not in --live-allow", conn_id, _peer(stream))
            await stream.aclose()
            return
        if self.viewers >= self.config.max_viewers:
            logger.warning("viewer#%d %s: refused: %d viewers connected (--live-max-viewers)",
                           conn_id, _peer(stream), self.viewers)
            await stream.aclose()
            return
        self.viewers += 1
        try:
            await _Viewer(self, stream, conn_id).run()
        finally:
            self.viewers -= 1


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except (OSError, ValueError):
        return "?"
    return format_hostport(host, port)


class _Viewer:
    """One viewer connection."""

    def __init__(self, server: LiveServer, stream: trio.SocketStream, conn_id: int) -> None:
        self.server = server
        self.config = server.config
        self.registry = server.registry
        self.stream = stream
        self.conn_id = conn_id
        self.name = f"viewer#{conn_id} {_peer(stream)}"
        self.decoder = RequestDecoder(self.config.max_request)
        self.connected = False
        self.attached: dict[int, LiveSession] = {}
        self.positions: dict[int, _Position] = {}  # data streams announced, by id
        self.metadata_sent: dict[int, int] = {}  # metadata streams announced: bytes sent, by trace id
        self.seen: dict[int, int] = {}  # session id -> its version when last announced to this viewer

    def __str__(self) -> str:
        return self.name

    async def run(self) -> None:
        try:
            while True:
                wait = self.config.idle_timeout if self.connected else self.config.connect_timeout
                with trio.fail_after(wait):
                    req = await self._next_request()
                if isinstance(req, Closed):
                    logger.info("%s: closed", self)
                    return
                self.registry.end_orphans(trio.current_time(), self.config.orphan_timeout)
                reply = await self._answer(req)
                with trio.fail_after(self.config.send_timeout):
                    await self.stream.send_all(encode_reply(reply))
        except LiveProtocolError as exc:
            logger.warning("%s: dropped: %s: %s", self, exc.code.value, exc.message)
        except _Hangup as exc:
            logger.info("%s: dropped: %s", self, exc)
        except trio.TooSlowError:
            logger.warning("%s: dropped: timed out (idle, or not reading its replies)", self)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.info("%s: connection lost: %s", self, str(exc) or type(exc).__name__)
        except OSError as exc:
            logger.error("%s: dropped: I/O error: %s", self, exc)
        except Exception:  # a bug: keep the relay and the other viewers alive
            logger.exception("%s: dropped: internal error", self)
        finally:
            for sess in self.attached.values():
                self.registry.detach(sess)
            self.attached.clear()

    async def _next_request(self) -> Request | Closed:
        while (req := self.decoder.next_event()) is None:
            room = min(_RECEIVE_SIZE, self.config.max_request - self.decoder.buffered)
            self.decoder.receive_data(await self.stream.receive_some(max(1, room)))
        return req

    async def _answer(self, req: Request) -> Reply:
        if not self.connected:
            if not isinstance(req, Connect):
                raise LiveProtocolError(LiveErrorCode.BAD_STATE, f"{req.command.name} before CONNECT")
            if req.major != 2 or req.type != 1:
                raise _Hangup(f"CONNECT {req.major}.{req.minor} type {req.type}: only 2.x command "
                              "connections are served")
            self.connected = True
            logger.info("%s: connected (protocol %d.%d)", self, req.major, req.minor)
            return ConnectReply(self.conn_id)
        match req:
            case Connect():
                raise LiveProtocolError(LiveErrorCode.BAD_STATE, "a second CONNECT")
            case CreateSession():
                return StatusReply(CreateSessionStatus.OK, Cmd.CREATE_SESSION)
            case ListSessions():
                return self._list()
            case AttachSession():
                return self._attach(req)
            case GetNewStreams():
                return self._new_streams(req)
            case DetachSession():
                return self._detach(req)
            case GetMetadata():
                return await self._metadata(req)
            case GetNextIndex():
                return await self._next_index(req)
            case GetPacket():
                return await self._packet(req)
        raise LiveProtocolError(LiveErrorCode.BAD_COMMAND, f"unexpected {type(req).__name__}")  # pragma: no cover

    # -- sessions ------------------------------------------------------------------
    def _list(self) -> SessionsReply:
        listed = [s for s in self.registry.sessions.values() if not s.ended][:_MAX_LISTED]
        return SessionsReply(tuple(
            SessionInfo(s.session_id, self.config.live_timer_us, s.viewers, s.stream_count(), s.hostname, s.name)
            for s in listed))

    def _attach(self, req: AttachSession) -> StreamsReply:
        sess = self.registry.sessions.get(req.session_id)
        if sess is None:
            return StreamsReply(AttachStatus.UNKNOWN, (), Cmd.ATTACH_SESSION)
        if req.session_id in self.attached:
            return StreamsReply(AttachStatus.ALREADY, (), Cmd.ATTACH_SESSION)
        self.attached[req.session_id] = sess
        self.registry.attach(sess)
        # Every viewer reads from the first packet (babeltrace2 2.0 always
        # asks to seek to the last; what came before is short, and shown).
        streams = self._announce(sess)
        logger.info("%s: attached to %s/%s (%d streams)", self, sess.hostname, sess.name, len(streams))
        return StreamsReply(AttachStatus.OK, streams, Cmd.ATTACH_SESSION)

    def _new_streams(self, req: GetNewStreams) -> StreamsReply:
        sess = self.attached.get(req.session_id)
        if sess is None:
            return StreamsReply(NewStreamsStatus.ERROR)
        streams = self._announce(sess)
        if streams:
            return StreamsReply(NewStreamsStatus.OK, streams)
        if sess.ended:
            return StreamsReply(NewStreamsStatus.HUP)
        return StreamsReply(NewStreamsStatus.NO_NEW)

    def _detach(self, req: DetachSession) -> StatusReply:
        sess = self.attached.pop(req.session_id, None)
        if sess is None:
            return StatusReply(DetachStatus.UNKNOWN, Cmd.DETACH_SESSION)
        self.registry.detach(sess)
        return StatusReply(DetachStatus.OK, Cmd.DETACH_SESSION)

    def _pending(self, sess: LiveSession) -> bool:
        """Whether ``sess`` may have a stream this viewer was not told about
        (O(1): asked on every index)."""
        return self.seen.get(sess.session_id) != sess.version

    def _announce(self, sess: LiveSession) -> tuple[StreamInfo, ...]:
        """The streams of ``sess`` not announced yet: those of traces that
        have metadata, each trace's metadata stream first."""
        out: list[StreamInfo] = []
        self.seen[sess.session_id] = sess.version
        for tr in sess.traces.values():
            if not tr.metadata_size or not tr.streams:
                continue
            if tr.trace_id not in self.metadata_sent:
                self.metadata_sent[tr.trace_id] = 0
                out.append(StreamInfo(tr.trace_id, tr.trace_id, True, tr.rel, "metadata"))
            for st in tr.streams:
                if st.stream_id not in self.positions:
                    self.positions[st.stream_id] = _Position(st)
                    out.append(StreamInfo(st.stream_id, tr.trace_id, False, tr.rel, st.name))
        return tuple(out)

    # -- metadata ---------------------------------------------------------------------
    async def _metadata(self, req: GetMetadata) -> MetadataReply:
        tr = self.registry.by_id.get(req.stream_id)
        sent = self.metadata_sent.get(req.stream_id)
        if not isinstance(tr, LiveTrace) or sent is None:
            return MetadataReply(MetadataStatus.ERROR)
        if tr.metadata_size <= sent:
            return MetadataReply(MetadataStatus.NO_NEW)
        data = await self.server.run_io(lambda: _pread(tr.metadata_path, sent, tr.metadata_size - sent))
        n = complete_metadata(data)
        if n == 0:
            return MetadataReply(MetadataStatus.NO_NEW)
        self.metadata_sent[req.stream_id] = sent + n
        return MetadataReply(MetadataStatus.OK, data[:n] if sent == 0 else _CTF_PREFIX + data[:n])

    def _metadata_behind(self, tr: LiveTrace) -> bool:
        sent = self.metadata_sent.get(tr.trace_id, 0)
        return tr.metadata_size > sent

    # -- data ----------------------------------------------------------------------------
    async def _next_index(self, req: GetNextIndex) -> IndexReply:
        pos = self.positions.get(req.stream_id)
        if pos is None:
            return IndexReply(IndexStatus.ERROR)
        st = pos.stream
        if pos.next < st.indexed:
            k = pos.next
            raw = await self.server.run_io(
                lambda: _pread(st.index_path, len(ctf.INDEX_HEADER) + k * ctf.INDEX_ENTRY_SIZE, ctf.INDEX_ENTRY_SIZE))
            if len(raw) != ctf.INDEX_ENTRY_SIZE:
                return IndexReply(IndexStatus.ERROR)
            offset, psize, csize, begin, end, discarded, class_id, _instance, _seq = INDEX_ENTRY.unpack(raw)
            pos.next = k + 1
            pos.last_ts_end = max(pos.last_ts_end, end)
            pos.class_id = class_id
            pos.readable_end = max(pos.readable_end, offset + psize // 8)
            flags = IndexFlag.NONE
            if self._metadata_behind(st.trace):
                flags |= IndexFlag.NEW_METADATA
            if self._pending(st.trace.session):
                flags |= IndexFlag.NEW_STREAM
            return IndexReply(IndexStatus.OK, offset, psize, csize, begin, end, discarded, class_id, flags)
        if st.closed:
            return IndexReply(IndexStatus.HUP)
        if pos.next == 0:
            return IndexReply(IndexStatus.RETRY)
        return IndexReply(IndexStatus.INACTIVE, ts_end=pos.last_ts_end, stream_id=pos.class_id)

    async def _packet(self, req: GetPacket) -> PacketReply:
        pos = self.positions.get(req.stream_id)
        if pos is None or req.length > self.config.max_packet_read or req.offset + req.length > pos.readable_end:
            return PacketReply(PacketStatus.ERROR)
        path = pos.stream.path
        data = await self.server.run_io(lambda: _pread(path, req.offset, req.length))
        if len(data) != req.length:
            return PacketReply(PacketStatus.ERROR)
        return PacketReply(PacketStatus.OK, data)


def _pread(path: str, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes of ``path`` from ``offset`` (worker thread)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


async def serve_live(
    config: LiveConfig, registry: LiveRegistry, *, listeners: list[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves live viewers until cancelled.

    Args:
        config: the live port's configuration.
        registry: what the relay's ingest path has made readable.
        listeners: already bound listeners to serve (None: bind
            config.listen_host / listen_port here).
        task_status: receives the bound listeners once listening.

    Raises:
        OSError: before task_status.started, if the address cannot be bound.
    """
    if listeners is None:
        listeners = await trio.open_tcp_listeners(config.listen_port, host=config.listen_host)
    server = LiveServer(config, registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        task_status.started(listeners)
