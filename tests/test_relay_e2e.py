"""End to end through the real CLI and daemons, relay sink: tracewire-relayd as
a subprocess on 127.0.0.1 (a free port: it listens on port 0 and the port is
read from its "listening" line), sessiond / consumerd started by the CLI in a
private TRACEWIRE_RUNDIR (tests/conftest.py), tracewire-demo as the traced app.
The relay's output is read back with babeltrace2 and tracewire.ctf.

Robust on a loaded 2-core machine: generous deadlines, no timing assertions.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracewire import ctf

from conftest import BIN_DIR, TW, _alive, _children, short_tmpdir

RELAYD = os.path.join(BIN_DIR, "tracewire-relayd")
BT2 = shutil.which("babeltrace2")
needs_bt2 = pytest.mark.skipif(BT2 is None, reason="babeltrace2 is not installed")

MILLION = 1_000_000
TS = r"\d{8}T\d{6}"


# ---------------------------------------------------------------- relay


class Relay:
    """A tracewire-relayd subprocess; stderr goes to a log file."""

    def __init__(self, output: Path, log: Path) -> None:
        self.output = output
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 60.0, port: int = 0) -> Relay:
        """Start it on ``port`` (0: a free one) and wait for its "listening"
        line (a restart appends to the same log: only new lines count)."""
        skip = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [RELAYD, "--output", str(self.output), "--listen", f"127.0.0.1:{port}",
                 "--live-listen", "127.0.0.1:0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"tracewire-relayd listening on 127\.0\.0\.1:(\d+)")
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                f.seek(skip)
                m = pattern.search(f.read().decode(errors="replace"))
            if m:
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"tracewire-relayd exited {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.05)
        pytest.fail(f"tracewire-relayd did not say 'listening' within {timeout:.0f} s:\n{self.log_tail()}")

    @property
    def url(self) -> str:
        return f"tw://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@pytest.fixture
def relayd() -> Iterator:
    """Factory: ``relayd()`` starts a relay writing to a fresh directory;
    every relay started is killed at teardown."""
    made: list[Relay] = []
    dirs: list[str] = []

    def factory() -> Relay:
        d = short_tmpdir("twrl")
        dirs.append(d)
        r = Relay(Path(d) / "out", Path(d) / "relayd.log")
        made.append(r)
        return r.start()

    yield factory
    for r in made:
        r.stop()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- helpers


def start_session(tw: TW, name: str, relay: Relay, hostname: str, *extra: str) -> None:
    tw.env["TRACEWIRE_HOSTNAME"] = hostname
    tw.cli("create", name, "--url", relay.url, *extra)
    tw.cli("enable-event", "demo:*")
    tw.cli("start")


def check_once(seqs, n: int, what: str) -> None:
    """Every seq 0..n-1 exactly once (and nothing else)."""
    seen = bytearray(n)
    extra = dup = 0
    count = 0
    for s in seqs:
        count += 1
        if not 0 <= s < n:
            extra += 1
        elif seen[s]:
            dup += 1
        else:
            seen[s] = 1
    missing = n - sum(seen)
    assert (count, missing, dup, extra) == (n, 0, 0, 0), (
        f"{what}: {count} events, {missing} seqs missing, {dup} duplicates, {extra} out of range"
    )


def ctf_seqs(path: Path) -> tuple[list[int], int]:
    """(seq of every demo:tick, total discarded) as tracewire.ctf reads them."""
    seqs: list[int] = []
    discarded = 0
    for item in ctf.read_trace(path):
        if isinstance(item, ctf.Discarded):
            discarded += item.count
        elif item.name == "demo:tick":
            seqs.append(item.fields["seq"])
    return seqs, discarded


_BT2_SEQ = re.compile(rb" demo:tick: \{[^}]*\}, \{ seq = (\d+),")


def bt2_seqs(path: Path) -> list[int]:
    """The seq of every demo:tick event in babeltrace2's text output (which
    must exit 0)."""
    assert BT2 is not None
    p = subprocess.Popen([BT2, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seqs: list[int] = []
    tail = b""
    assert p.stdout is not None
    while chunk := p.stdout.read(1 << 20):
        data = tail + chunk
        cut = data.rfind(b"\n") + 1
        seqs += map(int, _BT2_SEQ.findall(data, 0, cut))
        tail = data[cut:]
    seqs += map(int, _BT2_SEQ.findall(tail))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, f"babeltrace2 {path} exited {p.returncode}: {err.decode(errors='replace')[-2000:]}"
    return seqs


_STATUS = re.compile(
    r": (?:\d+ events, )?(\d+) packets, raw ([\d.]+ \w+), wire ([\d.]+ \w+) \(x([\d.]+)\), "
    r"discarded (\d+), unacked (\d+)"
)


def status_streams(tw: TW) -> list[tuple[int, str, str, float, int, int]]:
    """(packets, raw, wire, raw/wire, discarded, unacked) per stream line of
    ``tracewire status``."""
    out = tw.cli("status").stdout
    rows = [(int(m[1]), m[2], m[3], float(m[4]), int(m[5]), int(m[6])) for m in _STATUS.finditer(out)]
    assert rows, out
    return rows


def the_trace_dir(root: Path) -> Path:
    """The one trace directory (holding 'metadata') below ``root``."""
    found = [p.parent for p in root.rglob("metadata")]
    assert len(found) == 1, found
    return found[0]


def _maps_a_ring(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "/memfd:" in f.read()
    except OSError:
        return False


def consumerd_pid(tw: TW, timeout: float = 60.0, other_than: int | None = None) -> int:
    """The consumerd serving ``tw``'s session: the child of its sessiond that
    maps the session's ring buffers (sessiond may also keep a spare consumerd
    waiting, which maps none)."""
    sd = tw.sessiond_pid()
    assert sd is not None
    deadline = time.monotonic() + timeout
    kids: list[int] = []
    while time.monotonic() < deadline:
        kids = [c for c in _children(sd) if _alive(c) and c != other_than]
        active = [c for c in kids if _maps_a_ring(c)]
        if len(active) == 1:
            return active[0]
        time.sleep(0.05)
    pytest.fail(f"no single child of sessiond {sd} maps a ring buffer (children {kids})")


def demo_with_consumerd_stopped(tw: TW, *args: str) -> None:
    """Run ``tracewire-demo ARGS`` while the consumerd draining its ring is
    stopped (SIGSTOP), so that a small ring overflows whatever the machine's
    load (consumerd drains at real-time priority: at full speed alone it
    may keep up).  The app prints a line per event and blocks once the
    unread pipe is full, so it cannot finish before consumerd is stopped.
    consumerd maps the ring before the app has it (sessiond gives the app
    its stream once consumerd has taken it), so consumerd is stopped only
    once the app maps the ring too: stopped earlier, it could hold the
    app's stream back until the app has run to its end, tracing nothing."""
    app = tw.demo_popen(*args, "--progress-every", "1")
    paused = consumerd_pid(tw)
    deadline = time.monotonic() + 60
    while not _maps_a_ring(app.pid):
        assert app.poll() is None, "the app ended before it had its ring buffer"
        assert time.monotonic() < deadline, "the app has no ring buffer after 60 s"
        time.sleep(0.02)
    os.kill(paused, signal.SIGSTOP)
    try:
        _out, err = app.communicate(timeout=300)
    finally:
        os.kill(paused, signal.SIGCONT)
    assert app.returncode == 0, err


