"""tracewire-sessiond: the registry of tracing sessions.

Theory of operation
-------------------
sessiond listens on two unix sockets in its run directory:

* ``control.sock`` (stream, length-prefixed JSON): one request per
  connection from the ``tracewire`` CLI; the caller is identified by
  SO_PEERCRED, never by what it claims.
* ``apps.sock`` (SOCK_SEQPACKET, JSON + SCM_RIGHTS): traced apps register,
  declare tracepoints, and receive their ring buffers and enable sets.

It spawns consumerd as a child, connected by a SEQPACKET socketpair, and
restarts it if it dies.  For every (session, channel, app) that records events
sessiond creates the ring buffer memfd and its eventfd, keeps both open, and
passes them to consumerd and to the app, in that order: consumerd must know a
stream before the app can fill it.  Metadata is generated here (the app's
tracepoint declarations are the source) and appended through consumerd before
the app is told to enable the events it describes.

``stop`` is the barrier: apps disable the session's events and wait for
writers in flight; then consumerd flushes every stream of the session down to
the last whole event and answers once it is written.
"""

from __future__ import annotations

import fcntl
import fnmatch
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from functools import partial
from typing import Any

import trio

from tracewire import ctf
from tracewire.control import ControlError, FrameReader, close_fds, encode_frame
from tracewire.rundir import default_rundir
from tracewire.names import MAX_SESSION_NAME, InvalidName, validate_name
from tracewire.ringbuf import BufferSpec, create_buffer
from tracewire.seqpacket import SeqPacket, peer_credentials
from tracewire.url import parse_url

__all__ = ["SessiondConfig", "serve_sessiond", "default_rundir"]

logger = logging.getLogger(__name__)

DEFAULT_SUBBUF = 256 * 1024
DEFAULT_NUM_SUBBUF = 4
DEFAULT_CHANNEL = "channel0"


@dataclass(frozen=True, slots=True)
class SessiondConfig:
    rundir: str
    consumerd_cmd: tuple[str, ...] = (sys.executable, "-m", "consumerd")
    app_stop_timeout: float = 5.0
    stop_timeout: float = 120.0  # how long stop waits for a relay's acknowledgements
    consumer_timeout: float = 60.0
    hostname: str = ""


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
    subbuf_size: int = DEFAULT_SUBBUF
    num_subbuf: int = DEFAULT_NUM_SUBBUF
    overwrite: bool = False
    switch_timer_ms: int = 0
    patterns: list[str] = field(default_factory=list)

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)


@dataclass
class Stream:
    key: str
    session: str
    channel: str
    pid: int
    memfd: int
    eventfd: int
    ids: frozenset[int] = frozenset()


@dataclass
class Trace:
    """One app's trace directory inside one session."""

    trace_id: str
    path: str
    uuid: bytes
    declared: int = 0  # tracepoints of the app already in the metadata
    metadata: str = ""  # everything sent so far (replayed to a restarted consumerd)


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
    compress: str = "zstd"
    compress_level: int = 1
    spool_size: int = 64 * 1024 * 1024
    auth_key_file: str | None = None
    tls_ca: str | None = None
    declared: bool = False  # consumerd knows the session
    error: str | None = None  # the last failure to trace an app (status shows it)
    channels: dict[str, Channel] = field(default_factory=dict)
    traces: dict[int, Trace] = field(default_factory=dict)  # by app pid
    streams: dict[str, Stream] = field(default_factory=dict)
    clock_offset_ns: int = 0

    @property
    def session_dir(self) -> str:
        assert self.output is not None
        return os.path.join(self.output, f"{self.name}-{self.created}")

    def sink(self) -> str:
        return self.url or self.session_dir


@dataclass
class App:
    pid: int
    uid: int
    procname: str
    conn: SeqPacket
    started: str
    tracepoints: list[dict[str, Any]] = field(default_factory=list)
    stop_waiters: dict[int, trio.Event] = field(default_factory=dict)


def _now_stamp() -> str:
    return datetime.now().strftime("%Y%m%dT%H%M%S")


