"""Tests of the sans-I/O wire protocol core (tracewire.wire)."""

from __future__ import annotations

import ast
import datetime
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import cbor2
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from tracewire import wire
from tracewire.wire import (
    FRAME_HEADER,
    MAGIC,
    Ack,
    Auth,
    Bye,
    Challenge,
    ChunkClose,
    ChunkClosed,
    Codec,
    Connection,
    ConnectionClosed,
    ConnState,
    Error,
    ErrorCode,
    Event,
    FrameDecoder,
    Hello,
    LocalProtocolError,
    Message,
    MessageType,
    Metadata,
    Packet,
    ProtocolError,
    RemoteProtocolError,
    Retry,
    RetryReason,
    Role,
    SessionClose,
    SessionDecl,
    StreamClose,
    StreamDecl,
    StreamState,
    StreamStateRequest,
    Welcome,
    compress_packet,
    compute_auth_mac,
    decompress_packet,
    encode,
    encode_parts,
    new_compressor,
    validate_name,
    validate_trace_path,
    verify_auth_mac,
)

from fuzzing import examples

C, R = Role.CONSUMER, Role.RELAY
NONCE = bytes(range(32))
SECRET = b"correct horse battery staple"
TRACE = "ust/pid/demo-123-20261129T101500"
ZSTD_RAW = b"\x00\x01" * 2048
ZSTD_DATA = compress_packet(ZSTD_RAW)


def packet(stream_id: int = 1, seq: int = 0, data: object = b"\xc1\x1f\xfc\xc1" * 4, **kw: object) -> Packet:
    fields: dict[str, object] = dict(
        stream_id=stream_id,
        seq=seq,
        codec=Codec.NONE,
        raw_len=len(data),  # type: ignore[arg-type]
        ts_begin=1000,
        ts_end=2000,
        events_discarded=0,
        content_size_bits=8 * len(data) - 8,  # type: ignore[arg-type]
        packet_size_bits=8 * len(data),  # type: ignore[arg-type]
        packet_seq_num=seq,
        data=data,
    )
    fields.update(kw)
    return Packet(**fields)  # type: ignore[arg-type]


def zpacket(stream_id: int = 1, seq: int = 0) -> Packet:
    return packet(
        stream_id, seq, ZSTD_DATA, codec=Codec.ZSTD, raw_len=len(ZSTD_RAW), packet_size_bits=8 * len(ZSTD_RAW),
        content_size_bits=8 * len(ZSTD_RAW),
    )


SAMPLES: list[Message] = [
    Hello(1, "board-7", "k1"),
    Hello(1, "héllo wörld", None),
    Challenge(NONCE),
    Auth(bytes(32)),
    Welcome(1, 256),
    Welcome(1, None),
    SessionDecl(3, "my session", "20261129T101500", True),
    StreamDecl(7, 3, TRACE, "channel0", 2),
    StreamDecl(7, 3, TRACE, "channel0", 2, 1024 * 1024, 4),
    StreamDecl(7, 3, TRACE, "channel0", 2, 2**63 - 1, None),
    Metadata(3, TRACE, 4096, b"/* CTF 1.8 */\n"),
    Metadata(3, TRACE, 0, b""),
    packet(),
    packet(2**63 - 1, 2**63 - 1, ts_begin=2**64 - 1, ts_end=2**64 - 1, events_discarded=2**64 - 1),
    zpacket(),
    Ack(7, -1),
    Ack(7, 12345678901),
    StreamStateRequest(7),
    StreamState(7, 42),
    Retry(7, 43, RetryReason.NO_SPACE, "No space left on device"),
    StreamClose(7),
    SessionClose(3),
    ChunkClose(3, "ust", "archives/20261202T101500+0100-20261202T101600+0100-0/ust"),
    ChunkClosed(3, "archives/x-0/ust"),
    Bye(),
    Error(ErrorCode.AUTH_FAILED, "bad MAC for key 'k1'"),
    Error(999, ""),
]


def decode_chunks(chunks: Iterable[bytes], decoder: FrameDecoder | None = None) -> list[Event]:
    """Feeds chunks one by one, collecting every event."""
    decoder = decoder or FrameDecoder()
    out: list[Event] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (event := decoder.next_event()) is not None:
            out.append(event)
            if isinstance(event, ConnectionClosed):
                break
    return out


def tr(data: bytes) -> list[Event]:
    """Decodes `data` whole and one byte at a time; both must agree."""
    whole = decode_chunks([data])
    bytewise = decode_chunks(data[i : i + 1] for i in range(len(data)))
    assert whole == bytewise
    return whole


