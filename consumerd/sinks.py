"""consumerd's sinks: where a session's CTF packets go.

Theory of operation
-------------------
consumerd's request handling and stream loop (consumerd/daemon.py) know
nothing of files or relays.  Each session has one :class:`SessionSink`, made
by :func:`open_sink` from the session's ``sink`` (a directory or a relay URL);
each stream has one :class:`StreamSink`, opened from its session's sink.  The
daemon builds every packet (the CTF header it packs and the chunk of the
ring) and hands it to the stream sink; the sink decides where the bytes go,
when the ring space may be reused, and whether there is room for more.

* :class:`LocalSink` writes ``<trace>/<channel>_0`` and its LTTng index
  ``<trace>/index/<channel>_0.idx`` with :class:`~tracewire.streamfile.StreamFile`
  (with ``--tracefile-size``: ``<channel>_0_<k>`` and their indexes, with
  :class:`~tracewire.streamfile.StreamFiles`)
  (``os.writev`` of the header and the shared-memory view, no copy) and appends
  metadata to ``<trace>/metadata`` (opened for each append: no descriptor is
  kept per trace, nor per stream once it is closed).  A packet is written
  when ``write`` returns: its ring space goes back to the producer at once,
  there is always room, and nothing waits for an acknowledgement.
* :class:`RelaySink` hands packets to a :class:`~consumerd.net.NetSession`
  (compression, TCP or TLS, acknowledgements, reconnects) with a
  :class:`~consumerd.spool.Spool` of the unacknowledged ones: the header and
  a view of the ring, written to the spool without a copy in Python.  Ring
  space goes back only once a packet is spooled (``deferred_release``: the
  sink calls ``on_saved``).  Past the spool's cap, or the memory bound, the sink has no
  room: the data waits in the ring, and the sink calls ``on_room`` when
  acknowledgements free some.  A closed stream's spool files go once the
  relay has acknowledged all of it (no descriptor is kept per exited app).

Reopening: a restarted consumerd is given every live stream again (the
operation's ``replay``).  The stream sink says where the stream resumes
(:class:`Resume`): a local file continues after its last whole packet; a relay
stream after its last spooled packet or, with an empty spool, at the seq the
relay reports once connected (``next_seq`` is None until then, see
``StreamSink.first_seq``).  Metadata is replayed whole; each sink skips the
prefix it already holds.

Trace chunks (rotation): a session sink writes its traces below the current
chunk's directory (``ops.chunk_prefix``: the session directory for chunk 0,
``active-chunk-<n>/`` after).  ``begin_chunk`` starts the next chunk (each
trace still in use again, with its whole metadata); streams opened from then
on write there.  ``close_chunk`` waits until the old chunk is complete (a
relay sink: every packet of it acknowledged, its streams and traces
forgotten), then moves its top directory (``ust``) to
``archives/<begin>-<end>-<index>/`` -- a relay sink asks the relay to
(``wire.ChunkClose``), again after a reconnect until the relay confirms.

Adding a sink (a snapshot sink, a rotating one) is a new pair of classes and
one line in :func:`open_sink`; the daemon does not change.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from consumerd.net import NetSession, SinkError, read_key_file
from consumerd.spool import Spool
from tracewire import wire
from tracewire.consumer_ops import SessionOp, StreamStats
from tracewire.names import InvalidName, validate_name
from tracewire.ops import Compression, RelayState, chunk_prefix, human_size
from tracewire.ringbuf import Chunk
from tracewire.streamfile import StreamFile, StreamFiles, open_stream_files
from tracewire.url import parse_url

__all__ = [
    "LocalSink", "RelaySink", "Resume", "SessionSink", "SinkError", "StreamSink", "open_sink",
]

logger = logging.getLogger(__name__)

# on_room(): a full sink has room again; on_saved(key, ring_end, ts_end): a
# packet of stream ``key`` is saved, the ring below ``ring_end`` may be reused.
OnRoom = Callable[[], None]
OnSaved = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a (re)opened stream continues.

    Attributes:
        next_seq: the ``packet_seq_num`` of the stream's next packet; None
            while the sink does not know it yet (``StreamSink.first_seq``
            tells once it does).
        ring_pos: the ring was read, and saved, up to this position: reading
            resumes there.  None: where the ring's own consumed position says.
        ts_end: the last saved packet's ``timestamp_end`` (0: none saved).
        discarded: the discarded-events count the last saved packet carried
            (None: not known; the count starts from zero).
    """

    next_seq: int | None = 0
    ring_pos: int | None = None
    ts_end: int = 0
    discarded: int | None = None


