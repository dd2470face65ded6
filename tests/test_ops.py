"""The typed control plane (tracewire/ops.py): every message round-trips, and
anything malformed is a MessageError naming what is wrong, never another
exception."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracewire import consumer_ops, ops

from fuzzing import examples

REQUESTS: list[ops.Request] = [
    ops.PingRequest(),
    ops.CreateRequest(name="s1", output="/tmp/t"),
    ops.CreateRequest(name="s1", url="tws://[::1]:5342", compress=ops.Compression.NONE, compress_level=19,
                      spool_size=2 * 1024 * 1024, auth_key_file="/k", tls_ca="/ca"),
    ops.EnableChannelRequest(session="s", channel="big", subbuf_size=4096, num_subbuf=2, switch_timer_ms=100),
    ops.EnableEventRequest(pattern="demo:*", session=None, channel="c"),
    ops.StartRequest(), ops.StopRequest(session="x"), ops.StopRequest(timeout=2.5), ops.DestroyRequest(session="x"),
    ops.ListRequest(), ops.StatusRequest(session="s"), ops.ListAppsRequest(),
]
OPS: list[consumer_ops.Op] = [
    consumer_ops.HelloOp(),
    consumer_ops.SessionOp(session="s", session_id=1, created="20260101T000000", sink="/tmp/t", hostname="h",
                  uid=1000, gid=1000, spool_dir="/run/tw/spool/s"),
    consumer_ops.AddTraceOp(trace_id="1-42", session="s", path="ust/pid/app-42-x", uuid="00" * 16),
    consumer_ops.MetadataOp(trace_id="1-42", text="/* CTF 1.8 */\n" * 100, offset=4096),
    consumer_ops.AddStreamOp(key="1-c-42", trace_id="1-42", session="s", channel="c", stream_class=0,
                    subbuf_size=4096, num_subbuf=2, replay=True, gone=True),
    consumer_ops.FlushOp(session="s", timeout=3.5), consumer_ops.ProducerGoneOp(key="k"),
    consumer_ops.RemoveSessionOp(session="s"), consumer_ops.StatusOp(session="s"),
]


def _wire(msg: dict[str, Any]) -> dict[str, Any]:
    """Through JSON, as the sockets carry it."""
    return json.loads(json.dumps(msg))


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: type(r).__name__)
def test_request_round_trip(req: ops.Request) -> None:
    assert ops.decode_request(_wire(ops.encode(req))) == req


@pytest.mark.parametrize("op", OPS, ids=lambda o: type(o).__name__)
def test_op_round_trip(op: consumer_ops.Op) -> None:
    assert consumer_ops.decode_op(_wire(ops.encode(op, seq=7))) == op


def test_reply_round_trip() -> None:
    reply = consumer_ops.StreamsReply((consumer_ops.StreamStats("k", "/p", "c", packets=3, error="relay: x",
                                                                events=2**64 - 1),
                              consumer_ops.StreamStats("k2", "/p2", "c", unacked=123, unacked_bytes=4_718_592,
                                              relay=ops.RelayState.FULL, relay_why="No space left on device",
                                              ring_unread=2)))
    assert consumer_ops.decode_reply(consumer_ops.FlushOp, _wire(ops.encode(reply, seq=1))) == reply
    assert ops.encode(reply)["streams"][1]["relay"] == "full"
    err = consumer_ops.ErrorReply("no such session", internal=True)
    assert consumer_ops.decode_reply(consumer_ops.StatusOp, _wire(ops.encode(err, seq=1))) == err
    assert consumer_ops.decode_reply(consumer_ops.ProducerGoneOp, {"ok": True, "seq": 2, "released": False}) == \
        consumer_ops.ReleasedReply(False)


def test_defaults_fill_missing_and_null_fields() -> None:
    req = ops.decode_request({"cmd": "enable_channel", "subbuf_size": None})
    assert req == ops.EnableChannelRequest()
    assert (req.channel, req.subbuf_size, req.num_subbuf) == (
        ops.DEFAULT_CHANNEL, ops.DEFAULT_SUBBUF_SIZE, ops.DEFAULT_NUM_SUBBUF)
    assert ops.decode_request({"cmd": "create", "name": "x"}).spool_size == ops.DEFAULT_SPOOL_SIZE


@pytest.mark.parametrize("raw,match", [
    ({"cmd": "create", "name": "x", "output": "/tmp/x", "compress_level": "abc"},
     "'compress_level' must be an integer"),
    ({"cmd": "create", "name": "x", "compress_level": 23}, "between 1 and 22"),
    ({"cmd": "create", "name": "x", "compress": "lz4"}, "'compress' must be one of zstd, none"),
    ({"cmd": "create", "name": "x", "spool_size": 10}, "at least 1M"),
    ({"cmd": "create"}, "missing field"),
    ({"cmd": "create", "name": ["x"]}, "'name' must be a string"),
    ({"cmd": "create", "name": "x" * 5000}, "'name' must be a string of at most"),
    ({"cmd": "status", "session": {"a": 1}}, "'session' must be a string"),
    ({"cmd": "list", "session": 3}, "'session' must be a string"),
    ({"cmd": "enable_channel", "subbuf_size": "4k"}, "'subbuf_size' must be an integer"),
    ({"cmd": "enable_channel", "subbuf_size": True}, "'subbuf_size' must be an integer"),
    ({"cmd": "enable_channel", "overwrite": 1}, "'overwrite' must be true or false"),
    ({"cmd": "enable_channel", "switch_timer_ms": -1}, "switch timer"),
    ({"cmd": "enable_channel", "blocking_timeout_ms": -2}, "blocking timeout"),
    ({"cmd": "enable_channel", "blocking_timeout_ms": 2**31 + 1}, "blocking timeout"),
    ({"cmd": "enable_channel", "blocking_timeout_ms": "inf"}, "'blocking_timeout_ms' must be an integer"),
    ({"cmd": "enable_channel", "num_subbuf": 2**70}, "'num_subbuf' must be an integer"),
    ({"cmd": "enable_channel", "tracefile_count": 3}, "--tracefile-count needs --tracefile-size"),
    ({"cmd": "enable_channel", "tracefile_size": 4096}, "smaller than the sub-buffer size"),
    ({"cmd": "enable_channel", "tracefile_size": -1}, "must be >= 0"),
    ({"cmd": "enable_channel", "tracefile_size": 2**20, "tracefile_count": -1}, "must be >= 0"),
    ({"cmd": "enable_channel", "tracefile_size": "1M"}, "'tracefile_size' must be an integer"),
    ({"cmd": "enable_event", "pattern": ""}, "event pattern"),
    ({"cmd": "start", "session": "s", "extra": 1}, "unknown field 'extra'"),
    ({"cmd": "stop", "timeout": 0}, "--timeout must be more than 0"),
    ({"cmd": "stop", "timeout": "5"}, "'timeout' must be a number"),
    ({"cmd": "start", "timeout": 5}, "unknown field 'timeout'"),
    ({"cmd": "cmd_create"}, "unknown command"),
    ({"cmd": ["create"]}, "unknown command"),
    ({}, "unknown command"),
])
def test_bad_requests_are_one_line_errors(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(ops.MessageError, match=match):
        ops.decode_request(raw)


@pytest.mark.parametrize("raw,match", [
    ({"op": "add_trace", "trace_id": "t", "session": "s", "path": "p", "uuid": "zz"}, "uuid"),
    ({"op": "flush", "session": "s", "timeout": float("nan")}, "'timeout' must be a number"),
    ({"op": "flush", "session": "s", "timeout": -1}, "timeout out of range"),
    ({"op": "add_stream", "key": "k"}, "missing field"),
    ({"op": "add_stream", "key": "k", "trace_id": "t", "session": "s", "channel": "c", "stream_class": 0,
      "subbuf_size": 4096, "num_subbuf": 4, "tracefile_count": 2}, "--tracefile-count needs --tracefile-size"),
    ({"op": "metadata", "trace_id": "t", "text": "x" * (consumer_ops.MetadataOp.MAX_CHARS + 1)},
     "'text' must be a string"),
    ({"op": "metadata", "trace_id": "t", "text": "x", "offset": -1}, "offset must be >= 0"),
    ({"op": "op_hello"}, "unknown operation"),
])
def test_bad_ops_are_message_errors(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(ops.MessageError, match=match):
        consumer_ops.decode_op(raw)


def test_bad_reply_shape_is_a_message_error() -> None:
    with pytest.raises(ops.MessageError, match="'streams' must be a list"):
        consumer_ops.decode_reply(consumer_ops.StatusOp, {"ok": True, "seq": 1, "streams": 3})
    with pytest.raises(ops.MessageError, match="missing field"):
        consumer_ops.decode_reply(consumer_ops.ProducerGoneOp, {"ok": True, "seq": 1})


def test_every_message_class_is_frozen() -> None:
    for msg in [*REQUESTS, *OPS]:
        for f in dataclasses.fields(msg):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(msg, f.name, None)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_field_names = st.sampled_from(sorted({f.name for m in [*REQUESTS, *OPS] for f in dataclasses.fields(m)}))


@settings(max_examples=examples(300), deadline=None)
@given(kind=st.sampled_from(sorted({r.KIND for r in REQUESTS} | {"x"})),
       fields=st.dictionaries(_field_names | st.text(max_size=8), _json, max_size=6))
def test_any_request_decodes_or_is_a_message_error(kind: str, fields: dict[str, Any]) -> None:
    try:
        req = ops.decode_request({"cmd": kind, **fields})
    except ops.MessageError:
        return
    assert ops.decode_request(_wire(ops.encode(req))) == req


@settings(max_examples=examples(300), deadline=None)
@given(kind=st.sampled_from(sorted({o.KIND for o in OPS})),
       fields=st.dictionaries(_field_names, _json, max_size=8))
def test_any_op_decodes_or_is_a_message_error(kind: str, fields: dict[str, Any]) -> None:
    try:
        op = consumer_ops.decode_op({"op": kind, **fields})
    except ops.MessageError:
        return
    assert consumer_ops.decode_op(_wire(ops.encode(op, seq=1))) == op


def test_relay_state_words() -> None:
    """How status and stop word each state; every state has its words."""
    assert ops.RelayState.FULL.describe("No space left on device") == \
        "relay full, retrying (No space left on device)"
    assert ops.RelayState.UNREACHABLE.describe(None) == "relay unreachable, retrying"
    assert len({state.describe(None) for state in ops.RelayState}) == len(ops.RelayState)
    assert [ops.human_size(n) for n in (0, 1023, 4_718_592)] == ["0 B", "1023 B", "4.5 MiB"]
