"""Saved sessions: the file ``tracewire save`` writes and ``tracewire load``
/ ``tracewire-sessiond --load`` read.

Theory of operation
-------------------
A saved session is one JSON object (UTF-8, at most ``MAX_FILE`` bytes)
holding a session's *definition*, never its data nor a secret::

    {"format": "tracewire-session", "version": 1,
     "name": "s1", "created": "20261202T183000",
     "sink": {"url": "tw://collector:6342", "compress": "zstd", "compress_level": 1,
              "spool_size": 67108864, "auth_key_file": "/etc/tracewire/key", "tls_ca": null},
     "mode": "normal", "live_timer_us": 0,
     "rotation": {"timer_ms": 0, "size": 0},
     "channels": [{"name": "channel0", "subbuf_size": 262144, "num_subbuf": 4, "mode": "discard",
                   "switch_timer_ms": 0, "blocking_timeout_ms": 0, "tracefile_size": 0,
                   "tracefile_count": 0, "events": ["demo:*"]}],
     "started": true}

A channel may also hold ``"loglevels": {"python:*": {"level": 30, "only":
false}}``: the ``enable-event --loglevel`` / ``--loglevel-only`` rule of
some of its events (the logging bridge, tracewire/logging.py).

``sink`` holds ``output`` (an absolute directory) or ``url`` with the
streaming options; the auth key is named by its file's path (the secret
stays in that file).  ``created`` is the session's creation stamp: a load
reuses it only to resume a session whose relay spool a killed sessiond left
(sessiond/saved.py); otherwise the loaded session gets a new one, and so a
new trace directory, as with ``create``.

The file is one a user may edit, so :func:`parse` checks every field: its
type, its range (by building the very requests ``create``,
``enable-channel``, ``enable-event`` and ``enable-rotation`` send, whose
checks are the CLI's), unknown fields and a version this code does not know
are refused.  Every problem is a :class:`SavedSessionError` whose text is one
line naming the field (``channels[1].subbuf_size: ...``).  Optional fields
take the defaults of ``create`` / ``enable-channel``.

This module is stdlib-only and does no I/O: the CLI and sessiond read and
write the files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tracewire import ops
from tracewire.names import MAX_SESSION_NAME, InvalidName, validate_name
from tracewire.url import parse_url

__all__ = ["FORMAT", "VERSION", "MAX_FILE", "MAX_CHANNELS", "MAX_EVENTS", "SavedChannel", "SavedSession",
           "SavedSessionError", "parse", "dumps", "file_name", "from_mapping"]

FORMAT = "tracewire-session"
VERSION = 1
MAX_FILE = 256 * 1024  # bytes of one saved session
MAX_CHANNELS = 256
MAX_EVENTS = 1024  # event patterns per channel
MAX_PATH = 4096
_CREATED = re.compile(r"\d{8}T\d{6}\Z")
_MODES = ("normal", "snapshot", "live")


class SavedSessionError(ValueError):
    """A saved session that cannot be loaded: the text is one line naming
    the field and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class SavedChannel:
    name: str
    subbuf_size: int = ops.DEFAULT_SUBBUF_SIZE
    num_subbuf: int = ops.DEFAULT_NUM_SUBBUF
    overwrite: bool = False
    switch_timer_ms: int = 0
    blocking_timeout_ms: int = 0  # ops.BLOCK_FOREVER ("inf" in the file): for ever
    tracefile_size: int = 0
    tracefile_count: int = 0
    events: tuple[str, ...] = ()
    # ``enable-event --loglevel/--loglevel-only`` rules: (pattern, level, only),
    # each pattern one of ``events``.
    loglevels: tuple[tuple[str, int, bool], ...] = ()