class StreamSink(Protocol):
    """One stream's end of a session sink.

    Attributes:
        path: where the stream's packets go, as ``status`` shows it.
        resume: where the stream continues (see :class:`Resume`).
        deferred_release: True if ring space may be reused only once the
            session sink's ``on_saved`` says a packet is saved; False if a
            packet is saved when ``write`` returns.
    """

    path: str
    resume: Resume
    deferred_release: bool

    def first_seq(self) -> int | None:
        """The seq of the stream's first packet, once the sink knows it (a
        stream opened with ``resume.next_seq`` None); None until then."""
        ...

    def has_room(self) -> bool:
        """False while the sink cannot take another packet (flow control:
        the data waits in the ring buffer, and ``on_room`` says when to go on)."""
        ...

    def write(self, header: bytes, chunk: Chunk, seq: int, packet_seq_num: int = -1) -> None:
        """Take one packet: ``header`` then ``chunk.data`` (a view of the ring,
        read before this returns).  ``seq`` counts the stream's packets;
        ``packet_seq_num`` is the header's when it differs (a snapshot's).

        Raises:
            OSError: the packet could not be written; the stream is broken.
        """
        ...

    def flush(self) -> None:
        """Push what the sink buffers (an index) to its files."""
        ...

    def stats(self, counted: StreamStats) -> StreamStats:
        """The stream's counters as the sink sees them, from those consumerd
        ``counted`` (a relay sink knows the bytes on the wire, the unacked
        packets and the connection's trouble)."""
        ...

    def close(self) -> None:
        """Release the stream's files (what a restart resumes from stays)."""
        ...


class SessionSink(Protocol):
    """A session's sink: its traces, their metadata and their streams.

    Attributes:
        chunk: the trace chunk written now (a relay sink may resume a later
            one than the session declared: ``RelaySink.open``).
    """

    chunk: int

    async def run(self) -> None:
        """The sink's background work, until ``close()``; returns at once for
        a sink that has none."""
        ...

    def add_trace(self, trace_id: str, path: str) -> str:
        """Open the trace at ``path`` (relative, below the sink); returns
        where it is, for sessiond.

        Raises:
            InvalidName: a component of ``path`` is not a valid name.
            OSError: the trace cannot be created.
        """
        ...

    def add_metadata(self, trace_id: str, text: bytes, offset: int) -> None:
        """Add TSDL ``text``, which starts at byte ``offset`` of the trace's
        metadata; only what the sink does not hold yet is appended (a
        restarted consumerd is sent every piece again).

        Raises:
            OSError: the metadata cannot be written.
            SinkError: the piece would leave a gap.
        """
        ...

    def open_stream(self, key: str, trace_id: str, channel: str, stream_class: int,
                    replay: bool, *, tracefile_size: int = 0, tracefile_count: int = 0) -> StreamSink:
        """Open stream ``key`` of a trace (``replay``: a restarted consumerd
        reopens it, and it resumes where the sink stands).  With a
        ``tracefile_size`` the stream goes into files of at most that many
        bytes, of which the newest ``tracefile_count`` (0: all) are kept
        (:class:`~tracewire.streamfile.StreamFiles`, here or on the relay).

        Raises:
            OSError: the stream's files cannot be opened.
        """
        ...

    def add_gone_stream(self, key: str, trace_id: str, channel: str, *, tracefile_size: int = 0,
                        tracefile_count: int = 0) -> StreamSink | None:
        """A replayed stream whose app exited and whose ring is freed: the
        sink delivers what it still holds of it (a relay sink's spool), into
        files with the stream's limits.  Returns the stream's sink, for its
        counters in ``status`` (nothing is written to it), or None when the
        sink holds nothing of it."""
        ...

    async def wait_room(self) -> None:
        """Wait until the sink may have room again (an acknowledgement, a
        reconnect).

        Raises:
            SinkError: the sink failed for good (a relay refused the session).
        """
        ...

    async def wait_durable(self) -> None:
        """Wait until everything written is safe (a relay acknowledged it).

        Raises:
            SinkError: the sink failed for good.
        """
        ...

    def timeout_message(self, keys: Sequence[str], timeout: float, ring_unread: int) -> str:
        """Why a flush of streams ``keys`` did not complete in ``timeout`` s,
        and what is still only on this machine (``ring_unread``: the
        sub-buffers the flush left unread in the streams' rings)."""
        ...

    def begin_chunk(self, chunk: int, traces: Iterable[str]) -> None:
        """Streams opened from now on write to trace chunk ``chunk``, where
        ``traces`` (ids) are opened again with their metadata; close the
        streams of the current chunk first.

        Raises:
            OSError: a trace of the new chunk cannot be created.
        """
        ...

    async def close_chunk(self, chunk: int, archive: str) -> str:
        """Wait until trace chunk ``chunk`` (no longer written to) is complete
        in the sink, then move it to ``archives/<archive>``; returns where it
        is (again, harmlessly, for a chunk moved already).

        Raises:
            OSError: the chunk cannot be moved.
            SinkError: the sink failed for good.
        """
        ...

    def close(self) -> None:
        """Stop the sink and release its files: the session is removed (a
        relay sink deletes its spool).  Close the streams first."""
        ...


