"""The in-process tracer: ``tracepoint(name, **fields)`` returns an event emitter.

Theory of operation
-------------------
Importing this module costs only the standard library modules it names; no
thread starts and nothing connects.  The first ``tracepoint()`` declaration
creates the process's ``_Registry``: if ``$TRACEWIRE_RUNDIR/apps.sock`` exists,
a daemon thread (the *listener*) registers the app with sessiond, waits up to
``TRACEWIRE_REGISTER_TIMEOUT`` seconds (default 3) for the first answer so
that events emitted right after start-up are not missed, and then keeps
listening for commands: new streams (a ring buffer memfd and an eventfd, and for
a blocking channel the read end of its space pipe, passed with SCM_RIGHTS),
enable/disable, stop (quiesce) and close.  Without a sessiond the listener
retries every ``TRACEWIRE_RETRY_S`` seconds, so apps started
before sessiond are traced once it appears.

The app hands its buffers only to a sessiond it trusts.  Before connecting,
the listener checks that the run directory (and the ``/tmp/tracewire-UID``
fallback's parent) is a directory owned by the app's effective uid or root
and not writable by group or others (``tracewire.rundir.rundir_problem``);
once connected, that the process serving ``apps.sock`` runs as that uid or
as root (SO_PEERCRED).  Otherwise it sends nothing, says why on stderr (once
per distinct reason), and retries later like with no sessiond.

Each emitter is a generated Python function specialised for its fields.  While
no session enables it, its ``__code__`` is a body that only returns: a
disabled call costs one Python call.  Enabling swaps in the recording body
(like a jump label); the swap is a single attribute store, atomic under the
GIL.  The recording body serialises writers of one stream with that stream's
lock, takes the timestamp under the lock (so timestamps are ordered in the
stream), writes the compact event header and the fields straight into shared
memory, and publishes ``head``.  Any exception (a wrong field type, an
unencodable string) drops the event and counts it as discarded: the tracer
never raises into the app.
"""

from __future__ import annotations

import atexit
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from types import CodeType
from typing import TYPE_CHECKING, Any

from tracewire.rundir import default_rundir, rundir_problem, trusted_uid

if TYPE_CHECKING:  # the tracer imports ringbuf only when a stream arrives
    import socket

    from tracewire.ringbuf import Producer

__all__ = ["tracepoint", "Tracepoint"]

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")
_TYPES = {int: "int", float: "float", str: "str", bytes: "bytes"}
_FIXED = {"int": "q", "float": "d"}
_COMPACT_MAX_ID = 30
_EXTENDED = 31
_TS27 = 1 << 27
_NUL_REPLACEMENT = "\ufffd".encode()  # a NUL would end a CTF string early
_Q_TS, _Q_HEAD = 2, 3  # ringbuf.Q_TS / Q_HEAD: ts is stored before head


class _StreamW:
    """App-side handle of one stream: its producer and its writers' lock."""

    __slots__ = ("key", "producer", "lock", "mv", "enabled", "closed")

    def __init__(self, key: str, producer: Producer) -> None:
        self.key = key
        self.producer: Producer | None = producer
        self.mv: memoryview | None = producer.view
        self.lock = threading.Lock()
        self.enabled: set[int] = set()
        self.closed = False


_HDR_COMPACT = 4  # bytes of a compact event header
_HDR_EXTENDED = 16  # bytes of an extended one
_I2, _I3, _I4, _I5 = " " * 8, " " * 12, " " * 16, " " * 20  # generated code's indents


