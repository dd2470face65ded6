"""Tests for tracewire.ctf: encoding round trips, a hand-written trace read back
by our reader and by babeltrace2, index acceptance, and hostile input."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import textwrap
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracewire import ctf
from tracewire.ctf import (
    PACKET_HEADER_SIZE,
    CTFError,
    CTFErrorCode,
    Discarded,
    Event,
    EventDecl,
    FieldType,
    TraceInfo,
)

from fuzzing import examples

BABELTRACE2 = shutil.which("babeltrace2")
needs_babeltrace2 = pytest.mark.skipif(
    BABELTRACE2 is None, reason="babeltrace2 is not installed (apt install babeltrace2)"
)
SYSTEM_PYTHON = "/usr/bin/python3"


def _has_bt2() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import bt2"], capture_output=True, cwd="/", timeout=60)
    return r.returncode == 0


TRACE_UUID = uuid.UUID("0b5e5c1e-0000-4000-8000-00000000c7f1").bytes
OFFSET_NS = 1_700_000_000_123_456_789
HOST = "testhost"

HELLO = EventDecl("app:hello", 0, (("seq", int), ("msg", str), ("x", float), ("data", bytes)))
BIG = EventDecl("app:big", 40, (("v", FieldType.INT),))
ID30 = EventDecl("app:id30", 30, ())
ID31 = EventDecl("app:id31", 31, (("s", str),))
OTHER = EventDecl("app:other", 0, (("s", str), ("n", int)), stream_id=1, loglevel=4)
DECLS = (HELLO, BIG, ID30, ID31, OTHER)

INFO = TraceInfo(
    uuid=TRACE_UUID,
    hostname=HOST,
    trace_name="my-session",
    creation_datetime="20240102T030405",
    procname="myapp",
    vpid=4242,
    clock_offset_ns=OFFSET_NS,
    channels=("chan0", "chan1"),
)


# --------------------------------------------------------------------------
# Helpers that write a trace with this module only
# --------------------------------------------------------------------------


@dataclass
class Packet:
    ts_begin: int
    ts_end: int
    discarded: int
    events: list[tuple[EventDecl, int, tuple[Any, ...]]]


def build_stream(
    stream_id: int, instance: int, packets: Sequence[Packet], uuid_: bytes = TRACE_UUID
) -> tuple[bytes, bytes]:
    """Return (stream file bytes, index file bytes)."""
    data = bytearray()
    index = bytearray(ctf.INDEX_HEADER)
    for seq, p in enumerate(packets):
        body = bytearray()
        prev = p.ts_begin
        for decl, ts, values in p.events:
            body += ctf.encode_event(decl.id, ts, prev, values, decl.fields)
            prev = ts
        size = (PACKET_HEADER_SIZE + len(body)) * 8
        index += ctf.pack_index_entry(
            len(data), size, size, p.ts_begin, p.ts_end, p.discarded, stream_id, instance, seq
        )
        data += ctf.pack_packet_header(uuid_, stream_id, instance, p.ts_begin, p.ts_end, len(body), seq, p.discarded)
        data += body
    return bytes(data), bytes(index)


T0 = 1_000_000
CHAN0 = [
    Packet(T0, T0 + 2**28 + 10, 0, [
        (HELLO, T0 + 5, (1, "hello", 1.5, b"\x01\x02")),
        (ID30, T0 + 6, ()),
        (ID31, T0 + 7, ("extended by id",)),
        (HELLO, T0 + 7 + 2**27 - 1, (-(2**63), "", -0.0, b"")),  # largest compact delta
        (BIG, T0 + 7 + 2**27 - 1 + 2**27, (2**63 - 1,)),  # delta 2**27: extended
    ]),
    Packet(2**33, 2**33 + 10**9, 3, [
        (HELLO, 2**33 + 100, (2, "h\u00e9llo \u2603 \"q\"", 2.25, bytes(range(256)))),
        (HELLO, 2**33 + 10**9, (3, "last", -1e300, b"z")),
    ]),
]
CHAN1 = [
    Packet(T0 + 1, T0 + 50, 0, [(OTHER, T0 + 20, ("other", 7))]),
    Packet(T0 + 60, 2**33 + 50, 2, [
        (OTHER, T0 + 70, ("second", 8)),
        (OTHER, 2**33 + 40, ("wrapped", 9)),  # > 2**27 after the previous: extended
    ]),
]


def write_trace(root: Path, info: TraceInfo = INFO) -> Path:
    """Write the sample trace in ``root`` (metadata, 2 streams, index)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "index").mkdir(exist_ok=True)
    text = ctf.metadata_preamble(info) + "".join(ctf.metadata_event(d) for d in DECLS)
    (root / "metadata").write_text(text, encoding="utf-8")
    for name, sid, inst, packets in (("chan0_0", 0, 0, CHAN0), ("chan1_0", 1, 1, CHAN1)):
        data, index = build_stream(sid, inst, packets, info.uuid)
        (root / name).write_bytes(data)
        (root / "index" / f"{name}.idx").write_bytes(index)
    return root


def expected_items(info: TraceInfo = INFO) -> list[Event | Discarded]:
    items: list[Event | Discarded] = []
    for stream, packets in (("chan0_0", CHAN0), ("chan1_0", CHAN1)):
        prev_disc = 0
        for seq, p in enumerate(packets):
            if p.discarded != prev_disc:
                items.append(Discarded(p.discarded - prev_disc, stream, p.ts_begin + info.clock_offset_ns))
            prev_disc = p.discarded
            for decl, ts, values in p.events:
                fields = {n: v for (n, _t), v in zip(decl.fields, values)}
                items.append(Event(ts + info.clock_offset_ns, decl.name, fields, stream, seq, info.hostname))
    items.sort(key=lambda i: i.timestamp if isinstance(i, Event) else i.ts)
    return items


