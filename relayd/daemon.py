"""The relay daemon: accepts consumers over TCP (or TLS) and writes CTF traces.

Public API: RelaydConfig, serve_relayd, parse_auth_keys, RelaydStartupError,
AuthKeyError, RelayServer (request_drain, set_auth_keys: what SIGTERM and
SIGHUP do in `tracewire-relayd`).
"""

# Theory of operation
# ===================
#
# One RelayServer per serve_relayd() call holds everything shared between
# connections: the config, the real path of the output directory, the
# registry of open stream files ({real path: _OpenStream}) and a thread
# limiter for decompression.  Nothing lives in module globals.
#
# Each accepted connection gets a _ConsumerConnection, run as its own task
# by trio.serve_listeners (which closes the stream when the task ends).  The
# task is the connection's only reader: it feeds bytes into a sans-I/O
# wire.Connection(Role.RELAY) and dispatches the messages it returns.
# Everything it sends goes through _send, serialised by a trio.Lock (only
# one task sends today; the lock keeps that safe for live viewers and
# keep-alives later).
#
#   handshake   bounded by handshake_timeout: [TLS handshake], Hello,
#               [Challenge / Auth when auth keys are configured], Welcome.
#               Nothing touches the disk before Welcome is sent.
#   serve       repeat: decode and handle every frame available; write
#               the batch of checked packets in one worker-thread call and
#               send one Ack per stream that got packets (acks cover only
#               what is written to the stream file *and* its index; in fsync
#               mode only what is synced); then receive more bytes, bounded
#               by idle_timeout.  Bytes already readable are decoded into
#               the same batch first (up to _MAX_BATCH_BYTES or
#               _MAX_BATCH_PACKETS).  In fsync mode nothing is acknowledged
#               before the sync anyway, so the batch waits until it is full
#               or the sync is due (a window that follows the disk: twice
#               the last sync's time, from _MIN_SYNC_WAIT to
#               fsync_interval), and is then written and synced in one
#               worker-thread call.
#
# Receiving (plain TCP).  Bytes go straight from the socket into the wire
# core's buffers (Connection.receive_buffer, os.readv on the non-blocking
# socket): a packet's payload lands, in one copy by the kernel, in the
# bytearray that is then written to the stream file, and the buffer is
# recycled once written.  Before waiting, the socket's SO_RCVLOWAT is set to
# what the frame part being received still needs (Connection.bytes_needed,
# at most _MAX_LOWAT), so the task wakes once per payload instead of once per
# TCP segment; the kernel still wakes it on EOF, an error, or a receive
# window about to close.  TLS goes through SSLStream.receive_some.
# Packet runs (plain TCP).  Where the serve loop would wait for bytes, the
# connection's I/O thread takes over for a run (_run_packets) while the
# task waits for it holding the io_lock: blocking poll and readv, the same
# decoding, ordinary packets checked, batched, written (and synced) and
# acknowledged by the thread itself.  Anything else (another message, an
# unusual packet, a failed or healing write, a drain, close_now, 50 ms of
# quiet, 100 ms in all) ends the run and is handled by the task as above.
# The run counts what it writes in the stream's own counters (only the
# stream's owner writes them) before acknowledging it, as the task does.
#   teardown    whatever the reason (EOF, Bye, protocol error, timeout,
#               cancellation): close every stream file this connection owns
#               (StreamFile.close flushes the index) and every metadata fd.
#
# Files.  A stream file is written only through StreamFile, one whole packet
# per append, so a connection dropped at any point leaves files ending on a
# packet boundary.  Opening a StreamFile recovers it, which is how a
# reconnecting consumer (or a restarted relay) continues a stream: the
# StreamState answer is StreamFile.next_seq.  A stream file has one owner at
# a time: a connection that declares a file another connection holds takes
# it over (the old handle is closed first, so that its index is flushed);
# the old connection is dropped if it touches that stream again.
# A StreamDecl with file limits (tracefile_size / tracefile_count) gets a
# StreamFiles instead: the same interface over files <channel>_<n>_<k>, a new
# one started before a packet that would pass the size (in fsync mode the
# file left is made durable first), the oldest removed past the count, the
# newest continued (and recovered) on reopening; the registry key is then
# the stream's base path <channel>_<n>.
#
# Live viewers.  RelayServer.live is a LiveRegistry (relayd/live.py): a
# SessionDecl with `live`, its streams, metadata writes, the index entries
# each batch (or sync) put on disk, StreamClose and SessionClose, and the end
# of a connection that held a live session, update it with synchronous O(1)
# calls; serve_live (started by serve_relayd when
# RelaydConfig.live is set) serves viewers from it and from the files.
# Nothing on this side ever waits for a viewer.
#
# Reload and drain.  RelayServer.auth_keys is the key set in force:
# set_auth_keys (SIGHUP in relayd/main.py) replaces it for the handshakes to
# come and closes, through its cancel scope (close_now), every connection
# whose key it revokes.  request_drain (the first SIGTERM) makes serve_relayd
# stop its accept loops (connections run in their own nursery, so they
# outlive them) and makes every connection, at its next wait for bytes
# (only there: never in a send or a write), take what the kernel already
# holds, write, sync and acknowledge it, send Error(RETRY) and end; a
# connection still in its handshake is closed at once.  serve_relayd returns
# when none is left, or cuts them after drain_timeout.
#
# Trust.  The wire core validates frames, field types, names and the
# connection state; this module adds what needs the file system or the
# packet bytes: auth, host permissions, the realpath check that keeps every
# file inside OUTPUT, metadata offsets, decompression limits, the CTF packet
# header, sequence gaps.  Any RemoteProtocolError ends that one connection
# with a best-effort Error message and one log line; other connections are
# not affected.

from __future__ import annotations

import errno
import logging
import os
import secrets
import select
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import trio

from relayd.live import LiveConfig, LiveRegistry, serve_live
from relayd.metrics import RelayCounters
from tracewire import ctf, keyfile, names
from tracewire.iothread import IoThread
from tracewire.streamfile import Checkpoint, StreamFile, StreamFiles, open_stream_files
from tracewire.url import format_hostport
from tracewire.wire import (
    DEFAULT_MAX_METADATA_SIZE,
    DEFAULT_MAX_PAYLOAD_SIZE,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_STREAMS,
    MAX_ERROR_TEXT,
    NONCE_SIZE,
    Ack,
    Auth,
    Buffer,
    Bye,
    Challenge,
    ChunkClose,
    ChunkClosed,
    Codec,
    Connection,
    ConnectionClosed,
    Error,
    ErrorCode,
    Event,
    Hello,
    LocalProtocolError,
    Message,
    Metadata,
    Packet,
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
    decompress_packet,
    new_decompressor,
    validate_name,
    validate_trace_path,
    verify_auth_mac,
)

if TYPE_CHECKING:
    from tracewire.metrics import RelaySnapshot
    from tracewire.metrics_config import MetricsConfig

__all__ = [
    "AuthKeyError",
    "AuthKeys",
    "Listeners",
    "RelaydConfig",
    "RelaydStartupError",
    "RelayServer",
    "parse_auth_keys",
    "serve_relayd",
]

logger = logging.getLogger(__name__)

AuthKeys = dict[str, tuple[bytes, tuple[str, ...]]]

MIN_SECRET_CHARS = keyfile.MIN_SECRET_CHARS
ANY_HOST = keyfile.ANY_HOST
_RECEIVE_SIZE = 256 * 1024  # TLS: bytes asked for per receive
_DRAIN_READS = 64  # a draining connection reads what is already there this many times at most
_DIR_MODE = 0o750
_FILE_MODE = 0o640
# Packets of one connection written in one worker-thread call at most (raw
# bytes, and packets): bounds what a connection holds decompressed, and how
# long it keeps the event loop between two checkpoints.
_MAX_BATCH_BYTES = 1024 * 1024
_MAX_BATCH_PACKETS = 64
# fsync mode: a connection's next sync comes this many times the time its
# last sync's fdatasyncs took after the first packet it covers (at least
# _MIN_SYNC_WAIT, at most --fsync-interval): a disk that syncs in 50 us is
# synced every 4 ms, and acknowledges about as fast; one that takes 30 ms is
# synced about every 60 ms, so that the syncs take at most about a third of
# the connection's time, whatever the disk.  Only the fdatasyncs are timed,
# in the I/O thread: the wait for a thread or for the CPU is not the
# disk's, and a window stretched by it let a busy target's unacknowledged
# packets fill its spool.  The floor is 4 ms, not less: at 1 ms a fast
# stream synced (and, outside a packet run, made a round trip to the
# connection's I/O thread, ~60 us of CPU on this VM) every packet or two
# (relayd CPU per GB 10 % higher in bench/run.py's relay_fsync driver on
# tmpfs, for acks ~2 ms sooner; 4 ms of a full-speed target is ~3 MB more
# in its spool).
_SYNC_WAIT_FACTOR = 2.0
_MIN_SYNC_WAIT = 0.004
# fsync mode: a connection all synced keeps its payload buffers this long
# (seconds) for the next packets, then lets them go until packets come again.
_KEEP_BUFFERS_QUIET = 0.1
# Received payload buffers a connection keeps for the next packets.
# Twice what one batch holds: a batch's buffers and the one a payload is
# being received into while the batch is written (with one batch's worth,
# one payload in five at full speed got a fresh 256 KiB buffer: page
# faults and zeroing), so that a steady stream reuses every buffer.
_POOL_BYTES = 2 * _MAX_BATCH_BYTES
# Largest receive low-water mark (SO_RCVLOWAT) set while a frame's payload
# is coming: the task wakes once per this many bytes, not per TCP segment.
_MAX_LOWAT = 1024 * 1024
# A packet run (plain TCP): the connection's I/O thread receives, checks,
# writes and acknowledges packets by itself, with blocking calls, until
# something else comes (any other message, or a packet out of the ordinary),
# nothing came for _RUN_QUIET seconds, or _RUN_MAX seconds passed; then the
# event loop takes over again (see _ConsumerConnection._run_packets).
_RUN_QUIET = 0.05
_RUN_MAX = 0.1
_T = TypeVar("_T")