def _gen_encode(fields: list[tuple[str, str]]) -> list[str]:
    """Lines that encode the variable-size fields (once, outside the
    per-stream loop) and compute ``_sz``, the size of all the fields."""
    lines = []
    size_terms = []
    fixed_size = 0
    for n, t in fields:
        if t == "str":
            lines.append(f"{_I2}_b_{n} = {n}.encode('utf-8', 'replace')")
            lines.append(f"{_I2}if 0 in _b_{n}: _b_{n} = _b_{n}.replace(b'\\0', {_NUL_REPLACEMENT!r})")
            size_terms.append(f"len(_b_{n}) + 1")
        elif t == "bytes":
            lines.append(f"{_I2}_b_{n} = bytes({n})")
            size_terms.append(f"len(_b_{n}) + 4")
        else:
            fixed_size += 8
    size_expr = " + ".join([str(fixed_size)] + size_terms)
    lines.append(f"{_I2}_sz = {size_expr}")
    return lines


def _gen_reserve(compact: bool) -> list[str]:
    """Lines that, under the stream's lock, take the timestamp and reserve
    room (switching sub-buffers, or dropping: the event's timestamp goes
    with either)."""
    lines = [
        f"{_I2}for _s in _streams:",
        f"{_I3}_l = _s.lock",
        f"{_I3}_l.acquire()",
        f"{_I3}try:",
        f"{_I4}_p = _s.producer",
        f"{_I4}if _p is None: continue",
        f"{_I4}_ts = _mono()",
    ]
    if compact:
        lines.append(f"{_I4}_ext = _ts - _p.last_ts >= {_TS27}")
        lines.append(f"{_I4}_n = _sz + ({_HDR_EXTENDED} if _ext else {_HDR_COMPACT})")
    else:
        lines.append(f"{_I4}_ext = True")
        lines.append(f"{_I4}_n = _sz + {_HDR_EXTENDED}")
    return lines + [
        f"{_I4}_pos = _p.pos",
        f"{_I4}if _pos + _n <= _p.sb_end:",
        f"{_I5}_o = _p.base + _pos",
        f"{_I4}else:",
        f"{_I5}_o = _p._switch(_n, _ts)",
        f"{_I5}if _o < 0: continue",
        f"{_I5}_pos = _p.pos",
        f"{_I4}_mv = _s.mv",
    ]


def _gen_header(tp_id: int, compact: bool, lead: list[tuple[str, str]]) -> list[str]:
    """Lines that pack the event header and the leading run of fixed fields
    (``lead``) with one ``pack_into``."""
    lead_args = "".join(f", {n}" for n, _ in lead)
    lead_size = 8 * len(lead)
    extended = [
        f"_PX(_mv, _o, {_EXTENDED}, {tp_id}, _ts{lead_args})",
        f"_o += {_HDR_EXTENDED + lead_size}",
    ]
    if not compact:
        return [_I4 + line for line in extended]
    return [
        f"{_I4}if _ext:",
        *(_I5 + line for line in extended),
        f"{_I4}else:",
        f"{_I5}_PC(_mv, _o, {tp_id} | (_ts & 0x7FFFFFF) << 5{lead_args})",
        f"{_I5}_o += {_HDR_COMPACT + lead_size}",
    ]


def _gen_fields(fields: list[tuple[str, str]]) -> list[str]:
    """Lines that write the fields after the leading fixed ones."""
    lines = []
    for n, t in fields:
        if t in _FIXED:
            lines.append(f"{_I4}_P{t}(_mv, _o, {n}); _o += 8")
        elif t == "str":
            lines.append(f"{_I4}_e = _o + len(_b_{n}); _mv[_o:_e] = _b_{n}; _mv[_e] = 0; _o = _e + 1")
        else:
            lines.append(f"{_I4}_PI(_mv, _o, len(_b_{n})); _o += 4")
            lines.append(f"{_I4}_e = _o + len(_b_{n}); _mv[_o:_e] = _b_{n}; _o = _e")
    return lines


