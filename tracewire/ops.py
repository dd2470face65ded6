"""The typed local control plane: CLI → sessiond requests, sessiond → consumerd
operations, and consumerd's replies.

Theory of operation
-------------------
Every message is a frozen dataclass.  On the wire (``tracewire.control``
frames: JSON objects) a message is its fields plus one discriminator key:
``"cmd"`` for a CLI request, ``"op"`` for a consumerd operation; a consumerd
reply carries ``"ok"`` and the request's ``"seq"``.  There is one encoder
(:func:`encode`) and one decoder per direction (:func:`decode_request`,
:func:`decode_op`, :func:`decode_reply`); each receiver then dispatches with a
single ``match`` on the message's class.

Decoding is the boundary where a peer's input is checked: every field is
checked against its annotated type (``bool`` is not an ``int``, a string has a
bounded length, a nested value has the declared shape), unknown fields are
refused, and each class checks its ranges in ``__post_init__``.  Anything wrong
raises :class:`MessageError` with the field's name, so a receiver answers with
one line and never with a traceback.  A missing field, or one given as
``null``, takes the class's default when it has one.

This module is stdlib-only and imports no I/O framework: the defaults shared by
the CLI, sessiond and consumerd (sub-buffer geometry, spool size, compression
level) are defined here, once.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, Union

__all__ = [
    "DEFAULT_CHANNEL", "DEFAULT_COMPRESS_LEVEL", "DEFAULT_NUM_SUBBUF", "DEFAULT_SPOOL_SIZE",
    "DEFAULT_SUBBUF_SIZE", "DEFAULT_FLUSH_TIMEOUT", "BLOCK_FOREVER", "DEFAULT_REMOVE_TIMEOUT", "MIN_SPOOL_SIZE",
    "MAX_STRING", "REPLY_TO", "Compression", "RelayState", "MessageError", "human_size",
    "Request", "PingRequest", "CreateRequest", "EnableChannelRequest", "EnableEventRequest",
    "StartRequest", "StopRequest", "DestroyRequest", "ListRequest", "StatusRequest",
    "SnapshotRecordRequest", "RotateRequest", "EnableRotationRequest", "DisableRotationRequest",
    "Op", "HelloOp", "SessionOp", "AddTraceOp", "MetadataOp", "AddStreamOp", "FlushOp",
    "ProducerGoneOp", "RemoveSessionOp", "StatusOp", "SnapshotOp", "RotateOp",
    "Reply", "DoneReply", "HelloReply", "TraceReply", "StreamStats", "StreamsReply",
    "ReleasedReply", "SnapshotReply", "ErrorReply", "RotatedReply", "chunk_prefix",
    "encode", "decode_request", "decode_op", "decode_reply", "short_repr",
]

DEFAULT_CHANNEL = "channel0"
DEFAULT_SUBBUF_SIZE = 256 * 1024
DEFAULT_NUM_SUBBUF = 4
DEFAULT_SPOOL_SIZE = 64 * 1024 * 1024
MIN_SPOOL_SIZE = 1024 * 1024
DEFAULT_COMPRESS_LEVEL = 1
DEFAULT_FLUSH_TIMEOUT = 120.0
DEFAULT_REMOVE_TIMEOUT = 30.0
BLOCK_FOREVER = -1  # blocking_timeout_ms: an app waits for space for ever ('inf')
MAX_STRING = 4096  # any string field but metadata text
MAX_LIST = 100_000  # entries in a list field
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

_T = TypeVar("_T")


class MessageError(ValueError):
    """A control message that does not decode: unknown kind, missing field,
    wrong type or value out of range.  The text names the field."""


class Compression(enum.Enum):
    ZSTD = "zstd"
    NONE = "none"


class RelayState(enum.Enum):
    """Why a relay stream's packets are not being acknowledged now
    (``StreamStats.relay``; ``StreamStats.relay_why`` holds the detail).

    All but ``REFUSED`` heal: the packets stay on the target (in consumerd's
    memory and spool, and in the ring buffers once the spool is full) and
    go out once the relay takes them again.
    """

    FULL = "full"  # the relay's disk or quota is full: the stream is held, retried
    READ_ONLY = "read-only"  # the relay's filesystem went read-only: held, retried
    IO_ERROR = "io-error"  # the relay's disk failed a write: held, retried
    BUSY = "busy"  # another failure the relay expects to heal: held, retried
    UNAVAILABLE = "unavailable"  # the relay closed the connection for now: reconnecting
    UNREACHABLE = "unreachable"  # no connection to the relay: reconnecting
    REFUSED = "refused"  # the session failed for good: what is unacknowledged is lost

    def describe(self, why: str | None) -> str:
        """The state as ``status`` and ``stop`` word it, with its detail."""
        words = _RELAY_WORDS[self]
        return f"{words} ({why})" if why else words


_RELAY_WORDS: Mapping[RelayState, str] = types.MappingProxyType({
    RelayState.FULL: "relay full, retrying",
    RelayState.READ_ONLY: "relay read-only, retrying",
    RelayState.IO_ERROR: "relay I/O error, retrying",
    RelayState.BUSY: "relay busy, retrying",
    RelayState.UNAVAILABLE: "relay unavailable, retrying",
    RelayState.UNREACHABLE: "relay unreachable, retrying",
    RelayState.REFUSED: "relay session failed for good",
})


def human_size(n: float) -> str:
    """``n`` bytes for people: ``512 B``, ``4.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _require(cond: bool, why: str) -> None:
    if not cond:
        raise MessageError(why)


