"""sessiond → consumerd operations and consumerd's replies.

The second half of the local control plane (:mod:`tracewire.ops` is the
first, the CLI's requests, and holds the codec both halves share): the same
frozen dataclasses, encoded with :func:`tracewire.ops.encode` and checked
field by field on decoding.  They live in their own module so that the CLI,
which only builds requests, does not pay for building these classes at
every start-up (``dataclass`` generates each class's methods with ``exec``:
~0.5 ms a class, and ``tracewire stop``'s latency includes it).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from tracewire.ops import (
    DEFAULT_COMPRESS_LEVEL,
    DEFAULT_FLUSH_TIMEOUT,
    DEFAULT_REMOVE_TIMEOUT,
    DEFAULT_SPOOL_SIZE,
    Compression,
    RelayState,
    _check_tracefile_limits,
    _decode_fields,
    _decode_kind,
    _require,
)

__all__ = [
    "REPLY_TO", "Op", "HelloOp", "SessionOp", "AddTraceOp", "MetadataOp", "AddStreamOp", "FlushOp",
    "ProducerGoneOp", "RemoveSessionOp", "StatusOp", "SnapshotOp", "RotateOp",
    "Reply", "DoneReply", "HelloReply", "TraceReply", "StreamStats", "StreamsReply",
    "ReleasedReply", "SnapshotReply", "ErrorReply", "RotatedReply", "decode_op", "decode_reply",
]


# ------------------------------------------------------------- sessiond → consumerd
@dataclass(frozen=True, slots=True)
class Op:
    """An operation sessiond asks of consumerd (descriptors travel beside it)."""

    KIND: ClassVar[str] = ""
    HEAD: ClassVar[str] = "op"  # the discriminator key of the encoded form


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

    HEAD: ClassVar[str] = ""  # encoded with ``"ok"``: not FAILED
    FAILED: ClassVar[bool] = False


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
    # Whole events the producer says it wrote (its ring's ``events`` word):
    # for ``status`` and its events/s only, never trusted for anything else.
    events: int = 0
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

    FAILED: ClassVar[bool] = True
    error: str
    internal: bool = False


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