# ---------------------------------------------------------------- tests


@needs_bt2
@pytest.mark.parametrize("compress", ["zstd", "none"])
def test_million_events_through_the_relay(tw: TW, relayd, compress: str) -> None:
    relay = relayd()
    start_session(tw, "big", relay, "bighost", "--compress", compress)
    tw.demo("--events", str(MILLION))
    stop = tw.cli("stop")
    assert "DISCARDED" not in stop.stdout + stop.stderr, stop.stdout + stop.stderr
    rows = status_streams(tw)
    assert len(rows) == 1
    packets, raw, wire, ratio, discarded, unacked = rows[0]
    assert (discarded, unacked) == (0, 0), rows
    if compress == "zstd":
        assert ratio >= 2.0, f"zstd: raw {raw}, wire {wire} (x{ratio})"
    else:
        assert ratio <= 1.0, f"none: raw {raw}, wire {wire} (x{ratio})"

    check_once(bt2_seqs(relay.output), MILLION, "babeltrace2")
    seqs, lost = ctf_seqs(relay.output)
    assert lost == 0
    check_once(seqs, MILLION, "ctf.read_trace")
    # Index: one entry per packet, covering the stream file exactly.
    td = the_trace_dir(relay.output)
    entries = ctf.read_index((td / "index" / "channel0_0.idx").read_bytes())
    assert len(entries) == packets
    assert [e.packet_seq_num for e in entries] == list(range(packets))
    assert sum(e.packet_size for e in entries) // 8 == (td / "channel0_0").stat().st_size