def frame(header: object, payload: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    """Builds a frame by hand; `header` is CBOR-encoded unless raw_header is given."""
    body: bytes = raw_header if raw_header is not None else cbor2.dumps(header)
    return FRAME_HEADER.pack(MAGIC, len(body), len(payload)) + body + payload


def expect_remote(data: bytes, code: ErrorCode, match: str) -> RemoteProtocolError:
    """Feeds `data` then EOF; asserts the decoder fails with `code`."""
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decode_chunks([data, b""], decoder)
    assert info.value.code is code
    return info.value


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------


def test_samples_cover_every_message_type() -> None:
    assert {m.msg_type for m in SAMPLES} == set(MessageType)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_roundtrip(msg: Message) -> None:
    data = encode(msg)
    assert tr(data) == [msg]
    assert tr(data + encode(Bye())) == [msg, Bye()]
    # Followed by part of another frame: the message, then "need more".
    assert tr(data + encode(Ack(1, 2))[:7]) == [msg]
    assert decode_chunks([data, b""]) == [msg, ConnectionClosed()]


def test_roundtrip_bytes_like_payload() -> None:
    for data in (bytearray(b"abcd"), memoryview(b"xxabcdxx")[2:6]):
        msg = packet(data=data)
        parts = encode_parts(msg)
        assert parts[1] is data  # no copy of the payload
        assert tr(encode(msg)) == [packet(data=b"abcd")]
        meta = Metadata(1, "a", 0, data)
        assert tr(encode(meta)) == [Metadata(1, "a", 0, b"abcd")]


def test_encode_parts_without_payload() -> None:
    assert encode_parts(Bye()) == [encode(Bye())]
    assert encode_parts(Metadata(1, "a", 0, b"")) == [encode(Metadata(1, "a", 0, b""))]


def test_documented_example_frame() -> None:
    # docs/protocol.md, "Worked example".
    assert encode(Ack(stream_id=1, seq=41)).hex() == "545749520000000b00000000a361740961690161711829"
    assert encode(Hello(version=1, hostname="board-7", key_id="k1")) == bytes.fromhex(
        "54574952 00000016 00000000 a4617401617601616867626f6172642d37616b626b31"
    )
    pkt = packet(stream_id=1, seq=0, data=b"abcd", ts_begin=0, ts_end=5, content_size_bits=16)
    assert encode(pkt).hex() == (
        "545749520000002b00000004"
        "ab617408616901617100626364006272 6c0462746200627465056265640062637310627073182062706e00".replace(" ", "")
        + "61626364"
    )


def test_many_frames_in_one_chunk_and_compaction() -> None:
    msgs = [Metadata(1, "a", i, bytes(300)) for i in range(1000)]
    data = b"".join(encode(m) for m in msgs)
    decoder = FrameDecoder()
    decoder.receive_data(data)
    got = []
    while (event := decoder.next_event()) is not None:
        got.append(event)
        assert len(decoder._buf) <= len(data)
    assert got == msgs
    assert decoder.buffered == 0
    assert len(decoder._buf) == 0  # fully consumed buffer is released


def test_header_checked_before_payload_arrives() -> None:
    # A Bye with a payload is refused once its CBOR header is in.
    data = frame({"t": int(MessageType.BYE)}, b"x" * 100)
    decoder = FrameDecoder()
    decoder.receive_data(data[:-100])
    with pytest.raises(RemoteProtocolError, match="Bye takes no payload") as info:
        decoder.next_event()
    assert info.value.code is ErrorCode.PROTOCOL


# --------------------------------------------------------------------------
# Framing errors
# --------------------------------------------------------------------------


def test_clean_eof() -> None:
    assert decode_chunks([b""]) == [ConnectionClosed()]
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    decoder.receive_data(b"")  # repeated EOF is harmless
    assert decoder.next_event() == ConnectionClosed()
    assert decoder.next_event() == ConnectionClosed()


@pytest.mark.parametrize("cut", [1, 11, 12, 13, -1])
def test_truncated_frame_then_eof(cut: int) -> None:
    data = encode(packet())
    expect_remote(data[:cut], ErrorCode.PROTOCOL, "connection closed mid-frame")


def test_data_after_eof_is_local_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF") as info:
        decoder.receive_data(b"x")
    assert info.value.code is ErrorCode.BAD_STATE


def test_bad_magic() -> None:
    data = struct.pack(">III", 0x48545450, 1, 0)
    decoder = FrameDecoder()
    decoder.receive_data(data)
    with pytest.raises(RemoteProtocolError, match="bad magic 0x48545450") as info:
        decoder.next_event()
    assert info.value.code is ErrorCode.PROTOCOL


@pytest.mark.parametrize(
    ("header_len", "payload_len", "code", "match"),
    [
        (64 * 1024 + 1, 0, ErrorCode.FRAME_TOO_LARGE, "header_len 65537 over the limit 65536"),
        (0xFFFFFFFF, 0, ErrorCode.FRAME_TOO_LARGE, "header_len 4294967295 over"),
        (10, 16 * 1024 * 1024 + 1, ErrorCode.FRAME_TOO_LARGE, "payload_len 16777217 over the limit 16777216"),
        (0, 0, ErrorCode.PROTOCOL, "header_len is 0"),
    ],
)
def test_lengths_checked_on_the_fixed_header_alone(
    header_len: int, payload_len: int, code: ErrorCode, match: str
) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(FRAME_HEADER.pack(MAGIC, header_len, payload_len))  # no body at all
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decoder.next_event()
    assert info.value.code is code


def test_custom_limits() -> None:
    decoder = FrameDecoder(max_header_size=8, max_payload_size=3)
    decoder.receive_data(encode(packet(data=b"abcd"))[:12])
    with pytest.raises(RemoteProtocolError, match="over the limit 8") as info:
        decoder.next_event()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(LocalProtocolError, match="payload is 4 bytes, limit 3") as linfo:
        encode_parts(packet(data=b"abcd"), max_payload_size=3)
    assert linfo.value.code is ErrorCode.FRAME_TOO_LARGE


ACK: dict[str, object] = {"t": int(MessageType.ACK), "i": 1, "q": 2}
HELLO: dict[str, object] = {"t": int(MessageType.HELLO), "v": 1, "h": "host", "k": None}
SESSION: dict[str, object] = {"t": int(MessageType.SESSION_DECL), "s": 1, "nm": "s", "c": "20261129T101500", "l": False}
STREAM: dict[str, object] = {"t": int(MessageType.STREAM_DECL), "i": 1, "s": 1, "p": "a", "ch": "c", "x": 0,
                             "fs": 1 << 20, "fc": 4}


def _with(base: Mapping[str, object], **changes: object) -> dict[str, object]:
    out = dict(base)
    for key, value in changes.items():
        if value is _DROP:
            del out[key]
        else:
            out[key] = value
    return out


_DROP = object()


@pytest.mark.parametrize(
    ("header", "code", "match"),
    [
        pytest.param([1, 2], ErrorCode.PROTOCOL, "header must be a CBOR map, got list", id="not-a-map"),
        pytest.param({"i": 1}, ErrorCode.PROTOCOL, 'needs an int message type "t", got None', id="no-type"),
        pytest.param(_with(ACK, t=True), ErrorCode.PROTOCOL, 'message type "t", got True', id="bool-type"),
        pytest.param(_with(ACK, t=99), ErrorCode.PROTOCOL, "unknown message type 99", id="unknown-type"),
        pytest.param(_with(ACK, t=0), ErrorCode.PROTOCOL, "unknown message type 0", id="type-zero"),
        pytest.param(_with(ACK, i=True), ErrorCode.PROTOCOL, "Ack.stream_id must be an int, got bool", id="bool"),
        pytest.param(_with(ACK, i="1"), ErrorCode.PROTOCOL, "Ack.stream_id must be an int, got str", id="str"),
        pytest.param(_with(ACK, i=1.0), ErrorCode.PROTOCOL, "Ack.stream_id must be an int, got float", id="float"),
        pytest.param(_with(ACK, i=-1), ErrorCode.PROTOCOL, r"Ack.stream_id must be in \[0, ", id="negative"),
        pytest.param(_with(ACK, q=-2), ErrorCode.PROTOCOL, r"Ack.seq must be in \[-1, ", id="ack-seq"),
        pytest.param(_with(ACK, i=2**63), ErrorCode.PROTOCOL, "must be in", id="too-big"),
        pytest.param(_with(ACK, i=2**64), ErrorCode.PROTOCOL, "malformed CBOR header: .*tag 2", id="bignum"),
        pytest.param(_with(ACK, q=_DROP), ErrorCode.PROTOCOL, "Ack header lacks field 'q'", id="missing"),
        pytest.param(_with(ACK, z=1), ErrorCode.PROTOCOL, r"Ack header has unexpected field\(s\) 'z'", id="extra"),
        pytest.param(_with(HELLO, h="../etc"), ErrorCode.BAD_NAME, "Hello.hostname '../etc'", id="hostname-dots"),
        pytest.param(_with(HELLO, h="a/b"), ErrorCode.BAD_NAME, "must not contain '/'", id="hostname-slash"),
        pytest.param(_with(HELLO, h=b"host"), ErrorCode.BAD_NAME, "must be a str, got bytes", id="hostname-bytes"),
        pytest.param(_with(HELLO, k="a b"), ErrorCode.BAD_NAME, "contains whitespace", id="key-space"),
        pytest.param(_with(HELLO, k=_DROP), ErrorCode.PROTOCOL, "Hello header lacks field 'k'", id="key-missing"),
        pytest.param(_with(HELLO, v=0), ErrorCode.PROTOCOL, r"Hello.version must be in \[1, 65535\]", id="v0"),
        pytest.param(_with(SESSION, l=1), ErrorCode.PROTOCOL, "SessionDecl.live must be a bool, got int", id="live"),
        pytest.param(
            _with(SESSION, c="2026-11-29T10:15"), ErrorCode.PROTOCOL, "must look like YYYYmmddTHHMMSS", id="created"
        ),
        pytest.param(
            _with(SESSION, c="20261329T101500"), ErrorCode.PROTOCOL, "must look like YYYYmmddTHHMMSS", id="month-13"
        ),
        pytest.param(_with(SESSION, nm="x" * 201), ErrorCode.BAD_NAME, "longer than 200", id="session-name-long"),
        pytest.param(
            {"t": int(MessageType.CHALLENGE), "n": bytes(31)},
            ErrorCode.PROTOCOL,
            "Challenge.nonce must be 32 bytes, got 31",
            id="nonce-short",
        ),
        pytest.param(
            {"t": int(MessageType.AUTH), "m": "00" * 32}, ErrorCode.PROTOCOL, "Auth.mac must be bytes", id="mac-str"
        ),
        pytest.param(
            {"t": int(MessageType.STREAM_DECL), "i": 1, "s": 1, "p": "/abs", "ch": "c", "x": 0, "fs": None, "fc": None},
            ErrorCode.BAD_NAME,
            "must be relative",
            id="abs-path",
        ),
        pytest.param(
            {"t": int(MessageType.ERROR), "e": 5, "tx": "x" * 4097},
            ErrorCode.PROTOCOL,
            "Error.text is 4097 chars long",
            id="error-text",
        ),
        pytest.param({"t": 14, b"t": 1}, ErrorCode.PROTOCOL, "unexpected field", id="bytes-key"),
        pytest.param(_with(STREAM, fs=_DROP), ErrorCode.PROTOCOL, "StreamDecl header lacks field 'fs'",
                     id="fs-missing"),
        pytest.param(_with(STREAM, fc=_DROP), ErrorCode.PROTOCOL, "StreamDecl header lacks field 'fc'",
                     id="fc-missing"),
        pytest.param(_with(STREAM, fs=4095), ErrorCode.PROTOCOL, r"tracefile_size must be in \[4096, ", id="fs-small"),
        pytest.param(_with(STREAM, fs=0), ErrorCode.PROTOCOL, r"tracefile_size must be in \[4096, ", id="fs-zero"),
        pytest.param(_with(STREAM, fs=-1), ErrorCode.PROTOCOL, "tracefile_size must be in", id="fs-negative"),
        pytest.param(_with(STREAM, fs=2**63), ErrorCode.PROTOCOL, "tracefile_size must be in", id="fs-huge"),
        pytest.param(_with(STREAM, fs=True), ErrorCode.PROTOCOL, "tracefile_size must be an int, got bool",
                     id="fs-bool"),
        pytest.param(_with(STREAM, fs="1M"), ErrorCode.PROTOCOL, "tracefile_size must be an int, got str", id="fs-str"),
        pytest.param(_with(STREAM, fs=1.5e6), ErrorCode.PROTOCOL, "tracefile_size must be an int", id="fs-float"),
        pytest.param(_with(STREAM, fc=0), ErrorCode.PROTOCOL, r"tracefile_count must be in \[1, ", id="fc-zero"),
        pytest.param(_with(STREAM, fc=-5), ErrorCode.PROTOCOL, "tracefile_count must be in", id="fc-negative"),
        pytest.param(_with(STREAM, fc=[4]), ErrorCode.PROTOCOL, "tracefile_count must be an int, got list",
                     id="fc-list"),
        pytest.param(_with(STREAM, fs=None), ErrorCode.PROTOCOL, "tracefile_count needs a tracefile_size",
                     id="fc-without-fs"),
    ],
)
def test_bad_header_fields(header: object, code: ErrorCode, match: str) -> None:
    expect_remote(frame(header), code, match)


def test_packet_field_checks_from_the_wire() -> None:
    good = cbor2.loads(encode(packet())[12:-16])
    payload = encode(packet())[-16:]
    assert tr(frame(good, payload)) == [packet()]
    expect_remote(frame(_with(good, cd=7), payload), ErrorCode.PROTOCOL, "Packet.codec must be a Codec, got 7")
    expect_remote(frame(good, payload[:-1]), ErrorCode.PROTOCOL, "uncompressed Packet has 15 bytes, raw_len 16")
    expect_remote(
        frame(_with(good, ps=136), payload), ErrorCode.PROTOCOL, r"packet_size_bits \(136\) != 8 \* raw_len \(16\)"
    )
    expect_remote(frame(_with(good, te=999), payload), ErrorCode.PROTOCOL, r"Packet.ts_end must be in \[1000")
    expect_remote(frame(_with(good, cs=129), payload), ErrorCode.PROTOCOL, r"content_size_bits must be in \[0, 128\]")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        pytest.param(b"\xff\xff", "malformed CBOR header", id="junk"),
        pytest.param(b"\xa1", "malformed CBOR header", id="truncated-map"),
        pytest.param(cbor2.dumps({"t": 14}) + b"\x00", "1 trailing bytes after the CBOR header", id="trailing"),
        pytest.param(b"\xbf\x61t\x0e\xff", "malformed CBOR header", id="indefinite-map"),
        pytest.param(b"\xa2\x61t\x0e\x61t\x0e", "malformed CBOR header", id="duplicate-key"),
        pytest.param(b"\x81" * 10 + b"\x00", "malformed CBOR header", id="deep-nesting"),
        pytest.param(b"\xa1\x81\x00\x00", "malformed CBOR header", id="array-key"),
        pytest.param(cbor2.dumps({"t": 9, "i": cbor2.CBORTag(2, b"\x01"), "q": 1}), "CBOR tags", id="bignum-tag"),
        pytest.param(cbor2.dumps({"t": 9, "i": cbor2.CBORTag(35, "(a+)+$"), "q": 1}), "CBOR tags", id="regex-tag"),
        pytest.param(cbor2.dumps({"t": 9, "i": cbor2.CBORTag(28, 1), "q": 1}), "CBOR tags", id="shareable-tag"),
        pytest.param(cbor2.dumps({"t": 9, "i": cbor2.CBORTag(4242, 1), "q": 1}), "CBOR tags", id="unknown-tag"),
        pytest.param(cbor2.dumps(cbor2.CBORTag(55799, {"t": 14})), "CBOR tags", id="self-describe"),
        pytest.param(b"\xa2\x61t\x0e\x61x\x78\x05abc", "malformed CBOR header", id="bad-string-length"),
        pytest.param(b"\xa1\x61t\x62\xc3\x28", "malformed CBOR header", id="bad-utf8"),
    ],
)
def test_bad_cbor(raw: bytes, match: str) -> None:
    expect_remote(frame(None, raw_header=raw), ErrorCode.PROTOCOL, match)


