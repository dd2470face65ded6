"""sessiond's data model: sessions, channels, streams, traces, apps.

The :class:`Registry` holds every session and registered app of one sessiond,
and turns that state into the consumerd operations that describe it
(:meth:`Registry.session_op`, :meth:`Registry.trace_op`,
:meth:`Registry.stream_op`, and the whole replay for a restarted consumerd).
Nothing here does I/O but closing a freed buffer's descriptors.
"""

from __future__ import annotations

import fnmatch
import os
import socket
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

import trio

from sessiond.limits import LimitsPolicy
from tracewire import ctf
from tracewire.consumer_ops import AddStreamOp, AddTraceOp, MetadataOp, Op, ProducerGoneOp, SessionOp
from tracewire.control import close_fds
from tracewire.ops import DEFAULT_NUM_SUBBUF, DEFAULT_SPOOL_SIZE, DEFAULT_SUBBUF_SIZE, Compression

if TYPE_CHECKING:
    from sessiond.resume import ResumeJournal

if TYPE_CHECKING:  # imported only by a sessiond that serves metrics
    from tracewire.metrics_config import MetricsConfig

__all__ = ["App", "AppLink", "Channel", "Outgoing", "Registry", "Session", "SessionState", "SessiondConfig", "Stream",
           "Trace", "UserError", "chunk_stamp", "now_stamp"]


@dataclass(frozen=True, slots=True)
class SessiondConfig:
    rundir: str
    app_stop_timeout: float = 5.0
    stop_timeout: float = 120.0  # how long stop waits for a relay's acknowledgements
    consumer_timeout: float = 60.0
    hostname: str = ""
    # What one app (one connection on apps.sock) and one uid may cost sessiond.
    app_queue: int = 256  # messages waiting for an app to read them
    app_send_timeout: float = 5.0  # an app that reads nothing this long is dropped
    app_message_limit: int = 1024 * 1024  # bytes in one message from an app
    max_apps_per_uid: int = 1024  # connections on apps.sock
    max_tracepoints_per_app: int = 4096
    max_declared_per_app: int = 1024 * 1024  # bytes of declarations (names, fields)
    max_declared_per_uid: int = 16 * 1024 * 1024  # summed over the uid's connected apps
    max_metadata_per_uid: int = 16 * 1024 * 1024  # compressed metadata kept for the uid's traces
    register_timeout: float = 10.0  # a connection must register within this
    # The consumerd of root's sessions runs SCHED_RR at this priority (0:
    # normal scheduling) when sessiond may grant it (see docs/design.md, "Why
    # consumerd runs at a real-time priority").
    consumer_rt_priority: int = 1
    # A snapshot session keeps the rings of this many apps that are gone.
    snapshot_keep_dead: int = 16
    # How often the rotation schedules are checked (a timer's precision; the
    # size of a chunk is asked of consumerd this often).
    rotation_check_interval: float = 0.5
    # Per-user limits (--limits FILE; the built-in defaults without one).
    limits: LimitsPolicy = field(default_factory=LimitsPolicy)
    # Saved sessions (*.json) loaded at start-up (sessiond/saved.py).
    load_dir: str | None = None
    # --metrics-listen: serve the consumerds' counters for Prometheus (None: off).
    metrics: MetricsConfig | None = None


class UserError(Exception):
    """A request that cannot be done: reported to the CLI as one line."""


class SessionState(Enum):
    CREATED = "created"
    STARTED = "started"
    STOPPED = "stopped"


@dataclass
class Channel:
    name: str
    index: int
    subbuf_size: int = DEFAULT_SUBBUF_SIZE
    num_subbuf: int = DEFAULT_NUM_SUBBUF
    overwrite: bool = False
    switch_timer_ms: int = 0
    patterns: list[str] = field(default_factory=list)
    blocking_timeout_ms: int = 0  # 0: discard mode; ops.BLOCK_FOREVER: wait for ever
    tracefile_size: int = 0  # bytes per stream file (0: one file per stream)
    tracefile_count: int = 0  # stream files kept (0: all)
    # Patterns enabled with a log level (``enable-event --loglevel`` /
    # ``--loglevel-only``): pattern -> (level, only).  They match only log
    # events (``tracewire.logging``) at that level or above (or exactly).
    loglevels: dict[str, tuple[int, bool]] = field(default_factory=dict)

    def matches(self, name: str, loglevel: int | None = None) -> bool:
        """Whether an event of this name (and, for a log event, level) is
        enabled in the channel."""
        for p in self.patterns:
            if not fnmatch.fnmatchcase(name, p):
                continue
            rule = self.loglevels.get(p)
            if rule is None:
                return True
            if loglevel is not None and (loglevel == rule[0] if rule[1] else loglevel >= rule[0]):
                return True
        return False