def _gen_source(fields: list[tuple[str, str]], tp_id: int) -> tuple[str, str]:
    """Python source of the recording body for these fields.

    Args:
        fields: (name, type) pairs, type one of int, float, str, bytes.
        tp_id: the tracepoint's id (above 30: always the extended header).

    Returns:
        The source of ``_emit(fields...)`` and the struct format of the
        leading fixed fields, packed with the event header.
    """
    compact = tp_id <= _COMPACT_MAX_ID
    lead: list[tuple[str, str]] = []
    for n, t in fields:
        if t not in _FIXED:
            break
        lead.append((n, t))
    lines = [
        f"def _emit({', '.join(n for n, _ in fields)}):",
        "    try:",
        *_gen_encode(fields),
        *_gen_reserve(compact),
        *_gen_header(tp_id, compact, lead),
        *_gen_fields(fields[len(lead):]),
        f"{_I4}_pos += _n",
        f"{_I4}_p.pos = _pos",
        f"{_I4}_p.last_ts = _ts",
        f"{_I4}_q = _p.q; _q[{_Q_TS}] = _ts; _q[{_Q_HEAD}] = _pos",
        f"{_I3}finally:",
        f"{_I4}_l.release()",
        "    except Exception:",
        "        _failed()",
    ]
    return "\n".join(lines) + "\n", "".join(_FIXED[t] for _, t in lead)


class Tracepoint:
    """One declared event: its name, fields and app-wide id."""

    def __init__(self, registry: _Registry | None, tp_id: int, name: str, fields: list[tuple[str, str]]) -> None:
        self.registry = registry
        self.id = tp_id
        self.name = name
        self.fields = fields
        src, lead_fmt = _gen_source(fields, tp_id)
        self.globals: dict[str, Any] = {
            "_streams": (),
            "_mono": time.monotonic_ns,
            "_PC": struct.Struct("<I" + lead_fmt).pack_into,
            "_PX": struct.Struct("<IIQ" + lead_fmt).pack_into,
            "_Pint": struct.Struct("<q").pack_into,
            "_Pfloat": struct.Struct("<d").pack_into,
            "_PI": struct.Struct("<I").pack_into,
            "_failed": self._failed,
        }
        exec(compile(src, f"<tracepoint {name}>", "exec"), self.globals)
        self._enabled_code: CodeType = self.globals["_emit"].__code__
        args = ", ".join(n for n, _ in fields)
        ns: dict[str, Any] = {}
        exec(compile(f"def _off({args}):\n    return None\n", f"<tracepoint {name}>", "exec"), ns)
        self._disabled_code: CodeType = ns["_off"].__code__
        emit = self.globals["_emit"]
        emit.__code__ = self._disabled_code
        emit.__name__ = emit.__qualname__ = name.replace(":", "_").replace(".", "_").replace("-", "_")
        emit.__doc__ = f"Emit the {name} event ({', '.join(f'{n}: {t}' for n, t in fields)})."
        emit.tracepoint = self
        self.emit: Callable[..., None] = emit

    def set_streams(self, streams: tuple[_StreamW, ...]) -> None:
        """Point the emitter at these streams (empty: disabled).  Atomic."""
        self.globals["_streams"] = streams
        self.emit.__code__ = self._enabled_code if streams else self._disabled_code

    def _failed(self) -> None:
        """Count the event as discarded in every stream it would have gone to
        (a bad argument or a closed buffer); never raises."""
        for s in self.globals["_streams"]:
            try:
                with s.lock:
                    if s.producer is not None:
                        s.producer.drop()
            except Exception:
                pass