def test_error_after_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(RemoteProtocolError, match="bad magic") as first:
        decoder.next_event()
    for call in (decoder.next_event, lambda: decoder.receive_data(encode(Bye()))):
        with pytest.raises(RemoteProtocolError, match="decoder already failed: bad magic") as again:
            call()
        assert again.value.code is first.value.code is ErrorCode.PROTOCOL


def test_protocol_error_is_abstract() -> None:
    with pytest.raises(TypeError):
        ProtocolError(ErrorCode.PROTOCOL, "x")
    err = RemoteProtocolError(ErrorCode.LIMIT, "too many")
    assert str(err) == "too many" and err.code is ErrorCode.LIMIT
    assert repr(err) == "RemoteProtocolError(LIMIT, 'too many')"


# --------------------------------------------------------------------------
# Message construction
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "code", "match"),
    [
        (lambda: Hello(1, ""), ErrorCode.BAD_NAME, "must not be empty"),
        (lambda: Hello(1, "."), ErrorCode.BAD_NAME, "must not start with '.'"),
        (lambda: Hello(1, "a\nb"), ErrorCode.BAD_NAME, "must be printable"),
        (lambda: Hello(1, "h", "k\0"), ErrorCode.BAD_NAME, "NUL"),
        (lambda: Challenge(bytearray(32)), ErrorCode.PROTOCOL, "must be bytes, got bytearray"),  # type: ignore[arg-type]
        (lambda: Packet(1, 0, 1, 1, 0, 0, 0, 8, 8, 0, b"x"), ErrorCode.PROTOCOL, "codec must be a Codec"),  # type: ignore[arg-type]
        (lambda: packet(data="abcd"), ErrorCode.PROTOCOL, "bytes-like, got str"),
        (lambda: packet(data=memoryview(bytes(8))[::2]), ErrorCode.PROTOCOL, "contiguous"),
        (lambda: StreamDecl(1, 1, "a//b", "c", 0), ErrorCode.BAD_NAME, "empty component"),
        (lambda: StreamDecl(1, 1, "a/../b", "c", 0), ErrorCode.BAD_NAME, "component '..'"),
        (lambda: StreamDecl(1, 1, "a", "c" * 201, 0), ErrorCode.BAD_NAME, "longer than 200"),
        (lambda: Metadata(1, "a" * 4097, 0, b""), ErrorCode.BAD_NAME, "longer than 4096"),
        (lambda: Error(-1, "x"), ErrorCode.PROTOCOL, "Error.code must be in"),
    ],
)
def test_construction_checks(make: Callable[[], object], code: ErrorCode, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match) as info:
        make()
    assert info.value.code is code


