"""tracewire-consumerd: turns ring-buffer sub-buffers into CTF packets in a sink.

Theory of operation
-------------------
consumerd is spawned by sessiond with one end of a SEQPACKET socketpair
(``--control-fd``).  sessiond sends it the operations of ``tracewire.ops``:
sessions (each with its sink: a directory or a relay URL), traces (a
directory and its metadata) and streams (a ring buffer memfd and its eventfd,
with SCM_RIGHTS).  Every message is decoded with ``decode_op`` and handled by
one ``match`` on its class; every handler returns a typed reply, sent back
with the request's ``seq``.  A message that does not decode, and a request
that cannot be carried out (an unknown session or trace, a bad sink, a relay
that refused), is answered with an ``ErrorReply``; anything else that goes
wrong is a bug: logged with its traceback and answered as an internal error.
consumerd goes on serving either way.

One trio task per stream waits for its eventfd (no polling), takes the closed
sub-buffers the eventfd announced, prepends the 84-byte CTF packet header and
context, and hands the packet to the stream's sink (consumerd/sinks.py: local
files, or a relay), then releases the space to the producer — at once, or,
for a sink with ``deferred_release``, once the sink says the packet is saved.
A sink without room leaves the data in the ring until it calls ``on_room``.
A switch timer, a ``flush`` request (the stop barrier) and a
``producer_gone`` notice (the app exited or died) also take the open
sub-buffer up to the last whole event.  In a live session (``SessionOp.live``;
its streams' switch timer is the live timer at most) a timer tick that finds
nothing new writes an empty *beacon* packet instead, whose end time says how
far the stream's time has come (``_beacon``; docs/design.md, "Live viewing").

Apps are untrusted: each can write its own ring.  A stream whose ring cannot
be mapped (a bad magic or geometry, a memfd the app could shrink) is
*quarantined* at ``add_stream``: the request is done (a replay carries on past
it), nothing is read from it, ``status`` shows why.  A stream whose control
words turn out corrupt while it is drained is *broken*: counted, logged and
closed.  Either way consumerd and the other streams go on.

Descriptors: a stream holds its eventfd, its mapping and its sink's files
until it is closed — at once when it breaks, and once its app is gone and
everything it wrote is out of the ring (``producer_gone`` answers released).
Nothing is kept per exited app, so a session tracing many short-lived apps
does not run consumerd out of descriptors.  If it is out of them anyway,
a request whose descriptors the kernel had to cut off (``MSG_CTRUNC``) is
answered with an error, never left without an answer.

A *snapshot session*'s streams are *held*: mapped, never drained (no task
waits for their eventfd; flushes skip them; a dead app's ring is kept), and
read only by ``snapshot`` requests (consumerd/snapshot.py), which any
session may get.  consumerd keeps each trace's metadata text for them.

Rotation (``rotate``): every stream of the session is drained to its last
whole event (waiting for room in the sink, as the stop barrier does), then,
with no checkpoint in between, each stream's sink is closed and reopened in
the next trace chunk (``SessionSink.begin_chunk``: new files, a copy of the
metadata, ``packet_seq_num`` from 0).  A packet is written to exactly one
chunk: the ones taken before the switch to the old, every later one to the
new.  Then ``SessionSink.close_chunk`` waits until the old chunk is complete
in the sink (a relay acknowledged all of it) and moves it to
``archives/<begin>-<end>-<index>/``.  A rotation whose switch is done but
whose close timed out is completed by the next ``rotate`` of the same chunk.

This module knows no sink type: what a sink does with a packet, a trace's
metadata or a flush is the sink's (consumerd/sinks.py).
"""

from __future__ import annotations

import logging
import math
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from consumerd import snapshot
from consumerd.sinks import RelaySink, SessionSink, SinkError, StreamSink, open_sink
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
    RotatedReply,
    RotateOp,
    SessionOp,
    SnapshotOp,
    StatusOp,
    StreamsReply,
    StreamStats,
    TraceReply,
    decode_op,
)
from tracewire.control import ControlError, close_fds
from tracewire.names import InvalidName, validate_name
from tracewire.ops import MessageError, encode
from tracewire.ringbuf import BufferSpec, Chunk, ConsumerCursor, MemoryBarrier, RingBufferCorrupt
from tracewire.seqpacket import DescriptorsTruncated, SeqPacket

