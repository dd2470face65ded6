"""The bytes of a CTF stream and index file, and the one packet-header check.

Layout (everything little-endian and byte aligned, except the index):

* **Packet**: an 84-byte header + context (:data:`PACKET_HEADER_SIZE`) —
  header ``magic, uuid[16], stream_id, stream_instance_id``, context
  ``timestamp_begin, timestamp_end, content_size, packet_size,
  packet_seq_num, events_discarded, cpu_id`` (sizes in bits) — then events.
  We write ``packet_size == content_size`` (no padding); readers accept
  padding.
* **Event header** (``event_header_compact``): one ``<I`` =
  ``id | (ts & 0x7FFFFFF) << 5``; or the extended form ``<I`` = 31 followed
  by ``<IQ`` = (id, 64-bit ts).
* **Event fields**: int64 ``<q``, double ``<d``, UTF-8 string then NUL,
  bytes as ``<I`` length then the bytes.
* **Index files** (``index/<stream>.idx``) follow LTTng index v1.1
  (big-endian): a 16-byte header and one 72-byte entry per packet.

:func:`check_packet_header` is the one validity check of a packet header:
the stream reader runs it on every packet of a file, and relayd on every
packet a consumer sends, so both refuse the same packets.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from collections.abc import Set
from dataclasses import dataclass

from tracewire.ctf.errors import CTFError, CTFErrorCode

__all__ = [
    "COMPACT_TS_BITS",
    "COMPACT_TS_MASK",
    "CTF_MAGIC",
    "EXTENDED_ID",
    "INDEX_ENTRY_SIZE",
    "INDEX_HEADER",
    "INDEX_MAGIC",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_PACKET_SIZE",
    "NUL_REPLACEMENT",
    "PACKET_HEADER_SIZE",
    "TSDL_MAGIC",
    "U64_MASK",
    "PacketHeader",
    "check_packet_header",
    "unpack_packet_header",
]

CTF_MAGIC = 0xC1FC1FC1
TSDL_MAGIC = 0x75D11D57
INDEX_MAGIC = 0xC1F1DCC1

HEADER = struct.Struct("<I16sIQ")  # packet header, 32 bytes
CONTEXT = struct.Struct("<QQQQQQI")  # packet context, 52 bytes
PACKET_HEADER_SIZE = HEADER.size + CONTEXT.size  # 84
PACKET = struct.Struct("<I16sIQQQQQQQI")  # header + context in one go
assert PACKET.size == PACKET_HEADER_SIZE

U32 = struct.Struct("<I")
I64 = struct.Struct("<q")
F64 = struct.Struct("<d")
EXT = struct.Struct("<IQ")  # extended event header after its <I = 31

INDEX_HEADER_STRUCT = struct.Struct(">IIII")
INDEX_ENTRY = struct.Struct(">QQQQQQQQQ")
INDEX_ENTRY_SIZE = INDEX_ENTRY.size  # 72
INDEX_HEADER = INDEX_HEADER_STRUCT.pack(INDEX_MAGIC, 1, 1, INDEX_ENTRY_SIZE)

META_PKT = struct.Struct("<I16sIIIBBBBB")  # packetized metadata header, 37 B

COMPACT_TS_BITS = 27
COMPACT_TS_MASK = (1 << COMPACT_TS_BITS) - 1
EXTENDED_ID = 31
U64_MASK = (1 << 64) - 1
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

#: What the encoders put in place of a NUL character inside a ``str`` field
#: (a CTF string ends at the first NUL).
NUL_REPLACEMENT = "\ufffd"

#: Largest packet the readers accept by default (callers may lower it).
MAX_PACKET_SIZE = 256 * 1024 * 1024

# Offsets of header fields, for error locations.
_OFF_UUID = 4
_OFF_STREAM_ID = 20
_OFF_TIMESTAMPS = 32
_OFF_CONTENT_SIZE = 48
_OFF_PACKET_SIZE = 56


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """Decoded 84-byte packet header + context. Sizes are in bits."""

    magic: int
    uuid: bytes
    stream_id: int
    stream_instance_id: int
    timestamp_begin: int
    timestamp_end: int
    content_size: int
    packet_size: int
    packet_seq_num: int
    events_discarded: int
    cpu_id: int


def unpack_packet_header(data: bytes | bytearray | memoryview, offset: int = 0) -> PacketHeader:
    """Unpack a packet header + context without validating it.

    Args:
        data: Buffer holding at least 84 bytes from ``offset``.
        offset: Where the packet starts.

    Returns:
        The decoded fields.

    Raises:
        CTFError: Fewer than 84 bytes are available (code TRUNCATED).
    """
    if offset < 0 or len(data) - offset < PACKET_HEADER_SIZE:
        raise CTFError(
            f"packet header needs {PACKET_HEADER_SIZE} bytes, only {max(0, len(data) - offset)} left",
            code=CTFErrorCode.TRUNCATED,
            offset=offset,
        )
    return PacketHeader(*PACKET.unpack_from(data, offset))


def check_packet_header(
    data: bytes | bytearray | memoryview,
    *,
    available: int | None = None,
    exact: bool = False,
    max_packet_size: int | None = MAX_PACKET_SIZE,
    uuid: bytes | None = None,
    stream_ids: Set[int] | None = None,
    stream_id: int | None = None,
) -> PacketHeader:
    """Unpack the packet header + context at the start of ``data`` and check it.

    Checked, in this order: at least 84 bytes; the magic; the uuid, the
    stream class is declared and is the stream's (each when asked); sizes
    are whole bytes with ``84*8 <= content_size <= packet_size``; the packet
    is within ``max_packet_size`` and the bytes available (exactly those
    bytes when ``exact``); ``timestamp_begin <= timestamp_end``.

    Args:
        data: The packet's first bytes (the whole packet or just its header).
        available: How many bytes the packet's source holds from the packet
            start (e.g. the rest of a file); ``None``: ``len(data)``.
        exact: The packet must be exactly ``available`` bytes long (a packet
            received on its own).
        max_packet_size: Refuse packets larger than this many bytes;
            ``None`` when the caller bounded the size already.
        uuid: The trace's uuid, or ``None`` not to check it.
        stream_ids: The declared stream classes, or ``None`` not to check.
        stream_id: The stream class of the stream's earlier packets, or
            ``None`` (a first packet, or not checked).

    Returns:
        The decoded header.

    Raises:
        CTFError: A check failed; the offset is relative to the packet start
            (codes TRUNCATED, BAD_MAGIC, BAD_UUID, BAD_STREAM, BAD_SIZE,
            LIMIT, BAD_TIMESTAMP).
    """
    if len(data) < PACKET_HEADER_SIZE:
        raise CTFError(
            f"truncated packet: {len(data)} bytes left, a packet header needs {PACKET_HEADER_SIZE}",
            code=CTFErrorCode.TRUNCATED, offset=0,
        )
    h = PacketHeader(*PACKET.unpack_from(data, 0))
    if h.magic != CTF_MAGIC:
        raise CTFError(f"bad packet magic {h.magic:#010x}, expected {CTF_MAGIC:#010x}",
                       code=CTFErrorCode.BAD_MAGIC, offset=0)
    _check_identity(h, uuid, stream_ids, stream_id)
    _check_sizes(h, len(data) if available is None else available, exact, max_packet_size)
    if h.timestamp_begin > h.timestamp_end:
        raise CTFError(f"timestamp_begin {h.timestamp_begin} > timestamp_end {h.timestamp_end}",
                       code=CTFErrorCode.BAD_TIMESTAMP, offset=_OFF_TIMESTAMPS)
    return h


def _check_identity(
    h: PacketHeader, uuid: bytes | None, stream_ids: Set[int] | None, stream_id: int | None
) -> None:
    """The uuid and stream class part of :func:`check_packet_header`.

    Raises:
        CTFError: BAD_UUID or BAD_STREAM.
    """
    if uuid is not None and h.uuid != uuid:
        raise CTFError(
            f"packet uuid {uuidlib.UUID(bytes=h.uuid)} differs from the trace uuid "
            f"{uuidlib.UUID(bytes=uuid)}", code=CTFErrorCode.BAD_UUID, offset=_OFF_UUID,
        )
    if stream_ids is not None and h.stream_id not in stream_ids:
        raise CTFError(f"packet of undeclared stream class {h.stream_id}",
                       code=CTFErrorCode.BAD_STREAM, offset=_OFF_STREAM_ID)
    if stream_id is not None and h.stream_id != stream_id:
        raise CTFError(f"packet of stream class {h.stream_id} in a stream of class {stream_id}",
                       code=CTFErrorCode.BAD_STREAM, offset=_OFF_STREAM_ID)


def _check_sizes(h: PacketHeader, available: int, exact: bool, max_packet_size: int | None) -> None:
    """The size part of :func:`check_packet_header`.

    Raises:
        CTFError: BAD_SIZE, LIMIT or TRUNCATED.
    """
    def bad(reason: str, code: CTFErrorCode = CTFErrorCode.BAD_SIZE, offset: int = _OFF_CONTENT_SIZE) -> CTFError:
        return CTFError(reason, code=code, offset=offset)

    if h.content_size % 8 or h.packet_size % 8:
        raise bad(f"content_size {h.content_size} / packet_size {h.packet_size} bits not whole bytes")
    if h.content_size < PACKET_HEADER_SIZE * 8:
        raise bad(f"content_size {h.content_size} bits is smaller than the {PACKET_HEADER_SIZE}-byte header")
    if h.content_size > h.packet_size:
        raise bad(f"content_size {h.content_size} > packet_size {h.packet_size} bits")
    packet_bytes = h.packet_size // 8
    if max_packet_size is not None and packet_bytes > max_packet_size:
        raise bad(f"packet_size {packet_bytes} bytes exceeds the limit of {max_packet_size}",
                  CTFErrorCode.LIMIT, _OFF_PACKET_SIZE)
    if exact and packet_bytes != available:
        raise bad(f"packet_size {h.packet_size} bits, but the packet has {available} bytes",
                  offset=_OFF_PACKET_SIZE)
    if packet_bytes > available:
        raise bad(f"packet of {packet_bytes} bytes runs past the end of the file ({available} bytes left)",
                  CTFErrorCode.TRUNCATED, _OFF_PACKET_SIZE)