@dataclass(frozen=True, slots=True)
class SavedSession:
    name: str
    created: str = ""  # "" : not known (a new stamp is taken)
    output: str | None = None
    url: str | None = None
    compress: ops.Compression = ops.Compression.ZSTD
    compress_level: int = ops.DEFAULT_COMPRESS_LEVEL
    spool_size: int = ops.DEFAULT_SPOOL_SIZE
    auth_key_file: str | None = None
    tls_ca: str | None = None
    snapshot: bool = False
    live_timer_us: int = 0
    rotation_timer_ms: int = 0
    rotation_size: int = 0
    started: bool = False
    channels: tuple[SavedChannel, ...] = field(default_factory=tuple)

    # ------------------------------------------------ the requests that rebuild it
    def create_request(self) -> ops.CreateRequest:
        return ops.CreateRequest(
            name=self.name, output=self.output, url=self.url, compress=self.compress,
            compress_level=self.compress_level, spool_size=self.spool_size, auth_key_file=self.auth_key_file,
            tls_ca=self.tls_ca, snapshot=self.snapshot, live_timer_us=self.live_timer_us)

    def channel_request(self, ch: SavedChannel) -> ops.EnableChannelRequest:
        return ops.EnableChannelRequest(
            session=self.name, channel=ch.name, subbuf_size=ch.subbuf_size, num_subbuf=ch.num_subbuf,
            overwrite=ch.overwrite, discard=not ch.overwrite, switch_timer_ms=ch.switch_timer_ms,
            blocking_timeout_ms=ch.blocking_timeout_ms, tracefile_size=ch.tracefile_size,
            tracefile_count=ch.tracefile_count)

    def event_requests(self) -> list[ops.EnableEventRequest]:
        out = []
        for ch in self.channels:
            rules = {p: (level, only) for p, level, only in ch.loglevels}
            for p in ch.events:
                level, only = rules.get(p, (None, False))
                out.append(ops.EnableEventRequest(pattern=p, session=self.name, channel=ch.name,
                                                  loglevel=level, loglevel_only=only))
        return out

    def rotation_request(self) -> ops.EnableRotationRequest | None:
        if not (self.rotation_timer_ms or self.rotation_size):
            return None
        return ops.EnableRotationRequest(session=self.name, timer_ms=self.rotation_timer_ms,
                                         size=self.rotation_size)


def file_name(name: str) -> str:
    """The file a session is saved to in a directory (LTTng: ``NAME.lttng``)."""
    return f"{name}.json"


def _channel_obj(c: SavedChannel) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "name": c.name, "subbuf_size": c.subbuf_size, "num_subbuf": c.num_subbuf,
        "mode": "overwrite" if c.overwrite else "discard", "switch_timer_ms": c.switch_timer_ms,
        "blocking_timeout_ms": "inf" if c.blocking_timeout_ms == ops.BLOCK_FOREVER else c.blocking_timeout_ms,
        "tracefile_size": c.tracefile_size, "tracefile_count": c.tracefile_count, "events": list(c.events)}
    if c.loglevels:  # as `list --json` shows them: pattern -> {level, only}
        obj["loglevels"] = {p: {"level": level, "only": only} for p, level, only in c.loglevels}
    return obj


def dumps(s: SavedSession) -> str:
    """The file's text (indented, one trailing newline)."""
    sink: dict[str, Any]
    if s.url:
        sink = {"url": s.url, "compress": s.compress.value, "compress_level": s.compress_level,
                "spool_size": s.spool_size, "auth_key_file": s.auth_key_file, "tls_ca": s.tls_ca}
    else:
        sink = {"output": s.output}
    obj = {
        "format": FORMAT, "version": VERSION, "name": s.name, "created": s.created, "sink": sink,
        "mode": "snapshot" if s.snapshot else "live" if s.live_timer_us else "normal",
        "live_timer_us": s.live_timer_us,
        "rotation": {"timer_ms": s.rotation_timer_ms, "size": s.rotation_size},
        "channels": [_channel_obj(c) for c in s.channels],
        "started": s.started,
    }
    return json.dumps(obj, indent=2) + "\n"


# ------------------------------------------------------------------ parsing
class _Fields:
    """One JSON object being read: each field taken once, unknown ones refused."""

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise SavedSessionError(f"{where or 'the file'}: must be a JSON object")
        self.obj: dict[str, Any] = obj
        self.where = where
        self.taken: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, default: Any = None, required: bool = False) -> Any:
        self.taken.add(key)
        if key not in self.obj or self.obj[key] is None:
            if required:
                raise SavedSessionError(f"{self.path(key)}: missing")
            return default
        return self.obj[key]

    def integer(self, key: str, default: int, low: int = 0, high: int = 2**62) -> int:
        v = self.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise SavedSessionError(f"{self.path(key)}: must be an integer from {low} to {high}, not {_short(v)}")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise SavedSessionError(f"{self.path(key)}: must be true or false, not {_short(v)}")
        return v

    def string(self, key: str, default: str | None = None, required: bool = False,
            limit: int = MAX_PATH) -> str | None:
        v = self.get(key, default, required)
        if v is None:
            return None
        if not isinstance(v, str) or not 0 < len(v) <= limit or "\0" in v:
            raise SavedSessionError(f"{self.path(key)}: must be a string of 1 to {limit} characters, not {_short(v)}")
        return v

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        v = self.get(key, default)
        if v not in allowed:
            raise SavedSessionError(f"{self.path(key)}: must be one of {', '.join(allowed)}, not {_short(v)}")
        return str(v)

    def done(self) -> None:
        unknown = sorted(k for k in self.obj if k not in self.taken)
        if unknown:
            raise SavedSessionError(f"{self.path(unknown[0])}: unknown field")