@dataclass
class Stream:
    """One ring buffer of (session, channel, app); sessiond holds its fds."""

    key: str
    session: str
    channel: str
    app_id: int  # the registration, never the pid (a pid can be reused)
    memfd: int
    eventfd: int
    ids: frozenset[int] = frozenset()
    # A blocking channel's: the write end of the pipe that wakes the app
    # waiting for space (consumerd gets a copy; kept for a restarted one).
    space_w: int = -1
    # A snapshot session's stream whose app is gone: when (the order of
    # deaths) its ring was kept for the snapshots; 0 while the app lives.
    dead: int = 0

    @property
    def fds(self) -> tuple[int, ...]:
        """What consumerd is given with the stream (none once freed)."""
        if self.memfd < 0:
            return ()
        return (self.memfd, self.eventfd) + ((self.space_w,) if self.space_w >= 0 else ())

    def free_buffer(self) -> None:
        """consumerd has everything the dead app wrote (or the session is
        destroyed): free its ring buffer.  Closing the space pipe's write
        end here, and consumerd's with its stream, ends the wait of an app
        still blocked on the ring (end of file)."""
        if self.memfd >= 0:
            os.close(self.memfd)
            os.close(self.eventfd)
        if self.space_w >= 0:
            os.close(self.space_w)
        self.memfd = self.eventfd = self.space_w = -1


@dataclass
class Trace:
    """One app's trace directory inside one session.

    The metadata sent so far is kept (to replay it to a restarted consumerd)
    as zlib-compressed pieces, each with its byte offset: TSDL compresses
    about tenfold, and what is kept counts against the app's uid."""

    trace_id: str
    path: str
    uuid: bytes
    uid: int  # the app's, whose budget the kept metadata counts against
    declared: int = 0  # tracepoints of the app already in the metadata
    size: int = 0  # bytes of metadata so far (UTF-8)
    pieces: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, compressed text)

    @property
    def kept(self) -> int:
        return sum(len(c) for _, c in self.pieces)

    def add_pieces(self, text: str) -> list[MetadataOp]:
        """Split ``text`` into operations that each fit one message, and keep them."""
        out = []
        for i in range(0, len(text), MetadataOp.MAX_CHARS):
            piece = text[i:i + MetadataOp.MAX_CHARS]
            out.append(MetadataOp(trace_id=self.trace_id, text=piece, offset=self.size))
            self.pieces.append((self.size, zlib.compress(piece.encode(), 1)))
            self.size += len(piece.encode())
        return out

    def metadata_ops(self) -> list[MetadataOp]:
        """Every piece sent so far, as sent."""
        return [MetadataOp(trace_id=self.trace_id, text=zlib.decompress(c).decode(), offset=off)
                for off, c in self.pieces]