def _check_tracefile_limits(size: int, count: int, subbuf_size: int) -> None:
    """``--tracefile-size`` / ``--tracefile-count``: a count needs a size
    (as in LTTng), and a file must hold at least one whole sub-buffer (LTTng
    rounds a smaller size up to the sub-buffer size, with a warning; we
    refuse it, so that the bound a user reads in ``list`` is the one given)."""
    _require(0 <= size < 2**63 and 0 <= count < 2**63, "--tracefile-size and --tracefile-count must be >= 0")
    _require(size > 0 or count == 0,
             "--tracefile-count needs --tracefile-size (a file count without a size limits nothing)")
    _require(size == 0 or size >= subbuf_size,
             f"--tracefile-size {human_size(size)} is smaller than the sub-buffer size "
             f"{human_size(subbuf_size)}: a stream file holds at least one whole packet")


# ---------------------------------------------------------------- CLI → sessiond
@dataclass(frozen=True, slots=True)
class Request:
    """A request on sessiond's ``control.sock``."""

    KIND: ClassVar[str] = ""


@dataclass(frozen=True, slots=True)
class PingRequest(Request):
    KIND: ClassVar[str] = "ping"


# A live session's timer: every stream hands over what it holds (or, idle,
# an empty packet saying how far its time has come) at least this often.
DEFAULT_LIVE_TIMER_US = 100_000
MIN_LIVE_TIMER_US = 10_000
MAX_LIVE_TIMER_US = 60_000_000


@dataclass(frozen=True, slots=True)
class CreateRequest(Request):
    KIND: ClassVar[str] = "create"
    name: str
    output: str | None = None
    url: str | None = None
    compress: Compression = Compression.ZSTD
    compress_level: int = DEFAULT_COMPRESS_LEVEL
    spool_size: int = DEFAULT_SPOOL_SIZE
    auth_key_file: str | None = None
    tls_ca: str | None = None
    snapshot: bool = False  # a flight-recorder session: nothing is consumed while tracing
    live_timer_us: int = 0  # a live session's timer (0: not live); see docs/design.md, "Live viewing"

    def __post_init__(self) -> None:
        _require(1 <= self.compress_level <= 22, "--compress-level must be between 1 and 22")
        _require(MIN_SPOOL_SIZE <= self.spool_size <= 2**48, "--spool-size must be at least 1M")
        _require(self.live_timer_us == 0 or MIN_LIVE_TIMER_US <= self.live_timer_us <= MAX_LIVE_TIMER_US,
                 f"--live must be between {MIN_LIVE_TIMER_US} and {MAX_LIVE_TIMER_US} microseconds")