def sample_meta() -> ctf.TraceMeta:
    return ctf.parse_metadata(ctf.metadata_preamble(INFO) + "".join(ctf.metadata_event(d) for d in DECLS))


SAMPLE_STREAM, SAMPLE_INDEX = build_stream(0, 0, CHAN0)
SAMPLE_META = sample_meta()


def read_bytes(data: bytes, meta: ctf.TraceMeta = SAMPLE_META) -> list[Event | Discarded]:
    return list(ctf.read_stream(io.BytesIO(data), meta))


# --------------------------------------------------------------------------
# Module hygiene
# --------------------------------------------------------------------------


CTF_MODULES = sorted(Path(ctf.__file__).parent.glob("*.py"))


def test_ctf_package_has_its_modules() -> None:
    names = {p.stem for p in CTF_MODULES}
    assert {"__init__", "errors", "declarations", "layout", "writer", "metadata_reader",
            "stream_reader", "text"} <= names


@pytest.mark.parametrize("module", CTF_MODULES, ids=lambda p: p.stem)
def test_ctf_imports_only_stdlib_without_io_frameworks(module: Path) -> None:
    tree = ast.parse(module.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    top = {name.split(".")[0] for name in imported}
    assert not top & {"trio", "socket", "time", "click", "cbor2", "zstandard", "asyncio"}
    # Within tracewire, only the package's own modules.
    assert {name for name in imported if name.split(".")[0] == "tracewire"} <= {
        f"tracewire.ctf.{p.stem}" for p in CTF_MODULES
    }
    assert top - {"tracewire"} <= {
        "__future__", "struct", "uuid", "dataclasses", "enum", "os", "io", "re",
        "heapq", "collections", "types", "typing",
    }


# --------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------


def test_field_type_mapping() -> None:
    assert ctf.PYTHON_FIELD_TYPES[int] is FieldType.INT
    assert FieldType.from_python(float) is FieldType.FLOAT
    assert FieldType.from_python(FieldType.STR) is FieldType.STR
    with pytest.raises(TypeError, match="unsupported field type"):
        FieldType.from_python(list)


def test_event_decl_normalises_python_types() -> None:
    d = EventDecl("p:e", 1, [("a", int), ("b", bytes)])  # type: ignore[arg-type]
    assert d.fields == (("a", FieldType.INT), ("b", FieldType.BYTES))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "noprovider"}, "provider:event"),
        ({"name": "p:e v"}, "provider:event"),
        ({"name": "p:" + "e" * 300}, "provider:event"),
        ({"name": 'p:"e'}, "provider:event"),
        ({"id": -1}, "id"),
        ({"id": 2**32}, "id"),
        ({"stream_id": -1}, "stream_id"),
        ({"loglevel": 15}, "loglevel"),
        ({"fields": (("1a", int),)}, "identifier"),
        ({"fields": (("a", int), ("a", str))}, "duplicate"),
        ({"fields": (("Bool", int),)}, "TSDL keyword"),
        ({"fields": (("x", bytes), ("_x_length", int))}, "clashes"),
        ({"fields": (("\u00e9", int),)}, "identifier"),
    ],
)
def test_event_decl_rejects(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"name": "p:e", "id": 0, "fields": ()}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        EventDecl(**args)


def test_event_decl_rejects_bad_field_type() -> None:
    with pytest.raises(TypeError):
        EventDecl("p:e", 0, (("a", list),))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"uuid": b"short"}, "uuid"),
        ({"creation_datetime": "2024-01-02 03:04:05"}, "creation_datetime"),
        ({"channels": ()}, "at least one channel"),
        ({"channels": ("a", "a")}, "duplicate"),
        ({"channels": (".hidden",)}, "channel name"),
        ({"channels": ("a/b",)}, "channel name"),
        ({"vpid": -1}, "vpid"),
        ({"clock_offset_ns": 2**63}, "int64"),
    ],
)
def test_trace_info_rejects(kwargs: dict[str, Any], match: str) -> None:
    args = {f: getattr(INFO, f) for f in INFO.__slots__}  # type: ignore[attr-defined]
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TraceInfo(**args)


# --------------------------------------------------------------------------
# Metadata text
# --------------------------------------------------------------------------


def test_preamble_shape() -> None:
    text = ctf.metadata_preamble(INFO)
    assert text.startswith("/* CTF 1.8 */\n")
    assert f'uuid = "{uuid.UUID(bytes=TRACE_UUID)}";' in text
    assert 'domain = "ust";' in text and 'tracer_name = "lttng-ust";' in text
    assert "tracer_major = 2;" in text and "tracer_minor = 13;" in text
    assert f"offset_s = {OFFSET_NS // 10**9};" in text
    assert f"offset = {OFFSET_NS % 10**9};" in text
    assert "absolute = FALSE;" in text
    assert text.count("stream {") == 2
    assert "enum : uint5_t { compact = 0 ... 30, extended = 31 } id;" in text


def test_metadata_event_block() -> None:
    block = ctf.metadata_event(HELLO)
    assert 'name = "app:hello";' in block
    assert "string _msg;" in block
    assert "__data_length;" in block and "_data[ __data_length ];" in block
    assert block.endswith("};\n\n")


def test_parse_metadata_round_trip() -> None:
    meta = SAMPLE_META
    assert meta.uuid == TRACE_UUID
    assert meta.clock_offset_ns == OFFSET_NS
    assert meta.stream_ids == {0, 1}
    assert dict(meta.events[0]) == {0: HELLO, 40: BIG, 30: ID30, 31: ID31}
    assert dict(meta.events[1]) == {0: OTHER}
    assert meta.hostname == HOST
    assert meta.env["procname"] == "myapp"
    assert meta.env["vpid"] == 4242
    assert meta.env["domain"] == "ust"


