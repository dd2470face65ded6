"""CTF 1.8 trace format: metadata text, packet and index encoding, and a reader.

Theory of operation
-------------------
tracewire writes traces the way LTTng-UST does, restricted to a small fixed
dialect so that one pure module can both write and read it:

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
  (big-endian): a 16-byte header and one 72-byte entry per packet.

The reader (:func:`parse_metadata`, :func:`read_stream`, :func:`read_trace`)
treats its input as hostile: every size is checked against the bytes
actually present and against explicit limits before anything is unpacked,
and every failure is a :class:`CTFError` naming the file and byte offset.
Compact timestamps are rebuilt exactly as babeltrace2 does (see
:func:`rebuild_timestamp`).

The module keeps no global mutable state: module globals are constants and
precompiled ``struct.Struct`` / ``re.Pattern`` objects only.
"""

from __future__ import annotations

import enum
import heapq
import io
import os
import re
import struct
import uuid as uuidlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any, TypeAlias

__all__ = [
    "CTF_MAGIC",
    "CTFError",
    "CTFErrorCode",
    "Discarded",
    "Event",
    "EventDecl",
    "FieldType",
    "INDEX_ENTRY_SIZE",
    "INDEX_HEADER",
    "INDEX_MAGIC",
    "IndexEntry",
    "MAX_METADATA_SIZE",
    "MAX_EVENTS",
    "MAX_FIELDS",
    "MAX_PACKET_SIZE",
    "NUL_REPLACEMENT",
    "PACKET_HEADER_SIZE",
    "PYTHON_FIELD_TYPES",
    "PacketHeader",
    "TraceInfo",
    "TraceMeta",
    "decode_event",
    "encode_event",
    "format_event",
    "metadata_event",
    "metadata_preamble",
    "pack_index_entry",
    "pack_packet_header",
    "parse_metadata",
    "read_index",
    "read_metadata_file",
    "read_stream",
    "read_trace",
    "rebuild_timestamp",
    "unpack_packet_header",
]

# --------------------------------------------------------------------------
# Constants and structs
# --------------------------------------------------------------------------

CTF_MAGIC = 0xC1FC1FC1
TSDL_MAGIC = 0x75D11D57
INDEX_MAGIC = 0xC1F1DCC1

_HEADER = struct.Struct("<I16sIQ")  # packet header, 32 bytes
_CONTEXT = struct.Struct("<QQQQQQI")  # packet context, 52 bytes
PACKET_HEADER_SIZE = _HEADER.size + _CONTEXT.size  # 84
_PACKET = struct.Struct("<I16sIQQQQQQQI")  # header + context in one go
assert _PACKET.size == PACKET_HEADER_SIZE

_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_EXT = struct.Struct("<IQ")

INDEX_HEADER = struct.pack(">IIII", INDEX_MAGIC, 1, 1, 72)
_INDEX_HEADER = struct.Struct(">IIII")
_INDEX_ENTRY = struct.Struct(">QQQQQQQQQ")
INDEX_ENTRY_SIZE = _INDEX_ENTRY.size  # 72

_META_PKT = struct.Struct("<I16sIIIBBBBB")  # packetized metadata header, 37 B

COMPACT_TS_BITS = 27
COMPACT_TS_MASK = (1 << COMPACT_TS_BITS) - 1
EXTENDED_ID = 31
_U64_MASK = (1 << 64) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1

#: What the encoders put in place of a NUL character inside a ``str`` field
#: (a CTF string ends at the first NUL).
NUL_REPLACEMENT = "\ufffd"

#: Reader limits (the reader's callers may lower them per call).
MAX_METADATA_SIZE = 16 * 1024 * 1024
MAX_EVENTS = 65536
MAX_FIELDS = 1024
MAX_STREAM_CLASSES = 65536
MAX_PACKET_SIZE = 256 * 1024 * 1024

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+:[A-Za-z0-9_.:-]+\Z")
_CHANNEL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_DATETIME_RE = re.compile(r"\d{8}T\d{6}([+-]\d{4})?\Z")
#: Identifiers that are keywords in babeltrace2's TSDL lexer once a field
#: name gets its ``_`` prefix.
_TSDL_UNDERSCORE_KEYWORDS = frozenset({"Bool", "Complex", "Imaginary"})
_MAX_NAME = 255

_CLOCK_UUID_NAMESPACE = uuidlib.UUID("5b1d3c1e-7c39-4d2a-9a0e-2f1c0de0c7f1")


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class CTFErrorCode(enum.Enum):
    """Machine-readable reason carried by :class:`CTFError`."""

    TRUNCATED = "truncated"
    BAD_MAGIC = "bad-magic"
    BAD_UUID = "bad-uuid"
    BAD_SIZE = "bad-size"
    BAD_STREAM = "bad-stream"
    BAD_TIMESTAMP = "bad-timestamp"
    BAD_EVENT = "bad-event"
    UNKNOWN_EVENT = "unknown-event"
    BAD_METADATA = "bad-metadata"
    BAD_INDEX = "bad-index"
    LIMIT = "limit-exceeded"
    IO = "io"