@dataclass(frozen=True, slots=True)
class EnableChannelRequest(Request):
    KIND: ClassVar[str] = "enable_channel"
    session: str | None = None
    channel: str = DEFAULT_CHANNEL
    subbuf_size: int = DEFAULT_SUBBUF_SIZE
    num_subbuf: int = DEFAULT_NUM_SUBBUF
    overwrite: bool = False
    discard: bool = False  # both False: the session's default (overwrite in a snapshot session)
    switch_timer_ms: int = 0
    # How long an app waits for space in a full ring before it drops the
    # event: 0 never (discard mode, the default), BLOCK_FOREVER for ever.
    blocking_timeout_ms: int = 0
    # Per-stream file limits, LTTng's --tracefile-size / --tracefile-count
    # (0: no limit): files of at most this many bytes, the newest kept.
    tracefile_size: int = 0
    tracefile_count: int = 0

    def __post_init__(self) -> None:
        _require(self.subbuf_size > 0 and self.num_subbuf > 0, "sub-buffer size and count must be positive")
        _require(0 <= self.switch_timer_ms <= 2**31, "switch timer must be >= 0 ms")
        _require(self.blocking_timeout_ms == BLOCK_FOREVER or 0 <= self.blocking_timeout_ms <= 2**31,
                 "blocking timeout must be >= 0 ms, or 'inf'")
        _require(not (self.overwrite and self.discard), "give --overwrite or --discard, not both")
        _check_tracefile_limits(self.tracefile_size, self.tracefile_count, self.subbuf_size)


@dataclass(frozen=True, slots=True)
class EnableEventRequest(Request):
    KIND: ClassVar[str] = "enable_event"
    pattern: str
    session: str | None = None
    channel: str | None = None

    def __post_init__(self) -> None:
        _require(0 < len(self.pattern) <= 255 and "\0" not in self.pattern,
                 "event pattern must be 1 to 255 characters, e.g. 'demo:*'")


@dataclass(frozen=True, slots=True)
class _SessionRequest(Request):
    """A request about one session (None: the caller's current one)."""

    session: str | None = None


@dataclass(frozen=True, slots=True)
class StartRequest(_SessionRequest):
    KIND: ClassVar[str] = "start"


@dataclass(frozen=True, slots=True)
class StopRequest(_SessionRequest):
    """``timeout``: how long the barrier may wait for the sink (None:
    sessiond's ``--stop-timeout``)."""

    KIND: ClassVar[str] = "stop"
    timeout: float | None = None

    def __post_init__(self) -> None:
        _require(self.timeout is None or 0 < self.timeout <= 10**6,
                 "--timeout must be more than 0 and at most 1000000 seconds")


@dataclass(frozen=True, slots=True)
class DestroyRequest(_SessionRequest):
    KIND: ClassVar[str] = "destroy"


@dataclass(frozen=True, slots=True)
class ListRequest(_SessionRequest):
    KIND: ClassVar[str] = "list"


@dataclass(frozen=True, slots=True)
class StatusRequest(_SessionRequest):
    KIND: ClassVar[str] = "status"


@dataclass(frozen=True, slots=True)
class SnapshotRecordRequest(_SessionRequest):
    """``snapshot record``: the buffers' content as a trace of its own, in
    ``NAME-YYYYmmdd-HHMMSS-SEQ`` below the session's output (or ``output``
    / ``url``); ``max_size`` 0 = no limit."""

    KIND: ClassVar[str] = "snapshot_record"
    name: str | None = None
    max_size: int = 0
    output: str | None = None
    url: str | None = None

    def __post_init__(self) -> None:
        _require(0 <= self.max_size <= 2**48, "--max-size out of range")
        _require(not (self.output and self.url), "give --output or --url, not both")