class RelaydStartupError(Exception):
    """The relay cannot start: port in use, unusable output directory..."""


class AuthKeyError(ValueError):
    """An auth key file is unsafe or malformed; the text names file and line."""


@dataclass(frozen=True, slots=True)
class RelaydConfig:
    """Everything serve_relayd needs.

    Attributes:
        output: directory the traces go under (created if missing).
        listen_host: address to listen on ("0.0.0.0", "::", "127.0.0.1"...).
        listen_port: TCP port; 0 picks a free one (see serve_relayd).
        auth_keys: key id -> (secret, hostnames the key may write under,
            "*" for any).  None: no authentication (anyone may write).  An
            empty mapping refuses everyone.
        handshake_timeout: seconds a peer has to complete the (TLS and
            protocol) handshake.
        idle_timeout: a connection that sends nothing, or reads nothing we
            send, for this many seconds is dropped.
        close_timeout: seconds spent trying to tell a dropped peer why.
        max_payload_size: largest frame payload (compressed packet) accepted.
        max_raw_packet: largest packet accepted once decompressed.
        max_streams: open streams per connection.
        max_sessions: open sessions per connection.
        max_metadata_size: largest metadata file (offset + length).
        tls: serve TLS with this server context; None for plain TCP.
        decompress_threads: packets decompressed in threads at once,
            relay-wide.
        inline_decompress_max: packets up to this many raw bytes are
            decompressed in the event loop (~40 us per 256 KiB: cheaper than
            a thread hand-off); bigger ones in a worker thread.
        io_threads: file-system calls at once, relay-wide (every one runs
            in a thread, so a stalled disk never holds the event loop): each
            connection writes its packets in a thread of its own
            (tracewire/iothread.py), other file work goes to trio's worker
            threads, and this many calls at most run at once.
        fsync: acknowledge a packet only once it and its index entry are
            durable (fdatasync), so that a power cut at the relay cannot lose
            what a target has already freed.  Off here (tests and embedders
            choose); on by default for `tracewire-relayd` (`--fsync`).
        fsync_interval: fsync mode: seconds a connection's written packets
            wait, at most, for the fdatasync that covers them; a disk that
            syncs faster is synced sooner (_SYNC_WAIT_FACTOR).
        fdatasync: the call that makes a file durable (tests observe it).
        live: serve live viewers (relayd/live.py) with this configuration;
            None: no live port.
        metrics: serve Prometheus metrics (relayd/metrics.py) with this
            configuration; None: off (prometheus_client is not imported).
        drain_timeout: seconds a drain (RelayServer.request_drain, the
            first SIGTERM of `tracewire-relayd`) waits for the connections to
            write, acknowledge and close what they hold; then they are cut.
    """

    output: str
    listen_host: str = "0.0.0.0"
    listen_port: int = 6342
    auth_keys: Mapping[str, tuple[bytes, tuple[str, ...]]] | None = None
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    close_timeout: float = 2.0
    max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE
    max_raw_packet: int = 64 * 1024 * 1024
    max_streams: int = DEFAULT_MAX_STREAMS
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_metadata_size: int = DEFAULT_MAX_METADATA_SIZE
    tls: ssl.SSLContext | None = field(default=None, repr=False)
    decompress_threads: int = 4
    inline_decompress_max: int = 1024 * 1024
    io_threads: int = 16
    fsync: bool = False
    fsync_interval: float = 0.1
    fdatasync: Callable[[int], None] = field(default=os.fdatasync, repr=False, compare=False)
    live: LiveConfig | None = None
    metrics: MetricsConfig | None = None
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.listen_port <= 65535:
            raise ValueError(f"listen_port {self.listen_port} not in 0..65535")
        for name in ("handshake_timeout", "idle_timeout", "close_timeout", "fsync_interval", "drain_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_payload_size", "max_raw_packet", "max_streams", "max_sessions",
                     "max_metadata_size", "decompress_threads", "io_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


# --------------------------------------------------------------------------
# Auth key file
# --------------------------------------------------------------------------


def parse_auth_keys(path: str | os.PathLike[str]) -> AuthKeys:
    """Reads a relay key file: one `KEY_ID SECRET HOST...` per line.

    The format is tracewire.keyfile's (relay side): a word starting with `#`
    starts a comment; blank lines are skipped.  SECRET is used as its UTF-8
    bytes and must be at least 32 characters; HOST is a hostname the key may
    write under, or `*` for any.

    Args:
        path: the key file.  It must not be accessible by group or others.

    Returns:
        {key_id: (secret bytes, (host, ...))}.

    Raises:
        AuthKeyError: the file cannot be read, is accessible by group or
            others, holds no key, or a line is malformed (the text names
            the file and line).
    """
    try:
        parsed = keyfile.read_key_file(path, keyfile.Side.RELAY, check_name=names.validate_name)
    except keyfile.KeyFileError as exc:
        raise AuthKeyError(str(exc)) from None
    return {key.key_id: (key.secret, key.hosts) for key in parsed.keys}


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _OpenStream:
    """A stream declared on one connection, and its file while it owns it."""

    decl: StreamDecl
    path: str  # real path of the stream file (with file limits: its base name): the registry key
    file: StreamFile | StreamFiles | None  # None once closed or taken over
    owner: _ConsumerConnection
    ctf_stream_id: int | None = None  # CTF stream class of its packets
    expect: int = 0  # next seq accepted: the file's next_seq plus the packets batched
    blocked_at: int | None = None  # a Retry asked for this seq: others are dropped
    acked: int = -1  # last seq acknowledged on this connection
    durable: Checkpoint | None = None  # fsync mode: where the file was last made durable
    rel: str = ""  # `path` below OUTPUT: its key in RelayServer.counters


@dataclass(slots=True, eq=False)
class _Write:
    """A checked packet waiting in a connection's batch."""

    st: _OpenStream
    raw: Buffer  # the packet, decoded (for Codec.NONE: the received payload itself)
    msg: Packet
    ctf_stream_id: int
    frame_size: int = 0  # its frame's bytes on the wire (metrics)


# What a batch's write gives back: (the batch, the streams it synced or
# None, the streams whose write failed, those whose sync failed, the seconds
# the sync took).
_WriteResult = tuple[list[_Write], list[_OpenStream] | None, dict[_OpenStream, OSError],
                     dict[_OpenStream, OSError], float]


@dataclass(slots=True, eq=False)
class _Fault:
    """One kind of write failure at the output, from its first sighting until
    every file it hit has been written again."""

    text: str
    since: float
    paths: set[str] = field(default_factory=set)
    refused: int = 0  # writes refused (each one retried by its target)


class _Transient(Exception):
    """A healable write failure on a declaration: the connection is dropped
    with Error(RETRY) and the consumer reconnects later."""


_FINAL_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EINVAL,
                           errno.EFBIG, errno.EXDEV, errno.EBADF})


def retry_reason(exc: OSError) -> RetryReason | None:
    """Whether a write error at the output can heal, and how it is reported.

    Returns:
        The RetryReason to tell the consumer, or None for an error that names
        a request that can never succeed (a name too long, a symlink loop, a
        file where a directory should be...): that one ends the connection.
    """
    match exc.errno:
        case errno.ENOSPC | errno.EDQUOT:
            return RetryReason.NO_SPACE
        case errno.EROFS:
            return RetryReason.READ_ONLY
        case errno.EIO:
            return RetryReason.IO_ERROR
        case code if code in _FINAL_ERRNOS:
            return None
    return RetryReason.BUSY


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


