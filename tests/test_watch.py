"""``status --watch``'s rates and its three renderings (tracewire.watch), no
daemon: answers are made up, the clock and the sleep are the test's."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tracewire import watch as w

WALL = datetime(2026, 12, 2, 18, 0, 0, tzinfo=UTC)


def stream(key: str, **counters: Any) -> dict[str, Any]:
    base = {"key": key, "path": f"/t/ust/{key}/channel0_0", "channel": "channel0", "producer": "alive",
            "events": 0, "raw_bytes": 0, "wire_bytes": 0, "discarded": 0, "unacked": 0, "unacked_bytes": 0,
            "ring_unread": 0, "error": None, "relay": None}
    return base | counters


def answer(*streams: dict[str, Any]) -> dict[str, Any]:
    return {"session": {"name": "s1", "state": "started", "sink": "/t"}, "streams": list(streams)}


def sample(at: float, *streams: dict[str, Any]) -> w.Sample:
    return w.Sample(at, WALL, answer(*streams))


def test_rates_are_counter_differences_over_the_time_between_answers() -> None:
    prev = sample(10.0, stream("a", events=100, raw_bytes=4000, wire_bytes=1000, discarded=5),
                  stream("b", events=7))
    cur = sample(12.0, stream("a", events=300, raw_bytes=10000, wire_bytes=1500, discarded=9, unacked=3,
                              ring_unread=2), stream("b", events=7))
    r = w.compute(prev, cur)
    assert r.interval == 2.0
    a, b = r.streams
    assert (a["events_per_s"], a["raw_bytes_per_s"], a["wire_bytes_per_s"], a["discarded_per_s"]) == \
        (100.0, 3000.0, 250.0, 2.0)
    assert (a["unacked"], a["ring_unread"]) == (3, 2)
    assert b["events_per_s"] == 0.0
    t = r.totals
    assert (t["events"], t["events_per_s"], t["raw_bytes_per_s"], t["unacked"], t["ring_unread"]) == \
        (307, 100.0, 3000.0, 3, 2)


def test_no_rate_on_the_first_answer_for_a_new_stream_or_after_a_reset() -> None:
    first = w.compute(None, sample(1.0, stream("a", events=50)))
    assert first.interval is None
    assert first.streams[0]["events_per_s"] is None and first.totals["events_per_s"] is None
    prev = sample(1.0, stream("a", events=50))
    # "a" went back (the session was made again under its name), "n" is new.
    r = w.compute(prev, sample(2.0, stream("a", events=10), stream("n", events=99)))
    assert [s["events_per_s"] for s in r.streams] == [None, None]
    assert r.totals["events_per_s"] == 0.0
    # Answers from a peer are not trusted to be numbers.
    junk = w.compute(prev, sample(2.0, stream("a", events="lots", raw_bytes=True, unacked=None)))
    assert junk.streams[0]["events"] == 0 and junk.streams[0]["unacked"] == 0


def test_table_fits_the_terminal_and_names_what_it_leaves_out() -> None:
    prev = sample(0.0, *[stream(f"s{i}", events=0) for i in range(30)])
    cur = sample(1.0, *[stream(f"s{i}", events=1500, raw_bytes=2_500_000, path="/x" * 200) for i in range(30)])
    lines = w.render_table(w.compute(prev, cur), width=80, height=12)
    assert len(lines) <= 12 and all(len(line) <= 80 for line in lines)
    assert "1500.0" in lines[4] and "2.5 MB/s" in lines[4]
    assert lines[4].endswith("/x/x") and "..." in lines[4]  # the path is cut at its start
    assert "more streams" in lines[-1]
    empty = w.render_table(w.compute(None, sample(0.0)), 80, 24)
    assert any("no streams yet" in line for line in empty)


def test_names_from_the_answer_cannot_drive_the_terminal() -> None:
    evil = stream("a", path="/t/\x1b[2J\x07x", producer="alive\x1b]0;pwned\x07", error="bad\x1b[31m")
    r = w.compute(None, sample(0.0, evil))
    text = "\n".join(w.render_table(r) + w.render_lines(r))
    assert "\x1b" not in text and "\x07" not in text


def test_plain_lines_are_one_timestamped_block_per_refresh() -> None:
    r = w.compute(sample(0.0, stream("a")), sample(0.5, stream("a", events=50, unacked=4)))
    lines = w.render_lines(r)
    assert lines[0].startswith("2026-12-02T18:00:00Z s1 [started]")
    assert "100.0 events/s" in lines[1] and "4 unacked" in lines[1] and "producer alive" in lines[1]


def test_json_line_has_stable_keys() -> None:
    r = w.compute(sample(0.0, stream("a")), sample(1.0, stream("a", events=5)))
    doc = json.loads(w.render_json(r))
    assert set(doc) == {"time", "interval", "session", "streams", "totals"}
    assert set(doc["session"]) == {"name", "state", "sink"}
    keys = {"key", "path", "channel", "producer", "error", "relay", "events", "raw_bytes", "wire_bytes",
            "discarded", "unacked", "unacked_bytes", "ring_unread", "events_per_s", "raw_bytes_per_s",
            "wire_bytes_per_s", "discarded_per_s"}
    assert set(doc["streams"][0]) == keys
    assert set(doc["totals"]) == keys - {"key", "path", "channel", "producer", "error", "relay"}
    assert doc["streams"][0]["events_per_s"] == 5.0


class Fake:
    """A clock that moves only when slept on, and answers in sequence."""

    def __init__(self, answers: list[Any]) -> None:
        self.now = 100.0
        self.answers = answers
        self.slept: list[float] = []
        self.out: list[str] = []

    def ask(self) -> dict[str, Any]:
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        self.now += 0.25  # the answer takes a while: the next one is still one interval after the last
        return a

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


@pytest.mark.parametrize("mode", ["table", "lines", "json"])
def test_watch_refreshes_every_interval_until_the_session_is_gone(mode: str) -> None:
    f = Fake([answer(stream("a", events=i * 10)) for i in range(3)] + [w.SessionGone("s1")])
    with pytest.raises(w.SessionGone):
        w.watch(f.ask, f.out.append, 1.0, mode, lambda: (100, 30), f.sleep, lambda: f.now)
    assert len(f.out) == 3
    assert f.slept == [0.75, 0.75, 0.75]
    if mode == "json":
        assert [json.loads(line)["totals"]["events_per_s"] for line in f.out] == [None, 10.0, 10.0]
    elif mode == "table":
        assert all(o.startswith(w.HOME_CLEAR) for o in f.out) and "10.0" in f.out[1]
    else:
        assert "10.0 events/s" in f.out[2]