class _Registry:
    """Per-process tracer state, created by the first ``tracepoint()``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.tracepoints: list[Tracepoint] = []
        self.by_name: dict[str, Tracepoint] = {}
        self.streams: dict[str, _StreamW] = {}
        self.sock: socket.socket | None = None  # the listener's socket to sessiond, when connected
        self.registered = threading.Event()
        self.rundir = default_rundir()
        self.path = os.path.join(self.rundir, "apps.sock")
        self.reported: set[str] = set()  # why sessionds were refused, said once each
        self.timeout = float(os.environ.get("TRACEWIRE_REGISTER_TIMEOUT", "3"))
        self.retry = float(os.environ.get("TRACEWIRE_RETRY_S", "1"))
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()
        atexit.register(self.hand_over)

    # -- declarations (app threads) ------------------------------------------------
    def declare(self, name: str, fields: list[tuple[str, str]]) -> Tracepoint:
        """The tracepoint ``name``, declared now if new (and announced to
        sessiond, waiting up to ``timeout`` for its answer).

        Raises:
            ValueError: declared before with other fields.
        """
        with self.lock:
            tp = self.by_name.get(name)
            if tp is not None:
                if tp.fields != fields:
                    raise ValueError(f"tracepoint {name!r} already declared with other fields")
                return tp
            tp = Tracepoint(self, len(self.tracepoints), name, fields)
            self.tracepoints.append(tp)
            self.by_name[name] = tp
            if self.thread is None:
                self._start_listener()
                return tp
            sock = self.sock
            ev = None
            if sock is not None:
                ev = threading.Event()
                self._pending_decl = ev
                self._send({"op": "tracepoints", "tracepoints": [self._decl(tp)]})
        if ev is not None:
            ev.wait(self.timeout)
        return tp

    @staticmethod
    def _decl(tp: Tracepoint) -> dict[str, Any]:
        """A tracepoint as the register/tracepoints messages carry it."""
        return {"id": tp.id, "name": tp.name, "fields": [list(f) for f in tp.fields]}

    def _start_listener(self) -> None:
        """Start the listener thread (called with ``lock`` held); if sessiond
        is there, wait (bounded) for its first answer."""
        self.thread = threading.Thread(target=self._listen, name="tracewire-listener", daemon=True)
        exists = os.path.exists(self.path)
        self.thread.start()
        if exists:
            # Wait (bounded) for sessiond's first answer so that events emitted
            # right after start-up reach the buffers of running sessions.
            self.lock.release()
            try:
                self.registered.wait(self.timeout)
            finally:
                self.lock.acquire()

    # -- listener thread ---------------------------------------------------------------
    def _send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        """Send one message to sessiond, if connected; errors are ignored
        (the listener notices a dead connection)."""
        import socket

        from tracewire.control import dumps

        sock = self.sock
        if sock is None:
            return
        try:
            if fds:
                socket.send_fds(sock, [dumps(msg)], fds)
            else:
                sock.send(dumps(msg))
        except OSError:
            pass

    def _listen(self) -> None:
        """The listener thread: one sessiond connection after another, for
        the life of the process."""
        while True:
            try:
                self._session()
            except Exception as exc:  # never let the thread die noisily
                if os.environ.get("TRACEWIRE_DEBUG"):
                    print(f"tracewire: listener error: {exc!r}", file=sys.stderr)
            self._drop_all()
            self.registered.set()  # nobody waits for a sessiond that is not there
            time.sleep(self.retry)

    def _session(self) -> None:
        """Connect to sessiond, register, and handle its messages until the
        connection ends."""
        import socket

        from tracewire.control import close_fds, loads

        sock = self._connect()
        if sock is None:
            return
        with self.lock:
            self.sock = sock
            tps = [self._decl(tp) for tp in self.tracepoints]
            self._send({
                "op": "register", "pid": self.pid, "procname": _procname(),
                "tracepoints": tps,
            })
        try:
            while True:
                data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 8)
                if not data:
                    close_fds(fds)
                    return
                try:
                    msg = loads(data)
                    self._handle(msg, fds)
                except Exception:
                    close_fds(fds)
                    raise
        finally:
            with self.lock:
                self.sock = None
            sock.close()

    def _connect(self) -> socket.socket | None:
        """Connect to the sessiond in the run directory, if this process may
        trust it.

        Returns:
            The connection, or None: no sessiond there, or one that must not
            get the app's buffers (a run directory another user may control,
            or a socket served by another user; said once on stderr).
        """
        import socket

        problem = rundir_problem(self.rundir)
        if problem is not None:
            self._refuse(problem)
            return None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        except OSError:
            return None
        try:
            sock.connect(self.path)
            problem = _peer_problem(sock, self.path)
        except OSError:
            sock.close()
            return None
        if problem is not None:
            sock.close()
            self._refuse(problem)
            return None
        return sock

    def _refuse(self, problem: str) -> None:
        """Say on stderr, once per distinct problem, why the app does not
        register; never raises."""
        if problem in self.reported:
            return
        self.reported.add(problem)
        try:
            print(f"tracewire: not registering with sessiond: {problem}; events are not recorded",
                  file=sys.stderr, flush=True)
        except Exception:
            pass

    def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        """Carry out one message from sessiond.

        Raises:
            ValueError: an unknown op or a malformed message.
        """
        op = msg.get("op")
        if op == "stream":
            self._add_stream(msg, fds)
        elif op == "enable":
            s = self.streams.get(str(msg["key"]))
            if s is not None:
                s.enabled = {int(i) for i in msg["ids"]}
                self._apply()
        elif op == "sync":  # everything sent before is applied
            self._send({"op": "stopped", "seq": msg.get("seq")})
        elif op == "stop":
            wait = msg.get("timeout")
            self._stop([str(k) for k in msg["keys"]], float(wait) if isinstance(wait, int | float) else None)
            self._send({"op": "stopped", "seq": msg.get("seq")})
        elif op == "close":
            for k in msg["keys"]:
                s = self.streams.pop(str(k), None)
                if s is not None:
                    self._close_stream(s)
            self._apply()
        elif op == "registered":
            self.registered.set()
            ev = getattr(self, "_pending_decl", None)
            if ev is not None:
                ev.set()
        else:
            raise ValueError(f"unknown op {op!r}")

    def _add_stream(self, msg: dict[str, Any], fds: list[int]) -> None:
        """Map a new stream's ring buffer (the memfd and eventfd in ``fds``,
        and a blocking channel's space pipe, read end, third)."""
        from tracewire.ringbuf import BufferSpec, Producer

        if len(fds) not in (2, 3):
            raise ValueError("stream message without its two fds")
        memfd, efd = fds[0], fds[1]
        space = fds[2] if len(fds) == 3 else -1
        ms = int(msg.get("blocking_timeout_ms") or 0)
        if space >= 0 and ms == 0:
            os.close(space)
            space = fds[2] = -1
        try:
            spec = BufferSpec(int(msg["subbuf_size"]), int(msg["num_subbuf"]))
            # blocking_timeout_ms: 0 discard mode, < 0 wait for ever ('inf').
            prod = Producer(memfd, efd, spec, space_fd=space, block_timeout=None if ms < 0 else ms / 1000)
        finally:
            os.close(memfd)  # the mapping keeps the memory; efd (and space) stay open
        self.streams[str(msg["key"])] = _StreamW(str(msg["key"]), prod)

    def _stop(self, keys: list[str], timeout: float | None = None) -> None:
        """Disable these streams, then wait for writers already inside them
        (at most ``timeout`` s in all, sessiond's own wait: a writer of a
        blocking channel may wait for space the consumer cannot give yet,
        and this thread must stay free to handle ``close``)."""
        for k in keys:
            s = self.streams.get(k)
            if s is not None:
                s.enabled = set()
        self._apply()
        deadline = None if timeout is None else time.monotonic() + timeout
        for k in keys:
            s = self.streams.get(k)
            left = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if s is not None and s.lock.acquire(timeout=left):
                s.lock.release()

    def _apply(self) -> None:
        """Point every emitter at the streams that enable it."""
        with self.lock:
            for tp in self.tracepoints:
                tp.set_streams(tuple(s for s in self.streams.values() if tp.id in s.enabled))

    def _close_stream(self, s: _StreamW) -> None:
        """Stop writing to a stream and unmap its buffer.  A writer waiting
        for space in it (a blocking channel) gives up within
        ``ringbuf.RECHECK_S`` and drops its event."""
        s.enabled = set()
        self._apply()
        waiting = s.producer
        if waiting is not None:
            waiting.cancel_wait()  # without the lock: its holder may be the one waiting
        with s.lock:
            p, s.producer = s.producer, None
        if p is not None:
            os.close(p.wakeup_fd)
            if p.space_fd >= 0:
                os.close(p.space_fd)
            s.mv = None
            try:
                p.close()
            except BufferError:
                pass  # a view still exported: the mapping goes with the process

    def _drop_all(self) -> None:
        """Close every stream (sessiond went away)."""
        for s in list(self.streams.values()):
            self._close_stream(s)
        self.streams.clear()
        self._apply()

    def hand_over(self) -> None:
        """At exit: close every open sub-buffer so the consumer takes it now.
        Another thread waiting for space (a blocking channel) gives up
        first, dropping its event, so exit never waits for the consumer."""
        for s in list(self.streams.values()):
            waiting = s.producer
            if waiting is not None:
                waiting.cancel_wait()
            with s.lock:
                p, s.producer = s.producer, None
                if p is not None and p.pos > p.sb_index * p._S:
                    p.close_current()


