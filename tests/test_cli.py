"""The ``tracewire`` CLI's failure contract, through the real executable: every
failure is one clear line on stderr and a non-zero exit, never a traceback;
and every command's --help works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import BIN_DIR, TW


def assert_one_line_error(r, exit_code: int, *fragments: str) -> str:
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert r.returncode == exit_code, (r.returncode, out)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {r.stderr!r}"
    line = lines[0]
    assert line.startswith("Error: ")
    for f in fragments:
        assert f in line, line
    return line


def assert_error_line(r, exit_code: int, *fragments: str) -> None:
    """Weaker: non-zero exit, no traceback, and one 'Error:' line saying it."""
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert r.returncode == exit_code, (r.returncode, out)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1, r.stderr
    for f in fragments:
        assert f in errors[0], errors[0]


@pytest.fixture
def session(tw: TW, out_dir) -> TW:
    """A sessiond with session s1 (created, not started)."""
    tw.cli("create", "s1", "--output", str(out_dir))
    return tw


NO_DAEMON_COMMANDS = [
    ["list"],
    ["list", "s1"],
    ["status"],
    ["status", "s1"],
    ["start"],
    ["start", "s1"],
    ["stop"],
    ["stop", "s1"],
    ["destroy"],
    ["destroy", "s1"],
    ["enable-event", "demo:*"],
    ["enable-event", "demo:*", "-s", "s1", "-c", "c"],
    ["enable-channel", "c"],
    ["enable-channel", "c", "-s", "s1", "--subbuf-size", "4k", "--num-subbuf", "2"],
]


@pytest.mark.parametrize("args", NO_DAEMON_COMMANDS, ids=lambda a: " ".join(a))
def test_no_sessiond_is_one_line_and_starts_none(tw: TW, args: list[str]) -> None:
    r = tw.cli(*args, check=False)
    assert_one_line_error(r, 3, "no tracewire-sessiond is running", tw.rundir)
    assert tw.sessiond_pid() is None
    assert not os.path.exists(os.path.join(tw.rundir, "control.sock"))
    assert not os.path.exists(os.path.join(tw.rundir, "sessiond.log"))


def test_no_sessiond_with_missing_rundir(make_tw) -> None:
    tw = make_tw()
    tw.env["TRACEWIRE_RUNDIR"] = os.path.join(tw.rundir, "does", "not", "exist")
    r = tw.cli("list", check=False)
    assert_one_line_error(r, 3, "no tracewire-sessiond is running")
    assert not os.path.exists(tw.env["TRACEWIRE_RUNDIR"])


def test_unknown_session(session: TW) -> None:
    for args in (["start", "nosuch"], ["stop", "nosuch"], ["status", "nosuch"], ["list", "nosuch"],
                 ["status", "nosuch", "--watch"], ["destroy", "nosuch"], ["enable-event", "demo:*", "-s", "nosuch"],
                 ["enable-channel", "c", "-s", "nosuch"]):
        r = session.cli(*args, check=False)
        assert_one_line_error(r, 1, "no session named 'nosuch'")


def test_duplicate_session_name(session: TW, out_dir) -> None:
    r = session.cli("create", "s1", "--output", str(out_dir), check=False)
    assert_one_line_error(r, 1, "session 's1' already exists")


def test_bad_session_name(session: TW, out_dir) -> None:
    r = session.cli("create", "a/b", "--output", str(out_dir), check=False)
    assert_one_line_error(r, 1, "'a/b'", "must not contain '/'")


def test_unknown_channel(session: TW) -> None:
    r = session.cli("enable-event", "demo:*", "-c", "nochan", check=False)
    assert_one_line_error(r, 1, "no channel named 'nochan'")


@pytest.mark.parametrize("size", ["3", "5000", "4095", "2k", "abc", "0"])
def test_bad_subbuf_size_is_refused(session: TW, size: str) -> None:
    r = session.cli("enable-channel", "c", "--subbuf-size", size, check=False)
    assert_error_line(r, 2, "--subbuf-size", repr(size))
    assert "channel c" not in session.cli("list", "s1").stdout


@pytest.mark.parametrize("value", ["-1", "soon", "1.5", "infinite", "", str(2**31 + 1)])
def test_bad_blocking_timeout_is_refused(session: TW, value: str) -> None:
    r = session.cli("enable-channel", "c", "--blocking-timeout", value, check=False)
    assert_one_line_error(r, 2, "--blocking-timeout", "milliseconds", "'inf'")
    assert "channel c" not in session.cli("list", "s1").stdout


@pytest.mark.parametrize("value,shown", [
    (None, "non-blocking"), ("0", "non-blocking"), ("250", "blocking (waits up to 250 ms)"),
    ("inf", "blocking (waits for ever)"), ("INF", "blocking (waits for ever)"),
])
def test_list_shows_the_blocking_timeout(session: TW, value: str | None, shown: str) -> None:
    extra = [] if value is None else ["--blocking-timeout", value]
    session.cli("enable-channel", "c", *extra)
    lines = [ln for ln in session.cli("list", "s1").stdout.splitlines() if "channel c:" in ln]
    assert len(lines) == 1 and lines[0].endswith(shown), lines


def test_blocking_timeout_help_explains_the_trade_off(tw: TW) -> None:
    out = " ".join(tw.cli("enable-channel", "--help").stdout.split())
    assert "--blocking-timeout MS|inf" in out
    for words in ("instead of dropping", "slowed down", "0: never wait"):
        assert words in out


@pytest.mark.parametrize("args", [
    ["enable-channel", "c", "--subbuf-size", "3"],
    ["enable-channel", "c", "--num-subbuf", "1"],
    ["view", "/nonexistent/trace"],
    ["stop", "--timeout", "0"],
    ["stop", "--timeout", "soon"],
    ["stop", "--timeout"],
    ["status", "--interval", "2"],
    ["status", "--watch", "--interval", "0.01"],
    ["list", "s1", "--apps"],
], ids=["subbuf-size-3", "num-subbuf-1", "view-missing", "stop-timeout-0", "stop-timeout-word", "stop-timeout-none",
        "interval-without-watch", "interval-too-short", "apps-and-session"])
def test_usage_errors_are_one_line(session: TW, args: list[str]) -> None:
    r = session.cli(*args, check=False)
    assert_one_line_error(r, 2)


def test_start_with_no_events(session: TW) -> None:
    r = session.cli("start", check=False)
    assert_one_line_error(r, 1, "session 's1' has no enabled event")
    assert "[created]" in session.cli("list").stdout


def test_start_twice(session: TW) -> None:
    session.cli("enable-event", "demo:*")
    session.cli("start")
    r = session.cli("start", check=False)
    assert_one_line_error(r, 1, "session 's1' is already started")


def test_stop_of_session_not_started(session: TW) -> None:
    r = session.cli("stop", check=False)
    assert_one_line_error(r, 1, "session 's1' is not started")
    session.cli("enable-event", "demo:*")
    session.cli("start")
    session.cli("stop")
    r = session.cli("stop", "s1", check=False)
    assert_one_line_error(r, 1, "session 's1' is not started")


def test_stop_timeout(session: TW) -> None:
    """'stop --timeout' is a per-stop bound: the help says what happens when
    it expires; one out of range for sessiond is one line; a stop that
    finishes in time is a plain stop."""
    out = session.cli("stop", "--help").stdout
    for words in ("--timeout SECONDS", "--stop-timeout", "120 s", "held on this machine", "again"):
        assert words in " ".join(out.split()), out
    session.cli("enable-event", "demo:*")
    session.cli("start")
    r = session.cli("stop", "--timeout", "2000000", check=False)
    assert_one_line_error(r, 1, "--timeout must be more than 0 and at most 1000000 seconds")
    assert "[started]" in session.cli("list").stdout
    session.demo("--events", "100")
    r = session.cli("stop", "s1", "--timeout", "30")
    assert r.stdout.startswith("Tracing stopped for session s1: ")
    assert "[stopped] ->" in session.cli("list").stdout
    r = session.cli("stop", "--timeout", "30", check=False)
    assert_one_line_error(r, 1, "session 's1' is not started")


def test_channel_after_start_is_refused(session: TW) -> None:
    session.cli("enable-event", "demo:*")
    session.cli("start")
    r = session.cli("enable-channel", "late", check=False)
    assert_one_line_error(r, 1, "has been started")


def test_no_current_session_after_destroy(session: TW) -> None:
    session.cli("destroy")
    r = session.cli("start", check=False)
    assert_one_line_error(r, 1, "no current session")
    assert "No sessions." in session.cli("list").stdout


def test_view_of_a_file(tw: TW, out_dir) -> None:
    f = out_dir / "plain.txt"
    f.write_text("hello\n")
    r = tw.cli("view", str(f), check=False)
    assert_one_line_error(r, 1, "not a directory")
    assert tw.sessiond_pid() is None  # view never needs (or starts) a sessiond


def test_view_of_garbage_metadata(tw: TW, out_dir) -> None:
    (out_dir / "metadata").write_text("this is not TSDL\n")
    (out_dir / "channel0_0").write_bytes(b"\x00" * 100)
    r = tw.cli("view", str(out_dir), check=False)
    assert_one_line_error(r, 1, "metadata")


def test_view_of_garbage_stream(tw: TW, out_dir) -> None:
    # A valid trace whose stream file is then damaged: a clear error, no traceback.
    tw.cli("create", "s1", "--output", str(out_dir))
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    tw.demo("--events", "100")
    tw.cli("stop")
    (stream,) = list(out_dir.rglob("channel0_0"))
    stream.write_bytes(stream.read_bytes()[:150])  # cut inside the first packet
    r = tw.cli("view", str(out_dir), check=False)
    assert_one_line_error(r, 1, "channel0_0")


def test_view_of_a_directory_without_trace(tw: TW, out_dir) -> None:
    (out_dir / "sub").mkdir()
    (out_dir / "sub" / "notes.txt").write_text("x\n")
    r = tw.cli("view", str(out_dir), check=False)
    assert_one_line_error(r, 1)


def test_snapshot_errors_are_one_line(tw: TW, out_dir) -> None:
    tw.cli("create", "s1", "--output", str(out_dir))
    r = tw.cli("snapshot", "record", check=False)
    assert_one_line_error(r, 1, "no ring buffer yet")
    r = tw.cli("snapshot", "record", "-s", "nope", check=False)
    assert_one_line_error(r, 1, "nope")
    r = tw.cli("snapshot", "record", "--max-size", "lots", check=False)
    assert_error_line(r, 2, "lots")
    r = tw.cli("enable-channel", "c", "--overwrite", "--discard", check=False)
    assert_one_line_error(r, 1, "not both")
    r = tw.cli("rotate", check=False)
    assert_one_line_error(r, 1, "has not been started")


CLI_COMMANDS = [[], ["create"], ["enable-channel"], ["enable-event"], ["start"], ["stop"], ["destroy"],
                ["list"], ["status"], ["snapshot"], ["snapshot", "record"], ["rotate"], ["view"],
                ["enable-rotation"], ["disable-rotation"]]


@pytest.mark.parametrize("cmd", CLI_COMMANDS, ids=lambda c: " ".join(c) or "tracewire")
def test_help_of_every_command(tw: TW, cmd: list[str]) -> None:
    for flag in ("--help", "-h"):
        r = tw.cli(*cmd, flag)
        assert r.returncode == 0
        assert r.stdout.startswith("Usage: tracewire")
        assert r.stderr == ""
    assert tw.sessiond_pid() is None


def test_top_level_help_lists_the_verbs(tw: TW) -> None:
    out = tw.cli("--help").stdout
    for verb in ("create", "enable-channel", "enable-event", "start", "stop", "destroy", "list",
                 "status", "snapshot", "rotate", "view"):
        assert verb in out


@pytest.mark.parametrize("exe", ["tracewire-sessiond", "tracewire-consumerd", "tracewire-relayd", "tracewire-demo"])
def test_help_of_every_executable(tw: TW, exe: str) -> None:
    if exe == "tracewire-relayd":
        import importlib.util

        if importlib.util.find_spec("relayd") is None:
            pytest.skip("relayd is not written yet")
    path = os.path.join(BIN_DIR, exe)
    assert os.path.exists(path), f"{exe} is not installed beside {sys.executable}"
    r = tw.run([path, "--help"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: ")
    assert "Traceback" not in r.stdout + r.stderr


PLANTED_LISTENER = """
import os, socket, sys
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(1)
print("ready", flush=True)
conn, _ = s.accept()
got = 0
while data := conn.recv(65536):
    got += len(data)
