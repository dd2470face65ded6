"""The CTF stream reader: events out of stream files, index files, whole traces.

The reader treats its input as hostile: every size is checked against the
bytes actually present and against explicit limits before anything is
unpacked (each packet header goes through the one shared
:func:`~tracewire.ctf.layout.check_packet_header`), and every failure is a
:class:`CTFError` naming the file and byte offset. Compact timestamps are
rebuilt exactly as babeltrace2 does (see :func:`rebuild_timestamp`).

The module keeps no global mutable state: module globals are constants only.
"""

from __future__ import annotations

import heapq
import io
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO

from tracewire.ctf.declarations import EventDecl, FieldType, FieldValue
from tracewire.ctf.errors import CTFError, CTFErrorCode
from tracewire.ctf.layout import (
    COMPACT_TS_BITS,
    EXT,
    EXTENDED_ID,
    F64,
    I64,
    INDEX_ENTRY,
    INDEX_ENTRY_SIZE,
    INDEX_HEADER_STRUCT,
    INDEX_MAGIC,
    MAX_PACKET_SIZE,
    PACKET_HEADER_SIZE,
    U32,
    U64_MASK,
    PacketHeader,
    check_packet_header,
)
from tracewire.ctf.metadata_reader import TraceMeta, read_metadata_file

__all__ = [
    "Discarded",
    "Event",
    "IndexEntry",
    "decode_event",
    "item_time",
    "read_index",
    "read_packet",
    "read_stream",
    "read_trace",
    "rebuild_timestamp",
]

_Buffer = bytes | bytearray | memoryview
_OFF_EVENTS_DISCARDED = 72  # in the packet context