class CTFError(ValueError):
    """A trace, metadata text or index could not be decoded.

    Attributes:
        code: A :class:`CTFErrorCode` saying what kind of problem it is.
        path: The file being read (``None`` for in-memory text).
        offset: The byte offset (in the stream/index file) or character
            offset (in metadata text) where the problem was found, if known.
        reason: The message without the file/offset prefix.
    """

    def __init__(
        self,
        reason: str,
        *,
        code: CTFErrorCode,
        path: str | None = None,
        offset: int | None = None,
    ) -> None:
        where = []
        if path is not None:
            where.append(f"file {path!r}")
        if offset is not None:
            where.append(f"offset {offset}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)
        self.code = code
        self.path = path
        self.offset = offset
        self.reason = reason


# --------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------


class FieldType(enum.Enum):
    """Type of one tracepoint field and how it is encoded in an event."""

    INT = "int"  # int64, <q
    FLOAT = "float"  # double, <d
    STR = "str"  # UTF-8 then NUL
    BYTES = "bytes"  # <I length then bytes

    @classmethod
    def from_python(cls, t: type | FieldType) -> FieldType:
        """Return the field type for a Python type (``int``, ``float``, ``str``, ``bytes``).

        Args:
            t: A Python type, or a FieldType (returned unchanged).

        Returns:
            The matching FieldType.

        Raises:
            TypeError: ``t`` is not one of the four supported types.
        """
        if isinstance(t, FieldType):
            return t
        try:
            return PYTHON_FIELD_TYPES[t]
        except (KeyError, TypeError):
            raise TypeError(
                f"unsupported field type {t!r}; expected int, float, str or bytes"
            ) from None


#: Python type → FieldType (read-only).
PYTHON_FIELD_TYPES: Mapping[type, FieldType] = MappingProxyType(
    {int: FieldType.INT, float: FieldType.FLOAT, str: FieldType.STR, bytes: FieldType.BYTES}
)

Fields: TypeAlias = tuple[tuple[str, FieldType], ...]


def _check_fields(fields: Any) -> Fields:
    """Normalise and validate a field list (see :class:`EventDecl`)."""
    try:
        items = list(fields)
    except TypeError:
        raise TypeError(f"fields must be a sequence of (name, type) pairs, got {fields!r}") from None
    if len(items) > MAX_FIELDS:
        raise ValueError(f"too many fields: {len(items)} > {MAX_FIELDS}")
    out: list[tuple[str, FieldType]] = []
    seen: set[str] = set()
    for item in items:
        try:
            fname, ftype = item
        except (TypeError, ValueError):
            raise TypeError(f"field must be a (name, type) pair, got {item!r}") from None
        if not isinstance(fname, str) or not fname.isidentifier() or not fname.isascii():
            raise ValueError(f"field name {fname!r} is not an ASCII Python identifier")
        if len(fname) > _MAX_NAME:
            raise ValueError(f"field name {fname[:32]!r}... longer than {_MAX_NAME}")
        if fname in _TSDL_UNDERSCORE_KEYWORDS:
            raise ValueError(f"field name {fname!r} becomes the TSDL keyword _{fname}")
        if fname in seen:
            raise ValueError(f"duplicate field name {fname!r}")
        seen.add(fname)
        out.append((fname, FieldType.from_python(ftype)))
    # A bytes field "x" is preceded in metadata by a length field "__x_length",
    # i.e. the metadata name of a field called "_x_length".
    for fname, ftype in out:
        if ftype is FieldType.BYTES and f"_{fname}_length" in seen:
            raise ValueError(
                f"field name '_{fname}_length' clashes with the length of bytes field {fname!r}"
            )
    return tuple(out)


@dataclass(frozen=True, slots=True)
class EventDecl:
    """One tracepoint as declared in the metadata.

    Attributes:
        name: ``provider:event``, made of ``[A-Za-z0-9_.:-]``, at most 255 chars.
        id: Event class id, unique within its stream class (0 ≤ id < 2**32).
        fields: ``(name, FieldType)`` pairs in payload order. Names are
            unique ASCII Python identifiers. Python types (``int`` ...) are
            accepted and converted, lists are converted to tuples.
        stream_id: Stream class (channel position) the event belongs to.
        loglevel: LTTng log level (0 = EMERG ... 14 = DEBUG, 13 = DEBUG_LINE).

    Raises:
        ValueError: A name, id or field list is invalid.
        TypeError: A field is not a ``(str, type)`` pair.
    """

    name: str
    id: int
    fields: Fields = ()
    stream_id: int = 0
    loglevel: int = 13

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or len(self.name) > _MAX_NAME or not _NAME_RE.match(self.name):
            raise ValueError(
                f"event name {self.name!r} must be 'provider:event' made of [A-Za-z0-9_.:-], "
                f"at most {_MAX_NAME} characters"
            )
        for attr, hi in (("id", 1 << 32), ("stream_id", 1 << 32), ("loglevel", 15)):
            v = getattr(self, attr)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < hi:
                raise ValueError(f"event {self.name}: {attr} {v!r} not in 0..{hi - 1}")
        object.__setattr__(self, "fields", _check_fields(self.fields))


@dataclass(frozen=True, slots=True)
class TraceInfo:
    """Everything the metadata preamble says about one trace.

    Attributes:
        uuid: The trace's 16-byte UUID, also written in every packet header.
        hostname: Host the trace was recorded on.
        trace_name: Session name.
        creation_datetime: ``YYYYmmddTHHMMSS`` (optionally with ``+hhmm``).
        procname: Traced process name.
        vpid: Traced process id.
        clock_offset_ns: realtime − monotonic at trace creation, in ns.
        channels: Channel names; stream class id = position.
        clock_uuid: UUID of the monotonic clock. ``None`` derives one from the
            hostname, so that traces from one host can be merged by
            babeltrace2 (its muxer requires equal clock UUIDs for
            non-absolute clocks), as LTTng does with the boot id.

    Raises:
        ValueError: A field is out of range or badly formed.
    """

    uuid: bytes
    hostname: str
    trace_name: str
    creation_datetime: str
    procname: str
    vpid: int
    clock_offset_ns: int
    channels: tuple[str, ...]
    clock_uuid: bytes | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.uuid, bytes) or len(self.uuid) != 16:
            raise ValueError(f"uuid must be 16 bytes, got {self.uuid!r}")
        if self.clock_uuid is not None and (
            not isinstance(self.clock_uuid, bytes) or len(self.clock_uuid) != 16
        ):
            raise ValueError(f"clock_uuid must be 16 bytes, got {self.clock_uuid!r}")
        for attr in ("hostname", "trace_name", "procname"):
            v = getattr(self, attr)
            if not isinstance(v, str) or len(v) > 4096:
                raise ValueError(f"{attr} must be a string of at most 4096 characters")
        if not isinstance(self.creation_datetime, str) or not _DATETIME_RE.match(self.creation_datetime):
            raise ValueError(
                f"creation_datetime {self.creation_datetime!r} is not YYYYmmddTHHMMSS[+hhmm]"
            )
        if not isinstance(self.vpid, int) or not 0 <= self.vpid < 1 << 31:
            raise ValueError(f"vpid {self.vpid!r} out of range")
        if not isinstance(self.clock_offset_ns, int) or not _INT64_MIN <= self.clock_offset_ns <= _INT64_MAX:
            raise ValueError(f"clock_offset_ns {self.clock_offset_ns!r} is not an int64")
        channels = tuple(self.channels)
        if not channels:
            raise ValueError("a trace needs at least one channel")
        for ch in channels:
            if not isinstance(ch, str) or len(ch) > _MAX_NAME or not _CHANNEL_RE.match(ch):
                raise ValueError(f"channel name {ch!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]*")
        if len(set(channels)) != len(channels):
            raise ValueError(f"duplicate channel names in {channels!r}")
        object.__setattr__(self, "channels", channels)


