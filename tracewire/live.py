"""The LTTng live viewer protocol (the subset babeltrace2 2.0 uses), sans-I/O.

Public API: the Command and status enums, the request and reply dataclasses,
encode_request / encode_reply, RequestDecoder (the relay's side) and
ReplyDecoder (a viewer's side), LiveProtocolError and its code.

Theory of operation
===================

Every request is a 16-byte header ``{u64 data_size; u32 cmd; u32 version}``
followed by the command's fixed-size payload; every reply is the command's
own layout, without a header (so a reply can only be parsed by the side that
knows which command it answers).  All integers are big-endian, structures
packed, strings NUL-padded in fixed-size fields.  docs/protocol.md, "Live
viewing", lists the layouts.

RequestDecoder (relay side) buffers what it is given (``receive_data``, at
most one request's worth beyond what has been parsed: ``max_request``) and
``next_event`` returns a request, None when it needs more bytes, or
``Closed`` at EOF.  The header is checked as soon as it is complete: an
unknown command, a version other than 0, or a ``data_size`` that is neither
0 nor the command's payload size is refused before any payload is awaited,
so a hostile viewer can make the relay hold a few dozen bytes at most.  After
an error the decoder refuses everything (state ERROR).

ReplyDecoder (viewer side) is told which command's reply comes next
(``expect``); it checks every count and length against its limits before
waiting for the bytes they announce.

The module never imports an I/O framework nor reads a clock.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Final

__all__ = [
    "ATTACH_STREAM_SIZE",
    "HEADER",
    "SESSION_ENTRY_SIZE",
    "AttachSession",
    "AttachStatus",
    "Closed",
    "Command",
    "Connect",
    "ConnectReply",
    "CreateSession",
    "CreateSessionStatus",
    "DetachSession",
    "DetachStatus",
    "GetMetadata",
    "GetNewStreams",
    "GetNextIndex",
    "GetPacket",
    "IndexFlag",
    "IndexReply",
    "IndexStatus",
    "ListSessions",
    "LiveErrorCode",
    "LiveProtocolError",
    "MetadataReply",
    "MetadataStatus",
    "NewStreamsStatus",
    "PacketReply",
    "PacketStatus",
    "ReplyDecoder",
    "Request",
    "RequestDecoder",
    "SessionInfo",
    "SessionsReply",
    "StatusReply",
    "StreamInfo",
    "StreamsReply",
    "encode_reply",
    "encode_request",
]

MAJOR: Final = 2
MINOR: Final = 4
VIEWER_CLIENT_COMMAND: Final = 1
ANY_SESSION: Final = 2**64 - 1  # CONNECT's viewer_session_id before one is given

HEADER: Final = struct.Struct(">QII")
_CONNECT = struct.Struct(">QIII")
_ATTACH_REQ = struct.Struct(">QQI")
_ID = struct.Struct(">Q")
_PACKET_REQ = struct.Struct(">QQI")
_U32 = struct.Struct(">I")
_U32X2 = struct.Struct(">II")
_U32X3 = struct.Struct(">III")
_SESSION = struct.Struct(">QIII64s255s")
_STREAM = struct.Struct(">QQI4096s255s")
_INDEX = struct.Struct(">QQQQQQQII")
_METADATA = struct.Struct(">QI")
SESSION_ENTRY_SIZE: Final = _SESSION.size  # 339
ATTACH_STREAM_SIZE: Final = _STREAM.size  # 4371
HOSTNAME_FIELD: Final = 64
SESSION_NAME_FIELD: Final = 255
PATH_FIELD: Final = 4096
CHANNEL_FIELD: Final = 255
_U64_MAX: Final = 2**64 - 1
_U32_MAX: Final = 2**32 - 1


class Command(enum.IntEnum):
    CONNECT = 1
    LIST_SESSIONS = 2
    ATTACH_SESSION = 3
    GET_NEXT_INDEX = 4
    GET_PACKET = 5
    GET_METADATA = 6
    GET_NEW_STREAMS = 7
    CREATE_SESSION = 8
    DETACH_SESSION = 9


class AttachStatus(enum.IntEnum):
    OK = 1
    ALREADY = 2
    UNKNOWN = 3
    NOT_LIVE = 4
    SEEK_ERROR = 5
    NO_SESSION = 6


class NewStreamsStatus(enum.IntEnum):
    OK = 1
    NO_NEW = 2
    ERROR = 3
    HUP = 4


class MetadataStatus(enum.IntEnum):
    OK = 1
    NO_NEW = 2
    ERROR = 3


class IndexStatus(enum.IntEnum):
    OK = 1
    RETRY = 2
    HUP = 3
    ERROR = 4
    INACTIVE = 5
    EOF = 6


class IndexFlag(enum.IntFlag):
    NONE = 0
    NEW_METADATA = 1
    NEW_STREAM = 2


class PacketStatus(enum.IntEnum):
    OK = 1
    RETRY = 2
    ERROR = 3
    EOF = 4


class DetachStatus(enum.IntEnum):
    OK = 1
    UNKNOWN = 2
    ERROR = 3


class CreateSessionStatus(enum.IntEnum):
    OK = 1
    ERROR = 2


class LiveErrorCode(enum.Enum):
    BAD_COMMAND = "bad-command"  # unknown command or version
    BAD_SIZE = "bad-size"  # a size or count past the limits, or not the command's
    BAD_STATE = "bad-state"  # out of order (a command before CONNECT...)
    BAD_VALUE = "bad-value"  # a field out of range, a status unknown


class LiveProtocolError(Exception):
    """The peer sent bytes the live protocol does not allow (or, raised by
    an encoder, our side tried to).

    Attributes:
        code: what kind of fault (LiveErrorCode).
        message: what was expected and what came.
    """

    def __init__(self, code: LiveErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _bad(code: LiveErrorCode, text: str) -> LiveProtocolError:
    return LiveProtocolError(code, text)


def _check_u(value: int, bits: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise _bad(LiveErrorCode.BAD_VALUE, f"{what} must be an unsigned {bits}-bit integer, got {value!r}")


def _field(text: str, size: int, what: str) -> bytes:
    """``text`` as a NUL-terminated field of ``size`` bytes (cut to fit)."""
    raw = text.encode("utf-8", "replace")[: size - 1]
    if b"\0" in raw:
        raise _bad(LiveErrorCode.BAD_VALUE, f"{what} holds a NUL byte")
    return raw


def _unfield(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


# --------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    viewer_session_id: int = ANY_SESSION
    major: int = MAJOR
    minor: int = MINOR
    type: int = VIEWER_CLIENT_COMMAND
    command: ClassVar[Command] = Command.CONNECT

    def __post_init__(self) -> None:
        _check_u(self.viewer_session_id, 64, "viewer_session_id")
        for name in ("major", "minor", "type"):
            _check_u(getattr(self, name), 32, name)

    def payload(self) -> bytes:
        return _CONNECT.pack(self.viewer_session_id, self.major, self.minor, self.type)


@dataclass(frozen=True, slots=True)
class ListSessions:
    command: ClassVar[Command] = Command.LIST_SESSIONS

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class CreateSession:
    command: ClassVar[Command] = Command.CREATE_SESSION

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class AttachSession:
    session_id: int
    offset: int = 0
    seek: int = 2  # 1: the beginning, 2: the last (babeltrace2 2.0 always asks 2)
    command: ClassVar[Command] = Command.ATTACH_SESSION

    def __post_init__(self) -> None:
        _check_u(self.session_id, 64, "session_id")
        _check_u(self.offset, 64, "offset")
        _check_u(self.seek, 32, "seek")

    def payload(self) -> bytes:
        return _ATTACH_REQ.pack(self.session_id, self.offset, self.seek)


@dataclass(frozen=True, slots=True)
class _IdRequest:
    """A request whose payload is one u64 id."""

    def __post_init__(self) -> None:
        _check_u(self._id(), 64, "id")

    def _id(self) -> int:
        raise NotImplementedError

    def payload(self) -> bytes:
        return _ID.pack(self._id())


@dataclass(frozen=True, slots=True)
class GetNewStreams(_IdRequest):
    session_id: int
    command: ClassVar[Command] = Command.GET_NEW_STREAMS

    def _id(self) -> int:
        return self.session_id


@dataclass(frozen=True, slots=True)
class DetachSession(_IdRequest):
    session_id: int
    command: ClassVar[Command] = Command.DETACH_SESSION

    def _id(self) -> int:
        return self.session_id


@dataclass(frozen=True, slots=True)
class GetMetadata(_IdRequest):
    stream_id: int
    command: ClassVar[Command] = Command.GET_METADATA

    def _id(self) -> int:
        return self.stream_id


@dataclass(frozen=True, slots=True)
class GetNextIndex(_IdRequest):
    stream_id: int
    command: ClassVar[Command] = Command.GET_NEXT_INDEX

    def _id(self) -> int:
        return self.stream_id


@dataclass(frozen=True, slots=True)
class GetPacket:
    stream_id: int
    offset: int  # bytes into the stream file
    length: int
    command: ClassVar[Command] = Command.GET_PACKET

    def __post_init__(self) -> None:
        _check_u(self.stream_id, 64, "stream_id")
        _check_u(self.offset, 64, "offset")
        _check_u(self.length, 32, "length")

    def payload(self) -> bytes:
        return _PACKET_REQ.pack(self.stream_id, self.offset, self.length)


Request = (Connect | ListSessions | CreateSession | AttachSession | GetNewStreams | DetachSession
           | GetMetadata | GetNextIndex | GetPacket)


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed the connection between two requests."""


