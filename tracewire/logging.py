"""Standard-library ``logging`` records as tracewire events.

    import tracewire.logging
    tracewire.logging.install()          # once, at start-up
    log = logging.getLogger("app.db")
    log.info("request %d %s", 7, "/x", extra={"user": "ann", "ms": 3.5})

then ``tracewire enable-event --python app.db --loglevel INFO`` (or
``'python:*'``) records the event ``python:app.db`` with the fields
``level`` (int: the levelno), ``levelname`` (str), ``msg`` (str: the formatted
message) and one field per ``extra`` key, sorted by name.

Theory of operation
-------------------
A record becomes a *log event*: a tracepoint named ``python:<logger name>``
(characters a tracepoint name cannot hold become ``_``) declared with the
record's level and the types of its extra fields.  A logger that logs at
three levels, with and without extras, declares a few log events that share
its name; each tells sessiond its level, and sessiond enables it in a
channel when a pattern matches its name and the pattern's ``--loglevel``
(that level or more severe) or ``--loglevel-only`` (exactly) admits its
level.  So the level filter runs in the app with no code of its own: a
record whose log event no session enables costs a dictionary lookup and a
flag test, the message is not even formatted (nor the extras read).  Declaring costs one message
to sessiond (the first record of each logger, level and extras' types, like
any tracepoint's first declaration); at most ``max_events`` are declared per
handler, the records of any further kind are counted in ``dropped`` and
not recorded (sessiond would refuse an app declaring without bound).

Extra fields: a record's attributes that a plain ``LogRecord`` lacks (what
``extra=`` added).  An ``int`` (``bool`` too) in int64 range is an int, a
``float`` a float, a ``str`` a str, ``bytes``/``bytearray``/``memoryview``
bytes; anything else is stored as ``str(value)``.  Strings and bytes are cut
to ``MAX_VALUE`` characters/bytes, the message to ``MAX_MESSAGE``; at most
``MAX_EXTRA`` extras (the first by name) are kept.  A key that is not a
usable field name is rewritten (``[^A-Za-z0-9_]`` to ``_``; ``x`` before a
leading digit or ``_``; ``extra_`` before ``level``, ``levelname`` and
``msg``; ``_`` after a Python keyword; a number after a repeat).

``TracewireHandler`` works as any handler does.  ``install()`` attaches one
to the root logger and also replaces ``Logger.debug``, ``info``,
``warning``, ``error``, ``critical`` and ``_log`` with a fast path: when,
walking up from the logger like ``callHandlers`` does, the only handler
found is one plain ``TracewireHandler`` (no subclass, no filters, no
formatter, no logger filters) and the call has no ``exc_info`` or
``stack_info``, the record is neither located (``findCaller``) nor built
(``LogRecord``): its level, logger, message and extras go straight to the
tracepoint.  In every other case the stock ``_log`` runs, so other handlers,
filters and formatters see exactly what they always saw.  What the fast
path drops is what no consumer would read: the caller's file and line, the
thread and process names, the wall-clock time (the event has the tracer's
timestamp).  When the stock ``_log`` runs from a replaced method,
``stacklevel`` is raised so that ``findCaller`` still names the app's
caller.  ``uninstall()`` puts the stock methods back.  A record with extras
is typed once per (logger, level, keys in their order, their classes): the
plan is remembered, bounded like the log events.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from tracewire import _tracer

__all__ = ["TracewireHandler", "install", "uninstall", "event_name", "extra_fields", "level_number",
           "MAX_EXTRA", "MAX_VALUE", "MAX_MESSAGE", "PROVIDER"]

PROVIDER = "python"
MAX_EXTRA = 16  # extra fields kept per record
MAX_VALUE = 1024  # characters of a str extra, bytes of a bytes one
MAX_MESSAGE = 65536  # characters of the message
MAX_EVENTS = 1024  # log events one handler declares at most (sessiond allows 4096 tracepoints per app)
_INT64 = (-(2**63), 2**63 - 1)
_RESERVED = frozenset({"level", "levelname", "msg"})
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.:-]")
_BAD_FIELD_CHARS = re.compile(r"[^A-Za-z0-9_]")
# What a plain LogRecord holds: anything else on a record came from ``extra``.
_PLAIN_ATTRS = frozenset(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None).__dict__) | {
    "message", "asctime"}
_MESSAGE_ONLY = logging.Formatter("%(message)s")  # the message, then exc_info/stack_info text as logging adds it
_LEVEL_NAMES = {"CRITICAL": 50, "FATAL": 50, "ERROR": 40, "WARNING": 30, "WARN": 30, "INFO": 20, "DEBUG": 10,
                "NOTSET": 0}


def level_number(text: str) -> int | None:
    """A ``logging`` level from a name (``WARNING``, any case, also a level
    registered with ``logging.addLevelName``; LTTng's ``PYTHON_WARNING``
    spelling too) or a number; None if neither (or a number outside
    0..2**31-1)."""
    t = text.strip()
    if t.upper().startswith("PYTHON_"):
        t = t[len("PYTHON_"):]
    if t.isdigit():
        n = int(t)
        return n if n < 2**31 else None
    level = _LEVEL_NAMES.get(t.upper())
    if level is None:
        named = logging.getLevelName(t.upper())
        level = named if isinstance(named, int) else None
    return level


def event_name(logger_name: str) -> str:
    """The event a logger's records become: ``python:<logger name>``, with
    the characters a tracepoint name cannot hold replaced by ``_`` and cut
    to 255 characters."""
    return (PROVIDER + ":" + _BAD_NAME_CHARS.sub("_", logger_name or "root"))[:255]


def _field_name(key: str, taken: set[str]) -> str:
    """A usable, unused field name for the extra ``key`` (see the module's
    docstring), added to ``taken``."""
    import keyword

    name = _BAD_FIELD_CHARS.sub("_", key)[:64] or "x"
    if name[0].isdigit() or name[0] == "_":
        name = "x" + name
    if name in _RESERVED:
        name = "extra_" + name
    if keyword.iskeyword(name):
        name += "_"
    base, n = name, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def _kind(value: Any) -> str:
    """The tracer type an extra value is stored as."""
    cls = value.__class__
    if cls is int or cls is bool:
        return "int" if _INT64[0] <= value <= _INT64[1] else "str"
    if cls is float:
        return "float"
    if cls is str:
        return "str"
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytes"
    if isinstance(value, int):  # an IntEnum, an int subclass
        return "int" if _INT64[0] <= value <= _INT64[1] else "str"
    if isinstance(value, float):
        return "float"
    return "str"


def _value(value: Any, kind: str) -> Any:
    """``value`` as its field of type ``kind`` holds it (bounded)."""
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bytes":
        return bytes(memoryview(value)[:MAX_VALUE])
    if value.__class__ is not str:
        try:
            value = str(value)
        except Exception:
            value = f"<unprintable {type(value).__name__}>"
    return value[:MAX_VALUE]


def extra_fields(extras: Mapping[str, Any]) -> tuple[list[tuple[str, str]], list[Any]]:
    """The fields and values that a record's extras become: the first
    ``MAX_EXTRA`` keys by name, typed and bounded (see the module's
    docstring)."""
    fields: list[tuple[str, str]] = []
    values: list[Any] = []
    taken: set[str] = set()
    for key in sorted(extras, key=str)[:MAX_EXTRA]:
        v = extras[key]
        kind = _kind(v)
        fields.append((_field_name(str(key), taken), kind))
        values.append(_value(v, kind))
    return fields, values


# The log event of one (logger, level[, extras' types]); None: over the
# handler's ``max_events`` (not remembered, so never found in its maps).
_Route = _tracer.Tracepoint | None


class TracewireHandler(logging.Handler):
    """A ``logging.Handler`` that records each record as a tracewire log
    event (see the module's docstring).  It never raises into the app and
    never blocks, except while declaring a new log event to sessiond (once
    per logger, level and extras' types, bounded like any declaration) or
    on a channel with a blocking timeout.

    Args:
        level: the handler's level (records below it are not looked at).
        max_events: the most log events it declares; records needing more
            are counted in ``dropped``.

    Attributes:
        dropped: records not recorded because ``max_events`` was reached.
    """

    def __init__(self, level: int = logging.NOTSET, max_events: int = MAX_EVENTS) -> None:
        super().__init__(level)
        self.max_events = max_events
        self.dropped = 0
        self._declared = 0
        # What the maps hold is declared: a kind over max_events is not kept.
        self._plain: dict[str, dict[int, _tracer.Tracepoint]] = {}  # logger name -> level -> its log event
        self._extra: dict[tuple[Any, ...], _tracer.Tracepoint] = {}
        self._plans: dict[tuple[Any, ...], tuple[_tracer.Tracepoint, list[tuple[Any, str]]]] = {}  # _extra_cached

    def _declare(self, name: str, level: int, fields: list[tuple[str, str]]) -> _Route:
        if self._declared >= self.max_events:
            return None
        self._declared += 1
        all_fields = [("level", "int"), ("levelname", "str"), ("msg", "str"), *fields]
        # A log event is one level: its level and level name are constants
        # of its emitter, which takes the message and the extras.
        consts: dict[str, int | str] = {"level": level, "levelname": logging.getLevelName(level)}
        return _tracer.log_event(event_name(name), all_fields, level, consts)

    def _plain_route(self, name: str, level: int) -> _Route:
        """The log event of (logger, level) without extras, declared on first
        use (under the handler's lock: one declaration per kind).  Kinds
        over ``max_events`` are not remembered, so the maps stay bounded."""
        with self.lock:  # type: ignore[union-attr]
            levels = self._plain.get(name)
            route = levels.get(level) if levels is not None else None
            if route is None:
                route = self._declare(name, level, [])
                if route is not None:
                    self._plain.setdefault(name, {})[level] = route
            return route

    def _extra_cached(self, name: str, level: int, extras: Mapping[str, Any]) -> tuple[_Route, list[Any]]:
        """``_extra_route``, remembered per (logger, level, the extras' keys in
        their order and their classes): no sort, no type test per value, but
        an int out of int64's range (stored as str) takes ``_extra_route``."""
        ck = (name, level, tuple(extras), tuple(map(type, extras.values())))
        hit = self._plans.get(ck)
        if hit is None:
            route, values = self._extra_route(name, level, extras)
            if route is not None and len(self._plans) < 4 * self.max_events:
                self._plans[ck] = (route, [(k, t) for (_v, t), k in zip(values, sorted(extras, key=str),
                                                                         strict=False)])
            return route, values
        route, plan = hit
        values = []
        for k, t in plan:
            v = extras[k]
            if t == "int" and not _INT64[0] <= v <= _INT64[1]:
                return self._extra_route(name, level, extras)
            values.append((v, t))
        return route, values

    def _extra_route(self, name: str, level: int, extras: Mapping[str, Any]) -> tuple[_Route, list[Any]]:
        """The log event of (logger, level, the extras' names and types), and
        the extras to read the values from, in field order."""
        keys = sorted(extras, key=str)[:MAX_EXTRA]
        kinds = tuple(_kind(extras[k]) for k in keys)
        key = (name, level, tuple(keys), kinds)
        route = self._extra.get(key)
        if route is None:
            with self.lock:  # type: ignore[union-attr]
                route = self._extra.get(key)
                if route is None:
                    taken: set[str] = set()
                    fields = [(_field_name(str(k), taken), t) for k, t in zip(keys, kinds, strict=True)]
                    route = self._declare(name, level, fields)
                    if route is not None:
                        self._extra[key] = route
        return route, [(extras[k], t) for k, t in zip(keys, kinds, strict=True)]

    def emit(self, record: logging.LogRecord) -> None:
        """Record ``record`` if a session enables its log event."""
        try:
            extras = {k: v for k, v in record.__dict__.items() if k not in _PLAIN_ATTRS}
            if extras:
                tp, values = self._extra_route(record.name, record.levelno, extras)
            else:
                tp, values = self._plain_route(record.name, record.levelno), []
            if tp is None:
                self.dropped += 1
                return
            if not tp.enabled:
                return
            msg = (self.formatter or _MESSAGE_ONLY).format(record)
            tp.emit(msg[:MAX_MESSAGE], *[_value(v, t) for v, t in values])
        except Exception:
            self.handleError(record)

    def _fast(self, name: str, level: int, msg: Any, args: Any, extra: Mapping[str, Any] | None) -> bool:
        """The fast path's work for one call (see ``install``); False: let
        the stock ``_log`` do it instead (an ``extra`` key logging refuses, a
        message that does not format: logging reports those its own way)."""
        if extra:
            if not _PLAIN_ATTRS.isdisjoint(extra):
                return False
            tp, values = self._extra_cached(name, level, extra)
        else:
            levels = self._plain.get(name)
            tp = levels.get(level) if levels is not None else None
            if tp is None:
                tp = self._plain_route(name, level)
            values = []
        if tp is None:
            self.dropped += 1
            return True
        if not tp.enabled:
            return True
        try:
            if msg.__class__ is not str:
                msg = str(msg)
            if args:
                if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
                    args = args[0]
                msg = msg % args
        except Exception:
            return False
        if len(msg) > MAX_MESSAGE:
            msg = msg[:MAX_MESSAGE]
        tp.emit(msg, *[_value(v, t) for v, t in values])
        return True


def _bridge_of(logger: logging.Logger) -> TracewireHandler | None:
    """The handler the fast path may use for a record of ``logger``: the
    only handler ``callHandlers`` would find, when it is a plain
    ``TracewireHandler`` with no filter or formatter and the logger has no
    filter; None otherwise (the stock path runs)."""
    h = None
    c: logging.Logger | None = logger
    while c is not None:
        hs = c.handlers
        if hs:
            if h is not None or len(hs) != 1 or hs[0].__class__ is not TracewireHandler:
                return None
            h = hs[0]
        if not c.propagate:
            break
        c = c.parent
    if h is None or logger.filters or h.filters or h.formatter is not None:
        return None
    return h


def _make_fast_log(stock: Any) -> Any:
    """The ``Logger._log`` that ``install`` puts in place (``stock``: the
    one it replaces).  When it hands over to ``stock``, ``stacklevel`` + 1
    makes ``findCaller`` skip this frame, so other handlers see the caller
    they always saw."""

    def _log(self: logging.Logger, level: int, msg: Any, args: Any, exc_info: Any = None,
             extra: Mapping[str, Any] | None = None, stack_info: bool = False, stacklevel: int = 1) -> None:
        h = None if exc_info or stack_info else _bridge_of(self)
        if h is None or not h._fast(self.name, level, msg, args, extra):
            stock(self, level, msg, args, exc_info, extra, stack_info, stacklevel + 1)
            return
        return

    _log.tracewire_stock = stock  # type: ignore[attr-defined]
    return _log


def _make_level_method(levelno: int, stock: Any, stock_log: Any) -> Any:
    """``Logger.info`` (``debug``, ...) as ``install`` puts it in place: the
    level test, the handler search and the event written in one frame, the
    common call (no keyword arguments) never entering ``_log``.  Falling
    back to the stock ``_log``, ``stacklevel`` 2 skips this frame; with
    keyword arguments, the patched ``_log`` adds one more."""

    def method(self: logging.Logger, msg: Any, *args: Any, **kwargs: Any) -> None:
        fmt_args: Any = args
        if self.disabled:
            return
        try:
            if not self._cache[levelno]:  # type: ignore[attr-defined]
                return
        except KeyError:
            if not self.isEnabledFor(levelno):
                return
        extra = None
        if kwargs:
            extra = kwargs.get("extra")
            if len(kwargs) != 1 or extra is None:
                kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
                self._log(levelno, msg, args, **kwargs)
                return
        # _bridge_of, inlined (this is the path every call takes).
        h = None
        c: logging.Logger | None = self
        while c is not None:
            hs = c.handlers
            if hs:
                if h is not None or len(hs) != 1 or hs[0].__class__ is not TracewireHandler:
                    stock_log(self, levelno, msg, args, None, extra, False, 2)
                    return
                h = hs[0]
            if not c.propagate:
                break
            c = c.parent
        if h is None or self.filters or h.filters or h.formatter is not None:
            stock_log(self, levelno, msg, args, None, extra, False, 2)
            return
        if levelno < h.level:
            return
        if extra is not None:
            if not h._fast(self.name, levelno, msg, args, extra):
                stock_log(self, levelno, msg, args, None, extra, False, 2)
            return
        levels = h._plain.get(self.name)
        tp = levels.get(levelno) if levels is not None else None
        if tp is None:
            tp = h._plain_route(self.name, levelno)
        if tp is None:
            h.dropped += 1
            return
        if not tp.enabled:
            return
        try:
            if msg.__class__ is not str:
                msg = str(msg)
            if args:
                if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
                    fmt_args = args[0]
                msg = msg % fmt_args
        except Exception:
            stock_log(self, levelno, msg, args, None, extra, False, 2)  # logging reports it its own way
            return
        if len(msg) > MAX_MESSAGE:
            msg = msg[:MAX_MESSAGE]
        tp.emit(msg)

    method.__name__ = method.__qualname__ = stock.__name__
    method.__doc__ = stock.__doc__
    method.tracewire_stock = stock  # type: ignore[attr-defined]
    return method


_LEVEL_METHODS = (("debug", logging.DEBUG), ("info", logging.INFO), ("warning", logging.WARNING),
                  ("error", logging.ERROR), ("critical", logging.CRITICAL))


def install(level: int = logging.NOTSET, *, fast: bool = True) -> TracewireHandler:
    """Record every ``logging`` record as a tracewire log event: attach a
    ``TracewireHandler`` to the root logger (once; a second call returns
    the same handler) and, with ``fast``, put the fast path in place (see
    the module's docstring).

    Loggers' levels are left alone: a record below its logger's effective
    level (the root logger's default is WARNING) reaches no handler, so to
    trace INFO or DEBUG records lower it (``logging.getLogger().setLevel(
    logging.DEBUG)``) and give other handlers their own level.

    Args:
        level: the handler's level.
        fast: replace ``logging.Logger._log`` with the fast path.

    Returns:
        The handler.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.__class__ is TracewireHandler), None)
    if handler is None:
        handler = TracewireHandler(level)
        root.addHandler(handler)
    if fast and not hasattr(logging.Logger._log, "tracewire_stock"):
        stock_log = logging.Logger._log
        for name, levelno in _LEVEL_METHODS:
            setattr(logging.Logger, name, _make_level_method(levelno, getattr(logging.Logger, name), stock_log))
        logging.Logger._log = _make_fast_log(stock_log)  # type: ignore[method-assign]
    return handler


def uninstall() -> None:
    """Undo ``install``: remove the root logger's ``TracewireHandler`` and
    put the stock ``Logger._log`` back."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if h.__class__ is TracewireHandler]:
        root.removeHandler(h)
    for name in ["_log", *(n for n, _ in _LEVEL_METHODS)]:
        stock = getattr(getattr(logging.Logger, name), "tracewire_stock", None)
        if stock is not None:
            setattr(logging.Logger, name, stock)