# --------------------------------------------------------------------------
# Metadata writer
# --------------------------------------------------------------------------


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
    if info.clock_uuid is not None:
        return uuidlib.UUID(bytes=info.clock_uuid)
    return uuidlib.uuid5(_CLOCK_UUID_NAMESPACE, "monotonic@" + info.hostname)


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
    offset_s, offset = divmod(info.clock_offset_ns, 1_000_000_000)
    trace_uuid = str(uuidlib.UUID(bytes=info.uuid))
    parts = [
        "/* CTF 1.8 */\n\n",
        "typealias integer { size = 8; align = 8; signed = false; } := uint8_t;\n",
        "typealias integer { size = 16; align = 8; signed = false; } := uint16_t;\n",
        "typealias integer { size = 32; align = 8; signed = false; } := uint32_t;\n",
        "typealias integer { size = 64; align = 8; signed = false; } := uint64_t;\n",
        "typealias integer { size = 64; align = 8; signed = false; } := unsigned long;\n",
        "typealias integer { size = 5; align = 1; signed = false; } := uint5_t;\n",
        "typealias integer { size = 27; align = 1; signed = false; } := uint27_t;\n",
        "\n",
        "trace {\n",
        "\tmajor = 1;\n",
        "\tminor = 8;\n",
        f'\tuuid = "{trace_uuid}";\n',
        "\tbyte_order = le;\n",
        "\tpacket.header := struct {\n",
        "\t\tuint32_t magic;\n",
        "\t\tuint8_t  uuid[16];\n",
        "\t\tuint32_t stream_id;\n",
        "\t\tuint64_t stream_instance_id;\n",
        "\t};\n",
        "};\n\n",
        "env {\n",
        f"\thostname = {_tsdl_string(info.hostname)};\n",
        '\tdomain = "ust";\n',
        '\ttracer_name = "lttng-ust";\n',
        "\ttracer_major = 2;\n",
        "\ttracer_minor = 13;\n",
        '\ttracer_buffering_scheme = "pid";\n',
        f"\ttracer_buffering_id = {info.vpid};\n",
        "\tarchitecture_bit_width = 64;\n",
        f"\ttrace_name = {_tsdl_string(info.trace_name)};\n",
        f"\ttrace_creation_datetime = {_tsdl_string(info.creation_datetime)};\n",
        f"\tvpid = {info.vpid};\n",
        f"\tprocname = {_tsdl_string(info.procname)};\n",
        f"\tvpid_datetime = {_tsdl_string(info.creation_datetime)};\n",
        "};\n\n",
        "clock {\n",
        '\tname = "monotonic";\n',
        f'\tuuid = "{_clock_uuid(info)}";\n',
        '\tdescription = "Monotonic Clock";\n',
        "\tfreq = 1000000000; /* Frequency, in Hz */\n",
        "\tprecision = 1;\n",
        "\t/* clock value offset from Epoch is: offset_s + offset * (1/freq) */\n",
        f"\toffset_s = {offset_s};\n",
        f"\toffset = {offset};\n",
        "\tabsolute = FALSE;\n",
        "};\n\n",
        "typealias integer {\n",
        "\tsize = 27; align = 1; signed = false;\n",
        "\tmap = clock.monotonic.value;\n",
        "} := uint27_clock_monotonic_t;\n\n",
        "typealias integer {\n",
        "\tsize = 64; align = 8; signed = false;\n",
        "\tmap = clock.monotonic.value;\n",
        "} := uint64_clock_monotonic_t;\n\n",
        "struct packet_context {\n",
        "\tuint64_clock_monotonic_t timestamp_begin;\n",
        "\tuint64_clock_monotonic_t timestamp_end;\n",
        "\tuint64_t content_size;\n",
        "\tuint64_t packet_size;\n",
        "\tuint64_t packet_seq_num;\n",
        "\tunsigned long events_discarded;\n",
        "\tuint32_t cpu_id;\n",
        "};\n\n",
        "struct event_header_compact {\n",
        "\tenum : uint5_t { compact = 0 ... 30, extended = 31 } id;\n",
        "\tvariant <id> {\n",
        "\t\tstruct {\n",
        "\t\t\tuint27_clock_monotonic_t timestamp;\n",
        "\t\t} compact;\n",
        "\t\tstruct {\n",
        # The writer puts the extended id 4 bytes after the header start
        # (header word <I = 31). This struct is byte aligned, so it starts
        # at byte 1 of the header: 3 zero bytes of padding, then the id.
        # (align(32) would be wrong: CTF alignment is relative to the
        # packet start, and events are not 4-byte aligned.) The padding is
        # mapped to the clock only because babeltrace2 warns about every
        # header integer that has no meaning; the 64-bit timestamp that
        # follows overwrites the clock value completely.
        "\t\t\t/* 3 zero bytes: id starts 4 bytes into the header */\n",
        "\t\t\tinteger { size = 24; align = 8; signed = false; map = clock.monotonic.value; } padding;\n",
        "\t\t\tuint32_t id;\n",
        "\t\t\tuint64_clock_monotonic_t timestamp;\n",
        "\t\t} extended;\n",
        "\t} v;\n",
        "} align(8);\n\n",
    ]
    for stream_id, _channel in enumerate(info.channels):
        parts += [
            "stream {\n",
            f"\tid = {stream_id};\n",
            "\tevent.header := struct event_header_compact;\n",
            "\tpacket.context := struct packet_context;\n",
            "};\n\n",
        ]
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
# Packets, events, index
# --------------------------------------------------------------------------


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
        return _PACKET.pack(
            CTF_MAGIC, uuid, stream_id, stream_instance_id, ts_begin, ts_end,
            size, size, packet_seq_num, events_discarded, 0,
        )
    except struct.error as exc:
        raise ValueError(f"packet header value out of range: {exc}") from exc


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
    return PacketHeader(*_PACKET.unpack_from(data, offset))