class RelayServer:
    """State shared by every connection of one serve_relayd() call.

    Args:
        config: the relay's configuration.
        output: real path of the (existing) output directory.
    """

    def __init__(self, config: RelaydConfig, output: str) -> None:
        self.config = config
        self.output = output
        self.owners: dict[str, _OpenStream] = {}  # stream file path -> owner
        self.decompress_limiter = trio.CapacityLimiter(config.decompress_threads)
        self.io_limiter = trio.CapacityLimiter(config.io_threads)  # trio's worker threads doing file work
        # Taken by the thread doing it around every file-system call of the
        # connections (a batch, a declaration's, a close): io_threads at most
        # at once relay-wide, whichever thread does it.
        self.io_slots = threading.BoundedSemaphore(config.io_threads)
        self.faults: dict[RetryReason, _Fault] = {}  # write failures not cleared yet
        self.retries_sent = 0  # Retry messages and Error(RETRY), relay-wide
        self._next_conn_id = 0
        self.live = LiveRegistry()  # what live viewers may read (relayd/live.py)
        self.counters = RelayCounters()  # for --metrics-listen (relayd/metrics.py)
        self.auth_keys = config.auth_keys  # the keys in force: set_auth_keys replaces them (SIGHUP)
        self.connections: set[_ConsumerConnection] = set()  # running, handshake included
        self.drain_requested = trio.Event()  # request_drain: stop accepting, settle, close
        self.drained = trio.Event()  # draining and no connection left

    @property
    def draining(self) -> bool:
        """Whether a drain was requested (connections settle and close)."""
        return self.drain_requested.is_set()

    def request_drain(self) -> None:
        """Starts a drain: serve_relayd stops accepting (its listeners close),
        then every connection writes, makes durable (fsync mode) and
        acknowledges what it has received, tells its peer Error(RETRY)
        ("relay shutting down": the consumer keeps its data and reconnects
        later) and closes; serve_relayd returns once none is left, or after
        drain_timeout.  A connection still in its handshake is closed at once
        (nothing of it is on disk)."""
        if self.draining:
            return
        self.drain_requested.set()
        for conn in list(self.connections):
            conn.drain()
        if not self.connections:
            self.drained.set()

    def connection_started(self, conn: _ConsumerConnection) -> None:
        self.connections.add(conn)
        if self.draining:
            conn.drain()  # accepted just before the listeners closed

    def connection_ended(self, conn: _ConsumerConnection) -> None:
        self.connections.discard(conn)
        if self.draining and not self.connections:
            self.drained.set()

    def set_auth_keys(self, keys: Mapping[str, tuple[bytes, tuple[str, ...]]]) -> int:
        """Puts a new key set in force (a reload of the key file).

        New connections are checked against `keys` alone.  A running
        connection whose key is gone, has another secret now, or may no
        longer write under its hostname is closed with Error(AUTH_FAILED):
        revoking a key (a leaked one, say) must not leave its holder
        writing.  Others go on untouched.

        Args:
            keys: the new {key_id: (secret, hosts)}.

        Returns:
            How many connections were closed.

        Raises:
            ValueError: the relay runs without authentication (it cannot
                start requiring it on connections that never authenticated).
        """
        if self.auth_keys is None:
            raise ValueError("the relay runs without auth keys")
        self.auth_keys = keys
        closed = 0
        for conn in list(self.connections):
            reason = conn.key_revoked(keys)
            if reason is not None:
                conn.close_now(ErrorCode.AUTH_FAILED, reason)
                closed += 1
        return closed

    def new_conn_id(self) -> int:
        """Returns a number naming a connection in the logs."""
        self._next_conn_id += 1
        return self._next_conn_id

    def safe_path(self, *parts: str) -> str:
        """Joins validated names below OUTPUT and checks the result stays there.

        Raises:
            RemoteProtocolError: (BAD_NAME) if the real path leaves OUTPUT
                (through a symlink, say).
        """
        real = os.path.realpath(os.path.join(self.output, *parts))
        if not real.startswith(self.output + os.sep):
            raise RemoteProtocolError(
                ErrorCode.BAD_NAME, f"{os.path.join(*parts)!r} resolves outside the output directory")
        return real

    def fault(self, reason: RetryReason, exc: OSError, path: str) -> None:
        """A write to `path` failed and will be retried: logged once per kind
        of failure until it clears."""
        self.retries_sent += 1
        self.counters.write_error(reason.name.lower())
        f = self.faults.get(reason)
        if f is None:
            f = self.faults[reason] = _Fault(_strerror(exc), trio.current_time())
            logger.warning(
                "output %s: %s (writing %s): holding back acknowledgements; targets keep their data "
                "and retry (logged again when it clears)",
                self.output, f.text, os.path.relpath(path, self.output),
            )
        f.paths.add(path)
        f.refused += 1

    def written(self, path: str) -> None:
        """A write to `path` succeeded: a failure that hit it is cleared there."""
        self._release_path(path, written=True)

    def forget(self, path: str) -> None:
        """`path` is closed: it no longer waits on a failure."""
        self._release_path(path, written=False)

    def _release_path(self, path: str, written: bool) -> None:
        """`path` no longer waits on any failure; a failure no file waits on
        any more is over, and logged as such."""
        for reason, f in list(self.faults.items()):
            if path not in f.paths:
                continue
            f.paths.discard(path)
            if f.paths:
                continue
            del self.faults[reason]
            if written:
                logger.warning("output %s: writable again after %.1f s of %s (%d writes were refused "
                               "and resent by their targets)", self.output, trio.current_time() - f.since,
                               f.text, f.refused)
            else:
                logger.warning("output %s: no stream waits on %s any more (%d writes were refused)",
                               self.output, f.text, f.refused)

    async def take_stream(self, st: _OpenStream, directory: str, name: str) -> None:
        """Opens (recovering) the stream file for `st`, taking it over from
        any other connection that holds it.

        Raises:
            OSError: if the file cannot be opened.
        """
        old = self.owners.pop(st.path, None)
        if old is not None and old.file is not None:
            logger.info("stream file %s taken over by a newer connection", st.path)
            # Not while the old owner's thread writes to it.
            async with old.owner.io_lock:
                file, old.file = old.file, None
                if file is not None:
                    self.counters.stream_closed(old.rel)
                    await self.run_io(partial(_close_file, file, old.durable if self.config.fsync else None))
        flush_every = None if self.config.fsync else 64
        # With file limits, a file that is finished is made durable first in
        # fsync mode (StreamFiles: a switch is a sync point).
        st.file = await self.run_io(partial(
            open_stream_files, directory, name, st.decl.tracefile_size or 0, st.decl.tracefile_count or 0,
            mode=_FILE_MODE, flush_every=flush_every, sync=self.config.fdatasync if self.config.fsync else None))
        if self.config.fsync:
            # What an earlier relay left in the page cache is acknowledged
            # (StreamState) from now on: make it durable first.
            try:
                await self.run_io(partial(_sync_file, st.file, self.config.fdatasync))
            except OSError:
                file, st.file = st.file, None
                await self.run_io(partial(_close_file, file, None))
                raise
        st.expect = st.file.next_seq
        st.durable = st.file.checkpoint()
        self.owners[st.path] = st
        st.rel = os.path.relpath(st.path, self.output)
        self.counters.stream_opened(st.rel)
        if st.file.recovered_bytes:
            logger.warning("stream file %s: cut %d bytes of a partial packet", st.path, st.file.recovered_bytes)

    async def release_stream(self, st: _OpenStream) -> None:
        """Closes `st`'s file if it still holds it (flushing the index)."""
        if self.owners.get(st.path) is st:
            del self.owners[st.path]
        self.forget(st.path)
        file, st.file = st.file, None
        if file is not None:
            self.counters.stream_closed(st.rel)
            await self.run_io(partial(_close_file, file, st.durable if self.config.fsync else None))

    async def run_io(self, fn: Callable[[], _T]) -> _T:
        """Runs file-system work in a worker thread: a disk that stalls (a
        frozen filesystem) holds that connection only, never the event loop."""
        return await trio.to_thread.run_sync(partial(self.in_io_slot, fn), limiter=self.io_limiter)

    def in_io_slot(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` in one of the io_threads slots (called in a thread)."""
        with self.io_slots:
            return fn()

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serves one accepted connection; never raises but Cancelled."""
        conn = _ConsumerConnection(self, stream)
        self.connection_started(conn)
        self.counters.connections += 1
        try:
            await conn.run()
        finally:
            self.counters.connections -= 1
            self.connection_ended(conn)

    def metrics_snapshot(self) -> RelaySnapshot:
        """The counters for a scrape (relayd/metrics.py), taken in the loop."""
        viewers: dict[str, int] = {}
        for sess in self.live.sessions.values():
            rel = os.path.relpath(sess.directory, self.output)
            viewers[rel] = viewers.get(rel, 0) + sess.viewers
        return self.counters.snapshot(viewers)


def _peer_name(stream: trio.abc.Stream) -> str:
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    sock = getattr(transport, "socket", None)
    try:
        host, port = sock.getpeername()[:2]  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):
        return "?"
    return format_hostport(host, port)


class _ConsumerConnection:
    """One consumer connection: handshake, then frames to files."""

    def __init__(self, server: RelayServer, stream: trio.abc.Stream) -> None:
        cfg = server.config
        self.server = server
        self.config = cfg
        self.stream = stream
        self.name = f"conn#{server.new_conn_id()} {_peer_name(stream)}"
        self.conn = Connection(
            Role.RELAY,
            require_auth=cfg.auth_keys is not None,
            max_payload_size=cfg.max_payload_size,
            max_streams=cfg.max_streams,
            max_sessions=cfg.max_sessions,
            max_metadata_size=cfg.max_metadata_size,
            pool_bytes=_POOL_BYTES,
        )
        # Plain TCP: bytes are received straight into the protocol core's
        # buffers (recv_into); TLS goes through receive_some.
        self.sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.fd = -1 if self.sock is None else self.sock.fileno()  # (trio's fileno() is a Python call)
        self.lowat = 1  # the socket's SO_RCVLOWAT
        self.decompressor = new_decompressor(cfg.max_raw_packet)  # packets decompressed in the event loop
        self.send_lock = trio.Lock()
        self.io_lock = trio.Lock()  # held while a thread writes this connection's files (a packet run too)
        # The batches' writes and syncs: a thread of the connection's own
        # (cheaper per batch than trio's worker threads; tracewire/iothread.py).
        self.io_thread = IoThread("tw-relay-io")
        self.hostname: str | None = None
        self.sessions: dict[int, str] = {}  # session id -> real session directory
        self.live: set[int] = set()  # ids of the sessions declared live on this connection
        self.streams: dict[int, _OpenStream] = {}  # stream id -> stream
        self.metadata_fds: dict[str, int] = {}  # real metadata path -> fd
        self.batch: list[_Write] = []  # checked packets not written yet
        self.batch_bytes = 0
        self.to_ack: dict[int, _OpenStream] = {}  # streams written to (or resent to) since the last acks
        self.unsynced: dict[int, _OpenStream] = {}  # fsync mode: written, not durable yet
        self.sync_due: float | None = None  # fsync mode: when the batch and the unsynced are synced at the latest
        self.sync_cost = 0.0  # fsync mode: seconds the fdatasyncs of the last sync took
        self.retries: dict[int, Retry] = {}  # Retry messages to send with the next acks
        self.got_bye = False
        self.key: tuple[str, bytes] | None = None  # (key id, secret) it authenticated with
        self.scope = trio.CancelScope()  # the whole connection: close_now cancels it
        self.stop: tuple[ErrorCode, str] | None = None  # why close_now closed it
        self.wait_scope: trio.CancelScope | None = None  # while waiting for bytes: drain cancels it
        self.event: Event | None = None  # what a packet run received and left to the event loop
        self.healed: set[str] = set()  # paths a packet run wrote while the output had faults
        self.unsent = b""  # what a packet run's Acks left in a full socket: sent by the event loop next

    def __str__(self) -> str:
        return self.name if self.hostname is None else f"{self.name} ({self.hostname})"

    # -- top level ----------------------------------------------------------

    async def run(self) -> None:
        """Runs the connection to its end, logging why it ended."""
        try:
            with self.scope:
                with trio.fail_after(self.config.handshake_timeout):
                    if isinstance(self.stream, trio.SSLStream):
                        await self.stream.do_handshake()
                    if not await self._handshake():
                        return
                await self._serve()
            if self.stop is not None:
                code, text = self.stop
                logger.warning("%s: closed: %s", self, text)
                await self._send_error(code, text)
        except RemoteProtocolError as exc:
            if exc.code in (ErrorCode.AUTH_FAILED, ErrorCode.FORBIDDEN):
                self.server.counters.auth_failures += 1
            logger.warning("%s: dropped: %s: %s", self, exc.code.name, exc.message)
            await self._send_error(exc.code, exc.message)
        except _Transient as exc:
            logger.info("%s: dropped until the output heals: %s", self, exc)
            await self._send_error(ErrorCode.RETRY, str(exc))
        except trio.TooSlowError:
            phase = "handshake" if self.hostname is None else "idle"
            logger.warning("%s: dropped: %s timeout", self, phase)
            await self._send_error(ErrorCode.TIMEOUT, f"{phase} timeout")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.info("%s: connection lost: %s", self, str(exc) or type(exc).__name__)
        except OSError as exc:
            self.server.counters.write_error("io")
            logger.error("%s: dropped: I/O error: %s", self, exc)
            await self._send_error(ErrorCode.INTERNAL, f"relay I/O error: {_strerror(exc)}")
        except Exception as exc:  # a bug: keep the other connections alive
            logger.exception("%s: dropped: internal error", self)
            await self._send_error(ErrorCode.INTERNAL, f"relay internal error: {type(exc).__name__}")
        finally:
            with trio.CancelScope(shield=True):
                await self._close_all()

    # -- reload and drain (called from other tasks) --------------------------

    def key_revoked(self, keys: Mapping[str, tuple[bytes, tuple[str, ...]]]) -> str | None:
        """Why this connection may not go on under the key set `keys`, or None."""
        if self.key is None:
            return None
        key_id, secret = self.key
        new = keys.get(key_id)
        if new is None:
            return f"key {key_id!r} was removed from the relay's key file"
        if not secrets.compare_digest(new[0], secret):
            return f"key {key_id!r} has a new secret in the relay's key file"
        if self.hostname is not None and ANY_HOST not in new[1] and self.hostname not in new[1]:
            return f"key {key_id!r} may no longer write under host {self.hostname!r}"
        return None

    def close_now(self, code: ErrorCode, text: str) -> None:
        """Ends the connection at once: what is not acknowledged yet is
        dropped (the peer resends it); the peer gets Error(code, text)."""
        if self.stop is None:
            self.stop = (code, text)
        self.scope.cancel()

    def drain(self) -> None:
        """The relay drains: once established, settle and close; still in
        the handshake, close at once."""
        if self.hostname is None:
            self.close_now(ErrorCode.RETRY, "relay shutting down")
        elif self.wait_scope is not None:
            self.wait_scope.cancel()

    async def _finish_drain(self) -> None:
        """Takes the bytes the kernel already holds for us (plain TCP; at
        most _DRAIN_READS reads, so a peer that keeps sending cannot hold the
        drain), writes, makes durable (fsync mode) and acknowledges every
        whole packet received, then tells the peer to come back later
        (Error(RETRY): it keeps what is not acknowledged and resends it), or
        answers its Bye."""
        for _ in range(_DRAIN_READS):
            if not self._receive_nowait():
                break
            while (event := self.conn.next_event()) is not None:
                if isinstance(event, ConnectionClosed | Error):
                    return  # nothing can be acknowledged any more: the peer resends (as in _serve)
                await self._dispatch(event)
        await self._settle()
        if self.got_bye:
            await self._send(Bye())
            logger.info("%s: bye (draining)", self)
            return
        logger.info("%s: relay shutting down: everything received is written and acknowledged", self)
        await self._send_error(ErrorCode.RETRY, "relay shutting down")

    async def _close_all(self) -> None:
        """Closes every file of the connection (unacknowledged packets of a
        batch are not written: the consumer resends them)."""
        self.batch.clear()
        for session_id in self.live:  # still open: the target may come back, or not
            self.server.live.session_released(self.sessions[session_id], trio.current_time())
        self.live.clear()
        self.io_thread.close()  # no batch is written from here on (its thread ends now)
        async with self.io_lock:
            for st in self.streams.values():
                try:
                    await self.server.release_stream(st)
                except OSError as exc:
                    logger.error("%s: closing %s: %s", self, st.path, exc)
            self.streams.clear()
            fds = list(self.metadata_fds.values())
            self.metadata_fds.clear()
            for fd in fds:
                os.close(fd)

    # -- I/O ------------------------------------------------------------------

    async def _send(self, msg: Message) -> None:
        """Sends one message; a peer that does not read for idle_timeout is
        dropped (TooSlowError)."""
        async with self.send_lock:
            await self._send_parts(self.conn.send_parts(msg))

    async def _send_parts(self, parts: list[Buffer]) -> None:
        """Sends encoded frame parts (holding send_lock): a message's, or
        what a packet run's Acks left (self.unsent)."""
        try:
            with trio.fail_after(self.config.idle_timeout):
                for part in parts:
                    await self.stream.send_all(part)
        except BaseException:
            self.conn.send_failed()
            raise

    async def _send_error(self, code: ErrorCode, text: str) -> None:
        """Tells the peer why we hang up, best effort and bounded."""
        with trio.move_on_after(self.config.close_timeout):
            try:
                await self._send(Error(int(code), text[:MAX_ERROR_TEXT]))
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, LocalProtocolError):
                pass

    async def _receive(self) -> None:
        """Reads some bytes (b"" at EOF) into the protocol core; on plain TCP
        straight into its buffer (a large payload's own).

        Raises:
            trio.BrokenResourceError: the peer or the network broke the connection.
        """
        if self.sock is None:
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            self.conn.receive_data(data)
            return
        # Bytes already there (a relay behind its peer): taken at once
        # instead of through a round of epoll, as trio's own operations that
        # complete at once do: a cancel lands before the read (so that a
        # cancelled wait always means that nothing came), the yield to the
        # other tasks after it cannot be cancelled.
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._receive_nowait():
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._set_lowat()
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            if self._receive_nowait():
                return

    def _set_lowat(self) -> None:
        """Makes a wait for bytes end only once the rest of the frame part
        the core waits for is there (or EOF, an error, a shrinking window:
        the kernel's own exceptions): SO_RCVLOWAT (plain TCP)."""
        assert self.sock is not None
        lowat = min(self.conn.bytes_needed, _MAX_LOWAT)
        if lowat != self.lowat:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            self.lowat = lowat

    def _receive_nowait(self) -> bool:
        """Reads the bytes already there, if any, without waiting (plain TCP only).

        Returns:
            Whether bytes (or EOF) came.

        Raises:
            trio.BrokenResourceError: the peer or the network broke the connection.
        """
        if self.sock is None:
            return False
        buf = self.conn.receive_buffer()
        try:
            n = os.readv(self.fd, [buf])  # the socket is non-blocking
        except BlockingIOError:
            return False
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive failed: {_strerror(exc)}") from exc
        self.conn.received(n)
        return True

    async def _next_message(self) -> Event:
        while (event := self.conn.next_event()) is None:
            await self._receive()
        return event

    async def _io(self, fn: Callable[[], _T], path: str) -> _T:
        """Runs one declaration's file-system work on `path` in a worker thread.

        Raises:
            _Transient: it failed with an error that can heal.
            OSError: it failed for good.
        """

        async def locked() -> _T:
            async with self.io_lock:
                return await self.server.run_io(fn)

        return await self._declaring(path, locked)

    async def _declaring(self, path: str, work: Callable[[], Awaitable[_T]]) -> _T:
        """Runs a declaration's `work` on `path`: a write error that can heal
        becomes _Transient (Error(RETRY)), counted as a fault of the output.

        Raises:
            _Transient: it failed with an error that can heal.
            OSError: it failed for good.
        """
        try:
            result = await work()
        except OSError as exc:
            reason = retry_reason(exc)
            if reason is None:
                raise
            self.server.fault(reason, exc, path)
            raise _Transient(f"{_strerror(exc)} ({os.path.relpath(path, self.server.output)})") from exc
        if self.server.faults:
            self.server.written(path)
        return result

    # -- handshake -----------------------------------------------------------

    async def _handshake(self) -> bool:
        """Hello, [Challenge, Auth], Welcome.

        Returns:
            False if the peer left before saying Hello.

        Raises:
            RemoteProtocolError: (AUTH_FAILED, FORBIDDEN, ...) refused.
        """
        hello = await self._next_message()
        if isinstance(hello, ConnectionClosed):
            logger.info("%s: closed before Hello", self)
            return False
        assert isinstance(hello, Hello)  # the core allows nothing else
        hostname = validate_name(hello.hostname, "hostname")
        keys = self.server.auth_keys
        if keys is not None:
            key_id = hello.key_id
            assert key_id is not None  # require_auth: the core checked
            nonce = secrets.token_bytes(NONCE_SIZE)
            await self._send(Challenge(nonce))
            auth = await self._next_message()
            if not isinstance(auth, Auth):
                raise RemoteProtocolError(ErrorCode.AUTH_FAILED, "connection closed during authentication")
            # The keys in force now: a reload (SIGHUP) may have come while
            # the peer computed its answer.
            key = (self.server.auth_keys or {}).get(key_id)
            # An unknown key id is refused only after the Challenge, like a
            # bad MAC, so that key ids cannot be probed.
            if key is None or not verify_auth_mac(key[0], nonce, hostname, key_id, auth.mac):
                raise RemoteProtocolError(ErrorCode.AUTH_FAILED, f"authentication failed for key {key_id!r}")
            if ANY_HOST not in key[1] and hostname not in key[1]:
                raise RemoteProtocolError(ErrorCode.FORBIDDEN, f"key {key_id!r} may not write under host {hostname!r}")
            self.key = (key_id, key[0])
        await self._send(Welcome(hello.version, session_limit=self.config.max_sessions))
        self.hostname = hostname
        logger.info("%s: welcome (key %s, protocol %d)", self, hello.key_id, hello.version)
        return True

    # -- established ---------------------------------------------------------

    async def _serve(self) -> None:
        """Handles frames until the peer closes, says Bye or Error."""
        while True:
            while (event := self._next_event()) is not None:
                if isinstance(event, ConnectionClosed):
                    # The state is now CLOSED: no more acks; the teardown
                    # closes the files (unacknowledged packets are resent).
                    logger.info("%s: closed by peer", self)
                    return
                if isinstance(event, Error):
                    logger.warning("%s: peer sent error %d: %r", self, event.code, event.text)
                    return
                await self._dispatch(event)
            if self.got_bye:
                await self._settle()
                await self._send(Bye())
                logger.info("%s: bye", self)
                return
            # More bytes already there join the batch: one worker-thread call
            # (and one Ack per stream) per batch, not per receive.  fsync
            # mode: nothing is acknowledged before the sync anyway, so the
            # batch then grows until it is full or the sync is due
            # (_acknowledge).
            if self.batch and len(self.batch) < _MAX_BATCH_PACKETS \
                    and self.batch_bytes < _MAX_BATCH_BYTES and self._receive_nowait():
                continue
            if not self.config.fsync:
                await self._write_batch()
            await self._acknowledge(sync=False)
            if self.server.draining:
                await self._finish_drain()
                return
            if self.sock is not None and self.stop is None and await self._packet_run():
                continue
            await self._receive_more()

    def _next_event(self) -> Event | None:
        """The message a packet run left, else the next one received, or None."""
        event, self.event = self.event, None
        return event if event is not None else self.conn.next_event()

    # -- packet runs (plain TCP) ----------------------------------------------

    async def _packet_run(self) -> bool:
        """Lets the connection's I/O thread receive, check, write and
        acknowledge packets by itself for a while (_run_packets), then takes
        note of what it did: the writes that healed a fault, a write that
        failed.

        Returns:
            Whether the event loop has work at once (something came, what
            the run wrote is still to acknowledge, or its Acks are still to
            send); False: the run
            acknowledged everything and ended because nothing came (the
            event loop then waits for bytes itself).

        Raises:
            What the run raised (see _run_packets).
        """
        sync_left = None if self.sync_due is None else self.sync_due - trio.current_time()
        try:
            async with self.io_lock:
                came, sync_left, failed = await self.io_thread.run(partial(self._run_packets, sync_left))
        finally:
            if self.server.faults:
                for path in self.healed:
                    self.server.written(path)
            self.healed.clear()
        self.sync_due = None if sync_left is None else trio.current_time() + sync_left
        if self.unsent:
            data, self.unsent = self.unsent, b""
            async with self.send_lock:
                await self._send_parts([data])
        if failed is not None:
            self._failed(failed[0])
            self._failed(failed[1])
        return came

    def _run_packets(self, sync_left: float | None) -> tuple[
            bool, float | None, tuple[dict[_OpenStream, OSError], dict[_OpenStream, OSError]] | None]:
        """A packet run, in the connection's I/O thread while the event loop
        waits for it holding the io_lock: the serve loop's work for ordinary
        packets, with blocking calls and no round through the event loop per
        batch.  It ends when something else comes (any other message, or a
        packet _run_packet leaves: it is kept in self.event for the event
        loop), when a write fails, when the connection is to stop or the
        relay drains, when nothing came for _RUN_QUIET seconds, or after
        _RUN_MAX seconds (a takeover of one of its streams waits for the
        io_lock that long at most).  Its clock is time.monotonic (trio's is
        the event loop's): `sync_left` and the second value returned are the
        seconds before the next sync is due (fsync mode), None if none is.

        Returns:
            (whether the event loop has work at once: see _packet_run, the
            seconds left before the next sync,
            the streams whose write failed and those whose sync failed if a
            write failed, else None).

        Raises:
            RemoteProtocolError: the peer broke the protocol.
            trio.BrokenResourceError: the connection broke.
        """
        start = time.monotonic()
        self.sync_due = None if sync_left is None else start + sync_left
        try:
            came, failed = self._run_loop(start)
        finally:
            sync_due, self.sync_due = self.sync_due, None
        return came, None if sync_due is None else sync_due - time.monotonic(), failed

    def _run_loop(self, start: float) -> tuple[
            bool, tuple[dict[_OpenStream, OSError], dict[_OpenStream, OSError]] | None]:
        """_run_packets' loop (self.sync_due on time.monotonic's clock)."""
        fsync = self.config.fsync
        last = start  # when bytes last came
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        came = False
        while True:
            while (event := self.conn.next_event()) is not None:
                came = True
                if not isinstance(event, Packet) or not self._run_packet(event):
                    self.event = event
                    return came, None
                if self.batch_bytes >= _MAX_BATCH_BYTES:
                    failed = self._run_write(sync=False)
                    if failed or self.healed:
                        return True, failed
            if self.batch and len(self.batch) < _MAX_BATCH_PACKETS \
                    and self.batch_bytes < _MAX_BATCH_BYTES and self._receive_nowait():
                came = True
                continue
            now = time.monotonic()
            if not fsync:
                failed = self._run_write(sync=False)
            elif (self.unsynced or self.batch) and self.sync_due is not None and now >= self.sync_due:
                failed = self._run_write(sync=True)  # written and synced once the sync is due
            else:
                failed = None
            if failed or self.healed:
                return True, failed
            if not self._send_now(self._acks()):
                return True, None  # the socket is full: the event loop sends the rest (self.unsent)
            if self.stop is not None or self.server.draining or now >= start + _RUN_MAX:
                return came, None
            if self._receive_nowait():
                came, last = True, now
                continue
            wait = last + _RUN_QUIET - now
            if self.sync_due is not None and (self.unsynced or self.batch):
                wait = min(wait, self.sync_due - now)
            if wait > 0:
                self._set_lowat()
                if poller.poll(max(1, round(wait * 1000))) and self._receive_nowait():
                    came, last = True, time.monotonic()
                    continue
            if time.monotonic() - last >= _RUN_QUIET:
                return came, None  # quiet: the event loop waits from here

    def _run_packet(self, msg: Packet) -> bool:
        """Takes a packet in a packet run if it is an ordinary one: the next
        of a stream this connection holds, not blocked by a Retry,
        decompressed here.  Anything else (a resend, a gap, a stream taken
        over, a packet to decompress in a worker thread, one that fails to
        decompress) is left to the event loop's _on_packet, which handles
        and counts it.

        Raises:
            RemoteProtocolError: (PROTOCOL) a bad CTF header (_accept).
        """
        st = self.streams.get(msg.stream_id)
        if st is None or st.file is None or st.blocked_at is not None or msg.seq != st.expect \
                or (msg.codec is Codec.ZSTD and msg.raw_len > self.config.inline_decompress_max):
            return False
        try:
            raw = decompress_packet(msg.data, msg.codec, msg.raw_len, self.config.max_raw_packet,
                                    decompressor=self.decompressor)
        except RemoteProtocolError:
            return False
        self._accept(st, raw, msg, self.conn.last_frame_size, time.monotonic())
        return True

    def _run_write(self, sync: bool) -> tuple[dict[_OpenStream, OSError], dict[_OpenStream, OSError]] | None:
        """A packet run writes its batch (and syncs, with `sync`).  The run
        then ends, leaving the event loop to handle it before anything is
        acknowledged, if a write failed (returned) or one healed a fault of
        the output (self.healed).

        Returns:
            The streams whose write failed and those whose sync failed, or
            None if none did.
        """
        if not self.batch and not (sync and self.unsynced):
            return None
        failed, sync_failed = self._written(self._take_batch(sync)(), in_run=True)
        return (failed, sync_failed) if failed or sync_failed else None

    def _send_now(self, msgs: list[Message]) -> bool:
        """Sends `msgs` from a packet run's thread, as much as the socket
        takes now.  What it does not take is kept in self.unsent for the
        event loop (_packet_run), whose send is bounded by idle_timeout and
        can be cancelled (a drain's deadline, a second SIGTERM): a peer that
        does not read never holds the thread.

        Returns:
            Whether everything was sent.

        Raises:
            trio.BrokenResourceError: the connection broke.
        """
        if not msgs:
            return True
        try:
            view = memoryview(b"".join([part for msg in msgs for part in self.conn.send_parts(msg)]))
            while view:
                view = view[os.write(self.fd, view):]
        except BlockingIOError:
            self.unsent = bytes(view)
            return False
        except OSError as exc:
            self.conn.send_failed()
            raise trio.BrokenResourceError(f"send failed: {_strerror(exc)}") from exc
        except BaseException:
            self.conn.send_failed()
            raise
        return True

    async def _receive_more(self) -> None:
        """Waits for bytes, bounded by idle_timeout; in fsync mode, syncs
        and acknowledges when the sync window ends first."""
        deadline = trio.current_time() + self.config.idle_timeout
        while self.sync_due is not None:
            with trio.move_on_at(min(self.sync_due, deadline)):
                await self._receive_unless_draining()
                return
            await self._acknowledge(sync=True)
        if self.config.fsync:
            # Everything is synced and acknowledged: a connection that stays
            # quiet keeps no buffers.  Not at once: with a sync window of a
            # millisecond a busy connection is all synced between two packets,
            # and would receive every payload into a new buffer (page faults
            # and zeroing: the most of a packet's cost in the relay).
            with trio.move_on_at(min(deadline, trio.current_time() + _KEEP_BUFFERS_QUIET)) as quiet:
                await self._receive_unless_draining()
            if not quiet.cancelled_caught:
                return
            self.conn.release_buffers()
        with trio.fail_at(deadline):
            await self._receive_unless_draining()

    async def _receive_unless_draining(self) -> None:
        """_receive, but a drain (RelayServer.request_drain) ends the wait
        as if nothing came.  Only the wait: never a send or a write."""
        with trio.CancelScope() as scope:
            if self.server.draining:
                return
            self.wait_scope = scope
            try:
                await self._receive()
            finally:
                self.wait_scope = None

    async def _dispatch(self, msg: Message) -> None:
        match msg:
            case Packet():
                await self._on_packet(msg)
                return
            case Bye():
                self.got_bye = True
                return
        # Anything else is answered or touches the files after every packet
        # before it is written, made durable and acknowledged.
        await self._settle()
        match msg:
            case Metadata():
                await self._on_metadata(msg)
            case SessionDecl():
                await self._on_session(msg)
            case StreamDecl():
                await self._on_stream(msg)
            case StreamStateRequest():
                st = self._stream(msg.stream_id)
                assert st.file is not None
                await self._send(StreamState(msg.stream_id, st.file.next_seq))
            case StreamClose():
                await self._close_stream(msg.stream_id)
            case SessionClose():
                await self._close_session(msg.session_id)
            case ChunkClose():
                await self._close_chunk(msg)
            case _:  # the core lets nothing else through in this state
                raise RemoteProtocolError(ErrorCode.BAD_STATE, f"unexpected {type(msg).__name__}")

    async def _settle(self) -> None:
        """Writes the batch, makes it durable (fsync mode) and acknowledges it
        (fsync mode: written and synced in one worker-thread call, by _acknowledge)."""
        if not self.config.fsync:
            await self._write_batch()
        await self._acknowledge(sync=True)

    async def _write_batch(self, *, sync: bool = False) -> None:
        """Writes the batched packets in the connection's I/O thread; with
        `sync` (fsync mode) the same call then makes every stream written
        since the last sync durable.  A stream whose write or sync fails with
        an error that can heal is cut back and asked to resend."""
        if not self.batch and not (sync and self.unsynced):
            return
        job = self._take_batch(sync)
        async with self.io_lock:
            result = await self.io_thread.run(job)
        failed, sync_failed = self._written(result)
        self._failed(failed)
        self._failed(sync_failed)

    def _take_batch(self, sync: bool) -> Callable[[], _WriteResult]:
        """Takes the batch (and, with `sync`, the streams to make durable)
        for one call of _write_packets, returned ready to run in a thread."""
        batch, self.batch, self.batch_bytes = self.batch, [], 0
        index = not self.config.fsync  # fsync mode: index entries only after the data is durable
        to_sync: list[_OpenStream] | None = None
        if sync:
            to_sync, self.unsynced, self.sync_due = list(self.unsynced.values()), {}, None
        write = partial(self.server.in_io_slot, partial(_write_packets, batch, index, to_sync, self.config.fdatasync))

        def job() -> _WriteResult:
            failed, sync_failed, seconds = write()
            return batch, to_sync, failed, sync_failed, seconds

        return job

    def _written(self, result: _WriteResult, *, in_run: bool = False) -> tuple[
            dict[_OpenStream, OSError], dict[_OpenStream, OSError]]:
        """Takes note of a batch written by _write_packets: counters, buffers
        back to the pool, the live viewers' index, what to acknowledge and
        what to sync.  `in_run`: called in a packet run's thread (a fault
        the batch healed is then left to the event loop: self.healed).

        Returns:
            The streams whose write failed and those whose sync failed, with
            their errors (for _failed).
        """
        batch, to_sync, failed, sync_failed, sync_seconds = result
        if to_sync is not None:
            self.sync_cost = sync_seconds
        counters = self.server.counters
        for w in batch:
            # Written: what the file holds after any cut-back (a stream
            # taken over before the write was not written: the io_lock
            # keeps a takeover from happening during it).
            file = w.st.file
            # (From a packet run's thread too: the stream's counts exist
            # from its StreamDecl to its close, and only its owner, which
            # holds the io_lock, adds to them.)
            if file is not None and w.msg.seq < file.next_seq:
                counters.written(w.st.rel, w.msg.raw_len, w.frame_size, w.msg.events_discarded)
            self.conn.recycle(w.msg.data)
        streams = [st for st in {id(w.st): w.st for w in batch}.values() if st.file is not None]
        if self.server.live.sessions:
            # From a packet run's thread too: LiveRegistry.indexed only
            # raises one stream's count, and only its owner calls it.
            for st in streams + (to_sync or []):
                if isinstance(st.file, StreamFile):
                    self.server.live.indexed(st.path, _index_entries(st.file))
        for st in streams:
            self.to_ack[st.decl.stream_id] = st
            if self.config.fsync and to_sync is None:
                self.unsynced[st.decl.stream_id] = st
        if not self.unsynced:
            # Nothing left to sync (the batch's streams may all have been
            # taken over meanwhile): no sync is due, or _receive_more would spin.
            self.sync_due = None
        if self.server.faults:
            for st in streams:
                if st not in failed and st not in sync_failed:
                    if in_run:
                        self.healed.add(st.path)
                    else:
                        self.server.written(st.path)
        return failed, sync_failed

    def _failed(self, failed: Mapping[_OpenStream, OSError]) -> None:
        """Streams whose files were cut back after `exc`: a Retry each, or
        the connection ends for an error that cannot heal.

        Raises:
            OSError: an error that cannot heal.
        """
        for st, exc in failed.items():
            reason = retry_reason(exc)
            if reason is None:
                raise exc
            assert st.file is not None
            st.expect = st.blocked_at = st.file.next_seq
            self.server.fault(reason, exc, st.path)
            self.retries[st.decl.stream_id] = Retry(st.decl.stream_id, st.file.next_seq, reason, _strerror(exc))

    async def _acknowledge(self, *, sync: bool) -> None:
        """Sends an Ack per stream that got packets, then the Retries; in fsync
        mode only for what an fdatasync covers (synced now when `sync` is set
        or the window is over)."""
        if self.config.fsync and (self.unsynced or self.batch) \
                and (sync or trio.current_time() >= (self.sync_due or 0)):
            await self._write_batch(sync=True)
        for msg in self._acks():
            await self._send(msg)

    def _acks(self) -> list[Message]:
        """The Acks due (one per stream that got packets: in fsync mode for
        what an fdatasync covers), then the Retries."""
        msgs: list[Message] = []
        pending, self.to_ack = self.to_ack, {}
        for stream_id, st in pending.items():
            if st.file is None:
                continue
            if self.config.fsync:
                if stream_id in self.unsynced:
                    self.to_ack[stream_id] = st  # acknowledged once synced
                seq = st.durable.next_seq - 1 if st.durable is not None else -1
            else:
                seq = st.file.indexed_seq
            if seq > st.acked:
                st.acked = seq
                msgs.append(Ack(stream_id, seq))
        retries, self.retries = self.retries, {}
        msgs += retries.values()
        return msgs

    def _stream(self, stream_id: int) -> _OpenStream:
        """The open stream `stream_id`, if this connection still owns its file.

        Raises:
            RemoteProtocolError: (BAD_STATE) if another connection took it over.
        """
        st = self.streams[stream_id]  # the core checked the id is open
        if st.file is None:
            raise RemoteProtocolError(
                ErrorCode.BAD_STATE, f"stream {stream_id} ({st.path}) was taken over by another connection"
            )
        return st

    async def _on_session(self, msg: SessionDecl) -> None:
        assert self.hostname is not None
        name = validate_name(msg.name, "session name")
        directory = self.server.safe_path(self.hostname, f"{name}-{msg.created}")
        await self._io(partial(_makedirs, self.server.output, directory), directory)
        self.sessions[msg.session_id] = directory
        self.server.counters.session_opened(os.path.relpath(directory, self.server.output))
        if msg.live and msg.session_id not in self.live:
            self.live.add(msg.session_id)
            self.server.live.session_declared(self.hostname, name, directory)
        logger.info("%s: session %d -> %s%s", self, msg.session_id, directory, " (live)" if msg.live else "")

    async def _trace_dir(self, session_id: int, trace_path: str) -> str:
        session_dir = self.sessions[session_id]  # the core checked the id is open
        rel = os.path.relpath(session_dir, self.server.output)
        directory = self.server.safe_path(rel, validate_trace_path(trace_path))
        if not directory.startswith(session_dir + os.sep):
            raise RemoteProtocolError(ErrorCode.BAD_NAME, f"trace path {trace_path!r} leaves its session")
        await self._io(partial(_makedirs, self.server.output, directory), directory)
        return directory

    async def _on_stream(self, msg: StreamDecl) -> None:
        channel = validate_name(msg.channel, "channel")
        directory = await self._trace_dir(msg.session_id, msg.trace_path)
        name = f"{channel}_{msg.index}"
        rel = os.path.relpath(directory, self.server.output)
        path = self.server.safe_path(rel, name)
        self.server.safe_path(rel, "index", name + ".idx")  # StreamFile creates it
        st = _OpenStream(msg, path, None, self)
        await self._declaring(path, partial(self.server.take_stream, st, directory, name))
        self.streams[msg.stream_id] = st
        assert st.file is not None
        logger.info("%s: stream %d -> %s (next seq %d)", self, msg.stream_id, path, st.file.next_seq)
        session_dir = self.sessions[msg.session_id]
        if msg.session_id in self.live:
            if isinstance(st.file, StreamFile):
                self.server.live.stream_declared(session_dir, directory, rel, name, path,
                                                 st.file.index_path, _index_entries(st.file))
            else:
                logger.warning("%s: stream %s has file limits: live viewers do not see it", self, path)

    async def _close_stream(self, stream_id: int) -> None:
        st = self.streams.pop(stream_id)
        async with self.io_lock:
            await self.server.release_stream(st)
        if st.decl.session_id in self.live:
            self.server.live.stream_closed(st.path)

    async def _close_session(self, session_id: int) -> None:
        for stream_id in [i for i, st in self.streams.items() if st.decl.session_id == session_id]:
            await self._close_stream(stream_id)
        session_dir = self.sessions.pop(session_id)
        prefix = session_dir + os.sep
        for path in [p for p in self.metadata_fds if p.startswith(prefix)]:
            os.close(self.metadata_fds.pop(path))
        if session_id in self.live:
            self.live.discard(session_id)
            self.server.live.session_closed(session_dir)

    async def _close_chunk(self, msg: ChunkClose) -> None:
        """Moves a complete trace chunk of the session (a rotation) to its
        archive directory, then says so.  Every stream file and metadata file
        of this connection below it is closed first; a source already moved
        (a ChunkClose resent after a reconnect) is no error."""
        session_dir = self.sessions[msg.session_id]  # the core checked the id is open
        rel = os.path.relpath(session_dir, self.server.output)
        source = self.server.safe_path(rel, validate_trace_path(msg.source))
        target = self.server.safe_path(rel, validate_trace_path(msg.target))
        for path, what in ((source, "source"), (target, "target")):
            if not path.startswith(session_dir + os.sep):
                raise RemoteProtocolError(ErrorCode.BAD_NAME, f"ChunkClose {what} leaves its session")
        if source == target or target.startswith(source + os.sep) or source.startswith(target + os.sep):
            raise RemoteProtocolError(ErrorCode.PROTOCOL, f"ChunkClose {msg.source!r} -> {msg.target!r} overlaps")
        prefix = source + os.sep
        for path, st in list(self.server.owners.items()):
            if path.startswith(prefix):
                async with st.owner.io_lock:
                    await self.server.release_stream(st)
        for path in [p for p in self.metadata_fds if p.startswith(prefix)]:
            os.close(self.metadata_fds.pop(path))
        problem = await self._io(partial(_move_chunk, self.server.output, session_dir, source, target), target)
        if problem is not None:
            raise RemoteProtocolError(ErrorCode.PROTOCOL, f"ChunkClose: {problem}")
        logger.info("%s: chunk %s archived as %s", self, msg.source, msg.target)
        await self._send(ChunkClosed(msg.session_id, msg.target))

    async def _on_metadata(self, msg: Metadata) -> None:
        directory = await self._trace_dir(msg.session_id, msg.trace_path)
        path = os.path.join(directory, "metadata")
        fd = self.metadata_fds.get(path)
        if fd is None:
            fd = await self._io(partial(os.open, path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                                        _FILE_MODE), path)
            self.metadata_fds[path] = fd
        problem = await self._io(partial(_write_metadata, fd, msg.offset, msg.data, self.config.fsync), path)
        if problem is not None:
            raise RemoteProtocolError(ErrorCode.PROTOCOL, f"metadata at offset {msg.offset}: {problem} ({path})")
        if msg.session_id in self.live:
            self.server.live.metadata_written(self.sessions[msg.session_id], directory,
                                              os.path.relpath(directory, self.server.output),
                                              msg.offset + len(msg.data))

    async def _on_packet(self, msg: Packet) -> None:
        frame_size = self.conn.last_frame_size  # msg is the message next_event() returned last
        st = self._stream(msg.stream_id)
        if st.blocked_at is not None:
            if msg.seq != st.blocked_at:
                return  # in flight when the Retry left: resent after it
            st.blocked_at = None
        if msg.seq < st.expect:  # a resend of what we have: drop it, ack again
            self.to_ack[msg.stream_id] = st
            return
        if msg.seq > st.expect:
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL, f"stream {msg.stream_id}: packet seq {msg.seq}, expected {st.expect}"
            )
        decode = partial(decompress_packet, msg.data, msg.codec, msg.raw_len, self.config.max_raw_packet)
        threaded = msg.codec is Codec.ZSTD and msg.raw_len > self.config.inline_decompress_max
        try:
            if threaded:
                raw = await trio.to_thread.run_sync(decode, limiter=self.server.decompress_limiter)
            else:  # in the event loop, with the connection's own decompressor
                raw = decode(decompressor=self.decompressor)
        except RemoteProtocolError:
            self.server.counters.decompression_errors += 1
            raise
        if threaded:
            st = self._stream(msg.stream_id)  # it may have been taken over meanwhile
        self._accept(st, raw, msg, frame_size, trio.current_time())
        if self.batch_bytes >= _MAX_BATCH_BYTES:
            await self._write_batch()

    def _accept(self, st: _OpenStream, raw: Buffer, msg: Packet, frame_size: int, now: float) -> None:
        """Checks a decoded packet's CTF header and adds it to the batch; in
        fsync mode a sync is due from `now` on (the caller's clock).

        Raises:
            RemoteProtocolError: (PROTOCOL) the header is malformed, or
                disagrees with the message or the stream's earlier packets.
        """
        ctf_stream_id = _check_packet(raw, msg)
        if st.ctf_stream_id is None:
            st.ctf_stream_id = ctf_stream_id
        elif ctf_stream_id != st.ctf_stream_id:
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL,
                f"stream {msg.stream_id}: packet of CTF stream class {ctf_stream_id}, earlier ones {st.ctf_stream_id}",
            )
        self.batch.append(_Write(st, raw, msg, ctf_stream_id, frame_size))
        st.expect += 1
        self.batch_bytes += len(raw)
        if self.config.fsync and self.sync_due is None:
            wait = min(self.config.fsync_interval, max(_MIN_SYNC_WAIT, _SYNC_WAIT_FACTOR * self.sync_cost))
            self.sync_due = now + wait


# -- file-system work, run in worker threads ---------------------------------


def _index_entries(file: StreamFile) -> int:
    """Index entries of ``file`` on disk: the packets a live viewer may read."""
    return (file.checkpoint().index_size - len(ctf.INDEX_HEADER)) // ctf.INDEX_ENTRY_SIZE


def _makedirs(output: str, directory: str) -> None:
    """Creates `directory` and its missing parents below `output`, 0750 each."""
    missing = []
    d = directory
    while d != output and not os.path.isdir(d):
        missing.append(d)
        d = os.path.dirname(d)
    for d in reversed(missing):
        try:
            os.mkdir(d, _DIR_MODE)
        except FileExistsError:
            pass


def _move_chunk(output: str, session_dir: str, source: str, target: str) -> str | None:
    """Moves the chunk directory `source` to `target` (creating its
    parents), then removes the parents of `source` left empty, up to the
    session directory.  Returns a problem in words, or None when done (or
    done before: `source` is gone)."""
    if not os.path.lexists(source):
        _makedirs(output, target)  # moved already, or a chunk without data
        return None
    if os.path.lexists(target):
        return f"{os.path.relpath(target, session_dir)} exists already"
    _makedirs(output, os.path.dirname(target))
    os.rename(source, target)
    d = os.path.dirname(source)
    while d.startswith(session_dir + os.sep):
        try:
            os.rmdir(d)
        except OSError:
            break
        d = os.path.dirname(d)
    return None


def _write_packets(
    batch: list[_Write], index: bool, sync: list[_OpenStream] | None = None,
    fdatasync: Callable[[int], None] = os.fdatasync,
) -> tuple[dict[_OpenStream, OSError], dict[_OpenStream, OSError], float]:
    """Appends each packet to its stream file, then (unless `index` is
    False) writes the index entries.  A stream whose append fails keeps the
    packets before (StreamFile cuts the failed one) and skips the rest of the
    batch; one whose index write fails is rolled back to its last indexed
    packet.  Then, when `sync` is given (fsync mode), the streams of `sync`
    and of the batch are made durable (_sync_streams): one worker-thread
    call for both.

    Returns:
        ({stream: the error} for the streams whose write failed, the same
        for those whose sync failed, the seconds the sync took: 0 without).
    """
    failed: dict[_OpenStream, OSError] = {}
    for w in batch:
        st, file = w.st, w.st.file
        if file is None or st in failed:
            continue
        m = w.msg
        try:
            file.append([memoryview(w.raw)], m.ts_begin, m.ts_end, m.events_discarded, stream_id=w.ctf_stream_id)
        except OSError as exc:
            failed[st] = exc
    if index:
        for st in {id(w.st): w.st for w in batch}.values():
            file = st.file
            if file is None:
                continue
            try:
                file.flush()
            except OSError as exc:
                failed.setdefault(st, exc)
                _rollback(file)
    if sync is None:
        return failed, {}, 0.0
    streams = {id(st): st for st in sync}
    streams.update((id(w.st), w.st) for w in batch)
    began = time.monotonic()
    sync_failed = _sync_streams(list(streams.values()), fdatasync)
    return failed, sync_failed, time.monotonic() - began


def _sync_streams(streams: list[_OpenStream], fdatasync: Callable[[int], None]) -> dict[_OpenStream, OSError]:
    """fsync mode: makes each stream's packets durable, then their index
    entries; a stream that fails goes back to where it was last durable.

    Returns:
        {stream: the error} for the streams that failed.
    """
    failed: dict[_OpenStream, OSError] = {}
    for st in streams:
        file = st.file
        if file is None:
            continue
        try:
            fdatasync(file.fd)
            file.flush()
            fdatasync(file.ifd)
        except OSError as exc:
            failed[st] = exc
            _rollback(file, st.durable)
        else:
            st.durable = file.checkpoint()
    return failed


def _sync_file(file: StreamFile | StreamFiles, fdatasync: Callable[[int], None]) -> None:
    fdatasync(file.fd)
    fdatasync(file.ifd)


def _close_file(file: StreamFile | StreamFiles, durable: Checkpoint | None) -> None:
    """Closes a stream file; in fsync mode (`durable` given) what was written
    after its last sync goes first: it was never acknowledged."""
    if durable is not None:
        _rollback(file, durable)
    file.close()


def _rollback(file: StreamFile | StreamFiles, point: Checkpoint | None = None) -> None:
    try:
        file.rollback(point)
    except OSError:
        pass  # recovery at the next open cuts what is left


def _write_metadata(fd: int, offset: int, data: Buffer, sync: bool) -> str | None:
    """Writes metadata bytes at `offset`, skipping what the file holds already.

    Returns:
        Why the bytes are refused (they differ from what is there, or leave a
        hole), or None once written.
    """
    size = os.fstat(fd).st_size
    view = memoryview(data).cast("B")
    if offset > size:
        return f"offset is past the end of the file ({size} bytes)"
    skip = min(size - offset, len(view))  # a resend: these bytes are there already
    if skip and os.pread(fd, skip, offset) != view[:skip]:
        return "differs from what the file holds"
    rest = view[skip:]
    pos = offset + skip
    while rest:
        n = os.pwrite(fd, rest, pos)
        rest, pos = rest[n:], pos + n
    if sync:
        os.fdatasync(fd)
    return None


def _check_packet(raw: Buffer, msg: Packet) -> int:
    """Checks a decoded packet's CTF header against itself and `msg`.

    Returns:
        The packet's CTF stream_id (stream class; header offset 20).

    Raises:
        RemoteProtocolError: (PROTOCOL) if the header is malformed or
            disagrees with the Packet message.
    """

    def bad(what: str) -> RemoteProtocolError:
        return RemoteProtocolError(ErrorCode.PROTOCOL, f"stream {msg.stream_id} seq {msg.seq}: {what}")

    try:
        # The reader's check; the packet's size was bounded by decompression.
        h = ctf.check_packet_header(raw, exact=True, max_packet_size=None)
    except ctf.CTFError as exc:
        raise bad(exc.reason) from None
    got = (h.timestamp_begin, h.timestamp_end, h.content_size, h.packet_size, h.packet_seq_num, h.events_discarded)
    said = (msg.ts_begin, msg.ts_end, msg.content_size_bits, msg.packet_size_bits, msg.packet_seq_num,
            msg.events_discarded)
    if got != said:
        names = ("ts_begin", "ts_end", "content_size", "packet_size", "packet_seq_num", "events_discarded")
        diff = ", ".join(f"{n} {g} != {s}" for n, g, s in zip(names, got, said) if g != s)
        raise bad(f"packet header disagrees with the Packet message: {diff}")
    return h.stream_id


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def _prepare_output(path: str) -> str:
    """Creates OUTPUT if needed and returns its real path.

    Raises:
        RelaydStartupError: if it cannot be created or written to.
    """
    try:
        os.makedirs(path, mode=_DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise RelaydStartupError(f"cannot create output directory {path}: {exc.strerror or exc}") from exc
    real = os.path.realpath(path)
    if not os.path.isdir(real) or not os.access(real, os.W_OK | os.X_OK):
        raise RelaydStartupError(f"output directory {path} is not a writable directory")
    return real


class Listeners(list[trio.SocketListener]):
    """The consumer port's bound listeners; ``live`` holds the live port's
    (empty without one); ``server`` is the RelayServer (request_drain,
    set_auth_keys); ``metrics`` the metrics endpoint's (host, port) (None
    without one)."""

    def __init__(self, listeners: list[trio.SocketListener], live: list[trio.SocketListener],
                 server: RelayServer, metrics: tuple[str, int] | None = None) -> None:
        super().__init__(listeners)
        self.live = live
        self.server = server
        self.metrics = metrics


async def serve_relayd(
    config: RelaydConfig, *, task_status: trio.TaskStatus[Listeners] = trio.TASK_STATUS_IGNORED
) -> None:
    """Runs the relay until cancelled, or until a drain ends
    (``listeners.server.request_drain()``: see RelayServer.request_drain).

    Args:
        config: the configuration.
        task_status: receives the bound trio.SocketListener (the TCP
            listeners, also when serving TLS) once the relay is listening;
            `listeners[0].socket.getsockname()[1]` is the port when
            listen_port is 0; `listeners.live` are the live port's.

    Raises:
        RelaydStartupError: before task_status.started, if the output
            directory is unusable or the address cannot be bound.
    """
    output = _prepare_output(config.output)
    try:
        listeners = await trio.open_tcp_listeners(config.listen_port, host=config.listen_host)
    except OSError as exc:
        raise RelaydStartupError(
            f"cannot listen on {format_hostport(config.listen_host, config.listen_port)}: {exc.strerror or exc}"
        ) from exc
    server = RelayServer(config, output)
    served: list[trio.abc.Listener[trio.abc.Stream]] = (
        [trio.SSLListener(listener, config.tls) for listener in listeners]
        if config.tls is not None
        else list(listeners)
    )
    addresses = ", ".join(_format_address(listener.socket.getsockname()) for listener in listeners)
    if config.auth_keys is None:
        logger.warning("no auth keys: the relay on %s accepts and writes traces from anyone who can connect", addresses)
    logger.info("listening on %s%s, writing to %s", addresses, " (TLS)" if config.tls else "", output)
    live: list[trio.SocketListener] = []
    if config.live is not None:
        try:
            live = await trio.open_tcp_listeners(config.live.listen_port, host=config.live.listen_host)
        except OSError as exc:
            for listener in listeners:
                await listener.aclose()
            where = format_hostport(config.live.listen_host, config.live.listen_port)
            raise RelaydStartupError(f"cannot listen for live viewers on {where}: {exc.strerror or exc}") from exc
        logger.info("live viewers on %s (no authentication in the live protocol)",
                    ", ".join(_format_address(lst.socket.getsockname()) for lst in live))
    endpoint = None
    if config.metrics is not None:  # prometheus_client is imported only then
        from relayd.metrics import bind_metrics

        try:
            endpoint = bind_metrics(config.metrics)
        except OSError as exc:
            for listener in listeners + live:
                await listener.aclose()
            raise RelaydStartupError(f"cannot serve metrics on {config.metrics}: {exc.strerror or exc}") from exc
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as nursery:
            if config.live is not None:
                await nursery.start(partial(serve_live, config.live, server.live, listeners=live))
            await nursery.start(partial(trio.serve_listeners, server.handle, served, handler_nursery=connections))
            metrics = None
            if endpoint is not None:
                from relayd.metrics import serve_relay_metrics

                metrics = await nursery.start(serve_relay_metrics, endpoint, server)
            task_status.started(Listeners(listeners, live, server, metrics))
            await server.drain_requested.wait()
            # Stop accepting: the accept loops close their listeners; live
            # viewers are dropped (they only read what is on disk); the
            # metrics endpoint closes.
            logger.info("draining: no new connections; %d open settle and close", len(server.connections))
            nursery.cancel_scope.cancel()
        with trio.move_on_after(config.drain_timeout) as timer:
            await server.drained.wait()
        if timer.cancelled_caught:
            logger.warning("drain: %d connections still open after %g s: cut (their peers resend what was "
                           "not acknowledged)", len(server.connections), config.drain_timeout)
        connections.cancel_scope.cancel()
    logger.info("drained")


def _format_address(sockname: tuple[object, ...]) -> str:
    host, port = str(sockname[0]), sockname[1]
    assert isinstance(port, int)  # an AF_INET/AF_INET6 address
    return format_hostport(host, port)
