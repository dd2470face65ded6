"""Local control framing: CLI ↔ sessiond, app ↔ sessiond, sessiond ↔ consumerd.

Every message is a JSON object (UTF-8).  JSON rather than CBOR because the
tracer decodes these messages inside the traced app, and the standard
library's json costs the app nothing extra to import (cbor2 takes ~20 ms here);
the relay's wire protocol, which carries binary payloads, is CBOR.  On stream sockets (the CLI's control socket) it is
preceded by a 4-byte big-endian length; on SOCK_SEQPACKET sockets (apps and
consumerd, which also carry file descriptors) one datagram is one message.
Sizes are bounded; anything malformed raises ``ControlError``.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

__all__ = ["close_fds", "ControlError", "MAX_CONTROL_MESSAGE", "encode_frame", "FrameReader", "dumps", "loads"]

MAX_CONTROL_MESSAGE = 4 * 1024 * 1024
_LEN = struct.Struct(">I")


def close_fds(fds: list[int]) -> None:
    """Close file descriptors that came with a message and are not kept."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class ControlError(Exception):
    """A malformed or oversized control message."""


def dumps(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def loads(body: bytes, limit: int = MAX_CONTROL_MESSAGE) -> dict[str, Any]:
    """Decode one JSON object.

    Raises:
        ControlError: oversized, malformed, or not an object.
    """
    if len(body) > limit:
        raise ControlError(f"control message of {len(body)} bytes exceeds {limit}")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ControlError(f"malformed control message: {exc}") from None
    if not isinstance(value, dict):
        raise ControlError("control message is not an object")
    return value


def encode_frame(msg: dict[str, Any]) -> bytes:
    body = dumps(msg)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Length-prefixed framing for stream sockets: ``feed`` bytes, ``next`` maps."""

    def __init__(self, limit: int = MAX_CONTROL_MESSAGE) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> dict[str, Any] | None:
        if len(self._buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self._buf, 0)
        if n > self._limit:
            raise ControlError(f"control frame of {n} bytes exceeds {self._limit}")
        if len(self._buf) < 4 + n:
            return None
        body = bytes(self._buf[4 : 4 + n])
        del self._buf[: 4 + n]
        return loads(body, self._limit)

    @property
    def pending(self) -> int:
        return len(self._buf)