@dataclass(frozen=True, slots=True)
class RotateRequest(_SessionRequest):
    """Archive the session's current trace chunk now (``tracewire rotate``)."""

    KIND: ClassVar[str] = "rotate"


@dataclass(frozen=True, slots=True)
class EnableRotationRequest(Request):
    """Rotate automatically every ``timer_ms`` and/or once the current chunk
    holds ``size`` bytes (0: that condition is not set; one must be)."""

    KIND: ClassVar[str] = "enable_rotation"
    session: str | None = None
    timer_ms: int = 0
    size: int = 0

    def __post_init__(self) -> None:
        _require(0 <= self.timer_ms <= 2**40, "--timer out of range")
        _require(0 <= self.size <= 2**60, "--size out of range")
        _require(self.timer_ms > 0 or self.size > 0, "give --timer T or --size S (or both)")


@dataclass(frozen=True, slots=True)
class DisableRotationRequest(_SessionRequest):
    """Remove the session's rotation schedule (both conditions)."""

    KIND: ClassVar[str] = "disable_rotation"


# ------------------------------------------------------------- sessiond → consumerd
@dataclass(frozen=True, slots=True)
class Op:
    """An operation sessiond asks of consumerd (descriptors travel beside it)."""

    KIND: ClassVar[str] = ""


@dataclass(frozen=True, slots=True)
class HelloOp(Op):
    KIND: ClassVar[str] = "hello"


@dataclass(frozen=True, slots=True)
class SessionOp(Op):
    """Declare a session and its sink (a directory, or a relay URL)."""

    KIND: ClassVar[str] = "session"
    session: str
    session_id: int
    created: str
    sink: str
    hostname: str
    uid: int
    gid: int
    compress: Compression = Compression.ZSTD
    compress_level: int = DEFAULT_COMPRESS_LEVEL
    auth_key_file: str | None = None
    tls_ca: str | None = None
    live: bool = False
    spool_dir: str | None = None
    spool_size: int = DEFAULT_SPOOL_SIZE
    snapshot: bool = False  # rings are only read by SnapshotOp; ``sink`` is where snapshots go
    # The session's current trace chunk (0 until its first rotation): a
    # restarted consumerd writes into it (see chunk_prefix).
    chunk: int = 0

    def __post_init__(self) -> None:
        _require(1 <= self.compress_level <= 22, "compress_level must be between 1 and 22")
        _require(self.spool_size > 0, "spool_size must be positive")
        _require(0 <= self.chunk < 2**32, "chunk out of range")


@dataclass(frozen=True, slots=True)
class AddTraceOp(Op):
    """One app's trace directory (``path`` below the session's sink)."""

    KIND: ClassVar[str] = "add_trace"
    trace_id: str
    session: str
    path: str
    uuid: str  # 32 hex digits

    def __post_init__(self) -> None:
        try:
            ok = len(bytes.fromhex(self.uuid)) == 16
        except ValueError:
            ok = False
        _require(ok, "uuid must be 32 hex digits")

    @property
    def uuid_bytes(self) -> bytes:
        return bytes.fromhex(self.uuid)


@dataclass(frozen=True, slots=True)
class MetadataOp(Op):
    """TSDL text for a trace's metadata, starting at byte ``offset`` of it
    (UTF-8).  The sink writes only what it does not hold yet, so sending a
    piece again (the replay to a restarted consumerd) is harmless; a piece
    that would leave a gap is refused.  Pieces are at most
    ``MAX_CHARS`` characters: a SEQPACKET message must fit the socket's
    buffer whole."""

    KIND: ClassVar[str] = "metadata"
    MAX_CHARS: ClassVar[int] = 16 * 1024
    STRING_LIMITS: ClassVar[Mapping[str, int]] = types.MappingProxyType({"text": MAX_CHARS})
    trace_id: str
    text: str
    offset: int = 0

    def __post_init__(self) -> None:
        _require(self.offset >= 0, "offset must be >= 0")