def test_parse_metadata_escaped_strings_and_negative_offset() -> None:
    info = TraceInfo(TRACE_UUID, 'h"o\\st', "s", "20240102T030405+0100", "p", 1, -1_500_000_000, ("c",))
    text = ctf.metadata_preamble(info)
    assert "offset_s = -2;" in text and "offset = 500000000;" in text
    meta = ctf.parse_metadata(text)
    assert meta.hostname == 'h"o\\st'
    assert meta.clock_offset_ns == -1_500_000_000
    assert meta.events == {}


def test_parse_metadata_rejects_missing_header() -> None:
    with pytest.raises(CTFError, match=r"CTF 1\.8") as ei:
        ctf.parse_metadata(ctf.metadata_preamble(INFO)[2:])
    assert ei.value.code is CTFErrorCode.BAD_METADATA


def test_parse_metadata_limits() -> None:
    text = ctf.metadata_preamble(INFO) + "".join(ctf.metadata_event(d) for d in DECLS)
    with pytest.raises(CTFError, match="more than 2 event") as ei:
        ctf.parse_metadata(text, max_events=2)
    assert ei.value.code is CTFErrorCode.LIMIT
    with pytest.raises(CTFError, match="exceeds the limit") as ei:
        ctf.parse_metadata(text, max_size=100)
    assert ei.value.code is CTFErrorCode.LIMIT


def test_parse_metadata_truncated_event_block() -> None:
    text = ctf.metadata_preamble(INFO) + ctf.metadata_event(HELLO)
    with pytest.raises(CTFError, match="ends inside") as ei:
        ctf.parse_metadata(text[:-20])
    assert ei.value.code is CTFErrorCode.BAD_METADATA
    assert ei.value.offset is not None


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ('event { name = "a:b"; id = 0; stream_id = 7; fields := struct { }; };', "undeclared stream"),
        ('event { name = "a:b"; id = 0; stream_id = 0; fields := struct { }; };'
         'event { name = "a:c"; id = 0; stream_id = 0; fields := struct { }; };', "duplicate event id"),
        ('event { id = 0; fields := struct { }; };', "without name"),
        ('event { name = "a:b"; id = 0; fields := struct { sequence _x; }; };', "unsupported field type"),
        ('event { name = "a:b"; id = 0; fields := struct { integer { size = 16; } _x; }; };',
         "unsupported declaration"),
        ('event { name = "a:b"; id = 0; fields := struct { string x; }; };', "prefix"),
        ('event { name = "bad name"; id = 0; fields := struct { }; };', "invalid event declaration"),
        ("bogus { };", "unexpected top-level"),
        ("event { name = @; };", "unexpected character"),
        ("event { id = 999999999999999999999999999999999999999999999; };", "number too long"),
    ],
)
def test_parse_metadata_rejects_bad_events(block: str, match: str) -> None:
    with pytest.raises(CTFError, match=match):
        ctf.parse_metadata(ctf.metadata_preamble(INFO) + block)


def test_read_metadata_file_packetized(tmp_path: Path) -> None:
    text = (ctf.metadata_preamble(INFO) + ctf.metadata_event(HELLO)).encode()
    raw = bytearray()
    for i in range(0, len(text), 1000):
        chunk = text[i:i + 1000]
        content = (37 + len(chunk)) * 8
        raw += struct.pack("<I16sIIIBBBBB", 0x75D11D57, TRACE_UUID, 0, content, content + 16, 0, 0, 0, 1, 8)
        raw += chunk + b"\0\0"
    (tmp_path / "metadata").write_bytes(raw)
    meta = ctf.read_metadata_file(tmp_path / "metadata")
    assert meta.events[0][0] == HELLO
    (tmp_path / "metadata").write_bytes(raw[:-50])
    with pytest.raises(CTFError, match="metadata packet runs past") as ei:
        ctf.read_metadata_file(tmp_path / "metadata")
    assert "metadata" in str(ei.value)


# --------------------------------------------------------------------------
# Event encoding round trips
# --------------------------------------------------------------------------


def _decode_one(data: bytes, prev: int, decl: EventDecl) -> tuple[int, dict[str, Any]]:
    got, ts, values, end = ctf.decode_event(data, 0, len(data), prev, {decl.id: decl})
    assert got is decl
    assert end == len(data)
    return ts, values


@pytest.mark.parametrize(
    ("ftype", "value", "size"),
    [
        (int, 0, 8),
        (int, -(2**63), 8),
        (int, 2**63 - 1, 8),
        (float, 3.5, 8),
        (float, float("inf"), 8),
        (str, "", 1),
        (str, "hello", 6),
        (str, "\u00e9\u2603\U0001F600", 10),
        (bytes, b"", 4),
        (bytes, b"\x00\xff", 6),
    ],
)
def test_encode_decode_each_field_type(ftype: type, value: Any, size: int) -> None:
    decl = EventDecl("p:e", 3, (("f", ftype),))
    data = ctf.encode_event(3, 100, 90, (value,), decl.fields)
    assert len(data) == 4 + size
    ts, values = _decode_one(data, 90, decl)
    assert ts == 100
    assert values == {"f": value}


def test_str_nul_is_replaced() -> None:
    decl = EventDecl("p:e", 0, (("s", str),))
    data = ctf.encode_event(0, 0, 0, ("a\0b",), decl.fields)
    assert _decode_one(data, 0, decl)[1] == {"s": "a" + ctf.NUL_REPLACEMENT + "b"}


