"""Sans-I/O core of the consumerd -> relayd wire protocol.

Bytes go in, messages come out; messages go in, bytes come out. No sockets,
no clocks, no trio: the trio adapter owns the stream and calls into this
module. docs/protocol.md describes the exact bytes on the wire.
"""

# Theory of operation
# ===================
#
# Framing.  Every message is one frame:
#
#     +-------------+-----------------+------------------+-------------+---------+
#     | magic u32be | header_len u32be| payload_len u32be| CBOR header | payload |
#     +-------------+-----------------+------------------+-------------+---------+
#
# The CBOR header is a map with short text keys; key "t" is the MessageType.
# Only Packet and Metadata carry a payload (their `data`); for every other
# message payload_len is 0.  Both lengths are checked against the receiver's
# limits as soon as the 12 fixed bytes are in, before any body byte is waited
# for, and the CBOR header is decoded and checked as soon as it is in, before
# a (possibly 16 MiB) payload is waited for.
#
# Receiving.  The decoder takes bytes either copied in (receive_data) or
# received in place: receive_buffer() lends a writable view, the caller's
# socket fills it (recv_into), received(n) commits.  Between payloads that
# view is a small scratch buffer (READ_SIZE) whose bytes are appended to the
# frame buffer; once a header announces a payload of DIRECT_PAYLOAD_MIN
# bytes or more, the view is the free part of a bytearray that becomes the
# message's `data` (payload_len bytes once complete; the length was checked
# against max_payload_size first, and the buffer starts at PAYLOAD_START
# and doubles as it fills, so memory follows what the peer really sent):
# the payload's bytes are copied once, by the kernel.  A
# caller done with such a buffer may recycle() it for a later payload of the
# same size (at most pool_bytes kept), which spares allocating and zeroing
# fresh memory per packet.  bytes_needed says how much more the frame part
# being waited for needs, so that the caller can set its socket's receive
# low-water mark and be woken once per payload rather than per segment.
#
# Messages.  Each message is a frozen, slotted dataclass that validates its
# own fields in __post_init__ and raises LocalProtocolError.  The decoder
# builds messages through the same constructors, so one set of checks guards
# both directions; it re-raises construction failures as RemoteProtocolError
# with the same ErrorCode.
#
# State.  _ConnectionState holds the per-connection state machine.  Rule 1
# (as in h11's _state.py): it does not know which side it runs on.  It sees
# (state, sender role, message type) triples and looks them up in the single
# table TRANSITIONS; a triple that is not in the table is a protocol error.
# Rule 2: both peers run the same machine over the same message sequence, so
# they agree on the state.  Besides the state it tracks the sessions and
# streams declared on this connection (ids, per-stream sequence numbers,
# limits) so that the relay can trust a Packet's stream_id once the core has
# returned it.
#
# Connection wraps a FrameDecoder and a _ConnectionState for one role.  Sent
# messages are checked as the CONSUMER's (or RELAY's) and raise
# LocalProtocolError; received ones as the peer's and raise
# RemoteProtocolError.  Any error moves the connection to ERROR; after that
# it refuses input and only lets an Error message out, so that the daemon can
# tell its peer why it is hanging up.
#
# Races the table tolerates.  The relay may ack a stream that the consumer
# has just closed (Ack/StreamState only need a stream id that was declared at
# some time, which is why stream ids must increase).  Bye is a two-step
# close: the consumer's Bye means "I send nothing more" and the relay may
# still send Ack/StreamState before its own Bye; the relay's Bye means the
# same from its side, and the consumer's in-flight messages are still legal
# until the consumer answers with Bye.

from __future__ import annotations

import datetime
import enum
import hashlib
import hmac
import io
import struct
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, NoReturn, TypeAlias

import cbor2
import zstandard

__all__ = [
    "AUTH_CONTEXT",
    "CHUNKS_VERSION",
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_MAX_METADATA_SIZE",
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "DEFAULT_MAX_SESSIONS",
    "DEFAULT_MAX_STREAMS",
    "MIN_TRACEFILE_SIZE",
    "FRAME_HEADER",
    "MAC_SIZE",
    "MAGIC",
    "MAX_CHANNEL_NAME_BYTES",
    "MAX_ERROR_TEXT",
    "MAX_NAME_BYTES",
    "MAX_SESSION_NAME_BYTES",
    "MAX_TRACE_PATH_BYTES",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "TRANSIENT_ERRORS",
    "TRANSITIONS",
    "Ack",
    "Auth",
    "Buffer",
    "Bye",
    "Challenge",
    "ChunkClose",
    "ChunkClosed",
    "Codec",
    "ConnState",
    "Connection",
    "ConnectionClosed",
    "Error",
    "ErrorCode",
    "Event",
    "FrameDecoder",
    "Hello",
    "LocalProtocolError",
    "Message",
    "MessageType",
    "Metadata",
    "OutOfBand",
    "Packet",
    "ProtocolError",
    "RemoteProtocolError",
    "Retry",
    "RetryReason",
    "Role",
    "SessionClose",
    "SessionDecl",
    "StreamClose",
    "StreamDecl",
    "StreamState",
    "StreamStateRequest",
    "Welcome",
    "compress_packet",
    "compute_auth_mac",
    "decompress_packet",
    "encode",
    "encode_parts",
    "new_compressor",
    "new_decompressor",
    "validate_name",
    "validate_trace_path",
    "verify_auth_mac",
]

PROTOCOL_VERSION: Final = 2
SUPPORTED_VERSIONS: Final = frozenset({1, 2})
# The first version with ChunkClose / ChunkClosed (session rotation).
CHUNKS_VERSION: Final = 2

MAGIC: Final = 0x54574952  # b"TWIR"
FRAME_HEADER: Final = struct.Struct(">III")  # magic, header_len, payload_len

DEFAULT_MAX_HEADER_SIZE: Final = 64 * 1024
DEFAULT_MAX_PAYLOAD_SIZE: Final = 16 * 1024 * 1024
DEFAULT_MAX_STREAMS: Final = 16384  # open streams per connection
DEFAULT_MAX_SESSIONS: Final = 256  # open sessions per connection
DEFAULT_MAX_METADATA_SIZE: Final = 16 * 1024 * 1024  # per trace_path
# StreamDecl.tracefile_size: the smallest sub-buffer, so that a peer cannot
# ask for a file per tiny packet.
MIN_TRACEFILE_SIZE: Final = 4096

NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32
# Domain separation for the auth MAC; see compute_auth_mac.
AUTH_CONTEXT: Final = b"tracewire-auth-v1"

# File-name limits (bytes of UTF-8).  NAME_MAX is 255; a session name gets
# "-YYYYmmddTHHMMSS" appended and a channel "_<index>.idx", hence the margin.
MAX_NAME_BYTES: Final = 255
MAX_SESSION_NAME_BYTES: Final = 200
MAX_CHANNEL_NAME_BYTES: Final = 200
MAX_TRACE_PATH_BYTES: Final = 4096
MAX_ERROR_TEXT: Final = 4096  # characters

_I64_MAX: Final = 2**63 - 1
_U64_MAX: Final = 2**64 - 1
_COMPACT_THRESHOLD: Final = 64 * 1024

# Bytes-like objects accepted as Packet/Metadata data.
Buffer: TypeAlias = bytes | bytearray | memoryview


class OutOfBand(bytes):
    """Stands for a payload of ``length`` bytes that the sender writes itself
    right after the frame's head (consumerd sends a spooled packet with
    ``os.sendfile`` from its spool file, never holding it in memory).

    Give it as a message's ``data``: ``len()`` is ``length``, so the frame's
    head announces the real payload and a Packet's checks see its size;
    ``encode_parts`` returns it as the second part, and the caller sends the
    real bytes in its place.  It holds no bytes itself: sending it as it is
    would break the frame.  Only ever made by a sender; a decoder never
    produces one.
    """

    length: int

    def __new__(cls, length: int) -> OutOfBand:
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"OutOfBand length must be a non-negative int, got {length!r}")
        obj = super().__new__(cls)
        obj.length = length
        return obj

    def __len__(self) -> int:
        return self.length


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class ErrorCode(enum.IntEnum):
    """Machine-readable reason carried by ProtocolError and the Error message."""

    PROTOCOL = 1  # malformed frame, header or field
    FRAME_TOO_LARGE = 2  # header_len or payload_len over the receiver's limit
    BAD_STATE = 3  # message not allowed in the connection's current state
    VERSION = 4  # unsupported protocol version
    AUTH_FAILED = 5  # missing key, unknown key or bad MAC
    FORBIDDEN = 6  # the key may not write under this hostname
    BAD_NAME = 7  # hostname / session / channel / trace path not acceptable
    LIMIT = 8  # too many streams or sessions, metadata too big
    DECOMPRESS = 9  # bad zstd data, or decompressed size not as declared
    TIMEOUT = 10  # handshake or idle timeout
    INTERNAL = 11  # a bug, or an error on the sender's side that will not heal
    RETRY = 12  # a transient failure on the relay's side hit the connection: reconnect later


# The codes a consumer answers by reconnecting later, keeping every packet:
# the relay could not go on now (a full disk while declaring a stream, an
# idle timeout), not "this can never be accepted".
TRANSIENT_ERRORS: Final = frozenset({ErrorCode.TIMEOUT, ErrorCode.RETRY})