@dataclass(frozen=True, slots=True)
class AddStreamOp(Op):
    """A stream's ring buffer (memfd, eventfd) is passed beside this message,
    and for a blocking channel a third descriptor: the write end of the
    pipe that wakes a producer waiting for space; ``gone`` (a replayed
    stream whose app exited and whose ring was freed) comes without
    descriptors."""

    KIND: ClassVar[str] = "add_stream"
    key: str
    trace_id: str
    session: str
    channel: str
    stream_class: int
    subbuf_size: int
    num_subbuf: int
    switch_timer_ms: int = 0
    replay: bool = False
    gone: bool = False
    tracefile_size: int = 0  # 0: one stream file
    tracefile_count: int = 0  # 0: every file kept

    def __post_init__(self) -> None:
        _require(0 <= self.stream_class < 2**32, "stream_class out of range")
        _require(0 <= self.switch_timer_ms <= 2**31, "switch_timer_ms out of range")
        _check_tracefile_limits(self.tracefile_size, self.tracefile_count, self.subbuf_size)


@dataclass(frozen=True, slots=True)
class FlushOp(Op):
    """The stop barrier: drain every stream of the session and wait for the
    relay's acknowledgements, for at most ``timeout`` seconds."""

    KIND: ClassVar[str] = "flush"
    session: str
    timeout: float = DEFAULT_FLUSH_TIMEOUT

    def __post_init__(self) -> None:
        _require(0 < self.timeout <= 10**6, "timeout out of range")


@dataclass(frozen=True, slots=True)
class ProducerGoneOp(Op):
    """The stream's app is gone.  A snapshot session's ring is kept (for the
    next snapshots) unless ``release``: sessiond frees it then."""

    KIND: ClassVar[str] = "producer_gone"
    key: str
    release: bool = False


@dataclass(frozen=True, slots=True)
class RemoveSessionOp(Op):
    KIND: ClassVar[str] = "remove_session"
    session: str
    timeout: float = DEFAULT_REMOVE_TIMEOUT

    def __post_init__(self) -> None:
        _require(0 < self.timeout <= 10**6, "timeout out of range")


@dataclass(frozen=True, slots=True)
class StatusOp(Op):
    KIND: ClassVar[str] = "status"
    session: str


@dataclass(frozen=True, slots=True)
class SnapshotOp(Op):
    """Copy every stream of the session out of its ring and write the copy as
    the traces ``<directory>/<trace path>`` below ``sink`` (a directory or a
    relay URL; None: the session's own), each stream keeping at most
    ``max_size // streams`` bytes (0: no limit); wait at most ``timeout``
    for a relay's acknowledgements."""

    KIND: ClassVar[str] = "snapshot"
    session: str
    directory: str
    sink: str | None = None
    max_size: int = 0
    timeout: float = DEFAULT_FLUSH_TIMEOUT

    def __post_init__(self) -> None:
        _require(0 <= self.max_size <= 2**48, "max_size out of range")
        _require(0 < self.timeout <= 10**6, "timeout out of range")


@dataclass(frozen=True, slots=True)
class RotateOp(Op):
    """Close the session's current trace chunk (``chunk``) as
    ``archives/<archive>`` and go on in chunk ``chunk + 1``: every stream is
    drained to its last whole event and switched to the next chunk's files;
    the reply comes once the closed chunk is complete in the sink (written,
    or acknowledged by the relay and moved there), within ``timeout`` s."""

    KIND: ClassVar[str] = "rotate"
    session: str
    chunk: int
    archive: str
    timeout: float = DEFAULT_FLUSH_TIMEOUT
    # The session is being destroyed (its apps stopped): its streams are
    # closed instead of switched, no next chunk is begun.
    last: bool = False

    def __post_init__(self) -> None:
        _require(0 <= self.chunk < 2**32 - 1, "chunk out of range")
        _require(0 < self.timeout <= 10**6, "timeout out of range")


# ------------------------------------------------------------- consumerd → sessiond
@dataclass(frozen=True, slots=True)
class Reply:
    """consumerd's answer to one :class:`Op` (matched by ``seq``)."""