print(got, flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a listener as another user")
def test_cli_refuses_a_control_socket_served_by_another_user(tw: TW) -> None:
    """A control.sock planted by another user gets a one-line refusal and no request."""
    rundir = tw.rundir
    os.chmod(rundir, 0o777)  # only so that 'nobody' can bind its socket in it
    listener = subprocess.Popen([sys.executable, "-c", PLANTED_LISTENER, os.path.join(rundir, "control.sock")],
                                stdout=subprocess.PIPE, text=True)
    tw.procs.append(listener)
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == "ready"
    r = tw.cli("list", check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"Error: refusing the sessiond at {rundir}/control.sock: it runs as uid 65534, not as you or root"]
    out, _ = listener.communicate(timeout=30)
    assert out.strip() == "0"  # not one byte of the request reached it


def test_the_sessiond_the_cli_starts_never_imports_from_the_callers_directory(tw: TW, tmp_path) -> None:
    """``python -m`` puts the working directory first on sys.path: root
    typing 'tracewire create' in /tmp, where anyone may make a 'sessiond'
    package, must start the real sessiond, not run that package as root."""
    cwd = tmp_path / "anyones"
    (cwd / "sessiond").mkdir(parents=True)
    ran = tmp_path / "planted-code-ran"
    (cwd / "sessiond" / "__init__.py").write_text("")
    (cwd / "sessiond" / "__main__.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    r = subprocess.run([os.path.join(BIN_DIR, "tracewire"), "create", "s", "--output", str(tmp_path / "out")],
                       cwd=cwd, env=tw.env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    tw._note_daemon()
    assert not ran.exists()
    assert r.returncode == 0, r.stderr
    assert tw.sessiond_pid() is not None


# -- --tracefile-size / --tracefile-count (LTTng's names and rules)

@pytest.mark.parametrize("extra,shown", [
    ([], "one file per stream"),
    (["--tracefile-size", "1M"], "tracefile-size 1.0 MiB, tracefile-count unlimited"),
    (["--tracefile-size", "1M", "--tracefile-count", "4"], "tracefile-size 1.0 MiB, tracefile-count 4"),
    (["--subbuf-size", "64k", "--tracefile-size", "65536", "--tracefile-count", "1"],
     "tracefile-size 64.0 KiB, tracefile-count 1"),
    (["--tracefile-size", "300k", "--tracefile-count", "0"], "tracefile-size 300.0 KiB, tracefile-count unlimited"),
])
def test_list_shows_the_tracefile_limits(session: TW, extra: list[str], shown: str) -> None:
    session.cli("enable-channel", "c", *extra)
    lines = [ln for ln in session.cli("list", "s1").stdout.splitlines() if "channel c:" in ln]
    assert len(lines) == 1 and f", {shown}, " in lines[0], lines


@pytest.mark.parametrize("extra,fragments", [
    (["--tracefile-count", "4"], ("--tracefile-count needs --tracefile-size",)),
    (["--tracefile-size", "0", "--tracefile-count", "2"], ("--tracefile-count needs --tracefile-size",)),
    (["--tracefile-size", "128k"], ("--tracefile-size 128.0 KiB is smaller than the sub-buffer size 256.0 KiB",)),
    (["--subbuf-size", "64k", "--tracefile-size", "65535"], ("smaller than the sub-buffer size 64.0 KiB",)),
])
def test_bad_tracefile_limits_are_one_line(session: TW, extra: list[str], fragments: tuple[str, ...]) -> None:
    r = session.cli("enable-channel", "c", *extra, check=False)
    assert_one_line_error(r, 1, *fragments)
    assert "channel c" not in session.cli("list", "s1").stdout


@pytest.mark.parametrize("extra,option", [
    (["--tracefile-size", "1X"], "--tracefile-size"),
    (["--tracefile-size", "-1"], "--tracefile-size"),
    (["--tracefile-count", "-1"], "--tracefile-count"),
    (["--tracefile-count", "many"], "--tracefile-count"),
])
def test_unparsable_tracefile_limits_are_refused(session: TW, extra: list[str], option: str) -> None:
    r = session.cli("enable-channel", "c", *extra, check=False)
    assert_error_line(r, 2, option)


def test_tracefile_help(tw: TW) -> None:
    out = " ".join(tw.cli("enable-channel", "--help").stdout.split())
    for words in ("--tracefile-size SIZE", "--tracefile-count COUNT", "<channel>_<n>_<k>", "keep only the newest"):
        assert words in out


@pytest.mark.parametrize("first,second", [
    (["c", "--tracefile-size", "1M"], ["c_0"]),
    (["c_0"], ["c", "--tracefile-size", "1M"]),
])
def test_channels_that_would_share_stream_files_are_refused(session: TW, first: list[str],
                                                            second: list[str]) -> None:
    session.cli("enable-channel", *first)
    r = session.cli("enable-channel", *second, check=False)
    assert_one_line_error(r, 1, "channel 'c_0' would write c_0_0, a file of channel 'c'")
    session.cli("enable-channel", "c_1")  # no clash: c_1_0 is no file of c's


@pytest.mark.parametrize(("text", "ms"), [("500ms", 500), ("30s", 30_000), ("10m", 600_000), ("1h", 3_600_000),
                                          ("25000", 25), ("1.5s", 1500), (" 10M ", 600_000)])
def test_rotation_timer_periods(text: str, ms: int) -> None:
    from tracewire.cli import Period

    assert Period().convert(text, None, None) == ms


@pytest.mark.parametrize("text", ["", "ms", "10 parsecs", "-5s", "0s", "10d", "nan"])
def test_rotation_timer_refuses_what_is_not_a_period(text: str) -> None:
    import click

    from tracewire.cli import Period

    with pytest.raises(click.BadParameter):
        Period().convert(text, None, None)


@pytest.mark.parametrize(("args", "code", "fragments"), [
    (["--live"], 2, ("--live needs --url",)),
    (["--live", "--output", "/tmp/x"], 2, ("--live needs --url",)),
    (["--live", "--snapshot", "--url", "tw://127.0.0.1:1"], 2, ("--live or --snapshot",)),
    (["--live=5", "--url", "tw://127.0.0.1:1"], 2, ("at least 10000 microseconds",)),
    (["--live=99999999999", "--url", "tw://127.0.0.1:1"], 2, ("--live",)),
])
def test_bad_live_sessions_are_one_line(tw: TW, args: list[str], code: int, fragments: tuple[str, ...]) -> None:
    r = tw.cli("create", "s1", *args, check=False)
    assert_one_line_error(r, code, *fragments)


def test_a_live_session_runs_its_channels_on_the_live_timer(tw: TW) -> None:
    tw.cli("create", "s1", "--live", "--url", "tw://127.0.0.1:1")
    tw.cli("enable-channel", "fast", "--switch-timer", "20")
    tw.cli("enable-channel", "slow", "--switch-timer", "5000")
    tw.cli("enable-event", "demo:*")
    out = tw.cli("list", "s1").stdout
    assert "(live, timer 100000 us)" in out, out
    assert "channel fast: discard, 4 x 256.0 KiB, switch timer 20 ms" in out, out
    assert "channel slow: discard, 4 x 256.0 KiB, switch timer 100 ms" in out, out  # at most the live timer
    assert "channel channel0: discard, 4 x 256.0 KiB, switch timer 100 ms" in out, out
    tw.cli("create", "s2", "--live=250000", "--url", "tw://127.0.0.1:1")
    assert "(live, timer 250000 us)" in tw.cli("list", "s2").stdout
    for verb in (["enable-rotation", "-s", "s2", "--timer", "10s"], ["rotate", "s2"]):
        assert_one_line_error(tw.cli(*verb, check=False), 1, "is a live session")