def _short(v: object) -> str:
    return ops.short_repr(v)


def _abs_path(f: _Fields, key: str) -> str | None:
    v = f.string(key)
    if v is not None and not v.startswith("/"):
        raise SavedSessionError(f"{f.path(key)}: must be an absolute path, not {_short(v)}")
    return v


def _checked(where: str, build: Any) -> Any:
    """``build()``, with a request's own range check told as the field's."""
    try:
        return build()
    except ops.MessageError as exc:
        raise SavedSessionError(f"{where}: {exc}") from None


def _channel(obj: object, where: str) -> SavedChannel:
    f = _Fields(obj, where)
    name = f.string("name", required=True, limit=1024)
    assert name is not None
    try:
        validate_name(name, "channel name", MAX_SESSION_NAME)
    except InvalidName as exc:
        raise SavedSessionError(f"{f.path('name')}: {exc}") from None
    subbuf = f.integer("subbuf_size", ops.DEFAULT_SUBBUF_SIZE, 4096, 2**32)
    if subbuf & (subbuf - 1):
        raise SavedSessionError(f"{f.path('subbuf_size')}: must be a power of two, not {subbuf}")
    num = f.integer("num_subbuf", ops.DEFAULT_NUM_SUBBUF, 2, 1024)
    overwrite = f.choice("mode", "discard", ("discard", "overwrite")) == "overwrite"
    timer = f.integer("switch_timer_ms", 0, 0, 2**31)
    raw_block = f.get("blocking_timeout_ms", 0)
    block = ops.BLOCK_FOREVER if raw_block == "inf" else f.integer("blocking_timeout_ms", 0, 0, 2**31)
    tf_size = f.integer("tracefile_size", 0, 0, 2**62)
    tf_count = f.integer("tracefile_count", 0, 0, 2**62)
    events = f.get("events", [])
    if not isinstance(events, list) or len(events) > MAX_EVENTS:
        raise SavedSessionError(f"{f.path('events')}: must be a list of at most {MAX_EVENTS} patterns")
    for i, p in enumerate(events):
        if not isinstance(p, str):
            raise SavedSessionError(f"{f.path('events')}[{i}]: must be a string, not {_short(p)}")
        _checked(f"{f.path('events')}[{i}]", lambda p=p: ops.EnableEventRequest(pattern=p))
    if len(set(events)) != len(events):
        raise SavedSessionError(f"{f.path('events')}: a pattern is given twice")
    loglevels = _loglevels(f, events)
    f.done()
    ch = SavedChannel(name, subbuf, num, overwrite, timer, block, tf_size, tf_count, tuple(events), loglevels)
    _checked(where, lambda: SavedSession(name="x").channel_request(ch))
    return ch


def _loglevels(f: _Fields, events: list[str]) -> tuple[tuple[str, int, bool], ...]:
    """A channel's ``loglevels``: {pattern: {"level": N, "only": bool}}, each
    pattern one of its ``events``."""
    raw = f.get("loglevels", {})
    where = f.path("loglevels")
    if not isinstance(raw, dict):
        raise SavedSessionError(f"{where}: must be an object (pattern: {{level, only}})")
    out = []
    for p, rule in raw.items():
        if p not in events:
            raise SavedSessionError(f"{where}: {_short(p)} is not one of the channel's events")
        r = _Fields(rule, f"{where}[{p!r}]")
        level = r.integer("level", 0, 0, 2**31 - 1)
        if "level" not in rule:
            raise SavedSessionError(f"{r.path('level')}: missing")
        only = r.boolean("only", False)
        r.done()
        out.append((p, level, only))
    return tuple(out)