__all__ = ["ConsumerdConfig", "serve_consumerd"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConsumerdConfig:
    """How sessiond started consumerd: its control socket, and whether to
    force the cross-CPU memory barrier before a flush reads a ring."""

    control_fd: int
    force_barrier: bool = False
    # The tracer's clock (live sessions' idle beacons read it).
    clock: Callable[[], int] = time.monotonic_ns


# Seconds a removed live session waits for its SessionClose to be sent.
_LIVE_END_TIMEOUT = 2.0
# A live stream's idle beacon is at least this far behind the clock.
_BEACON_MIN_MARGIN_MS = 100


class RequestError(Exception):
    """A request from sessiond that cannot be carried out."""


# Errors that refuse one request; any other exception is a bug.  A corrupt
# ring is not one: its stream is quarantined, the request carried out.
_REFUSALS = (RequestError, snapshot.RequestError, InvalidName, SinkError, OSError)


@dataclass
class SessionOut:
    """A declared session and its sink (a snapshot session's holds nothing:
    each snapshot opens its own)."""

    name: str
    sink: SessionSink
    op: SessionOp
    chunk: int = 0  # the trace chunk the streams write to


@dataclass
class TraceOut:
    """One app's trace in a session."""

    trace_id: str
    session: str
    directory: str  # where the sink put it, as add_trace answered
    uuid: bytes
    path: str = ""  # below the session's sink
    # The TSDL text so far, for snapshots (a few KiB per app; sessiond
    # counts it against the app's uid).
    metadata: bytearray = field(default_factory=bytearray)


@dataclass
class StreamOut:
    """One stream: its ring (cursor, eventfd), its sink and its state."""

    key: str
    session: str
    trace: TraceOut
    channel: str
    stream_class: int
    cursor: ConsumerCursor
    eventfd: int
    sink: StreamSink
    switch_timer_ms: int
    next_seq: int = 0
    seq_known: bool = True  # False: a resumed stream waits for its sink's word
    blocked: bool = False  # the sink is full: data waits in the ring
    packets: int = 0
    raw_bytes: int = 0
    chunk_bytes: int = 0  # raw bytes written to the current trace chunk
    events: int = 0  # the ring's ``events`` word as last read (kept once the ring is unmapped)
    gone: bool = False
    broken: str | None = None
    closed: bool = False
    held: bool = False  # a snapshot session's: never drained, only read by snapshots
    tracefile_size: int = 0  # the channel's stream file limits (kept for the next trace chunk)
    tracefile_count: int = 0
    live: bool = False  # a live session's: an idle timer tick writes a beacon (an empty packet)
    done: trio.Event = field(default_factory=trio.Event)
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass
class Quarantined:
    """A stream whose ring could not even be mapped (a bad magic or geometry
    the app wrote): nothing is read from it, status shows why."""

    key: str
    session: str
    channel: str
    path: str
    error: str
    gone: bool = False

    def stats(self) -> StreamStats:
        """What ``status`` shows of it."""
        return StreamStats(key=self.key, path=self.path, channel=self.channel,
                           producer="gone" if self.gone else "alive", error=self.error)


@dataclass
class Gone:
    """A dead app's stream that a restarted consumerd delivers from its sink
    alone (a relay sink's spool; its ring is freed): status shows it."""

    key: str
    session: str
    channel: str
    sink: StreamSink

    def stats(self) -> StreamStats:
        """What ``status`` shows of it: its sink's counters."""
        return self.sink.stats(StreamStats(key=self.key, path=self.sink.path, channel=self.channel, producer="gone"))


def _seq(msg: dict[str, object]) -> int | None:
    """The request's ``seq``, to echo in the reply (None if it has none)."""
    seq = msg.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _truncated(msg: dict[str, object]) -> ErrorReply:
    """The answer to a request whose descriptors were cut off in transit
    (``MSG_CTRUNC``): consumerd has no room for them.  Logged as well."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    why = (f"consumerd is out of file descriptors (limit {soft}): the descriptors sent with "
           f"{str(msg.get('op'))[:40]!r} were cut off")
    logger.error("%s", why)
    return ErrorReply(why)


class Consumerd:
    """consumerd's state; its methods run in one trio event loop."""

    def __init__(self, config: ConsumerdConfig, conn: SeqPacket, nursery: trio.Nursery) -> None:
        self.config = config
        self.conn = conn
        self.nursery = nursery
        self.sessions: dict[str, SessionOut] = {}
        self.traces: dict[str, TraceOut] = {}
        self.streams: dict[str, StreamOut] = {}
        self.quarantined: dict[str, Quarantined] = {}
        self.gone: dict[str, Gone] = {}
        self.broken_streams = 0  # streams quarantined or abandoned for a corrupt ring or a failed write
        self.barrier = MemoryBarrier(force=config.force_barrier)

    # ------------------------------------------------------------- requests
    async def run(self) -> None:
        """Answer sessiond's requests until it goes away: one at a time, but
        for flushes, which are answered when done."""
        while True:
            try:
                got = await self.conn.receive()
            except DescriptorsTruncated as exc:
                # Answered, or sessiond would wait for this seq in vain.
                await self.conn.send(encode(_truncated(exc.message), _seq(exc.message)))
                continue
            except ControlError as exc:
                logger.error("bad request from sessiond: %s", exc)
                continue
            if got is None:
                logger.info("sessiond closed the control socket; exiting")
                return
            msg, fds = got
            if msg.get("op") in (FlushOp.KIND, SnapshotOp.KIND, RotateOp.KIND):
                # A stop barrier can wait minutes for a relay (a full disk):
                # meanwhile status, new apps' streams and the owner's other
                # sessions are answered (replies carry their request's seq).
                self.nursery.start_soon(self._answer, msg, fds)
            else:
                await self._answer(msg, fds)

    async def _answer(self, msg: dict[str, object], fds: list[int]) -> None:
        reply = await self.handle(msg, fds)
        await self.conn.send(encode(reply, _seq(msg)))

    async def handle(self, msg: dict[str, object], fds: list[int]) -> Reply:
        """The reply to one message; descriptors not kept are closed."""
        try:
            op = decode_op(msg)
        except MessageError as exc:
            close_fds(fds)
            logger.warning("bad request from sessiond: %s", exc)
            return ErrorReply(str(exc))
        if not isinstance(op, AddStreamOp):
            close_fds(fds)  # only add_stream takes descriptors
            fds = []
        try:
            return await self.dispatch(op, fds)
        except _REFUSALS as exc:
            logger.warning("request %s failed: %s", op.KIND, exc)
            return ErrorReply(str(exc))
        except Exception as exc:
            logger.exception("request %s: internal error", op.KIND)
            return ErrorReply(f"internal error: {type(exc).__name__}: {exc}", internal=True)

    async def dispatch(self, op: Op, fds: list[int]) -> Reply:
        """Carry out one operation (``fds`` belong to an ``add_stream``).

        Raises:
            RequestError: and the other ``_REFUSALS``: the request is refused.
        """
        match op:
            case HelloOp():
                return HelloReply(os.getpid())
            case SessionOp():
                return self.op_session(op)
            case AddTraceOp():
                return self.op_add_trace(op)
            case MetadataOp():
                return self.op_metadata(op)
            case AddStreamOp():
                return self.op_add_stream(op, fds)
            case FlushOp():
                return await self.op_flush(op)
            case RotateOp():
                return await self.op_rotate(op)
            case ProducerGoneOp():
                return await self.op_producer_gone(op)
            case RemoveSessionOp():
                return await self.op_remove_session(op)
            case StatusOp():
                return StreamsReply(self._session_stats(self._streams_of(op.session), op.session))
            case SnapshotOp():
                return await snapshot.record(self, op, self._session(op.session).op)
        raise AssertionError(f"no handler for {type(op).__name__}")

    def _session(self, name: str) -> SessionOut:
        """Session ``name``, or RequestError."""
        so = self.sessions.get(name)
        if so is None:
            raise RequestError(f"unknown session {name!r}")
        return so

    def _trace(self, trace_id: str) -> TraceOut:
        """Trace ``trace_id``, or RequestError."""
        tr = self.traces.get(trace_id)
        if tr is None:
            raise RequestError(f"unknown trace {trace_id!r}")
        return tr

    def _streams_of(self, session: str) -> list[StreamOut]:
        """The streams of ``session`` that were opened (not the quarantined)."""
        return [st for st in self.streams.values() if st.session == session]

    def _session_stats(self, streams: list[StreamOut], session: str) -> tuple[StreamStats, ...]:
        """The counters of ``streams``, then those of the session's quarantined
        and gone streams."""
        held = [s.stats() for group in (self.quarantined, self.gone) for s in group.values() if s.session == session]
        return tuple([self._stats(st) for st in streams] + held)

    def op_session(self, op: SessionOp) -> DoneReply:
        """Declare a session and its sink (before its traces)."""
        name = op.session
        if name in self.sessions:
            return DoneReply()
        if op.snapshot:
            sink: SessionSink = snapshot.HeldSink(op.sink)
        else:
            sink = open_sink(op, on_room=lambda: self._on_room(name), on_saved=self._on_saved)
        self.sessions[name] = SessionOut(name, sink, op, sink.chunk)
        self.nursery.start_soon(sink.run)
        return DoneReply()

    def _on_saved(self, key: str, pos: int, ts: int) -> None:
        """A sink saved a packet: the ring below ``pos`` goes back to the producer."""
        st = self.streams.get(key)
        if st is not None and not st.closed:
            st.cursor.publish(pos, ts)

    def _on_room(self, session: str) -> None:
        """A full sink has room again: go on draining what waits in the rings.
        A dead app's stream written out at last lets its descriptors go."""
        for st in self._streams_of(session):
            if st.blocked and not st.closed:
                self.drain(st, flush=st.gone)
                if st.gone and not st.blocked:
                    self._release(st)

    def op_add_trace(self, op: AddTraceOp) -> TraceReply:
        """Open an app's trace in its session's sink (again: the same answer)."""
        known = self.traces.get(op.trace_id)
        if known is not None:
            return TraceReply(known.directory)
        so = self._session(op.session)
        directory = so.sink.add_trace(op.trace_id, op.path)
        self.traces[op.trace_id] = TraceOut(op.trace_id, so.name, directory, op.uuid_bytes, op.path)
        return TraceReply(directory)

    def op_metadata(self, op: MetadataOp) -> DoneReply:
        """Add a piece of a trace's metadata (only what the sink lacks is
        written, and only what consumerd lacks is kept)."""
        tr = self._trace(op.trace_id)
        text = op.text.encode()
        held = len(tr.metadata)
        if op.offset > held:
            raise RequestError(f"metadata of {op.trace_id} at {op.offset} would leave a gap after {held} bytes")
        self.sessions[tr.session].sink.add_metadata(tr.trace_id, text, op.offset)
        tr.metadata += text[held - op.offset:]
        return DoneReply()

    def op_add_stream(self, op: AddStreamOp, fds: list[int]) -> DoneReply:
        """Start reading a stream's ring.  Owns ``fds``: whatever happens,
        they are kept or closed.  A ring the app corrupted (bad magic or
        geometry) is no refusal: the stream is quarantined, so that a replay
        carries on past it.

        Raises:
            RequestError: and the other ``_REFUSALS``: the request is refused.
        """
        if not fds and op.gone:
            # A dead app's stream whose ring is already freed (a restarted
            # consumerd): only what its sink still holds is left to deliver.
            tr = self._trace(op.trace_id)
            channel = validate_name(op.channel, "channel name")
            sink = self.sessions[tr.session].sink.add_gone_stream(
                op.key, tr.trace_id, channel, tracefile_size=op.tracefile_size, tracefile_count=op.tracefile_count)
            if sink is not None:
                self.gone[op.key] = Gone(op.key, tr.session, channel, sink)
            return DoneReply()
        if len(fds) not in (2, 3) or op.key in self.streams or op.key in self.quarantined:
            close_fds(fds)
            if len(fds) not in (2, 3):
                raise RequestError("add_stream needs a memfd and an eventfd (and a blocking channel's pipe)")
            return DoneReply()
        memfd, efd = fds[0], fds[1]
        space = fds[2] if len(fds) == 3 else -1  # a blocking channel's: wakes a waiting producer
        try:
            st = self._open_stream(op, memfd, efd, space)
        except RingBufferCorrupt as exc:
            os.close(efd)
            self._quarantine(op, str(exc))
            return DoneReply()
        except BaseException:
            os.close(efd)
            raise
        self.streams[op.key] = st
        if self.sessions[st.session].op.snapshot:
            st.held = True  # never drained: no task waits for its eventfd
            st.done.set()
        else:
            self.nursery.start_soon(self.stream_task, st)
        return DoneReply()

    def _quarantine(self, op: AddStreamOp, why: str) -> None:
        """Keep stream ``op.key`` as quarantined: its ring is never read; a
        replayed one's sink still delivers what it holds (a relay's spool).

        Raises:
            RequestError: the stream's trace is unknown.
        """
        tr = self._trace(op.trace_id)
        if op.replay:
            try:
                self.sessions[tr.session].sink.add_gone_stream(
                    op.key, tr.trace_id, op.channel, tracefile_size=op.tracefile_size,
                    tracefile_count=op.tracefile_count)
            except OSError as exc:
                logger.error("stream %s: what its sink holds is lost: %s", op.key, exc)
        path = f"{tr.directory}/{op.channel}_0"
        self.quarantined[op.key] = Quarantined(op.key, tr.session, op.channel, path, f"quarantined: {why}")
        self._count_broken(op.key, f"quarantined: {why}")

    def _count_broken(self, key: str, why: str) -> None:
        """Count and log a stream given up on."""
        self.broken_streams += 1
        logger.error("stream %s given up: %s (%d broken streams in this consumerd)",
                     key, why, self.broken_streams)

    def _open_stream(self, op: AddStreamOp, memfd: int, efd: int, space: int = -1) -> StreamOut:
        """Map the ring (closing ``memfd``), open the stream's sink and put
        the cursor where the sink resumes.  Owns ``space`` (-1: not a
        blocking channel): the cursor keeps it, or it is closed."""
        try:
            tr = self._trace(op.trace_id)
            channel = validate_name(op.channel, "channel name")
            try:
                spec = BufferSpec(op.subbuf_size, op.num_subbuf)
            except ValueError as exc:
                raise RequestError(str(exc)) from None
            if space >= 0:
                os.set_blocking(space, False)  # waking a producer never blocks consumerd
            cursor = ConsumerCursor(memfd, spec, space)
        except BaseException:
            if space >= 0:
                os.close(space)
            raise
        finally:
            os.close(memfd)
        try:
            os.set_blocking(efd, False)
            sink = self.sessions[tr.session].sink.open_stream(
                op.key, tr.trace_id, channel, op.stream_class, op.replay,
                tracefile_size=op.tracefile_size, tracefile_count=op.tracefile_count)
        except BaseException:
            cursor.close()
            raise
        _resume(cursor, sink)
        return StreamOut(
            op.key, tr.session, tr, channel, op.stream_class, cursor, efd, sink, op.switch_timer_ms,
            next_seq=sink.resume.next_seq or 0, seq_known=sink.resume.next_seq is not None,
            tracefile_size=op.tracefile_size, tracefile_count=op.tracefile_count,
            live=self.sessions[tr.session].op.live and op.switch_timer_ms > 0,
        )

    async def _flush_streams(self, streams: list[StreamOut]) -> None:
        """Drain every stream (all of one session) to its last whole event,
        waiting for room in the sink when needed, then for the sink to hold
        everything safely (a relay's acknowledgements).

        Raises:
            SinkError: the sink failed for good.
        """
        streams = [st for st in streams if not st.held]
        if not streams:
            return
        sink = self.sessions[streams[0].session].sink
        while True:
            for st in streams:
                self.drain(st, flush=True)
                if not st.closed:  # a broken stream was closed by drain()
                    st.sink.flush()
            if not any(st.blocked and not st.closed and not st.broken for st in streams):
                break
            await sink.wait_room()
        await sink.wait_durable()

    async def op_flush(self, op: FlushOp) -> StreamsReply:
        """The stop barrier: every stream of the session drained and safe.

        Raises:
            RequestError: not done in ``op.timeout``.
            SinkError: the sink failed for good.
        """
        streams = self._streams_of(op.session)
        with trio.move_on_after(op.timeout) as cs:
            await self._flush_streams(streams)
        if cs.cancelled_caught:
            sink = self._session(op.session).sink
            unread = sum(_ring_unread(st) for st in streams)
            raise RequestError(sink.timeout_message([st.key for st in streams], op.timeout, unread))
        return StreamsReply(self._session_stats(streams, op.session))

    async def op_rotate(self, op: RotateOp) -> RotatedReply:
        """Close trace chunk ``op.chunk`` as ``archives/<op.archive>`` and go
        on in the next one (see the module docstring).

        Raises:
            RequestError: not done in ``op.timeout``, or the session is in
                another chunk.
            SinkError: the sink failed for good.
        """
        so = self._session(op.session)
        archive = validate_name(op.archive, "archive name")
        if so.chunk not in (op.chunk, op.chunk + 1):
            raise RequestError(f"session {so.name!r} writes trace chunk {so.chunk}, not {op.chunk}")
        with trio.move_on_after(op.timeout) as cs:
            if so.chunk == op.chunk:
                # Drain what the rings hold now, waiting for room; the
                # switch itself drains the last events again, then no
                # checkpoint comes before every stream writes to the next chunk.
                while True:
                    streams = self._streams_of(so.name)
                    for st in streams:
                        self.drain(st, flush=True)
                    if not any(st.blocked and not st.closed and not st.broken for st in streams):
                        break
                    await so.sink.wait_room()
                if op.last:
                    for st in self._streams_of(so.name):
                        self.drain(st, flush=True)
                        self._release(st)  # its files closed: the chunk is complete
                    so.chunk = op.chunk + 1
                else:
                    self._switch_chunk(so, op.chunk + 1)
            # else: switched already by a rotation that timed out: close it now.
            path = await so.sink.close_chunk(op.chunk, archive)
        if cs.cancelled_caught:
            raise RequestError(f"trace chunk {op.chunk} of session {so.name!r} not complete in the sink after "
                               f"{op.timeout:g} s; the next 'tracewire rotate' completes it")
        return RotatedReply(path)

    def _switch_chunk(self, so: SessionOut, chunk: int) -> None:
        """Every stream of ``so`` from now on writes to trace chunk ``chunk``
        (no checkpoint here: nothing is drained meanwhile)."""
        streams = self._streams_of(so.name)
        for st in streams:
            self.drain(st, flush=True)
        live = [st for st in streams if not st.closed]
        used = {st.trace.trace_id for st in streams}
        alive = {st.trace.trace_id for st in live}
        # The next chunk gets the traces still written to, and those of apps
        # whose streams are not added yet; a dead app's trace stays behind.
        session_traces = [tid for tid, tr in self.traces.items() if tr.session == so.name]
        traces = [tid for tid in session_traces if tid in alive or tid not in used]
        if not traces:
            # Nothing is traced now: the next chunk gets the traces of this
            # one (their metadata, no stream), so that even a chunk in which
            # nothing happens is a trace babeltrace2 opens.
            traces = session_traces
        for st in live:
            try:
                st.sink.close()
            except OSError as exc:
                logger.error("stream %s: closing its files in chunk %d failed: %s", st.key, so.chunk, exc)
        so.sink.begin_chunk(chunk, traces)
        so.chunk = chunk
        for st in live:
            try:
                st.sink = so.sink.open_stream(st.key, st.trace.trace_id, st.channel, st.stream_class, False,
                                              tracefile_size=st.tracefile_size,
                                              tracefile_count=st.tracefile_count)
            except OSError as exc:
                st.broken = f"cannot open its files in trace chunk {chunk}: {exc}"
                self._count_broken(st.key, st.broken)
                self._release(st)  # closing the old sink again only logs
                continue
            st.next_seq, st.seq_known, st.chunk_bytes = 0, True, 0

    async def op_producer_gone(self, op: ProducerGoneOp) -> ReleasedReply:
        """The app exited or died: write (or spool) what it committed, then
        let its ring buffer go — sessiond frees it once we say so, so a
        session tracing many short-lived apps does not keep them all."""
        q = self.quarantined.get(op.key)
        if q is not None:
            q.gone = True
        st = self.streams.get(op.key)
        if st is None:
            return ReleasedReply(True)
        st.gone = True
        if st.closed:  # broken (its descriptors are closed) or released already
            return ReleasedReply(True)
        if st.held and not op.release:  # a snapshot session keeps a dead app's ring for the next snapshots
            return ReleasedReply(False)
        self.drain(st, flush=True)
        if st.blocked:  # a full sink: the rest waits in the ring; released later
            return ReleasedReply(False)
        await self.close_stream(st)
        return ReleasedReply(True)

    async def op_remove_session(self, op: RemoveSessionOp) -> StreamsReply:
        """Flush the session (for at most ``op.timeout``), then forget it and
        close its sink.  The reply holds the streams' counters as they were
        then: what is still unacknowledged (or unread) is lost with it."""
        streams = self._streams_of(op.session)
        so = self.sessions.get(op.session)
        try:
            with trio.move_on_after(op.timeout):
                await self._flush_streams(streams)
            stats = self._session_stats(streams, op.session)
        finally:
            for st in streams:
                await self.close_stream(st)
                del self.streams[st.key]
            for group in (self.quarantined, self.gone):
                for key in [k for k, s in group.items() if s.session == op.session]:
                    del group[key]
            for tid in [tid for tid, tr in self.traces.items() if tr.session == op.session]:
                del self.traces[tid]
            if so is not None and so.op.live and isinstance(so.sink, RelaySink):
                # The relay's live viewers end once told (after every StreamClose).
                with trio.move_on_after(_LIVE_END_TIMEOUT):
                    await so.sink.net.finish_session()
            if so is not None:
                so.sink.close()
                del self.sessions[op.session]
        return StreamsReply(stats)

    def _stats(self, st: StreamOut) -> StreamStats:
        """The stream's counters, as its sink reports them."""
        if not st.closed:
            st.events = st.cursor.read_events()
        counted = StreamStats(
            key=st.key, path=st.sink.path, channel=st.channel, packets=st.packets,
            raw_bytes=st.raw_bytes, wire_bytes=st.raw_bytes, discarded=st.cursor.last_discarded,
            unacked=0, producer="gone" if st.gone else "alive", error=st.broken, ring_unread=_ring_unread(st),
            chunk_bytes=st.chunk_bytes, events=st.events,
        )
        return st.sink.stats(counted)

    # ------------------------------------------------------------- streams
    async def stream_task(self, st: StreamOut) -> None:
        """Read one stream until it is closed (``st.done`` is set then)."""
        timer = st.switch_timer_ms / 1000 if st.switch_timer_ms > 0 else float("inf")
        try:
            await self._stream_loop(st, timer)
        finally:
            st.done.set()

    async def _stream_loop(self, st: StreamOut, timer: float) -> None:
        timed = math.isfinite(timer)
        with st.cancel:
            while not st.closed:
                # At full speed the producer signals again while we drain:
                # take that at once, with a checkpoint (fairness) instead of
                # a round trip through epoll (two epoll_ctl and a wait).
                # (st.closed is set before the eventfd is closed, and nothing
                # awaits between the check above and this read.)
                try:
                    n = os.eventfd_read(st.eventfd)
                except BlockingIOError:
                    n = 0
                if n:
                    st.cursor.announce(n)
                    self.drain(st, flush=False)
                    await trio.lowlevel.checkpoint()
                    continue
                try:
                    if timed:
                        with trio.move_on_after(timer) as cs:
                            await trio.lowlevel.wait_readable(st.eventfd)
                    else:  # no switch timer: no cancel scope per wake-up either
                        await trio.lowlevel.wait_readable(st.eventfd)
                except trio.ClosedResourceError:
                    break  # close_stream() is closing the eventfd
                if st.closed:
                    break
                if timed and cs.cancelled_caught:
                    self.drain(st, flush=True)
                    continue
                try:
                    n = os.eventfd_read(st.eventfd)
                except BlockingIOError:
                    continue
                st.cursor.announce(n)
                self.drain(st, flush=False)

    def drain(self, st: StreamOut, flush: bool) -> None:
        """Write every chunk the ring buffer has for us (all of it on flush).

        A stream whose ring turns out corrupt, whose sink cannot write, or
        that trips a bug is broken: counted, logged and closed (its
        descriptors and mapping released); consumerd and the other streams
        go on.
        """
        if st.broken or st.closed or st.held:
            return
        st.blocked = False
        try:
            self._drain(st, flush)
            return
        except RingBufferCorrupt as exc:
            why = f"quarantined: {exc}"
        except OSError as exc:
            why = f"write failed: {exc}"
        except Exception as exc:  # a bug, or a hostile value no check caught
            logger.exception("stream %s: internal error", st.key)
            why = f"internal error: {type(exc).__name__}: {exc}"
        # Out of the handler: the traceback (and the chunk views its frames
        # hold) is gone, so the mapping can be closed.
        st.broken = why
        self._count_broken(st.key, why)
        self._release(st)

    def _drain(self, st: StreamOut, flush: bool) -> None:
        """``drain``'s loop; raises what the ring or the sink raise."""
        cur = st.cursor
        limit = None
        if flush:
            try:
                st.cursor.announce(os.eventfd_read(st.eventfd))
            except BlockingIOError:
                pass
            # None: the producer is too busy to catch a consistent head;
            # take the closed sub-buffers now and the rest next time.
            limit = cur.flush_limit(self.barrier)
        if not st.seq_known:
            first = st.sink.first_seq()
            if first is None:
                st.blocked = True  # until the sink knows where the stream stands
                return
            st.next_seq, st.seq_known = first, True
        wrote = False
        while True:
            if not st.sink.has_room():
                st.blocked = True  # the rest waits in the ring buffer
                return
            chunk = cur.next_chunk(limit)
            if chunk is None:
                break
            self.write_packet(st, chunk)
            cur.release()
            wrote = True
        if limit is not None and cur.discarded_pending() > 0:
            self.write_packet(st, cur.empty_chunk(limit[1]))
            cur.release()
        elif limit is not None and st.live and not wrote and cur.consumed >= limit[0]:
            self._beacon(st, limit[1])

    def _beacon(self, st: StreamOut, producer_ts: int) -> None:
        """A live stream with nothing new at a timer tick: an empty packet
        whose end says how far the stream's time has come, so that a live
        viewer merging streams by time can go on with the others (LTTng's
        "inactive stream" beacon, carried in-band: it rides the same
        ordered, acknowledged path as the packets, so it never overtakes one).

        Its time is the clock one timer period ago, at least
        _BEACON_MIN_MARGIN_MS (and never before the stream's last packet or
        the producer's last timestamp): an event still being written by a
        thread preempted between reading the clock and publishing the event
        is older than now, but not by that much (see docs/design.md, "Live
        viewing", for what happens if it is)."""
        margin = max(st.switch_timer_ms, _BEACON_MIN_MARGIN_MS) * 1_000_000
        ts = max(st.cursor.last_ts, producer_ts, self.config.clock() - margin)
        if ts <= st.cursor.last_ts:
            return  # no time gained (a clock that did not move): nothing to say
        self.write_packet(st, st.cursor.empty_chunk(ts))
        st.cursor.release()

    def write_packet(self, st: StreamOut, chunk: Chunk) -> None:
        """One chunk as one CTF packet (the next seq) into the stream's sink."""
        n = len(chunk.data)
        seq = st.next_seq
        header = ctf.pack_packet_header(
            st.trace.uuid, st.stream_class, 0, chunk.ts_begin, chunk.ts_end, n, seq,
            chunk.events_discarded,
        )
        st.sink.write(header, chunk, seq)
        st.packets += 1
        st.raw_bytes += len(header) + n
        st.chunk_bytes += len(header) + n
        st.next_seq = seq + 1

    async def close_stream(self, st: StreamOut) -> None:
        """Stop reading a stream, release its files and mapping (once), and
        wait for its task to end."""
        self._release(st)
        await st.done.wait()

    def _release(self, st: StreamOut) -> None:
        """Close what the stream holds (its sink's files, its eventfd, its
        mapping) at once; its task, woken, ends.  Nothing is read from it
        again, and nothing it holds survives: a session tracing many
        short-lived apps keeps no descriptor per app."""
        if st.closed:
            return
        st.closed = True
        trio.lowlevel.notify_closing(st.eventfd)
        st.cancel.cancel()
        try:
            st.sink.close()
        except OSError as exc:
            st.broken = st.broken or f"closing its files failed: {exc}"
            logger.error("stream %s: closing its files failed: %s", st.key, exc)
        finally:
            os.close(st.eventfd)
            st.events = st.cursor.read_events()  # what status shows from now on
            try:
                st.cursor.close()
            except BufferError:  # a chunk view is still alive: unmapped when it goes
                logger.warning("stream %s: its ring is unmapped later", st.key)


def _ring_unread(st: StreamOut) -> int:
    """The sub-buffers of ``st``'s ring that hold events not read yet (each
    becomes one packet when drained): from the consumer's position to the
    producer's head, as the producer last published it.  Exact while the
    app is stopped; a head the app wrote out of range counts as a full ring
    at most.  0 for a closed stream (its ring is no longer mapped)."""
    if st.closed or st.held:
        return 0  # a snapshot session's ring is never read out: nothing is left behind
    cur = st.cursor
    size = cur.spec.subbuf_size
    head = cur.read_head()
    if head <= cur.consumed:
        return 0
    return min((head - 1) // size - cur.consumed // size + 1, cur.spec.num_subbuf)


def _resume(cursor: ConsumerCursor, sink: StreamSink) -> None:
    """Put a new cursor where the stream's sink resumes."""
    r = sink.resume
    cursor.deferred = sink.deferred_release
    if r.ring_pos is not None:
        cursor.skip_to(r.ring_pos, r.ts_end)
    else:
        cursor.last_ts = max(cursor.last_ts, r.ts_end)
    if r.discarded is not None:
        cursor.last_discarded = r.discarded


async def serve_consumerd(
    config: ConsumerdConfig, *, task_status: trio.TaskStatus[Consumerd] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve sessiond's requests on ``config.control_fd`` until it closes."""
    sock = socket.socket(fileno=config.control_fd)
    conn = SeqPacket(trio.socket.from_stdlib_socket(sock))
    try:
        async with trio.open_nursery() as nursery:
            cd = Consumerd(config, conn, nursery)
            task_status.started(cd)
            try:
                await cd.run()
            finally:
                with trio.move_on_after(10) as cs:
                    cs.shield = True
                    for st in list(cd.streams.values()):
                        if not st.closed:
                            cd.drain(st, flush=True)
                            await cd.close_stream(st)
                nursery.cancel_scope.cancel()
    finally:
        conn.close()