@pytest.mark.parametrize(
    ("eid", "delta", "header_len"),
    [
        (0, 0, 4),
        (0, 2**27 - 1, 4),
        (0, 2**27, 16),
        (0, 2**40, 16),
        (0, -1, 16),
        (30, 5, 4),
        (31, 5, 16),
        (2**32 - 1, 5, 16),
    ],
)
def test_compact_vs_extended_header(eid: int, delta: int, header_len: int) -> None:
    decl = EventDecl("p:e", eid, ())
    prev = 2**27 - 3  # the low bits wrap for most deltas
    data = ctf.encode_event(eid, prev + delta, prev, (), ())
    assert len(data) == header_len
    word = struct.unpack_from("<I", data)[0]
    if header_len == 4:
        assert word == eid | ((prev + delta) & 0x7FFFFFF) << 5
    else:
        assert word == 31
        assert struct.unpack_from("<IQ", data, 4) == (eid, prev + delta)
    assert _decode_one(data, prev, decl)[0] == prev + delta


def test_encode_event_rejects_bad_values() -> None:
    f = HELLO.fields
    with pytest.raises(ValueError, match="4 fields"):
        ctf.encode_event(0, 1, 0, (1,), f)
    with pytest.raises(ValueError, match="int64"):
        ctf.encode_event(0, 1, 0, (2**63, "", 0.0, b""), f)
    with pytest.raises(TypeError, match="expected str"):
        ctf.encode_event(0, 1, 0, (1, b"x", 0.0, b""), f)
    with pytest.raises(TypeError, match="expected bytes"):
        ctf.encode_event(0, 1, 0, (1, "", 0.0, "x"), f)
    with pytest.raises(TypeError, match="expected float"):
        ctf.encode_event(0, 1, 0, (1, "", "1.0", b""), f)
    with pytest.raises(ValueError, match="double"):
        ctf.encode_event(0, 1, 0, (1, "", 10**400, b""), f)
    with pytest.raises(ValueError, match="timestamp"):
        ctf.encode_event(0, 2**64, 0, (1, "", 0.0, b""), f)


@given(prev=st.integers(0, 2**64 - 2**28), delta=st.integers(0, 2**27 - 1))
def test_rebuild_timestamp_recovers_compact(prev: int, delta: int) -> None:
    ts = prev + delta
    assert ctf.rebuild_timestamp(prev, ts & 0x7FFFFFF, 27) == ts


def test_rebuild_timestamp_matches_babeltrace2_formula() -> None:
    # babeltrace2: if new < (cur & mask): cur += mask + 1; cur &= ~mask; cur |= new
    assert ctf.rebuild_timestamp(0x8000005, 0x3, 27) == 0x8000003 + 2**27
    assert ctf.rebuild_timestamp(0x8000005, 0x5, 27) == 0x8000005
    assert ctf.rebuild_timestamp(5, 99, 64) == 99
    assert ctf.rebuild_timestamp(2**64 - 1, 0, 27) == 0  # wraps modulo 2**64


@settings(max_examples=examples(200))
@given(
    values=st.tuples(
        st.integers(-(2**63), 2**63 - 1),
        st.text(),
        st.floats(allow_nan=False),
        st.binary(max_size=300),
    ),
    eid=st.integers(0, 2**32 - 1),
    prev=st.integers(0, 2**63),
    delta=st.integers(0, 2**40),
)
def test_event_round_trip_property(values: tuple[Any, ...], eid: int, prev: int, delta: int) -> None:
    decl = EventDecl("p:e", eid, HELLO.fields)
    data = ctf.encode_event(eid, prev + delta, prev, values, decl.fields)
    ts, got = _decode_one(data, prev, decl)
    assert ts == prev + delta
    expected_str = values[1].replace("\0", ctf.NUL_REPLACEMENT).encode("utf-8", "replace").decode()
    assert got == {"seq": values[0], "msg": expected_str, "x": values[2], "data": values[3]}


# --------------------------------------------------------------------------
# Packet header and index
# --------------------------------------------------------------------------


def test_packet_header_pack_unpack() -> None:
    raw = ctf.pack_packet_header(TRACE_UUID, 3, 9, 100, 200, 16, 5, 7)
    assert len(raw) == PACKET_HEADER_SIZE == 84
    h = ctf.unpack_packet_header(raw)
    assert h == ctf.PacketHeader(
        0xC1FC1FC1, TRACE_UUID, 3, 9, 100, 200, (84 + 16) * 8, (84 + 16) * 8, 5, 7, 0
    )
    assert struct.unpack_from("<I16sIQ", raw) == (0xC1FC1FC1, TRACE_UUID, 3, 9)
    with pytest.raises(CTFError, match="needs 84 bytes") as ei:
        ctf.unpack_packet_header(raw[:83])
    assert ei.value.code is CTFErrorCode.TRUNCATED
    with pytest.raises(ValueError):
        ctf.pack_packet_header(b"x", 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="out of range"):
        ctf.pack_packet_header(TRACE_UUID, 2**32, 0, 0, 0, 0, 0, 0)