def open_sink(op: SessionOp, on_room: OnRoom, on_saved: OnSaved) -> SessionSink:
    """The sink ``op`` declares: a relay URL (``tw://``, ``tws://``) or an
    absolute directory.

    Raises:
        SinkError: a bad URL or directory, or an unreadable key file.
        OSError: the spool directory cannot be created.
    """
    if "://" in op.sink:
        return RelaySink.open(op, on_room, on_saved)
    return LocalSink(op.sink, op.chunk)


def _safe_join(base: str, rel: str) -> str:
    """``base/rel`` where every component of ``rel`` is a valid name."""
    parts = rel.split("/")
    for p in parts:
        validate_name(p, "path component")
    return os.path.join(base, *parts)


def _unheld(text: bytes, held: int, offset: int) -> bytes:
    """What the sink lacks of ``text``, which starts at byte ``offset`` of
    the trace's metadata, when it holds the first ``held`` bytes.

    Raises:
        SinkError: ``text`` would leave a gap (a piece was not sent).
    """
    if offset > held:
        raise SinkError(f"metadata piece at byte {offset}, but only {held} bytes are held")
    return text[held - offset:]


# ------------------------------------------------------------------ local files
@dataclass(slots=True)
class _LocalTrace:
    """A trace of a local sink: where it is and how much metadata it holds.
    No descriptor is kept: a session tracing many short-lived apps must not
    hold one per app (metadata is appended rarely, opening it each time)."""

    directory: str
    metadata_path: str
    metadata_bytes: int
    path: str = ""  # below the chunk's directory


class LocalStream(StreamSink):
    """``<trace>/<channel>_0`` and its index (or, with file limits, the files
    ``<channel>_0_<k>``), continued after a restart."""

    def __init__(self, file: StreamFile | StreamFiles, stream_class: int) -> None:
        self.file = file
        self.stream_class = stream_class
        self.path = file.path
        self.resume = Resume(file.next_seq, None, file.last_ts_end, file.last_discarded)
        self.deferred_release = False

    def first_seq(self) -> int | None:
        return self.resume.next_seq

    def has_room(self) -> bool:
        return True

    def write(self, header: bytes, chunk: Chunk, seq: int, packet_seq_num: int = -1) -> None:
        self.file.append([header, chunk.data], chunk.ts_begin, chunk.ts_end,
                         chunk.events_discarded, self.stream_class)

    def flush(self) -> None:
        self.file.flush()

    def stats(self, counted: StreamStats) -> StreamStats:
        return counted

    def close(self) -> None:
        self.file.close()


def _chunk_dir(root: str, chunk: int) -> str:
    """The directory of trace chunk ``chunk`` of the session at ``root``."""
    prefix = chunk_prefix(chunk)
    return os.path.join(root, prefix.rstrip("/")) if prefix else root


def _chunk_parts(paths: Iterable[str]) -> list[str]:
    """The top directories of a chunk's trace paths (``ust``, as sessiond
    names them): what is moved when it is archived."""
    return sorted({p.split("/")[0] for p in paths} | {"ust"})