class RetryReason(enum.IntEnum):
    """Why the relay did not write a packet it will take later (Retry.reason)."""

    NO_SPACE = 1  # ENOSPC, EDQUOT: the output filesystem or the quota is full
    READ_ONLY = 2  # EROFS: the filesystem was remounted read-only
    IO_ERROR = 3  # EIO: the device failed this write
    BUSY = 4  # any other error that can heal: out of descriptors, memory, permissions changed


class ProtocolError(Exception):
    """Base of the protocol errors; never raised directly.

    Attributes:
        code: the ErrorCode to report (e.g. in an Error message).
        message: human-readable text naming what was expected and what came.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


class LocalProtocolError(ProtocolError):
    """Our side tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


# --------------------------------------------------------------------------
# Field validation (raises LocalProtocolError; the decoder converts)
# --------------------------------------------------------------------------


def _fail(code: ErrorCode, text: str) -> NoReturn:
    raise LocalProtocolError(code, text)


def _check_int(value: object, what: str, lo: int = 0, hi: int = _I64_MAX) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(ErrorCode.PROTOCOL, f"{what} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        _fail(ErrorCode.PROTOCOL, f"{what} must be in [{lo}, {hi}], got {value}")


def _check_opt_int(value: object, what: str) -> None:
    if value is not None:
        _check_int(value, what)


def _check_bool(value: object, what: str) -> None:
    if not isinstance(value, bool):
        _fail(ErrorCode.PROTOCOL, f"{what} must be a bool, got {type(value).__name__}")


def _check_str(value: object, what: str, max_chars: int) -> None:
    if not isinstance(value, str):
        _fail(ErrorCode.PROTOCOL, f"{what} must be a str, got {type(value).__name__}")
    if len(value) > max_chars:
        _fail(ErrorCode.PROTOCOL, f"{what} is {len(value)} chars long, limit {max_chars}")


def _check_fixed_bytes(value: object, what: str, size: int) -> None:
    if not isinstance(value, bytes):
        _fail(ErrorCode.PROTOCOL, f"{what} must be bytes, got {type(value).__name__}")
    if len(value) != size:
        _fail(ErrorCode.PROTOCOL, f"{what} must be {size} bytes, got {len(value)}")


def _buffer_len(value: object, what: str) -> int:
    """Returns the byte length of a bytes/bytearray/memoryview, else fails."""
    if not isinstance(value, bytes | bytearray | memoryview):
        _fail(ErrorCode.PROTOCOL, f"{what} must be bytes-like, got {type(value).__name__}")
    if isinstance(value, memoryview):
        if not value.c_contiguous:
            _fail(ErrorCode.PROTOCOL, f"{what} must be a contiguous buffer")
        return value.nbytes
    return len(value)


def _name_problem(value: object, max_bytes: int) -> str | None:
    """Returns why `value` is not a safe single path component, or None."""
    if not isinstance(value, str):
        return f"must be a str, got {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > max_bytes:  # cheap pre-check before encoding
        return f"is longer than {max_bytes} bytes"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > max_bytes:
        return f"is {size} bytes long, limit {max_bytes}"
    if "/" in value or "\0" in value:
        return "must not contain '/' or NUL"
    if value.startswith("."):
        return "must not start with '.'"
    if not value.isprintable():
        return "must be printable"
    return None


def _path_problem(value: object) -> str | None:
    """Returns why `value` is not a safe relative path, or None."""
    if not isinstance(value, str):
        return f"must be a str, got {type(value).__name__}"
    if len(value) > MAX_TRACE_PATH_BYTES:
        return f"is longer than {MAX_TRACE_PATH_BYTES} bytes"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > MAX_TRACE_PATH_BYTES:
        return f"is {size} bytes long, limit {MAX_TRACE_PATH_BYTES}"
    if value.startswith("/"):
        return "must be relative"
    for part in value.split("/"):
        if not part:
            return "has an empty component"
        problem = _name_problem(part, MAX_NAME_BYTES)
        if problem is not None:
            return f"component {part!r} {problem}"
    return None


def _check_name(value: object, what: str, max_bytes: int = MAX_NAME_BYTES) -> None:
    problem = _name_problem(value, max_bytes)
    if problem is not None:
        _fail(ErrorCode.BAD_NAME, f"{what} {value!r:.300} {problem}")


def _check_path(value: object, what: str) -> None:
    problem = _path_problem(value)
    if problem is not None:
        _fail(ErrorCode.BAD_NAME, f"{what} {value!r:.300} {problem}")


def validate_name(s: object, what: str, *, max_bytes: int = MAX_NAME_BYTES) -> str:
    """Checks a name that becomes one file or directory name on the relay.

    Accepted: a printable str of 1..max_bytes UTF-8 bytes, without '/' or
    NUL, not starting with '.' (which also rules out '.' and '..').

    Args:
        s: the name, as it came off the wire.
        what: what the name is, for the error text ("hostname", ...).
        max_bytes: length limit in UTF-8 bytes.

    Returns:
        `s`, unchanged.

    Raises:
        RemoteProtocolError: (BAD_NAME) if `s` is not acceptable.
    """
    problem = _name_problem(s, max_bytes)
    if problem is not None:
        raise RemoteProtocolError(ErrorCode.BAD_NAME, f"{what} {s!r:.300} {problem}")
    assert isinstance(s, str)
    return s


def validate_trace_path(p: object) -> str:
    """Checks a relative trace path such as "ust/pid/demo-123-20261129T101500".

    Args:
        p: the path, as it came off the wire.

    Returns:
        `p`, unchanged.

    Raises:
        RemoteProtocolError: (BAD_NAME) if `p` is absolute, has an empty
            component, a component that fails validate_name, or is longer
            than MAX_TRACE_PATH_BYTES.
    """
    problem = _path_problem(p)
    if problem is not None:
        raise RemoteProtocolError(ErrorCode.BAD_NAME, f"trace_path {p!r:.300} {problem}")
    assert isinstance(p, str)
    return p


def _check_timestamp(value: object, what: str) -> None:
    if not isinstance(value, str):
        _fail(ErrorCode.PROTOCOL, f"{what} must be a str, got {type(value).__name__}")
    try:
        ok = (
            len(value) == 15
            and value.isascii()
            and value[8] == "T"
            and (value[:8] + value[9:]).isdigit()
            and datetime.datetime.strptime(value, "%Y%m%dT%H%M%S") is not None
        )
    except ValueError:
        ok = False
    if not ok:
        _fail(ErrorCode.PROTOCOL, f"{what} must look like YYYYmmddTHHMMSS, got {value!r:.40}")


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------


class MessageType(enum.IntEnum):
    """Value of the "t" key of every CBOR header."""

    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    SESSION_DECL = 5
    STREAM_DECL = 6
    METADATA = 7
    PACKET = 8
    ACK = 9
    STREAM_STATE_REQUEST = 10
    STREAM_STATE = 11
    STREAM_CLOSE = 12
    SESSION_CLOSE = 13
    BYE = 14
    ERROR = 15
    RETRY = 16
    CHUNK_CLOSE = 17
    CHUNK_CLOSED = 18


class Codec(enum.IntEnum):
    """Encoding of a Packet's payload."""

    NONE = 0
    ZSTD = 1


@dataclass(frozen=True, slots=True)
class Hello:
    """Consumer -> relay, first message: protocol version and identity.

    Attributes:
        version: protocol version the consumer speaks.
        hostname: the directory the consumer's traces go under.
        key_id: names the shared secret to authenticate with, or None.
    """

    version: int
    hostname: str
    key_id: str | None = None
    msg_type: ClassVar[MessageType] = MessageType.HELLO

    def __post_init__(self) -> None:
        _check_int(self.version, "Hello.version", 1, 0xFFFF)
        _check_name(self.hostname, "Hello.hostname")
        if self.key_id is not None:
            _check_name(self.key_id, "Hello.key_id")
            if any(c.isspace() for c in self.key_id):
                _fail(ErrorCode.BAD_NAME, f"Hello.key_id {self.key_id!r} contains whitespace")


@dataclass(frozen=True, slots=True)
class Challenge:
    """Relay -> consumer: prove you hold the key. The caller picks the nonce
    (32 bytes from `secrets.token_bytes`), so this core stays deterministic."""

    nonce: bytes
    msg_type: ClassVar[MessageType] = MessageType.CHALLENGE

    def __post_init__(self) -> None:
        _check_fixed_bytes(self.nonce, "Challenge.nonce", NONCE_SIZE)


@dataclass(frozen=True, slots=True)
class Auth:
    """Consumer -> relay: the answer to a Challenge, see compute_auth_mac."""

    mac: bytes
    msg_type: ClassVar[MessageType] = MessageType.AUTH

    def __post_init__(self) -> None:
        _check_fixed_bytes(self.mac, "Auth.mac", MAC_SIZE)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Relay -> consumer: the handshake succeeded.

    Attributes:
        server_version: the version both sides now speak (== Hello.version).
        session_limit: how many sessions the relay accepts open at once on
            this connection, or None if it does not say.
    """

    server_version: int
    session_limit: int | None = None
    msg_type: ClassVar[MessageType] = MessageType.WELCOME

    def __post_init__(self) -> None:
        _check_int(self.server_version, "Welcome.server_version", 1, 0xFFFF)
        _check_opt_int(self.session_limit, "Welcome.session_limit")


@dataclass(frozen=True, slots=True)
class SessionDecl:
    """Consumer -> relay: a tracing session, stored as <name>-<created>/.

    Attributes:
        session_id: consumer-chosen id, unique among open sessions.
        name: session name.
        created: creation time, "YYYYmmddTHHMMSS".
        live: whether live viewers may attach.
    """

    session_id: int
    name: str
    created: str
    live: bool
    msg_type: ClassVar[MessageType] = MessageType.SESSION_DECL

    def __post_init__(self) -> None:
        _check_int(self.session_id, "SessionDecl.session_id")
        _check_name(self.name, "SessionDecl.name", MAX_SESSION_NAME_BYTES)
        _check_timestamp(self.created, "SessionDecl.created")
        _check_bool(self.live, "SessionDecl.live")


@dataclass(frozen=True, slots=True)
class StreamDecl:
    """Consumer -> relay: the stream file <trace_path>/<channel>_<index>.

    Attributes:
        stream_id: consumer-chosen id; must be greater than every stream id
            declared before on this connection.
        session_id: an open session.
        trace_path: relative path below the session directory.
        channel: channel name.
        index: stream number within the channel (usually the CPU).
        tracefile_size: None: one stream file, <channel>_<index>.  Else
            (``enable-channel --tracefile-size``) files
            <channel>_<index>_<k> of at most this many bytes each (a
            bigger packet alone excepted), >= MIN_TRACEFILE_SIZE.
        tracefile_count: None: every file is kept.  Else
            (``--tracefile-count``) only the newest this many, >= 1; only
            with a tracefile_size.
    """

    stream_id: int
    session_id: int
    trace_path: str
    channel: str
    index: int
    tracefile_size: int | None = None
    tracefile_count: int | None = None
    msg_type: ClassVar[MessageType] = MessageType.STREAM_DECL

    def __post_init__(self) -> None:
        _check_int(self.stream_id, "StreamDecl.stream_id")
        _check_int(self.session_id, "StreamDecl.session_id")
        _check_path(self.trace_path, "StreamDecl.trace_path")
        _check_name(self.channel, "StreamDecl.channel", MAX_CHANNEL_NAME_BYTES)
        _check_int(self.index, "StreamDecl.index")
        if self.tracefile_size is not None:
            _check_int(self.tracefile_size, "StreamDecl.tracefile_size", MIN_TRACEFILE_SIZE)
        if self.tracefile_count is not None:
            _check_int(self.tracefile_count, "StreamDecl.tracefile_count", 1)
            if self.tracefile_size is None:
                _fail(ErrorCode.PROTOCOL, "StreamDecl.tracefile_count needs a tracefile_size")


@dataclass(frozen=True, slots=True)
class Metadata:
    """Consumer -> relay: CTF metadata bytes for <trace_path>/metadata at `offset`."""

    session_id: int
    trace_path: str
    offset: int
    data: Buffer
    msg_type: ClassVar[MessageType] = MessageType.METADATA

    def __post_init__(self) -> None:
        _check_int(self.session_id, "Metadata.session_id")
        _check_path(self.trace_path, "Metadata.trace_path")
        _check_int(self.offset, "Metadata.offset")
        _buffer_len(self.data, "Metadata.data")


@dataclass(frozen=True, slots=True)
class Packet:
    """Consumer -> relay: one whole CTF packet of a declared stream.

    Attributes:
        stream_id: an open stream.
        seq: per-stream sequence number (0, 1, 2...); strictly increasing on
            a connection; after a reconnect it resumes at StreamState.next_seq.
        codec: how `data` is encoded.
        raw_len: the packet's size in bytes before compression.
        ts_begin, ts_end: CTF packet context timestamp_begin / timestamp_end.
        events_discarded: CTF packet context events_discarded.
        content_size_bits, packet_size_bits: CTF content_size / packet_size;
            packet_size_bits == 8 * raw_len.
        packet_seq_num: CTF packet_seq_num.
        data: the packet, encoded with `codec`.
    """

    stream_id: int
    seq: int
    codec: Codec
    raw_len: int
    ts_begin: int
    ts_end: int
    events_discarded: int
    content_size_bits: int
    packet_size_bits: int
    packet_seq_num: int
    data: Buffer
    msg_type: ClassVar[MessageType] = MessageType.PACKET

    def __post_init__(self) -> None:
        # Every packet of a stream goes through here on both ends: when all
        # the ints are plain ints in range (the rule), one expression says
        # so; otherwise the checks one by one find the culprit and say which.
        tb, cs = self.ts_begin, self.content_size_bits
        if not (type(self.stream_id) is int and type(self.seq) is int and type(self.raw_len) is int
                and type(tb) is int and type(self.ts_end) is int and type(self.events_discarded) is int
                and type(cs) is int and type(self.packet_size_bits) is int and type(self.packet_seq_num) is int
                and 0 <= self.stream_id <= _I64_MAX and 0 <= self.seq <= _I64_MAX
                and 0 <= self.raw_len <= _I64_MAX and 0 <= tb <= self.ts_end <= _U64_MAX
                and 0 <= self.events_discarded <= _U64_MAX and 0 <= cs <= self.packet_size_bits <= _U64_MAX
                and 0 <= self.packet_seq_num <= _U64_MAX):
            self._check_fields()
        if type(self.codec) is not Codec:
            _fail(ErrorCode.PROTOCOL, f"Packet.codec must be a Codec, got {self.codec!r}")
        if self.packet_size_bits != 8 * self.raw_len:
            _fail(
                ErrorCode.PROTOCOL,
                f"Packet.packet_size_bits ({self.packet_size_bits}) != 8 * raw_len ({self.raw_len})",
            )
        size = _buffer_len(self.data, "Packet.data")
        if self.codec is Codec.NONE and size != self.raw_len:
            _fail(ErrorCode.PROTOCOL, f"uncompressed Packet has {size} bytes, raw_len {self.raw_len}")

    def _check_fields(self) -> None:
        """The int fields' checks one by one (raises for the first that fails)."""
        _check_int(self.stream_id, "Packet.stream_id")
        _check_int(self.seq, "Packet.seq")
        if not isinstance(self.codec, Codec):
            _fail(ErrorCode.PROTOCOL, f"Packet.codec must be a Codec, got {self.codec!r}")
        _check_int(self.raw_len, "Packet.raw_len")
        _check_int(self.ts_begin, "Packet.ts_begin", 0, _U64_MAX)
        _check_int(self.ts_end, "Packet.ts_end", self.ts_begin, _U64_MAX)
        _check_int(self.events_discarded, "Packet.events_discarded", 0, _U64_MAX)
        _check_int(self.packet_size_bits, "Packet.packet_size_bits", 0, _U64_MAX)
        _check_int(self.content_size_bits, "Packet.content_size_bits", 0, self.packet_size_bits)
        _check_int(self.packet_seq_num, "Packet.packet_seq_num", 0, _U64_MAX)


@dataclass(frozen=True, slots=True)
class Ack:
    """Relay -> consumer: every packet of the stream up to `seq` is written
    (seq == -1: none)."""

    stream_id: int
    seq: int
    msg_type: ClassVar[MessageType] = MessageType.ACK

    def __post_init__(self) -> None:
        _check_int(self.stream_id, "Ack.stream_id")
        _check_int(self.seq, "Ack.seq", -1)


@dataclass(frozen=True, slots=True)
class StreamStateRequest:
    """Consumer -> relay: where does this (re)declared stream stand?"""

    stream_id: int
    msg_type: ClassVar[MessageType] = MessageType.STREAM_STATE_REQUEST

    def __post_init__(self) -> None:
        _check_int(self.stream_id, "StreamStateRequest.stream_id")


@dataclass(frozen=True, slots=True)
class StreamState:
    """Relay -> consumer: the next seq the relay wants for the stream."""

    stream_id: int
    next_seq: int
    msg_type: ClassVar[MessageType] = MessageType.STREAM_STATE

    def __post_init__(self) -> None:
        _check_int(self.stream_id, "StreamState.stream_id")
        _check_int(self.next_seq, "StreamState.next_seq")


@dataclass(frozen=True, slots=True)
class Retry:
    """Relay -> consumer: packet `seq` of the stream was not written because
    of a failure that can heal (`reason`); the stream's file ends just before
    it.  Resend from `seq` later.  Until then the relay drops, without an
    error, the packets after `seq` already in flight.  Not a refusal: the
    connection and every other stream go on.

    `text` comes from the peer (an strerror): show it, never interpret it.
    """

    stream_id: int
    seq: int
    reason: RetryReason
    text: str
    msg_type: ClassVar[MessageType] = MessageType.RETRY

    def __post_init__(self) -> None:
        _check_int(self.stream_id, "Retry.stream_id")
        _check_int(self.seq, "Retry.seq")
        if not isinstance(self.reason, RetryReason):
            _fail(ErrorCode.PROTOCOL, f"Retry.reason must be a RetryReason, got {self.reason!r:.40}")
        _check_str(self.text, "Retry.text", MAX_ERROR_TEXT)


@dataclass(frozen=True, slots=True)
class StreamClose:
    """Consumer -> relay: no more packets for this stream."""

    stream_id: int
    msg_type: ClassVar[MessageType] = MessageType.STREAM_CLOSE

    def __post_init__(self) -> None:
        _check_int(self.stream_id, "StreamClose.stream_id")


@dataclass(frozen=True, slots=True)
class SessionClose:
    """Consumer -> relay: the session is done; closes its remaining streams."""

    session_id: int
    msg_type: ClassVar[MessageType] = MessageType.SESSION_CLOSE

    def __post_init__(self) -> None:
        _check_int(self.session_id, "SessionClose.session_id")


@dataclass(frozen=True, slots=True)
class ChunkClose:
    """Consumer -> relay (protocol 2): a trace chunk of the session is
    complete (every packet of it acknowledged, its streams closed): move the
    directory `source` to `target`, both relative to the session directory,
    creating target's parents, then remove the parents of `source` left
    empty.  Idempotent: a `source` already gone (moved by an earlier
    ChunkClose whose answer was lost) is no error.  Answered by ChunkClosed.
    """

    session_id: int
    source: str
    target: str
    msg_type: ClassVar[MessageType] = MessageType.CHUNK_CLOSE

    def __post_init__(self) -> None:
        _check_int(self.session_id, "ChunkClose.session_id")
        _check_path(self.source, "ChunkClose.source")
        _check_path(self.target, "ChunkClose.target")


@dataclass(frozen=True, slots=True)
class ChunkClosed:
    """Relay -> consumer (protocol 2): the ChunkClose that named `target` is
    done: the chunk is in place."""

    session_id: int
    target: str
    msg_type: ClassVar[MessageType] = MessageType.CHUNK_CLOSED

    def __post_init__(self) -> None:
        _check_int(self.session_id, "ChunkClosed.session_id")
        _check_path(self.target, "ChunkClosed.target")


@dataclass(frozen=True, slots=True)
class Bye:
    """Either side: I will send nothing more (but an Error)."""

    msg_type: ClassVar[MessageType] = MessageType.BYE


@dataclass(frozen=True, slots=True)
class Error:
    """Either side: I am closing the connection because of `code`.

    `text` comes from the peer: log it with %r, never interpret it.
    """

    code: int
    text: str
    msg_type: ClassVar[MessageType] = MessageType.ERROR

    def __post_init__(self) -> None:
        _check_int(self.code, "Error.code", 0, 0xFFFF)
        _check_str(self.text, "Error.text", MAX_ERROR_TEXT)


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Not a wire message: the peer closed the connection between frames."""


Message: TypeAlias = (
    Hello
    | Challenge
    | Auth
    | Welcome
    | SessionDecl
    | StreamDecl
    | Metadata
    | Packet
    | Ack
    | StreamStateRequest
    | StreamState
    | Retry
    | ChunkClose
    | ChunkClosed
    | StreamClose
    | SessionClose
    | Bye
    | Error
)
Event: TypeAlias = Message | ConnectionClosed

_CLASSES: Final[Mapping[MessageType, type]] = types.MappingProxyType(
    {
        cls.msg_type: cls
        for cls in (
            Hello,
            Challenge,
            Auth,
            Welcome,
            SessionDecl,
            StreamDecl,
            Metadata,
            Packet,
            Ack,
            StreamStateRequest,
            StreamState,
            StreamClose,
            SessionClose,
            Bye,
            Error,
            Retry,
            ChunkClose,
            ChunkClosed,
        )
    }
)
_PAYLOAD_TYPES: Final = frozenset({MessageType.METADATA, MessageType.PACKET})


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def _header_map(msg: Message) -> tuple[dict[str, object], Buffer | None]:
    """Returns the CBOR header map (without "t") and the payload of `msg`."""
    if type(msg) is Packet:  # the common case first
        return {
            "i": msg.stream_id,
            "q": msg.seq,
            "cd": int(msg.codec),
            "rl": msg.raw_len,
            "tb": msg.ts_begin,
            "te": msg.ts_end,
            "ed": msg.events_discarded,
            "cs": msg.content_size_bits,
            "ps": msg.packet_size_bits,
            "pn": msg.packet_seq_num,
        }, msg.data
    match msg:
        case Hello():
            return {"v": msg.version, "h": msg.hostname, "k": msg.key_id}, None
        case Challenge():
            return {"n": msg.nonce}, None
        case Auth():
            return {"m": msg.mac}, None
        case Welcome():
            return {"v": msg.server_version, "sl": msg.session_limit}, None
        case SessionDecl():
            return {"s": msg.session_id, "nm": msg.name, "c": msg.created, "l": msg.live}, None
        case StreamDecl():
            return {
                "i": msg.stream_id,
                "s": msg.session_id,
                "p": msg.trace_path,
                "ch": msg.channel,
                "x": msg.index,
                "fs": msg.tracefile_size,
                "fc": msg.tracefile_count,
            }, None
        case Metadata():
            return {"s": msg.session_id, "p": msg.trace_path, "o": msg.offset}, msg.data
        case Ack():
            return {"i": msg.stream_id, "q": msg.seq}, None
        case StreamStateRequest():
            return {"i": msg.stream_id}, None
        case StreamState():
            return {"i": msg.stream_id, "nq": msg.next_seq}, None
        case Retry():
            return {"i": msg.stream_id, "q": msg.seq, "r": int(msg.reason), "tx": msg.text}, None
        case StreamClose():
            return {"i": msg.stream_id}, None
        case SessionClose():
            return {"s": msg.session_id}, None
        case ChunkClose():
            return {"s": msg.session_id, "src": msg.source, "dst": msg.target}, None
        case ChunkClosed():
            return {"s": msg.session_id, "dst": msg.target}, None
        case Bye():
            return {}, None
        case Error():
            return {"e": int(msg.code), "tx": msg.text}, None
        case _:
            raise TypeError(f"not a tracewire message: {msg!r}")


def encode_parts(
    msg: Message,
    *,
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
    max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE,
) -> list[Buffer]:
    """Encodes one message as a frame, without copying the payload.

    Args:
        msg: the message.
        max_header_size: refuse a CBOR header longer than this.
        max_payload_size: refuse a payload longer than this.

    Returns:
        [fixed header + CBOR header] for messages without payload, or
        [fixed header + CBOR header, data] for Packet and Metadata: send
        them back to back (two send_all calls, or one writev).

    Raises:
        LocalProtocolError: (FRAME_TOO_LARGE) if the frame exceeds a limit.
        TypeError: if `msg` is not a message.
    """
    fields, payload = _header_map(msg)
    header = cbor2.dumps({"t": int(msg.msg_type), **fields})
    payload_len = 0 if payload is None else _buffer_len(payload, "payload")
    if len(header) > max_header_size:
        _fail(ErrorCode.FRAME_TOO_LARGE, f"{type(msg).__name__} header is {len(header)} bytes, limit {max_header_size}")
    if payload_len > max_payload_size:
        _fail(ErrorCode.FRAME_TOO_LARGE,
              f"{type(msg).__name__} payload is {payload_len} bytes, limit {max_payload_size}")
    head = FRAME_HEADER.pack(MAGIC, len(header), payload_len) + header
    if payload is None or payload_len == 0:
        return [head]
    return [head, payload]


def encode(msg: Message) -> bytes:
    """Encodes one message as one whole frame.

    Args:
        msg: the message.

    Returns:
        The frame bytes.

    Raises:
        LocalProtocolError: (FRAME_TOO_LARGE) if the frame exceeds the
            default limits.
        TypeError: if `msg` is not a message.
    """
    return b"".join(encode_parts(msg))


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


def _reject_tag(*args: object) -> NoReturn:
    """tag_hook and semantic decoder that refuses every tag (the callback
    signatures differ between cbor2 releases, hence *args)."""
    raise cbor2.CBORDecodeError("CBOR tags are not allowed in a tracewire header")


# The tags cbor2 6.3 decodes natively (found by probing); tag_hook only sees
# the others.  No header field is tagged, so every tag is refused: that also
# keeps attacker-chosen regexes, sets, shared refs and bignums out.
_REJECT_SEMANTIC: Final = types.MappingProxyType(
    dict.fromkeys(
        (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000, 55799),
        _reject_tag,
    )
)


def _parse_header(body: bytes) -> tuple[MessageType, dict[object, object]]:
    """Decodes the CBOR header map of a frame.

    Raises:
        RemoteProtocolError: (PROTOCOL) on malformed CBOR, trailing bytes,
            a non-map, or a missing or unknown "t".
    """
    fp = io.BytesIO(body)
    try:
        value = cbor2.CBORDecoder(
            fp,
            tag_hook=_reject_tag,
            semantic_decoders=_REJECT_SEMANTIC,
            max_depth=4,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        ).decode()
    except Exception as exc:  # untrusted input: whatever cbor2 raises means "malformed"
        why = f"{exc} ({exc.__cause__})" if exc.__cause__ is not None else str(exc)
        raise RemoteProtocolError(ErrorCode.PROTOCOL, f"malformed CBOR header: {why:.300}") from exc
    if fp.tell() != len(body):
        raise RemoteProtocolError(
            ErrorCode.PROTOCOL, f"{len(body) - fp.tell()} trailing bytes after the CBOR header"
        )
    if not isinstance(value, dict):
        raise RemoteProtocolError(ErrorCode.PROTOCOL, f"header must be a CBOR map, got {type(value).__name__}")
    mtype = value.pop("t", None)
    if not isinstance(mtype, int) or isinstance(mtype, bool):
        raise RemoteProtocolError(ErrorCode.PROTOCOL, f"header needs an int message type \"t\", got {mtype!r:.80}")
    try:
        return MessageType(mtype), value
    except ValueError:
        raise RemoteProtocolError(ErrorCode.PROTOCOL, f"unknown message type {mtype}") from None


class _Fields:
    """Takes the fields of one decoded header map, then checks none is left."""

    def __init__(self, mtype: MessageType, fields: dict[object, object]) -> None:
        self._name = _CLASSES[mtype].__name__
        self._fields = fields

    def __call__(self, key: str) -> Any:  # Any: the message constructor checks the type
        try:
            return self._fields.pop(key)
        except KeyError:
            raise RemoteProtocolError(ErrorCode.PROTOCOL, f"{self._name} header lacks field {key!r}") from None

    def done(self) -> None:
        if self._fields:
            extra = ", ".join(sorted(repr(k) for k in self._fields))
            raise RemoteProtocolError(ErrorCode.PROTOCOL, f"{self._name} header has unexpected field(s) {extra:.200}")


def _as_enum(enum_cls: type[enum.IntEnum], value: object) -> Any:
    """Converts a known plain int to `enum_cls`; leaves anything else to the
    message's own check."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return enum_cls(value)
        except ValueError:
            pass
    return value


# A Packet header's keys, in the order of Packet's fields.
_PACKET_KEYS: Final = ("i", "q", "cd", "rl", "tb", "te", "ed", "cs", "ps", "pn")


def _build(mtype: MessageType, fields: dict[object, object], payload: bytes | bytearray | None) -> Message:
    """Turns a decoded header map (and payload) into a message.

    Raises:
        RemoteProtocolError: on a missing, unexpected or invalid field, with
            the code the message's own check gives (PROTOCOL, BAD_NAME...).
    """
    if mtype is MessageType.PACKET and len(fields) == len(_PACKET_KEYS) and payload is not None:
        # The common case first: exactly a Packet's fields (anything else,
        # a missing or extra one, goes the general way, which says which).
        try:
            values: list[Any] = [fields[k] for k in _PACKET_KEYS]
        except KeyError:
            pass
        else:
            i, q, cd, rl, tb, te, ed, cs, ps, pn = values
            try:
                return Packet(i, q, _as_enum(Codec, cd), rl, tb, te, ed, cs, ps, pn, payload)
            except LocalProtocolError as exc:
                raise RemoteProtocolError(exc.code, f"invalid Packet: {exc.message}") from exc
    f = _Fields(mtype, fields)
    msg: Message
    try:
        match mtype:
            case MessageType.HELLO:
                msg = Hello(f("v"), f("h"), f("k"))
            case MessageType.CHALLENGE:
                msg = Challenge(f("n"))
            case MessageType.AUTH:
                msg = Auth(f("m"))
            case MessageType.WELCOME:
                msg = Welcome(f("v"), f("sl"))
            case MessageType.SESSION_DECL:
                msg = SessionDecl(f("s"), f("nm"), f("c"), f("l"))
            case MessageType.STREAM_DECL:
                msg = StreamDecl(f("i"), f("s"), f("p"), f("ch"), f("x"), f("fs"), f("fc"))
            case MessageType.METADATA:
                assert payload is not None
                msg = Metadata(f("s"), f("p"), f("o"), payload)
            case MessageType.PACKET:
                assert payload is not None
                msg = Packet(
                    f("i"),
                    f("q"),
                    _as_enum(Codec, f("cd")),
                    f("rl"),
                    f("tb"),
                    f("te"),
                    f("ed"),
                    f("cs"),
                    f("ps"),
                    f("pn"),
                    payload,
                )
            case MessageType.ACK:
                msg = Ack(f("i"), f("q"))
            case MessageType.STREAM_STATE_REQUEST:
                msg = StreamStateRequest(f("i"))
            case MessageType.STREAM_STATE:
                msg = StreamState(f("i"), f("nq"))
            case MessageType.RETRY:
                msg = Retry(f("i"), f("q"), _as_enum(RetryReason, f("r")), f("tx"))
            case MessageType.STREAM_CLOSE:
                msg = StreamClose(f("i"))
            case MessageType.SESSION_CLOSE:
                msg = SessionClose(f("s"))
            case MessageType.CHUNK_CLOSE:
                msg = ChunkClose(f("s"), f("src"), f("dst"))
            case MessageType.CHUNK_CLOSED:
                msg = ChunkClosed(f("s"), f("dst"))
            case MessageType.BYE:
                msg = Bye()
            case MessageType.ERROR:
                msg = Error(_as_enum(ErrorCode, f("e")), f("tx"))
    except LocalProtocolError as exc:
        raise RemoteProtocolError(exc.code, f"invalid {_CLASSES[mtype].__name__}: {exc.message}") from exc
    f.done()
    return msg


class FrameDecoder:
    """Turns received bytes into messages; knows frames, not connection state.

    Bytes come in one of two ways: ``receive_data(data)`` (copies `data`), or
    the zero-copy pair ``receive_buffer()`` / ``received(n)``: the caller
    reads from its socket straight into the buffer it is given (``recv_into``)
    and says how many bytes came.  Once a frame's header announces a payload
    of at least DIRECT_PAYLOAD_MIN bytes, that buffer is the payload itself
    (one bytearray, payload_len bytes once complete; it starts at
    PAYLOAD_START bytes and doubles as bytes fill it, so a peer announcing a
    large payload and sending little makes the decoder hold little), so the
    payload's bytes are written once, by the kernel, and the message's
    `data` is that bytearray.  Both ways can be mixed.

    A caller done with such a payload may hand it back (recycle()): a later
    payload of the same size is received into it, which spares allocating
    and zeroing fresh memory per packet.  At most `pool_bytes` are kept.

    Args:
        max_header_size: largest CBOR header accepted, in bytes.
        max_payload_size: largest payload accepted, in bytes.
        pool_bytes: payload buffers kept for reuse, in bytes (0: none).
    """

    # Payloads at least this large are received straight into their own buffer.
    DIRECT_PAYLOAD_MIN: ClassVar[int] = 64 * 1024
    # Bytes asked for at most between payloads (headers, small frames): what
    # it brings of a following large payload is copied into that payload's buffer.
    READ_SIZE: ClassVar[int] = 64 * 1024
    # A payload's buffer starts this large (or at the payload's size) and
    # doubles as bytes fill it: announcing a 16 MiB payload and sending a
    # few bytes does not make the decoder hold 16 MiB.
    PAYLOAD_START: ClassVar[int] = 256 * 1024

    def __init__(
        self,
        *,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE,
        pool_bytes: int = 0,
    ) -> None:
        self.max_header_size = max_header_size
        self.max_payload_size = max_payload_size
        self.pool_bytes = pool_bytes
        self._pool: list[bytearray] = []  # recycled payload buffers
        self._buf = bytearray()
        self._pos = 0  # bytes of _buf already consumed
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._lengths: tuple[int, int] | None = None  # fixed header consumed
        # Bytes of the frame of the last message returned (fixed header,
        # header and payload): what the sender counted as on the wire.
        self.frame_size = 0
        self._pending: tuple[MessageType, dict[object, object]] | None = None  # CBOR consumed
        self._payload: bytearray | None = None  # a large pending payload, being filled
        self._target = 0  # its size (_payload grows up to it)
        self._filled = 0  # bytes of _payload received
        self._scratch: bytearray | None = None  # receive_buffer() between payloads
        self._lent: memoryview | None = None  # the view receive_buffer() handed out

    @property
    def buffered(self) -> int:
        """Received bytes not yet consumed by a returned event."""
        return len(self._buf) - self._pos + self._filled

    @property
    def bytes_needed(self) -> int:
        """How many more bytes next_event needs, at least, to make progress
        (the rest of the part of a frame it waits for; 1 if it would not
        wait).  A socket's receive low-water mark can be set to it."""
        have = len(self._buf) - self._pos
        if self._lengths is None:
            want = FRAME_HEADER.size
        elif self._pending is None:
            want = self._lengths[0]
        elif self._payload is not None:
            have, want = self._filled, self._target
        else:
            want = self._lengths[1]
        return max(1, want - have)

    def receive_data(self, data: Buffer) -> None:
        """Buffers received bytes; parsing happens in next_event.

        Args:
            data: bytes from the peer; b"" means the peer closed (EOF).

        Raises:
            RemoteProtocolError: if an earlier error put the decoder in ERROR.
            LocalProtocolError: (BAD_STATE) for data after EOF.
        """
        if self._error is not None:
            raise self._refusal()
        if data and self._eof:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "receive_data() called with data after EOF")
        if not data:
            self._eof = True
            return
        if self._payload is not None:
            with memoryview(data) as view, view.cast("B") as raw:
                n = self._fill(raw)
                if n < len(raw):
                    self._buf += raw[n:]
            return
        self._buf += data

    def _grow(self) -> None:
        """Makes room in a full payload buffer: it doubles, up to _target."""
        payload = self._payload
        assert payload is not None
        if self._filled == len(payload) < self._target:
            payload += bytes(min(self._target, 2 * len(payload)) - len(payload))

    def _fill(self, raw: memoryview) -> int:
        """Copies the start of `raw` into the pending payload; returns how many
        bytes it took (up to the payload's end)."""
        payload = self._payload
        assert payload is not None
        taken = 0
        while taken < len(raw) and self._filled < self._target:
            self._grow()
            n = min(len(payload) - self._filled, len(raw) - taken)
            payload[self._filled : self._filled + n] = raw[taken : taken + n]
            self._filled += n
            taken += n
        return taken

    def receive_buffer(self) -> memoryview:
        """A writable buffer for the next bytes from the peer: receive into it
        (``sock.recv_into``), then call received() with the count.  Valid
        until that call; ask again after each next_event() that returned None.

        Raises:
            RemoteProtocolError: if an earlier error put the decoder in ERROR.
            LocalProtocolError: (BAD_STATE) after EOF.
        """
        if self._error is not None:
            raise self._refusal()
        if self._eof:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "receive_buffer() called after EOF")
        if self._lent is not None:
            self._lent.release()  # lent before and never filled (a receive that would block)
            self._lent = None
        if self._payload is not None:
            self._grow()
            view = memoryview(self._payload)[self._filled :]
        else:
            if self._scratch is None:
                self._scratch = bytearray(self.READ_SIZE)
            view = memoryview(self._scratch)
        self._lent = view
        return view

    def received(self, n: int) -> None:
        """Commits the first `n` bytes of the last receive_buffer() (0: EOF).

        Raises:
            RemoteProtocolError: if an earlier error put the decoder in ERROR.
            LocalProtocolError: (BAD_STATE) without a buffer lent, or if `n`
                is not within it.
        """
        if self._error is not None:
            raise self._refusal()
        view, self._lent = self._lent, None
        if view is None or not 0 <= n <= len(view):
            raise LocalProtocolError(ErrorCode.BAD_STATE, f"received({n}) without a buffer of that size lent")
        with view:
            if n == 0:
                self._eof = True
            elif self._payload is not None and view.obj is self._payload:
                self._filled += n
            else:
                self._buf += view[:n]

    def recycle(self, data: Buffer) -> None:
        """Hands back a message's `data` the caller no longer uses (nor any
        view of it): a later payload of the same size may be received into
        it.  Anything but a payload buffer of this decoder's size range is
        ignored, as is what does not fit in `pool_bytes`."""
        if type(data) is bytearray and len(data) >= self.DIRECT_PAYLOAD_MIN \
                and sum(map(len, self._pool)) + len(data) <= self.pool_bytes:
            self._pool.append(data)

    def release_buffers(self) -> None:
        """Lets go of the recycled payload buffers (an idle connection's
        memory); payloads get new ones until some are recycled again."""
        self._pool.clear()

    def _new_payload(self, size: int) -> bytearray:
        for i, buf in enumerate(self._pool):
            if len(buf) == size:
                return self._pool.pop(i)
        if self._pool:
            self._pool.pop(0)  # sizes changed: let the oldest go
        return bytearray(min(size, self.PAYLOAD_START))

    def next_event(self) -> Message | ConnectionClosed | None:
        """Parses the next message out of the buffered bytes.

        Returns:
            The next message; ConnectionClosed after a clean EOF (between
            frames); None if more bytes are needed.

        Raises:
            RemoteProtocolError: on any malformed frame, on EOF in the middle
                of a frame, and on every call after that.
        """
        if self._error is not None:
            raise self._refusal()
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._error = exc
            self._payload = None
            raise

    def _refusal(self) -> RemoteProtocolError:
        assert self._error is not None
        return RemoteProtocolError(self._error.code, f"decoder already failed: {self._error.message}")

    def _need(self, wanted: int) -> None:
        """Raises if EOF means the `wanted` bytes will never come."""
        if self._eof:
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL,
                f"connection closed mid-frame ({self.buffered} of {wanted} bytes of the next part)",
            )

    def _take(self, n: int) -> bytes:
        """Consumes and returns the next n buffered bytes (one copy)."""
        start = self._pos
        with memoryview(self._buf)[start : start + n] as view:
            out = bytes(view)
        self._consume(n)
        return out

    def _consume(self, n: int) -> None:
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > _COMPACT_THRESHOLD and 2 * self._pos > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def _next(self) -> Message | ConnectionClosed | None:
        if self._lengths is None:
            if self.buffered == 0 and self._eof:
                return ConnectionClosed()
            if self.buffered < FRAME_HEADER.size:
                self._need(FRAME_HEADER.size)
                return None
            magic, header_len, payload_len = FRAME_HEADER.unpack_from(self._buf, self._pos)
            if magic != MAGIC:
                raise RemoteProtocolError(ErrorCode.PROTOCOL, f"bad magic 0x{magic:08x}, expected 0x{MAGIC:08x}")
            if header_len == 0:
                raise RemoteProtocolError(ErrorCode.PROTOCOL, "header_len is 0")
            if header_len > self.max_header_size:
                raise RemoteProtocolError(
                    ErrorCode.FRAME_TOO_LARGE, f"header_len {header_len} over the limit {self.max_header_size}"
                )
            if payload_len > self.max_payload_size:
                raise RemoteProtocolError(
                    ErrorCode.FRAME_TOO_LARGE, f"payload_len {payload_len} over the limit {self.max_payload_size}"
                )
            self._consume(FRAME_HEADER.size)
            self._lengths = (header_len, payload_len)
        header_len, payload_len = self._lengths
        if self._pending is None:
            if self.buffered < header_len:
                self._need(header_len)
                return None
            mtype, fields = _parse_header(self._take(header_len))
            if mtype not in _PAYLOAD_TYPES:
                self._lengths = None
                if payload_len:
                    raise RemoteProtocolError(
                        ErrorCode.PROTOCOL,
                        f"{_CLASSES[mtype].__name__} takes no payload, got payload_len {payload_len}",
                    )
                self.frame_size = FRAME_HEADER.size + header_len
                return _build(mtype, fields, None)
            self._pending = (mtype, fields)
            if payload_len >= self.DIRECT_PAYLOAD_MIN:
                # Its own buffer, filled with what is here already (at most
                # one READ_SIZE); the rest is received straight into it.
                self._payload, self._target, self._filled = self._new_payload(payload_len), payload_len, 0
                with memoryview(self._buf) as buf, buf[self._pos :] as rest:
                    n = self._fill(rest)
                self._consume(n)
        payload: bytes | bytearray
        if self._payload is not None:
            if self._filled < payload_len:
                self._need(payload_len)
                return None
            payload, self._payload, self._filled = self._payload, None, 0
        else:
            if self.buffered < payload_len:
                self._need(payload_len)
                return None
            payload = self._take(payload_len)
        mtype, fields = self._pending
        self._lengths = self._pending = None
        self.frame_size = FRAME_HEADER.size + header_len + payload_len
        return _build(mtype, fields, payload)