def encode_event(
    decl_id: int,
    ts: int,
    prev_ts: int,
    values: Sequence[Any],
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
    if not 0 <= ts <= _U64_MASK:
        raise ValueError(f"timestamp {ts} out of range")
    if len(values) != len(fields):
        raise ValueError(f"event id {decl_id}: {len(values)} values for {len(fields)} fields")
    delta = ts - prev_ts
    if decl_id < EXTENDED_ID and 0 <= delta < 1 << COMPACT_TS_BITS:
        out = bytearray(_U32.pack(decl_id | (ts & COMPACT_TS_MASK) << 5))
    else:
        out = bytearray(_U32.pack(EXTENDED_ID))
        out += _EXT.pack(decl_id, ts)
    for (fname, ftype), v in zip(fields, values):
        if ftype is FieldType.INT:
            if not isinstance(v, int):
                raise TypeError(f"field {fname}: expected int, got {type(v).__name__}")
            if not _INT64_MIN <= v <= _INT64_MAX:
                raise ValueError(f"field {fname}: {v} does not fit in int64")
            out += _I64.pack(v)
        elif ftype is FieldType.FLOAT:
            if not isinstance(v, (int, float)):
                raise TypeError(f"field {fname}: expected float, got {type(v).__name__}")
            try:
                out += _F64.pack(float(v))
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
            out += _U32.pack(len(b))
            out += b
        else:  # pragma: no cover - FieldType is closed
            raise TypeError(f"field {fname}: unknown field type {ftype!r}")
    return bytes(out)


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
        return value & _U64_MASK
    mask = (1 << bits) - 1
    new = prev
    if value < (prev & mask):
        new += mask + 1
    return ((new & ~mask) | value) & _U64_MASK


def decode_event(
    data: bytes | bytearray | memoryview,
    offset: int,
    end: int,
    prev_ts: int,
    events: Mapping[int, EventDecl],
) -> tuple[EventDecl, int, dict[str, Any], int]:
    """Decode one event from ``data[offset:end]``.

    Args:
        data: The packet (or any buffer).
        offset: Where the event header starts.
        end: First byte after the packet content; the event must end before.
        prev_ts: Previous clock value (see :func:`encode_event`).
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
    (word,) = _U32.unpack_from(data, pos)
    pos += 4
    eid = word & 0x1F
    if eid == EXTENDED_ID:
        if end - pos < _EXT.size:
            raise CTFError("truncated extended event header", code=CTFErrorCode.TRUNCATED, offset=offset)
        eid, ts = _EXT.unpack_from(data, pos)
        pos += _EXT.size
    else:
        ts = rebuild_timestamp(prev_ts, word >> 5, COMPACT_TS_BITS)
    decl = events.get(eid)
    if decl is None:
        raise CTFError(f"unknown event id {eid}", code=CTFErrorCode.UNKNOWN_EVENT, offset=offset)
    values: dict[str, Any] = {}
    for fname, ftype in decl.fields:
        if ftype is FieldType.INT:
            if end - pos < 8:
                raise CTFError(f"{decl.name}: field {fname} truncated", code=CTFErrorCode.TRUNCATED, offset=pos)
            (values[fname],) = _I64.unpack_from(data, pos)
            pos += 8
        elif ftype is FieldType.FLOAT:
            if end - pos < 8:
                raise CTFError(f"{decl.name}: field {fname} truncated", code=CTFErrorCode.TRUNCATED, offset=pos)
            (values[fname],) = _F64.unpack_from(data, pos)
            pos += 8
        elif ftype is FieldType.STR:
            nul = bytes(data[pos:end]).find(b"\0") if not isinstance(data, bytes) else data.find(b"\0", pos, end)
            if nul < 0:
                raise CTFError(
                    f"{decl.name}: string field {fname} has no NUL before the end of the packet content",
                    code=CTFErrorCode.TRUNCATED,
                    offset=pos,
                )
            if not isinstance(data, bytes):
                nul += pos
            values[fname] = bytes(data[pos:nul]).decode("utf-8", "replace")
            pos = nul + 1
        else:  # BYTES
            if end - pos < 4:
                raise CTFError(f"{decl.name}: field {fname} length truncated", code=CTFErrorCode.TRUNCATED, offset=pos)
            (n,) = _U32.unpack_from(data, pos)
            pos += 4
            if n > end - pos:
                raise CTFError(
                    f"{decl.name}: bytes field {fname} claims {n} bytes, only {end - pos} left in the packet",
                    code=CTFErrorCode.TRUNCATED,
                    offset=pos - 4,
                )
            values[fname] = bytes(data[pos:pos + n])
            pos += n
    return decl, ts, values, pos


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
        return _INDEX_ENTRY.pack(
            offset, packet_size_bits, content_size_bits, ts_begin, ts_end,
            events_discarded, stream_id, stream_instance_id, packet_seq_num,
        )
    except struct.error as exc:
        raise ValueError(f"index entry value out of range: {exc}") from exc


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
    if len(data) < _INDEX_HEADER.size:
        raise CTFError("index header truncated", code=CTFErrorCode.TRUNCATED, path=path, offset=0)
    magic, major, minor, entry_len = _INDEX_HEADER.unpack_from(data, 0)
    if magic != INDEX_MAGIC:
        raise CTFError(f"bad index magic {magic:#010x}", code=CTFErrorCode.BAD_MAGIC, path=path, offset=0)
    if (major, minor) != (1, 1) or entry_len != INDEX_ENTRY_SIZE:
        raise CTFError(
            f"unsupported index version {major}.{minor} with entry size {entry_len}; expected 1.1 / 72",
            code=CTFErrorCode.BAD_INDEX, path=path, offset=4,
        )
    body = len(data) - _INDEX_HEADER.size
    if body % INDEX_ENTRY_SIZE:
        raise CTFError(
            f"index body of {body} bytes is not a multiple of {INDEX_ENTRY_SIZE}",
            code=CTFErrorCode.TRUNCATED, path=path, offset=len(data) - body % INDEX_ENTRY_SIZE,
        )
    return [
        IndexEntry(*_INDEX_ENTRY.unpack_from(data, off))
        for off in range(_INDEX_HEADER.size, len(data), INDEX_ENTRY_SIZE)
    ]


# --------------------------------------------------------------------------
# Metadata parser (our dialect only)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceMeta:
    """What the reader needs from a trace's metadata.

    Attributes:
        uuid: Trace UUID (16 bytes) or None when the metadata has none.
        clock_offset_ns: Offset of the monotonic clock from the Epoch, in ns.
        stream_ids: Declared stream class ids.
        events: ``{stream_id: {event_id: EventDecl}}``.
        env: The ``env`` block (strings and ints).
    """

    uuid: bytes | None
    clock_offset_ns: int
    stream_ids: frozenset[int]
    events: Mapping[int, Mapping[int, EventDecl]]
    env: Mapping[str, str | int] = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        """The env block's hostname, or ``""``."""
        h = self.env.get("hostname", "")
        return h if isinstance(h, str) else str(h)


_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>/\*.*?\*/|//[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<number>-?(?:0[xX][0-9a-fA-F]+|\d+))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>:=|\.\.\.|[{}\[\]();=:<>,.+-])
    """,
    re.VERBOSE | re.DOTALL,
)

_Tok: TypeAlias = tuple[str, str, int]  # (kind, text, char offset)


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise CTFError(
                f"unexpected character {text[pos]!r} in metadata",
                code=CTFErrorCode.BAD_METADATA, offset=pos,
            )
        kind = m.lastgroup
        assert kind is not None
        if kind not in ("ws", "comment"):
            toks.append((kind, m.group(), pos))
        pos = m.end()
    return toks


def _unquote(s: str) -> str:
    out = []
    i = 1
    end = len(s) - 1
    while i < end:
        ch = s[i]
        if ch == "\\" and i + 1 < end:
            nxt = s[i + 1]
            out.append({"n": "\n", "t": "\t", "r": "\r", "0": "\0"}.get(nxt, nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _split_statements(toks: list[_Tok], start: int, stop: int) -> list[list[_Tok]]:
    """Split ``toks[start:stop]`` at top-level ``;`` (brace/bracket aware)."""
    stmts: list[list[_Tok]] = []
    depth = 0
    cur: list[_Tok] = []
    for i in range(start, stop):
        tok = toks[i]
        t = tok[1]
        if tok[0] == "punct":
            if t in ("{", "[", "("):
                depth += 1
            elif t in ("}", "]", ")"):
                depth -= 1
                if depth < 0:
                    raise CTFError(f"unbalanced {t!r}", code=CTFErrorCode.BAD_METADATA, offset=tok[2])
            elif t == ";" and depth == 0:
                if cur:
                    stmts.append(cur)
                cur = []
                continue
        cur.append(tok)
    if depth != 0 or cur:
        off = cur[0][2] if cur else (toks[stop - 1][2] if stop > start else 0)
        raise CTFError(
            "metadata ends inside a declaration (missing '}' or ';')",
            code=CTFErrorCode.BAD_METADATA, offset=off,
        )
    return stmts


def _block_body(stmt: list[_Tok], what: str) -> list[list[_Tok]]:
    """For ``kw { ... }`` return the statements inside the braces."""
    if len(stmt) < 3 or stmt[1][1] != "{" or stmt[-1][1] != "}":
        raise CTFError(f"malformed {what} block", code=CTFErrorCode.BAD_METADATA, offset=stmt[0][2])
    return _split_statements(stmt, 2, len(stmt) - 1)


def _scalar(stmt: list[_Tok], what: str) -> tuple[str, str | int]:
    """``key = value`` → (key, value) with value an int or an unquoted string."""
    if len(stmt) < 3 or stmt[1][1] not in ("=", ":="):
        raise CTFError(f"malformed assignment in {what}", code=CTFErrorCode.BAD_METADATA, offset=stmt[0][2])
    key = stmt[0][1]
    kind, text, off = stmt[2]
    if len(stmt) != 3:
        return key, " ".join(t[1] for t in stmt[2:])
    if kind == "number":
        if len(text) > 40:
            raise CTFError(f"number too long in {what}", code=CTFErrorCode.BAD_METADATA, offset=off)
        digits = text.lstrip("-")
        value = int(digits[2:], 16) if digits[:2] in ("0x", "0X") else int(digits, 10)
        return key, -value if text.startswith("-") else value
    if kind == "string":
        return key, _unquote(text)
    return key, text


def _attrs(stmt: list[_Tok], start: int, what: str) -> tuple[dict[str, str | int], int]:
    """Parse ``{ k = v; ... }`` at ``stmt[start]``; return (attrs, index after '}')."""
    if start >= len(stmt) or stmt[start][1] != "{":
        raise CTFError(f"expected '{{' in {what}", code=CTFErrorCode.BAD_METADATA, offset=stmt[min(start, len(stmt) - 1)][2])
    depth = 0
    for j in range(start, len(stmt)):
        if stmt[j][1] == "{":
            depth += 1
        elif stmt[j][1] == "}":
            depth -= 1
            if depth == 0:
                break
    else:
        raise CTFError(f"unterminated '{{' in {what}", code=CTFErrorCode.BAD_METADATA, offset=stmt[start][2])
    attrs = dict(_scalar(s, what) for s in _split_statements(stmt, start + 1, j))
    return attrs, j + 1


def _field_decl(stmt: list[_Tok], ev: str) -> tuple[str, str, dict[str, str | int], str | None]:
    """One field declaration → (kind, name, attrs, sequence-length-name)."""
    head = stmt[0][1]
    if head in ("integer", "floating_point"):
        attrs, i = _attrs(stmt, 1, f"event {ev}")
    elif head == "string":
        attrs, i = ({}, 1)
        if len(stmt) > 1 and stmt[1][1] == "{":
            attrs, i = _attrs(stmt, 1, f"event {ev}")
    else:
        raise CTFError(
            f"event {ev}: unsupported field type {head!r} (this reader knows only tracewire's dialect)",
            code=CTFErrorCode.BAD_METADATA, offset=stmt[0][2],
        )
    rest = stmt[i:]
    if not rest or rest[0][0] != "ident":
        raise CTFError(f"event {ev}: field name expected", code=CTFErrorCode.BAD_METADATA, offset=stmt[-1][2])
    name = rest[0][1]
    seq = None
    if len(rest) == 4 and rest[1][1] == "[" and rest[2][0] == "ident" and rest[3][1] == "]":
        seq = rest[2][1]
    elif len(rest) != 1:
        raise CTFError(
            f"event {ev}: unsupported declarator for field {name!r}",
            code=CTFErrorCode.BAD_METADATA, offset=rest[1][2],
        )
    return head, name, attrs, seq


def _is_int(attrs: Mapping[str, str | int], size: int, signed: bool) -> bool:
    sgn = attrs.get("signed", 0)
    is_signed = sgn in (1, "true", "TRUE")
    return attrs.get("size") == size and is_signed == signed


def _event_fields(body: list[list[_Tok]], ev: str, offset: int) -> Fields:
    decls = [_field_decl(s, ev) for s in body]
    if len(decls) > 2 * MAX_FIELDS:
        raise CTFError(f"event {ev}: too many fields", code=CTFErrorCode.LIMIT, offset=offset)
    out: list[tuple[str, FieldType]] = []
    i = 0
    while i < len(decls):
        kind, name, attrs, seq = decls[i]
        off = body[i][0][2]
        if not name.startswith("_"):
            raise CTFError(f"event {ev}: field {name!r} lacks the '_' prefix", code=CTFErrorCode.BAD_METADATA, offset=off)
        pyname = name[1:]
        if kind == "integer" and seq is None and _is_int(attrs, 64, True):
            out.append((pyname, FieldType.INT))
        elif kind == "floating_point" and attrs.get("exp_dig") == 11 and attrs.get("mant_dig") == 53:
            out.append((pyname, FieldType.FLOAT))
        elif kind == "string" and seq is None:
            out.append((pyname, FieldType.STR))
        elif (
            kind == "integer" and seq is None and _is_int(attrs, 32, False)
            and name.startswith("__") and name.endswith("_length") and i + 1 < len(decls)
        ):
            k2, n2, a2, s2 = decls[i + 1]
            if not (k2 == "integer" and _is_int(a2, 8, False) and s2 == name and name == f"_{n2}_length"):
                raise CTFError(
                    f"event {ev}: length field {name!r} is not followed by its uint8 sequence",
                    code=CTFErrorCode.BAD_METADATA, offset=off,
                )
            out.append((n2[1:], FieldType.BYTES))
            i += 1
        else:
            raise CTFError(
                f"event {ev}: unsupported declaration of field {name!r} ({kind} {dict(attrs)})",
                code=CTFErrorCode.BAD_METADATA, offset=off,
            )
        i += 1
    return tuple(out)


def parse_metadata(
    text: str,
    *,
    path: str | None = None,
    max_size: int = MAX_METADATA_SIZE,
    max_events: int = MAX_EVENTS,
) -> TraceMeta:
    """Parse metadata text written by :func:`metadata_preamble` + :func:`metadata_event`.

    This is not a general TSDL parser: typealiases and named structs are
    skipped, and event fields must use the declarations this module writes
    (int64, double, string, uint32 length + uint8 sequence).

    Args:
        text: The whole metadata text.
        path: File name for error messages.
        max_size: Refuse texts longer than this many characters.
        max_events: Refuse more event declarations than this.

    Returns:
        The parsed metadata.

    Raises:
        CTFError: The text is too large, is not CTF 1.8, has a syntax error,
            declares something unsupported (byte order, clock frequency,
            field type) or duplicate/undeclared ids.
    """
    try:
        return _parse_metadata(text, max_size=max_size, max_events=max_events)
    except CTFError as exc:
        if path is None:
            raise
        raise CTFError(exc.reason, code=exc.code, path=path, offset=exc.offset) from None


def _parse_metadata(text: str, *, max_size: int, max_events: int) -> TraceMeta:
    def bad(msg: str, off: int | None, code: CTFErrorCode = CTFErrorCode.BAD_METADATA) -> CTFError:
        return CTFError(msg, code=code, offset=off)

    if not isinstance(text, str):
        raise bad(f"metadata must be text, got {type(text).__name__}", None)
    if len(text) > max_size:
        raise bad(f"metadata of {len(text)} characters exceeds the limit of {max_size}", None, CTFErrorCode.LIMIT)
    if not text.startswith("/* CTF 1.8"):
        raise bad("metadata does not begin with '/* CTF 1.8'", 0)
    toks = _tokenize(text)
    uuid_b: bytes | None = None
    offset_ns = 0
    env: dict[str, str | int] = {}
    stream_ids: set[int] = set()
    events: dict[int, dict[int, EventDecl]] = {}
    n_events = 0
    seen_trace = seen_clock = False
    for stmt in _split_statements(toks, 0, len(toks)):
        kw = stmt[0][1]
        off = stmt[0][2]
        if kw in ("typealias", "struct", "typedef", "enum", "variant"):
            continue
        if kw not in ("trace", "env", "clock", "stream", "event"):
            raise bad(f"unexpected top-level statement starting with {kw!r}", off)
        body = _block_body(stmt, kw)
        if kw == "event":
            n_events += 1
            if n_events > max_events:
                raise bad(f"more than {max_events} event declarations", off, CTFErrorCode.LIMIT)
            ev: dict[str, Any] = {}
            fields: Fields = ()
            for s in body:
                if s[0][1] == "fields":
                    if len(s) < 4 or s[1][1] != ":=" or s[2][1] != "struct" or s[3][1] != "{" or s[-1][1] != "}":
                        raise bad("event fields must be ':= struct { ... }'", s[0][2])
                    fields = _event_fields(_split_statements(s, 4, len(s) - 1), str(ev.get("name", "?")), s[0][2])
                else:
                    k, v = _scalar(s, "event")
                    ev[k] = v
            try:
                decl = EventDecl(
                    name=ev["name"], id=ev["id"], fields=fields,
                    stream_id=ev.get("stream_id", 0), loglevel=ev.get("loglevel", 13),
                )
            except KeyError as exc:
                raise bad(f"event block without {exc.args[0]}", off) from None
            except (TypeError, ValueError) as exc:
                raise bad(f"invalid event declaration: {exc}", off) from exc
            if decl.stream_id not in stream_ids:
                raise bad(f"event {decl.name} refers to undeclared stream class {decl.stream_id}", off)
            per_stream = events.setdefault(decl.stream_id, {})
            if decl.id in per_stream:
                raise bad(f"duplicate event id {decl.id} in stream class {decl.stream_id}", off)
            per_stream[decl.id] = decl
            continue
        attrs: dict[str, str | int] = {}
        for s in body:
            if kw in ("trace", "stream") and s[0][1] in ("packet", "event"):
                continue  # packet.header / event.header / packet.context
            k, v = _scalar(s, kw)
            attrs[k] = v
        if kw == "trace":
            if seen_trace:
                raise bad("more than one trace block", off)
            seen_trace = True
            if (attrs.get("major"), attrs.get("minor")) != (1, 8):
                raise bad(f"unsupported CTF version {attrs.get('major')}.{attrs.get('minor')}", off)
            if attrs.get("byte_order") != "le":
                raise bad(f"unsupported byte_order {attrs.get('byte_order')!r}; expected le", off)
            if "uuid" in attrs:
                try:
                    uuid_b = uuidlib.UUID(str(attrs["uuid"])).bytes
                except ValueError:
                    raise bad(f"bad trace uuid {attrs['uuid']!r}", off) from None
        elif kw == "env":
            env.update(attrs)
        elif kw == "clock":
            if attrs.get("name") != "monotonic":
                continue
            if seen_clock:
                raise bad("more than one monotonic clock", off)
            seen_clock = True
            if attrs.get("freq", 1_000_000_000) != 1_000_000_000:
                raise bad(f"unsupported clock frequency {attrs.get('freq')!r}", off)
            o_s, o = attrs.get("offset_s", 0), attrs.get("offset", 0)
            if not isinstance(o_s, int) or not isinstance(o, int):
                raise bad("clock offsets must be integers", off)
            offset_ns = o_s * 1_000_000_000 + o
            if not _INT64_MIN <= offset_ns <= _INT64_MAX:
                raise bad("clock offset out of range", off)
        else:  # stream
            sid = attrs.get("id", 0)
            if not isinstance(sid, int) or not 0 <= sid < 1 << 32:
                raise bad(f"bad stream id {sid!r}", off)
            if sid in stream_ids:
                raise bad(f"duplicate stream id {sid}", off)
            if len(stream_ids) >= MAX_STREAM_CLASSES:
                raise bad("too many stream classes", off, CTFErrorCode.LIMIT)
            stream_ids.add(sid)
    if not seen_trace:
        raise bad("metadata has no trace block", None)
    return TraceMeta(
        uuid=uuid_b,
        clock_offset_ns=offset_ns,
        stream_ids=frozenset(stream_ids),
        events=MappingProxyType({k: MappingProxyType(v) for k, v in events.items()}),
        env=MappingProxyType(env),
    )


def read_metadata_file(path: str | os.PathLike[str], *, max_size: int = MAX_METADATA_SIZE) -> TraceMeta:
    """Read and parse a metadata file, plain text or packetized.

    Args:
        path: The ``metadata`` file.
        max_size: Refuse files larger than this many bytes.

    Returns:
        The parsed metadata.

    Raises:
        CTFError: The file cannot be read, is too large, is not valid UTF-8,
            has a broken metadata packet, or fails :func:`parse_metadata`.
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(max_size + 1)
    except OSError as exc:
        raise CTFError(f"cannot read metadata: {exc}", code=CTFErrorCode.IO, path=p) from exc
    if len(raw) > max_size:
        raise CTFError(f"metadata larger than {max_size} bytes", code=CTFErrorCode.LIMIT, path=p)
    if len(raw) >= 4 and _U32.unpack_from(raw, 0)[0] == TSDL_MAGIC:
        raw = _depacketize_metadata(raw, p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CTFError(f"metadata is not UTF-8: {exc.reason}", code=CTFErrorCode.BAD_METADATA,
                       path=p, offset=exc.start) from None
    return parse_metadata(text, path=p, max_size=max_size)


def _depacketize_metadata(raw: bytes, path: str) -> bytes:
    out = bytearray()
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < _META_PKT.size:
            raise CTFError("truncated metadata packet header", code=CTFErrorCode.TRUNCATED, path=path, offset=pos)
        magic, _u, _ck, content, size, _c, _e, _cs, major, minor = _META_PKT.unpack_from(raw, pos)
        if magic != TSDL_MAGIC:
            raise CTFError(f"bad metadata packet magic {magic:#010x}", code=CTFErrorCode.BAD_MAGIC, path=path, offset=pos)
        if (major, minor) != (1, 8) or content % 8 or size % 8 or content > size or content < _META_PKT.size * 8:
            raise CTFError(
                f"bad metadata packet (version {major}.{minor}, content_size {content}, packet_size {size})",
                code=CTFErrorCode.BAD_SIZE, path=path, offset=pos,
            )
        if size // 8 > len(raw) - pos:
            raise CTFError("metadata packet runs past the end of the file", code=CTFErrorCode.TRUNCATED,
                           path=path, offset=pos)
        out += raw[pos + _META_PKT.size:pos + content // 8]
        pos += size // 8
    return bytes(out)


# --------------------------------------------------------------------------
# Stream reader
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
    fields: dict[str, Any]
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


def _item_time(item: Event | Discarded) -> int:
    return item.timestamp if isinstance(item, Event) else item.ts


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
            f = open(path, "rb")
        except OSError as exc:
            raise CTFError(f"cannot open stream: {exc}", code=CTFErrorCode.IO, path=path) from exc
        with f:
            yield from _read_stream(f, os.path.basename(path), path, meta, max_packet_size)
    else:
        name = getattr(source, "name", None)
        path = name if isinstance(name, str) else "<stream>"
        yield from _read_stream(source, os.path.basename(path), path, meta, max_packet_size)


def _read_stream(
    f: IO[bytes], stream: str, path: str, meta: TraceMeta, max_packet_size: int
) -> Iterator[Event | Discarded]:
    def bad(msg: str, off: int, code: CTFErrorCode) -> CTFError:
        return CTFError(msg, code=code, path=path, offset=off)

    try:
        start = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(start)
    except (OSError, ValueError) as exc:
        raise CTFError(f"stream is not a seekable file: {exc}", code=CTFErrorCode.IO, path=path) from exc
    offset_ns = meta.clock_offset_ns
    hostname = meta.hostname
    pos = start
    stream_id: int | None = None
    prev_discarded: int | None = None
    while pos < end:
        try:
            f.seek(pos)
            head = f.read(PACKET_HEADER_SIZE)
        except (OSError, ValueError) as exc:
            raise bad(f"read failed: {exc}", pos, CTFErrorCode.IO) from exc
        if len(head) < PACKET_HEADER_SIZE:
            raise bad(
                f"truncated packet: {len(head)} bytes left, a packet header needs {PACKET_HEADER_SIZE}",
                pos, CTFErrorCode.TRUNCATED,
            )
        h = PacketHeader(*_PACKET.unpack(head))
        if h.magic != CTF_MAGIC:
            raise bad(f"bad packet magic {h.magic:#010x}, expected {CTF_MAGIC:#010x}", pos, CTFErrorCode.BAD_MAGIC)
        if meta.uuid is not None and h.uuid != meta.uuid:
            raise bad(
                f"packet uuid {uuidlib.UUID(bytes=h.uuid)} differs from the trace uuid "
                f"{uuidlib.UUID(bytes=meta.uuid)}", pos + 4, CTFErrorCode.BAD_UUID,
            )
        if h.stream_id not in meta.stream_ids:
            raise bad(f"packet of undeclared stream class {h.stream_id}", pos + 20, CTFErrorCode.BAD_STREAM)
        if stream_id is None:
            stream_id = h.stream_id
        elif h.stream_id != stream_id:
            raise bad(
                f"packet of stream class {h.stream_id} in a stream of class {stream_id}",
                pos + 20, CTFErrorCode.BAD_STREAM,
            )
        if h.content_size % 8 or h.packet_size % 8:
            raise bad(
                f"content_size {h.content_size} / packet_size {h.packet_size} bits not whole bytes",
                pos + 48, CTFErrorCode.BAD_SIZE,
            )
        if h.content_size < PACKET_HEADER_SIZE * 8:
            raise bad(
                f"content_size {h.content_size} bits is smaller than the {PACKET_HEADER_SIZE}-byte header",
                pos + 48, CTFErrorCode.BAD_SIZE,
            )
        if h.content_size > h.packet_size:
            raise bad(
                f"content_size {h.content_size} > packet_size {h.packet_size} bits",
                pos + 48, CTFErrorCode.BAD_SIZE,
            )
        packet_bytes = h.packet_size // 8
        if packet_bytes > max_packet_size:
            raise bad(
                f"packet_size {packet_bytes} bytes exceeds the limit of {max_packet_size}",
                pos + 56, CTFErrorCode.LIMIT,
            )
        if packet_bytes > end - pos:
            raise bad(
                f"packet of {packet_bytes} bytes runs past the end of the file ({end - pos} bytes left)",
                pos + 56, CTFErrorCode.TRUNCATED,
            )
        if h.timestamp_begin > h.timestamp_end:
            raise bad(
                f"timestamp_begin {h.timestamp_begin} > timestamp_end {h.timestamp_end}",
                pos + 32, CTFErrorCode.BAD_TIMESTAMP,
            )
        if prev_discarded is not None and h.events_discarded < prev_discarded:
            raise bad(
                f"events_discarded went back from {prev_discarded} to {h.events_discarded}",
                pos + 72, CTFErrorCode.BAD_SIZE,
            )
        lost = h.events_discarded - (prev_discarded or 0)
        prev_discarded = h.events_discarded
        content_end = h.content_size // 8
        try:
            body = f.read(content_end - PACKET_HEADER_SIZE)
        except (OSError, ValueError) as exc:
            raise bad(f"read failed: {exc}", pos, CTFErrorCode.IO) from exc
        if len(body) != content_end - PACKET_HEADER_SIZE:
            raise bad("file shrank while reading", pos, CTFErrorCode.TRUNCATED)
        if lost:
            yield Discarded(lost, stream, h.timestamp_begin + offset_ns)
        decls = meta.events.get(h.stream_id, {})
        epos = 0
        prev_ts = h.timestamp_begin
        while epos < len(body):
            try:
                decl, ts, values, nxt = decode_event(body, epos, len(body), prev_ts, decls)
            except CTFError as exc:
                raise bad(
                    exc.reason, pos + PACKET_HEADER_SIZE + (exc.offset or 0), exc.code
                ) from None
            if not h.timestamp_begin <= ts <= h.timestamp_end:
                raise bad(
                    f"event {decl.name} at {ts} outside its packet's range "
                    f"[{h.timestamp_begin}, {h.timestamp_end}]",
                    pos + PACKET_HEADER_SIZE + epos, CTFErrorCode.BAD_TIMESTAMP,
                )
            yield Event(ts + offset_ns, decl.name, values, stream, h.packet_seq_num, hostname)
            prev_ts = ts
            epos = nxt
        pos += packet_bytes


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
    yield from heapq.merge(*iters, key=_item_time)


# --------------------------------------------------------------------------
# Text output
# --------------------------------------------------------------------------

_ESCAPES: Mapping[str, str] = MappingProxyType(
    {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
)


def _fmt_str(s: str) -> str:
    out = []
    for ch in s:
        e = _ESCAPES.get(ch)
        if e is not None:
            out.append(e)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _fmt_value(v: Any) -> str:
    if isinstance(v, str):
        return _fmt_str(v)
    if isinstance(v, (bytes, bytearray)):
        return "<" + bytes(v).hex(" ") + ">"
    return repr(v) if isinstance(v, float) else str(v)


def _fmt_clock(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return f"{secs // 3600 % 24:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{frac:09d}"


def format_event(ev: Event | Discarded, prev: Event | Discarded | None = None) -> str:
    """Format an item as one line of text, in the spirit of babeltrace2's text sink.

    Format::

        [HH:MM:SS.nnnnnnnnn] (+S.nnnnnnnnn) hostname provider:event: { seq = 1, msg = "hello" }

    * the time is the event's absolute time in UTC (time of day only);
    * the delta is from ``prev`` (``+?.?????????`` without it, as babeltrace2
      prints for the first event);
    * fields in declaration order: ints in decimal, floats with ``repr``,
      strings double-quoted with ``\\"``, ``\\\\``, ``\\n``, ``\\t``, ``\\r``
      and ``\\xHH`` escapes, bytes as hex pairs in angle brackets
      (``<01 ab>``, ``<>`` when empty); no fields gives ``{ }``;
    * a Discarded item gives ``[time] (+delta) !!! N events discarded in STREAM``.

    Args:
        ev: The item to format.
        prev: The previous item printed, for the delta.

    Returns:
        The line, without a trailing newline.
    """
    t = _item_time(ev)
    if prev is None:
        delta = "+?.?????????"
    else:
        d = t - _item_time(prev)
        sign = "+" if d >= 0 else "-"
        s, ns = divmod(abs(d), 1_000_000_000)
        delta = f"{sign}{s}.{ns:09d}"
    head = f"[{_fmt_clock(t)}] ({delta})"
    if isinstance(ev, Discarded):
        return f"{head} !!! {ev.count} events discarded in {ev.stream}"
    body = ", ".join(f"{k} = {_fmt_value(v)}" for k, v in ev.fields.items())
    host = f" {ev.hostname}" if ev.hostname else ""
    return f"{head}{host} {ev.name}: {{ {body} }}" if body else f"{head}{host} {ev.name}: {{ }}"
