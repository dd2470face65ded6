"""tracewire.live: the LTTng live viewer protocol codec (sans-I/O)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from tracewire import live
from tracewire.live import (
    AttachSession,
    AttachStatus,
    Closed,
    Command,
    Connect,
    ConnectReply,
    CreateSession,
    DetachSession,
    GetMetadata,
    GetNewStreams,
    GetNextIndex,
    GetPacket,
    IndexFlag,
    IndexReply,
    IndexStatus,
    ListSessions,
    LiveErrorCode,
    LiveProtocolError,
    MetadataReply,
    MetadataStatus,
    NewStreamsStatus,
    PacketReply,
    PacketStatus,
    ReplyDecoder,
    RequestDecoder,
    SessionInfo,
    SessionsReply,
    StatusReply,
    StreamInfo,
    StreamsReply,
    encode_reply,
    encode_request,
)

REQUESTS = [
    Connect(),
    Connect(7, 2, 4, 1),
    ListSessions(),
    CreateSession(),
    AttachSession(3, 0, 2),
    GetNewStreams(3),
    DetachSession(2**64 - 1),
    GetMetadata(5),
    GetNextIndex(6),
    GetPacket(6, 2**40, 256 * 1024),
]


def _decode_all(dec: RequestDecoder) -> list[object]:
    out = []
    while (ev := dec.next_event()) is not None:
        out.append(ev)
        if isinstance(ev, Closed):
            break
    return out


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: type(r).__name__)
def test_request_round_trip_whole_bytewise_and_with_trailing_data(req):
    data = encode_request(req)
    assert len(data) == 16 + struct.unpack(">Q", data[:8])[0]
    dec = RequestDecoder()
    dec.receive_data(data)
    assert dec.next_event() == req
    assert dec.next_event() is None
    dec = RequestDecoder()
    got = []
    for b in data:
        assert not got
        dec.receive_data(bytes([b]))
        got += _decode_all(dec)
    assert got == [req]
    dec = RequestDecoder()
    dec.receive_data(data + encode_request(ListSessions()) + data[:5])
    assert _decode_all(dec) == [req, ListSessions()]
    dec.receive_data(data[5:])
    dec.receive_data(b"")
    assert _decode_all(dec) == [req, Closed()]


def test_babeltrace2_header_layout():
    # CONNECT as babeltrace2 2.0 sends it: data_size 20, cmd 1, version 0.
    assert encode_request(Connect()) == (struct.pack(">QII", 20, 1, 0) + struct.pack(">QIII", 2**64 - 1, 2, 4, 1))
    assert encode_request(ListSessions()) == struct.pack(">QII", 0, 2, 0)
    # A payload-carrying command may also say data_size 0.
    dec = RequestDecoder()
    dec.receive_data(struct.pack(">QII", 0, 4, 0) + struct.pack(">Q", 9))
    assert dec.next_event() == GetNextIndex(9)


@pytest.mark.parametrize(("data", "code", "match"), [
    (struct.pack(">QII", 0, 99, 0), LiveErrorCode.BAD_COMMAND, "unknown command 99"),
    (struct.pack(">QII", 0, 0, 0), LiveErrorCode.BAD_COMMAND, "unknown command 0"),
    (struct.pack(">QII", 8, 4, 1), LiveErrorCode.BAD_COMMAND, "GET_NEXT_INDEX: command version 1"),
    (struct.pack(">QII", 2**40, 1, 0), LiveErrorCode.BAD_SIZE, "CONNECT: data_size 1099511627776, expected 20"),
    (struct.pack(">QII", 7, 4, 0), LiveErrorCode.BAD_SIZE, "expected 8"),
])
def test_bad_headers_are_refused_before_any_payload(data, code, match):
    dec = RequestDecoder()
    dec.receive_data(data)
    with pytest.raises(LiveProtocolError, match=match) as exc:
        dec.next_event()
    assert exc.value.code is code
    with pytest.raises(LiveProtocolError, match="already failed") as exc:
        dec.next_event()
    assert exc.value.code is LiveErrorCode.BAD_STATE


def test_eof_inside_a_request_and_too_many_unanswered_bytes():
    dec = RequestDecoder()
    dec.receive_data(encode_request(GetMetadata(1))[:10])
    dec.receive_data(b"")
    with pytest.raises(LiveProtocolError, match="closed inside a request") as exc:
        dec.next_event()
    assert exc.value.code is LiveErrorCode.BAD_STATE
    dec = RequestDecoder(max_buffer=64)
    dec.receive_data(b"\0" * 64)
    with pytest.raises(LiveProtocolError, match="more than 64 bytes") as exc:
        dec.receive_data(b"\0")
    assert exc.value.code is LiveErrorCode.BAD_SIZE
    with pytest.raises(ValueError):
        RequestDecoder(max_buffer=8)


@given(hs.binary(max_size=200))
def test_any_bytes_give_requests_or_a_typed_error(data):
    dec = RequestDecoder(max_buffer=256)
    if data:
        dec.receive_data(data)
    dec.receive_data(b"")
    try:
        events = _decode_all(dec)
    except LiveProtocolError as exc:
        assert isinstance(exc.code, LiveErrorCode)
    else:
        assert events[-1] == Closed()


REPLIES = [
    (Command.CONNECT, ConnectReply(12)),
    (Command.CREATE_SESSION, StatusReply(1, Command.CREATE_SESSION)),
    (Command.DETACH_SESSION, StatusReply(2, Command.DETACH_SESSION)),
    (Command.LIST_SESSIONS, SessionsReply(())),
    (Command.LIST_SESSIONS, SessionsReply((SessionInfo(1, 100000, 0, 2, "tgt1", "s1"),
                                           SessionInfo(2**64 - 1, 1, 3, 0, "h" * 63, "n" * 254)))),
    (Command.ATTACH_SESSION, StreamsReply(AttachStatus.OK, (
        StreamInfo(1, 1, True, "tgt1/s1-x/ust/pid/a-1-x", "metadata"),
        StreamInfo(2, 1, False, "tgt1/s1-x/ust/pid/a-1-x", "channel0_0")), Command.ATTACH_SESSION)),
    (Command.GET_NEW_STREAMS, StreamsReply(NewStreamsStatus.HUP)),
    (Command.GET_METADATA, MetadataReply(MetadataStatus.OK, b"/* CTF 1.8 */\n")),
    (Command.GET_METADATA, MetadataReply(MetadataStatus.NO_NEW)),
    (Command.GET_NEXT_INDEX, IndexReply(IndexStatus.OK, 4096, 8192, 8000, 10, 20, 3, 0,
                                        IndexFlag.NEW_METADATA | IndexFlag.NEW_STREAM)),
    (Command.GET_NEXT_INDEX, IndexReply(IndexStatus.INACTIVE, ts_end=2**63, stream_id=1)),
    (Command.GET_PACKET, PacketReply(PacketStatus.OK, b"x" * 1000)),
    (Command.GET_PACKET, PacketReply(PacketStatus.ERROR)),
]


@pytest.mark.parametrize(("cmd", "reply"), REPLIES, ids=lambda x: getattr(x, "name", type(x).__name__))
def test_reply_round_trip_whole_and_bytewise(cmd, reply):
    data = encode_reply(reply)
    dec = ReplyDecoder()
    dec.expect(cmd)
    dec.receive_data(data)
    assert dec.next_event() == reply
    dec = ReplyDecoder()
    dec.expect(cmd)
    got = None
    for b in data:
        assert got is None
        dec.receive_data(bytes([b]))
        got = dec.next_event()
    assert got == reply


def test_reply_layout_sizes():
    assert live.SESSION_ENTRY_SIZE == 339 and live.ATTACH_STREAM_SIZE == 4371
    assert len(encode_reply(IndexReply(IndexStatus.RETRY))) == 64
    assert len(encode_reply(SessionsReply((SessionInfo(1, 1, 0, 0, "h", "s"),)))) == 4 + 339


def test_replies_babeltrace2_cannot_take_are_refused_at_construction():
    with pytest.raises(LiveProtocolError, match="carries bytes") as exc:
        MetadataReply(MetadataStatus.OK, b"")
    assert exc.value.code is LiveErrorCode.BAD_VALUE
    with pytest.raises(LiveProtocolError, match="carries no bytes"):
        PacketReply(PacketStatus.ERROR, b"x")
    with pytest.raises(LiveProtocolError, match="unsigned 64-bit"):
        IndexReply(IndexStatus.OK, offset=-1)


def test_hostile_replies_are_refused_before_their_bytes_come():
    dec = ReplyDecoder(max_streams=10, max_data=1000)
    dec.expect(Command.GET_NEW_STREAMS)
    dec.receive_data(struct.pack(">II", 1, 11))
    with pytest.raises(LiveProtocolError, match="11 streams announced") as exc:
        dec.next_event()
    assert exc.value.code is LiveErrorCode.BAD_SIZE
    dec = ReplyDecoder(max_data=1000)
    dec.expect(Command.GET_PACKET)
    dec.receive_data(struct.pack(">III", 1, 1001, 0))
    with pytest.raises(LiveProtocolError, match="1001 bytes of packet"):
        dec.next_event()
    dec = ReplyDecoder()
    dec.expect(Command.GET_NEXT_INDEX)
    dec.receive_data(struct.pack(">QQQQQQQII", 0, 0, 0, 0, 0, 0, 0, 42, 0))
    with pytest.raises(LiveProtocolError, match="unknown IndexStatus 42") as exc:
        dec.next_event()
    assert exc.value.code is LiveErrorCode.BAD_VALUE
    dec = ReplyDecoder()
    dec.receive_data(b"x")
    with pytest.raises(LiveProtocolError, match="no request pending"):
        dec.next_event()
