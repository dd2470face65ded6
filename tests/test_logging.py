"""Tests for the ``logging`` bridge (tracewire.logging): the I/O-free parts
(names, extra fields, level parsing, sessiond's --loglevel rules, the fast
path's semantics with a stand-in tracepoint), then one end-to-end run with
real daemons read back by babeltrace2."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import tracewire.logging as tl
from sessiond.model import Channel
from tracewire import _tracer, ops
from tracewire.cli import cli

from conftest import TW

BT2 = shutil.which("babeltrace2")


class FakeTracepoint:
    """Stands in for a declared log event: records what is emitted."""

    def __init__(self, name: str, fields: list[tuple[str, str]], level: int, consts: dict[str, Any]) -> None:
        self.name, self.fields, self.loglevel, self.consts = name, fields, level, consts
        self.enabled = True
        self.calls: list[tuple[Any, ...]] = []

    def emit(self, *args: Any) -> None:
        """Takes the fields that are not constants, as the real emitter;
        records every field's value, in field order."""
        given = iter(args)
        self.calls.append(tuple(self.consts[n] if n in self.consts else next(given) for n, _ in self.fields))
        assert next(given, given) is given, "more values than fields"


@pytest.fixture
def declared(monkeypatch) -> Iterator[list[FakeTracepoint]]:
    """Every log event the bridge declares (stand-ins, no sessiond), with
    the fast path installed for the test only."""
    made: list[FakeTracepoint] = []

    def fake(name: str, fields: list[tuple[str, str]], level: int, consts: dict[str, Any]) -> FakeTracepoint:
        assert set(consts) == {"level", "levelname"}
        tp = FakeTracepoint(name, fields, level, consts)
        made.append(tp)
        return tp

    monkeypatch.setattr(_tracer, "log_event", fake)
    tl.install()
    try:
        yield made
    finally:
        tl.uninstall()


@pytest.fixture
def lone_logger() -> Iterator[tuple[logging.Logger, tl.TracewireHandler]]:
    """A logger whose only handler is a bridge: made outside the manager's
    tree (no parent), where pytest's log capture (which adds its handlers
    to the root logger and to every non-propagating logger it knows) does
    not reach it."""
    lg = logging.Logger("tw.test.lone", logging.DEBUG)
    h = tl.TracewireHandler()
    lg.addHandler(h)
    yield lg, h


# ---------------------------------------------------------------- pure functions


def test_event_names_are_tracepoint_names():
    assert tl.event_name("app.db") == "python:app.db"
    assert tl.event_name("") == "python:root"
    assert tl.event_name("a b/c\u00e9") == "python:a_b_c_"
    assert len(tl.event_name("x" * 1000)) == 255


@pytest.mark.parametrize("text, level", [
    ("WARNING", 30), ("warning", 30), ("warn", 30), ("Info", 20), ("CRITICAL", 50), ("5", 5), (" 40 ", 40),
    ("NOTSET", 0), ("PYTHON_ERROR", 40), ("python_debug", 10), ("loud", None), ("-1", None),
    ("2147483648", None), ("", None),
])
def test_level_number(text: str, level: int | None):
    assert tl.level_number(text) == level


def test_extra_fields_typed_bounded_and_renamed():
    class Obj:
        def __str__(self) -> str:
            return "obj!"

    class Bad:
        def __str__(self) -> str:
            raise RuntimeError("no")

    fields, values = tl.extra_fields({
        "user": "ann", "ms": 3.5, "n": 7, "ok": True, "raw": b"\x00\x01", "big": 2**70, "o": Obj(),
        "bad": Bad(), "long": "x" * 5000, "msg": "shadow", "class": 1, "9lives": 9, "_p": 1, "a-b": 1, "a_b": 2,
        "blob": bytearray(5000),
    })
    got = dict(zip([n for n, _ in fields], zip([t for _, t in fields], values, strict=True), strict=True))
    assert got["user"] == ("str", "ann")
    assert got["ms"] == ("float", 3.5)
    assert got["n"] == ("int", 7) and got["ok"] == ("int", 1)
    assert got["raw"] == ("bytes", b"\x00\x01")
    assert got["big"] == ("str", str(2**70))
    assert got["o"] == ("str", "obj!")
    assert got["bad"] == ("str", "<unprintable Bad>")
    assert got["long"] == ("str", "x" * tl.MAX_VALUE)
    assert got["blob"] == ("bytes", bytes(tl.MAX_VALUE))
    assert got["extra_msg"] == ("str", "shadow")
    assert got["class_"] == ("int", 1)
    assert got["x9lives"] == ("int", 9) and got["x_p"] == ("int", 1)
    assert {got["a_b"][1], got["a_b_2"][1]} == {1, 2}
    assert all(n.isidentifier() and not n.startswith("_") for n, _ in fields)