# --------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded event.

    Attributes:
        timestamp: Absolute time in ns since the Epoch (monotonic clock value
            + the clock offset).
        name: ``provider:event``.
        fields: Field name (without the ``_`` prefix) → value.
        stream: The stream file's name.
        packet_seq_num: Sequence number of the packet holding the event.
        hostname: The trace's env hostname.
    """

    timestamp: int
    name: str
    fields: dict[str, FieldValue]
    stream: str
    packet_seq_num: int
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class Discarded:
    """Events lost by the tracer, reported by a packet's events_discarded counter.

    Attributes:
        count: Events lost since the previous packet of the stream (for a
            stream's first packet: its counter value).
        stream: The stream file's name.
        ts: Absolute time (ns since the Epoch) of the beginning of the packet
            that reported the loss; the events were lost before that packet
            ended.
    """

    count: int
    stream: str
    ts: int


def item_time(item: Event | Discarded) -> int:
    """The absolute time of an item (ns since the Epoch)."""
    return item.timestamp if isinstance(item, Event) else item.ts


def rebuild_timestamp(prev: int, value: int, bits: int) -> int:
    """Rebuild a full clock value from its ``bits`` low bits, as babeltrace2 does.

    ``new = (prev & ~mask) | value``, plus ``2**bits`` when ``value`` is below
    the low bits of ``prev`` (a single wrap is assumed), modulo 2**64.

    Args:
        prev: Previous full clock value.
        value: The low bits read from the event header.
        bits: How many bits ``value`` has (64 means a full value).

    Returns:
        The full clock value.
    """
    if bits >= 64:
        return value & U64_MASK
    mask = (1 << bits) - 1
    new = prev
    if value < (prev & mask):
        new += mask + 1
    return ((new & ~mask) | value) & U64_MASK


def decode_event(
    data: _Buffer,
    offset: int,
    end: int,
    prev_ts: int,
    events: Mapping[int, EventDecl],
) -> tuple[EventDecl, int, dict[str, FieldValue], int]:
    """Decode one event from ``data[offset:end]``.

    Args:
        data: The packet (or any buffer).
        offset: Where the event header starts.
        end: First byte after the packet content; the event must end before.
        prev_ts: Previous clock value (see the writer's ``encode_event``).
        events: Event declarations of this stream class, by id.

    Returns:
        ``(decl, ts, fields, next_offset)``.

    Raises:
        CTFError: The event is truncated, its id is unknown or a field is
            malformed (``offset`` in the error is relative to ``data``).
    """
    pos = offset
    if end - pos < 4:
        raise CTFError("truncated event header", code=CTFErrorCode.TRUNCATED, offset=pos)
    (word,) = U32.unpack_from(data, pos)
    pos += 4
    eid = word & 0x1F
    if eid == EXTENDED_ID:
        if end - pos < EXT.size:
            raise CTFError("truncated extended event header", code=CTFErrorCode.TRUNCATED, offset=offset)
        eid, ts = EXT.unpack_from(data, pos)
        pos += EXT.size
    else:
        ts = rebuild_timestamp(prev_ts, word >> 5, COMPACT_TS_BITS)
    decl = events.get(eid)
    if decl is None:
        raise CTFError(f"unknown event id {eid}", code=CTFErrorCode.UNKNOWN_EVENT, offset=offset)
    values: dict[str, FieldValue] = {}
    for fname, ftype in decl.fields:
        values[fname], pos = _decode_field(data, pos, end, decl.name, fname, ftype)
    return decl, ts, values, pos


def _decode_field(
    data: _Buffer, pos: int, end: int, ev: str, fname: str, ftype: FieldType
) -> tuple[FieldValue, int]:
    """Decode field ``fname`` of event ``ev`` at ``data[pos:end]``; return (value, next pos).

    Raises:
        CTFError: The field does not fit before ``end`` (code TRUNCATED).
    """
    if ftype is FieldType.INT or ftype is FieldType.FLOAT:
        if end - pos < 8:
            raise CTFError(f"{ev}: field {fname} truncated", code=CTFErrorCode.TRUNCATED, offset=pos)
        number: int | float = (I64 if ftype is FieldType.INT else F64).unpack_from(data, pos)[0]
        return number, pos + 8
    if ftype is FieldType.STR:
        nul = bytes(data[pos:end]).find(b"\0") if not isinstance(data, bytes) else data.find(b"\0", pos, end)
        if nul < 0:
            raise CTFError(
                f"{ev}: string field {fname} has no NUL before the end of the packet content",
                code=CTFErrorCode.TRUNCATED,
                offset=pos,
            )
        if not isinstance(data, bytes):
            nul += pos
        return bytes(data[pos:nul]).decode("utf-8", "replace"), nul + 1
    # BYTES
    if end - pos < 4:
        raise CTFError(f"{ev}: field {fname} length truncated", code=CTFErrorCode.TRUNCATED, offset=pos)
    (n,) = U32.unpack_from(data, pos)
    pos += 4
    if n > end - pos:
        raise CTFError(
            f"{ev}: bytes field {fname} claims {n} bytes, only {end - pos} left in the packet",
            code=CTFErrorCode.TRUNCATED,
            offset=pos - 4,
        )
    return bytes(data[pos:pos + n]), pos + n


# --------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One LTTng index v1.1 entry. Offset in bytes, sizes in bits."""

    offset: int
    packet_size: int
    content_size: int
    timestamp_begin: int
    timestamp_end: int
    events_discarded: int
    stream_id: int
    stream_instance_id: int
    packet_seq_num: int


def read_index(data: bytes, *, path: str | None = None) -> list[IndexEntry]:
    """Decode an index file (header + entries).

    Args:
        data: The whole index file.
        path: File name for error messages.

    Returns:
        The entries in file order.

    Raises:
        CTFError: Bad magic or version, an entry size other than 72 in v1.1,
            or a partial entry.
    """
    if len(data) < INDEX_HEADER_STRUCT.size:
        raise CTFError("index header truncated", code=CTFErrorCode.TRUNCATED, path=path, offset=0)
    magic, major, minor, entry_len = INDEX_HEADER_STRUCT.unpack_from(data, 0)
    if magic != INDEX_MAGIC:
        raise CTFError(f"bad index magic {magic:#010x}", code=CTFErrorCode.BAD_MAGIC, path=path, offset=0)
    if (major, minor) != (1, 1) or entry_len != INDEX_ENTRY_SIZE:
        raise CTFError(
            f"unsupported index version {major}.{minor} with entry size {entry_len}; expected 1.1 / 72",
            code=CTFErrorCode.BAD_INDEX, path=path, offset=4,
        )
    body = len(data) - INDEX_HEADER_STRUCT.size
    if body % INDEX_ENTRY_SIZE:
        raise CTFError(
            f"index body of {body} bytes is not a multiple of {INDEX_ENTRY_SIZE}",
            code=CTFErrorCode.TRUNCATED, path=path, offset=len(data) - body % INDEX_ENTRY_SIZE,
        )
    return [
        IndexEntry(*INDEX_ENTRY.unpack_from(data, off))
        for off in range(INDEX_HEADER_STRUCT.size, len(data), INDEX_ENTRY_SIZE)
    ]


# --------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------


def read_stream(
    source: str | os.PathLike[str] | IO[bytes],
    meta: TraceMeta,
    *,
    max_packet_size: int = MAX_PACKET_SIZE,
) -> Iterator[Event | Discarded]:
    """Decode a stream file packet by packet.

    Each packet is checked (magic, uuid, stream class, sizes: multiples of 8,
    ``84*8 <= content_size <= packet_size``, the packet fits the file and
    ``max_packet_size``, ``timestamp_begin <= timestamp_end``) before its
    events are decoded; events must lie within the packet's time range.
    A :class:`Discarded` item precedes the events of a packet whose
    events_discarded counter grew (or, for the first packet, is not zero).

    Args:
        source: A path, or a seekable binary file object (not closed).
        meta: The trace's metadata.
        max_packet_size: Refuse packets larger than this many bytes.

    Yields:
        Events and Discarded items, in stream order.

    Raises:
        CTFError: The file cannot be read or any check fails; the message
            names the file and the byte offset.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the `with` below; read errors are not open errors
        except OSError as exc:
            raise CTFError(f"cannot open stream: {exc}", code=CTFErrorCode.IO, path=path) from exc
        with f:
            yield from _StreamDecoder(f, path, meta, max_packet_size).items()
    else:
        name = getattr(source, "name", None)
        path = name if isinstance(name, str) else "<stream>"
        yield from _StreamDecoder(source, path, meta, max_packet_size).items()


def read_packet(
    packet: bytes, meta: TraceMeta, stream: str, prev_discarded: int | None = None,
    *, max_packet_size: int = MAX_PACKET_SIZE,
) -> tuple[list[Event | Discarded], int]:
    """Decode one whole packet (a live viewer's GET_PACKET reply), with the
    checks of :func:`read_stream`.

    Args:
        packet: The packet's bytes (exactly one packet).
        meta: The trace's metadata.
        stream: The stream's name (the items' ``stream``).
        prev_discarded: The events_discarded counter of the stream's previous
            packet (None for its first).
        max_packet_size: Refuse packets larger than this many bytes.

    Returns:
        (the packet's items, its events_discarded counter).

    Raises:
        CTFError: The packet fails a check, or is not exactly one packet.
    """
    dec = _StreamDecoder(io.BytesIO(packet), stream, meta, max_packet_size)
    dec.prev_discarded = prev_discarded
    items = list(dec.items())
    h = dec.last_header
    if h is None or h.packet_size // 8 != len(packet):
        raise CTFError("not exactly one packet", code=CTFErrorCode.BAD_SIZE, path=stream, offset=0)
    return items, h.events_discarded


class _StreamDecoder:
    """Decodes one stream file; holds what one packet says about the next."""

    def __init__(self, f: IO[bytes], path: str, meta: TraceMeta, max_packet_size: int) -> None:
        self.f = f
        self.path = path
        self.stream = os.path.basename(path)
        self.meta = meta
        self.max_packet_size = max_packet_size
        self.stream_id: int | None = None  # stream class of the first packet
        self.prev_discarded: int | None = None
        self.last_header: PacketHeader | None = None

    def _bad(self, reason: str, offset: int, code: CTFErrorCode) -> CTFError:
        return CTFError(reason, code=code, path=self.path, offset=offset)

    def _read(self, pos: int, size: int, packet: int) -> bytes:
        """Up to ``size`` bytes at ``pos``, in the packet starting at ``packet``.

        Raises:
            CTFError: The read failed (code IO, at the packet's offset).
        """
        try:
            self.f.seek(pos)
            return self.f.read(size)
        except (OSError, ValueError) as exc:
            raise self._bad(f"read failed: {exc}", packet, CTFErrorCode.IO) from exc

    def items(self) -> Iterator[Event | Discarded]:
        """Every item of the stream, packet by packet.

        Raises:
            CTFError: See :func:`read_stream`.
        """
        try:
            start = self.f.tell()
            end = self.f.seek(0, io.SEEK_END)
            self.f.seek(start)
        except (OSError, ValueError) as exc:
            raise CTFError(f"stream is not a seekable file: {exc}", code=CTFErrorCode.IO, path=self.path) from exc
        pos = start
        while pos < end:
            h = self._header(pos, end - pos)
            lost = h.events_discarded - (self.prev_discarded or 0)
            self.prev_discarded = h.events_discarded
            body = self._read(pos + PACKET_HEADER_SIZE, h.content_size // 8 - PACKET_HEADER_SIZE, pos)
            if len(body) != h.content_size // 8 - PACKET_HEADER_SIZE:
                raise self._bad("file shrank while reading", pos, CTFErrorCode.TRUNCATED)
            if lost:
                yield Discarded(lost, self.stream, h.timestamp_begin + self.meta.clock_offset_ns)
            yield from self._events(h, body, pos + PACKET_HEADER_SIZE)
            pos += h.packet_size // 8

    def _header(self, pos: int, available: int) -> PacketHeader:
        """The checked header of the packet at ``pos``.

        Raises:
            CTFError: The shared header check failed, or events_discarded
                went back.
        """
        head = self._read(pos, PACKET_HEADER_SIZE, pos)
        try:
            h = check_packet_header(
                head, available=available, max_packet_size=self.max_packet_size,
                uuid=self.meta.uuid, stream_ids=self.meta.stream_ids, stream_id=self.stream_id,
            )
        except CTFError as exc:
            raise exc.at(self.path, pos) from None
        if self.stream_id is None:
            self.stream_id = h.stream_id
        self.last_header = h
        if self.prev_discarded is not None and h.events_discarded < self.prev_discarded:
            raise self._bad(
                f"events_discarded went back from {self.prev_discarded} to {h.events_discarded}",
                pos + _OFF_EVENTS_DISCARDED, CTFErrorCode.BAD_SIZE,
            )
        return h

    def _events(self, h: PacketHeader, body: bytes, base: int) -> Iterator[Event]:
        """The events of one packet, whose content ``body`` starts at file offset ``base``.

        Raises:
            CTFError: An event is malformed or outside the packet's time range.
        """
        decls = self.meta.events.get(h.stream_id, {})
        offset_ns = self.meta.clock_offset_ns
        hostname = self.meta.hostname
        epos = 0
        prev_ts = h.timestamp_begin
        while epos < len(body):
            try:
                decl, ts, values, nxt = decode_event(body, epos, len(body), prev_ts, decls)
            except CTFError as exc:
                raise exc.at(self.path, base) from None
            if not h.timestamp_begin <= ts <= h.timestamp_end:
                raise self._bad(
                    f"event {decl.name} at {ts} outside its packet's range "
                    f"[{h.timestamp_begin}, {h.timestamp_end}]",
                    base + epos, CTFErrorCode.BAD_TIMESTAMP,
                )
            yield Event(ts + offset_ns, decl.name, values, self.stream, h.packet_seq_num, hostname)
            prev_ts = ts
            epos = nxt


# --------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------


def _trace_streams(root: str) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(metadata_path, [stream paths])`` for every trace under ``root``."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if "metadata" not in filenames:
            continue
        streams = [
            os.path.join(dirpath, fn)
            for fn in sorted(filenames)
            if fn != "metadata" and not fn.startswith(".") and os.path.isfile(os.path.join(dirpath, fn))
        ]
        yield os.path.join(dirpath, "metadata"), streams
        # index/ beside a metadata file holds index files, not a trace
        dirnames[:] = [d for d in dirnames if d != "index"]


def read_trace(path: str | os.PathLike[str], *, max_packet_size: int = MAX_PACKET_SIZE) -> Iterator[Event | Discarded]:
    """Read every trace below ``path`` and merge all streams in time order.

    A trace is a directory holding a ``metadata`` file; its streams are the
    other regular files beside it whose names do not start with ``.``
    (``index/`` is skipped). Ties keep trace/stream order (sorted paths).

    Args:
        path: A trace directory or any directory above trace directories.
        max_packet_size: See :func:`read_stream`.

    Yields:
        Events and Discarded items ordered by time.

    Raises:
        CTFError: ``path`` is not a directory, a metadata file or a stream
            is invalid.
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise CTFError("not a directory", code=CTFErrorCode.IO, path=root)
    iters: list[Iterable[Event | Discarded]] = []
    for meta_path, streams in _trace_streams(root):
        meta = read_metadata_file(meta_path)
        iters += [read_stream(s, meta, max_packet_size=max_packet_size) for s in streams]
    yield from heapq.merge(*iters, key=item_time)