def test_output_layout(tw: TW, relayd) -> None:
    """DIR/<hostname>/<session>-<ts>/ust/pid/<procname>-<pid>-<ts>/
    {metadata, channel0_0, index/channel0_0.idx}, and nothing else."""
    relay = relayd()
    start_session(tw, "lay", relay, "layhost")
    demo = tw.demo_popen("--events", "5000")
    _out, err = demo.communicate(timeout=180)
    assert demo.returncode == 0, err
    tw.cli("stop")

    files = sorted(str(p.relative_to(relay.output)) for p in relay.output.rglob("*") if not p.is_dir())
    assert len(files) == 3, files
    m = re.fullmatch(rf"layhost/lay-({TS})/ust/pid/tracewire-demo-{demo.pid}-({TS})/channel0_0", files[0])
    assert m, files
    trace = os.path.dirname(files[0])
    assert files == [f"{trace}/channel0_0", f"{trace}/index/channel0_0.idx", f"{trace}/metadata"]
    assert sorted(os.listdir(relay.output)) == ["layhost"]
    assert m.group(1) <= m.group(2)  # the session exists before the app's trace
    seqs, _ = ctf_seqs(relay.output)
    check_once(seqs, 5000, "ctf.read_trace")


@needs_bt2
def test_three_hosts_into_one_relay(make_tw, relayd) -> None:
    relay = relayd()
    n = 100_000
    hosts = ["alpha", "bravo", "charlie"]
    tws = [make_tw() for _ in hosts]
    for tw, host in zip(tws, hosts):
        start_session(tw, f"s-{host}", relay, host)
    demos = [tw.demo_popen("--events", str(n)) for tw in tws]  # all three at once
    for d in demos:
        _out, err = d.communicate(timeout=180)
        assert d.returncode == 0, err
    for tw in tws:
        tw.cli("stop")

    assert sorted(os.listdir(relay.output)) == hosts
    for host in hosts:
        hdir = relay.output / host
        sessions = os.listdir(hdir)
        assert len(sessions) == 1 and re.fullmatch(rf"s-{host}-{TS}", sessions[0]), sessions
        check_once(bt2_seqs(hdir), n, f"babeltrace2 {host}")
        seqs, lost = ctf_seqs(hdir)
        assert lost == 0
        check_once(seqs, n, f"ctf.read_trace {host}")
        assert {e.hostname for e in ctf.read_trace(hdir) if isinstance(e, ctf.Event)} == {host}
    # The whole relay output at once, as a collection host would open it.
    assert len(bt2_seqs(relay.output)) == 3 * n


def kill_consumerd_mid_stream(victim: TW, n: int, *, rate: str = "60000") -> tuple[subprocess.Popen, int]:
    """Start a rate-limited demo in ``victim`` and SIGKILL its consumerd once a
    third of the events are emitted; returns (demo, killed pid)."""
    dv = victim.demo_popen("--events", str(n), "--rate", rate, "--progress-every", "10000")
    assert dv.stdout is not None
    for line in dv.stdout:
        m = re.fullmatch(r"emitted (\d+)\n", line)
        if m and int(m.group(1)) >= n // 3:
            break
    else:
        pytest.fail("the victim demo ended early")
    cpid = consumerd_pid(victim)
    os.kill(cpid, signal.SIGKILL)
    return dv, cpid