def test_messages_are_frozen() -> None:
    msg = Ack(1, 2)
    with pytest.raises(AttributeError):
        msg.seq = 3  # type: ignore[misc]
    assert not hasattr(msg, "__dict__")


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["host", "board-7.lab", "my session", "ünïcode", "a" * 255, "é" * 127, "x..y"])
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name, "hostname") == name


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "must not be empty"),
        (".", "must not start with '.'"),
        ("..", "must not start with '.'"),
        (".hidden", "must not start with '.'"),
        ("a/b", "'/'"),
        ("a\0b", "NUL"),
        ("a\tb", "printable"),
        ("a\x1b[31m", "printable"),
        ("a" * 256, "longer than 255"),
        ("é" * 128, "256 bytes long, limit 255"),
        ("\udcff", "not valid UTF-8"),
        (b"host", "must be a str"),
        (None, "must be a str"),
    ],
)
def test_validate_name_rejects(name: object, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        validate_name(name, "hostname")
    assert info.value.code is ErrorCode.BAD_NAME


@pytest.mark.parametrize("path", [TRACE, "a", "kernel", "ust/uid/1000/64-bit"])
def test_validate_trace_path_accepts(path: str) -> None:
    assert validate_trace_path(path) == path


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("", "empty component"),
        ("/etc/passwd", "must be relative"),
        ("a/", "empty component"),
        ("a//b", "empty component"),
        ("ust/../../etc", "component '..'"),
        ("ust/./x", "component '.'"),
        ("a\0/b", "NUL"),
        ("a/" * 2049, "longer than 4096"),
        (["a"], "must be a str"),
    ],
)
def test_validate_trace_path_rejects(path: object, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        validate_trace_path(path)
    assert info.value.code is ErrorCode.BAD_NAME


# --------------------------------------------------------------------------
# Connection pair
# --------------------------------------------------------------------------


class ConnectionPair:
    """A consumer and a relay Connection joined by a perfect fake link."""

    def __init__(self, **relay_kw: object) -> None:
        self.conn = {C: Connection(C), R: Connection(R, **relay_kw)}  # type: ignore[arg-type]

    def send(self, role: Role, msg: Message) -> list[Event]:
        """Sends `msg` from `role`; asserts the peer receives exactly it."""
        data = self.conn[role].send(msg)
        peer = self.conn[R if role is C else C]
        peer.receive_data(data)
        got = []
        while (event := peer.next_event()) is not None:
            got.append(event)
        assert got == [msg]
        assert self.conn[C].state is self.conn[R].state
        return got

    @property
    def state(self) -> ConnState:
        return self.conn[C].state

    def expect(self, state: ConnState) -> None:
        assert self.conn[C].state is self.conn[R].state is state

    def handshake(self) -> None:
        self.send(C, Hello(1, "board-7"))
        self.send(R, Welcome(1))

    def established(self) -> ConnectionPair:
        self.handshake()
        self.send(C, SessionDecl(1, "s", "20261129T101500", False))
        self.send(C, StreamDecl(10, 1, TRACE, "channel0", 0))
        return self


def test_full_session_with_auth() -> None:
    p = ConnectionPair(require_auth=True)
    consumer, relay = p.conn[C], p.conn[R]
    p.expect(ConnState.HANDSHAKE_HELLO)
    p.send(C, Hello(1, "board-7", "k1"))
    p.expect(ConnState.HANDSHAKE_REPLY)
    p.send(R, Challenge(NONCE))
    p.expect(ConnState.HANDSHAKE_AUTH)
    assert consumer.nonce == relay.nonce == NONCE
    mac = compute_auth_mac(SECRET, NONCE, "board-7", "k1")
    p.send(C, Auth(mac))
    p.expect(ConnState.HANDSHAKE_VERIFY)
    assert relay.hello is not None and relay.hello.key_id is not None
    assert verify_auth_mac(SECRET, relay.nonce, relay.hello.hostname, relay.hello.key_id, mac)
    p.send(R, Welcome(1, 256))
    p.expect(ConnState.ESTABLISHED)

    p.send(C, SessionDecl(1, "s", "20261129T101500", True))
    p.send(C, StreamDecl(10, 1, TRACE, "channel0", 0))
    p.send(C, StreamDecl(11, 1, TRACE, "channel0", 1))
    p.send(C, Metadata(1, TRACE, 0, b"/* CTF 1.8 */"))
    p.send(C, packet(10, 0))
    p.send(C, zpacket(10, 1))
    p.send(C, packet(11, 5))  # a resumed stream starts where the relay stands
    p.send(R, Ack(10, 1))
    p.send(C, StreamStateRequest(11))
    p.send(R, StreamState(11, 6))
    assert set(relay.streams) == set(consumer.streams) == {10, 11}
    assert relay.streams[10].channel == "channel0"
    p.send(C, StreamClose(10))
    p.send(R, Ack(10, 1))  # late ack of a closed stream is fine
    p.send(C, SessionClose(1))  # closes stream 11 too
    assert relay.streams == {} and relay.sessions == {}
    p.send(C, Bye())
    p.expect(ConnState.CONSUMER_BYE)
    p.send(R, Ack(11, 5))
    p.send(R, Bye())
    p.expect(ConnState.CLOSED)
    relay.receive_data(b"")
    assert relay.next_event() == ConnectionClosed()


def test_handshake_without_auth() -> None:
    p = ConnectionPair()
    p.send(C, Hello(1, "board-7", "k1"))  # a key the relay does not ask for
    p.send(R, Welcome(1))
    p.expect(ConnState.ESTABLISHED)


def test_relay_bye_lets_in_flight_data_in() -> None:
    p = ConnectionPair().established()
    p.send(R, Bye())
    p.expect(ConnState.RELAY_BYE)
    p.send(C, packet(10, 0))
    with pytest.raises(LocalProtocolError, match="can't handle Ack from RELAY when state=RELAY_BYE"):
        p.conn[R].send(Ack(10, 0))
    p = ConnectionPair().established()
    p.send(R, Bye())
    p.send(C, Bye())
    p.expect(ConnState.CLOSED)


def test_error_message_closes() -> None:
    p = ConnectionPair()
    p.send(C, Hello(1, "board-7"))
    p.send(R, Error(ErrorCode.FORBIDDEN, "key k1 may not write board-7"))
    p.expect(ConnState.CLOSED)
    received = p.conn[C]
    received.receive_data(b"")
    assert received.next_event() == ConnectionClosed()


def test_eof_while_established() -> None:
    p = ConnectionPair().established()
    p.conn[R].receive_data(b"")
    assert p.conn[R].next_event() == ConnectionClosed()
    assert p.conn[R].state is ConnState.CLOSED


def test_require_auth_refuses_keyless_hello() -> None:
    p = ConnectionPair(require_auth=True)
    relay = p.conn[R]
    relay.receive_data(p.conn[C].send(Hello(1, "board-7")))
    with pytest.raises(RemoteProtocolError, match="requires a key; Hello has no key_id") as info:
        relay.next_event()
    assert info.value.code is ErrorCode.AUTH_FAILED
    assert relay.state is ConnState.ERROR
    # The relay can still say why; the consumer then sees the connection closed.
    p.conn[C].receive_data(relay.send(Error(info.value.code, info.value.message)))
    assert p.conn[C].next_event() == Error(ErrorCode.AUTH_FAILED, "this relay requires a key; Hello has no key_id")
    assert p.conn[C].state is ConnState.CLOSED


def test_require_auth_forbids_plain_welcome() -> None:
    p = ConnectionPair(require_auth=True)
    p.send(C, Hello(1, "board-7", "k1"))
    with pytest.raises(LocalProtocolError, match="answer Hello with Challenge") as info:
        p.conn[R].send(Welcome(1))
    assert info.value.code is ErrorCode.BAD_STATE
    assert p.conn[R].state is ConnState.ERROR


def test_require_auth_is_a_relay_setting() -> None:
    with pytest.raises(ValueError, match="relay setting"):
        Connection(C, require_auth=True)


def test_challenge_needs_a_key_id() -> None:
    p = ConnectionPair()
    p.send(C, Hello(1, "board-7"))
    with pytest.raises(LocalProtocolError, match="Hello without key_id") as linfo:
        p.conn[R].send(Challenge(NONCE))
    assert linfo.value.code is ErrorCode.AUTH_FAILED
    consumer = p.conn[C]
    consumer.receive_data(encode(Challenge(NONCE)))
    with pytest.raises(RemoteProtocolError, match="Hello without key_id") as info:
        consumer.next_event()
    assert info.value.code is ErrorCode.AUTH_FAILED


def test_version_checks() -> None:
    relay = Connection(R)
    relay.receive_data(encode(Hello(3, "board-7")))
    with pytest.raises(RemoteProtocolError, match=r"unsupported protocol version 3, supported: \[1, 2\]") as info:
        relay.next_event()
    assert info.value.code is ErrorCode.VERSION
    consumer = Connection(C)
    consumer.send(Hello(1, "board-7"))
    consumer.receive_data(encode(Welcome(2)))
    with pytest.raises(RemoteProtocolError, match=r"server_version 2 != Hello\.version 1") as info:
        consumer.next_event()
    assert info.value.code is ErrorCode.VERSION


def _hello(p: ConnectionPair) -> None:
    p.send(C, Hello(1, "h", "k"))


def _challenged(p: ConnectionPair) -> None:
    _hello(p)
    p.send(R, Challenge(NONCE))


def _consumer_bye(p: ConnectionPair) -> None:
    p.established()
    p.send(C, Bye())


def _closed(p: ConnectionPair) -> None:
    _consumer_bye(p)
    p.send(R, Bye())


@pytest.mark.parametrize(
    ("setup", "sender", "msg", "state"),
    [
        (lambda p: None, C, packet(), "HANDSHAKE_HELLO"),
        (lambda p: None, R, Welcome(1), "HANDSHAKE_HELLO"),
        (lambda p: None, C, Auth(bytes(32)), "HANDSHAKE_HELLO"),
        (_hello, C, Hello(1, "h"), "HANDSHAKE_REPLY"),
        (_hello, C, SessionDecl(1, "s", "20261129T101500", False), "HANDSHAKE_REPLY"),
        (_hello, R, Ack(1, 1), "HANDSHAKE_REPLY"),
        (_challenged, R, Welcome(1), "HANDSHAKE_AUTH"),
        (_challenged, C, Bye(), "HANDSHAKE_AUTH"),
        (ConnectionPair.established, C, Hello(1, "h"), "ESTABLISHED"),
        (ConnectionPair.established, C, Ack(10, 1), "ESTABLISHED"),
        (ConnectionPair.established, R, packet(10), "ESTABLISHED"),
        (ConnectionPair.established, R, Challenge(NONCE), "ESTABLISHED"),
        (_consumer_bye, C, packet(10), "CONSUMER_BYE"),
        (_consumer_bye, C, Bye(), "CONSUMER_BYE"),
        (_closed, R, Ack(10, 0), "CLOSED"),
        (_closed, C, Error(ErrorCode.INTERNAL, "x"), "CLOSED"),
    ],
)
def test_out_of_state(setup: Callable[[ConnectionPair], object], sender: Role, msg: Message, state: str) -> None:
    name = type(msg).__name__
    text = f"can't handle {name} from {sender.name} when state={state}"
    # Sent by us: local error.
    p = ConnectionPair()
    setup(p)
    with pytest.raises(LocalProtocolError, match=text) as linfo:
        p.conn[sender].send(msg)
    assert linfo.value.code is ErrorCode.BAD_STATE
    assert p.conn[sender].state is ConnState.ERROR
    # Received from the peer: remote error.
    p = ConnectionPair()
    setup(p)
    receiver = p.conn[R if sender is C else C]
    receiver.receive_data(encode(msg))
    with pytest.raises(RemoteProtocolError, match=text) as rinfo:
        receiver.next_event()
    assert rinfo.value.code is ErrorCode.BAD_STATE
    assert receiver.state is ConnState.ERROR


def test_wrong_role_is_refused_even_when_state_fits() -> None:
    relay = Connection(R)
    with pytest.raises(LocalProtocolError, match="can't handle Hello from RELAY") as info:
        relay.send(Hello(1, "h"))
    assert info.value.code is ErrorCode.BAD_STATE


@pytest.mark.parametrize(
    ("msgs", "code", "match"),
    [
        ([packet(99)], ErrorCode.PROTOCOL, "stream 99 is not open"),
        ([packet(10, 3), packet(10, 3)], ErrorCode.PROTOCOL, "stream 10: seq 3 after 3"),
        ([packet(10, 3), packet(10, 2)], ErrorCode.PROTOCOL, "stream 10: seq 2 after 3"),
        ([StreamDecl(10, 1, "a", "c", 1)], ErrorCode.PROTOCOL, "stream ids must increase: 10 declared after 10"),
        ([StreamDecl(5, 1, "a", "c", 1)], ErrorCode.PROTOCOL, "stream ids must increase"),
        ([StreamDecl(11, 2, "a", "c", 1)], ErrorCode.PROTOCOL, "names unknown session 2"),
        ([SessionDecl(1, "s", "20261129T101500", False)], ErrorCode.PROTOCOL, "session 1 is already open"),
        ([SessionDecl(2, "t", "20261129T101500", False)], ErrorCode.LIMIT, r"too many open sessions \(limit 1\)"),
        ([StreamDecl(11, 1, "a", "c", 1), StreamDecl(12, 1, "a", "c", 2)], ErrorCode.LIMIT, "too many open streams"),
        ([Metadata(2, "a", 0, b"x")], ErrorCode.PROTOCOL, "metadata for unknown session 2"),
        ([Metadata(1, "a", 1000, b"x")], ErrorCode.LIMIT, r"metadata would reach 1001 bytes \(limit 1000\)"),
        ([StreamClose(10), packet(10, 0)], ErrorCode.PROTOCOL, "stream 10 is not open"),
        ([StreamClose(10), StreamClose(10)], ErrorCode.PROTOCOL, "stream 10 is not open"),
        ([StreamStateRequest(11)], ErrorCode.PROTOCOL, "stream 11 is not open"),
        ([SessionClose(1), packet(10, 0)], ErrorCode.PROTOCOL, "stream 10 is not open"),
        ([SessionClose(2)], ErrorCode.PROTOCOL, "session 2 is not open"),
        ([Ack(11, 0)], ErrorCode.PROTOCOL, "Ack for undeclared stream 11"),
        ([StreamState(11, 0)], ErrorCode.PROTOCOL, "StreamState for undeclared stream 11"),
        ([Retry(11, 0, RetryReason.IO_ERROR, "")], ErrorCode.PROTOCOL, "Retry for undeclared stream 11"),
        ([packet(10, 3), Retry(10, 4, RetryReason.NO_SPACE, "")], ErrorCode.PROTOCOL,
         "Retry for stream 10 at seq 4, after seq 3 was sent"),
    ],
)
def test_declaration_bookkeeping(msgs: list[Message], code: ErrorCode, match: str) -> None:
    def make() -> ConnectionPair:
        p = ConnectionPair(max_streams=2, max_sessions=1, max_metadata_size=1000)
        p.conn[C] = Connection(C, max_streams=2, max_sessions=1, max_metadata_size=1000)
        return p.established()

    *ok, bad = msgs
    sender = R if isinstance(bad, Ack | StreamState | Retry) else C
    p = make()
    for msg in ok:
        p.send(C, msg)
    receiver = p.conn[R if sender is C else C]
    receiver.receive_data(encode(bad))
    with pytest.raises(RemoteProtocolError, match=match) as rinfo:
        receiver.next_event()
    assert rinfo.value.code is code
    p = make()
    for msg in ok:
        p.send(C, msg)
    with pytest.raises(LocalProtocolError, match=match) as linfo:
        p.conn[sender].send(bad)
    assert linfo.value.code is code


def test_retry_lets_the_consumer_resend_from_its_seq_once() -> None:
    p = ConnectionPair().established()
    for seq in range(4):
        p.send(C, packet(10, seq))
    p.send(R, Retry(10, 1, RetryReason.NO_SPACE, "No space left on device"))
    p.send(C, packet(10, 4))  # in flight when the Retry left: still in order
    p.send(C, packet(10, 1))  # the resend the Retry asked for
    p.send(C, packet(10, 2))
    # The rewind is used up, on both ends.
    p.conn[R].receive_data(encode(packet(10, 1)))
    with pytest.raises(RemoteProtocolError, match="stream 10: seq 1 after 2"):
        p.conn[R].next_event()
    with pytest.raises(LocalProtocolError, match="stream 10: seq 1 after 2"):
        p.conn[C].send(packet(10, 1))
    q = ConnectionPair().established()
    q.send(C, packet(10, 0))
    q.send(C, packet(10, 1))
    q.send(R, Retry(10, 0, RetryReason.IO_ERROR, "Input/output error"))
    q.conn[R].receive_data(encode(packet(10, 1)))  # only seq 0 may go back
    with pytest.raises(RemoteProtocolError, match="stream 10: seq 1 after 1"):
        q.conn[R].next_event()


def test_connection_error_state() -> None:
    relay = Connection(R)
    relay.receive_data(b"\x00" * 12)
    with pytest.raises(RemoteProtocolError, match="bad magic 0x00000000") as first:
        relay.next_event()
    assert relay.state is ConnState.ERROR and relay.error is first.value
    for call in (relay.next_event, lambda: relay.receive_data(b"more")):
        with pytest.raises(RemoteProtocolError, match="connection already failed: bad magic") as again:
            call()
        assert again.value.code is ErrorCode.PROTOCOL
    with pytest.raises(LocalProtocolError, match="can't send Welcome when state=ERROR") as local:
        relay.send(Welcome(1))
    assert local.value.code is ErrorCode.BAD_STATE
    assert relay.send(Error(ErrorCode.PROTOCOL, "bad magic")) == encode(Error(ErrorCode.PROTOCOL, "bad magic"))
    assert relay.state is ConnState.ERROR


def test_send_failed() -> None:
    consumer = Connection(C)
    consumer.send(Hello(1, "h"))
    consumer.send_failed()
    assert consumer.state is ConnState.ERROR
    with pytest.raises(RemoteProtocolError, match="connection already failed: sending a frame failed") as info:
        consumer.next_event()
    assert info.value.code is ErrorCode.INTERNAL


def test_connection_limits_on_receive() -> None:
    relay = Connection(R, max_payload_size=10)
    relay.receive_data(encode(packet(data=bytes(16)))[:12])
    with pytest.raises(RemoteProtocolError, match="payload_len 16 over the limit 10") as info:
        relay.next_event()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


def test_refused_send_changes_nothing_but_error() -> None:
    consumer = Connection(C)
    with pytest.raises(LocalProtocolError):
        consumer.send(packet())
    assert consumer.hello is None and consumer.streams == {}


# --------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------


def test_auth_mac() -> None:
    mac = compute_auth_mac(SECRET, NONCE, "board-7", "k1")
    assert len(mac) == 32
    assert verify_auth_mac(SECRET, NONCE, "board-7", "k1", mac)
    assert not verify_auth_mac(b"wrong", NONCE, "board-7", "k1", mac)
    assert not verify_auth_mac(SECRET, bytes(32), "board-7", "k1", mac)
    assert not verify_auth_mac(SECRET, NONCE, "board-8", "k1", mac)
    assert not verify_auth_mac(SECRET, NONCE, "board-7", "k2", mac)
    # The hostname/key_id boundary is part of the MAC input.
    assert compute_auth_mac(SECRET, NONCE, "ab", "c") != compute_auth_mac(SECRET, NONCE, "a", "bc")
    with pytest.raises(ValueError, match="empty auth secret"):
        compute_auth_mac(b"", NONCE, "h", "k")
    with pytest.raises(ValueError, match="nonce must be 32 bytes"):
        compute_auth_mac(SECRET, b"short", "h", "k")


def test_auth_mac_known_answer() -> None:
    # docs/protocol.md pins the HMAC input; keep this in step with it.
    import hashlib
    import hmac

    expected = hmac.new(SECRET, b"tracewire-auth-v1" + NONCE + b"board-7\0k1", hashlib.sha256).digest()
    assert compute_auth_mac(SECRET, NONCE, "board-7", "k1") == expected


# --------------------------------------------------------------------------
# zstd
# --------------------------------------------------------------------------


def _zstd_header(content_size: int) -> bytes:
    """A zstd frame header: magic, descriptor (8-byte size), window 128 KiB."""
    return struct.pack("<IBB", 0xFD2FB528, 0xC0, 0x38) + struct.pack("<Q", content_size)


def _rle_block(size: int, last: bool) -> bytes:
    return struct.pack("<I", (size << 3) | (1 << 1) | int(last))[:3] + b"A"


def test_zstd_roundtrip() -> None:
    raw = bytes(range(256)) * 64
    compressor = new_compressor(5)
    for data in (compress_packet(raw), compress_packet(raw, compressor=compressor), compress_packet(raw, 1)):
        assert zstandard.frame_content_size(data) == len(raw)
        assert decompress_packet(data, Codec.ZSTD, len(raw), len(raw)) == raw
    assert decompress_packet(raw, Codec.NONE, len(raw), len(raw)) == raw
    assert decompress_packet(memoryview(raw), Codec.NONE, len(raw), len(raw)) == raw


def test_reused_decompressor_survives_bad_frames() -> None:
    d = wire.new_decompressor(1 << 20)
    good = compress_packet(bytes(range(256)) * 8)
    for bad in (good[:-4], good + b"junk", good * 2, b"\x28\xb5\x2f\xfd" + bytes(20)):
        with pytest.raises(RemoteProtocolError) as info:
            decompress_packet(bad, Codec.ZSTD, 2048, 1 << 20, decompressor=d)
        assert info.value.code is ErrorCode.DECOMPRESS
        assert decompress_packet(good, Codec.ZSTD, 2048, 1 << 20, decompressor=d) == bytes(range(256)) * 8


def test_zstd_bomb_rejected_without_decompressing() -> None:
    bomb = _zstd_header(4 << 30) + _rle_block(131072, False) * 1000 + _rle_block(0, True)
    start = time.perf_counter()
    with pytest.raises(RemoteProtocolError, match="zstd frame declares 4294967296 bytes, raw_len 16384") as info:
        decompress_packet(bomb, Codec.ZSTD, 16384, 1 << 20)
    assert info.value.code is ErrorCode.DECOMPRESS
    with pytest.raises(RemoteProtocolError, match="raw_len 4294967296 over the limit 1048576") as info:
        decompress_packet(bomb, Codec.ZSTD, 4 << 30, 1 << 20)
    assert info.value.code is ErrorCode.DECOMPRESS
    assert time.perf_counter() - start < 1.0


def test_zstd_frame_lying_about_its_size() -> None:
    liar = _zstd_header(1000) + _rle_block(131072, False) * 100 + _rle_block(1000, True)
    with pytest.raises(RemoteProtocolError, match="bad zstd data") as info:
        decompress_packet(liar, Codec.ZSTD, 1000, 2000)
    assert info.value.code is ErrorCode.DECOMPRESS


@pytest.mark.parametrize(
    ("data", "raw_len", "match"),
    [
        pytest.param(b"this is not zstd", 16, "not a zstd frame", id="garbage"),
        pytest.param(b"", 0, "not a zstd frame", id="empty"),
        pytest.param(
            zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100),
            100,
            "does not declare its content size",
            id="unknown-size",
        ),
        pytest.param(compress_packet(b"x" * 100), 99, "declares 100 bytes, raw_len 99", id="raw-len-mismatch"),
        pytest.param(compress_packet(b"x" * 100) + b"junk", 100, "4 bytes of unused data", id="trailing"),
        pytest.param(compress_packet(b"x" * 100) * 2, 100, "bad zstd data: .*unused data", id="two-frames"),
        pytest.param(compress_packet(bytes(range(256)))[:-4], 256, "bad zstd data: .*full frame", id="truncated"),
    ],
)
def test_zstd_bad_data(data: bytes, raw_len: int, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decompress_packet(data, Codec.ZSTD, raw_len, 1 << 20)
    assert info.value.code is ErrorCode.DECOMPRESS


def test_uncompressed_length_checked() -> None:
    with pytest.raises(RemoteProtocolError, match="uncompressed packet has 3 bytes, raw_len 4") as info:
        decompress_packet(b"abc", Codec.NONE, 4, 100)
    assert info.value.code is ErrorCode.DECOMPRESS


@given(st.binary(max_size=64))
def test_zstd_fuzz_only_raises_protocol_errors(tail: bytes) -> None:
    for data in (tail, b"\x28\xb5\x2f\xfd" + tail):
        try:
            decompress_packet(data, Codec.ZSTD, 100, 1000)
        except RemoteProtocolError as exc:
            assert exc.code is ErrorCode.DECOMPRESS


# --------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------

_names = st.text(st.characters(categories=("L", "N")), min_size=1, max_size=30)
_paths = st.lists(_names, min_size=1, max_size=4).map("/".join)
_i63 = st.integers(0, 2**63 - 1)
_u64 = st.integers(0, 2**64 - 1)
_created = st.datetimes(datetime.datetime(1000, 1, 1), datetime.datetime(9999, 12, 31)).map(
    lambda d: d.strftime("%Y%m%dT%H%M%S")
)


@st.composite
def _packets(draw: st.DrawFn) -> Packet:
    codec = draw(st.sampled_from(Codec))
    data = draw(st.binary(max_size=64))
    raw_len = len(data) if codec is Codec.NONE else draw(st.integers(0, 2**60))
    ts_begin = draw(_u64)
    return Packet(
        stream_id=draw(_i63),
        seq=draw(_i63),
        codec=codec,
        raw_len=raw_len,
        ts_begin=ts_begin,
        ts_end=draw(st.integers(ts_begin, 2**64 - 1)),
        events_discarded=draw(_u64),
        content_size_bits=draw(st.integers(0, 8 * raw_len)),
        packet_size_bits=8 * raw_len,
        packet_seq_num=draw(_u64),
        data=data,
    )


_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, st.integers(1, 0xFFFF), _names, st.none() | _names),
    st.builds(Challenge, st.binary(min_size=32, max_size=32)),
    st.builds(Auth, st.binary(min_size=32, max_size=32)),
    st.builds(Welcome, st.integers(1, 0xFFFF), st.none() | _i63),
    st.builds(SessionDecl, _i63, _names, _created, st.booleans()),
    st.builds(StreamDecl, _i63, _i63, _paths, _names, _i63),
    st.builds(Metadata, _i63, _paths, _i63, st.binary(max_size=64)),
    _packets(),
    st.builds(Ack, _i63, st.integers(-1, 2**63 - 1)),
    st.builds(StreamStateRequest, _i63),
    st.builds(StreamState, _i63, _i63),
    st.builds(StreamClose, _i63),
    st.builds(SessionClose, _i63),
    st.just(Bye()),
    st.builds(Error, st.integers(0, 0xFFFF), st.text(max_size=100)),
)


