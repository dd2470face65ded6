"""End to end, blocking channels (``enable-channel --blocking-timeout``): the
real CLI, sessiond, consumerd and tracewire-demo at full speed into a tiny ring
(2 x 4 KiB).  With ``--blocking-timeout inf`` the app waits for the consumer
and nothing is lost, to a local directory or through a loopback relay; the
same ring without blocking discards (so the lossless check can fail).  An app
waiting for ever on a consumer that cannot drain does not hang ``stop`` or
``destroy``, and its wait ends with the session.

Robust on a loaded 2-core machine: generous deadlines, no timing assertions.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_local_e2e import bt2_python_counts, read_back, status_discarded, stream_files
from test_relay_e2e import (  # noqa: F401  (relayd: a fixture)
    Relay,
    bt2_seqs,
    check_once,
    consumerd_pid,
    ctf_seqs,
    demo_with_consumerd_stopped,
    needs_bt2,
    relayd,
    socket_closed_port,
)

from conftest import TW

EVENTS = 50_000
TINY = ["--subbuf-size", "4k", "--num-subbuf", "2"]


def _session(tw: TW, *create: str, blocking: str | None) -> None:
    tw.cli("create", "s1", *create)
    extra = ["--blocking-timeout", blocking] if blocking is not None else []
    tw.cli("enable-channel", "c", *TINY, *extra)
    tw.cli("enable-event", "demo:*", "-c", "c")
    tw.cli("start")


@pytest.mark.parametrize("blocking", ["inf", None])
def test_tiny_ring_local(tw: TW, out_dir: Path, blocking: str | None) -> None:
    _session(tw, "--output", str(out_dir), blocking=blocking)
    if blocking is None:
        # The control: a consumer that cannot drain makes this ring
        # overflow, so a check of "0 lost" can fail.
        demo_with_consumerd_stopped(tw, "--events", str(EVENTS))
    else:
        tw.demo("--events", str(EVENTS))
    stop = tw.cli("stop").stdout
    seqs, discarded = read_back(out_dir)
    assert len(stream_files(out_dir, "c")) == 1
    assert len(seqs) + discarded == EVENTS
    assert seqs == sorted(set(seqs))  # each once, in order
    assert status_discarded(tw) == discarded
    if blocking is None:
        assert discarded > 0 and "DISCARDED" in stop
        return
    assert discarded == 0 and "DISCARDED" not in stop
    assert seqs == list(range(EVENTS))
    counts = bt2_python_counts(out_dir)
    if counts is None:
        pytest.skip("no bt2 Python bindings under /usr/bin/python3: checked with tracewire.ctf only")
    assert counts == (EVENTS, 0, 0)


def _check_all_arrived(tw: TW, relay: Relay, stop: subprocess.CompletedProcess[str]) -> None:
    """After ``stop``, the relay holds every demo event once, none discarded,
    for babeltrace2 and for tracewire.ctf alike."""
    assert "DISCARDED" not in stop.stdout + stop.stderr
    assert status_discarded(tw) == 0
    check_once(bt2_seqs(relay.output), EVENTS, "babeltrace2")
    seqs, lost = ctf_seqs(relay.output)
    assert lost == 0
    check_once(seqs, EVENTS, "ctf.read_trace")


@needs_bt2
def test_tiny_ring_through_a_relay_loses_nothing(tw: TW, relayd) -> None:  # noqa: F811
    relay = relayd()
    tw.env["TRACEWIRE_HOSTNAME"] = "blockhost"
    _session(tw, "--url", relay.url, blocking="inf")
    tw.demo("--events", str(EVENTS))
    _check_all_arrived(tw, relay, tw.cli("stop"))


@needs_bt2
def test_consumerd_killed_while_the_app_waits_loses_nothing(tw: TW, relayd) -> None:  # noqa: F811
    """SIGKILL consumerd while the app streams at full speed into the tiny
    ring with --blocking-timeout inf: the app waits for the consumerd
    sessiond starts in its place (given the pipe again), which drains the
    ring; every event arrives once, none discarded."""
    relay = relayd()
    tw.env["TRACEWIRE_HOSTNAME"] = "killhost"
    _session(tw, "--url", relay.url, blocking="inf")
    app = tw.demo_popen("--events", str(EVENTS), "--progress-every", "1000")
    assert app.stdout is not None
    for line in app.stdout:
        m = re.fullmatch(r"emitted (\d+)\n", line)
        if m and int(m.group(1)) >= EVENTS // 3:
            break
    else:
        pytest.fail("the app ended before consumerd could be killed")
    killed = consumerd_pid(tw)
    os.kill(killed, signal.SIGKILL)
    _rest, err = app.communicate(timeout=300)
    assert app.returncode == 0, err
    _check_all_arrived(tw, relay, tw.cli("stop", timeout=120))


def _blocked_for_good(tw: TW, pid: int) -> bool:
    """The app's main thread sleeps in poll() (waiting for space) while
    both sub-buffers of its ring are unread (the sink has no room)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/wchan") as f:
            in_poll = "poll" in f.read()
    except OSError:
        return False
    return in_poll and "2 sub-buffers unread" in tw.cli("status").stdout


def test_waiting_app_does_not_hang_stop_or_destroy(tw: TW) -> None:
    """The relay is unreachable: consumerd spools up to --spool-size, then
    leaves the ring full, and an app blocking for ever waits.  A bounded
    stop fails as usual (the app's listener gives up waiting for its
    writer after sessiond's app stop timeout); destroy ends the app's wait
    (its stream is closed), and the app then runs to its end untraced."""
    with socket_closed_port() as port:
        tw.env["TRACEWIRE_HOSTNAME"] = "downhost"
        _session(tw, "--url", f"tw://127.0.0.1:{port}", "--spool-size", "1M", blocking="inf")
        # Log-like 1 KiB events (they compress about threefold): a few
        # thousand fill the 1 MiB spool and the ring, then the app waits.
        app = tw.demo_popen("--events", "200000", "--payload-bytes", "1000", "--payload-kind", "log")
        deadline = time.monotonic() + 120
        while not _blocked_for_good(tw, app.pid):
            assert app.poll() is None, "the app finished: it never had to wait"
            assert time.monotonic() < deadline, tw.cli("status").stdout
            time.sleep(0.2)
        stop = tw.cli("stop", "--timeout", "1", check=False, timeout=120)
        assert stop.returncode == 1, stop.stdout + stop.stderr
        assert "Traceback" not in stop.stderr and "relay unreachable" in stop.stderr, stop.stderr
        assert app.poll() is None, "the app finished while its ring was full"
        destroy = tw.cli("destroy", check=False, timeout=120)
        assert destroy.returncode == 0, destroy.stdout + destroy.stderr
        assert "lost" in destroy.stderr
        out, err = app.communicate(timeout=300)  # the wait ended with the session
        assert app.returncode == 0, err
        assert "emitted 200000 events" in out
