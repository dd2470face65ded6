"""sessiond's control socket against malformed requests: each gets a one-line
error, sessiond keeps serving, and a session then traces completely."""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

import pytest

from tracewire import ctf

from conftest import TW

MALFORMED: list[Any] = [
    {"cmd": "create", "name": "x", "output": "/tmp/x", "compress_level": "abc"},
    {"cmd": "create", "name": "x", "output": "/tmp/x", "spool_size": [1]},
    {"cmd": "create", "name": {"n": 1}},
    {"cmd": "enable_channel", "subbuf_size": "256k"},
    {"cmd": "enable_channel", "num_subbuf": None, "overwrite": "yes"},
    {"cmd": "status", "session": ["s"]},
    {"cmd": "list", "session": 7},
    {"cmd": "enable_event", "pattern": {"a": [1, [2, [3]]]}},
    {"cmd": "start", "session": "nope"},
    {"cmd": "__init__"},
    {"cmd": None},
    {"nested": [[[[[[[[[[{}]]]]]]]]]]},
]


def _ask(rundir: str, body: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(os.path.join(rundir, "control.sock"))
        s.sendall(struct.pack(">I", len(body)) + body)
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk = s.recv(65536)
            assert chunk, "sessiond closed the connection without answering"
            data += chunk
    return json.loads(data[4:])


def test_malformed_requests_get_one_line_errors_and_sessiond_survives(tw: TW, out_dir) -> None:
    tw.cli("create", "keep", "--output", str(out_dir))
    pid = tw.sessiond_pid()
    for req in MALFORMED:
        reply = _ask(tw.rundir, json.dumps(req).encode())
        assert reply["ok"] is False, req
        assert reply["error"] and "\n" not in reply["error"], reply
        assert "internal error" not in reply["error"], reply
    # Not JSON, or a JSON array: the connection is dropped, sessiond stays.
    for body in (b"\xff\xfe", b"[1, 2]"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(os.path.join(tw.rundir, "control.sock"))
            s.sendall(struct.pack(">I", len(body)) + body)
            assert s.recv(100) == b""
    assert tw.sessiond_pid() == pid and os.path.exists(f"/proc/{pid}")
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    tw.demo("--events", "1000")
    tw.cli("stop")
    events = [e for e in ctf.read_trace(str(out_dir)) if isinstance(e, ctf.Event)]
    assert len(events) == 1000


@pytest.mark.parametrize("field,value", [("compress_level", 0), ("spool_size", 1)])
def test_create_refuses_out_of_range_values(tw: TW, out_dir, field: str, value: int) -> None:
    tw.cli("create", "first", "--output", str(out_dir))
    reply = _ask(tw.rundir, json.dumps({"cmd": "create", "name": "x", "output": str(out_dir),
                                        field: value}).encode())
    assert reply["ok"] is False
    assert reply["error"].startswith("--")