def test_extra_fields_at_most_max_extra():
    fields, values = tl.extra_fields({f"k{i:03d}": i for i in range(100)})
    assert len(fields) == len(values) == tl.MAX_EXTRA
    assert [n for n, _ in fields] == [f"k{i:03d}" for i in range(tl.MAX_EXTRA)]


def test_enable_event_request_checks_its_level():
    assert ops.EnableEventRequest("python:*", loglevel=30, loglevel_only=True).loglevel == 30
    with pytest.raises(ops.MessageError, match="--loglevel"):
        ops.EnableEventRequest("python:*", loglevel=-1)
    with pytest.raises(ops.MessageError, match="needs a loglevel"):
        ops.EnableEventRequest("python:*", loglevel_only=True)
    req = ops.decode_request({"cmd": "enable_event", "pattern": "python:*", "loglevel": 40})
    assert isinstance(req, ops.EnableEventRequest) and req.loglevel == 40 and not req.loglevel_only
    with pytest.raises(ops.MessageError):
        ops.decode_request({"cmd": "enable_event", "pattern": "python:*", "loglevel": "40"})


def test_channel_loglevel_rules():
    ch = Channel("c", 0, patterns=["python:app*", "python:db", "demo:*"],
                 loglevels={"python:app*": (30, False), "python:db": (40, True)})
    assert ch.matches("python:app.x", 30) and ch.matches("python:app.x", 50)
    assert not ch.matches("python:app.x", 20)
    assert not ch.matches("python:app.x")  # a plain tracepoint has no level: not a log event
    assert ch.matches("python:db", 40) and not ch.matches("python:db", 50) and not ch.matches("python:db", 30)
    assert ch.matches("demo:tick") and ch.matches("demo:tick", 10)  # no level asked: every level
    assert not ch.matches("python:other", 50)


@pytest.mark.parametrize("decl, level", [
    ({"loglevel": 30}, 30), ({"loglevel": 0}, 0), ({}, None), ({"loglevel": -1}, None), ({"loglevel": 2**31}, None),
    ({"loglevel": True}, None), ({"loglevel": "30"}, None), ({"loglevel": 30.0}, None), ({"loglevel": [30]}, None),
])
def test_sessiond_takes_only_a_bounded_int_level_from_an_app(decl: dict[str, Any], level: int | None):
    from sessiond.apps import _ctf_loglevel, _loglevel

    assert _loglevel(decl) == level
    assert _ctf_loglevel(level) == {30: 4, 0: 14, None: 13}[level]


def test_cli_refuses_bad_levels_without_a_daemon(tmp_path):
    r = CliRunner().invoke(cli, ["--rundir", str(tmp_path), "enable-event", "--python", "app", "--loglevel", "loud"])
    assert r.exit_code == 2 and "'loud' is not a log level" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["--rundir", str(tmp_path), "enable-event", "x:y", "--loglevel", "INFO",
                                 "--loglevel-only", "INFO"])
    assert r.exit_code == 2 and "not both" in r.output


def test_registry_declares_one_log_event_per_level_and_fields(monkeypatch, tmp_path):
    monkeypatch.setenv("TRACEWIRE_RUNDIR", str(tmp_path))
    monkeypatch.setattr(_tracer._Registry, "_start_listener", lambda self: None)
    reg = _tracer._Registry()
    f = [("level", "int"), ("levelname", "str"), ("msg", "str")]
    a = reg.declare("python:app", f, 20)
    b = reg.declare("python:app", f, 30)
    c = reg.declare("python:app", [*f, ("user", "str")], 20)
    assert len({a.id, b.id, c.id}) == 3
    assert reg.declare("python:app", f, 20) is a
    assert reg._decl(b) == {"id": b.id, "name": "python:app", "fields": [list(x) for x in f], "loglevel": 30}
    assert "loglevel" not in reg._decl(reg.declare("demo:x", [("n", "int")]))
    assert not a.enabled


# ---------------------------------------------------------------- the fast path and the handler


