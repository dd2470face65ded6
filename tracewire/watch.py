"""``tracewire status --watch``: per-stream rates, refreshed.

Theory of operation
-------------------
``status`` answers with counters that only grow (events, raw and wire
bytes, discarded events) and with levels (unacknowledged packets,
sub-buffers unread in the ring, the producer's state).  A watch asks for
``status`` every interval and turns two answers into rates: a counter's
difference divided by the time between the two answers (measured here, on
the monotonic clock).  Streams are matched by their key; a stream seen for
the first time, or whose counter went back (a session destroyed and made
again under the same name), has no rate yet (``None``, shown as ``-``).

The refresh is drawn three ways, by :func:`watch`'s ``mode``:

* ``table``: stdout is a terminal; the screen is redrawn in place with plain
  ANSI control sequences (cursor home, clear to the end of the screen), one
  row per stream, cut to the terminal's width and height;
* ``lines``: stdout is a file or a pipe; one block of plain lines per
  refresh, each block headed by its UTC time;
* ``json``: one JSON object per line per refresh (``--json``), with the
  counters, the rates per second and the session's totals.

Everything but :func:`watch` (which sleeps and asks) is a pure function of
its arguments, tested without a sessiond.  This module is imported only by
``status --watch``: the other verbs do not pay for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["COUNTERS", "Refresh", "Sample", "compute", "render_json", "render_lines", "render_table", "watch"]

# The counters that become rates: (status key, rate key in --json).
COUNTERS: tuple[tuple[str, str], ...] = (
    ("events", "events_per_s"),
    ("raw_bytes", "raw_bytes_per_s"),
    ("wire_bytes", "wire_bytes_per_s"),
    ("discarded", "discarded_per_s"),
)
_LEVELS = ("unacked", "unacked_bytes", "ring_unread")
# ANSI: cursor to the top left, clear to the end of the screen; hide and show the cursor.
HOME_CLEAR = "\x1b[H\x1b[J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"


@dataclass(frozen=True, slots=True)
class Sample:
    """One ``status`` answer and when it arrived (monotonic seconds, and
    the wall clock for people)."""

    at: float
    wall: datetime
    reply: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Refresh:
    """What one refresh shows: the session, each stream with its rates, and
    the totals.  ``interval`` is None on the first refresh (no rates yet)."""

    wall: datetime
    interval: float | None
    session: Mapping[str, Any]
    streams: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)


def _num(value: Any) -> int:
    """A counter from the answer (anything not an int counts as 0)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def compute(prev: Sample | None, cur: Sample) -> Refresh:
    """The refresh for ``cur``, with rates against ``prev`` (None: first)."""
    dt = cur.at - prev.at if prev is not None and cur.at > prev.at else None
    before: dict[str, Mapping[str, Any]] = {}
    if prev is not None:
        before = {str(st.get("key")): st for st in prev.reply.get("streams", [])}
    streams = []
    totals: dict[str, Any] = {k: 0 for k, _ in COUNTERS} | dict.fromkeys(_LEVELS, 0)
    total_rates: dict[str, float | None] = {r: 0.0 if dt else None for _, r in COUNTERS}
    for st in cur.reply.get("streams", []):
        row: dict[str, Any] = {
            "key": st.get("key"), "path": st.get("path"), "channel": st.get("channel"),
            "producer": st.get("producer"), "error": st.get("error"), "relay": st.get("relay"),
        }
        old = before.get(str(st.get("key")))
        for key, rate in COUNTERS:
            now = _num(st.get(key))
            row[key] = now
            totals[key] += now
            value: float | None = None
            if dt and old is not None and now >= _num(old.get(key)):
                value = (now - _num(old.get(key))) / dt
                total_rates[rate] = (total_rates[rate] or 0.0) + value
            row[rate] = value
        for key in _LEVELS:
            row[key] = _num(st.get(key))
            totals[key] += row[key]
        streams.append(row)
    totals.update(total_rates)
    return Refresh(cur.wall, dt, cur.reply.get("session", {}), streams, totals)


# ------------------------------------------------------------------ rendering
def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _bytes_rate(value: float | None) -> str:
    """Bytes per second in SI units (``4.1 kB/s``, ``12.3 MB/s``)."""
    if value is None:
        return "-"
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B/s"