# --------------------------------------------------------------------------
# Connection state machine
# --------------------------------------------------------------------------


class Role(enum.Enum):
    """Which end of a connection a peer is."""

    CONSUMER = "consumer"
    RELAY = "relay"

    # Members are singletons compared by identity: hashing by identity is
    # consistent with that, and C-level (Enum's own hashes the name in
    # Python, twice per message through TRANSITIONS).
    __hash__ = object.__hash__


class ConnState(enum.Enum):
    """State of one connection, the same on both ends."""

    __hash__ = object.__hash__  # as Role's

    HANDSHAKE_HELLO = "handshake-hello"  # waiting for the consumer's Hello
    HANDSHAKE_REPLY = "handshake-reply"  # Hello sent; relay answers Challenge or Welcome
    HANDSHAKE_AUTH = "handshake-auth"  # Challenge sent; consumer answers Auth
    HANDSHAKE_VERIFY = "handshake-verify"  # Auth sent; relay answers Welcome (or Error)
    ESTABLISHED = "established"
    CONSUMER_BYE = "consumer-bye"  # consumer said Bye; relay may still ack, then Bye
    RELAY_BYE = "relay-bye"  # relay said Bye; consumer's in-flight data, then Bye
    CLOSED = "closed"
    ERROR = "error"