def _peer_problem(sock: socket.socket, path: str) -> str | None:
    """Why the process serving ``path`` (the peer of the connected ``sock``)
    must not get this app's buffers, or None: it must run as this process's
    effective uid or as root (the kernel's SO_PEERCRED says which).

    Raises:
        OSError: the credentials cannot be read.
    """
    from tracewire.peercred import peer_credentials

    _pid, uid, _gid = peer_credentials(sock)
    if trusted_uid(uid):
        return None
    return f"{path} is served by uid {uid}, not by uid {os.geteuid()} or root"


def _procname() -> str:
    """The process name sessiond shows and puts in trace paths."""
    try:
        with open("/proc/self/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = ""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    name = argv0 if argv0 and argv0 not in ("-c", "-m") else comm or "python"
    name = "".join(c if c in _NAME_CHARS and c != ":" else "_" for c in name).lstrip(".")[:64]
    return name or "python"


_registry_lock = threading.Lock()
_registry_box: list[_Registry] = []  # the process's one registry, created lazily


def _get_registry() -> _Registry:
    """This process's registry (a forked child gets its own)."""
    if not _registry_box or _registry_box[0].pid != os.getpid():
        with _registry_lock:
            if not _registry_box or _registry_box[0].pid != os.getpid():
                _registry_box[:] = [_Registry()]
    return _registry_box[0]


def tracepoint(name: str, **fields: type) -> Callable[..., None]:
    """Declare an event and return the function that emits it.

    Args:
        name: ``provider:event``, e.g. ``"demo:tick"``.
        **fields: field name → Python type: ``int`` (int64), ``float``
            (double), ``str`` (UTF-8) or ``bytes``.

    Returns:
        A function taking the fields as arguments (by keyword or position).
        It never raises, and never blocks unless a channel enabling the event
        has a blocking timeout (``enable-channel --blocking-timeout``: it then
        waits up to that long for room in a full buffer); while no session
        enables the event it does nothing.

    Raises:
        ValueError: a malformed name, an unsupported field type, or the name
            declared before with different fields.
    """
    if (
        not isinstance(name, str)
        or not 3 <= len(name) <= 255
        or not set(name) <= _NAME_CHARS
        or ":" not in name.strip(":")
    ):
        raise ValueError(f"tracepoint name must look like 'provider:event', got {name!r}")
    decl = []
    for fname, ftype in fields.items():
        if fname.startswith("_"):
            raise ValueError(f"field name {fname!r} must not start with '_'")
        t = _TYPES.get(ftype)
        if t is None:
            raise ValueError(f"field {fname!r}: type must be int, float, str or bytes, got {ftype!r}")
        decl.append((fname, t))
    return _get_registry().declare(name, decl).emit