def test_index_entry_pack_and_read() -> None:
    assert bytes.fromhex("c1f1dcc1 00000001 00000001 00000048") == ctf.INDEX_HEADER
    e = ctf.pack_index_entry(1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert len(e) == 72
    assert struct.unpack(">9Q", e) == (1, 2, 3, 4, 5, 6, 7, 8, 9)
    entries = ctf.read_index(SAMPLE_INDEX)
    assert [x.packet_seq_num for x in entries] == [0, 1]
    assert entries[0].offset == 0
    assert entries[1].offset == entries[0].packet_size // 8
    assert entries[1].events_discarded == 3
    assert sum(x.packet_size for x in entries) // 8 == len(SAMPLE_STREAM)
    with pytest.raises(CTFError, match="not a multiple"):
        ctf.read_index(SAMPLE_INDEX[:-1])
    with pytest.raises(CTFError, match="bad index magic"):
        ctf.read_index(b"\0" * 16)
    with pytest.raises(CTFError, match="unsupported index version"):
        ctf.read_index(struct.pack(">IIII", 0xC1F1DCC1, 1, 0, 56))


# --------------------------------------------------------------------------
# A whole trace, read by us
# --------------------------------------------------------------------------


def test_read_trace_round_trip(tmp_path: Path) -> None:
    write_trace(tmp_path / "trace")
    items = list(ctf.read_trace(tmp_path))
    assert items == expected_items()
    events = [i for i in items if isinstance(i, Event)]
    assert len(events) == 10
    assert sum(i.count for i in items if isinstance(i, Discarded)) == 5
    assert [e.timestamp for e in events] == sorted(e.timestamp for e in events)
    first = events[0]
    assert first == Event(OFFSET_NS + T0 + 5, "app:hello",
                          {"seq": 1, "msg": "hello", "x": 1.5, "data": b"\x01\x02"}, "chan0_0", 0, HOST)


def test_read_trace_merges_several_traces(tmp_path: Path) -> None:
    write_trace(tmp_path / "a")
    other = TraceInfo(uuid.uuid4().bytes, "otherhost", "s2", "20240102T030405", "p2", 7,
                      OFFSET_NS + 3, ("chan0", "chan1"))
    write_trace(tmp_path / "b" / "ust" / "pid" / "p2-7", other)
    (tmp_path / "b" / "notes.txt").write_text("not a trace")
    items = list(ctf.read_trace(tmp_path))
    assert len(items) == 2 * len(expected_items())
    times = [i.timestamp if isinstance(i, Event) else i.ts for i in items]
    assert times == sorted(times)
    assert {i.hostname for i in items if isinstance(i, Event)} == {HOST, "otherhost"}


def test_read_trace_ignores_hidden_and_empty_files(tmp_path: Path) -> None:
    root = write_trace(tmp_path)
    (root / ".lock").write_bytes(b"garbage")
    (root / "chan2_0").write_bytes(b"")  # LTTng leaves empty stream files around
    assert list(ctf.read_trace(root)) == expected_items()


def test_read_trace_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CTFError, match="not a directory"):
        list(ctf.read_trace(tmp_path / "nope"))


def test_format_event() -> None:
    items = expected_items()
    line = ctf.format_event(items[0])
    # 1_700_000_000 s is 22:13:20 UTC
    assert line == (
        '[22:13:20.124456794] (+?.?????????) testhost app:hello: '
        '{ seq = 1, msg = "hello", x = 1.5, data = <01 02> }'
    )
    assert ctf.format_event(items[1], items[0]).startswith("[22:13:20.124456795] (+0.000000001) testhost app:id30: { }")
    disc = next(i for i in items if isinstance(i, Discarded))
    assert "!!! 2 events discarded in chan1_0" in ctf.format_event(disc, items[0])
    ev = Event(0, "a:b", {"s": 'x"\n\x01', "b": b""}, "s", 0)
    assert ctf.format_event(ev, ev) == '[00:00:00.000000000] (+0.000000000) a:b: { s = "x\\"\\n\\x01", b = <> }'


# --------------------------------------------------------------------------
# The same trace read by babeltrace2
# --------------------------------------------------------------------------


def _limit_memory() -> None:  # pragma: no cover - runs in the child
    # A misdescribed trace can make babeltrace2 allocate a garbage-sized
    # sequence (seen: 8 GiB); fail fast instead of swapping.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def run_babeltrace2(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert BABELTRACE2 is not None
    return subprocess.run(
        [BABELTRACE2, *map(str, args)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "LC_ALL": "C.UTF-8"}, preexec_fn=_limit_memory,
    )


_BT_LINE = re.compile(r"^\[(\d+)\.(\d{9})\] \(\S+\) (\S+) (\S+): \{ cpu_id = 0 \}, \{ (.*?) ?\}$")


@needs_babeltrace2
def test_babeltrace2_reads_trace(tmp_path: Path) -> None:
    root = write_trace(tmp_path / "trace")
    r = run_babeltrace2("--clock-seconds", root)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    expected = [i for i in expected_items() if isinstance(i, Event)]
    assert len(lines) == len(expected) == 10
    for line, ev in zip(lines, expected):
        m = _BT_LINE.match(line)
        assert m, line
        secs, nanos, host, name, body = m.groups()
        assert int(secs) * 10**9 + int(nanos) == ev.timestamp  # exact absolute ns
        assert host == f"{HOST}:myapp:(4242)"
        assert name == ev.name
        for k, v in ev.fields.items():
            if isinstance(v, int):
                assert f"{k} = {v}" in body
    assert 'seq = 1, msg = "hello", x = 1.5, _data_length = 2, data = [ [0] = 0x1, [1] = 0x2 ]' in lines[0]
    assert 's = "extended by id"' in r.stdout
    assert "v = 9223372036854775807" in r.stdout
    assert "seq = -9223372036854775808" in r.stdout
    assert 'msg = "h\u00e9llo \u2603 \\"q\\""' in r.stdout or "h\u00e9llo \u2603" in r.stdout
    assert "_data_length = 256" in r.stdout
    assert "Tracer discarded 3 events" in r.stderr
    assert "Tracer discarded 2 events" in r.stderr


