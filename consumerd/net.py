"""consumerd's network sink: packets → zstd → TCP (or TLS) → tracewire-relayd.

Theory of operation
-------------------
One ``NetSession`` per tracing session streams every trace and stream of that
session over one connection.  ``submit()`` (called from the synchronous drain
loop) takes a packet as its parts (the CTF header and a view of the ring's
shared memory).  Uncompressed, it is *saved* at once: written to the spool
(consumerd/spool.py) with one ``pwritev``; compressed, it is compressed
and saved at once too when that is cheap (a packet expected to compress in
under ``INLINE_COMPRESS_MAX_NS`` of CPU, nothing queued before it),
otherwise a compressor task compresses queued packets in a worker thread
(zstd releases the GIL), then saves them.  Once saved, the ring space may
go back to the producer (``on_saved``).  A sender task writes frames: a
spooled packet goes from the spool file to a TCP socket with
``os.sendfile`` (a small one is read back and sent with its frame's head in
one ``sendmsg``; over TLS, read back); while the sender is idle, the drain
loop sends the packet itself (``_pump``), non-blocking, from memory (the
ring, before its space goes back, or the compressor's output) with one
``sendmsg``, and wakes the sender only when the socket is full.  A reader
task takes acknowledgements.  Without a spool (tests), a saved packet is a
``bytes`` in memory.

Every packet stays in its stream's ``unacked`` deque (where it is in the
spool, not its bytes) until the relay acknowledges it (``Ack(stream, seq)`` = everything up to ``seq`` is
written).  When the connection breaks, the session reconnects with backoff,
re-declares the session, its metadata (the relay skips what it already has)
and its streams, asks where each stream stands (``StreamStateRequest``),
forgets what the relay already wrote, and resends the rest — the relay drops
duplicates.  A refusal by the relay (authentication, permission, a protocol
error) is fatal for the session and reported to sessiond, never retried in a
loop.  An Error whose code is in ``wire.TRANSIENT_ERRORS`` (the relay could
not go on now: a full disk while declaring, an idle timeout) is no refusal:
the session reconnects, as after a network error.  The reconnect backoff
(0.1 s doubling to 5 s) starts again once a connection is declared.

A relay that cannot write a packet because of a failure that can heal (a full
disk, a read-only remount, EIO) answers ``Retry(stream, seq)``: its file ends
just before ``seq``.  That one stream is *held*: nothing of it is sent (the
relay would drop it) for a per-stream backoff (0.25 s doubling to 5 s), then
the packet ``seq`` alone goes out as a *probe*.  Once an acknowledgement
covers the probe the stream is open again, its backoff reset, and the rest of
its unacknowledged packets go out in order; another Retry holds it again,
for longer.  The timers belong to the streams, not to the connection: a
reconnect keeps them, a held stream sends nothing on the new connection, a
probing one sends its probe again.  Other streams never wait for a held one.

Memory is bounded by ``max_unacked_bytes``: past it the drain loop leaves the
data in the ring buffers (which then discard, and count, new events) until
acknowledgements free room (``on_room`` is called then).  The stop barrier
waits for ``wait_all_acked()``: it completes on the relay's acknowledgement,
not on a timer.

Trace chunks (rotation): a chunk's streams are streams of their own (new
keys, new wire ids, new files on the relay).  Once every packet of a closed
chunk is acknowledged (``wait_acked``), its streams and traces are dropped
(``drop_stream``, ``drop_trace``: closed on the wire, never declared again),
then ``close_chunk`` sends ``ChunkClose`` and waits for ``ChunkClosed``; a
ChunkClose not answered when the connection breaks is sent again after the
next declaration (the relay does it at most once).  ChunkClose needs
protocol 2: the session says Hello with version 2, and falls back to 1 for a
relay that refuses it (a rotation through such a relay then fails with one
line).

A live session (``live``) also tells the relay when a stream is over (a
StreamClose once a finished stream is wholly acknowledged) and when the
session is (a SessionClose, ``finish_session()``, before the connection
closes), so that the relay's live viewers end by themselves.

consumerd/sinks.py's ``RelaySink`` puts a NetSession and its spool
(consumerd/spool.py) behind the sink interface the daemon uses.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from consumerd.spool import Spool, SpoolRecord, SpoolRef, parts_size
from tracewire import wire
from tracewire.iothread import IoThread
from tracewire.ops import DEFAULT_COMPRESS_LEVEL, DEFAULT_SPOOL_SIZE, RelayState
from tracewire.url import RelayURL

__all__ = ["NetSession", "RelayUnavailable", "SinkError", "read_key_file"]

logger = logging.getLogger(__name__)


# Packets (raw bytes) compressed in one worker-thread hand-off at most.
_COMPRESS_BATCH_BYTES = 4 * 1024 * 1024
# A packet expected to take at most this much CPU to compress (ns) is
# compressed in the drain loop itself when the compressor is idle; longer
# ones go to the worker thread.  A hand-off to the thread cost consumerd
# ~200 us of CPU per packet at full speed (docs/design.md, "Where the
# consumer's CPU goes"), more than zstd 1 takes for a packet that compresses
# well, and this bounds how long the event loop compresses per packet.
INLINE_COMPRESS_MAX_NS = 200_000
# Weight of the newest packet in the compression-cost estimate.
_COMPRESS_COST_WEIGHT = 0.25


def _compress_one(cctx: Any, parts: list[wire.Buffer]) -> tuple[bytes, int]:
    """One packet, given as its parts, compressed; with the CPU time (ns) it
    took this thread (zstd releases the GIL: a wait for it is not counted)."""
    t0 = time.thread_time_ns()
    data = cctx.compress(b"".join(parts))
    return data, time.thread_time_ns() - t0


def _compress_all(cctx: Any, packets: list[list[wire.Buffer]]) -> list[tuple[bytes, int]]:
    """Compresses each packet, given as its parts (the CTF header and a view
    of the ring), in a worker thread: zstd releases the GIL.  (The thread
    inherits the draining thread's scheduling policy: a packet's ring space
    goes back only once it is compressed and spooled, so compression is on
    the drain's critical path.)"""
    return [_compress_one(cctx, parts) for parts in packets]


# A spooled packet (or the rest of one) at most this large is read back and
# sent with its frame's head in one sendmsg rather than by sendfile: 3.1
# against 7.4 us of CPU for 3.5 KB to a loopback socket (a compressed
# packet of the demo's payload), measured alone.
_READ_BACK_MAX = 64 * 1024

# Packets sent back to back on a TCP socket before the sender yields to the
# other tasks (it yields anyway whenever the socket is full).
_SEND_BURST = 8


class _FileSend:
    """A packet going out on a non-blocking TCP socket: the frame's head with
    MSG_MORE (it leaves in the same segment as the data), then the spooled
    bytes with ``os.sendfile`` (the kernel hands the spool file's pages to
    the socket: no copy in Python); a packet (or rest of one) of at most
    ``_READ_BACK_MAX`` bytes is read back and goes with the head in one
    ``sendmsg``."""

    __slots__ = ("head", "fd", "offset", "left")

    def __init__(self, head: wire.Buffer, ref: SpoolRef) -> None:
        self.head = memoryview(head)
        self.fd, self.offset, self.left = ref.fd, ref.offset, ref.length

    def push(self, sock: socket.socket) -> bool:
        """Send what the socket takes now; True once all is sent.

        Raises:
            OSError: the socket failed (trio.BrokenResourceError: the spool
                segment ended before the packet did).
        """
        try:
            if 0 < self.left <= _READ_BACK_MAX:
                return self._push_read_back(sock)
            while self.head:
                self.head = self.head[sock.send(self.head, socket.MSG_MORE):]
            while self.left:
                sent = os.sendfile(sock.fileno(), self.fd, self.offset, self.left)
                if sent == 0:
                    raise trio.BrokenResourceError("the spool segment ended before the packet did")
                self.offset += sent
                self.left -= sent
        except BlockingIOError:
            return False
        return True

    def _push_read_back(self, sock: socket.socket) -> bool:
        """push() for a small rest: read back from the spool and sent with
        the frame's head in one ``sendmsg`` (for a few KiB that costs less
        than ``sendfile``'s set-up, and one system call less).

        Raises:
            BlockingIOError: the socket is full.
        """
        data = os.pread(self.fd, self.left, self.offset)
        if len(data) < self.left:
            raise trio.BrokenResourceError("the spool segment ended before the packet did")
        return self._sent(sock.sendmsg([self.head, data]) if self.head else sock.send(data))

    def _sent(self, sent: int) -> bool:
        """Takes note of ``sent`` bytes of the head, then of the data, gone
        in one send; True once all is sent."""
        head = len(self.head)
        if sent < head:
            self.head = self.head[sent:]
            return False
        self.head = self.head[head:]
        sent -= head
        self.offset += sent
        self.left -= sent
        return not self.left

    def send_from(self, sock: socket.socket, parts: list[wire.Buffer]) -> bool:
        """Send the frame's head and the packet from ``parts`` (the spooled
        bytes, still in memory) in one ``sendmsg``; what the socket does not
        take now is left for ``push``, from the spool.  True once all is sent.

        Raises:
            OSError: the socket failed.
        """
        try:
            sent = sock.sendmsg([self.head, *parts])
        except BlockingIOError:
            return False
        return self._sent(sent)

    async def finish(self, sock: socket.socket) -> None:
        """Send the rest, waiting while the socket is full."""
        while not self.push(sock):
            await trio.lowlevel.wait_writable(sock)


class SinkError(Exception):
    """A sink that cannot be used: the relay refused the session (or a bad
    relay URL, directory or key file, see consumerd/sinks.py)."""


class _VersionRefused(SinkError):
    """The relay does not speak our protocol version (it is older)."""


class RelayUnavailable(Exception):
    """The relay closed the connection with an Error whose code is in
    ``wire.TRANSIENT_ERRORS``: not a refusal; reconnect later, keep everything.
    The text is ``CODE: the relay's text``."""


_NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                   ssl.SSLError, wire.ProtocolError, RelayUnavailable)