_PAYLOAD_SIZE: Final[dict[Command, int]] = {
    Command.CONNECT: _CONNECT.size,
    Command.LIST_SESSIONS: 0,
    Command.CREATE_SESSION: 0,
    Command.ATTACH_SESSION: _ATTACH_REQ.size,
    Command.GET_NEW_STREAMS: _ID.size,
    Command.DETACH_SESSION: _ID.size,
    Command.GET_METADATA: _ID.size,
    Command.GET_NEXT_INDEX: _ID.size,
    Command.GET_PACKET: _PACKET_REQ.size,
}
MAX_REQUEST_SIZE: Final = HEADER.size + max(_PAYLOAD_SIZE.values())


def encode_request(req: Request) -> bytes:
    """The bytes of one request: header and payload."""
    payload = req.payload()
    return HEADER.pack(len(payload), int(req.command), 0) + payload


def _decode_request(cmd: Command, body: bytes) -> Request:
    match cmd:
        case Command.CONNECT:
            return Connect(*_CONNECT.unpack(body))
        case Command.LIST_SESSIONS:
            return ListSessions()
        case Command.CREATE_SESSION:
            return CreateSession()
        case Command.ATTACH_SESSION:
            return AttachSession(*_ATTACH_REQ.unpack(body))
        case Command.GET_NEW_STREAMS:
            return GetNewStreams(*_ID.unpack(body))
        case Command.DETACH_SESSION:
            return DetachSession(*_ID.unpack(body))
        case Command.GET_METADATA:
            return GetMetadata(*_ID.unpack(body))
        case Command.GET_NEXT_INDEX:
            return GetNextIndex(*_ID.unpack(body))
        case Command.GET_PACKET:
            return GetPacket(*_PACKET_REQ.unpack(body))


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