class ConsumerHandle:
    """One consumerd (per session owner), supervised: restarted when it dies,
    then given back every trace and stream of its owner's sessions.

    When sessiond runs as root and the owner is another user, consumerd is
    spawned with that user's uid, gid and supplementary groups (set by the
    child before exec, never changed afterwards), so the trace files are the
    owner's and the process can map only the buffers sessiond hands it.
    """

    def __init__(self, sd: Sessiond, uid: int) -> None:
        self.sd = sd
        self.uid = uid
        self.conn: SeqPacket | None = None
        self.ready = trio.Event()
        self.waiters: dict[int, tuple[trio.Event, list]] = {}
        self.pid: int | None = None
        self.failure: str | None = None

    def _credentials(self) -> dict:
        if os.geteuid() != 0 or self.uid == os.geteuid():
            return {}
        import pwd

        try:
            pw = pwd.getpwuid(self.uid)
            gid, groups = pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid)
        except KeyError:  # a uid without a passwd entry: its own group only
            gid, groups = self.uid, []
        return {"user": self.uid, "group": gid, "extra_groups": groups}

    async def supervise(self) -> None:
        restarts = 0
        standby = None
        try:
            while True:
                spawned = standby or await self._spawn()
                standby = None
                if spawned is None:  # could not even fork/exec: retry with backoff
                    await trio.sleep(min(5.0, 0.2 * 2**restarts))
                    restarts += 1
                    continue
                proc, conn = spawned
                self.conn, self.pid = conn, proc.pid
                logger.info("consumerd for uid %d running (pid %d)", self.uid, proc.pid)
                try:
                    async with trio.open_nursery() as n:
                        n.start_soon(self._reader, conn)
                        await self.call({"op": "hello"}, timeout=30, wait_ready=False)
                        if restarts:
                            await self.sd._replay_consumer(self.uid)
                        self.failure = None
                        self.ready.set()
                        # A warm spare, its imports done, takes over at once
                        # if this one dies: the rings only have to hold the
                        # replay, not a Python start-up.
                        standby = await self._spawn()
                        await proc.wait()
                        n.cancel_scope.cancel()
                except* (UserError, trio.TooSlowError, OSError, trio.BrokenResourceError) as group:
                    for exc in group.exceptions:
                        logger.error("consumerd for uid %d: %s", self.uid, exc)
                finally:
                    self.ready = trio.Event()
                    self.conn = None
                    conn.close()
                    self._fail_waiters("consumerd exited")
                    with trio.CancelScope(shield=True):
                        if proc.returncode is None:
                            proc.kill()
                            await proc.wait()
                logger.warning("consumerd for uid %d exited with %s; restarting", self.uid, proc.returncode)
                restarts += 1
                # At once the first times (its ring buffers are filling up),
                # then with backoff if it keeps dying.
                if restarts >= 3:
                    await trio.sleep(min(5.0, 0.1 * 2**restarts))
        finally:
            if standby is not None:
                standby[1].close()
                with trio.CancelScope(shield=True):
                    standby[0].kill()
                    await standby[0].wait()

    async def _spawn(self) -> tuple[trio.Process, SeqPacket] | None:
        """Start a consumerd process (it then waits for requests)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = list(self.sd.config.consumerd_cmd) + ["--control-fd", str(child.fileno())]
        env = dict(os.environ, TRACEWIRE_RUNDIR=self.sd.config.rundir)
        try:
            proc = await trio.lowlevel.open_process(
                cmd, pass_fds=(child.fileno(),), env=env, cwd="/", **self._credentials()
            )
        except OSError as exc:
            self.failure = f"cannot start consumerd for uid {self.uid}: {exc}"
            logger.error("%s", self.failure)
            parent.close()
            self._fail_waiters(self.failure)
            return None
        finally:
            child.close()
        return proc, SeqPacket(trio.socket.from_stdlib_socket(parent))

    def _fail_waiters(self, why: str) -> None:
        for ev, box in self.waiters.values():
            box.append({"ok": False, "error": why})
            ev.set()
        self.waiters.clear()

    async def _reader(self, conn: SeqPacket) -> None:
        while True:
            got = await conn.receive()
            if got is None:
                return
            msg, fds = got
            close_fds(fds)
            w = self.waiters.pop(msg.get("seq"), None)
            if w is not None:
                w[1].append(msg)
                w[0].set()

    async def call(self, msg: dict, fds: tuple[int, ...] = (), timeout: float | None = None,
                   wait_ready: bool = True) -> dict:
        """Send one request and wait for its answer.

        Raises:
            UserError: consumerd answered with an error, or is not available.
            trio.TooSlowError: no answer in time.
        """
        if wait_ready and not self.ready.is_set():
            with trio.move_on_after(self.sd.config.consumer_timeout):
                await self.ready.wait()
        conn = self.conn
        if conn is None or (wait_ready and not self.ready.is_set()):
            raise UserError(self.failure or "consumerd is not available")
        seq = self.sd.next_seq
        self.sd.next_seq += 1
        ev, box = trio.Event(), []
        self.waiters[seq] = (ev, box)
        await conn.send(dict(msg, seq=seq), fds)
        with trio.fail_after(timeout or self.sd.config.consumer_timeout):
            await ev.wait()
        reply = box[0]
        if not reply.get("ok"):
            raise UserError(f"consumerd: {reply.get('error', 'failed')}")
        return reply


class Sessiond:
    """All of one sessiond's state; methods run in its trio event loop."""

    def __init__(self, config: SessiondConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self.nursery = nursery
        self.sessions: dict[str, Session] = {}
        self.current: dict[int, str] = {}  # uid -> current session name
        self.apps: dict[int, App] = {}
        self.next_session_id = 1
        self.next_seq = 1
        self.consumers: dict[int, ConsumerHandle] = {}  # by session owner uid
        self.lock = trio.Lock()  # one control operation at a time
        self.hostname = config.hostname or os.environ.get("TRACEWIRE_HOSTNAME") or socket.gethostname()

    # ---------------------------------------------------------------- consumerd
    def _consumer(self, uid: int) -> ConsumerHandle:
        """The consumerd of session owner ``uid``, started on first use."""
        h = self.consumers.get(uid)
        if h is None:
            h = self.consumers[uid] = ConsumerHandle(self, uid)
            self.nursery.start_soon(h.supervise)
        return h

    async def _consumer_call(self, msg: dict, fds: tuple[int, ...] = (), timeout: float | None = None,
                             *, uid: int) -> dict:
        return await self._consumer(uid).call(msg, fds, timeout)

    async def _replay_consumer(self, uid: int) -> None:
        """Give a restarted consumerd every live trace and stream of ``uid``."""
        h = self.consumers[uid]
        for sess in self.sessions.values():
            if sess.owner_uid != uid:
                continue
            if sess.declared:
                await h.call(self._session_msg(sess), wait_ready=False)
            for pid, tr in sess.traces.items():
                app = self.apps.get(pid)
                await h.call(self._trace_msg(sess, tr, app, replay=True), wait_ready=False)
                await h.call({"op": "metadata", "trace_id": tr.trace_id, "text": tr.metadata,
                              "replay": True}, wait_ready=False)
            for st in sess.streams.values():
                if st.memfd < 0:  # a dead app's buffer, written out and freed
                    await h.call(dict(self._stream_msg(sess, st), replay=True, gone=True),
                                 wait_ready=False)
                    continue
                await h.call(dict(self._stream_msg(sess, st), replay=True), (st.memfd, st.eventfd),
                             wait_ready=False)
                if st.pid not in self.apps:
                    await h.call({"op": "producer_gone", "key": st.key}, wait_ready=False)

    # ------------------------------------------------------------ app socket
    async def handle_app(self, sock: trio.socket.SocketType) -> None:
        conn = SeqPacket(sock)
        app: App | None = None
        try:
            pid, uid, _gid = peer_credentials(sock)
            while True:
                try:
                    got = await conn.receive()
                except ControlError as exc:
                    logger.warning("app %d: %s; dropping it", pid, exc)
                    return
                if got is None:
                    return
                msg, fds = got
                close_fds(fds)
                op = msg.get("op")
                if op == "register" and app is None:
                    procname = msg.get("procname")
                    try:
                        procname = validate_name(str(procname), "process name")
                    except InvalidName:
                        procname = "app"
                    app = App(pid, uid, procname, conn, _now_stamp())
                    self.apps[pid] = app
                    logger.info("app %s-%d registered", procname, pid)
                    async with self.lock:
                        self._add_tracepoints(app, msg.get("tracepoints"))
                        await self._setup_app_everywhere(app)
                    await conn.send({"op": "registered"})
                elif op == "tracepoints" and app is not None:
                    async with self.lock:
                        self._add_tracepoints(app, msg.get("tracepoints"))
                        await self._setup_app_everywhere(app)
                    await conn.send({"op": "registered"})
                elif op == "stopped" and app is not None:
                    ev = app.stop_waiters.pop(msg.get("seq"), None)
                    if ev is not None:
                        ev.set()
                else:
                    logger.warning("app %d: unexpected %r; dropping it", pid, op)
                    return
        except (OSError, trio.BrokenResourceError) as exc:
            logger.info("app connection lost: %s", exc)
        except Exception:  # one misbehaving app never takes sessiond down
            logger.exception("app connection dropped after an unexpected error")
        finally:
            conn.close()
            if app is not None:
                self.apps.pop(app.pid, None)
                for ev in app.stop_waiters.values():
                    ev.set()
                await self._app_gone(app)

    async def _setup_app_everywhere(self, app: App) -> None:
        """Give a (re)registered app the streams of every started session.  A
        session whose consumerd refuses is marked in error (``status`` shows
        it); the app and the other sessions carry on."""
        for sess in list(self.sessions.values()):
            if sess.state is SessionState.STARTED:
                try:
                    await self._setup_app(sess, app)
                except (UserError, trio.TooSlowError) as exc:
                    sess.error = f"cannot trace {app.procname}-{app.pid}: {exc}"
                    logger.error("session %s: %s", sess.name, sess.error)

    def _add_tracepoints(self, app: App, tps: Any) -> None:
        if not isinstance(tps, list):
            return
        for tp in tps:
            try:
                tp_id, name, fields = int(tp["id"]), str(tp["name"]), tp["fields"]
                decl = ctf.EventDecl(
                    name, tp_id, tuple((str(n), ctf.FieldType[str(t).upper()]) for n, t in fields)
                )
            except Exception as exc:
                logger.warning("app %d: bad tracepoint %r: %s", app.pid, tp, exc)
                continue
            if tp_id != len(app.tracepoints):
                logger.warning("app %d: tracepoint id %d out of order", app.pid, tp_id)
                continue
            app.tracepoints.append({"id": tp_id, "name": name, "decl": decl})

    async def _app_gone(self, app: App) -> None:
        with trio.CancelScope(shield=True):
            for sess in list(self.sessions.values()):
                for st in sess.streams.values():
                    if st.pid == app.pid and st.memfd >= 0:
                        try:
                            reply = await self._consumer_call({"op": "producer_gone", "key": st.key},
                                                              uid=sess.owner_uid)
                        except (UserError, trio.TooSlowError, trio.BrokenResourceError, OSError):
                            continue
                        if reply.get("released"):
                            self._free_buffer(st)
            logger.info("app %s-%d gone", app.procname, app.pid)

    @staticmethod
    def _free_buffer(st: Stream) -> None:
        """consumerd has everything the dead app wrote: free its ring buffer."""
        os.close(st.memfd)
        os.close(st.eventfd)
        st.memfd = st.eventfd = -1

    # ------------------------------------------------------- per-app session setup
    def _session_msg(self, sess: Session) -> dict:
        return {
            "op": "session",
            "session": sess.name,
            "session_id": sess.id,
            "created": sess.created,
            "sink": sess.sink(),
            "hostname": self.hostname,
            "compress": sess.compress,
            "compress_level": sess.compress_level,
            "auth_key_file": sess.auth_key_file,
            "tls_ca": sess.tls_ca,
            "live": False,
            "spool_dir": self._spool_dir(sess) if sess.url else None,
            "spool_size": sess.spool_size,
            "uid": sess.owner_uid,
            "gid": sess.owner_gid,
        }

    def _spool_dir(self, sess: Session) -> str:
        return os.path.join(self.config.rundir, "spool", f"{sess.name}-{sess.created}")

    async def _declare_session(self, sess: Session) -> None:
        if not sess.declared:
            if sess.url:
                # The spool is the owner's: their consumerd writes it.
                d = self._spool_dir(sess)
                os.makedirs(os.path.dirname(d), mode=0o711, exist_ok=True)
                os.makedirs(d, mode=0o700, exist_ok=True)
                if os.geteuid() == 0 and sess.owner_uid != 0:
                    os.chown(d, sess.owner_uid, sess.owner_gid)
            await self._consumer_call(self._session_msg(sess), uid=sess.owner_uid)
            sess.declared = True

    def _trace_msg(self, sess: Session, tr: Trace, app: App | None, replay: bool = False) -> dict:
        return {
            "op": "add_trace",
            "trace_id": tr.trace_id,
            "session": sess.name,
            "session_id": sess.id,
            "session_created": sess.created,
            "sink": sess.sink(),
            "path": tr.path,
            "uuid": tr.uuid.hex(),
            "uid": sess.owner_uid,
            "gid": sess.owner_gid,
            "replay": replay,
        }

    def _stream_msg(self, sess: Session, st: Stream) -> dict:
        ch = sess.channels[st.channel]
        return {
            "op": "add_stream",
            "key": st.key,
            "trace_id": sess.traces[st.pid].trace_id,
            "session": sess.name,
            "channel": ch.name,
            "stream_class": ch.index,
            "subbuf_size": ch.subbuf_size,
            "num_subbuf": ch.num_subbuf,
            "switch_timer_ms": ch.switch_timer_ms,
        }

    async def _setup_app(self, sess: Session, app: App) -> None:
        """Create what (session, app) needs and enable the matching events."""
        if sess.owner_uid != 0 and app.uid != sess.owner_uid:
            return  # a user traces their own apps only; root traces every app
        wanted: dict[str, frozenset[int]] = {}
        for ch in sess.channels.values():
            ids = frozenset(tp["id"] for tp in app.tracepoints if ch.matches(tp["name"]))
            if ids:
                wanted[ch.name] = ids
        if not wanted and app.pid not in sess.traces:
            return
        tr = sess.traces.get(app.pid)
        if tr is None:
            tr = Trace(
                f"{sess.id}-{app.pid}",
                f"ust/pid/{app.procname}-{app.pid}-{app.started}",
                uuid.uuid4().bytes,
            )
            sess.traces[app.pid] = tr
            await self._consumer_call(self._trace_msg(sess, tr, app), uid=sess.owner_uid)
            info = ctf.TraceInfo(
                uuid=tr.uuid,
                hostname=self.hostname,
                trace_name=sess.name,
                creation_datetime=sess.created,
                procname=app.procname,
                vpid=app.pid,
                clock_offset_ns=sess.clock_offset_ns,
                channels=tuple(sorted(sess.channels, key=lambda c: sess.channels[c].index)),
            )
            text = ctf.metadata_preamble(info)
            await self._consumer_call(
                {"op": "metadata", "trace_id": tr.trace_id, "text": text}, uid=sess.owner_uid,
            )
            tr.metadata += text
        if tr.declared < len(app.tracepoints):
            text = "".join(
                ctf.metadata_event(
                    ctf.EventDecl(tp["name"], tp["id"], tp["decl"].fields, stream_id=ch.index)
                )
                for tp in app.tracepoints[tr.declared :]
                for ch in sorted(sess.channels.values(), key=lambda c: c.index)
            )
            await self._consumer_call({"op": "metadata", "trace_id": tr.trace_id, "text": text},
                                      uid=sess.owner_uid)
            tr.metadata += text
            tr.declared = len(app.tracepoints)
        for ch_name, ids in wanted.items():
            key = f"{sess.id}-{ch_name}-{app.pid}"
            st = sess.streams.get(key)
            if st is None:
                ch = sess.channels[ch_name]
                spec = BufferSpec(ch.subbuf_size, ch.num_subbuf)
                memfd = create_buffer(spec, time.monotonic_ns(), f"tw-{key}")
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                st = Stream(key, sess.name, ch_name, app.pid, memfd, efd)
                sess.streams[key] = st
                await self._consumer_call(self._stream_msg(sess, st), (memfd, efd), uid=sess.owner_uid)
                await app.conn.send(
                    {"op": "stream", "key": key, "subbuf_size": ch.subbuf_size, "num_subbuf": ch.num_subbuf},
                    (memfd, efd),
                )
            if st.ids != ids:
                st.ids = ids
                await app.conn.send({"op": "enable", "key": key, "ids": sorted(ids)})

    # ------------------------------------------------------------- CLI socket
    async def handle_control(self, stream: trio.SocketStream) -> None:
        try:
            _pid, uid, gid = peer_credentials(stream.socket)
            reader = FrameReader(limit=1024 * 1024)
            req = None
            with trio.fail_after(10):
                while req is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    reader.feed(data)
                    req = reader.next()
            try:
                result = await self.dispatch(req, uid, gid)
                reply = {"ok": True, **result}
            except UserError as exc:
                reply = {"ok": False, "error": str(exc)}
            except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                logger.exception("request %r failed", req.get("cmd"))
                reply = {"ok": False, "error": f"internal error: {exc!r}"}
            await stream.send_all(encode_frame(reply))
        except (ControlError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            logger.info("control connection dropped: %s", exc)
        finally:
            await stream.aclose()

    async def dispatch(self, req: dict, uid: int, gid: int) -> dict:
        cmd = req.get("cmd")
        handler = getattr(self, f"cmd_{cmd}", None) if isinstance(cmd, str) and cmd.isidentifier() else None
        if handler is None:
            raise UserError(f"unknown command {cmd!r}")
        async with self.lock:
            return await handler(req, uid, gid)

    def _session(self, req: dict, uid: int) -> Session:
        name = req.get("session") or self.current.get(uid)
        if not name:
            raise UserError("no session given and no current session (create one with 'tracewire create NAME')")
        sess = self.sessions.get(name)
        if sess is None:
            raise UserError(f"no session named {name!r}")
        if uid != 0 and sess.owner_uid != uid:
            raise UserError(f"permission denied: session {name!r} belongs to another user")
        return sess

    async def cmd_ping(self, req: dict, uid: int, gid: int) -> dict:
        return {"pid": os.getpid(), "rundir": self.config.rundir}

    async def cmd_create(self, req: dict, uid: int, gid: int) -> dict:
        try:
            name = validate_name(str(req.get("name", "")), "session name", MAX_SESSION_NAME)
        except InvalidName as exc:
            raise UserError(str(exc)) from None
        if name in self.sessions:
            raise UserError(f"session {name!r} already exists")
        output, url = req.get("output"), req.get("url")
        created = _now_stamp()
        if url:
            try:
                url = str(parse_url(str(url)))
            except ValueError as exc:
                raise UserError(str(exc)) from None
            output = None
        elif output:
            output = os.path.abspath(str(output))
        else:
            raise UserError("give an output directory or a relay URL")
        compress = req.get("compress") or "zstd"
        if compress not in ("zstd", "none"):
            raise UserError("--compress must be zstd or none")
        level = int(req.get("compress_level") or 1)
        if not 1 <= level <= 22:
            raise UserError("--compress-level must be between 1 and 22")
        sess = Session(name, self.next_session_id, uid, gid, output, url, created)
        sess.compress, sess.compress_level = compress, level
        sess.auth_key_file = req.get("auth_key_file") or None
        if req.get("spool_size") is not None:
            sess.spool_size = int(req["spool_size"])
            if sess.spool_size < 1024 * 1024:
                raise UserError("--spool-size must be at least 1M")
        sess.tls_ca = req.get("tls_ca") or None
        sess.clock_offset_ns = time.time_ns() - time.monotonic_ns()
        self.next_session_id += 1
        self.sessions[name] = sess
        self.current[uid] = name
        return {"session": name, "sink": sess.sink()}

    async def cmd_enable_channel(self, req: dict, uid: int, gid: int) -> dict:
        sess = self._session(req, uid)
        try:
            name = validate_name(str(req.get("channel") or DEFAULT_CHANNEL), "channel name", MAX_SESSION_NAME)
        except InvalidName as exc:
            raise UserError(str(exc)) from None
        if sess.state is not SessionState.CREATED and name not in sess.channels:
            raise UserError(f"session {sess.name!r} has been started: channels can no longer be added")
        subbuf = int(req.get("subbuf_size") or DEFAULT_SUBBUF)
        num = int(req.get("num_subbuf") or DEFAULT_NUM_SUBBUF)
        try:
            BufferSpec(subbuf, num)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if req.get("overwrite"):
            raise UserError("overwrite (flight-recorder) channels are not available in this build")
        timer = int(req.get("switch_timer_ms") or 0)
        if timer < 0:
            raise UserError("switch timer must be >= 0 ms")
        ch = sess.channels.get(name)
        if ch is not None:
            if sess.state is not SessionState.CREATED:
                raise UserError(f"channel {name!r} exists and the session has been started")
            ch.subbuf_size, ch.num_subbuf, ch.switch_timer_ms = subbuf, num, timer
        else:
            sess.channels[name] = Channel(name, len(sess.channels), subbuf, num, False, timer)
        return {"session": sess.name, "channel": name}

    async def cmd_enable_event(self, req: dict, uid: int, gid: int) -> dict:
        sess = self._session(req, uid)
        pattern = str(req.get("pattern", ""))
        if not pattern or len(pattern) > 255 or "\0" in pattern:
            raise UserError("event pattern must be 1 to 255 characters, e.g. 'demo:*'")
        chname = req.get("channel")
        if chname is None:
            chname = DEFAULT_CHANNEL
            if chname not in sess.channels:
                if sess.state is not SessionState.CREATED:
                    raise UserError(f"session {sess.name!r} has been started: channels can no longer be added")
                sess.channels[chname] = Channel(chname, len(sess.channels))
        ch = sess.channels.get(chname)
        if ch is None:
            raise UserError(f"no channel named {chname!r} in session {sess.name!r}")
        if pattern not in ch.patterns:
            ch.patterns.append(pattern)
        if sess.state is SessionState.STARTED:
            for app in list(self.apps.values()):
                await self._setup_app(sess, app)
            await self._sync_apps(sess)
        return {"session": sess.name, "channel": ch.name, "pattern": pattern}

    async def cmd_start(self, req: dict, uid: int, gid: int) -> dict:
        sess = self._session(req, uid)
        if sess.state is SessionState.STARTED:
            raise UserError(f"session {sess.name!r} is already started")
        if not any(ch.patterns for ch in sess.channels.values()):
            raise UserError(f"session {sess.name!r} has no enabled event (use 'tracewire enable-event PATTERN')")
        await self._declare_session(sess)
        sess.state = SessionState.STARTED
        for app in list(self.apps.values()):
            await self._setup_app(sess, app)
        # Streams that exist from an earlier start get their events back.
        for st in sess.streams.values():
            app = self.apps.get(st.pid)
            if app is not None:
                await app.conn.send({"op": "enable", "key": st.key, "ids": sorted(st.ids)})
        await self._sync_apps(sess)
        return {"session": sess.name}

    async def _ask_apps(self, sess: Session, make_msg) -> list[tuple[App, trio.Event]]:
        """Send ``make_msg(keys, seq)`` to every app with streams in the
        session; each answers ``stopped`` with the seq once it has handled it
        (and everything sent before).  Returns what to wait for."""
        waits = []
        for app in list(self.apps.values()):
            keys = [st.key for st in sess.streams.values() if st.pid == app.pid]
            if not keys:
                continue
            seq = self.next_seq
            self.next_seq += 1
            ev = trio.Event()
            app.stop_waiters[seq] = ev
            try:
                await app.conn.send(make_msg(keys, seq))
            except (OSError, trio.BrokenResourceError):
                app.stop_waiters.pop(seq, None)
                continue
            waits.append((app, ev))
        return waits

    async def _sync_apps(self, sess: Session) -> None:
        """Wait (bounded) until every app of the session has applied what it
        was sent, so events emitted once ``start``/``enable-event`` returns
        are recorded."""
        waits = await self._ask_apps(sess, lambda keys, seq: {"op": "sync", "seq": seq})
        with trio.move_on_after(self.config.app_stop_timeout):
            for _app, ev in waits:
                await ev.wait()

    async def _stop(self, sess: Session) -> dict:
        """The stop barrier: quiesce apps, then flush every stream to the sink."""
        sess.state = SessionState.STOPPED
        waits = await self._ask_apps(sess, lambda keys, seq: {"op": "stop", "keys": keys, "seq": seq})
        slow = []
        with trio.move_on_after(self.config.app_stop_timeout):
            for app, ev in waits:
                await ev.wait()
        for app, ev in waits:
            if not ev.is_set():
                slow.append(f"{app.procname}-{app.pid}")
        reply = await self._consumer_call(
            {"op": "flush", "session": sess.name, "timeout": self.config.stop_timeout},
            timeout=self.config.stop_timeout + 30, uid=sess.owner_uid,
        )
        result = {"session": sess.name, "streams": reply.get("streams", [])}
        if slow:
            result["warning"] = f"apps did not confirm the stop in time: {', '.join(slow)}"
        return result

    async def cmd_stop(self, req: dict, uid: int, gid: int) -> dict:
        sess = self._session(req, uid)
        if sess.state is not SessionState.STARTED:
            raise UserError(f"session {sess.name!r} is not started")
        return await self._stop(sess)

    async def cmd_destroy(self, req: dict, uid: int, gid: int) -> dict:
        sess = self._session(req, uid)
        result: dict = {"session": sess.name}
        if sess.state is SessionState.STARTED:
            result = await self._stop(sess)
        for app in list(self.apps.values()):
            keys = [st.key for st in sess.streams.values() if st.pid == app.pid]
            if keys:
                try:
                    await app.conn.send({"op": "close", "keys": keys})
                except (OSError, trio.BrokenResourceError):
                    pass
        if sess.declared:
            await self._consumer_call({"op": "remove_session", "session": sess.name}, uid=sess.owner_uid)
        for st in sess.streams.values():
            if st.memfd >= 0:
                self._free_buffer(st)
        del self.sessions[sess.name]
        for u, n in list(self.current.items()):
            if n == sess.name:
                del self.current[u]
        return result

    def _describe(self, sess: Session) -> dict:
        return {
            "name": sess.name,
            "state": sess.state.value,
            "sink": sess.sink(),
            "owner_uid": sess.owner_uid,
            "error": sess.error,
            "channels": [
                {
                    "name": ch.name,
                    "subbuf_size": ch.subbuf_size,
                    "num_subbuf": ch.num_subbuf,
                    "switch_timer_ms": ch.switch_timer_ms,
                    "mode": "overwrite" if ch.overwrite else "discard",
                    "events": list(ch.patterns),
                }
                for ch in sorted(sess.channels.values(), key=lambda c: c.index)
            ],
        }

    async def cmd_list(self, req: dict, uid: int, gid: int) -> dict:
        if req.get("session"):
            return {"sessions": [self._describe(self._session(req, uid))], "current": self.current.get(uid)}
        visible = [s for s in self.sessions.values() if uid == 0 or s.owner_uid == uid]
        return {"sessions": [self._describe(s) for s in visible], "current": self.current.get(uid)}

    async def cmd_status(self, req: dict, uid: int, gid: int) -> dict:
        sess = self._session(req, uid)
        reply = await self._consumer_call({"op": "status", "session": sess.name}, uid=sess.owner_uid)
        return {"session": self._describe(sess), "streams": reply.get("streams", [])}


async def serve_sessiond(config: SessiondConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run one sessiond in ``config.rundir`` until cancelled.

    Raises:
        UserError: another sessiond holds the run directory.
    """
    os.makedirs(config.rundir, mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(config.rundir, 0o755)  # apps of every user must reach apps.sock
    lock_fd = os.open(os.path.join(config.rundir, "sessiond.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise UserError(f"another tracewire-sessiond already runs in {config.rundir}") from None
    ctl_path = os.path.join(config.rundir, "control.sock")
    app_path = os.path.join(config.rundir, "apps.sock")
    try:
        async with trio.open_nursery() as nursery:
            sd = Sessiond(config, nursery)
            for p in (ctl_path, app_path):
                if os.path.exists(p):
                    os.unlink(p)
            ctl = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await ctl.bind(ctl_path)
            ctl.listen(64)
            apps = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            await apps.bind(app_path)
            apps.listen(256)
            # Any local app may register with a root sessiond (a user's session
            # traces only that user's apps); a user's sessiond is theirs alone.
            # The root control socket is open to the "tracing" group.
            os.chmod(app_path, 0o777 if os.geteuid() == 0 else 0o700)
            _restrict_control_socket(ctl_path)
            nursery.start_soon(partial(trio.serve_listeners, sd.handle_control, [trio.SocketListener(ctl)]))
            nursery.start_soon(_accept_apps, apps, sd, nursery)
            with open(os.path.join(config.rundir, "sessiond.pid"), "w") as f:
                f.write(f"{os.getpid()}\n")
            logger.info("sessiond ready in %s", config.rundir)
            task_status.started(sd)
    finally:
        for p in (ctl_path, app_path, os.path.join(config.rundir, "sessiond.pid")):
            try:
                os.unlink(p)
            except OSError:
                pass
        os.close(lock_fd)


def _restrict_control_socket(path: str) -> None:
    """0600 for a user's sessiond; 0660 with group ``tracing`` for root's
    when that group exists (members may then create and control their own
    sessions; SO_PEERCRED tells sessiond who they are)."""
    if os.geteuid() == 0:
        import grp

        try:
            gid = grp.getgrnam("tracing").gr_gid
        except KeyError:
            os.chmod(path, 0o600)
            return
        os.chown(path, 0, gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)


async def _accept_apps(listener: trio.socket.SocketType, sd: Sessiond, nursery: trio.Nursery) -> None:
    while True:
        sock, _ = await listener.accept()
        nursery.start_soon(sd.handle_app, sock)