@given(st.lists(_messages, min_size=1, max_size=5), st.integers(1, 50))
def test_random_messages_roundtrip(msgs: list[Message], chunk: int) -> None:
    data = b"".join(encode(m) for m in msgs)
    assert decode_chunks([data]) == msgs
    assert decode_chunks(data[i : i + chunk] for i in range(0, len(data), chunk)) == msgs


def _decode_never_crashes(data: bytes, chunk: int) -> None:
    decoder = FrameDecoder(max_header_size=1024, max_payload_size=1024)
    try:
        decode_chunks([data[i : i + chunk] for i in range(0, len(data), chunk)] + [b""], decoder)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


@given(st.binary(max_size=200), st.integers(1, 64))
def test_random_bytes_only_raise_remote_errors(data: bytes, chunk: int) -> None:
    _decode_never_crashes(data, chunk)


@given(st.binary(max_size=200), st.integers(0, 300), st.integers(1, 64))
def test_random_body_after_valid_header(body: bytes, payload_len: int, chunk: int) -> None:
    _decode_never_crashes(FRAME_HEADER.pack(MAGIC, len(body) or 1, payload_len) + body, chunk)


_KEYS = ["t", "v", "h", "k", "n", "m", "sl", "s", "nm", "c", "l", "i", "p", "ch", "x", "o", "q", "cd", "rl",
         "tb", "te", "ed", "cs", "ps", "pn", "nq", "e", "tx"]