_C, _R, _T, _S = Role.CONSUMER, Role.RELAY, MessageType, ConnState
_CONSUMER_DATA: Final = (
    _T.SESSION_DECL,
    _T.STREAM_DECL,
    _T.METADATA,
    _T.PACKET,
    _T.STREAM_STATE_REQUEST,
    _T.STREAM_CLOSE,
    _T.SESSION_CLOSE,
    _T.CHUNK_CLOSE,
)
_RELAY_DATA: Final = (_T.ACK, _T.STREAM_STATE, _T.RETRY, _T.CHUNK_CLOSED)
_LIVE_STATES: Final = tuple(s for s in ConnState if s not in (_S.CLOSED, _S.ERROR))

# (state, sender, message type) -> next state.  Anything else is an error.
TRANSITIONS: Final[Mapping[tuple[ConnState, Role, MessageType], ConnState]] = types.MappingProxyType(
    {
        (_S.HANDSHAKE_HELLO, _C, _T.HELLO): _S.HANDSHAKE_REPLY,
        (_S.HANDSHAKE_REPLY, _R, _T.CHALLENGE): _S.HANDSHAKE_AUTH,
        (_S.HANDSHAKE_REPLY, _R, _T.WELCOME): _S.ESTABLISHED,
        (_S.HANDSHAKE_AUTH, _C, _T.AUTH): _S.HANDSHAKE_VERIFY,
        (_S.HANDSHAKE_VERIFY, _R, _T.WELCOME): _S.ESTABLISHED,
        **{(_S.ESTABLISHED, _C, t): _S.ESTABLISHED for t in _CONSUMER_DATA},
        **{(_S.ESTABLISHED, _R, t): _S.ESTABLISHED for t in _RELAY_DATA},
        (_S.ESTABLISHED, _C, _T.BYE): _S.CONSUMER_BYE,
        (_S.ESTABLISHED, _R, _T.BYE): _S.RELAY_BYE,
        **{(_S.CONSUMER_BYE, _R, t): _S.CONSUMER_BYE for t in _RELAY_DATA},
        (_S.CONSUMER_BYE, _R, _T.BYE): _S.CLOSED,
        **{(_S.RELAY_BYE, _C, t): _S.RELAY_BYE for t in _CONSUMER_DATA},
        (_S.RELAY_BYE, _C, _T.BYE): _S.CLOSED,
        **{(s, r, _T.ERROR): _S.CLOSED for s in _LIVE_STATES for r in Role},
    }
)
del _C, _R, _T, _S