RECONNECT_MIN, RECONNECT_MAX = 0.1, 5.0  # seconds between connection attempts
RETRY_MIN, RETRY_MAX = 0.25, 5.0  # seconds a stream is held after a Retry
_TEXT_SHOWN = 200  # characters of a relay's text kept for logs and status

# How status words a Retry's reason.
_HELD_STATE: dict[wire.RetryReason, RelayState] = {
    wire.RetryReason.NO_SPACE: RelayState.FULL,
    wire.RetryReason.READ_ONLY: RelayState.READ_ONLY,
    wire.RetryReason.IO_ERROR: RelayState.IO_ERROR,
    wire.RetryReason.BUSY: RelayState.BUSY,
}


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """Every exception in ``group``, nested groups flattened, in order."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def _leaf(group: BaseExceptionGroup) -> BaseException:
    """The exception a connection's task group failed with: a refusal first,
    then a network error (the relay's own word, a transient Error, before the
    broken socket that follows it); anything else (a bug, a cancellation) as
    it is."""
    refused, rest = group.split(SinkError)
    if refused is not None:
        return _leaves(refused)[0]
    net, rest = group.split(_NETWORK_ERRORS)
    if net is not None and rest is None:
        found = _leaves(net)
        return next((e for e in found if isinstance(e, RelayUnavailable)), found[0])
    return group


def _shown(text: str) -> str:
    """A peer's text made fit for one line of a log or of ``status``:
    control characters replaced, at most ``_TEXT_SHOWN`` characters."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:_TEXT_SHOWN + 1])
    return clean if len(clean) <= _TEXT_SHOWN else clean[:_TEXT_SHOWN - 3] + "..."


def read_key_file(path: str) -> tuple[str, bytes]:
    """Read a target's key file: ``KEY_ID SECRET`` (tracewire.keyfile's format,
    target side: the first key is used; host words, as in a line of a relay's
    key file, are checked but not used; a word starting with ``#`` starts a
    comment).  A file that group or others may access is used, with a warning.

    Raises:
        SinkError: unreadable, not a regular file, too large, malformed, or
            no key (the text names the file, and the line).
    """
    from tracewire import keyfile, names

    try:
        parsed = keyfile.read_key_file(path, keyfile.Side.TARGET, check_name=names.validate_name)
    except keyfile.KeyFileError as exc:
        raise SinkError(str(exc)) from None
    problem = parsed.permission_problem()
    if problem is not None:
        logger.warning("%s", problem)
    key = parsed.keys[0]
    return key.key_id, key.secret


@dataclass(slots=True)
class _Pending:
    """One packet kept until acknowledged: first its raw parts (still in the
    ring, waiting for the compressor), then, once *saved*, where its encoded
    bytes are (the spool, or memory when there is no spool)."""

    order: int
    stream: _NetStream
    seq: int
    raw_len: int
    ts_begin: int
    ts_end: int
    events_discarded: int
    parts: list[wire.Buffer] | None  # the CTF header and a view of the ring, until saved
    ring_end: int = 0  # ring position after this packet (published once saved)
    ref: SpoolRef | None = None  # the encoded bytes in the spool
    data: bytes | None = None  # the encoded bytes in memory (no spool)
    size: int = 0  # encoded bytes, once saved
    codec: wire.Codec = wire.Codec.NONE
    packet_seq_num: int = -1  # the CTF header's, when it is not ``seq`` (a snapshot's)

    @property
    def saved(self) -> bool:
        """Whether the encoded packet is in the spool (or memory): it may be sent."""
        return self.ref is not None or self.data is not None

    def held_bytes(self) -> int:
        """What the packet takes until acknowledged: encoded, once saved."""
        return self.size if self.saved else self.raw_len