def test_fast_path_emits_level_message_and_extras(declared, lone_logger):
    lg, h = lone_logger

    def no_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        raise AssertionError("the fast path made a LogRecord")

    lg.makeRecord = no_record  # type: ignore[method-assign]
    lg.info("request %d %s", 7, "path")
    lg.info("request %d %s", 8, "path")
    lg.warning("w %(a)s", {"a": "dict"}, extra={"user": "ann", "ms": 2.5})
    lg.log(25, "custom")
    lg.debug(12345)
    by = {(tp.loglevel, tuple(n for n, _ in tp.fields[3:])): tp for tp in declared}
    assert {tp.name for tp in declared} == {"python:tw.test.lone"}
    assert by[(20, ())].calls == [(20, "INFO", "request 7 path"), (20, "INFO", "request 8 path")]
    assert by[(30, ("ms", "user"))].calls == [(30, "WARNING", "w dict", 2.5, "ann")]
    assert by[(25, ())].calls == [(25, "Level 25", "custom")]
    assert by[(10, ())].calls == [(10, "DEBUG", "12345")]
    assert h.dropped == 0


def test_extras_in_any_order_share_a_log_event_and_a_huge_int_is_a_str(declared, lone_logger):
    lg, _h = lone_logger
    lg.info("a", extra={"n": 1, "u": "x"})
    lg.info("b", extra={"u": "y", "n": 2})
    lg.info("c", extra={"n": 2**70, "u": "z"})
    lg.info("d", extra={"n": 3, "u": "w"})
    assert [tp.fields[3:] for tp in declared] == [[("n", "int"), ("u", "str")], [("n", "str"), ("u", "str")]]
    assert declared[0].calls == [(20, "INFO", "a", 1, "x"), (20, "INFO", "b", 2, "y"), (20, "INFO", "d", 3, "w")]
    assert declared[1].calls == [(20, "INFO", "c", str(2**70), "z")]


def test_disabled_log_event_formats_nothing(declared, lone_logger):
    lg, _h = lone_logger

    class Loud:
        def __str__(self) -> str:
            raise AssertionError("formatted although no session records the event")

    lg.info("x")
    declared[0].enabled = False
    lg.info("%s", Loud())
    lg.info(Loud())
    assert declared[0].calls == [(20, "INFO", "x")]
    read: list[int] = []

    class Counted:
        def __str__(self) -> str:
            read.append(1)
            return "c"

    lg.info("y", extra={"o": Counted()})
    assert len(declared) == 2 and declared[1].fields[3:] == [("o", "str")] and len(read) == 1
    declared[1].enabled = False
    lg.info("y", extra={"o": Counted()})  # not enabled: the value is not read
    assert len(read) == 1 and declared[1].calls == [(20, "INFO", "y", "c")]


def test_handler_level_and_max_events(declared, lone_logger):
    lg, h = lone_logger
    h.setLevel(logging.WARNING)
    lg.info("below the handler's level")
    h.setLevel(logging.NOTSET)
    h.max_events = 2
    for i in range(5):
        lg.log(10 + i, "m")
    assert len(declared) == 2 and h.dropped == 3
    for i in range(100):  # extras that differ every time, say: nothing more is declared or remembered
        lg.info("m", extra={f"k{i}": i})
    assert len(declared) == 2 and h.dropped == 103
    assert sum(len(v) for v in h._plain.values()) + len(h._extra) == 2


def test_other_handlers_see_what_they_always_saw(declared):
    """With another handler in the chain the stock path runs: the record
    has the caller's file and line, filters and formatters apply, and the
    bridge records the same event."""
    lg = logging.getLogger("tw.test.mixed")
    out = io.StringIO()
    sh = logging.StreamHandler(out)
    sh.setFormatter(logging.Formatter("%(filename)s:%(lineno)d %(funcName)s %(levelname)s %(message)s %(user)s"))
    bridge = tl.TracewireHandler()
    lg.addHandler(sh)
    lg.addHandler(bridge)
    lg.propagate = False
    lg.setLevel(logging.INFO)
    try:
        line = sys._getframe().f_lineno + 1
        lg.info("hello %s", "you", extra={"user": "bob"})
        lg.warning("kw", stacklevel=1, extra={"user": "eve"})
        line2 = line + 1
        try:
            raise ValueError("boom")
        except ValueError:
            lg.exception("failed", extra={"user": "zed"})
    finally:
        lg.removeHandler(sh)
        lg.removeHandler(bridge)
        lg.propagate = True
        lg.setLevel(logging.NOTSET)
    printed = out.getvalue().splitlines()
    me = "test_other_handlers_see_what_they_always_saw"
    assert printed[0] == f"test_logging.py:{line} {me} INFO hello you bob"
    assert printed[1] == f"test_logging.py:{line2} {me} WARNING kw eve"
    calls = [c for tp in declared for c in tp.calls]
    assert (20, "INFO", "hello you", "bob") in calls
    assert (30, "WARNING", "kw", "eve") in calls
    err = [c for c in calls if c[0] == 40]
    assert len(err) == 1 and err[0][2].startswith("failed\nTraceback") and "ValueError: boom" in err[0][2]


