"""The CTF writer: metadata text, packet headers, events and index entries.

Theory of operation
-------------------
tracewire writes traces the way LTTng-UST does, restricted to a small fixed
dialect that the reader of this package reads back:

* **Metadata** is plain TSDL text (not packetized). :func:`metadata_preamble`
  produces everything up to and including the ``stream`` blocks (one per
  channel, stream class id = the channel's position); :func:`metadata_event`
  produces one ``event`` block, appended when a tracepoint is first seen.
* **Stream files** are sequences of packets. A packet is an 84-byte
  header+context (:func:`pack_packet_header`) followed by events
  (:func:`encode_event`). Everything is little-endian and byte aligned; we
  write ``packet_size == content_size`` (no padding), but the reader accepts
  padding.
* **Event header** (``event_header_compact``): one ``<I`` =
  ``id | (ts & 0x7FFFFFF) << 5``; or the extended form ``<I`` = 31 followed by
  ``<IQ`` = (id, 64-bit ts). Because the extended id/timestamp start 4 bytes
  after the header start, the metadata's ``extended`` variant option (a
  byte-aligned struct, so it starts at header byte 1) begins with a 24-bit
  ``padding`` field; without it babeltrace2 reads the id from byte 1, as
  LTTng-UST lays it out on x86. (``align(32)`` is not an option: CTF
  alignment is relative to the packet start and events are not 4-byte
  aligned.) The padding is mapped to the clock so that babeltrace2 does not
  log "User field found in event header" on every run; the full 64-bit
  timestamp after it sets the clock value anyway.
* **Index files** (``index/<stream>.idx``) follow LTTng index v1.1
  (big-endian): a 16-byte header (:data:`INDEX_HEADER`) and one 72-byte
  entry per packet (:func:`pack_index_entry`).

The module keeps no global mutable state: module globals are constants only.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from tracewire.ctf.declarations import EventDecl, FieldType, TraceInfo
from tracewire.ctf.layout import (
    COMPACT_TS_BITS,
    COMPACT_TS_MASK,
    CTF_MAGIC,
    EXT,
    EXTENDED_ID,
    F64,
    I64,
    INDEX_ENTRY,
    INDEX_HEADER,
    INT64_MAX,
    INT64_MIN,
    NUL_REPLACEMENT,
    PACKET,
    PACKET_HEADER_SIZE,
    U32,
    U64_MASK,
)

__all__ = [
    "INDEX_HEADER",
    "encode_event",
    "metadata_event",
    "metadata_preamble",
    "pack_index_entry",
    "pack_packet_header",
]

_CLOCK_UUID_NAMESPACE = uuidlib.UUID("5b1d3c1e-7c39-4d2a-9a0e-2f1c0de0c7f1")

# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------

_TYPEALIASES = (
    "/* CTF 1.8 */\n\n"
    "typealias integer { size = 8; align = 8; signed = false; } := uint8_t;\n"
    "typealias integer { size = 16; align = 8; signed = false; } := uint16_t;\n"
    "typealias integer { size = 32; align = 8; signed = false; } := uint32_t;\n"
    "typealias integer { size = 64; align = 8; signed = false; } := uint64_t;\n"
    "typealias integer { size = 64; align = 8; signed = false; } := unsigned long;\n"
    "typealias integer { size = 5; align = 1; signed = false; } := uint5_t;\n"
    "typealias integer { size = 27; align = 1; signed = false; } := uint27_t;\n"
    "\n"
)

_PACKET_HEADER_DECL = (
    "\tbyte_order = le;\n"
    "\tpacket.header := struct {\n"
    "\t\tuint32_t magic;\n"
    "\t\tuint8_t  uuid[16];\n"
    "\t\tuint32_t stream_id;\n"
    "\t\tuint64_t stream_instance_id;\n"
    "\t};\n"
    "};\n\n"
)

_CLOCK_TYPES_AND_HEADERS = (
    "typealias integer {\n"
    "\tsize = 27; align = 1; signed = false;\n"
    "\tmap = clock.monotonic.value;\n"
    "} := uint27_clock_monotonic_t;\n\n"
    "typealias integer {\n"
    "\tsize = 64; align = 8; signed = false;\n"
    "\tmap = clock.monotonic.value;\n"
    "} := uint64_clock_monotonic_t;\n\n"
    "struct packet_context {\n"
    "\tuint64_clock_monotonic_t timestamp_begin;\n"
    "\tuint64_clock_monotonic_t timestamp_end;\n"
    "\tuint64_t content_size;\n"
    "\tuint64_t packet_size;\n"
    "\tuint64_t packet_seq_num;\n"
    "\tunsigned long events_discarded;\n"
    "\tuint32_t cpu_id;\n"
    "};\n\n"
    "struct event_header_compact {\n"
    "\tenum : uint5_t { compact = 0 ... 30, extended = 31 } id;\n"
    "\tvariant <id> {\n"
    "\t\tstruct {\n"
    "\t\t\tuint27_clock_monotonic_t timestamp;\n"
    "\t\t} compact;\n"
    "\t\tstruct {\n"
    # The writer puts the extended id 4 bytes after the header start
    # (header word <I = 31). This struct is byte aligned, so it starts
    # at byte 1 of the header: 3 zero bytes of padding, then the id.
    # (align(32) would be wrong: CTF alignment is relative to the
    # packet start, and events are not 4-byte aligned.) The padding is
    # mapped to the clock only because babeltrace2 warns about every
    # header integer that has no meaning; the 64-bit timestamp that
    # follows overwrites the clock value completely.
    "\t\t\t/* 3 zero bytes: id starts 4 bytes into the header */\n"
    "\t\t\tinteger { size = 24; align = 8; signed = false; map = clock.monotonic.value; } padding;\n"
    "\t\t\tuint32_t id;\n"
    "\t\t\tuint64_clock_monotonic_t timestamp;\n"
    "\t\t} extended;\n"
    "\t} v;\n"
    "} align(8);\n\n"
)

_STREAM_BLOCK = (
    "stream {{\n"
    "\tid = {0};\n"
    "\tevent.header := struct event_header_compact;\n"
    "\tpacket.context := struct packet_context;\n"
    "}};\n\n"
)


def _tsdl_string(s: str) -> str:
    """Quote ``s`` as a TSDL string literal (escape ``\\`` and ``"``, drop controls)."""
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(" ")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _clock_uuid(info: TraceInfo) -> uuidlib.UUID:
    """The monotonic clock's UUID: the given one, or one derived from the hostname."""
    if info.clock_uuid is not None:
        return uuidlib.UUID(bytes=info.clock_uuid)
    return uuidlib.uuid5(_CLOCK_UUID_NAMESPACE, "monotonic@" + info.hostname)


def _trace_block(info: TraceInfo) -> str:
    """The ``trace`` block: version, uuid, byte order, packet header."""
    return (
        "trace {\n"
        "\tmajor = 1;\n"
        "\tminor = 8;\n"
        f'\tuuid = "{uuidlib.UUID(bytes=info.uuid)}";\n'
        + _PACKET_HEADER_DECL
    )


def _env_block(info: TraceInfo) -> str:
    """The ``env`` block, as lttng-sessiond writes it for per-PID buffers."""
    return (
        "env {\n"
        f"\thostname = {_tsdl_string(info.hostname)};\n"
        '\tdomain = "ust";\n'
        '\ttracer_name = "lttng-ust";\n'
        "\ttracer_major = 2;\n"
        "\ttracer_minor = 13;\n"
        '\ttracer_buffering_scheme = "pid";\n'
        f"\ttracer_buffering_id = {info.vpid};\n"
        "\tarchitecture_bit_width = 64;\n"
        f"\ttrace_name = {_tsdl_string(info.trace_name)};\n"
        f"\ttrace_creation_datetime = {_tsdl_string(info.creation_datetime)};\n"
        f"\tvpid = {info.vpid};\n"
        f"\tprocname = {_tsdl_string(info.procname)};\n"
        f"\tvpid_datetime = {_tsdl_string(info.creation_datetime)};\n"
        "};\n\n"
    )


def _clock_block(info: TraceInfo) -> str:
    """The monotonic ``clock`` block, with the trace's offset from the Epoch."""
    offset_s, offset = divmod(info.clock_offset_ns, 1_000_000_000)
    return (
        "clock {\n"
        '\tname = "monotonic";\n'
        f'\tuuid = "{_clock_uuid(info)}";\n'
        '\tdescription = "Monotonic Clock";\n'
        "\tfreq = 1000000000; /* Frequency, in Hz */\n"
        "\tprecision = 1;\n"
        "\t/* clock value offset from Epoch is: offset_s + offset * (1/freq) */\n"
        f"\toffset_s = {offset_s};\n"
        f"\toffset = {offset};\n"
        "\tabsolute = FALSE;\n"
        "};\n\n"
    )


def metadata_preamble(info: TraceInfo) -> str:
    """Return the TSDL text that precedes the event blocks.

    Modelled on lttng-sessiond's UST metadata (per-PID buffers): integer
    typealiases, ``trace``, ``env``, ``clock``, clock-mapped typealiases,
    ``packet_context`` and ``event_header_compact`` structs, then one
    ``stream`` block per channel (id = the channel's position).

    Args:
        info: The trace description.

    Returns:
        The preamble text, starting with ``/* CTF 1.8 */``.
    """
    parts = [_TYPEALIASES, _trace_block(info), _env_block(info), _clock_block(info), _CLOCK_TYPES_AND_HEADERS]
    parts += [_STREAM_BLOCK.format(stream_id) for stream_id in range(len(info.channels))]
    return "".join(parts)


_FIELD_TSDL: Mapping[FieldType, str] = MappingProxyType({
    FieldType.INT: "\t\tinteger {{ size = 64; align = 8; signed = 1; encoding = none; base = 10; }} _{0};\n",
    FieldType.FLOAT: "\t\tfloating_point {{ exp_dig = 11; mant_dig = 53; align = 8; }} _{0};\n",
    FieldType.STR: "\t\tstring _{0};\n",
    FieldType.BYTES: (
        "\t\tinteger {{ size = 32; align = 8; signed = 0; encoding = none; base = 10; }} __{0}_length;\n"
        "\t\tinteger {{ size = 8; align = 8; signed = 0; encoding = none; base = 16; }} _{0}[ __{0}_length ];\n"
    ),
})


def metadata_event(decl: EventDecl) -> str:
    """Return the TSDL ``event`` block for one tracepoint.

    Args:
        decl: The event declaration.

    Returns:
        The block, ending with a blank line, ready to append to the metadata.
    """
    parts = [
        "event {\n",
        f'\tname = "{decl.name}";\n',
        f"\tid = {decl.id};\n",
        f"\tstream_id = {decl.stream_id};\n",
        f"\tloglevel = {decl.loglevel};\n",
        "\tfields := struct {\n",
    ]
    parts += [_FIELD_TSDL[ftype].format(fname) for fname, ftype in decl.fields]
    parts.append("\t};\n};\n\n")
    return "".join(parts)


# --------------------------------------------------------------------------
# Packets and events
# --------------------------------------------------------------------------


def pack_packet_header(
    uuid: bytes,
    stream_id: int,
    stream_instance_id: int,
    ts_begin: int,
    ts_end: int,
    content_bytes: int,
    packet_seq_num: int,
    events_discarded: int,
) -> bytes:
    """Pack a packet header + context (84 bytes).

    Args:
        uuid: The trace's 16-byte UUID.
        stream_id: Stream class id (channel position).
        stream_instance_id: Id of this stream within the trace.
        ts_begin: Clock value (ns, monotonic) of the packet's start.
        ts_end: Clock value of the packet's end (≥ the last event's).
        content_bytes: Number of event bytes following the 84-byte header.
        packet_seq_num: Sequence number of the packet in its stream.
        events_discarded: Free-running count of events lost in this stream.

    Returns:
        84 bytes; content_size = packet_size = (84 + content_bytes) * 8.

    Raises:
        ValueError: uuid is not 16 bytes or a value is out of range.
    """
    if not isinstance(uuid, bytes) or len(uuid) != 16:
        raise ValueError(f"uuid must be 16 bytes, got {uuid!r}")
    if content_bytes < 0:
        raise ValueError(f"content_bytes {content_bytes} < 0")
    size = (PACKET_HEADER_SIZE + content_bytes) * 8
    try:
        return PACKET.pack(
            CTF_MAGIC, uuid, stream_id, stream_instance_id, ts_begin, ts_end,
            size, size, packet_seq_num, events_discarded, 0,
        )
    except struct.error as exc:
        raise ValueError(f"packet header value out of range: {exc}") from exc


def encode_event(
    decl_id: int,
    ts: int,
    prev_ts: int,
    values: Sequence[object],
    fields: Sequence[tuple[str, FieldType]],
) -> bytes:
    """Encode one event (header + payload); the reference encoder.

    The compact header is used when ``decl_id < 31`` and
    ``0 <= ts - prev_ts < 2**27``; otherwise the extended one.

    Args:
        decl_id: Event class id.
        ts: Event clock value (ns, monotonic, unsigned 64-bit).
        prev_ts: Previous event's clock value in the packet, or the packet's
            timestamp_begin for its first event.
        values: One value per field, in order.
        fields: The event's ``(name, FieldType)`` pairs.

    Returns:
        The encoded event.

    Raises:
        ValueError: Wrong number of values, or a value out of range.
        TypeError: A value does not match its field type.
    """
    if not 0 <= decl_id < 1 << 32:
        raise ValueError(f"event id {decl_id} out of range")
    if not 0 <= ts <= U64_MASK:
        raise ValueError(f"timestamp {ts} out of range")
    if len(values) != len(fields):
        raise ValueError(f"event id {decl_id}: {len(values)} values for {len(fields)} fields")
    delta = ts - prev_ts
    if decl_id < EXTENDED_ID and 0 <= delta < 1 << COMPACT_TS_BITS:
        out = bytearray(U32.pack(decl_id | (ts & COMPACT_TS_MASK) << 5))
    else:
        out = bytearray(U32.pack(EXTENDED_ID))
        out += EXT.pack(decl_id, ts)
    for (fname, ftype), v in zip(fields, values):
        _encode_field(out, fname, ftype, v)
    return bytes(out)


def _encode_field(out: bytearray, fname: str, ftype: FieldType, v: object) -> None:
    """Append one field value to ``out`` (see :func:`encode_event`).

    Raises:
        ValueError: The value is out of range for its type.
        TypeError: The value does not match ``ftype``.
    """
    if ftype is FieldType.INT:
        if not isinstance(v, int):
            raise TypeError(f"field {fname}: expected int, got {type(v).__name__}")
        if not INT64_MIN <= v <= INT64_MAX:
            raise ValueError(f"field {fname}: {v} does not fit in int64")
        out += I64.pack(v)
    elif ftype is FieldType.FLOAT:
        if not isinstance(v, (int, float)):
            raise TypeError(f"field {fname}: expected float, got {type(v).__name__}")
        try:
            out += F64.pack(float(v))
        except OverflowError:
            raise ValueError(f"field {fname}: {v} does not fit in a double") from None
    elif ftype is FieldType.STR:
        if not isinstance(v, str):
            raise TypeError(f"field {fname}: expected str, got {type(v).__name__}")
        out += v.replace("\0", NUL_REPLACEMENT).encode("utf-8", "replace")
        out.append(0)
    elif ftype is FieldType.BYTES:
        if not isinstance(v, (bytes, bytearray, memoryview)):
            raise TypeError(f"field {fname}: expected bytes, got {type(v).__name__}")
        b = bytes(v)
        if len(b) > 0xFFFFFFFF:
            raise ValueError(f"field {fname}: {len(b)} bytes is too long")
        out += U32.pack(len(b))
        out += b
    else:  # pragma: no cover - FieldType is closed
        raise TypeError(f"field {fname}: unknown field type {ftype!r}")


# --------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------


def pack_index_entry(
    offset: int,
    packet_size_bits: int,
    content_size_bits: int,
    ts_begin: int,
    ts_end: int,
    events_discarded: int,
    stream_id: int,
    stream_instance_id: int,
    packet_seq_num: int,
) -> bytes:
    """Pack one index entry (72 bytes, big-endian); the file starts with :data:`INDEX_HEADER`.

    Args:
        offset: Byte offset of the packet in the stream file.
        packet_size_bits: The packet's packet_size.
        content_size_bits: The packet's content_size.
        ts_begin: The packet's timestamp_begin.
        ts_end: The packet's timestamp_end.
        events_discarded: The packet's events_discarded.
        stream_id: Stream class id.
        stream_instance_id: Stream instance id.
        packet_seq_num: The packet's sequence number.

    Returns:
        The 72-byte entry.

    Raises:
        ValueError: A value does not fit in an unsigned 64-bit integer.
    """
    try:
        return INDEX_ENTRY.pack(
            offset, packet_size_bits, content_size_bits, ts_begin, ts_end,
            events_discarded, stream_id, stream_instance_id, packet_seq_num,
        )
    except struct.error as exc:
        raise ValueError(f"index entry value out of range: {exc}") from exc