def parse(text: str | bytes) -> SavedSession:
    """A saved session from the file's text.

    Raises:
        SavedSessionError: not JSON, not a saved session of a known version,
            or a field missing, of the wrong type or out of range.
    """
    if len(text) > MAX_FILE:
        raise SavedSessionError(f"the file is larger than {MAX_FILE} bytes: not a saved session")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise SavedSessionError(f"not JSON: {exc}") from None
    f = _Fields(obj, "")
    if f.get("format") != FORMAT:
        raise SavedSessionError(f"format: must be {FORMAT!r}: not a tracewire saved session")
    version = f.get("version")
    if version != VERSION:
        raise SavedSessionError(f"version: {_short(version)} is not a version this tracewire reads "
                                f"(it reads {VERSION})")
    name = f.string("name", required=True, limit=1024)
    assert name is not None
    try:
        validate_name(name, "session name", MAX_SESSION_NAME)
    except InvalidName as exc:
        raise SavedSessionError(f"name: {exc}") from None
    created = f.get("created", "")
    if not isinstance(created, str) or (created and not _CREATED.match(created)):
        raise SavedSessionError(f"created: must be a stamp like 20261202T183000, not {_short(created)}")

    sink = _Fields(f.get("sink", required=True), "sink")
    output = _abs_path(sink, "output")
    url = sink.string("url")
    if (output is None) == (url is None):
        raise SavedSessionError("sink: give either output (a directory) or url (a relay)")
    compress = ops.Compression(sink.choice("compress", "zstd", tuple(c.value for c in ops.Compression)))
    level = sink.integer("compress_level", ops.DEFAULT_COMPRESS_LEVEL, 1, 22)
    spool = sink.integer("spool_size", ops.DEFAULT_SPOOL_SIZE, ops.MIN_SPOOL_SIZE, 2**48)
    key = _abs_path(sink, "auth_key_file")
    ca = _abs_path(sink, "tls_ca")
    if output is not None and any(sink.obj.get(k) is not None for k in
                                  ("compress", "compress_level", "spool_size", "auth_key_file", "tls_ca")):
        raise SavedSessionError("sink: compression, spool, auth key and TLS options belong to a url sink")
    sink.done()
    if url is not None:
        try:
            url = str(parse_url(url))
        except ValueError as exc:
            raise SavedSessionError(f"sink.url: {exc}") from None

    mode = f.choice("mode", "normal", _MODES)
    live = f.integer("live_timer_us", 0, 0, ops.MAX_LIVE_TIMER_US)
    if mode == "live" and not live:
        live = ops.DEFAULT_LIVE_TIMER_US
    if live and live < ops.MIN_LIVE_TIMER_US:
        raise SavedSessionError(f"live_timer_us: must be an integer from {ops.MIN_LIVE_TIMER_US} to "
                                f"{ops.MAX_LIVE_TIMER_US}, not {live}")
    if mode != "live" and live:
        raise SavedSessionError(f"live_timer_us: only a live session has one (mode is {mode!r})")
    if mode == "live" and url is None:
        raise SavedSessionError("mode: a live session streams to a relay: the sink needs a url")

    rot = _Fields(f.get("rotation", {}), "rotation")
    rot_timer = rot.integer("timer_ms", 0, 0, 2**40)
    rot_size = rot.integer("size", 0, 0, 2**60)
    rot.done()
    if (rot_timer or rot_size) and mode != "normal":
        raise SavedSessionError(f"rotation: a {mode} session is not rotated")

    raw_channels = f.get("channels", [])
    if not isinstance(raw_channels, list) or len(raw_channels) > MAX_CHANNELS:
        raise SavedSessionError(f"channels: must be a list of at most {MAX_CHANNELS} channels")
    channels = tuple(_channel(c, f"channels[{i}]") for i, c in enumerate(raw_channels))
    names = [c.name for c in channels]
    if len(set(names)) != len(names):
        raise SavedSessionError("channels: a channel name is given twice")
    if mode != "snapshot" and any(c.overwrite for c in channels):
        raise SavedSessionError("channels: overwrite channels belong to snapshot sessions (mode \"snapshot\")")
    started = f.boolean("started", False)
    if started and not any(c.events for c in channels):
        raise SavedSessionError("started: a session without an enabled event cannot be started")
    f.done()
    saved = SavedSession(name, created, output, url, compress, level, spool, key, ca, mode == "snapshot", live,
                         rot_timer, rot_size, started, channels)
    _checked("the session", saved.create_request)
    return saved


def from_mapping(obj: Mapping[str, Any]) -> SavedSession:
    """:func:`parse` of an already decoded object (a reply of sessiond)."""
    return parse(json.dumps(obj))
