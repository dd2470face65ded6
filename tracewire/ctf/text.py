"""Events as lines of text, in the spirit of babeltrace2's text sink."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from tracewire.ctf.declarations import FieldValue
from tracewire.ctf.stream_reader import Discarded, Event, item_time

__all__ = ["format_event"]

_ESCAPES: Mapping[str, str] = MappingProxyType(
    {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
)


def _fmt_str(s: str) -> str:
    """``s`` double-quoted, with backslash escapes for quotes and controls."""
    out = []
    for ch in s:
        e = _ESCAPES.get(ch)
        if e is not None:
            out.append(e)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _fmt_value(v: FieldValue | bytearray) -> str:
    """One field value as :func:`format_event` prints it."""
    if isinstance(v, str):
        return _fmt_str(v)
    if isinstance(v, (bytes, bytearray)):
        return "<" + bytes(v).hex(" ") + ">"
    return repr(v) if isinstance(v, float) else str(v)


def _fmt_clock(ns: int) -> str:
    """``HH:MM:SS.nnnnnnnnn`` (UTC time of day) of ``ns`` since the Epoch."""
    secs, frac = divmod(ns, 1_000_000_000)
    return f"{secs // 3600 % 24:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{frac:09d}"


def format_event(ev: Event | Discarded, prev: Event | Discarded | None = None) -> str:
    """Format an item as one line of text, in the spirit of babeltrace2's text sink.

    Format::

        [HH:MM:SS.nnnnnnnnn] (+S.nnnnnnnnn) hostname provider:event: { seq = 1, msg = "hello" }

    * the time is the event's absolute time in UTC (time of day only);
    * the delta is from ``prev`` (``+?.?????????`` without it, as babeltrace2
      prints for the first event);
    * fields in declaration order: ints in decimal, floats with ``repr``,
      strings double-quoted with ``\\"``, ``\\\\``, ``\\n``, ``\\t``, ``\\r``
      and ``\\xHH`` escapes, bytes as hex pairs in angle brackets
      (``<01 ab>``, ``<>`` when empty); no fields gives ``{ }``;
    * a Discarded item gives ``[time] (+delta) !!! N events discarded in STREAM``.

    Args:
        ev: The item to format.
        prev: The previous item printed, for the delta.

    Returns:
        The line, without a trailing newline.
    """
    t = item_time(ev)
    if prev is None:
        delta = "+?.?????????"
    else:
        d = t - item_time(prev)
        sign = "+" if d >= 0 else "-"
        s, ns = divmod(abs(d), 1_000_000_000)
        delta = f"{sign}{s}.{ns:09d}"
    head = f"[{_fmt_clock(t)}] ({delta})"
    if isinstance(ev, Discarded):
        return f"{head} !!! {ev.count} events discarded in {ev.stream}"
    body = ", ".join(f"{k} = {_fmt_value(v)}" for k, v in ev.fields.items())
    host = f" {ev.hostname}" if ev.hostname else ""
    return f"{head}{host} {ev.name}: {{ {body} }}" if body else f"{head}{host} {ev.name}: {{ }}"
