"""The in-process tracer: ``tracepoint(name, **fields)`` returns an event emitter.

Theory of operation
-------------------
Importing this module costs only the standard library modules it names; no
thread starts and nothing connects.  The first ``tracepoint()`` declaration
creates the process's ``_Registry``: if ``$TRACEWIRE_RUNDIR/apps.sock`` exists,
a daemon thread (the *listener*) registers the app with sessiond, waits up to
``TRACEWIRE_REGISTER_TIMEOUT`` seconds (default 3) for the first answer so
that events emitted right after start-up are not missed, and then keeps
listening for commands: new streams (a ring buffer memfd and an eventfd, passed
with SCM_RIGHTS), enable/disable, stop (quiesce) and close.  Without a sessiond
the listener retries every ``TRACEWIRE_RETRY_S`` seconds, so apps started
before sessiond are traced once it appears.

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

from tracewire.rundir import default_rundir

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

    def __init__(self, key: str, producer) -> None:
        self.key = key
        self.producer = producer
        self.mv = producer.view
        self.lock = threading.Lock()
        self.enabled: set[int] = set()
        self.closed = False


def _gen_source(fields: list[tuple[str, str]], tp_id: int) -> tuple[str, str]:
    """Python source of the recording body for these fields, and the struct
    format of the fixed fields packed with the event header."""
    args = ", ".join(n for n, _ in fields)
    lines = [f"def _emit({args}):", "    try:"]
    # Encode variable-size fields once, outside the per-stream loop.
    size_terms = []
    fixed_size = 0
    for n, t in fields:
        if t == "str":
            lines.append(f"        _b_{n} = {n}.encode('utf-8', 'replace')")
            lines.append(f"        if 0 in _b_{n}: _b_{n} = _b_{n}.replace(b'\\0', {_NUL_REPLACEMENT!r})")
            size_terms.append(f"len(_b_{n}) + 1")
        elif t == "bytes":
            lines.append(f"        _b_{n} = bytes({n})")
            size_terms.append(f"len(_b_{n}) + 4")
        else:
            fixed_size += 8
    compact = tp_id <= _COMPACT_MAX_ID
    hdr_c = 4
    hdr_x = 16
    size_expr = " + ".join([str(fixed_size)] + size_terms)
    lines.append(f"        _sz = {size_expr}")
    lines.append("        for _s in _streams:")
    lines.append("            _l = _s.lock")
    lines.append("            _l.acquire()")
    lines.append("            try:")
    lines.append("                _p = _s.producer")
    lines.append("                if _p is None: continue")
    lines.append("                _ts = _mono()")
    if compact:
        lines.append(f"                _ext = _ts - _p.last_ts >= {_TS27}")
        lines.append(f"                _n = _sz + ({hdr_x} if _ext else {hdr_c})")
    else:
        lines.append("                _ext = True")
        lines.append(f"                _n = _sz + {hdr_x}")
    lines.append("                _pos = _p.pos")
    lines.append("                if _pos + _n <= _p.sb_end:")
    lines.append("                    _o = _p.base + _pos")
    lines.append("                else:")
    lines.append("                    _o = _p._switch(_n, _ts)")
    lines.append("                    if _o < 0: continue")
    lines.append("                    _pos = _p.pos")
    lines.append("                _mv = _s.mv")
    # Header + the leading run of fixed fields in one pack_into.
    lead = []
    for n, t in fields:
        if t in _FIXED:
            lead.append((n, t))
        else:
            break
    lead_fmt = "".join(_FIXED[t] for _, t in lead)
    lead_args = "".join(f", {n}" for n, _ in lead)
    lead_size = 8 * len(lead)
    if compact:
        lines.append("                if _ext:")
        lines.append(f"                    _PX(_mv, _o, {_EXTENDED}, {tp_id}, _ts{lead_args})")
        lines.append(f"                    _o += {hdr_x + lead_size}")
        lines.append("                else:")
        lines.append(f"                    _PC(_mv, _o, {tp_id} | (_ts & 0x7FFFFFF) << 5{lead_args})")
        lines.append(f"                    _o += {hdr_c + lead_size}")
    else:
        lines.append(f"                _PX(_mv, _o, {_EXTENDED}, {tp_id}, _ts{lead_args})")
        lines.append(f"                _o += {hdr_x + lead_size}")
    for n, t in fields[len(lead):]:
        if t in _FIXED:
            lines.append(f"                _P{t}(_mv, _o, {n}); _o += 8")
        elif t == "str":
            lines.append(f"                _e = _o + len(_b_{n}); _mv[_o:_e] = _b_{n}; _mv[_e] = 0; _o = _e + 1")
        else:
            lines.append(f"                _PI(_mv, _o, len(_b_{n})); _o += 4")
            lines.append(f"                _e = _o + len(_b_{n}); _mv[_o:_e] = _b_{n}; _o = _e")
    lines.append("                _pos += _n")
    lines.append("                _p.pos = _pos")
    lines.append("                _p.last_ts = _ts")
    lines.append(f"                _q = _p.q; _q[{_Q_TS}] = _ts; _q[{_Q_HEAD}] = _pos")
    lines.append("            finally:")
    lines.append("                _l.release()")
    lines.append("    except Exception:")
    lines.append("        _failed()")
    return "\n".join(lines) + "\n", lead_fmt


class Tracepoint:
    """One declared event: its name, fields and app-wide id."""

    def __init__(self, registry: _Registry, tp_id: int, name: str, fields: list[tuple[str, str]]):
        self.registry = registry
        self.id = tp_id
        self.name = name
        self.fields = fields
        src, lead_fmt = _gen_source(fields, tp_id)
        self.globals: dict = {
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
        self._enabled_code = self.globals["_emit"].__code__
        args = ", ".join(n for n, _ in fields)
        ns: dict = {}
        exec(compile(f"def _off({args}):\n    return None\n", f"<tracepoint {name}>", "exec"), ns)
        self._disabled_code = ns["_off"].__code__
        emit = self.globals["_emit"]
        emit.__code__ = self._disabled_code
        emit.__name__ = emit.__qualname__ = name.replace(":", "_").replace(".", "_").replace("-", "_")
        emit.__doc__ = f"Emit the {name} event ({', '.join(f'{n}: {t}' for n, t in fields)})."
        emit.tracepoint = self  # type: ignore[attr-defined]
        self.emit = emit

    def set_streams(self, streams: tuple) -> None:
        """Point the emitter at these streams (empty: disabled).  Atomic."""
        self.globals["_streams"] = streams
        self.emit.__code__ = self._enabled_code if streams else self._disabled_code

    def _failed(self) -> None:
        # A bad argument or a closed buffer: count the event as discarded in
        # every stream it would have gone to.  Never raise.
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
        self.sock = None  # the listener's socket to sessiond, when connected
        self.registered = threading.Event()
        self.path = os.path.join(default_rundir(), "apps.sock")
        self.timeout = float(os.environ.get("TRACEWIRE_REGISTER_TIMEOUT", "3"))
        self.retry = float(os.environ.get("TRACEWIRE_RETRY_S", "1"))
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()
        atexit.register(self.hand_over)

    # -- declarations (app threads) ------------------------------------------------
    def declare(self, name: str, fields: list[tuple[str, str]]) -> Tracepoint:
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
    def _decl(tp: Tracepoint) -> dict:
        return {"id": tp.id, "name": tp.name, "fields": [list(f) for f in tp.fields]}

    def _start_listener(self) -> None:
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
    def _send(self, msg: dict, fds: list[int] | None = None) -> None:
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
        import socket

        from tracewire.control import close_fds, loads

        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        except OSError:
            return
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
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

    def _handle(self, msg: dict, fds: list[int]) -> None:
        op = msg.get("op")
        if op == "stream":
            from tracewire.ringbuf import BufferSpec, Producer

            if len(fds) != 2:
                raise ValueError("stream message without its two fds")
            memfd, efd = fds
            try:
                spec = BufferSpec(int(msg["subbuf_size"]), int(msg["num_subbuf"]))
                prod = Producer(memfd, efd, spec)
            finally:
                os.close(memfd)  # the mapping keeps the memory; efd stays open
            self.streams[str(msg["key"])] = _StreamW(str(msg["key"]), prod)
        elif op == "enable":
            s = self.streams.get(str(msg["key"]))
            if s is not None:
                s.enabled = {int(i) for i in msg["ids"]}
                self._apply()
        elif op == "sync":  # everything sent before is applied
            self._send({"op": "stopped", "seq": msg.get("seq")})
        elif op == "stop":
            # Disable, then wait for writers already inside the stream.
            keys = [str(k) for k in msg["keys"]]
            for k in keys:
                s = self.streams.get(k)
                if s is not None:
                    s.enabled = set()
            self._apply()
            for k in keys:
                s = self.streams.get(k)
                if s is not None:
                    with s.lock:
                        pass
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

    def _apply(self) -> None:
        with self.lock:
            for tp in self.tracepoints:
                tp.set_streams(tuple(s for s in self.streams.values() if tp.id in s.enabled))

    def _close_stream(self, s: _StreamW) -> None:
        s.enabled = set()
        self._apply()
        with s.lock:
            p, s.producer = s.producer, None
        if p is not None:
            os.close(p.wakeup_fd)
            s.mv = None
            try:
                p.close()
            except BufferError:
                pass  # a view still exported: the mapping goes with the process

    def _drop_all(self) -> None:
        for s in list(self.streams.values()):
            self._close_stream(s)
        self.streams.clear()
        self._apply()

    def hand_over(self) -> None:
        """At exit: close every open sub-buffer so the consumer takes it now."""
        for s in list(self.streams.values()):
            with s.lock:
                p, s.producer = s.producer, None
                if p is not None and p.pos > p.sb_index * p._S:
                    p.close_current()


def _procname() -> str:
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
    if not _registry_box or _registry_box[0].pid != os.getpid():
        with _registry_lock:
            if not _registry_box or _registry_box[0].pid != os.getpid():
                _registry_box[:] = [_Registry()]
    return _registry_box[0]


def tracepoint(name: str, **fields: type):
    """Declare an event and return the function that emits it.

    Args:
        name: ``provider:event``, e.g. ``"demo:tick"``.
        **fields: field name → Python type: ``int`` (int64), ``float``
            (double), ``str`` (UTF-8) or ``bytes``.

    Returns:
        A function taking the fields as arguments (by keyword or position).
        It never raises and never blocks; while no session enables the event
        it does nothing.

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