@needs_babeltrace2
@pytest.mark.skipif(not _has_bt2(), reason="python3-bt2 is not importable by /usr/bin/python3")
def test_bt2_bindings_count_events_and_discarded(tmp_path: Path) -> None:
    root = write_trace(tmp_path / "trace")
    script = textwrap.dedent(
        """
        import bt2, json, sys
        out = {"events": 0, "discarded_msgs": 0, "discarded": 0, "names": []}
        for m in bt2.TraceCollectionMessageIterator(sys.argv[1]):
            if type(m) is bt2._EventMessageConst:
                out["events"] += 1
                out["names"].append(m.event.name)
                if m.event.name == "app:hello" and out["events"] == 1:
                    p = m.event.payload_field
                    out["first"] = [int(p["seq"]), str(p["msg"]), float(p["x"]), [int(b) for b in p["data"]]]
                    out["first_ns"] = m.default_clock_snapshot.ns_from_origin
            elif type(m) is bt2._DiscardedEventsMessageConst:
                out["discarded_msgs"] += 1
                out["discarded"] += m.count
        print(json.dumps(out))
        """
    )
    r = subprocess.run([SYSTEM_PYTHON, "-c", script, str(root)], capture_output=True, text=True,
                       timeout=60, cwd="/", preexec_fn=_limit_memory)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = [i for i in expected_items() if isinstance(i, Event)]
    assert out["events"] == 10
    assert out["names"] == [e.name for e in expected]
    assert out["discarded_msgs"] == 2
    assert out["discarded"] == 5
    assert out["first"] == [1, "hello", 1.5, [1, 2]]
    assert out["first_ns"] == expected[0].timestamp


@needs_babeltrace2
def test_babeltrace2_extended_header_at_any_alignment(tmp_path: Path) -> None:
    """Extended headers start 0..3 bytes past a 4-byte boundary; babeltrace2 agrees."""
    root = tmp_path / "trace"
    root.mkdir()
    info = TraceInfo(TRACE_UUID, HOST, "s", "20240102T030405", "p", 1, OFFSET_NS, ("chan0",))
    decls = (HELLO, BIG, ID31)
    (root / "metadata").write_text(ctf.metadata_preamble(info) + "".join(map(ctf.metadata_event, decls)))
    events: list[tuple[EventDecl, int, tuple[Any, ...]]] = []
    ts = 10
    for k in range(8):
        events.append((ID31, ts, ("x" * k,)))  # 16 + k + 1 bytes
        events.append((BIG, ts + 1, (k,)))
        events.append((HELLO, ts + 2 + 2**27, (k, "", 0.5, b"")))  # extended by delta
        ts += 2**28
    data, _ = build_stream(0, 0, [Packet(0, ts, 0, events)])
    (root / "chan0_0").write_bytes(data)
    ours = [i for i in ctf.read_trace(root) if isinstance(i, Event)]
    assert [(e.name, e.timestamp - OFFSET_NS) for e in ours] == [(d.name, t) for d, t, _ in events]
    r = run_babeltrace2("--clock-seconds", root)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == len(ours)
    for line, ev in zip(lines, ours):
        m = _BT_LINE.match(line)
        assert m, line
        assert int(m.group(1)) * 10**9 + int(m.group(2)) == ev.timestamp
        assert m.group(4) == ev.name


@needs_babeltrace2
def test_babeltrace2_uses_our_index(tmp_path: Path) -> None:
    root = write_trace(tmp_path / "trace")
    r = run_babeltrace2("--log-level=I", root)
    assert r.returncode == 0, r.stderr
    for stream in ("chan0_0", "chan1_0"):
        assert f"Building index from .idx file of stream file {root / stream}" in r.stderr
    assert "falling back" not in r.stderr
    assert "Invalid LTTng trace index" not in r.stderr
    assert " W " not in r.stderr and " E " not in r.stderr
    # Control: babeltrace2 does complain about a broken index.
    idx = root / "index" / "chan1_0.idx"
    idx.write_bytes(b"\0" * 4 + idx.read_bytes()[4:])
    r = run_babeltrace2("--log-level=I", root)
    assert r.returncode == 0, r.stderr
    assert "falling back to stream indexing" in r.stderr


@needs_babeltrace2
def test_babeltrace2_merges_two_traces(tmp_path: Path) -> None:
    write_trace(tmp_path / "a")
    other = TraceInfo(uuid.uuid4().bytes, "otherhost", "s2", "20240102T030405", "p2", 7,
                      OFFSET_NS + 3, ("chan0", "chan1"))
    write_trace(tmp_path / "b", other)
    r = run_babeltrace2("--clock-seconds", tmp_path)
    assert r.returncode == 0, r.stderr
    ours = [i for i in ctf.read_trace(tmp_path) if isinstance(i, Event)]
    lines = r.stdout.splitlines()
    assert len(lines) == len(ours) == 20
    stamps = []
    for line in lines:
        m = _BT_LINE.match(line)
        assert m, line
        stamps.append(int(m.group(1)) * 10**9 + int(m.group(2)))
    assert stamps == [e.timestamp for e in ours]


@needs_babeltrace2
def test_babeltrace2_first_packet_discarded_count_is_unknown(tmp_path: Path) -> None:
    """babeltrace2 cannot tell how many of a first packet's events_discarded
    were lost ("may have discarded", count unknown); we report the counter."""
    root = tmp_path / "trace"
    root.mkdir()
    info = TraceInfo(TRACE_UUID, HOST, "s", "20240102T030405", "p", 1, OFFSET_NS, ("chan0",))
    (root / "metadata").write_text(ctf.metadata_preamble(info) + ctf.metadata_event(BIG))
    data, _ = build_stream(0, 0, [Packet(0, 10, 5, [(BIG, 5, (1,))])])
    (root / "chan0_0").write_bytes(data)
    assert list(ctf.read_trace(root)) == [
        Discarded(5, "chan0_0", OFFSET_NS), Event(OFFSET_NS + 5, "app:big", {"v": 1}, "chan0_0", 0, HOST)
    ]
    r = run_babeltrace2(root)
    assert r.returncode == 0, r.stderr
    assert "Tracer may have discarded events" in r.stderr
    assert "v = 1" in r.stdout