class _ConnectionState:
    """The role-agnostic state machine plus per-connection bookkeeping.

    process() checks a message against TRANSITIONS and the declarations made
    so far, and only then applies it; a refused message changes nothing.
    """

    def __init__(self, *, max_streams: int, max_sessions: int, max_metadata_size: int) -> None:
        self.state = ConnState.HANDSHAKE_HELLO
        self.max_streams = max_streams
        self.max_sessions = max_sessions
        self.max_metadata_size = max_metadata_size
        self.hello: Hello | None = None
        self.nonce: bytes | None = None
        self.sessions: dict[int, SessionDecl] = {}
        self.streams: dict[int, StreamDecl] = {}
        self.last_seq: dict[int, int] = {}  # open stream -> last Packet.seq (-1: none yet)
        self.rewind: dict[int, int] = {}  # open stream -> seq a Retry asked for, until it is sent
        self.max_stream_id = -1  # highest stream id ever declared

    def process(self, sender: Role, msg: Message, error: type[ProtocolError]) -> None:
        """Checks and applies one message sent by `sender`.

        Raises:
            ProtocolError: of class `error`, if the message is not allowed.
        """
        try:
            new_state = TRANSITIONS[(self.state, sender, msg.msg_type)]
        except KeyError:
            raise error(
                ErrorCode.BAD_STATE,
                f"can't handle {type(msg).__name__} from {sender.name} when state={self.state.name}",
            ) from None
        problem = self._check(msg)
        if problem is not None:
            raise error(*problem)
        self._apply(msg)
        self.state = new_state

    def _stream_problem(self, stream_id: int) -> tuple[ErrorCode, str] | None:
        if stream_id not in self.streams:
            return ErrorCode.PROTOCOL, f"stream {stream_id} is not open on this connection"
        return None

    def _check(self, msg: Message) -> tuple[ErrorCode, str] | None:
        if type(msg) is Packet:  # the common case first
            last = self.last_seq.get(msg.stream_id)
            if last is None:
                return self._stream_problem(msg.stream_id)
            if msg.seq <= last and self.rewind.get(msg.stream_id) != msg.seq:
                return ErrorCode.PROTOCOL, f"stream {msg.stream_id}: seq {msg.seq} after {last}"
            return None
        match msg:
            case Hello():
                if msg.version not in SUPPORTED_VERSIONS:
                    return ErrorCode.VERSION, (
                        f"unsupported protocol version {msg.version}, supported: {sorted(SUPPORTED_VERSIONS)}"
                    )
            case Challenge():
                assert self.hello is not None
                if self.hello.key_id is None:
                    return ErrorCode.AUTH_FAILED, "Challenge for a Hello without key_id (no key configured)"
            case Welcome():
                assert self.hello is not None
                if msg.server_version != self.hello.version:
                    return ErrorCode.VERSION, (
                        f"Welcome.server_version {msg.server_version} != Hello.version {self.hello.version}"
                    )
            case SessionDecl():
                if msg.session_id in self.sessions:
                    return ErrorCode.PROTOCOL, f"session {msg.session_id} is already open"
                if len(self.sessions) >= self.max_sessions:
                    return ErrorCode.LIMIT, f"too many open sessions (limit {self.max_sessions})"
            case StreamDecl():
                if msg.stream_id <= self.max_stream_id:
                    return ErrorCode.PROTOCOL, (
                        f"stream ids must increase: {msg.stream_id} declared after {self.max_stream_id}"
                    )
                if msg.session_id not in self.sessions:
                    return ErrorCode.PROTOCOL, f"stream {msg.stream_id} names unknown session {msg.session_id}"
                if len(self.streams) >= self.max_streams:
                    return ErrorCode.LIMIT, f"too many open streams (limit {self.max_streams})"
            case Metadata():
                if msg.session_id not in self.sessions:
                    return ErrorCode.PROTOCOL, f"metadata for unknown session {msg.session_id}"
                end = msg.offset + _buffer_len(msg.data, "Metadata.data")
                if end > self.max_metadata_size:
                    return ErrorCode.LIMIT, f"metadata would reach {end} bytes (limit {self.max_metadata_size})"
            case StreamStateRequest() | StreamClose():
                return self._stream_problem(msg.stream_id)
            case SessionClose():
                if msg.session_id not in self.sessions:
                    return ErrorCode.PROTOCOL, f"session {msg.session_id} is not open"
            case ChunkClose() | ChunkClosed():
                assert self.hello is not None
                if self.hello.version < CHUNKS_VERSION:
                    return ErrorCode.BAD_STATE, (
                        f"{type(msg).__name__} needs protocol {CHUNKS_VERSION}, this connection speaks "
                        f"{self.hello.version}")
                if isinstance(msg, ChunkClose) and msg.session_id not in self.sessions:
                    return ErrorCode.PROTOCOL, f"ChunkClose for session {msg.session_id}, which is not open"
            case Ack() | StreamState() | Retry():
                # The stream may have been closed meanwhile; it must have existed.
                if msg.stream_id > self.max_stream_id:
                    return ErrorCode.PROTOCOL, f"{type(msg).__name__} for undeclared stream {msg.stream_id}"
                # A Retry names a packet the relay received (so the rewind
                # is used up by the resend on both ends, never by a packet
                # already in flight).
                if isinstance(msg, Retry) and msg.stream_id in self.streams \
                        and msg.seq > self.last_seq[msg.stream_id]:
                    return ErrorCode.PROTOCOL, (
                        f"Retry for stream {msg.stream_id} at seq {msg.seq}, "
                        f"after seq {self.last_seq[msg.stream_id]} was sent"
                    )
        return None

    def _apply(self, msg: Message) -> None:
        if type(msg) is Packet:  # the common case first
            self.last_seq[msg.stream_id] = msg.seq
            if self.rewind and self.rewind.get(msg.stream_id) == msg.seq:
                del self.rewind[msg.stream_id]
            return
        match msg:
            case Hello():
                self.hello = msg
            case Challenge():
                self.nonce = msg.nonce
            case SessionDecl():
                self.sessions[msg.session_id] = msg
            case StreamDecl():
                self.streams[msg.stream_id] = msg
                self.last_seq[msg.stream_id] = -1
                self.max_stream_id = msg.stream_id
            case Retry():
                if msg.stream_id in self.streams:
                    self.rewind[msg.stream_id] = msg.seq
            case StreamClose():
                self._forget_stream(msg.stream_id)
            case SessionClose():
                del self.sessions[msg.session_id]
                for sid in [s for s, decl in self.streams.items() if decl.session_id == msg.session_id]:
                    self._forget_stream(sid)

    def _forget_stream(self, stream_id: int) -> None:
        del self.streams[stream_id], self.last_seq[stream_id]
        self.rewind.pop(stream_id, None)