@dataclass(frozen=True, slots=True)
class DoneReply(Reply):
    """The operation was carried out; nothing to report."""


@dataclass(frozen=True, slots=True)
class HelloReply(Reply):
    pid: int


@dataclass(frozen=True, slots=True)
class TraceReply(Reply):
    directory: str


@dataclass(frozen=True, slots=True)
class StreamStats:
    """One stream's counters, as ``status`` and ``stop`` show them."""

    key: str
    path: str
    channel: str
    packets: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    discarded: int = 0
    unacked: int = 0
    producer: str = "alive"
    error: str | None = None
    # A relay stream: the bytes its ``unacked`` packets take on the target
    # (compressed once compressed), and why the relay does not take them
    # now (None: it does, or the sink is local).
    unacked_bytes: int = 0
    relay: RelayState | None = None
    relay_why: str | None = None
    # Sub-buffers of the ring holding events not read yet (each becomes a
    # packet): data left in the ring while the sink has no room.
    ring_unread: int = 0
    # Raw bytes written to the session's current trace chunk (rotation by size).
    chunk_bytes: int = 0
    # A relay stream: connections its session made to the relay after the
    # first (the same on each of the session's streams); None: a local sink.
    relay_reconnects: int | None = None


@dataclass(frozen=True, slots=True)
class StreamsReply(Reply):
    streams: tuple[StreamStats, ...] = ()


@dataclass(frozen=True, slots=True)
class ReleasedReply(Reply):
    """``producer_gone``: whether the dead app's ring may be freed now."""

    released: bool


@dataclass(frozen=True, slots=True)
class SnapshotReply(Reply):
    """What ``snapshot`` wrote: where, how much, and what it left out
    (``torn``: sub-buffers overwritten while copied; ``skipped``: older ones
    over ``max_size``; ``overwritten``: sub-buffers the ring no longer held,
    as the packet sequence numbers report them; ``broken``: streams whose
    control words were corrupt)."""

    path: str
    streams: int = 0
    packets: int = 0
    bytes: int = 0
    events_discarded: int = 0
    overwritten: int = 0
    torn: int = 0
    skipped: int = 0
    broken: int = 0


@dataclass(frozen=True, slots=True)
class RotatedReply(Reply):
    """``rotate``: where the closed chunk is (a directory, or for a relay
    its path below the relay's output directory)."""

    path: str


@dataclass(frozen=True, slots=True)
class ErrorReply(Reply):
    """A refusal (``internal`` false: the request cannot be done) or an
    internal error (a bug, logged with its traceback by the receiver)."""

    error: str
    internal: bool = False


_REQUESTS: Mapping[str, type[Request]] = {
    c.KIND: c for c in (PingRequest, CreateRequest, EnableChannelRequest, EnableEventRequest,
                        StartRequest, StopRequest, DestroyRequest, ListRequest, StatusRequest,
                        SnapshotRecordRequest, RotateRequest, EnableRotationRequest, DisableRotationRequest)
}
_OPS: Mapping[str, type[Op]] = {
    c.KIND: c for c in (HelloOp, SessionOp, AddTraceOp, MetadataOp, AddStreamOp, FlushOp,
                        ProducerGoneOp, RemoveSessionOp, StatusOp, SnapshotOp, RotateOp)
}
# What each operation answers when it succeeds.
REPLY_TO: Mapping[type[Op], type[Reply]] = {
    HelloOp: HelloReply, SessionOp: DoneReply, AddTraceOp: TraceReply, MetadataOp: DoneReply,
    AddStreamOp: DoneReply, FlushOp: StreamsReply, ProducerGoneOp: ReleasedReply,
    RemoveSessionOp: StreamsReply, StatusOp: StreamsReply, SnapshotOp: SnapshotReply,
    RotateOp: RotatedReply,
}


def chunk_prefix(chunk: int) -> str:
    """Where trace chunk ``chunk`` is written, relative to the session's
    directory: the first (0) in the session directory itself, as a session
    that never rotates has always been written; each later one in
    ``active-chunk-<n>/`` until it is closed and moved to
    ``archives/<begin>-<end>-<n>/``."""
    return "" if chunk == 0 else f"active-chunk-{chunk}/"