def _printable(text: Any) -> str:
    """A name from the answer, without anything a terminal would act on."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def _when(wall: datetime) -> str:
    return wall.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _head(r: Refresh) -> str:
    s = r.session
    return f"{_printable(s.get('name'))} [{_printable(s.get('state'))}] -> {_printable(s.get('sink'))}"


def _totals_words(t: Mapping[str, Any]) -> str:
    return (f"{_rate(t['events_per_s'])} events/s, raw {_bytes_rate(t['raw_bytes_per_s'])}, "
            f"wire {_bytes_rate(t['wire_bytes_per_s'])}, {_rate(t['discarded_per_s'])} discarded/s; "
            f"backlog {t['unacked']} packets unacked, {t['ring_unread']} sub-buffers unread; "
            f"{t['events']} events, {t['discarded']} discarded")


_COLUMNS = (("EVENTS/S", 10), ("RAW", 10), ("WIRE", 10), ("DISC/S", 8), ("UNACKED", 7),
            ("UNREAD", 6), ("PRODUCER", 8))


def _row_cells(st: Mapping[str, Any]) -> list[str]:
    producer = "ERROR" if st.get("error") else str(st.get("producer"))
    return [_rate(st["events_per_s"]), _bytes_rate(st["raw_bytes_per_s"]), _bytes_rate(st["wire_bytes_per_s"]),
            _rate(st["discarded_per_s"]), str(st["unacked"]), str(st["ring_unread"]), _printable(producer)]


def _tail(text: str, room: int) -> str:
    """``text`` in ``room`` characters, cut at the start (a stream path's
    end names the app and the channel)."""
    return text if len(text) <= room else "..." + text[len(text) - room + 3:]


def render_table(r: Refresh, width: int = 120, height: int = 40) -> list[str]:
    """The screen of one refresh (stdout is a terminal): a header, the
    session's totals, one row per stream (the stream's path last, cut at
    its start to fit), every line at most
    ``width`` characters and at most ``height`` lines."""
    every = "" if r.interval is None else f", every {r.interval:.1f} s"
    lines = [f"{_head(r)}   {_when(r.wall)}{every}   (Ctrl-C ends)",
             f"total: {_totals_words(r.totals)}", ""]
    lines.append(" ".join(f"{name:>{w}}" for name, w in _COLUMNS) + " STREAM")
    room_for_path = max(12, width - sum(w + 1 for _n, w in _COLUMNS))
    rows = [" ".join(f"{cell:>{w}}" for cell, (_n, w) in zip(_row_cells(st), _COLUMNS, strict=True))
            + f" {_tail(_printable(st['path']), room_for_path)}" for st in r.streams]
    if not rows:
        rows = ["(no streams yet: no traced app has emitted an enabled event)"]
    room = max(1, height - len(lines) - 1)
    if len(rows) > room:
        rows = rows[: room - 1] + [f"... {len(rows) - room + 1} more streams (a taller terminal shows them)"]
    errors = [f"{_printable(st['path'])}: ERROR: {_printable(st['error'])}" for st in r.streams if st.get("error")]
    lines += rows
    if errors and len(lines) < height:
        lines += errors[: height - len(lines)]
    return [line[:width] for line in lines]


def render_lines(r: Refresh) -> list[str]:
    """One block of plain lines (stdout is not a terminal)."""
    lines = [f"{_when(r.wall)} {_head(r)}: {_totals_words(r.totals)}"]
    for st in r.streams:
        line = (f"  {_printable(st['path'])}: {_rate(st['events_per_s'])} events/s, "
                f"raw {_bytes_rate(st['raw_bytes_per_s'])}, wire {_bytes_rate(st['wire_bytes_per_s'])}, "
                f"{_rate(st['discarded_per_s'])} discarded/s, {st['unacked']} unacked, "
                f"{st['ring_unread']} sub-buffers unread, producer {_printable(st['producer'])}")
        if st.get("error"):
            line += f", ERROR: {_printable(st['error'])}"
        lines.append(line)
    return lines


def render_json(r: Refresh) -> str:
    """One refresh as one line of JSON (``status --watch --json``)."""
    return json.dumps({
        "time": _when(r.wall),
        "interval": r.interval,
        "session": {k: r.session.get(k) for k in ("name", "state", "sink")},
        "streams": r.streams,
        "totals": r.totals,
    }, separators=(",", ":"))


# ------------------------------------------------------------------ the loop
class SessionGone(Exception):
    """The watched session is no longer there (destroyed)."""


def watch(ask: Callable[[], Mapping[str, Any]], write: Callable[[str], None], interval: float, mode: str,
          size: Callable[[], tuple[int, int]] = lambda: (120, 40),
          sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
          refreshes: int | None = None) -> None:
    """Ask for ``status`` every ``interval`` seconds and write each refresh,
    until ``ask`` raises (:class:`SessionGone` for a destroyed session),
    the user interrupts, or after ``refreshes`` refreshes (None: no end).

    Args:
        ask: one ``status`` answer (``{"session": ..., "streams": [...]}``).
        write: where the text goes (already ending with its newlines).
        mode: ``table``, ``lines`` or ``json``.
        size: the terminal's (columns, lines), asked at every refresh.

    Raises:
        Whatever ``ask`` raises.
    """
    prev: Sample | None = None
    n = 0
    next_at = clock()
    while refreshes is None or n < refreshes:
        reply = ask()
        cur = Sample(clock(), datetime.now(UTC), reply)  # when the answer came
        r = compute(prev, cur)
        if mode == "json":
            write(render_json(r) + "\n")
        elif mode == "table":
            cols, rows = size()
            write(HOME_CLEAR + "\n".join(render_table(r, cols, rows)) + "\n")
        else:
            write("\n".join(render_lines(r)) + "\n")
        prev, n = cur, n + 1
        if refreshes is not None and n >= refreshes:
            break
        next_at = max(next_at + interval, clock())  # a slow answer delays, never bunches, the next
        sleep(max(0.0, next_at - clock()))