class _Flow(enum.Enum):
    """Whether a stream's packets may go to the relay (see the module docstring)."""

    OPEN = "open"  # every packet, in order
    HELD = "held"  # none: the relay answered Retry; waiting for the stream's backoff
    PROBING = "probing"  # only the probe (``retry_seq``), until it is acknowledged


@dataclass(slots=True)
class _NetStream:
    key: str
    trace_path: str
    channel: str
    index: int
    tracefile_size: int | None = None  # the stream's file limits (StreamDecl), None: none
    tracefile_count: int | None = None
    wire_id: int = -1  # id on the current connection
    base_seq: int | None = None  # the relay's next_seq when first declared
    unacked: collections.deque[_Pending] = field(default_factory=collections.deque)
    packets: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    acked_seq: int = -1
    finished: bool = False  # no more packets (its app exited, or it broke)
    close_queued: bool = False  # live: its StreamClose is queued on the current connection
    # After a Retry: the packet the relay must take first, why it did not,
    # when the held stream probes, the next hold's length, and whether the
    # probe went out on the current connection.
    flow: _Flow = _Flow.OPEN
    retry_seq: int = -1
    retry_reason: wire.RetryReason | None = None
    retry_text: str = ""
    hold_until: float = 0.0
    retry_backoff: float = RETRY_MIN
    probe_sent: bool = False

    def unacked_bytes(self) -> int:
        """What the unacknowledged packets take (compressed, once they are)."""
        return sum(p.held_bytes() for p in self.unacked)

    def probe(self) -> _Pending | None:
        """The packet a probing stream sends, once saved (None: not yet)."""
        for p in self.unacked:
            if p.seq == self.retry_seq:
                return p if p.saved else None
            if p.seq > self.retry_seq:
                break
        return None

    def sendable(self, p: _Pending) -> bool:
        """Whether ``p`` may go out now (it is not acknowledged, and the
        stream is open, or ``p`` is the probe not sent yet)."""
        if p.seq <= self.acked_seq:
            return False
        if self.flow is _Flow.OPEN:
            return True
        return self.flow is _Flow.PROBING and p.seq == self.retry_seq and not self.probe_sent


@dataclass(slots=True)
class _Trace:
    path: str
    metadata: bytearray = field(default_factory=bytearray)


