"""Snapshots: the rings' content, copied on demand, written as traces of their own.

Theory of operation
-------------------
A *snapshot session*'s streams are mapped by consumerd but never drained:
the apps write their rings (overwrite channels, usually) and nothing
consumes them.  ``snapshot record`` (``SnapshotOp``) copies every stream's
ring at once with ``ringbuf.read_snapshot`` -- whole sub-buffers only, a copy
the producer may have torn is left out -- then writes the copies as a new set
of traces, ``<directory>/<trace path>`` below the session's sink (or the
sink the request names): the trace's metadata as consumerd kept it, and per
stream one packet per sub-buffer, whose ``packet_seq_num`` is the sub-buffer's
number + 1.  A stream whose oldest copied sub-buffer is not its first, or
which had discarded events, begins with an empty packet of seq 0 and count 0:
babeltrace2 then reports the older packets as lost and the events as
discarded, as it does between any two packets.

A streaming session can be snapshotted too: its rings are read the same way,
beside the consumer that drains them (the read touches no control word);
the snapshot holds what the rings hold at that moment, whether or not it
was already streamed.

The copy is made in one step (no await), so every stream's snapshot is of
the same moment give or take the copy itself; writing it may wait (a relay's
acknowledgements, for at most ``SnapshotOp.timeout``).  A relay snapshot is
its own connection, declaring the session again: it lands in the session's
directory on the relay.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid as uuidlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import trio

from consumerd.sinks import Resume, SessionSink, SinkError, StreamSink, open_sink
from tracewire import ctf
from tracewire.consumer_ops import SessionOp, SnapshotOp, SnapshotReply, StreamStats
from tracewire.ops import human_size
from tracewire.ringbuf import PACKET_HEADER_SIZE, Q_START, Chunk, MemoryBarrier, Snapshot, read_snapshot

if TYPE_CHECKING:
    from consumerd.daemon import Consumerd, StreamOut


class RequestError(Exception):
    """A snapshot that cannot be taken (consumerd answers with its text)."""

__all__ = ["HeldSink", "HeldStream", "record"]

logger = logging.getLogger(__name__)


class HeldStream:
    """The sink of a snapshot session's stream: it takes nothing, since
    nothing is drained; the ring is only read by ``record``."""

    deferred_release = False

    def __init__(self, path: str) -> None:
        self.path = path
        self.resume = Resume(0)

    def first_seq(self) -> int | None:
        return 0

    def has_room(self) -> bool:
        return False  # never drained: what the app writes stays in the ring

    def write(self, header: bytes, chunk: Chunk, seq: int, packet_seq_num: int = -1) -> None:
        raise AssertionError("a snapshot session's stream is never drained")

    def flush(self) -> None:
        return

    def stats(self, counted: StreamStats) -> StreamStats:
        return counted

    def close(self) -> None:
        return


class HeldSink:
    """The session sink of a snapshot session: traces and streams are only
    named (a snapshot creates its own sink); what arrives is kept by
    consumerd itself (each trace's metadata) or stays in the rings."""

    def __init__(self, sink: str) -> None:
        self.sink = sink
        self.chunk = 0

    async def run(self) -> None:
        return

    def add_trace(self, trace_id: str, path: str) -> str:
        return f"{self.sink.rstrip('/')}/{path}"

    def add_metadata(self, trace_id: str, text: bytes, offset: int) -> None:
        return  # consumerd keeps each trace's metadata for the snapshots

    def open_stream(self, key: str, trace_id: str, channel: str, stream_class: int,
                    replay: bool, *, tracefile_size: int = 0, tracefile_count: int = 0) -> StreamSink:
        return HeldStream(f"{self.sink.rstrip('/')} (ring of {key}, {channel})")

    def add_gone_stream(self, key: str, trace_id: str, channel: str, *, tracefile_size: int = 0,
                        tracefile_count: int = 0) -> StreamSink | None:
        return None

    def begin_chunk(self, chunk: int, traces: Iterable[str]) -> None:
        raise SinkError("a snapshot session writes no trace to rotate")

    async def close_chunk(self, chunk: int, archive: str) -> str:
        raise SinkError("a snapshot session writes no trace to rotate")

    async def wait_room(self) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_durable(self) -> None:
        await trio.lowlevel.checkpoint()

    def timeout_message(self, keys: Sequence[str], timeout: float, ring_unread: int) -> str:
        return f"{self.sink}: snapshot session, nothing to flush"

    def close(self) -> None:
        return


def _copy(st: StreamOut, budget: int | None, barrier: MemoryBarrier) -> tuple[Snapshot, int]:
    """``st``'s ring as a snapshot, and the stream's start time."""
    cur = st.cursor
    return read_snapshot(cur.view, cur.q, cur.spec, barrier, budget), cur.q[Q_START]


async def record(cd: Consumerd, op: SnapshotOp, base: SessionOp) -> SnapshotReply:
    """Carry out ``op`` for the session declared by ``base``.

    Raises:
        SinkError: the sink cannot be opened, failed, or did not acknowledge
            everything within ``op.timeout``.
        OSError: a local file cannot be written.
    """
    streams = [st for st in cd.streams.values() if st.session == op.session and not st.closed]
    budget = op.max_size // len(streams) if op.max_size and streams else None
    copies = [(st, *_copy(st, budget, cd.barrier)) for st in streams]
    if not any(snap.packets for _st, snap, _start in copies):
        if budget is not None and any(snap.skipped for _st, snap, _start in copies):
            raise RequestError(f"--max-size {human_size(op.max_size)} leaves {human_size(budget)} to each of the "
                               f"{len(streams)} streams, less than one of their packets: no snapshot written")
        raise RequestError(f"no event in the ring buffers of session {op.session!r}: no snapshot written")
    sink_url = op.sink or base.sink
    # A snapshot is not live, even of a live session: its own connection
    # declares the session without `live`, so live viewers never see it.
    sink = open_sink(dataclasses.replace(base, sink=sink_url, spool_dir=None, snapshot=False, live=False),
                     on_room=_nothing, on_saved=_ignore_saved)
    if "://" in sink_url:  # where the relay puts it: HOST/SESSION-CREATED/DIRECTORY
        where = f"{sink_url.rstrip('/')}/{base.hostname}/{base.session}-{base.created}/{op.directory}"
    else:
        where = f"{sink_url.rstrip('/')}/{op.directory}"
    reply = SnapshotReply(path=where)
    failed: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        try:
            with trio.fail_after(op.timeout):
                reply = await _write(cd, op, sink, copies, reply)
                await sink.wait_durable()
        except trio.TooSlowError:
            failed = SinkError(f"{where}: not acknowledged after {op.timeout:g} s")
        except (SinkError, OSError) as exc:
            failed = exc  # raised out of the nursery, not as a group
        finally:
            sink.close()
            nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed
    return reply


async def _write(cd: Consumerd, op: SnapshotOp, sink: SessionSink,
                 copies: list[tuple[StreamOut, Snapshot, int]], reply: SnapshotReply) -> SnapshotReply:
    """Write the copies below ``op.directory``; returns ``reply`` with the figures."""
    uuids: dict[str, bytes] = {}  # trace id -> the snapshot trace's own uuid
    streams = packets = size = discarded = overwritten = torn = skipped = broken = 0
    for st, snap, start in copies:
        tr = st.trace
        torn += snap.torn
        skipped += snap.skipped
        if snap.corrupt is not None:
            broken += 1
            logger.warning("snapshot of stream %s: %s", st.key, snap.corrupt)
        if not snap.packets:
            continue
        uuid = uuids.get(tr.trace_id)
        if uuid is None:
            # A trace of its own, with its own uuid: a reader given both the
            # session's trace and a snapshot of it (one directory holds both)
            # would otherwise merge them as one trace, whose times overlap.
            uuid = uuids[tr.trace_id] = uuidlib.uuid4().bytes
            sink.add_trace(tr.trace_id, f"{op.directory}/{tr.path}")
            sink.add_metadata(tr.trace_id, _with_uuid(bytes(tr.metadata), tr.uuid, uuid), 0)
        out = sink.open_stream(st.key, tr.trace_id, st.channel, st.stream_class, False)
        streams += 1
        first = snap.packets[0]
        n = 0  # the sink's count of the stream's packets (0, 1, 2...)
        if first.subbuf > 0 or first.discarded > 0:
            # Seq 0 with a count of 0: a reader counts what came before.
            ts = min(start, first.ts_begin)
            await _put(sink, out, uuid, st.stream_class, b"", ts, ts, 0, n, 0)
            n += 1
        overwritten += first.subbuf
        for pkt in snap.packets:
            await _put(sink, out, uuid, st.stream_class, pkt.data, pkt.ts_begin, pkt.ts_end,
                       pkt.discarded, n, pkt.subbuf + 1)
            n += 1
            size += len(pkt.data) + PACKET_HEADER_SIZE
        packets += len(snap.packets)
        discarded += snap.packets[-1].discarded
        out.flush()
        out.close()
    return dataclasses.replace(reply, streams=streams, packets=packets, bytes=size, events_discarded=discarded,
                               overwritten=overwritten, torn=torn, skipped=skipped, broken=broken)


def _with_uuid(metadata: bytes, old: bytes, new: bytes) -> bytes:
    """``metadata`` with the trace block's uuid ``old`` replaced by ``new``
    (the clock's uuid, another one, stays)."""
    return metadata.replace(f'uuid = "{uuidlib.UUID(bytes=old)}";'.encode(),
                            f'uuid = "{uuidlib.UUID(bytes=new)}";'.encode(), 1)


async def _put(sink: SessionSink, out: StreamSink, uuid: bytes, stream_class: int, data: bytes,
               ts_begin: int, ts_end: int, discarded: int, n: int, packet_seq_num: int) -> None:
    """Packet ``n`` of stream ``out``, waiting for room in the sink."""
    while not out.has_room():
        await sink.wait_room()
    header = ctf.pack_packet_header(uuid, stream_class, 0, ts_begin, ts_end, len(data), packet_seq_num,
                                    discarded)
    out.write(header, Chunk(memoryview(data), ts_begin, ts_end, discarded, 0), n, packet_seq_num)


def _nothing() -> None:
    return


_ignore_saved: Callable[[str, int, int], None] = lambda key, pos, ts: None  # noqa: E731
