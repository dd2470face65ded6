"""CTF 1.8 trace format: the writer, the readers, and text output of events.

tracewire writes traces the way LTTng-UST does, restricted to a small fixed
dialect so that this pure package can both write and read it. It is split by
responsibility; everything below is re-exported here, so users write
``from tracewire import ctf`` and ``ctf.read_trace(...)``:

* :mod:`~tracewire.ctf.errors` — :class:`CTFError` and its
  :class:`CTFErrorCode`, raised by every reader.
* :mod:`~tracewire.ctf.declarations` — what a trace declares:
  :class:`FieldType`, :class:`EventDecl`, :class:`TraceInfo`.
* :mod:`~tracewire.ctf.layout` — the bytes on disk (packet header and
  context, event header and fields, index), :class:`PacketHeader`, and the
  one packet-header check :func:`check_packet_header` shared by the stream
  reader and relayd.
* :mod:`~tracewire.ctf.writer` — metadata TSDL text
  (:func:`metadata_preamble`, :func:`metadata_event`), packet headers,
  events and index entries; its docstring holds the theory of operation.
* :mod:`~tracewire.ctf.metadata_reader` — the TSDL parser
  (:func:`parse_metadata`, :func:`read_metadata_file`, :class:`TraceMeta`).
* :mod:`~tracewire.ctf.stream_reader` — events out of stream files
  (:func:`read_stream`, :func:`decode_event`), index files
  (:func:`read_index`) and whole traces (:func:`read_trace`), treating all
  input as hostile.
* :mod:`~tracewire.ctf.text` — :func:`format_event`, one line per event.

The package keeps no global mutable state: module globals are constants and
precompiled ``struct.Struct`` / ``re.Pattern`` objects only.
"""

from __future__ import annotations

from tracewire.ctf.declarations import (
    MAX_FIELDS,
    PYTHON_FIELD_TYPES,
    EventDecl,
    Fields,
    FieldType,
    FieldValue,
    TraceInfo,
)
from tracewire.ctf.errors import CTFError, CTFErrorCode
from tracewire.ctf.layout import (
    COMPACT_TS_BITS,
    COMPACT_TS_MASK,
    CTF_MAGIC,
    EXTENDED_ID,
    INDEX_ENTRY_SIZE,
    INDEX_HEADER,
    INDEX_MAGIC,
    MAX_PACKET_SIZE,
    NUL_REPLACEMENT,
    PACKET_HEADER_SIZE,
    TSDL_MAGIC,
    PacketHeader,
    check_packet_header,
    unpack_packet_header,
)
from tracewire.ctf.metadata_reader import (
    MAX_EVENTS,
    MAX_METADATA_SIZE,
    MAX_STREAM_CLASSES,
    TraceMeta,
    parse_metadata,
    read_metadata_file,
)
from tracewire.ctf.stream_reader import (
    Discarded,
    Event,
    IndexEntry,
    decode_event,
    read_index,
    read_packet,
    read_stream,
    read_trace,
    rebuild_timestamp,
)
from tracewire.ctf.text import format_event
from tracewire.ctf.writer import (
    encode_event,
    metadata_event,
    metadata_preamble,
    pack_index_entry,
    pack_packet_header,
)

__all__ = [
    "COMPACT_TS_BITS",
    "COMPACT_TS_MASK",
    "CTF_MAGIC",
    "CTFError",
    "CTFErrorCode",
    "Discarded",
    "EXTENDED_ID",
    "Event",
    "EventDecl",
    "FieldType",
    "FieldValue",
    "Fields",
    "INDEX_ENTRY_SIZE",
    "INDEX_HEADER",
    "INDEX_MAGIC",
    "IndexEntry",
    "MAX_EVENTS",
    "MAX_FIELDS",
    "MAX_METADATA_SIZE",
    "MAX_PACKET_SIZE",
    "MAX_STREAM_CLASSES",
    "NUL_REPLACEMENT",
    "PACKET_HEADER_SIZE",
    "PYTHON_FIELD_TYPES",
    "PacketHeader",
    "TSDL_MAGIC",
    "TraceInfo",
    "TraceMeta",
    "check_packet_header",
    "decode_event",
    "encode_event",
    "format_event",
    "metadata_event",
    "metadata_preamble",
    "pack_index_entry",
    "pack_packet_header",
    "parse_metadata",
    "read_index",
    "read_packet",
    "read_metadata_file",
    "read_stream",
    "read_trace",
    "rebuild_timestamp",
    "unpack_packet_header",
]
