"""What a trace declares: field types, tracepoints (events) and the trace itself.

These are the values the writer turns into metadata text and the metadata
parser turns back into; every constructor validates its input, so a
declaration that exists is one the writer can write and the reader can read.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeAlias

from tracewire.ctf.layout import INT64_MAX, INT64_MIN

__all__ = [
    "MAX_FIELDS",
    "MAX_NAME",
    "PYTHON_FIELD_TYPES",
    "EventDecl",
    "FieldType",
    "FieldValue",
    "Fields",
    "TraceInfo",
]

#: Most fields one event may declare (the metadata parser's limit too).
MAX_FIELDS = 1024
#: Longest event, field and channel name.
MAX_NAME = 255

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+:[A-Za-z0-9_.:-]+\Z")
_CHANNEL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_DATETIME_RE = re.compile(r"\d{8}T\d{6}([+-]\d{4})?\Z")
#: Identifiers that are keywords in babeltrace2's TSDL lexer once a field
#: name gets its ``_`` prefix.
_TSDL_UNDERSCORE_KEYWORDS = frozenset({"Bool", "Complex", "Imaginary"})
_MAX_TEXT = 4096


class FieldType(enum.Enum):
    """Type of one tracepoint field and how it is encoded in an event."""

    INT = "int"  # int64, <q
    FLOAT = "float"  # double, <d
    STR = "str"  # UTF-8 then NUL
    BYTES = "bytes"  # <I length then bytes

    @classmethod
    def from_python(cls, t: type | FieldType) -> FieldType:
        """Return the field type for a Python type (``int``, ``float``, ``str``, ``bytes``).

        Args:
            t: A Python type, or a FieldType (returned unchanged).

        Returns:
            The matching FieldType.

        Raises:
            TypeError: ``t`` is not one of the four supported types.
        """
        if isinstance(t, FieldType):
            return t
        try:
            return PYTHON_FIELD_TYPES[t]
        except (KeyError, TypeError):
            raise TypeError(
                f"unsupported field type {t!r}; expected int, float, str or bytes"
            ) from None


#: Python type → FieldType (read-only).
PYTHON_FIELD_TYPES: Mapping[type, FieldType] = MappingProxyType(
    {int: FieldType.INT, float: FieldType.FLOAT, str: FieldType.STR, bytes: FieldType.BYTES}
)

#: An event's fields: ``(name, FieldType)`` pairs in payload order.
Fields: TypeAlias = tuple[tuple[str, FieldType], ...]
#: The value of one decoded field.
FieldValue: TypeAlias = int | float | str | bytes


def _check_field_name(fname: object, seen: set[str]) -> str:
    """Return ``fname`` if it may name a field not in ``seen``.

    Raises:
        ValueError: The name is not an ASCII identifier, too long, a TSDL
            keyword once prefixed, or already in ``seen``.
    """
    if not isinstance(fname, str) or not fname.isidentifier() or not fname.isascii():
        raise ValueError(f"field name {fname!r} is not an ASCII Python identifier")
    if len(fname) > MAX_NAME:
        raise ValueError(f"field name {fname[:32]!r}... longer than {MAX_NAME}")
    if fname in _TSDL_UNDERSCORE_KEYWORDS:
        raise ValueError(f"field name {fname!r} becomes the TSDL keyword _{fname}")
    if fname in seen:
        raise ValueError(f"duplicate field name {fname!r}")
    return fname


def _check_fields(fields: Any) -> Fields:  # Any: an unchecked constructor argument
    """Normalise and validate a field list (see :class:`EventDecl`).

    Raises:
        TypeError: ``fields`` is not a sequence of pairs, or a type is unsupported.
        ValueError: Too many fields, or a bad or duplicate name.
    """
    try:
        items = list(fields)
    except TypeError:
        raise TypeError(f"fields must be a sequence of (name, type) pairs, got {fields!r}") from None
    if len(items) > MAX_FIELDS:
        raise ValueError(f"too many fields: {len(items)} > {MAX_FIELDS}")
    out: list[tuple[str, FieldType]] = []
    seen: set[str] = set()
    for item in items:
        try:
            fname, ftype = item
        except (TypeError, ValueError):
            raise TypeError(f"field must be a (name, type) pair, got {item!r}") from None
        seen.add(_check_field_name(fname, seen))
        out.append((fname, FieldType.from_python(ftype)))
    # A bytes field "x" is preceded in metadata by a length field "__x_length",
    # i.e. the metadata name of a field called "_x_length".
    for fname, ftype in out:
        if ftype is FieldType.BYTES and f"_{fname}_length" in seen:
            raise ValueError(
                f"field name '_{fname}_length' clashes with the length of bytes field {fname!r}"
            )
    return tuple(out)


@dataclass(frozen=True, slots=True)
class EventDecl:
    """One tracepoint as declared in the metadata.

    Attributes:
        name: ``provider:event``, made of ``[A-Za-z0-9_.:-]``, at most 255 chars.
        id: Event class id, unique within its stream class (0 ≤ id < 2**32).
        fields: ``(name, FieldType)`` pairs in payload order. Names are
            unique ASCII Python identifiers. Python types (``int`` ...) are
            accepted and converted, lists are converted to tuples.
        stream_id: Stream class (channel position) the event belongs to.
        loglevel: LTTng log level (0 = EMERG ... 14 = DEBUG, 13 = DEBUG_LINE).

    Raises:
        ValueError: A name, id or field list is invalid.
        TypeError: A field is not a ``(str, type)`` pair.
    """

    name: str
    id: int
    fields: Fields = ()
    stream_id: int = 0
    loglevel: int = 13

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or len(self.name) > MAX_NAME or not _NAME_RE.match(self.name):
            raise ValueError(
                f"event name {self.name!r} must be 'provider:event' made of [A-Za-z0-9_.:-], "
                f"at most {MAX_NAME} characters"
            )
        for attr, hi in (("id", 1 << 32), ("stream_id", 1 << 32), ("loglevel", 15)):
            v = getattr(self, attr)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < hi:
                raise ValueError(f"event {self.name}: {attr} {v!r} not in 0..{hi - 1}")
        object.__setattr__(self, "fields", _check_fields(self.fields))


@dataclass(frozen=True, slots=True)
class TraceInfo:
    """Everything the metadata preamble says about one trace.

    Attributes:
        uuid: The trace's 16-byte UUID, also written in every packet header.
        hostname: Host the trace was recorded on.
        trace_name: Session name.
        creation_datetime: ``YYYYmmddTHHMMSS`` (optionally with ``+hhmm``).
        procname: Traced process name.
        vpid: Traced process id.
        clock_offset_ns: realtime minus monotonic at trace creation, in ns.
        channels: Channel names; stream class id = position.
        clock_uuid: UUID of the monotonic clock. ``None`` derives one from the
            hostname, so that traces from one host can be merged by
            babeltrace2 (its muxer requires equal clock UUIDs for
            non-absolute clocks), as LTTng does with the boot id.

    Raises:
        ValueError: A field is out of range or badly formed.
    """

    uuid: bytes
    hostname: str
    trace_name: str
    creation_datetime: str
    procname: str
    vpid: int
    clock_offset_ns: int
    channels: tuple[str, ...]
    clock_uuid: bytes | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.uuid, bytes) or len(self.uuid) != 16:
            raise ValueError(f"uuid must be 16 bytes, got {self.uuid!r}")
        if self.clock_uuid is not None and (
            not isinstance(self.clock_uuid, bytes) or len(self.clock_uuid) != 16
        ):
            raise ValueError(f"clock_uuid must be 16 bytes, got {self.clock_uuid!r}")
        for attr in ("hostname", "trace_name", "procname"):
            v = getattr(self, attr)
            if not isinstance(v, str) or len(v) > _MAX_TEXT:
                raise ValueError(f"{attr} must be a string of at most {_MAX_TEXT} characters")
        if not isinstance(self.creation_datetime, str) or not _DATETIME_RE.match(self.creation_datetime):
            raise ValueError(
                f"creation_datetime {self.creation_datetime!r} is not YYYYmmddTHHMMSS[+hhmm]"
            )
        if not isinstance(self.vpid, int) or not 0 <= self.vpid < 1 << 31:
            raise ValueError(f"vpid {self.vpid!r} out of range")
        if not isinstance(self.clock_offset_ns, int) or not INT64_MIN <= self.clock_offset_ns <= INT64_MAX:
            raise ValueError(f"clock_offset_ns {self.clock_offset_ns!r} is not an int64")
        object.__setattr__(self, "channels", _check_channels(self.channels))


def _check_channels(channels: Any) -> tuple[str, ...]:  # Any: an unchecked constructor argument
    """Return the channel names as a tuple.

    Raises:
        ValueError: No channel, a badly formed or a duplicate name.
    """
    names = tuple(channels)
    if not names:
        raise ValueError("a trace needs at least one channel")
    for ch in names:
        if not isinstance(ch, str) or len(ch) > MAX_NAME or not _CHANNEL_RE.match(ch):
            raise ValueError(f"channel name {ch!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]*")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate channel names in {names!r}")
    return names
