"""Live viewing end to end: tracewire-relayd's live port read by babeltrace2's
own lttng-live client (and by `tracewire view --follow`) while real daemons
trace tracewire-demo.  Viewers run on a pseudo-terminal (tests/liveview.py),
so their output arrives line by line.

No timing assertions: ordering ("printed before the app exited", "printed
while the other app was idle") and contents (exactly what an offline read
of the relay's output prints).  The event-to-print latency is measured and
printed, not asserted (bench/run.py --only live reports it).
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from liveview import LiveViewer, percentile
from test_security_e2e import Relay

from tracewire import ctf

from conftest import TW, _children, short_tmpdir

BT2 = shutil.which("babeltrace2")
pytestmark = pytest.mark.skipif(BT2 is None, reason="babeltrace2 is not installed")
HOST = "tgt1"


class LiveRelay(Relay):
    """A tracewire-relayd with its live port on loopback (both ports free
    ones), acknowledging without fsync."""

    def __init__(self, *extra: str) -> None:
        super().__init__("--no-fsync", *extra)
        m = re.search(r"live viewers on 127\.0\.0\.1:(\d+)", self.log.read_text(errors="replace"))
        assert m, self.log.read_text()
        self.live_port = int(m[1])

    def session_url(self, session: str, host: str = HOST) -> str:
        return f"net://127.0.0.1:{self.live_port}/host/{host}/{session}"


@pytest.fixture
def live_relay() -> Iterator:
    made: list[LiveRelay] = []

    def start(*extra: str) -> LiveRelay:
        r = LiveRelay(*extra)
        made.append(r)
        return r

    yield start
    for r in made:
        r.stop()


@pytest.fixture
def viewers() -> Iterator:
    made: list[LiveViewer] = []

    def start(argv: list[str], env: dict[str, str] | None = None) -> LiveViewer:
        v = LiveViewer(argv, env=env)
        made.append(v)
        return v

    yield start
    for v in made:
        v.close()


def bt_live(url: str) -> list[str]:
    assert BT2 is not None
    return [BT2, "-i", "lttng-live", url, "--clock-seconds"]


def offline(out: Path) -> list[str]:
    assert BT2 is not None
    r = subprocess.run([BT2, "--clock-seconds", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.splitlines()


def live_session(tw: TW, relay: LiveRelay, name: str = "s1", *extra: str, url: str | None = None) -> None:
    tw.env["TRACEWIRE_HOSTNAME"] = HOST
    tw.cli("create", name, "--live", "--url", url or f"tw://127.0.0.1:{relay.port}", *extra)
    tw.cli("enable-event", "demo:*")
    tw.cli("start")


def is_tick(line: str) -> bool:
    return " demo:tick: " in line


def report_latency(v: LiveViewer, what: str, since_ns: int) -> None:
    """Prints the latency of the events emitted once the viewer printed (the
    ones before waited for the viewer, not for the pipeline)."""
    lat = v.latencies_ms(since_ns)
    assert lat, "no event line carried a timestamp"
    print(f"{what}: {len(lat)} events, event->print latency p50 {percentile(lat, 0.5):.0f} ms, "
          f"p95 {percentile(lat, 0.95):.0f} ms", file=sys.stderr)


@pytest.mark.parametrize("compress", ["zstd"])  # the relay holds the packets decompressed: one codec is enough
def test_babeltrace2_follows_a_live_session_and_ends_after_destroy(tw, live_relay, viewers, compress):
    relay = live_relay()
    live_session(tw, relay, "s1", "--compress", compress)
    # 6 s of events: babeltrace2 has time to attach and print while they come,
    # even on a busy machine.
    app = tw.demo_popen("--events", "6000", "--rate", "1000", "--progress-every", "1000")
    assert app.stdout is not None
    assert app.stdout.readline().startswith("emitted 1000")  # the stream exists on the relay soon
    v = viewers(bt_live(relay.session_url("s1")))
    # Events are printed while the app still runs (it emits for 5 more seconds).
    assert v.wait_for(is_tick, 1, timeout=60), v.text_lines()[-5:]
    first_print = time.time_ns()
    printed_during_run = app.poll() is None
    app.communicate(timeout=120)
    assert app.returncode == 0
    assert printed_during_run, "babeltrace2 printed nothing while the app was running"
    tw.cli("destroy")
    assert v.wait(timeout=60) == 0  # ends by itself
    lines = [line for line in v.text_lines() if line]
    assert lines == offline(relay.out)
    assert sum(map(is_tick, lines)) == 6000
    report_latency(v, f"live {compress}", first_print)


def test_listing_shows_every_live_session_with_its_host(tw, make_tw, live_relay):
    relay = live_relay()
    live_session(tw, relay, "s1")
    other = make_tw()
    other.env["TRACEWIRE_HOSTNAME"] = "tgt2"
    other.cli("create", "s2", "--live", "--url", f"tw://127.0.0.1:{relay.port}")
    other.cli("enable-event", "demo:*")
    other.cli("start")
    # A session that is not live is not listed.
    third = make_tw()
    third.env["TRACEWIRE_HOSTNAME"] = "tgt3"
    third.cli("create", "s3", "--url", f"tw://127.0.0.1:{relay.port}")
    third.cli("enable-event", "demo:*")
    third.cli("start")
    for t in (tw, other, third):
        t.demo("--events", "10")
    assert BT2 is not None
    deadline = time.monotonic() + 60
    while True:
        r = subprocess.run([BT2, "-i", "lttng-live", f"net://127.0.0.1:{relay.live_port}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        if "/host/tgt2/s2" in r.stdout or time.monotonic() > deadline:
            break
    assert f"net://127.0.0.1:{relay.live_port}/host/{HOST}/s1 " in r.stdout, r.stdout
    assert f"net://127.0.0.1:{relay.live_port}/host/tgt2/s2 " in r.stdout, r.stdout
    assert "tgt3" not in r.stdout, r.stdout
    for t in (tw, other, third):
        t.cli("destroy")


def test_app_starting_after_attach_appears_and_an_idle_app_does_not_stall_the_others(tw, live_relay, viewers):
    relay = live_relay()
    live_session(tw, relay)
    # App A: one event now, the next 10 s later (idle in between).
    a = tw.demo_popen("--events", "2", "--rate", "0.1", "--progress-every", "1")
    assert a.stdout is not None
    assert a.stdout.readline().startswith("emitted 1")
    v = viewers(bt_live(relay.session_url("s1")))
    assert v.wait_for(is_tick, 1, timeout=60), v.text_lines()[-5:]  # A's first event
    # App B starts after the viewer attached: its streams appear, and its
    # events are printed while A is idle (A's stream keeps its time moving).
    b = tw.demo_popen("--events", "1000", "--rate", "1000")
    b.communicate(timeout=120)
    assert b.returncode == 0
    assert v.wait_for(is_tick, 1001, timeout=60), v.text_lines()[-5:]
    assert a.poll() is None, "A sent its second event before B's events were printed: no ordering shown"
    a.communicate(timeout=120)
    # B exited long ago: its stream was closed (StreamClose), so A's last
    # event is printed before the session ends, not held back by B's time.
    assert v.wait_for(is_tick, 1002, timeout=60), v.text_lines()[-5:]
    tw.cli("destroy")
    assert v.wait(timeout=60) == 0
    lines = [line for line in v.text_lines() if line]
    assert lines == offline(relay.out)
    assert sum(map(is_tick, lines)) == 1002
    stamps = [line[:22] for line in lines]
    assert stamps == sorted(stamps), "events not printed in time order"


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    d = Path(short_tmpdir("twlvtls"))
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_tls_session_is_viewable(tw, live_relay, viewers, certs):
    relay = live_relay("--tls-cert", str(certs / "cert.pem"), "--tls-key", str(certs / "key.pem"))
    live_session(tw, relay, "t1", "--tls-ca", str(certs / "ca.pem"), url=f"tws://localhost:{relay.port}")
    tw.demo("--events", "500")
    v = viewers(bt_live(relay.session_url("t1")))
    assert v.wait_for(is_tick, 500, timeout=60), v.text_lines()[-5:]
    tw.cli("destroy")
    assert v.wait(timeout=60) == 0
    assert [line for line in v.text_lines() if line] == offline(relay.out)


def _live_request(cmd: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", len(payload), cmd, 0) + payload


def test_hostile_viewers_do_not_disturb_a_streaming_session(tw, live_relay):
    """A viewer that attaches and never reads its replies, viewers sending
    junk, and 100 idle connections, while a 1,000,000-event session streams
    at full speed: nothing is lost, the relay's memory stays within 100 MB
    of its idle size, and a good viewer follows the session to its end."""
    n = 1_000_000
    relay = live_relay("--live-send-timeout", "5")
    live_session(tw, relay)
    tw.demo("--events", "1000")  # the session exists on the relay: it can be attached
    rss0 = relay.rss_kib()
    peak = [rss0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.1):
            try:
                peak[0] = max(peak[0], relay.rss_kib())
            except OSError:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    hostile: list[socket.socket] = []
    live_out = relay.dir / "live.txt"
    with open(live_out, "wb") as out:
        good = subprocess.Popen(bt_live(relay.session_url("s1")), stdout=out, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL)
    try:
        # Never reads: connects, attaches, then asks for metadata over and over.
        s = socket.create_connection(("127.0.0.1", relay.live_port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(_live_request(1, struct.pack(">QIII", 2**64 - 1, 2, 4, 1)) + _live_request(8)
                  + _live_request(3, struct.pack(">QQI", 1, 0, 2)))
        hostile.append(s)
        for i in range(4):  # junk
            j = socket.create_connection(("127.0.0.1", relay.live_port), timeout=10)
            j.sendall([os.urandom(64), b"\xff" * 16, _live_request(4, b"\0" * 8),
                       struct.pack(">QII", 2**40, 1, 0)][i])
            hostile.append(j)
        for _ in range(100):  # idle
            hostile.append(socket.create_connection(("127.0.0.1", relay.live_port), timeout=10))
        app = tw.demo_popen("--events", str(n))
        try:
            s.setblocking(False)
            for _ in range(2000):  # requests whose replies it never reads
                s.send(_live_request(6, struct.pack(">Q", 1)))
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass
        app.communicate(timeout=600)
        assert app.returncode == 0
        assert re.search(r"discarded 0, unacked 0", tw.cli("stop").stdout + tw.cli("status").stdout)
        assert relay.proc.poll() is None
    finally:
        sampling.set()
        sampler.join(timeout=10)
        for h in hostile:
            h.close()
    print(f"relay RSS: idle {rss0 / 1024:.1f} MB, peak {peak[0] / 1024:.1f} MB", file=sys.stderr)
    assert peak[0] - rss0 < 100 * 1024, "relay memory grew past 100 MB"
    tw.cli("destroy")
    try:
        assert good.wait(timeout=600) == 0
    finally:
        if good.poll() is None:
            good.kill()
            good.wait()
    log = relay.log.read_text(errors="replace")
    assert len(re.findall(r"viewer#\d+ \S+: dropped: bad-", log)) == 4, log[-3000:]  # the junk, at once
    assert BT2 is not None
    offline_out = relay.dir / "offline.txt"
    with open(offline_out, "wb") as out:
        assert subprocess.run([BT2, "--clock-seconds", str(relay.out)], stdout=out, timeout=600).returncode == 0
    assert filecmp.cmp(live_out, offline_out, shallow=False), "the live viewer printed what an offline read does not"
    with open(live_out, "rb") as f:
        assert sum(1 for line in f if b" demo:tick: " in line) == n + 1000


def test_tracewire_view_follow_prints_what_babeltrace2_and_an_offline_view_print(tw, live_relay, viewers):
    relay = live_relay()
    live_session(tw, relay)
    a = tw.demo_popen("--events", "3000", "--rate", "1000", "--progress-every", "1000")
    assert a.stdout is not None
    assert a.stdout.readline().startswith("emitted 1000")
    url = relay.session_url("s1")
    ours = viewers([sys.executable, "-m", "tracewire", "view", "--follow", url], env=tw.env)
    theirs = viewers(bt_live(url))
    assert ours.wait_for(is_tick, 1, timeout=60), ours.text_lines()[-5:]
    printed_during_run = a.poll() is None
    b = tw.demo_popen("--events", "500")  # a second app, after attach
    a.communicate(timeout=120)
    b.communicate(timeout=120)
    assert printed_during_run, "tracewire view --follow printed nothing while the app was running"
    tw.cli("destroy")
    assert ours.wait(timeout=60) == 0
    assert theirs.wait(timeout=60) == 0
    lines = [line for line in ours.text_lines() if line]
    assert sum(map(is_tick, lines)) == 3500
    assert lines == tw.cli("view", str(relay.out)).stdout.splitlines()
    # The same events as babeltrace2 (whose lines are formatted its own way).
    bt = [line for line in theirs.text_lines() if line]
    assert [re.search(r"seq = (\d+)", x)[1] for x in lines] == [re.search(r"seq = (\d+)", x)[1] for x in bt]


def test_view_follow_refuses_clearly(tw, live_relay):
    relay = live_relay()
    r = tw.cli("view", "--follow", relay.session_url("nosuch"), check=False)
    assert r.returncode == 1 and "no live session 'nosuch' of host 'tgt1'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = tw.cli("view", "--follow", "http://x/y", check=False)
    assert r.returncode == 1 and "is not net://RELAY[:PORT]/host/HOST/SESSION" in r.stderr, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = tw.cli("view", "--follow", f"net://127.0.0.1:{port}/host/h/s", check=False)
    assert r.returncode == 1 and "cannot reach the relay's live port" in r.stderr, r.stderr


def test_a_snapshot_of_a_live_session_is_not_shown_live(tw, live_relay, viewers):
    relay = live_relay()
    live_session(tw, relay)
    app = tw.demo_popen("--events", "3000", "--rate", "1000", "--progress-every", "1000")
    assert app.stdout is not None
    assert app.stdout.readline().startswith("emitted 1000")
    tw.cli("snapshot", "record")  # what the rings hold now, as a trace of its own
    app.communicate(timeout=120)
    v = viewers(bt_live(relay.session_url("s1")))
    assert v.wait_for(is_tick, 3000, timeout=60), v.text_lines()[-5:]
    tw.cli("destroy")
    assert v.wait(timeout=60) == 0
    (snap,) = relay.out.rglob("snapshot-1-*")
    assert sum(map(is_tick, offline(snap))) > 0
    # The session's own trace only (read apart: babeltrace2 merges the
    # snapshot's copy, which has the same trace UUID, into the same streams).
    (own,) = (p for p in (snap.parent / "ust" / "pid").iterdir())
    assert [line for line in v.text_lines() if line] == offline(own)
    assert sum(map(is_tick, v.text_lines())) == 3000


def test_packets_larger_than_one_read_are_followed(tw, live_relay, viewers):
    """8 MiB sub-buffers filled at full speed: packets larger than what one
    GET_PACKET serves (4 MiB), read in pieces by both viewers."""
    relay = live_relay()
    tw.env["TRACEWIRE_HOSTNAME"] = HOST
    tw.cli("create", "s1", "--live", "--url", f"tw://127.0.0.1:{relay.port}")
    tw.cli("enable-channel", "big", "--subbuf-size", "8M", "--num-subbuf", "2")
    tw.cli("enable-event", "demo:*", "-c", "big")
    tw.cli("start")
    tw.demo("--events", "40000", "--payload-bytes", "256")  # 10 MB: a first packet of 8 MiB
    url = relay.session_url("s1")
    ours = viewers([sys.executable, "-m", "tracewire", "view", "--follow", url], env=tw.env)
    theirs = viewers(bt_live(url))
    assert ours.wait_for(is_tick, 40_000, timeout=300), ours.text_lines()[-3:]
    assert theirs.wait_for(is_tick, 40_000, timeout=300), theirs.text_lines()[-3:]
    tw.cli("destroy")
    assert ours.wait(timeout=60) == 0 and theirs.wait(timeout=60) == 0
    sizes = [e.packet_size // 8 for idx in relay.out.rglob("*.idx") for e in ctf.read_index(idx.read_bytes())]
    assert max(sizes) > 4 * 1024 * 1024, sizes
    assert [line for line in theirs.text_lines() if line] == offline(relay.out)
    assert [line for line in ours.text_lines() if line] == tw.cli("view", str(relay.out)).stdout.splitlines()


def test_viewers_end_when_the_target_vanishes(tw, live_relay, viewers):
    """sessiond and consumerd killed (SIGKILL: no SessionClose): once the
    target has been away for --live-orphan-timeout, the viewer ends by itself
    with everything the relay got."""
    relay = live_relay("--live-orphan-timeout", "1")
    live_session(tw, relay)
    tw.demo("--events", "100")
    v = viewers(bt_live(relay.session_url("s1")))
    assert v.wait_for(is_tick, 100, timeout=60), v.text_lines()[-5:]
    sessiond = tw.sessiond_pid()
    assert sessiond is not None
    pids = [sessiond, *_children(sessiond)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert v.wait(timeout=60) == 0
    assert [line for line in v.text_lines() if line] == offline(relay.out)
