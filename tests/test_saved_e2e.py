"""Saved sessions end to end, through the real CLI and daemons: ``save``,
sessiond SIGKILLed, ``tracewire-sessiond --load DIR``; and a relay session
killed mid-outage whose spooled packets reach the relay once a new sessiond
loads it (docs/reliability.md, "A sessiond killed with packets spooled").

Small event counts; every wait is on a condition with a generous deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_relay_e2e import (  # noqa: F401 (relayd: a fixture)
    bt2_seqs,
    check_once,
    ctf_seqs,
    needs_bt2,
    relayd,
)

from tracewire import ctf

from conftest import BIN_DIR, TW, _alive, _children, short_tmpdir

SESSIOND = os.path.join(BIN_DIR, "tracewire-sessiond")


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for c in _children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def kill9_sessiond(tw: TW) -> None:
    """SIGKILL sessiond and every process below it (consumerd, its spare,
    the zygote), and wait until they are gone."""
    sd = tw.sessiond_pid()
    assert sd is not None
    victims = [sd, *_descendants(sd)]
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in victims):
        assert time.monotonic() < deadline, "sessiond or a consumerd survived SIGKILL"
        time.sleep(0.02)


@pytest.fixture
def sessiond_load() -> Iterator:
    """Factory: ``sessiond_load(tw, DIR)`` starts ``tracewire-sessiond --load
    DIR`` in ``tw``'s run directory and waits until it answers; stopped at
    teardown."""
    started: list[tuple[subprocess.Popen, TW]] = []
    logs: list[str] = []

    def factory(tw: TW, directory: str) -> subprocess.Popen:
        log = os.path.join(short_tmpdir("twsdl"), "sessiond.log")
        logs.append(os.path.dirname(log))
        with open(log, "ab") as f:
            p = subprocess.Popen([SESSIOND, "--load", directory], env=tw.env, stdin=subprocess.DEVNULL,
                                 stdout=f, stderr=f, start_new_session=True)
        started.append((p, tw))
        deadline = time.monotonic() + 60
        while tw.cli("list", check=False).returncode != 0:
            assert p.poll() is None, Path(log).read_text()
            assert time.monotonic() < deadline, Path(log).read_text()
            time.sleep(0.05)
        p.log = log  # type: ignore[attr-defined]
        return p

    yield factory
    for p, tw in started:
        kids = _descendants(p.pid)
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)
        tw.daemons.discard(p.pid)
    for d in logs:
        subprocess.run(["rm", "-rf", d], check=False)


def _definition(text: str) -> dict:
    """A saved session without its creation stamp (a new one for a new session)."""
    obj = json.loads(text)
    obj.pop("created")
    return obj


def test_save_kill9_load_round_trip(tw: TW, out_dir: Path, sessiond_load) -> None:
    """``save``, sessiond SIGKILLed, ``sessiond --load``: the session is back
    with the same channels, events, schedule and state, and traces."""
    saved = Path(short_tmpdir("twsv"))
    try:
        tw.cli("create", "rt", "--output", str(out_dir))
        tw.cli("enable-channel", "c1", "--subbuf-size", "8k", "--num-subbuf", "4", "--switch-timer", "100",
               "--blocking-timeout", "inf", "--tracefile-size", "64k", "--tracefile-count", "3")
        tw.cli("enable-channel", "c2", "--subbuf-size", "16k")
        tw.cli("enable-event", "demo:*", "-c", "c1")
        tw.cli("enable-event", "other:thing", "-c", "c2")
        tw.cli("enable-rotation", "--timer", "10m")
        tw.cli("start")
        before = tw.cli("list").stdout
        out = tw.cli("save", "rt", "--output", str(saved)).stdout
        assert "Session rt saved to" in out, out
        text = (saved / "rt.json").read_text()
        assert oct((saved / "rt.json").stat().st_mode & 0o777) == "0o600"
        r = tw.cli("save", "rt", "--output", str(saved), check=False)
        assert r.returncode == 1 and "exists (give --force to overwrite it)" in r.stderr, r.stderr
        bad = saved / "bad.txt"
        bad.write_text(text.replace('"output": "/', '"output": "'))
        r = tw.cli("load", str(bad), check=False)
        assert r.returncode == 1 and r.stderr.strip() == f"Error: {bad}: sink.output: must be an absolute path, " \
            f"not {str(out_dir).lstrip('/')!r}", r.stderr
        bad.unlink()

        kill9_sessiond(tw)
        sd = sessiond_load(tw, str(saved))

        after = tw.cli("list").stdout
        # The same definition, state and all: only the trace directory's stamp is new.
        strip = lambda s: [ln.split(" -> ")[0] for ln in s.splitlines()]  # noqa: E731
        assert strip(after) == strip(before), (before, after)
        assert "[started]" in after
        again = tw.cli("save", "rt", "--output", str(saved / "again.json")).stdout
        assert "saved" in again
        assert _definition((saved / "again.json").read_text()) == _definition(text)

        # It traces: an app started now is recorded in the loaded session.
        tw.demo("--events", "50")
        tw.cli("stop")
        seqs = [e.fields["seq"] for e in ctf.read_trace(out_dir) if isinstance(e, ctf.Event)
                and e.name == "demo:tick"]
        check_once(seqs, 50, "tracewire.ctf")
        assert "loaded for uid" in Path(sd.log).read_text()  # type: ignore[attr-defined]
    finally:
        subprocess.run(["rm", "-rf", str(saved)], check=False)


@needs_bt2
def test_relay_session_killed_mid_outage_resumes_its_spool(tw: TW, relayd, sessiond_load) -> None:  # noqa: F811
    """Relay stopped, the app emits, sessiond and consumerd SIGKILLed, relay
    restarted, sessiond restarted with --load: every spooled packet reaches
    the relay, every seq exactly once."""
    n = 300
    saved = Path(short_tmpdir("twsv"))
    try:
        relay = relayd()
        tw.env["TRACEWIRE_HOSTNAME"] = "outage"
        tw.cli("create", "ou", "--url", relay.url)
        tw.cli("enable-channel", "channel0", "--subbuf-size", "4k", "--num-subbuf", "8")
        tw.cli("enable-event", "demo:*")
        tw.cli("start")
        tw.cli("save", "--output", str(saved))
        relay.stop()

        tw.demo("--events", str(n), "--payload-bytes", "64")
        # The rings drained into the spool; the relay is down, so the stop's
        # wait for its acknowledgement gives up and says what is kept.
        r = tw.cli("stop", "--timeout", "1", check=False)
        assert r.returncode != 0 and "held on the target, 0 sub-buffers unread" in r.stderr, r.stdout + r.stderr
        spool = Path(tw.rundir) / "spool"
        assert any(spool.rglob("*.0")), list(spool.rglob("*"))
        kill9_sessiond(tw)

        relay.start(port=relay.port)
        sd = sessiond_load(tw, str(saved))
        log = Path(sd.log).read_text()  # type: ignore[attr-defined]
        assert "resuming 1 streams of 1 traces" in log, log
        # status shows the stream it resumes (its app is gone: no ring, only
        # the spool), with the packets it delivers.
        streams = json.loads(tw.cli("status", "--json").stdout)["streams"]
        assert [(s["producer"], s["path"].rsplit("/", 1)[-1]) for s in streams] == [("gone", "channel0_0")], streams
        assert streams[0]["packets"] > 0 and streams[0]["raw_bytes"] > 0, streams
        # The loaded session was saved started: its stop waits for the relay.
        tw.cli("stop")
        streams = json.loads(tw.cli("status", "--json").stdout)["streams"]
        assert [s["unacked"] for s in streams] == [0], streams
        check_once(bt2_seqs(relay.output), n, "babeltrace2")
        seqs, discarded = ctf_seqs(relay.output)
        check_once(seqs, n, "tracewire.ctf")
        assert discarded == 0
        tw.cli("destroy")
        assert not list((Path(tw.rundir) / "resume").iterdir())
    finally:
        subprocess.run(["rm", "-rf", str(saved)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as other users")
def test_root_load_dir_makes_each_session_for_its_file_owner(tw: TW, sessiond_load) -> None:
    """Root's ``--load DIR``: a file makes a session for its owner (root, or
    a 'tracing' member); a file of a user outside the group, one its group
    may write, a symbolic link and a broken file are each one log line, and
    the others still load."""
    from test_users import USER_IN_GROUP, USER_OUTSIDE, _ensure_user

    if subprocess.run(["getent", "group", "tracing"], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "tracing"], check=True, timeout=30)
    uid_in = _ensure_user(USER_IN_GROUP, "tracing")
    uid_out = _ensure_user(USER_OUTSIDE, None)
    d = Path(short_tmpdir("twsv"))
    try:
        d.chmod(0o755)

        def put(name: str, uid: int, mode: int = 0o600) -> Path:
            p = d / f"{name}.json"
            p.write_text(json.dumps({"format": "tracewire-session", "version": 1, "name": name,
                                     "sink": {"output": f"/tmp/{name}"},
                                     "channels": [{"name": "channel0", "events": ["demo:*"]}]}))
            os.chown(p, uid, -1)
            p.chmod(mode)
            return p

        put("byroot", 0)
        put("bymember", uid_in)
        put("byoutsider", uid_out)
        put("groupwritable", 0, 0o620)
        (d / "link.json").symlink_to(put("target", 0).name)
        (d / "broken.json").write_text('{"format": "tracewire-session", "version": 1, "name": "x", "sink": {}}')
        (d / "broken.json").chmod(0o600)

        sd = sessiond_load(tw, str(d))
        log = Path(sd.log).read_text()  # type: ignore[attr-defined]
        assert "session byroot loaded for uid 0" in log, log
        assert f"session bymember loaded for uid {uid_in}" in log, log
        assert "byoutsider.json: not loaded: its owner twtest2 is not in the 'tracing' group" in log, log
        assert "groupwritable.json: not loaded: its group or others may write it" in log, log
        assert "link.json: not loaded: cannot open it" in log, log
        assert "broken.json: not loaded: sink: give either output" in log, log
        names = tw.cli("list").stdout
        assert all(n in names for n in ("byroot", "bymember", "target")), names
        assert not any(n in names for n in ("byoutsider", "groupwritable", "broken")), names
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)