class LocalSink(SessionSink):
    """A session written below a local directory (``chunk``: the trace
    chunk written now, see :func:`tracewire.ops.chunk_prefix`).

    Raises:
        SinkError: ``directory`` is not absolute.
    """

    def __init__(self, directory: str, chunk: int = 0) -> None:
        if not os.path.isabs(directory):
            raise SinkError(f"sink {directory!r} is not an absolute directory")
        self.root = directory
        self.chunk = chunk
        self.directory = _chunk_dir(directory, chunk)
        self._traces: dict[str, _LocalTrace] = {}
        self._closing: dict[int, list[str]] = {}  # chunk -> its top directories, until archived

    async def run(self) -> None:
        return  # a packet is written when write() returns

    def add_trace(self, trace_id: str, path: str) -> str:
        directory = _safe_join(self.directory, path)
        os.makedirs(os.path.join(directory, "index"), exist_ok=True)
        mpath = os.path.join(directory, "metadata")
        mfd = os.open(mpath, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            # A restarted consumerd appends to the metadata it wrote before.
            held = os.fstat(mfd).st_size
        finally:
            os.close(mfd)
        self._traces[trace_id] = _LocalTrace(directory, mpath, held, path)
        return directory

    def add_metadata(self, trace_id: str, text: bytes, offset: int) -> None:
        tr = self._traces.get(trace_id)
        if tr is None:
            return  # a dead app's trace, left in an archived chunk
        data = _unheld(text, tr.metadata_bytes, offset)
        if not data:
            return
        fd = os.open(tr.metadata_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                tr.metadata_bytes += n  # what the file holds, even if a later write fails
                view = view[n:]
        finally:
            os.close(fd)

    def open_stream(self, key: str, trace_id: str, channel: str, stream_class: int,
                    replay: bool, *, tracefile_size: int = 0, tracefile_count: int = 0) -> StreamSink:
        # Reopening after a consumerd restart continues the same files.
        sf = open_stream_files(self._traces[trace_id].directory, f"{channel}_0", tracefile_size, tracefile_count)
        if sf.recovered_bytes:
            logger.warning("%s: cut %d bytes of a partial packet", sf.path, sf.recovered_bytes)
        return LocalStream(sf, stream_class)

    def add_gone_stream(self, key: str, trace_id: str, channel: str, *, tracefile_size: int = 0,
                        tracefile_count: int = 0) -> StreamSink | None:
        return None  # its file holds everything the app committed

    async def wait_room(self) -> None:
        await trio.lowlevel.checkpoint()  # never full

    async def wait_durable(self) -> None:
        await trio.lowlevel.checkpoint()  # written when write() returned

    def timeout_message(self, keys: Sequence[str], timeout: float, ring_unread: int) -> str:
        return (f"{self.directory}: {len(keys)} streams not written after {timeout:g} s "
                f"({ring_unread} sub-buffers unread in the ring buffers)")

    def begin_chunk(self, chunk: int, traces: Iterable[str]) -> None:
        old = self._traces
        self._closing[self.chunk] = _chunk_parts(tr.path for tr in old.values())
        self.chunk, self.directory, self._traces = chunk, _chunk_dir(self.root, chunk), {}
        for tid in traces:
            tr = old.get(tid)
            if tr is None:
                continue
            with open(tr.metadata_path, "rb") as f:
                text = f.read()
            self.add_trace(tid, tr.path)
            self.add_metadata(tid, text, 0)

    async def close_chunk(self, chunk: int, archive: str) -> str:
        await trio.lowlevel.checkpoint()  # its packets were written when write() returned
        parts = self._closing.pop(chunk, ["ust"])
        source = _chunk_dir(self.root, chunk)
        target = os.path.join(self.root, "archives", archive)
        os.makedirs(target, exist_ok=True)
        for part in parts:
            src, dst = os.path.join(source, part), os.path.join(target, part)
            if os.path.lexists(src) and not os.path.lexists(dst):
                os.rename(src, dst)
        if source != self.root:
            try:
                os.rmdir(source)
            except OSError:
                pass  # not empty: something else was put there
        return target

    def close(self) -> None:
        self._traces.clear()  # no descriptor is kept open


# ------------------------------------------------------------------ relay
class RelayStream(StreamSink):
    """One stream of a :class:`RelaySink`."""

    def __init__(self, net: NetSession, key: str, path: str, resume: Resume) -> None:
        self.net = net
        self.key = key
        self.path = path
        self.resume = resume
        self.deferred_release = True  # ring space goes back once spooled

    def first_seq(self) -> int | None:
        return self.net.first_seq(self.key)

    def has_room(self) -> bool:
        return self.net.has_room()

    def write(self, header: bytes, chunk: Chunk, seq: int, packet_seq_num: int = -1) -> None:
        # The ring's view itself: it is written to the spool (or compressed)
        # from shared memory, and the ring space goes once it is saved.
        self.net.submit(self.key, [header, chunk.data], seq, chunk.ts_begin, chunk.ts_end,
                        chunk.events_discarded, chunk.end, packet_seq_num)

    def flush(self) -> None:
        return  # the compressor and the sender run on their own

    def stats(self, counted: StreamStats) -> StreamStats:
        net = self.net
        if self.key not in net.streams:
            return counted  # a stream of an archived chunk: all of it was acknowledged
        s = net.stats(self.key)
        relay, why = net.relay_state(self.key)
        error = counted.error
        if relay is RelayState.REFUSED:
            error = f"relay: {why}"
        elif relay is RelayState.UNREACHABLE:
            error = f"relay unreachable: {why}"
        return dataclasses.replace(
            counted, packets=s["packets"], raw_bytes=s["raw_bytes"], wire_bytes=s["wire_bytes"],
            unacked=s["unacked"], unacked_bytes=s["unacked_bytes"], error=error, relay=relay, relay_why=why,
            relay_reconnects=net.reconnects,
        )

    def close(self) -> None:
        # What is unacknowledged stays spooled (a restarted consumerd resumes
        # from it); the spool's files go once the relay has it all.
        self.net.finish_stream(self.key)


_SPOOLED_CHUNK = re.compile(r"~c(\d+)\.\d+")


def _spooled_chunks(directory: str) -> set[int]:
    """The trace chunks (> 0) of which the spool in ``directory`` holds
    segment files (``<stream>~c<chunk>.<n>``)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return set()
    return {int(m.group(1)) for n in names if (m := _SPOOLED_CHUNK.search(n)) and m.end() == len(n)}


@dataclass(slots=True)
class _RelayChunk:
    """A trace chunk of a relay sink: its streams and traces as the
    NetSession knows them (their ids carry the chunk after the first), and
    their paths below the chunk."""

    keys: dict[str, str] = field(default_factory=dict)  # stream key -> NetSession key
    traces: dict[str, str] = field(default_factory=dict)  # trace id -> NetSession trace id
    paths: dict[str, str] = field(default_factory=dict)  # trace id -> path below the chunk


class RelaySink(SessionSink):
    """A session streamed to a relay (see consumerd/net.py), with its spool.

    In trace chunk ``chunk`` > 0 a stream (and its spool) and a trace are
    known to the NetSession as ``<id>~c<chunk>``: each chunk's stream is a
    stream of its own on the wire, with its own file on the relay."""

    def __init__(self, sink: str, net: NetSession, chunk: int = 0, recover: Sequence[int] = ()) -> None:
        self.sink = sink
        self.net = net
        self._keys: list[str] = []  # streams opened here: their spool goes with the session
        self.chunk = chunk
        self._current = _RelayChunk()
        self._closing: dict[int, _RelayChunk] = {}  # switched away from, not archived yet
        self._owner: dict[str, str] = {}  # NetSession key -> stream key (for on_saved)
        # Chunks an earlier consumerd had switched away from but not archived
        # (it died in the rotation): their spooled packets are sent again.
        self._recover = list(recover)
        self._paths: dict[str, str] = {}  # trace id -> path below a chunk (for _recover)

    def _net_id(self, ident: str) -> str:
        return ident if self.chunk == 0 else f"{ident}~c{self.chunk}"

    def saved(self, on_saved: OnSaved) -> OnSaved:
        """``on_saved`` for the NetSession: its keys told back as the streams'."""
        return lambda key, pos, ts: on_saved(self._owner.get(key, key), pos, ts)

    @classmethod
    def open(cls, op: SessionOp, on_room: OnRoom, on_saved: OnSaved) -> RelaySink:
        """The relay sink of ``op`` (not connected before ``run()``).

        Raises:
            SinkError: a bad URL or an unreadable key file.
            OSError: the spool directory cannot be created.
        """
        try:
            url = parse_url(op.sink)
        except ValueError as exc:
            raise SinkError(str(exc)) from None
        auth = read_key_file(op.auth_key_file) if op.auth_key_file else None
        spool = Spool(op.spool_dir, op.spool_size) if op.spool_dir else None
        net = NetSession(
            name=op.session, session_id=op.session_id, created=op.created, url=url,
            hostname=op.hostname, compress=op.compress is Compression.ZSTD, level=op.compress_level,
            auth=auth, ca_file=op.tls_ca or None, live=op.live, on_room=on_room,
            spool=spool, on_saved=on_saved, max_unacked_bytes=op.spool_size,
        )
        # An earlier consumerd that died in a rotation may have switched to
        # a later chunk than sessiond knows (it had not answered): its spool
        # says so.  Go on in that chunk, and send what is spooled of the ones
        # before it again; sessiond's next rotate archives them.
        chunk = max([op.chunk, *_spooled_chunks(op.spool_dir)]) if op.spool_dir else op.chunk
        sink = cls(op.sink, net, chunk, range(op.chunk, chunk))
        net.on_saved = sink.saved(on_saved)
        return sink

    async def run(self) -> None:
        await self.net.run()

    def add_trace(self, trace_id: str, path: str) -> str:
        full = chunk_prefix(self.chunk) + path
        net_tid = self._net_id(trace_id)
        try:
            self.net.add_trace(net_tid, full)
        except wire.ProtocolError as exc:
            raise InvalidName(exc.message) from None
        self._current.traces[trace_id] = net_tid
        self._current.paths[trace_id] = path
        self._paths[trace_id] = path
        return f"{self.sink}/{full}"

    def add_metadata(self, trace_id: str, text: bytes, offset: int) -> None:
        net_tid = self._current.traces.get(trace_id)
        if net_tid is None:
            return  # a dead app's trace, left in an archived chunk
        # A restarted consumerd's relay session starts empty: it holds nothing.
        held = len(self.net.traces[net_tid].metadata)
        self.net.add_metadata(net_tid, _unheld(text, held, offset))

    def _stream_path(self, net_tid: str, channel: str) -> str:
        """What status names a stream of trace ``net_tid`` in ``channel``."""
        return f"{self.net.url}/{self.net.traces[net_tid].path}/{channel}_0"

    def _stream_key(self, key: str) -> str:
        """Stream ``key``'s NetSession key in the current chunk."""
        net_key = self._net_id(key)
        self._current.keys[key] = net_key
        self._owner[net_key] = key
        self._keys.append(net_key)
        return net_key

    def open_stream(self, key: str, trace_id: str, channel: str, stream_class: int,
                    replay: bool, *, tracefile_size: int = 0, tracefile_count: int = 0) -> StreamSink:
        net_tid = self._current.traces[trace_id]
        stream = key
        key = self._stream_key(key)
        last = self.net.add_stream(key, net_tid, channel, resume=replay, tracefile_size=tracefile_size,
                                   tracefile_count=tracefile_count)
        if last is not None:
            resume = Resume(last.seq + 1, last.ring_end, last.ts_end)
        elif replay:
            resume = Resume(None)  # the relay says where the stream stands
        else:
            resume = Resume(0)
        if replay:
            self._resend_recovered(stream, trace_id, channel, tracefile_size, tracefile_count)
        return RelayStream(self.net, key, self._stream_path(net_tid, channel), resume)

    def add_gone_stream(self, key: str, trace_id: str, channel: str, *, tracefile_size: int = 0,
                        tracefile_count: int = 0) -> StreamSink | None:
        net_tid = self._current.traces[trace_id]
        stream = key
        key = self._stream_key(key)
        self.net.add_stream(key, net_tid, channel, resume=True, tracefile_size=tracefile_size,
                            tracefile_count=tracefile_count)
        self.net.finish_stream(key)  # its spool goes once acknowledged
        self._resend_recovered(stream, trace_id, channel, tracefile_size, tracefile_count)
        return RelayStream(self.net, key, self._stream_path(net_tid, channel), Resume(None))

    def _resend_recovered(self, stream: str, trace_id: str, channel: str, tracefile_size: int,
                          tracefile_count: int) -> None:
        """What stream ``stream`` left spooled in the chunks being recovered
        goes to the relay again, below those chunks (declared as in them,
        with the trace's whole metadata), to be archived by the next rotate."""
        spool = self.net.spool
        if spool is None:
            return
        net_tid = self._current.traces[trace_id]
        for c in self._recover:
            old_key = stream if c == 0 else f"{stream}~c{c}"
            if not spool.holds(old_key):
                continue
            old = self._closing.setdefault(c, _RelayChunk())
            old_tid = trace_id if c == 0 else f"{trace_id}~c{c}"
            if trace_id not in old.traces:
                self.net.add_trace(old_tid, chunk_prefix(c) + self._paths[trace_id])
                self.net.add_metadata(old_tid, bytes(self.net.traces[net_tid].metadata))
                old.traces[trace_id] = old_tid
                old.paths[trace_id] = self._paths[trace_id]
            self.net.add_stream(old_key, old_tid, channel, resume=True, tracefile_size=tracefile_size,
                                tracefile_count=tracefile_count)
            self.net.finish_stream(old_key)
            old.keys[stream] = old_key
            self._owner[old_key] = stream
            self._keys.append(old_key)
            logger.warning("stream %s: sending again what an earlier consumerd spooled for trace chunk %d",
                           stream, c)

    def begin_chunk(self, chunk: int, traces: Iterable[str]) -> None:
        old = self._current
        self._closing[self.chunk] = old
        self.chunk, self._current = chunk, _RelayChunk()
        for tid in traces:
            old_tid = old.traces.get(tid)
            if old_tid is None:
                continue
            self.add_trace(tid, old.paths[tid])
            self.net.add_metadata(self._current.traces[tid], bytes(self.net.traces[old_tid].metadata))

    async def close_chunk(self, chunk: int, archive: str) -> str:
        old = self._closing.get(chunk)
        if old is not None:
            # Every packet of the chunk acknowledged: its streams and traces
            # are forgotten (a reconnect no longer declares them), then the
            # relay moves the chunk.
            keys = list(old.keys.values())
            try:
                await self.net.wait_acked(keys)
            except SinkError:
                raise self._failed() from None
            for key in keys:
                self.net.drop_stream(key)
                self._owner.pop(key, None)
            dropped = set(keys)
            self._keys = [k for k in self._keys if k not in dropped]
            for net_tid in old.traces.values():
                self.net.drop_trace(net_tid)
            parts = _chunk_parts(old.paths.values())
        else:
            parts = ["ust"]
        for part in parts:
            await self.net.close_chunk(chunk_prefix(chunk) + part, f"archives/{archive}/{part}")
        self._closing.pop(chunk, None)
        return f"{self.net.hostname}/{self.net.name}-{self.net.created}/archives/{archive}"

    async def wait_room(self) -> None:
        if self.net.error:
            raise self._failed()
        await self.net.wait_change()

    async def wait_durable(self) -> None:
        try:
            await self.net.wait_all_acked()
        except SinkError:
            raise self._failed() from None

    def _held(self, keys: Sequence[str]) -> tuple[int, int]:
        """(packets, bytes) of streams ``keys`` not acknowledged yet."""
        streams = [self.net.streams[k] for k in keys if k in self.net.streams]
        return sum(len(st.unacked) for st in streams), sum(st.unacked_bytes() for st in streams)

    def _failed(self) -> SinkError:
        """The session failed for good: why, and what it leaves unacknowledged
        (lost: nothing more is sent)."""
        packets, size = self._held(list(self.net.streams))
        return SinkError(f"relay {self.net.url}: {self.net.error}; {packets} packets ({human_size(size)}) "
                         "left unacknowledged are lost")

    def timeout_message(self, keys: Sequence[str], timeout: float, ring_unread: int) -> str:
        net = self.net
        packets, size = self._held(keys)
        states = sorted({state.describe(why) for state, why in
                         (net.relay_state(k) for k in keys if k in net.streams) if state is not None})
        if not states and net.last_failure:
            states = [f"last failure: {net.last_failure}"]
        why = f" ({'; '.join(states)})" if states else ""
        return (
            f"relay {net.url} has not acknowledged everything after {timeout:g} s{why}: "
            f"{packets} packets ({human_size(size)}) held on the target, {ring_unread} sub-buffers unread "
            "in the ring buffers; they are sent once the relay takes them ('tracewire stop' again waits for them)"
        )

    def close(self) -> None:
        self.net.close()
        spool = self.net.spool
        if spool is None:
            return
        for key in self._keys:
            spool.remove(key)
        spool.close()
        try:
            os.rmdir(spool.directory)
        except OSError:
            pass  # not empty: a stream only add_gone_stream() saw keeps its segments