class Connection:
    """One end of a consumer <-> relay connection, without I/O.

    Args:
        our_role: CONSUMER or RELAY.
        require_auth: RELAY only: insist on the Challenge/Auth exchange.
        max_header_size: largest CBOR header accepted or sent.
        max_payload_size: largest payload accepted or sent.
        max_streams: open streams allowed on this connection.
        max_sessions: open sessions allowed on this connection.
        max_metadata_size: largest metadata offset + length accepted.
        pool_bytes: received payload buffers kept for reuse (see recycle).

    Raises:
        ValueError: if require_auth is set for the CONSUMER role.
    """

    def __init__(
        self,
        our_role: Role,
        *,
        require_auth: bool = False,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_metadata_size: int = DEFAULT_MAX_METADATA_SIZE,
        pool_bytes: int = 0,
    ) -> None:
        if require_auth and our_role is not Role.RELAY:
            raise ValueError("require_auth is a relay setting")
        self.our_role = our_role
        self.their_role = Role.RELAY if our_role is Role.CONSUMER else Role.CONSUMER
        self.require_auth = require_auth
        self.max_header_size = max_header_size
        self.max_payload_size = max_payload_size
        self.error: ProtocolError | None = None
        self._decoder = FrameDecoder(
            max_header_size=max_header_size, max_payload_size=max_payload_size, pool_bytes=pool_bytes
        )
        self._machine = _ConnectionState(
            max_streams=max_streams, max_sessions=max_sessions, max_metadata_size=max_metadata_size
        )

    def __repr__(self) -> str:
        return f"<Connection {self.our_role.name} state={self.state.name}>"

    @property
    def state(self) -> ConnState:
        """The connection's current state."""
        return self._machine.state

    @property
    def hello(self) -> Hello | None:
        """The Hello of the handshake, once sent or received."""
        return self._machine.hello

    @property
    def nonce(self) -> bytes | None:
        """The Challenge nonce of the handshake, once sent or received."""
        return self._machine.nonce

    @property
    def sessions(self) -> Mapping[int, SessionDecl]:
        """Open sessions by id (read-only view)."""
        return types.MappingProxyType(self._machine.sessions)

    @property
    def streams(self) -> Mapping[int, StreamDecl]:
        """Open streams by id (read-only view)."""
        return types.MappingProxyType(self._machine.streams)

    def _enter_error(self, exc: ProtocolError) -> None:
        if self.error is None:
            self.error = exc
        self._machine.state = ConnState.ERROR

    def send_parts(self, msg: Message) -> list[Buffer]:
        """Checks that we may send `msg` now and encodes it (see encode_parts).

        In ERROR state only an Error message may still be sent.

        Args:
            msg: the message to send.

        Returns:
            The frame as [header bytes] or [header bytes, payload].

        Raises:
            LocalProtocolError: if `msg` is not allowed now (BAD_STATE,
                VERSION, AUTH_FAILED, PROTOCOL, LIMIT) or is too large
                (FRAME_TOO_LARGE); the connection is then in ERROR.
            TypeError: if `msg` is not a message.
        """
        if self.state is ConnState.ERROR:
            if isinstance(msg, Error):
                return encode_parts(msg, max_header_size=self.max_header_size, max_payload_size=self.max_payload_size)
            raise LocalProtocolError(
                ErrorCode.BAD_STATE, f"can't send {type(msg).__name__} when state=ERROR (only Error)"
            )
        try:
            parts = encode_parts(msg, max_header_size=self.max_header_size, max_payload_size=self.max_payload_size)
            if (
                self.require_auth
                and isinstance(msg, Welcome)
                and self.state is ConnState.HANDSHAKE_REPLY
            ):
                raise LocalProtocolError(ErrorCode.BAD_STATE, "require_auth is set: answer Hello with Challenge")
            self._machine.process(self.our_role, msg, LocalProtocolError)
        except LocalProtocolError as exc:
            self._enter_error(exc)
            raise
        return parts

    def send(self, msg: Message) -> bytes:
        """Like send_parts, but returns the frame as one bytes object.

        Raises:
            LocalProtocolError: see send_parts.
            TypeError: if `msg` is not a message.
        """
        return b"".join(self.send_parts(msg))

    def send_failed(self) -> None:
        """Tells the connection that writing a frame failed: it is now broken."""
        self._enter_error(LocalProtocolError(ErrorCode.INTERNAL, "sending a frame failed"))

    def receive_data(self, data: Buffer) -> None:
        """Buffers bytes from the peer (b"" for EOF); see next_event.

        Raises:
            RemoteProtocolError: if the connection is in ERROR.
            LocalProtocolError: (BAD_STATE) for data after EOF.
        """
        if self.state is ConnState.ERROR:
            raise self._refusal()
        self._decoder.receive_data(data)

    def receive_buffer(self) -> memoryview:
        """A writable buffer to receive the next bytes from the peer into,
        without a copy (see FrameDecoder); commit them with received().

        Raises:
            RemoteProtocolError: if the connection is in ERROR.
            LocalProtocolError: (BAD_STATE) after EOF.
        """
        if self.state is ConnState.ERROR:
            raise self._refusal()
        return self._decoder.receive_buffer()

    def received(self, n: int) -> None:
        """Commits `n` bytes received into the last receive_buffer() (0: EOF).

        Raises:
            RemoteProtocolError: if the connection is in ERROR.
            LocalProtocolError: (BAD_STATE) if no buffer of that size was lent.
        """
        if self.state is ConnState.ERROR:
            raise self._refusal()
        self._decoder.received(n)

    def recycle(self, data: Buffer) -> None:
        """Hands back a received message's `data` once nothing uses it any
        more (see FrameDecoder.recycle)."""
        self._decoder.recycle(data)

    @property
    def bytes_needed(self) -> int:
        """At least how many more bytes the next event needs (see FrameDecoder)."""
        return self._decoder.bytes_needed

    def release_buffers(self) -> None:
        """Frees the receive buffers kept for reuse (see FrameDecoder)."""
        self._decoder.release_buffers()

    def _refusal(self) -> RemoteProtocolError:
        code = self.error.code if self.error is not None else ErrorCode.INTERNAL
        text = self.error.message if self.error is not None else "unknown"
        return RemoteProtocolError(code, f"connection already failed: {text}")

    @property
    def last_frame_size(self) -> int:
        """Bytes on the wire (the whole frame) of the last message next_event() returned."""
        return self._decoder.frame_size

    def next_event(self) -> Event | None:
        """Returns the next message from the peer, checked against the state.

        Returns:
            A message; ConnectionClosed once the peer closed between frames
            (the state is then CLOSED); None if more bytes are needed.

        Raises:
            RemoteProtocolError: if the peer broke the protocol (malformed
                frame, message not allowed in this state, bad version, Hello
                without key_id when require_auth...). The connection is then
                in ERROR and every later call raises again.
        """
        if self.state is ConnState.ERROR:
            raise self._refusal()
        try:
            event = self._decoder.next_event()
            if event is None:
                return None
            if isinstance(event, ConnectionClosed):
                self._machine.state = ConnState.CLOSED
                return event
            self._machine.process(self.their_role, event, RemoteProtocolError)
            if self.require_auth and isinstance(event, Hello) and event.key_id is None:
                raise RemoteProtocolError(ErrorCode.AUTH_FAILED, "this relay requires a key; Hello has no key_id")
        except RemoteProtocolError as exc:
            self._enter_error(exc)
            raise
        return event