def test_refused_extra_and_bad_format_behave_as_stock_logging(declared, lone_logger, capsys):
    lg, _h = lone_logger
    with pytest.raises(KeyError, match="Attempt to overwrite 'msg'"):
        lg.info("x", extra={"msg": 1})
    lg.info("%d", "not a number")  # logging prints "--- Logging error ---" and carries on
    assert "Logging error" in capsys.readouterr().err
    assert all(not tp.calls for tp in declared)


def test_uninstall_restores_stock_logging(declared):
    tl.uninstall()
    assert not hasattr(logging.Logger.info, "tracewire_stock")
    assert not hasattr(logging.Logger._log, "tracewire_stock")
    assert not [h for h in logging.getLogger().handlers if isinstance(h, tl.TracewireHandler)]


# ---------------------------------------------------------------- end to end

APP = r"""
import logging, sys
import tracewire.logging
tracewire.logging.install()
logging.getLogger().setLevel(logging.DEBUG)
app, other = logging.getLogger("app.web"), logging.getLogger("other")
n = int(sys.argv[1])
for i in range(n):
    app.debug("debug %d", i)
    app.info("request %d %s", i, "path", extra={"user": "ann", "ms": i / 2, "raw": b"\x01\x02", "obj": [i]})
    app.warning("slow %d", i)
    other.info("other info %d", i)
    other.error("other error %d", i)
    other.critical("other critical %d", i)
"""


@pytest.mark.skipif(BT2 is None, reason="babeltrace2 is not installed")
def test_logging_records_reach_babeltrace2_filtered_by_level(tw: TW, out_dir: Path):
    n = 100
    tw.cli("create", "s1", "--output", str(out_dir))
    tw.cli("enable-event", "--python", "app.*", "--loglevel", "INFO", "-s", "s1")
    tw.cli("enable-event", "python:other", "--loglevel-only", "ERROR", "-s", "s1")
    listed = tw.cli("list").stdout
    assert "event python:app.* (loglevel >= INFO (20))" in listed
    assert "event python:other (loglevel == ERROR (40))" in listed
    r = tw.cli("enable-event", "--python", "app.*", "--loglevel", "DEBUG", "-s", "s1", check=False)
    assert r.returncode != 0 and "already enabled" in r.stderr
    tw.cli("start", "s1")
    env = dict(tw.env, PYTHONPATH=str(Path(tl.__file__).resolve().parents[1]))  # this tree's tracewire
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(APP), str(n)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    tw.cli("stop", "s1")
    text = subprocess.run([BT2, str(out_dir)], capture_output=True, text=True, timeout=120, check=True).stdout
    lines = text.splitlines()
    info = [x for x in lines if "python:app.web:" in x and 'levelname = "INFO"' in x]
    warn = [x for x in lines if "python:app.web:" in x and 'levelname = "WARNING"' in x]
    other = [x for x in lines if "python:other:" in x]
    assert len(info) == len(warn) == len(other) == n
    assert len(lines) == 3 * n, "debug, other's info and critical are filtered in the app"
    assert 'level = 20, levelname = "INFO", msg = "request 7 path", ms = 3.5, obj = "[7]"' in "\n".join(info)
    assert 'raw = [ [0] = 0x1, [1] = 0x2 ], user = "ann" }' in info[0]
    assert all('level = 40, levelname = "ERROR", msg = "other error' in x for x in other)
    assert "DEBUG" not in text and "CRITICAL" not in text
    levels = subprocess.run([BT2, "--fields=loglevel", str(out_dir)], capture_output=True, text=True, timeout=120,
                            check=True).stdout.splitlines()
    assert sum("TRACE_ERR (3) python:other:" in x for x in levels) == n  # the metadata's level, LTTng's scale
    assert sum("TRACE_WARNING (4) python:app.web:" in x for x in levels) == n