@needs_babeltrace2
def test_babeltrace2_rejects_what_we_reject(tmp_path: Path) -> None:
    root = write_trace(tmp_path / "trace")
    data = (root / "chan0_0").read_bytes()
    (root / "chan0_0").write_bytes(data[:-3])
    shutil.rmtree(root / "index")
    assert run_babeltrace2(root).returncode != 0
    with pytest.raises(CTFError):
        list(ctf.read_trace(root))


# --------------------------------------------------------------------------
# Hostile input
# --------------------------------------------------------------------------


def _patch(data: bytes, offset: int, fmt: str, *values: Any) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, *values)
    return bytes(b)


@pytest.mark.parametrize(
    ("mutate", "code", "match"),
    [
        (lambda d: _patch(d, 0, "<I", 0xDEADBEEF), CTFErrorCode.BAD_MAGIC, "bad packet magic"),
        (lambda d: _patch(d, 4, "<16s", b"\1" * 16), CTFErrorCode.BAD_UUID, "uuid"),
        (lambda d: _patch(d, 20, "<I", 5), CTFErrorCode.BAD_STREAM, "undeclared stream class 5"),
        (lambda d: _patch(d, 48, "<QQ", 0, 0), CTFErrorCode.BAD_SIZE, "smaller than"),
        (lambda d: _patch(d, 48, "<QQ", 84 * 8, 0), CTFErrorCode.BAD_SIZE, "content_size 672 > packet_size 0"),
        (lambda d: _patch(d, 56, "<Q", 84 * 8 - 8), CTFErrorCode.BAD_SIZE, "content_size"),
        (lambda d: _patch(d, 48, "<Q", 84 * 8 + 3), CTFErrorCode.BAD_SIZE, "whole bytes"),
        (lambda d: _patch(d, 48, "<QQ", 2**40, 2**40), CTFErrorCode.LIMIT, "exceeds the limit"),
        (lambda d: _patch(d, 48, "<QQ", 2**20, 2**20), CTFErrorCode.TRUNCATED, "past the end"),
        (lambda d: _patch(d, 32, "<QQ", 10, 5), CTFErrorCode.BAD_TIMESTAMP, "timestamp_begin 10 > timestamp_end 5"),
        (lambda d: _patch(d, 40, "<Q", T0 + 6), CTFErrorCode.BAD_TIMESTAMP, "outside its packet"),
        (lambda d: _patch(d, 84, "<I", 7), CTFErrorCode.UNKNOWN_EVENT, "unknown event id 7"),
        (lambda d: d[:-1], CTFErrorCode.TRUNCATED, "past the end"),
        (lambda d: d + b"\0" * 10, CTFErrorCode.TRUNCATED, "truncated packet"),
    ],
)
def test_hostile_stream(mutate: Any, code: CTFErrorCode, match: str) -> None:
    with pytest.raises(CTFError, match=match) as ei:
        read_bytes(mutate(SAMPLE_STREAM))
    assert ei.value.code is code
    assert ei.value.offset is not None


FIRST_PACKET = SAMPLE_STREAM[:ctf.read_index(SAMPLE_INDEX)[1].offset]


def test_check_packet_header_accepts_a_good_packet() -> None:
    h = ctf.check_packet_header(FIRST_PACKET, exact=True, uuid=TRACE_UUID, stream_ids={0}, stream_id=0)
    assert h == ctf.unpack_packet_header(FIRST_PACKET)
    # Just the header, with the rest of the file said to be there.
    head = FIRST_PACKET[:PACKET_HEADER_SIZE]
    assert ctf.check_packet_header(head, available=len(SAMPLE_STREAM)) == h


@pytest.mark.parametrize(
    ("kwargs", "code", "match", "offset"),
    [
        ({"exact": True, "available": len(FIRST_PACKET) + 8}, CTFErrorCode.BAD_SIZE, "but the packet has", 56),
        ({"available": len(FIRST_PACKET) - 1}, CTFErrorCode.TRUNCATED, "past the end", 56),
        ({"max_packet_size": 100}, CTFErrorCode.LIMIT, "exceeds the limit of 100", 56),
        ({"uuid": b"\1" * 16}, CTFErrorCode.BAD_UUID, "differs from the trace uuid", 4),
        ({"stream_ids": {1}}, CTFErrorCode.BAD_STREAM, "undeclared stream class 0", 20),
        ({"stream_id": 1}, CTFErrorCode.BAD_STREAM, "stream class 0 in a stream of class 1", 20),
    ],
)
def test_check_packet_header_refuses(kwargs: dict[str, Any], code: CTFErrorCode, match: str, offset: int) -> None:
    with pytest.raises(CTFError, match=match) as ei:
        ctf.check_packet_header(FIRST_PACKET, **kwargs)
    assert ei.value.code is code and ei.value.offset == offset and ei.value.path is None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:PACKET_HEADER_SIZE - 1],
        lambda d: _patch(d, 0, "<I", 0xDEADBEEF),
        lambda d: _patch(d, 48, "<Q", len(d) * 8 - 3),
        lambda d: _patch(d, 48, "<Q", 8),
        lambda d: _patch(d, 48, "<Q", len(d) * 8 + 8),
        lambda d: _patch(d, 32, "<QQ", 10, 5),
    ],
)
def test_reader_and_relay_refuse_a_header_alike(mutate: Any) -> None:
    """relayd checks a received packet with the reader's check: same words.
    (Only the size check differs: a file may hold more than the packet, a
    received packet is exactly its bytes.)"""
    from relayd.daemon import _check_packet
    from tracewire.wire import Codec, ErrorCode, RemoteProtocolError
    from tracewire.wire import Packet as WirePacket

    bad = mutate(FIRST_PACKET)
    with pytest.raises(CTFError) as reader:
        read_bytes(bad)
    msg = WirePacket(3, 0, Codec.NONE, len(bad), 0, 0, 0, 8 * len(bad), 8 * len(bad), 0, bad)
    with pytest.raises(RemoteProtocolError) as relay:
        _check_packet(bad, msg)
    assert relay.value.code is ErrorCode.PROTOCOL
    assert relay.value.message == f"stream 3 seq 0: {reader.value.reason}"