_values = st.one_of(
    st.integers(-(2**64), 2**65), st.integers(0, 20), st.text(max_size=10), st.binary(max_size=40),
    st.booleans(), st.none(), st.floats(), st.lists(st.integers(), max_size=2),
)


@given(
    st.integers(0, 20),
    st.dictionaries(st.sampled_from(_KEYS), _values, max_size=12),
    st.binary(max_size=40),
)
def test_random_cbor_maps_only_raise_remote_errors(mtype: int, fields: dict[str, object], payload: bytes) -> None:
    _decode_never_crashes(frame({"t": mtype, **fields}, payload), 1000)


@settings(max_examples=examples(50))
@given(st.lists(_messages, min_size=1, max_size=8))
def test_random_messages_through_a_relay_only_raise_protocol_errors(msgs: list[Message]) -> None:
    """Whatever a peer sends, the relay's core answers with a message or a
    RemoteProtocolError, never anything else."""
    relay = Connection(R)
    relay.receive_data(encode(Hello(1, "board-7")))
    assert relay.next_event() == Hello(1, "board-7")
    relay.send(Welcome(1))
    relay.receive_data(b"".join(encode(m) for m in msgs))
    try:
        while relay.next_event() is not None:
            pass
    except RemoteProtocolError as exc:
        assert relay.state is ConnState.ERROR and exc.code in ErrorCode