# ------------------------------------------------------------------- the codec
def encode(msg: Request | Op | Reply, seq: int | None = None) -> dict[str, Any]:
    """The JSON-ready form of a message (``seq`` for consumerd traffic)."""
    out: dict[str, Any] = {}
    if isinstance(msg, Request):
        out["cmd"] = msg.KIND
    elif isinstance(msg, Op):
        out["op"] = msg.KIND
    else:
        out["ok"] = not isinstance(msg, ErrorReply)
    if seq is not None:
        out["seq"] = seq
    out.update(_to_json(msg))
    return out


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


def decode_request(data: Mapping[str, Any]) -> Request:
    """A CLI request from its JSON object.

    Raises:
        MessageError: unknown command, or a field missing or wrong.
    """
    return _decode_kind(data, "cmd", _REQUESTS, "command")


def decode_op(data: Mapping[str, Any]) -> Op:
    """A consumerd operation from its JSON object (``seq`` is the caller's).

    Raises:
        MessageError: unknown operation, or a field missing or wrong.
    """
    return _decode_kind(data, "op", _OPS, "operation")


def decode_reply(op: type[Op], data: Mapping[str, Any]) -> Reply:
    """consumerd's answer to an operation of class ``op``.

    Raises:
        MessageError: the answer does not have the shape ``op`` expects.
    """
    fields = {k: v for k, v in data.items() if k not in ("ok", "seq")}
    if data.get("ok") is not True:
        return _decode_fields(ErrorReply, fields)
    return _decode_fields(REPLY_TO[op], fields)


def _decode_kind(data: Mapping[str, Any], key: str, table: Mapping[str, type[_T]], what: str) -> _T:
    kind = data.get(key)
    cls = table.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MessageError(f"unknown {what} {short_repr(kind)}")
    return _decode_fields(cls, {k: v for k, v in data.items() if k not in (key, "seq")})


def _decode_fields(cls: type[_T], data: Mapping[str, Any]) -> _T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise MessageError(f"unknown field {short_repr(unknown[0])}")
    args: dict[str, Any] = {}
    for name, f in fields.items():
        value = data.get(name)
        if value is None and _has_default(f):
            continue
        if name not in data:
            raise MessageError(f"missing field {name!r} in {_kind_name(cls)}")
        limit = getattr(cls, "STRING_LIMITS", {}).get(name, MAX_STRING)
        args[name] = _check(value, hints[name], name, limit)
    return cls(**args)


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _check(value: Any, tp: Any, name: str, limit: int = MAX_STRING) -> Any:
    """``value`` as type ``tp`` (a string of at most ``limit`` characters),
    or MessageError naming ``name``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _check(value, inner, name, limit)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) > MAX_LIST:
            raise MessageError(f"field {name!r} must be a list of at most {MAX_LIST} entries")
        return tuple(_check(v, inner, name) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise MessageError(f"field {name!r} must be true or false, not {short_repr(value)}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool) or not _INT_MIN <= value <= _INT_MAX:
            raise MessageError(f"field {name!r} must be an integer, not {short_repr(value)}")
        return value
    if tp is float:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise MessageError(f"field {name!r} must be a number, not {short_repr(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or len(value) > limit:
            raise MessageError(f"field {name!r} must be a string of at most {limit} characters")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except (ValueError, TypeError):
            allowed = ", ".join(str(m.value) for m in tp)
            raise MessageError(f"field {name!r} must be one of {allowed}, not {short_repr(value)}") from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise MessageError(f"field {name!r} must be an object")
        return _decode_fields(tp, value)  # type: ignore[arg-type]
    raise MessageError(f"field {name!r} has an unsupported type")  # a bug in this module


def _kind_name(cls: type) -> str:
    return str(getattr(cls, "KIND", "") or cls.__name__)


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to 60 characters: for error texts about a peer's input."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