# --------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------


def compute_auth_mac(secret: bytes, nonce: bytes, hostname: str, key_id: str) -> bytes:
    """Computes the Auth.mac answering a Challenge.

    mac = HMAC-SHA256(secret, AUTH_CONTEXT + nonce + hostname + b"\\0" + key_id)
    with the strings UTF-8 encoded.  The nonce has a fixed size and names
    contain no NUL, so the input is unambiguous.

    Args:
        secret: the shared secret of `key_id`.
        nonce: Challenge.nonce.
        hostname: Hello.hostname.
        key_id: Hello.key_id.

    Returns:
        The 32-byte MAC.

    Raises:
        ValueError: if `secret` is empty or `nonce` is not NONCE_SIZE bytes.
    """
    if not secret:
        raise ValueError("empty auth secret")
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    data = b"".join((AUTH_CONTEXT, nonce, hostname.encode(), b"\0", key_id.encode()))
    return hmac.new(secret, data, hashlib.sha256).digest()


def verify_auth_mac(secret: bytes, nonce: bytes, hostname: str, key_id: str, mac: bytes) -> bool:
    """Checks an Auth.mac in constant time; see compute_auth_mac.

    Returns:
        True if `mac` is right.

    Raises:
        ValueError: as compute_auth_mac.
    """
    return hmac.compare_digest(compute_auth_mac(secret, nonce, hostname, key_id), mac)