class NetSession:
    """Streams one tracing session to a relay; see the module docstring."""

    def __init__(
        self, *, name: str, session_id: int, created: str, url: RelayURL, hostname: str,
        compress: bool = True, level: int = DEFAULT_COMPRESS_LEVEL,
        auth: tuple[str, bytes] | None = None, ca_file: str | None = None, live: bool = False,
        max_unacked_bytes: int = DEFAULT_SPOOL_SIZE, connect_timeout: float = 10.0,
        keepalive: float = 60.0, on_room: Callable[[], None] | None = None,
        opener: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
        spool: Spool | None = None, on_saved: Callable[[str, int, int], None] | None = None,
        inline_compress_ns: int = INLINE_COMPRESS_MAX_NS,
    ) -> None:
        self.name = name
        self.session_id = session_id
        self.created = created
        self.url = url
        self.hostname = hostname
        self.compress = compress
        self.level = level
        self.auth = auth
        self.ca_file = ca_file
        self.live = live
        self.max_unacked_bytes = max_unacked_bytes
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.on_room = on_room or (lambda: None)
        # on_saved(key, ring_end, ts_end): the packet is spooled (or, without
        # a spool, compressed): its ring space may go back to the producer.
        self.on_saved = on_saved or (lambda key, pos, ts: None)
        self.spool = spool
        # async () -> trio.abc.Stream; tests pass one over memory streams.
        self._opener = opener or self._open
        self.traces: dict[str, _Trace] = {}
        self.streams: dict[str, _NetStream] = {}
        self.by_wire_id: dict[int, _NetStream] = {}
        self.error: str | None = None
        self.connected = False
        # A connection is being declared or is up: what is added now is queued.
        self._linked = False
        self.last_failure: str | None = None
        # The last failure was the relay's transient Error ("CODE: text").
        self._unavailable: str | None = None
        self._reconnect_backoff = RECONNECT_MIN
        self.reconnects = 0  # connections established after the first (metrics)
        self._connections = 0
        self._hold_wakeup = trio.Event()  # a stream was held: the hold timer re-plans
        self.unacked_bytes = 0
        self._order = itertools.count()
        self._to_compress: collections.deque[_Pending] = collections.deque()
        self._compress_wakeup = trio.Event()
        # Compression in the drain loop (see submit): the session's one
        # compressor (made by the compressor task; the drain loop uses it
        # only while no batch is with the worker thread, so never at the
        # same time as the thread: zstd's context, ~1 MB, exists once),
        # whether a batch is with the thread, the CPU a raw byte took to
        # compress lately (ns; unknown until the first packet is compressed
        # in the thread), the bound.
        self._cctx: Any = None
        self._compress_busy = False
        self._compress_ns_per_byte = math.inf
        self.inline_compress_ns = inline_compress_ns
        self.compressed_inline = 0  # packets compressed in the drain loop (tests)
        # ("stream", _NetStream) | ("packet", _Pending) | ("metadata", _Trace, start, end)
        # | ("close", _NetStream) | ("end",)  (live sessions)
        self._outbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self._send_wakeup = trio.Event()
        self._sync_wanted = False  # a flush waits: ask where a stream stands once all is sent
        # The connection's TCP socket (a duplicate descriptor) for sending
        # spooled packets without trio's wrappers; None over TLS.
        self._raw: socket.socket | None = None
        # The sender task waits for work: the drain loop may send packets
        # itself (_pump); a packet it could not finish is left in _partial.
        self._sender_idle = False
        self._partial: _FileSend | None = None
        self._conn: wire.Connection | None = None
        self._next_wire_id: Iterator[int] = itertools.count()
        self._changed = trio.Event()
        self._cancel = trio.CancelScope()
        self._version = wire.PROTOCOL_VERSION  # what Hello says (1 after a refusal of 2)
        self._conn_version = 0  # what the current connection speaks
        # Chunk moves asked of the relay, by target: (source, done, failure).
        self._chunk_closes: dict[str, tuple[str, trio.Event, list[str]]] = {}
        # Live sessions: set once the SessionClose of finish_session() is sent.
        self._ended = trio.Event()

    # ------------------------------------------------------------ producer side
    def has_room(self) -> bool:
        """False while the spool is full, ``max_unacked_bytes`` are kept, or
        the relay refused: the drain loop leaves the data in the ring."""
        if self.spool is not None and not self.spool.has_room():
            return False
        return self.unacked_bytes < self.max_unacked_bytes and self.error is None

    def first_seq(self, key: str) -> int | None:
        """The seq the stream's first packet must carry, once the relay has
        said where the stream stands (a restarted consumerd continues the
        relay's file); None until then: the data waits in the ring buffer."""
        return self.streams[key].base_seq

    def add_trace(self, trace_id: str, path: str) -> None:
        """Declare a trace at ``path`` below the session (once per id).

        Raises:
            wire.ProtocolError: ``path`` is not a valid trace path.
        """
        wire.validate_trace_path(path)
        self.traces.setdefault(trace_id, _Trace(path))

    def add_metadata(self, trace_id: str, data: bytes) -> None:
        """Append to a trace's metadata (kept whole, re-sent on reconnect)."""
        tr = self.traces[trace_id]
        offset = len(tr.metadata)
        tr.metadata += data
        if self._linked:
            self._queue(("metadata", tr, offset, len(tr.metadata)))

    def add_stream(self, key: str, trace_id: str, channel: str, resume: bool = False, *,
                   tracefile_size: int = 0, tracefile_count: int = 0) -> SpoolRecord | None:
        """Add a stream.  A new stream starts at seq 0 at once.  A resumed one
        (a restarted consumerd) reloads its spool: the returned record (the
        last one spooled, or None) says where to resume reading the ring and
        the seq to continue from; with an empty spool it waits for the relay
        to say where the stream stands.  ``tracefile_size`` and
        ``tracefile_count`` (0: none) are the stream's file limits, which
        each StreamDecl carries to the relay."""
        if key in self.streams:
            return None
        st = _NetStream(key, self.traces[trace_id].path, channel, 0, tracefile_size=tracefile_size or None,
                        tracefile_count=tracefile_count or None)
        last = None
        if not resume:
            st.base_seq = 0
        elif self.spool is not None:
            for rec in self.spool.load(key):
                p = _Pending(next(self._order), st, rec.seq, rec.raw_len, rec.ts_begin, rec.ts_end,
                             rec.events_discarded, None, rec.ring_end, rec.ref, None, rec.ref.length,
                             wire.Codec(rec.codec))
                st.unacked.append(p)
                self.unacked_bytes += p.size
                st.packets += 1  # this consumerd delivers it: status counts it
                st.raw_bytes += rec.raw_len
                last = rec
            if last is not None:
                st.base_seq = last.seq + 1
        self.streams[key] = st
        if self._linked:
            self._queue(("stream", st))
        if st.unacked:
            self._outbox.extend(("packet", p) for p in st.unacked)
            self._send_wakeup.set()
        return last

    def finish_stream(self, key: str) -> None:
        """Stream ``key`` gets no more packets (its app exited, or the stream
        broke): once the relay has acknowledged everything it has, its spool
        segments go, so no descriptor is kept for it."""
        st = self.streams.get(key)
        if st is not None:
            st.finished = True
            self._forget_if_done(st)
            self._close_if_done(st)

    def _close_if_done(self, st: _NetStream) -> None:
        """Live sessions: a finished stream the relay holds whole gets a
        StreamClose, so that live viewers hang it up instead of waiting for
        its time to advance (docs/protocol.md, "Live viewing")."""
        if self.live and self._linked and st.finished and not st.unacked and not st.close_queued \
                and st.wire_id in self.by_wire_id:
            st.close_queued = True
            self._queue(("close", st))

    async def finish_session(self) -> None:
        """Live sessions: tell the relay the session is over (SessionClose,
        after everything queued), so that its live viewers end.  Returns
        once sent; the caller bounds the wait (and cancels run() after)."""
        if not self.live or not self._linked:
            return  # not connected: the relay's viewers end when it says so
        self._queue(("end",))
        await self._ended.wait()

    def _forget_if_done(self, st: _NetStream) -> None:
        """Delete a finished stream's spool once nothing of it is unacknowledged."""
        if st.finished and not st.unacked and self.spool is not None:
            self.spool.remove(st.key)

    def submit(self, key: str, raw: wire.Buffer | Sequence[wire.Buffer], seq: int, ts_begin: int,
               ts_end: int, discarded: int, ring_end: int = 0, packet_seq_num: int = -1) -> None:
        """Take one whole CTF packet of stream ``key``: ``raw``, or its parts
        back to back (the CTF header and a view of the ring, which must stay
        valid until ``on_saved`` says the packet is saved).  The header's
        ``packet_seq_num`` is ``seq`` unless given (a snapshot's are the
        sub-buffer numbers; ``seq`` must count 0, 1, 2... on the wire).

        Uncompressed, the packet is saved at once (written to the spool, or
        copied, without one); compressed, once the compressor is through.
        A spool that cannot be written fails the session (``error``).
        """
        st = self.streams[key]
        parts = [raw] if isinstance(raw, bytes | bytearray | memoryview) else list(raw)
        size = parts_size(parts)
        p = _Pending(next(self._order), st, seq, size, ts_begin, ts_end, discarded, parts, ring_end,
                     packet_seq_num=packet_seq_num)
        st.unacked.append(p)
        st.packets += 1
        st.raw_bytes += size
        self.unacked_bytes += size
        if not self.compress:
            self._save(p, parts, wire.Codec.NONE)
        elif self._cctx is not None and not self._to_compress and not self._compress_busy \
                and self._compress_ns_per_byte * size <= self.inline_compress_ns:
            # Cheap to compress and nothing queued before it (the order of
            # saves is the order of the ring): here, with no hand-off.
            data, ns = _compress_one(self._cctx, parts)
            self._compressed(size, ns)
            self.compressed_inline += 1
            self._save_compressed(p, parts, data)
        else:
            self._to_compress.append(p)
            self._compress_wakeup.set()

    def _compressed(self, raw_len: int, ns: int) -> None:
        """Takes note of the CPU a packet of ``raw_len`` bytes took to compress."""
        cost = ns / max(raw_len, 1)
        if math.isinf(self._compress_ns_per_byte):
            self._compress_ns_per_byte = cost
        else:
            self._compress_ns_per_byte += _COMPRESS_COST_WEIGHT * (cost - self._compress_ns_per_byte)

    def _save_compressed(self, p: _Pending, raw: list[wire.Buffer], data: bytes) -> bool:
        """Saves a compressed packet, or its raw parts if compressing did not
        make it smaller (incompressible data goes raw); see _save."""
        if len(data) < p.raw_len:
            return self._save(p, [data], wire.Codec.ZSTD)
        return self._save(p, raw, wire.Codec.NONE)

    def _save(self, p: _Pending, parts: list[wire.Buffer], codec: wire.Codec) -> bool:
        """Save a packet's encoded bytes (``parts``) in the spool, or in memory
        without one; then its ring space may go (``on_saved``) and it may be
        sent.  False: the spool could not be written; the session failed."""
        st = p.stream
        try:
            if self.spool is not None:
                p.ref = self.spool.append(st.key, parts, p.seq, p.ts_begin, p.ts_end, p.events_discarded,
                                          p.ring_end, p.raw_len, int(codec)).ref
                p.size = p.ref.length
            else:
                p.data = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)
                p.size = len(p.data)
        except OSError as exc:  # disk full: stop reading rings, say why
            self.error = f"cannot write the spool: {exc}"
            self._notify()
            return False
        p.parts = None
        p.codec = codec
        self.unacked_bytes -= p.raw_len - p.size
        # Sent (if it can go now) before its ring space goes back: while the
        # ring still holds it, it is sent from there (see _pump).
        wake = False
        if st.sendable(p):  # a held stream's packets wait for its release
            self._outbox.append(("packet", p))
            wake = not self._pump(p, parts)
        self.on_saved(st.key, p.ring_end, p.ts_end)
        if wake:
            self._send_wakeup.set()
        return True

    def _pump(self, fresh: _Pending | None = None, parts: list[wire.Buffer] | None = None) -> bool:
        """Send the spooled packets at the head of the outbox from here, the
        drain loop, while the sender task is idle and the socket takes them
        whole: no wake-up of the sender per packet.  True: the outbox is
        empty (nothing for the sender to do); False: the sender must run (a
        packet left half sent in ``_partial``, something else queued, a
        failure for it to meet).

        ``fresh``, just saved, still has its bytes in memory (``parts``: the
        ring's shared memory, or the compressor's output): it goes from
        there with one ``sendmsg``, which costs the kernel less than
        ``sendfile`` from the spool (on tmpfs, 0.3 against 0.55 s/GB to a
        loopback socket); what the socket did not take follows from the
        spool."""
        raw, conn = self._raw, self._conn
        if not self._sender_idle or raw is None or conn is None or self._partial is not None:
            return not self._outbox
        outbox = self._outbox
        while outbox:
            item = outbox[0]
            if item[0] != "packet" or item[1].ref is None:
                return False
            p: _Pending = item[1]
            outbox.popleft()
            if not p.stream.sendable(p):
                continue
            try:
                head = self._start_sending(conn, p)
            except wire.ProtocolError:
                outbox.appendleft(item)  # the sender meets the error, and the connection ends
                return False
            assert p.ref is not None
            job = _FileSend(head, p.ref)
            try:
                done = job.send_from(raw, parts) if p is fresh and parts is not None else job.push(raw)
            except OSError:
                done = False  # the sender's next write meets the failure
            if not done:
                self._partial = job
                return False
        return True

    def _queue(self, item: tuple[Any, ...]) -> None:
        self._outbox.append(item)
        self._send_wakeup.set()

    def _compressing(self) -> bool:
        """Whether a submitted packet is still with the compressor."""
        return any(not p.saved for st in self.streams.values() for p in st.unacked)

    async def wait_all_acked(self) -> None:
        """Return once every submitted packet is acknowledged.

        Raises:
            SinkError: the relay refused the session.
        """
        await self.wait_acked(None)

    async def wait_acked(self, keys: Sequence[str] | None) -> None:
        """Return once every packet of streams ``keys`` (None: of every
        stream, those added meanwhile too) is acknowledged.

        Raises:
            SinkError: the relay refused the session.
        """
        # Ask the relay where a stream stands once everything submitted is
        # sent: it answers only after writing (and, in fsync mode, syncing)
        # all that came before, so the acks come now rather than at the end
        # of its sync window.
        self._sync_wanted = True
        self._send_wakeup.set()
        while True:
            if self.error:
                raise SinkError(self.error)
            streams = self.streams.values() if keys is None else [self.streams[k] for k in keys if k in self.streams]
            if not any(st.unacked for st in streams):
                return
            await self._changed.wait()

    def drop_stream(self, key: str) -> None:
        """Forget stream ``key`` (all of it acknowledged: a closed chunk's):
        closed on the wire, never declared again, its spool gone."""
        st = self.streams.pop(key, None)
        if st is None:
            return
        had_room = self.has_room()
        self.unacked_bytes -= sum(p.held_bytes() for p in st.unacked)
        self._purge(st)
        if self.by_wire_id.get(st.wire_id) is st:
            del self.by_wire_id[st.wire_id]
            if self._linked:
                self._queue(("stream_close", st.wire_id))
        if self.spool is not None:
            self.spool.remove(key)
        if not had_room and self.has_room():
            self.on_room()

    def drop_trace(self, trace_id: str) -> None:
        """Forget a trace (a closed chunk's): its metadata is not sent again."""
        self.traces.pop(trace_id, None)

    async def close_chunk(self, source: str, target: str) -> None:
        """Ask the relay to move the chunk directory ``source`` to ``target``
        (below the session's directory) and wait until it says it did.

        Raises:
            SinkError: the relay refused the session, or cannot move chunks
                (protocol 1).
        """
        wire.validate_trace_path(source)
        wire.validate_trace_path(target)
        done, failure = trio.Event(), list[str]()
        self._chunk_closes[target] = (source, done, failure)
        if self._linked:
            self._queue(("chunk_close", source, target))
        try:
            while not done.is_set():
                if self.error:
                    raise SinkError(self.error)
                await self._changed.wait()
        finally:
            self._chunk_closes.pop(target, None)
        if failure:
            raise SinkError(failure[0])

    def stats(self, key: str) -> dict[str, int]:
        """Stream ``key``'s packets, raw and wire bytes, and unacked packets
        (and the bytes they take)."""
        st = self.streams[key]
        return {
            "packets": st.packets,
            "raw_bytes": st.raw_bytes,
            "wire_bytes": st.wire_bytes,
            "unacked": len(st.unacked),
            "unacked_bytes": st.unacked_bytes(),
        }

    def relay_state(self, key: str) -> tuple[RelayState | None, str | None]:
        """Why the relay does not take stream ``key``'s packets now, and the
        detail: the session failed for good, there is no connection (the
        relay unreachable, or it closed the connection for now), or the
        relay answered Retry for this stream.  (None, None): it takes them."""
        st = self.streams[key]
        if self.error:
            return RelayState.REFUSED, self.error
        if not self.connected and self.last_failure:
            if self._unavailable:
                return RelayState.UNAVAILABLE, self._unavailable
            return RelayState.UNREACHABLE, self.last_failure
        if st.flow is not _Flow.OPEN and st.retry_reason is not None:
            return _HELD_STATE[st.retry_reason], st.retry_text or st.retry_reason.name
        return None, None

    async def wait_change(self) -> None:
        """Wait until an acknowledgement, a refusal or a reconnect happens."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------ tasks
    async def run(self) -> None:
        """Compress forever and keep a connection up until cancelled or refused."""
        with self._cancel:
            # Start the worker thread now, not when the first packet (of a
            # ring filling at full speed) needs it.
            await trio.to_thread.run_sync(lambda: None)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._compress_loop)
                nursery.start_soon(self._hold_loop)
                if self.spool is not None:
                    nursery.start_soon(self._trim_loop, self.spool)
                await self._connection_loop()
                nursery.cancel_scope.cancel()

    def close(self) -> None:
        """Stop ``run()``: the connection and the compressor."""
        self._cancel.cancel()

    async def _compress_loop(self) -> None:
        if not self.compress:
            return  # packets are saved as they are submitted
        import zstandard

        cctx = self._cctx = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        # The session's own compression thread (tracewire/iothread.py):
        # about half the CPU of a trio worker-thread round trip per batch.
        worker = IoThread("tw-compress")
        try:
            await self._compress_batches(cctx, worker)
        finally:
            worker.close()

    async def _compress_batches(self, cctx: Any, worker: IoThread) -> None:
        while True:
            while not self._to_compress:
                await self._compress_wakeup.wait()
                self._compress_wakeup = trio.Event()
            # Whatever is queued goes to the worker thread in one hand-off:
            # the thread round trip costs more of the event loop's CPU than
            # the compression bookkeeping, so it is paid per batch, not per
            # packet (docs/design.md, "Where the consumer's CPU goes").
            batch: list[_Pending] = []
            size = 0
            while self._to_compress and size < _COMPRESS_BATCH_BYTES:
                p = self._to_compress.popleft()
                batch.append(p)
                size += p.raw_len
            raws = [p.parts or [] for p in batch]  # unsaved: every one has its parts
            self._compress_busy = True
            try:
                results = await worker.run(partial(_compress_all, cctx, raws))
                for p, raw, (data, ns) in zip(batch, raws, results, strict=True):
                    self._compressed(p.raw_len, ns)
                    if not self._save_compressed(p, raw, data):
                        return
            finally:
                self._compress_busy = False

    @staticmethod
    async def _trim_loop(spool: Spool) -> None:
        """Give back the spool's spare segments a stream no longer needs."""
        while True:
            await trio.sleep(spool.trim_after)
            spool.trim()

    async def _connection_loop(self) -> None:
        while self.error is None:
            try:
                try:
                    await self._one_connection()
                    return
                except BaseExceptionGroup as group:
                    raise _leaf(group) from None
            except _VersionRefused as exc:
                if self._version > 1:
                    logger.warning("session %s: relay %s does not speak protocol %d (%s); using protocol 1 "
                                   "(no rotation through it)", self.name, self.url, self._version, exc)
                    self._version = 1
                    continue
                self.error = str(exc)
                self._outbox.clear()
                logger.error("session %s: relay %s refused: %s", self.name, self.url, exc)
                self._notify()
                return
            except SinkError as exc:
                self.error = str(exc)
                self._outbox.clear()
                logger.error("session %s: relay %s refused: %s", self.name, self.url, exc)
                self._notify()
                return
            except _NETWORK_ERRORS as exc:
                if isinstance(exc, RelayUnavailable):
                    self._unavailable = str(exc)
                    self.last_failure = f"relay: {exc}"
                else:
                    self._unavailable = None
                    self.last_failure = f"{type(exc).__name__}: {exc}"
                logger.warning("session %s: relay %s: %s; retrying in %.1f s",
                               self.name, self.url, self.last_failure, self._reconnect_backoff)
            finally:
                self.connected = False
            self._notify()  # status, and whoever waits for a change, see the failure
            await trio.sleep(self._reconnect_backoff)
            self._reconnect_backoff = min(self._reconnect_backoff * 2, RECONNECT_MAX)

    async def _open(self) -> trio.abc.Stream:
        with trio.fail_after(self.connect_timeout):
            tcp = await trio.open_tcp_stream(self.url.host, self.url.port)
            try:
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Data unacknowledged by the relay's TCP for this long breaks
                # the connection, so a long outage ends in a reconnect rather
                # than in retransmission backoff (which doubles up to minutes).
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 10_000)
            except (OSError, AttributeError):
                pass
            if not self.url.tls:
                return tcp
            try:
                ctx = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise SinkError(f"cannot load the CA file {self.ca_file}: {exc}") from None
            s = trio.SSLStream(tcp, ctx, server_hostname=self.url.host)
            try:
                await s.do_handshake()
            except trio.BrokenResourceError as exc:
                if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                    # Not a network hiccup: retrying cannot help.
                    raise SinkError(
                        f"TLS: the relay's certificate is not trusted ({exc.__cause__.verify_message}); "
                        "give its CA with --tls-ca"
                    ) from None
                raise
            return s

    async def _one_connection(self) -> None:
        with trio.fail_after(self.connect_timeout):
            stream = await self._opener()
        conn = wire.Connection(wire.Role.CONSUMER)
        self._conn_version = 0
        if isinstance(stream, trio.SocketStream):
            self._raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
            self._raw.setblocking(False)
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._handshake(stream, conn)
                    await self._declare_all(stream, conn)
                except (trio.BrokenResourceError, OSError):
                    await self._last_word(stream, conn)
                    raise
                self.connected = True
                self._conn = conn
                self._connections += 1
                self.reconnects = self._connections - 1
                self._reconnect_backoff = RECONNECT_MIN  # this relay works: the next failure retries soon
                logger.info("session %s: connected to %s", self.name, self.url)
                self._notify()
                nursery.start_soon(self._reader, stream, conn)
                await self._sender(stream, conn)
        finally:
            self.connected = self._linked = self._sender_idle = False
            self._partial = self._conn = None
            if self._raw is not None:
                self._raw.close()
                self._raw = None
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await stream.aclose()

    async def _last_word(self, stream: trio.abc.Stream, conn: wire.Connection) -> None:
        """A write failed: the relay may have closed the connection after
        saying why (an Error we have not read yet).  Read what is left, for
        up to a second; raise what ``_recv`` raises for an Error there."""
        with trio.move_on_after(1.0):
            try:
                while True:
                    await self._recv(stream, conn)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, wire.ProtocolError):
                return

    async def _recv(self, stream: trio.abc.Stream, conn: wire.Connection) -> wire.Message:
        while True:
            ev = conn.next_event()
            if ev is not None:
                if isinstance(ev, wire.Error):
                    try:
                        code = wire.ErrorCode(ev.code).name
                    except ValueError:
                        code = str(ev.code)
                    if ev.code in wire.TRANSIENT_ERRORS:
                        raise RelayUnavailable(f"{code}: {_shown(ev.text)}")
                    if ev.code == wire.ErrorCode.VERSION:
                        raise _VersionRefused(f"relay refused ({code}): {_shown(ev.text)}")
                    raise SinkError(f"relay refused ({code}): {_shown(ev.text)}")
                if isinstance(ev, wire.ConnectionClosed):
                    raise trio.BrokenResourceError("relay closed the connection")
                return ev
            data = await stream.receive_some(256 * 1024)
            conn.receive_data(data)

    async def _send(self, stream: trio.abc.Stream, conn: wire.Connection, msg: wire.Message) -> int:
        parts = conn.send_parts(msg)
        n = 0
        for part in parts:
            await stream.send_all(part)
            n += len(part)
        return n

    def _start_sending(self, conn: wire.Connection, p: _Pending) -> bytes:
        """The frame head of saved packet ``p``, which goes out now (its
        payload follows: ``p.data``, or the spool's bytes); counts the bytes
        and marks a probe sent.

        Raises:
            wire.ProtocolError: the connection may not send it.
        """
        st = p.stream
        payload = p.data if p.data is not None else wire.OutOfBand(p.size)
        head = conn.send_parts(wire.Packet(
            st.wire_id, p.seq, p.codec, p.raw_len, p.ts_begin, p.ts_end,
            p.events_discarded, p.raw_len * 8, p.raw_len * 8, p.seq if p.packet_seq_num < 0 else p.packet_seq_num,
            payload,
        ))[0]
        if st.flow is _Flow.PROBING:
            st.probe_sent = True  # the relay takes seq retry_seq once more, once
        st.wire_bytes += len(head) + p.size
        return bytes(head)

    async def _send_packet(self, stream: trio.abc.Stream, conn: wire.Connection, p: _Pending) -> None:
        """Send a saved packet.  A spooled one goes from the spool file to a
        TCP socket with ``os.sendfile`` (the kernel hands the file's pages to
        the socket: no copy in Python); over TLS, or another stream, it is
        read back first."""
        head = self._start_sending(conn, p)
        if p.data is not None:
            await stream.send_all(head)
            if p.size:
                await stream.send_all(p.data)
            return
        assert p.ref is not None
        if self._raw is not None:
            await _FileSend(head, p.ref).finish(self._raw)
        else:
            await stream.send_all(head)
            if p.size:
                await stream.send_all(p.ref.read())

    async def _handshake(self, stream: trio.abc.Stream, conn: wire.Connection) -> None:
        key_id = self.auth[0] if self.auth else None
        with trio.fail_after(self.connect_timeout):
            await self._send(stream, conn, wire.Hello(self._version, self.hostname, key_id))
            ev = await self._recv(stream, conn)
            if isinstance(ev, wire.Challenge):
                if self.auth is None:
                    raise SinkError("the relay requires a key (use --auth-key-file)")
                mac = wire.compute_auth_mac(self.auth[1], ev.nonce, self.hostname, self.auth[0])
                await self._send(stream, conn, wire.Auth(mac))
                ev = await self._recv(stream, conn)
            if not isinstance(ev, wire.Welcome):
                raise SinkError(f"unexpected {type(ev).__name__} in the handshake")
            self._conn_version = ev.server_version

    async def _declare_all(self, stream: trio.abc.Stream, conn: wire.Connection) -> None:
        """(Re)declare everything and resume every stream where the relay stands.

        What is there when it starts is declared here; a trace, metadata or
        stream added meanwhile (a replay arrives while the connection is set
        up) is queued, and sent once this returns.
        """
        # No await until the snapshot: what is queued from now on is new.
        self._linked = True
        self._outbox.clear()
        traces, streams = list(self.traces.values()), list(self.streams.values())
        await self._send(stream, conn, wire.SessionDecl(self.session_id, self.name, self.created, self.live))
        for tr in traces:
            if tr.metadata:
                await self._send(stream, conn, wire.Metadata(self.session_id, tr.path, 0, bytes(tr.metadata)))
        self.by_wire_id.clear()
        ids = itertools.count()
        for st in streams:
            st.wire_id = next(ids)
            self.by_wire_id[st.wire_id] = st
            decl = wire.StreamDecl(st.wire_id, self.session_id, st.trace_path, st.channel, st.index,
                                       st.tracefile_size, st.tracefile_count)
            await self._send(stream, conn, decl)
            await self._send(stream, conn, wire.StreamStateRequest(st.wire_id))
        self._next_wire_id = ids
        waiting = set(self.by_wire_id)
        with trio.fail_after(self.connect_timeout):
            while waiting:
                ev = await self._recv(stream, conn)
                if isinstance(ev, wire.StreamState):
                    waiting.discard(ev.stream_id)
                    self._stream_state(self.by_wire_id[ev.stream_id], ev.next_seq)
                elif isinstance(ev, wire.Ack):
                    self._acknowledge(self.by_wire_id[ev.stream_id], ev.seq)
                elif isinstance(ev, wire.Retry):
                    self._retry(self.by_wire_id[ev.stream_id], ev)
        for st in streams:
            st.probe_sent = False
            st.close_queued = False
            self._close_if_done(st)
            if st.flow is not _Flow.OPEN and st.unacked:
                # The relay has just said where the stream stands: the probe
                # is the first packet it lacks (there is no rewind to make on
                # a new connection, and no gap must be left).
                st.retry_seq = st.unacked[0].seq
        # Resend what is compressed and unacknowledged, in submission order,
        # after the traces and streams added meanwhile: every packet of an
        # open stream, the probe of a probing one, nothing of a held one.
        # Packets still being compressed follow through the compressor.
        added = [item for item in self._outbox if item[0] not in ("packet", "chunk_close", "stream_close")]
        added += [("chunk_close", src, target) for target, (src, _done, _failure) in self._chunk_closes.items()]
        pending = sorted(
            (p for st in self.streams.values() for p in st.unacked if p.saved and st.sendable(p)),
            key=lambda p: p.order,
        )
        self._outbox.clear()
        self._outbox.extend(added)
        self._outbox.extend(("packet", p) for p in pending)
        self._send_wakeup.set()

    async def _sender(self, stream: trio.abc.Stream, conn: wire.Connection) -> None:
        try:
            await self._send_loop(stream, conn)
        except (trio.BrokenResourceError, OSError):
            # The relay may have said why it closed the connection: give the
            # reader a moment to take its Error (it then ends this task).
            with trio.move_on_after(1.0):
                await trio.sleep_forever()
            raise

    async def _send_loop(self, stream: trio.abc.Stream, conn: wire.Connection) -> None:
        burst = 0
        while True:
            if burst >= _SEND_BURST:
                burst = 0
                await trio.lowlevel.checkpoint()  # let the drain loops and the reader run
            if self._partial is not None:  # what _pump() began: before anything else
                assert self._raw is not None
                await self._partial.finish(self._raw)
                self._partial = None
            while not self._outbox and self._partial is None:
                if self._sync_wanted and self.by_wire_id and not self._compressing():
                    self._sync_wanted = False  # see wait_all_acked
                    await self._send(stream, conn, wire.StreamStateRequest(max(self.by_wire_id)))
                    continue
                self._send_wakeup = trio.Event()
                self._sender_idle = True
                try:
                    with trio.move_on_after(self.keepalive) as idle:
                        await self._send_wakeup.wait()
                finally:
                    self._sender_idle = False
                if idle.cancelled_caught and self.by_wire_id and self._partial is None:
                    # Nothing to send for a while: ask where a stream stands,
                    # so the relay's idle timeout never drops a quiet session.
                    await self._send(stream, conn, wire.StreamStateRequest(max(self.by_wire_id)))
            if self._partial is not None:
                continue  # a packet _pump() began while we waited: finished first, at the top
            item = self._outbox.popleft()
            kind = item[0]
            if kind == "stream":
                st = item[1]
                st.wire_id = next(self._next_wire_id)
                self.by_wire_id[st.wire_id] = st
                decl = wire.StreamDecl(st.wire_id, self.session_id, st.trace_path, st.channel, st.index,
                                       st.tracefile_size, st.tracefile_count)
                await self._send(stream, conn, decl)
                await self._send(stream, conn, wire.StreamStateRequest(st.wire_id))
            elif kind == "packet":
                p: _Pending = item[1]
                if not p.stream.sendable(p):  # acknowledged, or its stream is held
                    continue
                await self._send_packet(stream, conn, p)
                burst += 1
            elif kind == "metadata":
                _, tr, start, end = item
                chunk = wire.Metadata(self.session_id, tr.path, start, bytes(tr.metadata[start:end]))
                await self._send(stream, conn, chunk)
            elif kind == "stream_close":
                if item[1] in conn.streams:
                    await self._send(stream, conn, wire.StreamClose(item[1]))
            elif kind == "chunk_close":
                _, source, target = item
                if self._conn_version < wire.CHUNKS_VERSION:
                    pending = self._chunk_closes.get(target)
                    if pending is not None:
                        pending[2].append(f"relay {self.url} speaks protocol {self._conn_version}: it cannot "
                                          "archive trace chunks (upgrade it to rotate through it)")
                        pending[1].set()
                        self._notify()
                    continue
                await self._send(stream, conn, wire.ChunkClose(self.session_id, source, target))
            elif kind == "close":
                done: _NetStream = item[1]
                if self.by_wire_id.get(done.wire_id) is done and not done.unacked:
                    del self.by_wire_id[done.wire_id]
                    await self._send(stream, conn, wire.StreamClose(done.wire_id))
            elif kind == "end":
                await self._send(stream, conn, wire.SessionClose(self.session_id))
                self._ended.set()

    async def _reader(self, stream: trio.abc.Stream, conn: wire.Connection) -> None:
        while True:
            ev = await self._recv(stream, conn)
            if isinstance(ev, wire.ChunkClosed):
                pending = self._chunk_closes.get(ev.target)
                if pending is not None:
                    pending[1].set()
                    self._notify()
                continue
            st = self.by_wire_id.get(getattr(ev, "stream_id", -1))
            if st is None:
                continue
            if isinstance(ev, wire.Ack):
                self._acknowledge(st, ev.seq)
            elif isinstance(ev, wire.StreamState):
                self._stream_state(st, ev.next_seq)
            elif isinstance(ev, wire.Retry):
                self._retry(st, ev)

    def _stream_state(self, st: _NetStream, next_seq: int) -> None:
        if st.base_seq is None:
            st.base_seq = next_seq
            st.acked_seq = next_seq - 1
            self.on_room()
        self._acknowledge(st, next_seq - 1)

    def _acknowledge(self, st: _NetStream, seq: int) -> None:
        if seq <= st.acked_seq:
            return
        # Before anything is freed: either limit (the spool's cap, or
        # max_unacked_bytes) may be the one that held the drain loop back,
        # and it must hear that room came back or the rings wait for ever.
        had_room = self.has_room()
        st.acked_seq = seq
        freed = 0
        while st.unacked and st.unacked[0].seq <= seq:
            p = st.unacked.popleft()
            freed += p.held_bytes()
        if self.spool is not None:
            self.spool.acknowledged(st.key, seq)
            self._forget_if_done(st)
        self._close_if_done(st)
        self.unacked_bytes -= freed
        if not had_room and self.has_room():
            self.on_room()
        if st.flow is not _Flow.OPEN and seq >= st.retry_seq:
            self._reopen(st)
        self._notify()

    # ------------------------------------------------------------ Retry
    def _retry(self, st: _NetStream, msg: wire.Retry) -> None:
        """The relay did not write packet ``msg.seq`` of ``st`` (a failure
        that can heal): hold the stream for its backoff, then probe."""
        if msg.seq <= st.acked_seq:
            # The relay promises a Retry's seq is above its last Ack: this
            # one names a packet it has written.  Nothing to hold.
            logger.warning("session %s: stream %s: Retry for seq %d, acknowledged already; ignored",
                           self.name, st.key, msg.seq)
            return
        st.flow = _Flow.HELD
        st.retry_seq = msg.seq
        st.retry_reason, st.retry_text = msg.reason, _shown(msg.text)
        st.probe_sent = False
        st.hold_until = trio.current_time() + st.retry_backoff
        logger.warning("session %s: relay %s did not write stream %s at seq %d (%s: %s); "
                       "holding it for %.2f s", self.name, self.url, st.key, msg.seq,
                       msg.reason.name, st.retry_text, st.retry_backoff)
        st.retry_backoff = min(st.retry_backoff * 2, RETRY_MAX)
        self._purge(st)
        self._hold_wakeup.set()
        self._notify()

    def _purge(self, st: _NetStream) -> None:
        """Take the queued packets of ``st`` out of the outbox."""
        if any(item[0] == "packet" and item[1].stream is st for item in self._outbox):
            self._outbox = collections.deque(
                item for item in self._outbox if not (item[0] == "packet" and item[1].stream is st))

    def _reopen(self, st: _NetStream) -> None:
        """The relay took the probe (or more): ``st`` is open again, and the
        rest of what it holds goes out, in order, once each."""
        logger.info("session %s: relay %s takes stream %s again (from seq %d)",
                    self.name, self.url, st.key, st.acked_seq + 1)
        st.flow = _Flow.OPEN
        st.retry_reason, st.retry_text = None, ""
        st.retry_backoff = RETRY_MIN
        st.probe_sent = False
        self._purge(st)
        if self._linked:
            self._outbox.extend(("packet", p) for p in st.unacked if p.saved)
            self._send_wakeup.set()

    async def _hold_loop(self) -> None:
        """Move each held stream to probing when its backoff ends (whether
        or not a connection is up: the timers are the streams')."""
        while True:
            held = [st for st in self.streams.values() if st.flow is _Flow.HELD]
            with trio.move_on_at(min((st.hold_until for st in held), default=math.inf)):
                await self._hold_wakeup.wait()
            self._hold_wakeup = trio.Event()
            now = trio.current_time()
            for st in held:
                if st.flow is _Flow.HELD and st.hold_until <= now:
                    self._start_probe(st)

    def _start_probe(self, st: _NetStream) -> None:
        """Send ``st``'s probe: its packet ``retry_seq`` alone (now if it is
        compressed and a connection is up; else the compressor or the next
        declaration sends it)."""
        st.flow = _Flow.PROBING
        st.probe_sent = False
        logger.info("session %s: probing relay %s with stream %s seq %d",
                    self.name, self.url, st.key, st.retry_seq)
        p = st.probe()
        if p is not None and self._linked:
            self._queue(("packet", p))