# --------------------------------------------------------------------------
# Zero-copy receive path (receive_buffer / received / recycle)
# --------------------------------------------------------------------------


class SmallDirect(FrameDecoder):
    """Payloads of 16 bytes or more take the direct path (the real threshold
    is 64 KiB), so that small frames exercise it."""

    DIRECT_PAYLOAD_MIN = 16
    READ_SIZE = 40
    PAYLOAD_START = 32  # BIG's buffer doubles 7 times


def receive_into(decoder: FrameDecoder, data: bytes, chunk: int) -> list[Event]:
    """Feeds `data` through receive_buffer()/received(), at most `chunk`
    bytes per receive, as a socket would, then EOF."""
    out: list[Event] = []
    pos = 0
    while True:
        while (event := decoder.next_event()) is not None:
            out.append(event)
            if isinstance(event, ConnectionClosed):
                return out
        buf = decoder.receive_buffer()
        n = min(len(buf), chunk, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        decoder.received(n)
        pos += n


BIG = bytes(range(256)) * 9  # 2304 bytes


def fill(decoder: FrameDecoder, data: bytes) -> list[object]:
    """Receives `data` through receive_buffer()/received(), as much as each
    buffer takes; returns the objects whose buffers were lent."""
    owners: list[object] = []
    pos = 0
    while pos < len(data):
        buf = decoder.receive_buffer()
        owners.append(buf.obj)
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        decoder.received(n)
        pos += n
    return owners


@pytest.mark.parametrize("chunk", [1, 7, 40, 1000, 100_000])
def test_receive_into_roundtrip(chunk: int) -> None:
    msgs = [*SAMPLES, packet(data=BIG), packet(seq=1, data=BIG[:16]), Metadata(3, TRACE, 0, BIG), packet(seq=2)]
    data = b"".join(encode(m) for m in msgs)
    assert receive_into(SmallDirect(), data, chunk) == [*msgs, ConnectionClosed()]
    assert receive_into(FrameDecoder(), data, chunk) == [*msgs, ConnectionClosed()]


def test_large_payload_is_received_into_its_own_buffer() -> None:
    msg = packet(data=bytes(FrameDecoder.DIRECT_PAYLOAD_MIN) + b"tail")
    head, payload = encode_parts(msg)
    decoder = FrameDecoder()
    decoder.receive_data(head)
    assert decoder.next_event() is None
    assert decoder.bytes_needed == len(payload)
    buf = decoder.receive_buffer()
    assert len(buf) == len(payload)
    target = buf.obj
    buf[:] = payload
    decoder.received(len(buf))
    event = decoder.next_event()
    assert event == msg
    assert isinstance(event, Packet) and event.data is target  # no copy after the kernel's


def test_receive_data_and_receive_buffer_mix() -> None:
    msgs = [packet(data=BIG), packet(seq=1, data=BIG), Bye()]
    data = b"".join(encode(m) for m in msgs)
    decoder = SmallDirect()
    out: list[Event] = []
    pos = 0
    for i, size in enumerate([5, 100, 1, 3000, 50, 10_000]):
        if i % 2:
            decoder.receive_data(data[pos : pos + size])
            pos += len(data[pos : pos + size])
        else:
            buf = decoder.receive_buffer()
            n = min(len(buf), size, len(data) - pos)
            buf[:n] = data[pos : pos + n]
            decoder.received(n)
            pos += n
        while (event := decoder.next_event()) is not None:
            out.append(event)
    assert pos == len(data) and out == msgs


def test_announced_payload_is_not_allocated_before_it_arrives() -> None:
    decoder = FrameDecoder()
    head = encode_parts(packet(data=bytes(8 << 20)))[0]
    decoder.receive_data(head)
    assert decoder.next_event() is None
    assert decoder.bytes_needed == 8 << 20
    buf = decoder.receive_buffer()
    assert len(buf) == FrameDecoder.PAYLOAD_START  # not 8 MiB
    buf[:10] = bytes(10)
    decoder.received(10)
    assert len(decoder.receive_buffer()) == FrameDecoder.PAYLOAD_START - 10


def test_buffer_lent_and_not_filled_can_be_asked_again() -> None:
    decoder = SmallDirect()
    head, payload = encode_parts(packet(data=BIG))
    decoder.receive_data(head)
    assert decoder.next_event() is None
    stale = decoder.receive_buffer()  # a receive that would block: never filled
    buf = decoder.receive_buffer()
    with pytest.raises(ValueError):
        stale[:1] = b"x"  # released: it cannot write behind the decoder's back
    n = len(buf)
    buf[:] = payload[:n]
    decoder.received(n)
    fill(decoder, payload[n:])  # the buffer grows
    assert decoder.next_event() == packet(data=BIG)


def test_bytes_needed_follows_the_frame() -> None:
    head, payload = encode_parts(packet(data=BIG))
    decoder = SmallDirect()
    assert decoder.bytes_needed == FRAME_HEADER.size
    decoder.receive_data(head[:5])
    assert decoder.bytes_needed == FRAME_HEADER.size - 5
    decoder.receive_data(head[5:14])
    assert decoder.next_event() is None
    assert decoder.bytes_needed == len(head) - 14  # the rest of the CBOR header
    decoder.receive_data(head[14:] + payload[:100])
    assert decoder.next_event() is None
    assert decoder.bytes_needed == len(payload) - 100
    decoder.receive_data(payload[100:])
    assert decoder.bytes_needed == 1  # a whole frame is in: next_event will not wait
    assert decoder.next_event() is not None
    assert decoder.bytes_needed == FRAME_HEADER.size


def test_recycled_buffer_is_reused_within_the_pool_limit() -> None:
    decoder = SmallDirect(pool_bytes=2 * len(BIG))
    data = b"".join(encode(packet(seq=i, data=BIG)) for i in range(3))
    first, second, third = decode_chunks([data], decoder)
    assert isinstance(first, Packet) and isinstance(second, Packet) and isinstance(third, Packet)
    for m in (first, second, third):
        decoder.recycle(m.data)  # the third one does not fit in the pool
    decoder.recycle(b"x" * 100)  # not a payload buffer: ignored
    decoder.recycle(bytearray(4))  # too small for the direct path: ignored
    reuse = SmallDirect(pool_bytes=0)
    reuse.recycle(bytearray(len(BIG)))  # no pool: ignored
    head, payload = encode_parts(packet(seq=3, data=BIG))
    decoder.receive_data(head)
    assert decoder.next_event() is None
    buf = decoder.receive_buffer()
    assert buf.obj is first.data or buf.obj is second.data
    buf[:] = payload
    decoder.received(len(payload))
    assert decoder.next_event() == packet(seq=3, data=BIG)


def test_release_buffers_forgets_the_pool() -> None:
    decoder = SmallDirect(pool_bytes=1 << 20)
    (first,) = decode_chunks([encode(packet(data=BIG))], decoder)
    assert isinstance(first, Packet)
    decoder.recycle(first.data)
    decoder.release_buffers()
    head, payload = encode_parts(packet(seq=1, data=BIG))
    decoder.receive_data(head)
    assert decoder.next_event() is None
    assert all(o is not first.data for o in fill(decoder, payload))
    assert decoder.next_event() == packet(seq=1, data=BIG)


def test_received_misuse_is_a_local_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(LocalProtocolError, match="without a buffer") as info:
        decoder.received(1)
    assert info.value.code is ErrorCode.BAD_STATE
    buf = decoder.receive_buffer()
    with pytest.raises(LocalProtocolError, match="without a buffer"):
        decoder.received(len(buf) + 1)
    decoder.receive_buffer()
    decoder.received(0)  # EOF
    with pytest.raises(LocalProtocolError, match="after EOF") as info:
        decoder.receive_buffer()
    assert info.value.code is ErrorCode.BAD_STATE
    assert decoder.next_event() == ConnectionClosed()


def test_receive_into_truncated_payload_then_eof() -> None:
    data = encode(packet(data=BIG))[:-10]
    with pytest.raises(RemoteProtocolError, match="closed mid-frame") as info:
        receive_into(SmallDirect(), data, 500)
    assert info.value.code is ErrorCode.PROTOCOL


def test_oversized_payload_refused_before_any_buffer() -> None:
    decoder = SmallDirect(max_payload_size=1000)
    decoder.receive_data(FRAME_HEADER.pack(MAGIC, 10, 10**6))
    with pytest.raises(RemoteProtocolError, match="payload_len") as info:
        decoder.next_event()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(RemoteProtocolError, match="already failed"):
        decoder.receive_buffer()


def test_connection_receive_buffer_and_recycle() -> None:
    relay = Connection(R, pool_bytes=1 << 20)
    data = encode(Hello(1, "board-7"))
    buf = relay.receive_buffer()
    buf[: len(data)] = data
    relay.received(len(data))
    assert relay.next_event() == Hello(1, "board-7")
    relay.send(Welcome(1))
    relay.receive_data(encode(SessionDecl(1, "s", "20261129T101500", False)) + encode(StreamDecl(1, 1, TRACE, "c", 0)))
    assert relay.next_event() is not None and relay.next_event() is not None
    big = bytes(FrameDecoder.DIRECT_PAYLOAD_MIN)
    head, payload = encode_parts(packet(data=big))
    relay.receive_data(head)
    assert relay.next_event() is None and relay.bytes_needed == len(payload)
    buf = relay.receive_buffer()
    buf[:] = payload
    relay.received(len(payload))
    event = relay.next_event()
    assert isinstance(event, Packet) and event.data == big
    relay.recycle(event.data)
    relay.receive_data(b"garbage-garbage!")
    with pytest.raises(RemoteProtocolError):
        relay.next_event()
    with pytest.raises(RemoteProtocolError, match="already failed"):
        relay.receive_buffer()
    with pytest.raises(RemoteProtocolError, match="already failed"):
        relay.received(0)


@given(st.binary(max_size=300), st.integers(1, 64))
def test_random_bytes_through_receive_buffer_only_raise_remote_errors(data: bytes, chunk: int) -> None:
    decoder = SmallDirect(max_header_size=1024, max_payload_size=1024)
    try:
        receive_into(decoder, data, chunk)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


@given(st.lists(_messages, min_size=1, max_size=5), st.integers(1, 50))
def test_random_messages_roundtrip_through_receive_buffer(msgs: list[Message], chunk: int) -> None:
    data = b"".join(encode(m) for m in msgs)
    assert receive_into(SmallDirect(), data, chunk) == [*msgs, ConnectionClosed()]


# --------------------------------------------------------------------------
# Layering
# --------------------------------------------------------------------------

FORBIDDEN_IMPORTS = {"trio", "socket", "time", "click", "asyncio", "selectors"}


def test_core_imports_no_io() -> None:
    source = Path(wire.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported, "parsed no imports at all?"
    assert not imported & FORBIDDEN_IMPORTS
    assert "cbor2" in imported and "zstandard" in imported


# --------------------------------------------------------------------------
# Trace chunks (rotation, protocol 2)
# --------------------------------------------------------------------------


def test_chunk_close_on_protocol_2() -> None:
    p = ConnectionPair()
    p.send(C, Hello(2, "board-7"))
    p.send(R, Welcome(2))
    p.send(C, SessionDecl(1, "s", "20261129T101500", False))
    p.send(C, StreamDecl(10, 1, "active-chunk-1/" + TRACE, "channel0", 0))
    p.send(C, StreamClose(10))
    p.send(C, ChunkClose(1, "active-chunk-1", "archives/a-b-1"))
    p.send(R, ChunkClosed(1, "archives/a-b-1"))
    p.expect(ConnState.ESTABLISHED)


def test_chunk_close_refused_on_protocol_1() -> None:
    p = ConnectionPair().established()  # Hello(1)
    with pytest.raises(LocalProtocolError, match="needs protocol 2") as info:
        p.conn[C].send(ChunkClose(1, "ust", "archives/a-b-0/ust"))
    assert info.value.code is ErrorCode.BAD_STATE
    relay = Connection(R)
    relay.receive_data(Connection(C).send(Hello(1, "h")))
    assert relay.next_event() == Hello(1, "h")
    relay.send(Welcome(1))
    relay.receive_data(encode(SessionDecl(1, "s", "20261129T101500", False)) + encode(ChunkClose(1, "a", "b")))
    relay.next_event()
    with pytest.raises(RemoteProtocolError, match="needs protocol 2") as rinfo:
        relay.next_event()
    assert rinfo.value.code is ErrorCode.BAD_STATE


def test_chunk_close_needs_an_open_session() -> None:
    p = ConnectionPair()
    p.send(C, Hello(2, "board-7"))
    p.send(R, Welcome(2))
    with pytest.raises(LocalProtocolError, match="not open") as info:
        p.conn[C].send(ChunkClose(5, "ust", "archives/x/ust"))
    assert info.value.code is ErrorCode.PROTOCOL


@pytest.mark.parametrize("path", ["", "/abs", "a/../b", "a//b", "a\x00b"])
def test_chunk_close_checks_its_paths(path: str) -> None:
    with pytest.raises(LocalProtocolError):
        ChunkClose(1, path, "archives/x")
    with pytest.raises(LocalProtocolError):
        ChunkClose(1, "ust", path)
    with pytest.raises(LocalProtocolError):
        ChunkClosed(1, path)