# --------------------------------------------------------------------------
# Packet compression
# --------------------------------------------------------------------------


def new_compressor(level: int = 3) -> zstandard.ZstdCompressor:
    """Returns a compressor suitable for compress_packet.

    A ZstdCompressor is not thread-safe: keep one per task or thread.
    """
    return zstandard.ZstdCompressor(level=level, write_content_size=True)


def compress_packet(
    data: Buffer, level: int = 3, *, compressor: zstandard.ZstdCompressor | None = None
) -> bytes:
    """Compresses one packet into one zstd frame that declares its size.

    Args:
        data: the raw packet.
        level: zstd level, used when no compressor is given.
        compressor: a compressor from new_compressor(), reused across calls
            (never shared between threads).  Created per call when None.

    Returns:
        The zstd frame.
    """
    if compressor is None:
        compressor = new_compressor(level)
    return compressor.compress(data)


def new_decompressor(max_raw: int) -> zstandard.ZstdDecompressor:
    """Returns a decompressor for decompress_packet, its window bounded by
    `max_raw`.  Not thread-safe: keep one per task or thread."""
    return zstandard.ZstdDecompressor(max_window_size=1 << max(10, (max_raw - 1).bit_length()))


def decompress_packet(
    data: Buffer, codec: Codec, raw_len: int, max_raw: int, *,
    decompressor: zstandard.ZstdDecompressor | None = None,
) -> Buffer:
    """Decodes a Packet's data, never producing more than `max_raw` bytes.

    For ZSTD the payload must be exactly one frame declaring its content
    size; that size is checked against raw_len and max_raw before any
    decompression (a frame declaring 4 GiB costs nothing to reject).

    Args:
        data: Packet.data.
        codec: Packet.codec.
        raw_len: Packet.raw_len.
        max_raw: largest packet the caller accepts.
        decompressor: from new_decompressor(max_raw), reused across calls
            (never shared between threads); created per call when None.

    Returns:
        The raw packet, raw_len bytes (for NONE: `data` itself, no copy).

    Raises:
        RemoteProtocolError: (DECOMPRESS) on bad zstd data, a missing or
            wrong declared size, trailing data, or a size over max_raw.
    """
    if raw_len > max_raw:
        raise RemoteProtocolError(ErrorCode.DECOMPRESS, f"raw_len {raw_len} over the limit {max_raw}")
    if codec is Codec.NONE:
        if len(data) != raw_len:
            raise RemoteProtocolError(
                ErrorCode.DECOMPRESS, f"uncompressed packet has {len(data)} bytes, raw_len {raw_len}")
        return data
    if codec is not Codec.ZSTD:
        raise RemoteProtocolError(ErrorCode.DECOMPRESS, f"unknown codec {codec!r}")
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(ErrorCode.DECOMPRESS, f"not a zstd frame: {exc}") from exc
    if declared < 0:
        raise RemoteProtocolError(ErrorCode.DECOMPRESS, "zstd frame does not declare its content size")
    if declared != raw_len:
        raise RemoteProtocolError(ErrorCode.DECOMPRESS, f"zstd frame declares {declared} bytes, raw_len {raw_len}")
    # libzstd writes into a buffer of the declared size, which is now
    # <= max_raw, and fails on a frame that would need more, ends early, or
    # is followed by any byte; the window limit bounds its own buffers.
    if decompressor is None:
        decompressor = new_decompressor(max_raw)
    try:
        out = decompressor.decompress(data, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(ErrorCode.DECOMPRESS, f"bad zstd data: {exc}") from exc
    if len(out) != raw_len:
        raise RemoteProtocolError(ErrorCode.DECOMPRESS, f"zstd frame gave {len(out)} bytes, raw_len {raw_len}")
    return out