def ranges(values: list[int]) -> list[tuple[int, int]]:
    """[(first, last), ...] runs of consecutive ints in sorted ``values``."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][1] == v - 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return [(a, b) for a, b in out]


@needs_bt2
def test_consumerd_killed_mid_stream(make_tw, relayd) -> None:
    """SIGKILL one session's consumerd while it streams; another session
    streams into the same relay at the same time and completes with every
    event.  sessiond restarts the killed consumerd, which resumes where the
    relay stands; `tracewire stop` of the killed session then succeeds, and
    its trace opens in babeltrace2 with no duplicate and no event lost
    without being counted as discarded."""
    relay = relayd()
    victim, other = make_tw(), make_tw()
    n = 300_000
    start_session(victim, "victim", relay, "victimhost")
    start_session(other, "other", relay, "otherhost")
    do = other.demo_popen("--events", str(n), "--rate", "60000")
    dv, cpid = kill_consumerd_mid_stream(victim, n)

    _out, err = do.communicate(timeout=180)
    assert do.returncode == 0, err
    other.cli("stop")
    _rest, err = dv.communicate(timeout=180)
    assert dv.returncode == 0, err  # the app never notices
    # A new consumerd took over (it maps no ring any more: the app has
    # exited and its buffer was freed once written).
    sd = victim.sessiond_pid()
    assert sd is not None and [c for c in _children(sd) if _alive(c) and c != cpid]
    try:
        stop = victim.cli("stop", check=False, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("tracewire stop did not return within 90 s after consumerd was killed")
    assert stop.returncode == 0, stop.stderr
    assert relay.proc is not None and relay.proc.poll() is None

    # The relay kept serving the other session: complete.
    ohost = relay.output / "otherhost"
    check_once(bt2_seqs(ohost), n, "babeltrace2 other")
    seqs, lost = ctf_seqs(ohost)
    assert lost == 0
    check_once(seqs, n, "ctf.read_trace other")

    # The killed session: opens in babeltrace2 and in our reader, in order,
    # no duplicate; what is missing is counted as discarded.
    status = status_streams(victim)
    assert all(row[5] == 0 for row in status), status  # nothing left unacknowledged
    vhost = relay.output / "victimhost"
    got = bt2_seqs(vhost)
    assert got == sorted(set(got)), "duplicate or out-of-order events"
    vseqs, vlost = ctf_seqs(vhost)
    assert vseqs == got
    missing = sorted(set(range(n)) - set(got))
    assert len(got) + vlost == n, (
        f"killed session: {len(got)} events, {vlost} reported discarded, "
        f"missing {ranges(missing)[:10]}"
    )


def test_status_reports_unreachable_relay(tw: TW) -> None:
    """A relay that cannot be reached: status says so, per stream, in one line.
    (sessiond's stop timeout, SessiondConfig.stop_timeout = 120 s, cannot be
    set from outside: tracewire-sessiond has no option for it and the CLI
    starts it with --rundir only; so `tracewire stop` is not exercised.)"""
    with socket_closed_port() as port:
        tw.env["TRACEWIRE_HOSTNAME"] = "downhost"
        tw.cli("create", "down", "--url", f"tw://127.0.0.1:{port}")
        tw.cli("enable-event", "demo:*")
        tw.cli("start")
        tw.demo("--events", "1000")
        deadline = time.monotonic() + 60
        while True:
            out = tw.cli("status").stdout
            if "relay unreachable" in out or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    lines = [ln for ln in out.splitlines() if "channel0_0" in ln]
    assert len(lines) == 1 and "ERROR: relay unreachable" in lines[0], out
    assert f"127.0.0.1:{port}" in lines[0]
    assert re.search(r"unacked [1-9]", lines[0]), out


@needs_bt2
def test_relay_dies_and_comes_back(tw: TW, relayd) -> None:
    """The relay dies with the session started: status says the relay is
    unreachable (one line per stream, no hang); a relay comes back on the same
    port and output, the session reconnects, and stop completes with every
    event of both runs of the app."""
    relay = relayd()
    start_session(tw, "dies", relay, "dieshost")
    tw.demo("--events", "10000")
    deadline = time.monotonic() + 60
    while status_streams(tw)[0][5] != 0:  # wait until everything is acked
        assert time.monotonic() < deadline, "the relay did not acknowledge 10000 events in 60 s"
        time.sleep(0.2)
    relay.stop()
    tw.demo("--events", "10000")
    deadline = time.monotonic() + 60
    while True:
        try:
            out = tw.cli("status", timeout=30).stdout
        except subprocess.TimeoutExpired:
            pytest.fail("tracewire status did not answer within 30 s after the relay died")
        lines = [ln for ln in out.splitlines() if "channel0_0" in ln]
        if len(lines) == 2 and all("ERROR: relay unreachable" in ln for ln in lines):
            break
        assert time.monotonic() < deadline, out
        time.sleep(0.2)

    relay.start(port=relay.port)  # the same relay object: the fixture stops it
    tw.cli("stop", timeout=150)
    rows = status_streams(tw)
    assert [r[5] for r in rows] == [0, 0], rows
    traces = sorted(p.parent for p in relay.output.rglob("metadata"))
    assert len(traces) == 2, traces
    for td in traces:
        check_once(bt2_seqs(td), 10000, f"babeltrace2 {td.name}")
        seqs, lost = ctf_seqs(td)
        assert lost == 0
        check_once(seqs, 10000, f"ctf.read_trace {td.name}")


class socket_closed_port:
    """A loopback port with nothing listening: bound (so nobody else takes it)
    but never listen()ed, so connections are refused."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()