def test_hostile_event_payloads() -> None:
    def one_packet(body: bytes, ts_end: int = 100) -> bytes:
        return ctf.pack_packet_header(TRACE_UUID, 0, 0, 0, ts_end, len(body), 0, 0) + body

    hdr = struct.pack("<I", 0)  # HELLO, ts 0
    seq = struct.pack("<q", 1)
    cases = [
        (hdr + seq + b"no nul", "no NUL"),
        (hdr + seq + b"s\0" + struct.pack("<d", 1.0) + struct.pack("<I", 1000) + b"xx", "claims 1000 bytes"),
        (hdr + seq + b"s\0" + struct.pack("<d", 1.0) + b"\1\0", "length truncated"),
        (hdr + b"\1\2\3", "truncated"),
        (b"\x1f\0\0\0" + b"\0" * 5, "truncated extended"),
        (b"\0\0", "truncated event header"),
    ]
    for body, match in cases:
        with pytest.raises(CTFError, match=match) as ei:
            read_bytes(one_packet(body))
        assert ei.value.offset is not None and ei.value.offset >= PACKET_HEADER_SIZE


def test_events_discarded_going_back() -> None:
    data, _ = build_stream(0, 0, [Packet(0, 10, 5, []), Packet(10, 20, 4, [])])
    with pytest.raises(CTFError, match="went back from 5 to 4"):
        read_bytes(data)


def test_discarded_for_first_packet_is_its_own_value() -> None:
    data, _ = build_stream(0, 0, [Packet(0, 10, 5, []), Packet(10, 20, 5, []), Packet(20, 30, 9, [])])
    assert read_bytes(data) == [
        Discarded(5, "<stream>", OFFSET_NS), Discarded(4, "<stream>", OFFSET_NS + 20)
    ]


def test_error_names_file_and_offset(tmp_path: Path) -> None:
    root = write_trace(tmp_path)
    data = (root / "chan0_0").read_bytes()
    second = ctf.read_index(SAMPLE_INDEX)[1].offset
    (root / "chan0_0").write_bytes(_patch(data, second, "<I", 0))
    with pytest.raises(CTFError) as ei:
        list(ctf.read_trace(root))
    assert ei.value.path == str(root / "chan0_0")
    assert ei.value.offset == second
    assert f"file {str(root / 'chan0_0')!r}, offset {second}: bad packet magic" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_every_truncation_is_a_ctf_error() -> None:
    boundaries = {0, ctf.read_index(SAMPLE_INDEX)[1].offset}
    for n in range(len(SAMPLE_STREAM)):
        if n in boundaries:
            read_bytes(SAMPLE_STREAM[:n])
            continue
        with pytest.raises(CTFError):
            read_bytes(SAMPLE_STREAM[:n])


def test_metadata_file_too_large_or_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "metadata"
    p.write_bytes(b"/* CTF 1.8 */\n\xff\xfe")
    with pytest.raises(CTFError, match="not UTF-8"):
        ctf.read_metadata_file(p)
    p.write_bytes(b"/* CTF 1.8 */" + b" " * 200)
    with pytest.raises(CTFError, match="larger than 100") as ei:
        ctf.read_metadata_file(p, max_size=100)
    assert ei.value.code is CTFErrorCode.LIMIT


@settings(max_examples=examples(300), suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_ctf_error(data: bytes) -> None:
    try:
        read_bytes(data)
    except CTFError:
        pass


@settings(max_examples=examples(300), suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_stream_only_raises_ctf_error(data: st.DataObject) -> None:
    buf = bytearray(SAMPLE_STREAM)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    try:
        read_bytes(bytes(buf[:cut]))
    except CTFError:
        pass


_SAMPLE_TEXT = ctf.metadata_preamble(INFO) + "".join(ctf.metadata_event(d) for d in DECLS)


@settings(max_examples=examples(300), suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_metadata_only_raises_ctf_error(data: st.DataObject) -> None:
    text = list(_SAMPLE_TEXT)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(text) - 1))
        text[i] = data.draw(st.sampled_from(list('{};=:"[]() \n\\_a09x-') + ["\u00e9", "/*"]))
    cut = data.draw(st.integers(0, len(text)))
    try:
        ctf.parse_metadata("".join(text[:cut]))
    except CTFError:
        pass


@settings(max_examples=examples(200))
@given(st.text(max_size=300))
def test_random_metadata_text_only_raises_ctf_error(text: str) -> None:
    for t in (text, "/* CTF 1.8 */" + text, _SAMPLE_TEXT[:2000] + text):
        try:
            ctf.parse_metadata(t)
        except CTFError:
            pass


@given(st.binary(max_size=300))
def test_random_index_only_raises_ctf_error(data: bytes) -> None:
    for d in (data, ctf.INDEX_HEADER + data):
        try:
            ctf.read_index(d)
        except CTFError:
            pass
