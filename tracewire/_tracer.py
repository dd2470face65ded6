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
disabled call costs one Python call.  Enabling swaps in a recording body
(like a jump label); the swap is a single attribute store, atomic under the
GIL.  There are two recording bodies, one for an event enabled in exactly one
stream (the common case: no loop) and one looping over several.  Either
encodes the strings before taking any lock, then, per stream, serialises
writers with that stream's lock, takes the timestamp under the lock (so
timestamps are ordered in the stream), writes the event straight into shared
memory, and publishes ``ts`` then ``head``.  An event that fits the current
sub-buffer, gets its usual header, and whose string/bytes fields are each at
most ``_PACK_MAX_LEN`` bytes is written with a single ``pack_into`` (header,
every field, the strings' NULs), using a ``Struct`` cached per length of
that field (per tuple of lengths when there are several such fields, at
most ``_PACK_MAX_MULTI`` of them); any other event takes the general path (header and leading
fixed fields packed, the rest written field by field, switching sub-buffers
when needed).  Any exception (a wrong field type, an out-of-range int) drops
the event and counts it as discarded: the tracer never raises into the app.
docs/design.md ("The tracer's cost per event") says what each choice buys.

When ``tracewire._speedups`` is built (tracewire/_speedups.c), ``emit`` is
a C callable in front of the generated function: disabled, it returns at
once; enabled in one stream, it writes the event itself while holding the
GIL, unless anything is out of the ordinary (the stream's lock held, a
sub-buffer switch, an extended header, an argument that is not exactly of
its field's type, a NUL or a lone surrogate, several streams), which it
hands to the generated function.  Both write the same bytes.
``TRACEWIRE_SPEEDUPS=0`` keeps the tracer pure Python.
"""

from __future__ import annotations

import atexit
import importlib
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import CodeType
from typing import TYPE_CHECKING, Any

from tracewire.rundir import default_rundir, rundir_problem, trusted_uid


# The one-stream write path in C, when built (``make venv`` builds it; see
# tracewire/_speedups.c).  TRACEWIRE_SPEEDUPS=0 keeps the tracer pure Python.
def _load_speedups() -> Any:
    if os.environ.get("TRACEWIRE_SPEEDUPS", "1") == "0":
        return None
    try:
        return importlib.import_module("tracewire._speedups")
    except ImportError:
        return None


_speedups: Any = _load_speedups()

if TYPE_CHECKING:  # the tracer imports ringbuf only when a stream arrives
    import socket

    from tracewire.ringbuf import Producer

__all__ = ["tracepoint", "Tracepoint", "log_event"]

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


class _Detached:
    """What a one-stream emitter body finds in ``_S1`` when it no longer has
    that stream: a lock and no producer, so it writes nothing."""

    __slots__ = ("lock", "producer", "mv")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.producer: Producer | None = None
        self.mv: memoryview | None = None


_HDR_COMPACT = 4  # bytes of a compact event header
_HDR_EXTENDED = 16  # bytes of an extended one
_PACK_MAX_LEN = 256  # longest string/bytes field (encoded) packed with a cached per-length Struct
_PACK_MAX_MULTI = 1024  # Structs cached per tracepoint with several variable fields (one per tuple of lengths)


def _indent(depth: int, lines: list[str]) -> list[str]:
    """``lines`` indented by ``depth`` levels (four spaces each)."""
    return ["    " * depth + line for line in lines]


def _gen_encode(fields: list[tuple[str, str]], header: int, consts: Mapping[str, Any]) -> list[str]:
    """Lines, run before any lock is taken, that encode the variable-size
    fields and compute ``_n0``: the event's size with a ``header``-byte
    header (the one the tracepoint usually gets).

    A str is encoded strictly first (the common case, cheaper than naming an
    error handler); one that cannot be (a lone surrogate) is encoded again
    with replacement characters.  A field in ``consts`` is no argument: its
    value (a str already encoded) is a constant of the code."""
    lines = []
    size_terms = []
    fixed_size = header
    for n, t in fields:
        if n in consts:
            if t == "str":
                b = _const_str(consts[n])
                lines += [f"_b_{n} = {b!r}", f"_k_{n} = {len(b)}"]
                fixed_size += len(b) + 1
            else:
                lines.append(f"{n} = {consts[n]!r}")
                fixed_size += 8
        elif t == "str":
            lines += [
                "try:",
                f"    _b_{n} = {n}.encode()",
                "except UnicodeEncodeError:",
                f"    _b_{n} = {n}.encode('utf-8', 'replace')",
                f"if 0 in _b_{n}: _b_{n} = _b_{n}.replace(b'\\0', {_NUL_REPLACEMENT!r})",
                f"_k_{n} = len(_b_{n})",
            ]
            size_terms.append(f"_k_{n}")
            fixed_size += 1
        elif t == "bytes":
            lines += [f"_b_{n} = bytes({n})", f"_k_{n} = len(_b_{n})"]
            size_terms.append(f"_k_{n}")
            fixed_size += 4
        else:
            fixed_size += 8
    return lines + [f"_n0 = {' + '.join(size_terms + [str(fixed_size)])}"]


def _const_str(value: str) -> bytes:
    """A constant str field's bytes, as its emitter would encode it."""
    return value.encode("utf-8", "replace").replace(b"\0", _NUL_REPLACEMENT)


def _const_bytes(t: str, value: Any) -> bytes:
    """A constant field's bytes as the C emitter writes them (a str
    without its NUL)."""
    if t == "str":
        return _const_str(value)
    return struct.pack("<d" if t == "float" else "<q", value)


def _args(fields: list[tuple[str, str]], consts: Mapping[str, Any]) -> str:
    """An emitter's parameters: the fields that are not constants."""
    return ", ".join(n for n, _ in fields if n not in consts)


def _gen_general(fields: list[tuple[str, str]], tp_id: int, compact: bool, skip: str) -> list[str]:
    """Lines of the general write path, under the stream's lock with ``_ts``
    taken: choose the header, reserve (switching sub-buffers, or dropping:
    ``skip`` leaves the stream), pack the header and the leading fixed
    fields with one ``pack_into``, then write the other fields one by one.
    Leaves ``_end``, the event's end."""
    lines = []
    if compact:
        lines += [f"_ext = _ts - _p.last_ts >= {_TS27}", f"_n = _n0 + {_HDR_EXTENDED - _HDR_COMPACT} if _ext else _n0"]
    else:
        lines += ["_ext = True", "_n = _n0"]
    lines += [
        "if _pos + _n <= _p.sb_end:",
        "    _o = _p.base + _pos",
        "else:",
        "    _o = _p._switch(_n, _ts)",
        f"    if _o < 0: {skip}",
        "    _pos = _p.pos",
        "_mv = _s.mv",
    ]
    lead = _lead(fields)
    lead_args = "".join(f", {n}" for n, _ in lead)
    lead_size = 8 * len(lead)
    extended = [f"_PX(_mv, _o, {_EXTENDED}, {tp_id}, _ts{lead_args})", f"_o += {_HDR_EXTENDED + lead_size}"]
    if compact:
        lines += [
            "if _ext:",
            *_indent(1, extended),
            "else:",
            f"    _PC(_mv, _o, {_compact_header(tp_id)}{lead_args})",
            f"    _o += {_HDR_COMPACT + lead_size}",
        ]
    else:
        lines += extended
    for n, t in fields[len(lead):]:
        if t in _FIXED:
            lines.append(f"_P{t}(_mv, _o, {n}); _o += 8")
        elif t == "str":
            lines.append(f"_e = _o + _k_{n}; _mv[_o:_e] = _b_{n}; _mv[_e] = 0; _o = _e + 1")
        else:
            lines.append(f"_PI(_mv, _o, _k_{n}); _o += 4")
            lines.append(f"_e = _o + _k_{n}; _mv[_o:_e] = _b_{n}; _o = _e")
    return lines + ["_end = _pos + _n"]


def _compact_header(tp_id: int) -> str:
    """The expression of a compact header's u32: 5-bit id, 27-bit time."""
    return "(_ts & 0x7FFFFFF) << 5" + (f" | {tp_id}" if tp_id else "")


def _lead(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The leading run of fixed-size fields (packed with the header)."""
    lead = []
    for n, t in fields:
        if t not in _FIXED:
            break
        lead.append((n, t))
    return lead


def _variable(fields: list[tuple[str, str]]) -> list[str]:
    """Names of the variable-size (str, bytes) fields."""
    return [n for n, t in fields if t not in _FIXED]


def _gen_write(fields: list[tuple[str, str]], tp_id: int, skip: str) -> list[str]:
    """Lines that write one event into the stream ``_s`` whose producer
    ``_p`` is held under its lock, and publish it.

    The fast path -- the event fits in the current sub-buffer, its header is
    the one the tracepoint usually gets (compact unless the clock moved 2^27
    ns or more), and at most one field has a variable size, short enough to
    have a packer -- writes header and every field, NUL or length included,
    with one ``pack_into``.  Anything else takes the general path."""
    compact = tp_id <= _COMPACT_MAX_ID
    var = _variable(fields)
    lines = ["_ts = _mono()", "_pos = _p.pos"]
    if len(var) > 1:
        # Several variable fields: one pack_into too, with a Struct cached
        # per tuple of their lengths (a bounded cache, see _packer_multi).
        hdr = _compact_header(tp_id) if compact else f"{_EXTENDED}, {tp_id}, _ts"
        args = []
        for n, t in fields:
            args += [f"_k_{n}", f"_b_{n}"] if t == "bytes" else [f"_b_{n}"] if t == "str" else [n]
        cond = ["_end <= _p.sb_end", "_pk is not None"]
        if compact:
            cond.append(f"_ts - _p.last_ts < {_TS27}")
        lines += [
            "_end = _pos + _n0",
            f"if {' and '.join(cond)}:",
            f"    _pk(_s.mv, _p.base + _pos, {', '.join([hdr] + args)})",
            "else:",
            *_indent(1, _gen_general(fields, tp_id, compact, skip)),
        ]
    else:
        hdr = _compact_header(tp_id) if compact else f"{_EXTENDED}, {tp_id}, _ts"
        args = []
        for n, t in fields:
            args += [f"_k_{n}", f"_b_{n}"] if t == "bytes" else [f"_b_{n}"] if t == "str" else [n]
        cond = ["_end <= _p.sb_end"]
        if compact:
            cond.append(f"_ts - _p.last_ts < {_TS27}")
        if var:
            cond.append("_pk is not None")
        lines += [
            "_end = _pos + _n0",
            f"if {' and '.join(cond)}:",
            f"    {'_pk' if var else '_PF'}(_s.mv, _p.base + _pos, {', '.join([hdr] + args)})",
            "else:",
            *_indent(1, _gen_general(fields, tp_id, compact, skip)),
        ]
    return lines + [
        "_p.pos = _end",
        "_p.last_ts = _ts",
        f"_q = _p.q; _q[{_Q_TS}] = _ts; _q[{_Q_HEAD}] = _end",
        # The ``events`` word (ringbuf: status' events/s), after head.
        "_q[_p.qev] = _p.events = _p.events + 1",
    ]


def _gen_source(fields: list[tuple[str, str]], tp_id: int, many: bool, consts: Mapping[str, Any]) -> str:
    """Python source of a recording body for these fields.

    Args:
        fields: (name, type) pairs, type one of int, float, str, bytes.
        tp_id: the tracepoint's id (above 30: always the extended header).
        many: write to every stream of ``_streams`` (a loop); otherwise to
            the one stream ``_S1`` (a ``_Detached`` stand-in: nowhere),
            without the loop.
        consts: fields that always hold one value (int, float or str):
            not parameters of ``_emit``.

    Returns:
        The source of ``_emit(fields...)``.  Its globals: see
        ``Tracepoint.__init__``.
    """
    var = _variable(fields)
    prelude = _gen_encode(fields, _HDR_COMPACT if tp_id <= _COMPACT_MAX_ID else _HDR_EXTENDED, consts)
    if len(var) == 1:
        prelude += [f"_pk = _PK.get(_k_{var[0]})", f"if _pk is None: _pk = _mkpk(_k_{var[0]})"]
    elif var:
        ks = "(" + "".join(f"_k_{n}, " for n in var) + ")"
        prelude += [f"_pk = _PK.get({ks})", f"if _pk is None: _pk = _mkpkm({ks})"]
    locked = [
        "_l = _s.lock",
        "_l.acquire()",
        "try:",
        "    _p = _s.producer",
        "    if _p is None: SKIP",
        *_indent(1, _gen_write(fields, tp_id, "SKIP")),
        "finally:",
        "    _l.release()",
    ]
    if many:
        body = ["for _s in _streams:", *_indent(1, [line.replace("SKIP", "continue") for line in locked])]
    else:
        body = ["_s = _S1", *[line.replace("SKIP", "return") for line in locked]]
    lines = [
        f"def _emit({_args(fields, consts)}):",
        "    try:",
        *_indent(2, prelude + body),
        "    except Exception:",
        "        _failed()",
    ]
    return "\n".join(lines) + "\n"


class Tracepoint:
    """One declared event: its name, fields and app-wide id.

    Its emitter (``emit``) runs one of three bodies, swapped in through
    ``__code__``: disabled (returns at once), one stream (the common case:
    no loop over streams) and several streams.  They share one globals dict:
    ``_streams`` (the streams, for the loop and for counting failures),
    ``_S1`` (the stream when there is exactly one; see ``set_streams`` for
    what it holds otherwise), the packers and the clock."""

    def __init__(self, registry: _Registry | None, tp_id: int, name: str, fields: list[tuple[str, str]],
                 loglevel: int | None = None, consts: Mapping[str, Any] | None = None) -> None:
        self.registry = registry
        self.id = tp_id
        self.name = name
        self.fields = fields
        # A log event's level (``tracewire.logging``: a ``logging`` levelno);
        # sessiond's ``--loglevel`` rules enable it or not.  None: a plain
        # tracepoint.
        self.loglevel = loglevel
        # Fields that hold one value in every event (a log event's level and
        # level name): constants of the emitter's code, not its arguments.
        self.consts: dict[str, Any] = dict(consts or {})
        self.enabled = False  # some stream records it (kept by set_streams)
        lead = _lead(fields)
        lead_fmt = "".join(_FIXED[t] for _, t in lead)
        rest = fields[len(lead):]
        # The fast path's struct format (at most one variable field): header
        # and every field; the variable field's part depends on its length
        # (``_packer``).
        self._fmt_head = ("<I" if tp_id <= _COMPACT_MAX_ID else "<IIQ") + lead_fmt
        self._fmt_var = rest[0][1] if rest else ""
        self._fmt_tail = "".join(_FIXED[t] for _, t in rest[1:] if t in _FIXED)
        self._packers: dict[Any, Callable[..., None]] = {}  # by length, or by tuple of lengths
        self._detached = _Detached()
        self.globals: dict[str, Any] = {
            "_streams": (),
            "_S1": self._detached,
            "_mono": time.monotonic_ns,
            "_PC": struct.Struct("<I" + lead_fmt).pack_into,
            "_PX": struct.Struct("<IIQ" + lead_fmt).pack_into,
            "_PF": struct.Struct(self._fmt_head + self._fmt_tail).pack_into,
            "_PK": self._packers,
            "_mkpk": self._packer,
            "_mkpkm": self._packer_multi,
            "_Pint": struct.Struct("<q").pack_into,
            "_Pfloat": struct.Struct("<d").pack_into,
            "_PI": struct.Struct("<I").pack_into,
            "_failed": self._failed,
        }
        where = f"<tracepoint {name}>"
        exec(compile(_gen_source(fields, tp_id, many=False, consts=self.consts), where, "exec"), self.globals)
        self._one_code: CodeType = self.globals["_emit"].__code__
        exec(compile(_gen_source(fields, tp_id, many=True, consts=self.consts), where, "exec"), self.globals)
        self._many_code: CodeType = self.globals["_emit"].__code__
        args = _args(fields, self.consts)
        ns: dict[str, Any] = {}
        exec(compile(f"def _off({args}):\n    return None\n", where, "exec"), ns)
        self._disabled_code: CodeType = ns["_off"].__code__
        emit = self.globals["_emit"]
        emit.__code__ = self._disabled_code
        emit.__name__ = emit.__qualname__ = name.replace(":", "_").replace(".", "_").replace("-", "_")
        emit.__doc__ = f"Emit the {name} event ({', '.join(f'{n}: {t}' for n, t in fields if n not in self.consts)})."
        emit.tracepoint = self
        # The Python emitter: the whole tracer without tracewire._speedups,
        # and the path of every call the C emitter hands over.
        self._pyemit: Callable[..., None] = emit
        self.emit: Callable[..., None] = emit
        self._cemit: Any = None
        if _speedups is not None:
            spec = [(n, t, _const_bytes(t, self.consts[n]) if n in self.consts else None) for n, t in fields]
            cemit = _speedups.Emitter(emit, tp_id, spec)
            cemit.__name__ = cemit.__qualname__ = emit.__name__
            cemit.__doc__ = emit.__doc__
            cemit.__wrapped__ = emit  # inspect.signature() and help() show the fields
            cemit.tracepoint = self
            self._cemit = self.emit = cemit

    def set_streams(self, streams: tuple[_StreamW, ...]) -> None:
        """Point the emitter at these streams (empty: disabled).

        Each store is atomic.  An emitter running through the change (a
        thread inside the old body) writes to the old set or to the new one,
        so a stream both sets have gets its event: a change to several
        streams leaves ``_S1`` on the old single stream.  A change to none
        leaves ``_S1`` on a ``_Detached`` stand-in, so a body that reads it
        afterwards writes nowhere (the stop barrier relies on this)."""
        g = self.globals
        self.enabled = bool(streams)
        py = self._pyemit
        if len(streams) == 1:
            g["_S1"] = streams[0]
            g["_streams"] = streams
            py.__code__ = self._one_code
        elif streams:
            g["_streams"] = streams
            py.__code__ = self._many_code
        else:
            g["_streams"] = streams
            g["_S1"] = self._detached
            py.__code__ = self._disabled_code
        if self._cemit is not None:
            # After the Python emitter: the C one hands over to it.
            self._cemit.set(min(len(streams), 2), streams[0] if len(streams) == 1 else None)

    def _packer(self, k: int) -> Callable[..., None] | None:
        """The fast path's ``pack_into`` for a variable field of ``k`` bytes
        (cached), or None: longer than ``_PACK_MAX_LEN`` (the general path
        copies it).  A str's ``{k+1}s`` pads it with its NUL; bytes get
        their u32 length first."""
        if not 0 <= k <= _PACK_MAX_LEN:
            return None
        var = f"{k + 1}s" if self._fmt_var == "str" else f"I{k}s"
        pk = struct.Struct(self._fmt_head + var + self._fmt_tail).pack_into
        self._packers[k] = pk
        return pk

    def _packer_multi(self, ks: tuple[int, ...]) -> Callable[..., None] | None:
        """The fast path's ``pack_into`` for an event with several variable
        fields of these encoded lengths (in field order), or None: one is
        longer than ``_PACK_MAX_LEN``, or ``_PACK_MAX_MULTI`` are cached
        already (the general path writes it).  Header and fields in order:
        a str's ``{k+1}s`` pads its NUL, bytes get their u32 length first."""
        if len(self._packers) >= _PACK_MAX_MULTI or not all(0 <= k <= _PACK_MAX_LEN for k in ks):
            return None
        fmt = ["<I" if self.id <= _COMPACT_MAX_ID else "<IIQ"]
        lengths = iter(ks)
        for _n, t in self.fields:
            fmt.append(_FIXED[t] if t in _FIXED else f"{next(lengths) + 1}s" if t == "str" else f"I{next(lengths)}s")
        pk = struct.Struct("".join(fmt)).pack_into
        self._packers[ks] = pk
        return pk

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
        # Log events (``tracewire.logging``): several may share a name, one
        # per (fields, level).
        self.by_key: dict[tuple[str, tuple[tuple[str, str], ...], int, tuple[tuple[str, Any], ...]], Tracepoint] = {}
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
    def declare(self, name: str, fields: list[tuple[str, str]], loglevel: int | None = None,
                consts: Mapping[str, Any] | None = None) -> Tracepoint:
        """The tracepoint ``name``, declared now if new (and announced to
        sessiond, waiting up to ``timeout`` for its answer).  With a
        ``loglevel``, a log event: one per (name, fields, level, constant
        fields' values), so a name may have several.

        Raises:
            ValueError: declared before with other fields (without a loglevel).
        """
        with self.lock:
            key = (name, tuple(fields), loglevel if loglevel is not None else 0, tuple((consts or {}).items()))
            if loglevel is None:
                tp = self.by_name.get(name)
                if tp is not None:
                    if tp.fields != fields:
                        raise ValueError(f"tracepoint {name!r} already declared with other fields")
                    return tp
            else:
                tp = self.by_key.get(key)
                if tp is not None:
                    return tp
            tp = Tracepoint(self, len(self.tracepoints), name, fields, loglevel, consts)
            self.tracepoints.append(tp)
            if loglevel is None:
                self.by_name[name] = tp
            else:
                self.by_key[key] = tp
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
        decl: dict[str, Any] = {"id": tp.id, "name": tp.name, "fields": [list(f) for f in tp.fields]}
        if tp.loglevel is not None:
            decl["loglevel"] = tp.loglevel
        return decl

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
            _let_go(s, p)

    def _drop_all(self) -> None:
        """Close every stream (sessiond went away)."""
        for s in list(self.streams.values()):
            self._close_stream(s)
        self.streams.clear()
        self._apply()

    def hand_over(self) -> None:
        """At exit: close every open sub-buffer so the consumer takes it now.
        Another thread waiting for space (a blocking channel) gives up
        first, dropping its event, so exit never waits for the consumer.
        Not in a forked child: these buffers are its parent's."""
        if os.getpid() != self.pid:
            return
        for s in list(self.streams.values()):
            waiting = s.producer
            if waiting is not None:
                waiting.cancel_wait()
            with s.lock:
                p, s.producer = s.producer, None
                if p is not None and p.pos > p.sb_index * p._S:
                    p.close_current()

    def forget_in_child(self) -> None:
        """In a forked child: stop writing into the parent's buffers and let
        go of what the child inherited, without touching the shared memory
        (the parent goes on writing there) or any lock (a parent thread may
        have held one at the fork: no thread of the child will release it)."""
        for tp in self.tracepoints:
            tp.set_streams(())
        for s in self.streams.values():
            s.enabled = set()
            p, s.producer = s.producer, None
            if p is not None:
                _let_go(s, p)  # the child's descriptors and mapping; the parent's stay
        self.streams = {}
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()  # the child's copy: the parent's connection goes on


def _let_go(s: _StreamW, p: Producer) -> None:
    """Close the descriptors of ``s``'s former producer ``p`` and unmap its
    buffer (writes nothing to it)."""
    os.close(p.wakeup_fd)
    if p.space_fd >= 0:
        os.close(p.space_fd)
    s.mv = None
    try:
        p.close()
    except BufferError:
        pass  # a view still exported: the mapping goes with the process


def _after_fork_in_child() -> None:
    """``os.fork()``'s child: its tracepoints stop writing into the parent's
    ring buffers (shared memory, no lock between the two processes) and are
    declared again by a registry of its own, which registers the child with
    sessiond as a new app -- waiting for its first answer, as the first
    declaration of a process does -- so its events go to buffers of its own."""
    global _registry_lock
    _registry_lock = threading.Lock()  # a parent thread may have held it at the fork
    if not _registry_box:
        return
    old = _registry_box[0]
    old.forget_in_child()
    new = _Registry()
    new.tracepoints, new.by_name, new.by_key = old.tracepoints, old.by_name, old.by_key
    for tp in new.tracepoints:
        tp.registry = new
    _registry_box[:] = [new]
    if new.tracepoints:
        with new.lock:
            new._start_listener()


os.register_at_fork(after_in_child=_after_fork_in_child)


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


def log_event(name: str, fields: list[tuple[str, str]], loglevel: int,
              consts: Mapping[str, int | float | str] | None = None) -> Tracepoint:
    """Declare a log event (``tracewire.logging``): like ``tracepoint`` but
    one per (name, fields, level), with its level announced to sessiond,
    which enables it when a ``--loglevel`` rule (or a plain pattern) says so.

    Args:
        name: ``provider:event``.
        fields: (name, type) pairs, type one of int, float, str, bytes.
        loglevel: the ``logging`` level number, 0 to 2**31 - 1.
        consts: fields whose value is the same in every event (the level and
            its name): written by the emitter, which takes only the others
            (in field order).

    Returns:
        The Tracepoint (``emit`` emits; ``enabled`` says whether a session
        records it).

    Raises:
        ValueError: a malformed name, field or level.
    """
    if not set(name) <= _NAME_CHARS or not 3 <= len(name) <= 255 or ":" not in name.strip(":"):
        raise ValueError(f"log event name must look like 'provider:event', got {name!r}")
    if not isinstance(loglevel, int) or not 0 <= loglevel < 2**31:
        raise ValueError(f"log level must be 0 to 2**31-1, got {loglevel!r}")
    import keyword

    for fname, t in fields:
        if (not fname.isidentifier() or fname.startswith("_") or keyword.iskeyword(fname)
                or (t not in _FIXED and t not in ("str", "bytes"))):
            raise ValueError(f"log event field {fname!r}: {t!r}")
    types = dict(fields)
    for cname, value in (consts or {}).items():
        kind = {"str": str, "float": float, "int": int}.get(types.get(cname, ""))
        if kind is not value.__class__ or (isinstance(value, int) and not -(2**63) <= value < 2**63):
            raise ValueError(f"log event constant {cname!r}: {value!r} is no value of a field of this event")
    return _get_registry().declare(name, list(fields), loglevel, consts)