class RequestDecoder:
    """The relay's side: bytes in, requests out.

    Args:
        max_buffer: bytes buffered at most beyond what was parsed (a viewer
            sending faster than it is answered is refused past it).
    """

    def __init__(self, max_buffer: int = 4096) -> None:
        if max_buffer < MAX_REQUEST_SIZE:
            raise ValueError(f"max_buffer must be at least {MAX_REQUEST_SIZE}")
        self.max_buffer = max_buffer
        self._buf = bytearray()
        self._eof = False
        self._state = _State.OPEN

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Buffers ``data``; b"" means EOF.

        Raises:
            LiveProtocolError: (BAD_STATE) after EOF or an error; (BAD_SIZE)
                past ``max_buffer`` bytes not parsed yet.
        """
        if self._state is not _State.OPEN or self._eof:
            raise _bad(LiveErrorCode.BAD_STATE, f"bytes received in state {self._state.value}"
                       f"{' after EOF' if self._eof else ''}")
        if not data:
            self._eof = True
            return
        if len(self._buf) + len(data) > self.max_buffer:
            self._state = _State.ERROR
            raise _bad(LiveErrorCode.BAD_SIZE, f"more than {self.max_buffer} bytes of requests unanswered")
        self._buf += data

    def next_event(self) -> Request | Closed | None:
        """The next request, Closed at EOF, or None until more bytes come.

        Raises:
            LiveProtocolError: (BAD_COMMAND) an unknown command or version;
                (BAD_SIZE) a data_size that is not the command's; (BAD_STATE)
                EOF inside a request, or called after an error.
        """
        if self._state is _State.ERROR:
            raise _bad(LiveErrorCode.BAD_STATE, "the connection already failed")
        if self._state is _State.CLOSED:
            return Closed()
        buf = self._buf
        if len(buf) >= HEADER.size:
            try:
                req = self._parse(buf)
            except LiveProtocolError:
                self._state = _State.ERROR
                raise
            if req is not None:
                return req
        if self._eof:
            if buf:
                self._state = _State.ERROR
                raise _bad(LiveErrorCode.BAD_STATE, f"connection closed inside a request ({len(buf)} bytes)")
            self._state = _State.CLOSED
            return Closed()
        return None

    def _parse(self, buf: bytearray) -> Request | None:
        data_size, cmd_value, version = HEADER.unpack_from(buf)
        try:
            cmd = Command(cmd_value)
        except ValueError:
            raise _bad(LiveErrorCode.BAD_COMMAND, f"unknown command {cmd_value}") from None
        if version != 0:
            raise _bad(LiveErrorCode.BAD_COMMAND, f"{cmd.name}: command version {version}, expected 0")
        size = _PAYLOAD_SIZE[cmd]
        if data_size not in (0, size):
            raise _bad(LiveErrorCode.BAD_SIZE, f"{cmd.name}: data_size {data_size}, expected {size}")
        end = HEADER.size + size
        if len(buf) < end:
            return None
        body = bytes(buf[HEADER.size:end])
        del buf[:end]
        return _decode_request(cmd, body)


# --------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectReply:
    viewer_session_id: int
    major: int = MAJOR
    minor: int = MINOR
    type: int = VIEWER_CLIENT_COMMAND
    command: ClassVar[Command] = Command.CONNECT

    def encode(self) -> bytes:
        return _CONNECT.pack(self.viewer_session_id, self.major, self.minor, self.type)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: int
    live_timer_us: int
    clients: int
    streams: int
    hostname: str
    name: str


@dataclass(frozen=True, slots=True)
class SessionsReply:
    sessions: tuple[SessionInfo, ...]
    command: ClassVar[Command] = Command.LIST_SESSIONS

    def encode(self) -> bytes:
        parts = [_U32.pack(len(self.sessions))]
        for s in self.sessions:
            parts.append(_SESSION.pack(
                s.session_id, min(s.live_timer_us, _U32_MAX), min(s.clients, _U32_MAX), min(s.streams, _U32_MAX),
                _field(s.hostname, HOSTNAME_FIELD, "hostname"), _field(s.name, SESSION_NAME_FIELD, "session name"),
            ))
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class StatusReply:
    """A reply that is one u32 status (CREATE_SESSION, DETACH_SESSION)."""

    status: int
    command: Command = Command.CREATE_SESSION

    def encode(self) -> bytes:
        return _U32.pack(self.status)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    stream_id: int
    ctf_trace_id: int
    metadata: bool
    path: str  # the trace's directory, relative
    channel: str  # the stream file's name, "metadata" for a metadata stream


@dataclass(frozen=True, slots=True)
class StreamsReply:
    """ATTACH_SESSION's and GET_NEW_STREAMS's reply."""

    status: int
    streams: tuple[StreamInfo, ...] = ()
    command: Command = Command.GET_NEW_STREAMS

    def encode(self) -> bytes:
        parts = [_U32X2.pack(self.status, len(self.streams))]
        for s in self.streams:
            parts.append(_STREAM.pack(s.stream_id, s.ctf_trace_id, 1 if s.metadata else 0,
                                      _field(s.path, PATH_FIELD, "path"), _field(s.channel, CHANNEL_FIELD, "channel")))
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class MetadataReply:
    status: MetadataStatus
    data: bytes = b""
    command: ClassVar[Command] = Command.GET_METADATA

    def __post_init__(self) -> None:
        if self.status is MetadataStatus.OK and not self.data:
            raise _bad(LiveErrorCode.BAD_VALUE, "an OK metadata reply carries bytes (babeltrace2 2.0 fails on 0)")
        if self.status is not MetadataStatus.OK and self.data:
            raise _bad(LiveErrorCode.BAD_VALUE, f"a {self.status.name} metadata reply carries no bytes")

    def encode(self) -> bytes:
        return _METADATA.pack(len(self.data), int(self.status)) + self.data


@dataclass(frozen=True, slots=True)
class IndexReply:
    status: IndexStatus
    offset: int = 0
    packet_size: int = 0  # bits
    content_size: int = 0  # bits
    ts_begin: int = 0
    ts_end: int = 0
    events_discarded: int = 0
    stream_id: int = 0  # the CTF stream class
    flags: IndexFlag = IndexFlag.NONE
    command: ClassVar[Command] = Command.GET_NEXT_INDEX

    def __post_init__(self) -> None:
        for name in ("offset", "packet_size", "content_size", "ts_begin", "ts_end", "events_discarded",
                     "stream_id"):
            _check_u(getattr(self, name), 64, name)

    def encode(self) -> bytes:
        return _INDEX.pack(self.offset, self.packet_size, self.content_size, self.ts_begin, self.ts_end,
                           self.events_discarded, self.stream_id, int(self.status), int(self.flags))


@dataclass(frozen=True, slots=True)
class PacketReply:
    status: PacketStatus
    data: bytes = b""
    flags: int = 0
    command: ClassVar[Command] = Command.GET_PACKET

    def __post_init__(self) -> None:
        if self.status is not PacketStatus.OK and self.data:
            raise _bad(LiveErrorCode.BAD_VALUE, f"a {self.status.name} packet reply carries no bytes")

    def encode(self) -> bytes:
        return _U32X3.pack(int(self.status), len(self.data), self.flags) + self.data


Reply = ConnectReply | SessionsReply | StatusReply | StreamsReply | MetadataReply | IndexReply | PacketReply


def encode_reply(reply: Reply) -> bytes:
    """The bytes of one reply (sent in one write: babeltrace2 reads whole replies)."""
    return reply.encode()


class ReplyDecoder:
    """A viewer's side: the reply to the request sent last.

    Args:
        max_sessions: sessions accepted in a LIST_SESSIONS reply.
        max_streams: streams accepted in one ATTACH / GET_NEW_STREAMS reply.
        max_data: bytes accepted in one metadata or packet reply.
    """

    def __init__(self, max_sessions: int = 100_000, max_streams: int = 100_000,
                 max_data: int = 64 * 1024 * 1024) -> None:
        self.max_sessions = max_sessions
        self.max_streams = max_streams
        self.max_data = max_data
        self._buf = bytearray()
        self._expect: Command | None = None
        self._eof = False

    def expect(self, command: Command) -> None:
        """The next reply answers ``command``."""
        self._expect = command

    def receive_data(self, data: bytes) -> None:
        """Buffers ``data``; b"" means EOF."""
        if not data:
            self._eof = True
        self._buf += data

    def next_event(self) -> Reply | Closed | None:
        """The reply, Closed at EOF between replies, or None until more bytes come.

        Raises:
            LiveProtocolError: (BAD_STATE) no reply is expected, or EOF inside
                one; (BAD_SIZE) a count or length past the limits;
                (BAD_VALUE) an unknown status.
        """
        if self._expect is None:
            if self._buf:
                raise _bad(LiveErrorCode.BAD_STATE, f"{len(self._buf)} bytes arrived with no request pending")
            return Closed() if self._eof else None
        reply = self._parse(self._expect)
        if reply is not None:
            self._expect = None
            return reply
        if self._eof:
            if not self._buf:
                return Closed()
            raise _bad(LiveErrorCode.BAD_STATE, f"connection closed inside the reply to {self._expect.name}")
        return None

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _status(self, kind: type[enum.IntEnum], value: int) -> int:
        try:
            return kind(value)
        except ValueError:
            raise _bad(LiveErrorCode.BAD_VALUE, f"unknown {kind.__name__} {value}") from None

    def _parse(self, cmd: Command) -> Reply | None:
        buf = self._buf
        match cmd:
            case Command.CONNECT:
                raw = self._take(_CONNECT.size)
                return None if raw is None else ConnectReply(*_CONNECT.unpack(raw))
            case Command.CREATE_SESSION | Command.DETACH_SESSION:
                raw = self._take(_U32.size)
                return None if raw is None else StatusReply(_U32.unpack(raw)[0], cmd)
            case Command.LIST_SESSIONS:
                if len(buf) < _U32.size:
                    return None
                (n,) = _U32.unpack_from(buf)
                if n > self.max_sessions:
                    raise _bad(LiveErrorCode.BAD_SIZE, f"{n} sessions listed, at most {self.max_sessions} accepted")
                raw = self._take(_U32.size + n * _SESSION.size)
                if raw is None:
                    return None
                sessions = []
                for i in range(n):
                    sid, timer, clients, streams, host, name = _SESSION.unpack_from(raw, _U32.size + i * _SESSION.size)
                    sessions.append(SessionInfo(sid, timer, clients, streams, _unfield(host), _unfield(name)))
                return SessionsReply(tuple(sessions))
            case Command.ATTACH_SESSION | Command.GET_NEW_STREAMS:
                if len(buf) < _U32X2.size:
                    return None
                status, n = _U32X2.unpack_from(buf)
                self._status(AttachStatus if cmd is Command.ATTACH_SESSION else NewStreamsStatus, status)
                if n > self.max_streams:
                    raise _bad(LiveErrorCode.BAD_SIZE, f"{n} streams announced, at most {self.max_streams} accepted")
                raw = self._take(_U32X2.size + n * _STREAM.size)
                if raw is None:
                    return None
                streams = []
                for i in range(n):
                    sid, trace_id, meta, path, channel = _STREAM.unpack_from(raw, _U32X2.size + i * _STREAM.size)
                    streams.append(StreamInfo(sid, trace_id, bool(meta), _unfield(path), _unfield(channel)))
                return StreamsReply(status, tuple(streams), cmd)
            case Command.GET_METADATA:
                if len(buf) < _METADATA.size:
                    return None
                length, status = _METADATA.unpack_from(buf)
                st = MetadataStatus(self._status(MetadataStatus, status))
                if length > self.max_data:
                    raise _bad(LiveErrorCode.BAD_SIZE, f"{length} bytes of metadata, at most {self.max_data}")
                raw = self._take(_METADATA.size + length)
                if raw is None:
                    return None
                if (st is MetadataStatus.OK) != (length > 0):
                    raise _bad(LiveErrorCode.BAD_VALUE, f"metadata reply {st.name} with {length} bytes")
                return MetadataReply(st, raw[_METADATA.size:])
            case Command.GET_NEXT_INDEX:
                raw = self._take(_INDEX.size)
                if raw is None:
                    return None
                offset, psize, csize, begin, end, discarded, class_id, status, flags = _INDEX.unpack(raw)
                return IndexReply(IndexStatus(self._status(IndexStatus, status)), offset, psize, csize, begin, end,
                                  discarded, class_id, IndexFlag(flags & 3))
            case Command.GET_PACKET:
                if len(buf) < _U32X3.size:
                    return None
                status, length, flags = _U32X3.unpack_from(buf)
                pst = PacketStatus(self._status(PacketStatus, status))
                if pst is not PacketStatus.OK:
                    length = 0  # never a payload but with OK
                if length > self.max_data:
                    raise _bad(LiveErrorCode.BAD_SIZE, f"{length} bytes of packet, at most {self.max_data}")
                raw = self._take(_U32X3.size + length)
                if raw is None:
                    return None
                return PacketReply(pst, raw[_U32X3.size:], flags)
        raise _bad(LiveErrorCode.BAD_STATE, f"no reply format for {cmd!r}")  # pragma: no cover