@dataclass
class Session:
    name: str
    id: int
    owner_uid: int
    owner_gid: int
    output: str | None
    url: str | None
    created: str
    state: SessionState = SessionState.CREATED
    compress: Compression = Compression.ZSTD
    compress_level: int = 1
    spool_size: int = DEFAULT_SPOOL_SIZE
    auth_key_file: str | None = None
    tls_ca: str | None = None
    declared: bool = False  # consumerd knows the session
    stop_pending: bool = False  # stopped, but the last stop's flush did not complete
    stopping: bool = False  # a stop is waiting for the sink right now
    error: str | None = None  # the last failure to trace an app (status shows it)
    channels: dict[str, Channel] = field(default_factory=dict)
    traces: dict[int, Trace] = field(default_factory=dict)  # by app id
    streams: dict[str, Stream] = field(default_factory=dict)
    clock_offset_ns: int = 0
    snapshot: bool = False  # a flight-recorder session: rings are only read by snapshot record
    snapshots: int = 0  # snapshot records so far (the SEQ of the next one's directory)
    # Rotation: the current trace chunk (= chunks archived so far), when it
    # began (chunk_stamp(); "" before the first start), the last archive's
    # path, and the schedule (0: that condition is off).
    chunk: int = 0
    chunk_begin: str = ""
    last_archive: str | None = None
    rotated_while_stopped: bool = False  # a stopped session rotates once
    rotation_timer_ms: int = 0
    rotation_size: int = 0
    rotation_due: float = 0.0  # trio time of the next timed rotation
    live_timer_us: int = 0  # a live session's timer (0: not live)
    # Rings an app's registration did not get, over the owner's buffers
    # limit: stream key -> why (the last MAX_REFUSED), and how many so far.
    refused: dict[str, str] = field(default_factory=dict)
    refused_total: int = 0

    MAX_REFUSED = 32

    def refuse(self, key: str, why: str) -> None:
        """Remember that stream ``key`` was not created (status shows it)."""
        self.refused[key] = why
        self.refused_total += 1
        while len(self.refused) > self.MAX_REFUSED:
            del self.refused[next(iter(self.refused))]

    def switch_timer_ms(self, ch: Channel) -> int:
        """The switch timer ``ch``'s streams run with: a live session's
        channels hand over at least every live timer period."""
        if not self.live_timer_us:
            return ch.switch_timer_ms
        live_ms = max(1, self.live_timer_us // 1000)
        return live_ms if ch.switch_timer_ms == 0 else min(ch.switch_timer_ms, live_ms)

    @property
    def session_dir(self) -> str:
        assert self.output is not None
        return os.path.join(self.output, f"{self.name}-{self.created}")

    def sink(self) -> str:
        return self.url or self.session_dir

    def channels_in_order(self) -> list[Channel]:
        return sorted(self.channels.values(), key=lambda c: c.index)

    def keys_of(self, app_id: int) -> list[str]:
        """The stream keys of app ``app_id`` in this session."""
        return [st.key for st in self.streams.values() if st.app_id == app_id]

    def trace_path(self, procname: str, pid: int, started: str) -> str:
        """LTTng's ``ust/pid/<procname>-<pid>-<datetime>``, made unique when a
        reused pid registers again within the same second."""
        base = f"ust/pid/{procname}-{pid}-{started}"
        taken = {tr.path for tr in self.traces.values()}
        path, n = base, 1
        while path in taken:
            path, n = f"{base}-{n}", n + 1
        return path


Outgoing = tuple[dict[str, Any], tuple[int, ...]]


class AppLink:
    """The way to one app: a bounded queue that a writer task empties, and
    the cancel scope of the app's connection.  :meth:`post` never waits, so
    nothing that holds shared state waits on an app; an app whose queue
    overflows, or that does not read for ``app_send_timeout``, is dropped."""

    def __init__(self, outbox: trio.MemorySendChannel[Outgoing], scope: trio.CancelScope) -> None:
        self.outbox = outbox
        self.scope = scope
        self.dropped: str | None = None

    def post(self, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        """Queue ``msg`` (with duplicates of ``fds``, closed once sent)."""
        if self.dropped is not None:
            return
        dups = tuple(os.dup(fd) for fd in fds)
        try:
            self.outbox.send_nowait((msg, dups))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            close_fds(list(dups))
            self.drop("does not read its socket (its queue is full)")

    def drop(self, why: str) -> None:
        """End the app's connection; it is then handled as a dead app."""
        if self.dropped is None:
            self.dropped = why
            self.scope.cancel()


@dataclass
class App:
    """A registered traced process (one connection on ``apps.sock``).

    ``id`` is the registration's, unique for the life of sessiond: a pid can
    be reused by another process while sessiond still holds the first one's
    streams."""

    id: int
    pid: int
    uid: int
    procname: str
    link: AppLink
    started: str
    tracepoints: list[ctf.EventDecl] = field(default_factory=list)
    loglevels: dict[int, int] = field(default_factory=dict)  # log event id -> its logging level
    stop_waiters: dict[int, trio.Event] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.procname}-{self.pid}"


def now_stamp() -> str:
    return datetime.now().strftime("%Y%m%dT%H%M%S")


def chunk_stamp() -> str:
    """Now, as the begin or end of a trace chunk's archive name: ISO 8601
    basic format with the UTC offset, ``YYYYmmddTHHMMSS+HHMM``."""
    return datetime.now().astimezone().strftime("%Y%m%dT%H%M%S%z")


class Registry:
    """Every session and app of one sessiond, and the operations that
    describe them to consumerd."""

    def __init__(self, config: SessiondConfig) -> None:
        self.config = config
        self.sessions: dict[str, Session] = {}
        self.current: dict[int, str] = {}  # uid -> current session name
        self.apps: dict[int, App] = {}  # by app id
        self.next_session_id = 1
        self.next_app_id = 1
        self.apps_of_uid: Counter[int] = Counter()  # connections on apps.sock
        self.declared_of_uid: Counter[int] = Counter()  # bytes, connected apps
        self.metadata_of_uid: Counter[int] = Counter()  # compressed bytes kept in traces
        self.lock = trio.Lock()  # one control operation at a time
        self.hostname = config.hostname or os.environ.get("TRACEWIRE_HOSTNAME") or socket.gethostname()
        # Where relay sessions' traces and streams are recorded for a new
        # sessiond to resume their spool (sessiond/resume.py); made when a
        # relay session first needs it, so a sessiond without one does not
        # import it.
        self.journal: ResumeJournal | None = None

    def resume_journal(self) -> ResumeJournal:
        if self.journal is None:
            from sessiond.resume import ResumeJournal

            self.journal = ResumeJournal(self.config.rundir, self.config.max_metadata_per_uid)
        return self.journal

    def journal_changed(self, sess: Session) -> None:
        """``sess`` got a trace, a stream, metadata or a chunk: record it
        when it is a relay session (the journal's I/O is its own)."""
        if sess.url and not sess.snapshot:
            self.resume_journal().write(sess)

    def session_for(self, name: str | None, uid: int) -> Session:
        """The session ``name`` (or ``uid``'s current one), if ``uid`` may use it.

        Raises:
            UserError: no such session, or it belongs to another user.
        """
        name = name or self.current.get(uid)
        if not name:
            raise UserError("no session given and no current session (create one with 'tracewire create NAME')")
        sess = self.sessions.get(name)
        if sess is None:
            raise UserError(f"no session named {name!r}")
        if uid != 0 and sess.owner_uid != uid:
            raise UserError(f"permission denied: session {name!r} belongs to another user")
        return sess

    def remove(self, sess: Session) -> None:
        for st in sess.streams.values():
            st.free_buffer()
        for tr in sess.traces.values():
            self.metadata_of_uid -= Counter({tr.uid: tr.kept})  # zero counts leave the table
        del self.sessions[sess.name]
        if self.journal is not None:
            self.journal.remove(sess)
        for u, n in list(self.current.items()):
            if n == sess.name:
                del self.current[u]

    def spool_dir(self, sess: Session) -> str:
        return os.path.join(self.config.rundir, "spool", f"{sess.name}-{sess.created}")

    # ----------------------------------------------------- consumerd operations
    def session_op(self, sess: Session) -> SessionOp:
        return SessionOp(
            session=sess.name, session_id=sess.id, created=sess.created, sink=sess.sink(),
            hostname=self.hostname, uid=sess.owner_uid, gid=sess.owner_gid,
            compress=sess.compress, compress_level=sess.compress_level,
            auth_key_file=sess.auth_key_file, tls_ca=sess.tls_ca, live=sess.live_timer_us > 0,
            spool_dir=self.spool_dir(sess) if sess.url else None, spool_size=sess.spool_size,
            snapshot=sess.snapshot,
            chunk=sess.chunk,
        )

    @staticmethod
    def trace_op(sess: Session, tr: Trace) -> AddTraceOp:
        return AddTraceOp(trace_id=tr.trace_id, session=sess.name, path=tr.path, uuid=tr.uuid.hex())

    @staticmethod
    def stream_op(sess: Session, st: Stream, replay: bool = False) -> AddStreamOp:
        ch = sess.channels[st.channel]
        return AddStreamOp(
            key=st.key, trace_id=sess.traces[st.app_id].trace_id, session=sess.name, channel=ch.name,
            stream_class=ch.index, subbuf_size=ch.subbuf_size, num_subbuf=ch.num_subbuf,
            switch_timer_ms=sess.switch_timer_ms(ch), replay=replay, gone=replay and st.memfd < 0,
            tracefile_size=ch.tracefile_size, tracefile_count=ch.tracefile_count,
        )

    def replay_ops(self, uid: int) -> list[tuple[Op, tuple[int, ...]]]:
        """Everything a restarted consumerd of ``uid`` must be told, in order.

        Taken in one step (no await), with the ring descriptors duplicated, so
        an app that exits while the replay is sent cannot change what it says;
        the caller closes the duplicates once they are sent.
        """
        out: list[tuple[Op, tuple[int, ...]]] = []
        for sess in self.sessions.values():
            if sess.owner_uid != uid:
                continue
            if sess.declared:
                out.append((self.session_op(sess), ()))
            for tr in sess.traces.values():
                out.append((self.trace_op(sess, tr), ()))
                out.extend((op, ()) for op in tr.metadata_ops())
            for st in sess.streams.values():
                if st.memfd < 0:  # a dead app's buffer, written out and freed
                    out.append((self.stream_op(sess, st, replay=True), ()))
                    continue
                out.append((self.stream_op(sess, st, replay=True), tuple(os.dup(fd) for fd in st.fds)))
                if st.app_id not in self.apps:
                    out.append((ProducerGoneOp(key=st.key), ()))
        return out
