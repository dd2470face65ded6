"""Reliability of the relay path under failures, over the network-namespace
harness (tests/netns.py): tracewire-relayd on ``collector``, targets streaming
to ``tw://collector:6342``, each target with the harness's TRACEWIRE_HOSTNAME
and its own TRACEWIRE_RUNDIR (a fresh sub-directory of the harness's run
directory per test, so that tests do not share a sessiond or a spool).

Each scenario streams a session at a steady rate and hits it with one failure:
relayd ``kill -9`` and restart, the link cut, 20 % packet loss, consumerd
``kill -9``, the traced app ``kill -9``, a spool cap smaller than an outage,
three shaped targets at once.  Afterwards the relay's trace must hold every
event exactly once (or, where loss is allowed, count it exactly), open in
babeltrace2, and ``tracewire status`` must show 0 discarded / 0 unacked.

What each failure cost (wall time of ``tracewire stop``, discarded events,
duplicates, reconnects) is printed (``pytest -s``) and written to
``/tmp/tw-reliability.json`` for docs/reliability.md.

Root only (network namespaces); skipped elsewhere, saying why.  Every
subprocess has a timeout, and each test kills what it started (relay,
sessiond, consumerd, demo) at teardown; the module's network is torn down by
the harness.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tracewire import ctf
from tracewire.topology import TOPOLOGY, Target, Topology

from conftest import _comm
from netns import NetnsError, Network, cleanup_stale, skip_unless_netns

BT2 = shutil.which("babeltrace2")
SUMMARY = "/tmp/tw-reliability.json"
RELAY_PORT = 6342
CLI_TIMEOUT = 60.0
STOP_TIMEOUT = 180.0   # sessiond waits up to 120 s for acknowledgements, + margin
DEMO_TIMEOUT = 120.0
BT2_TIMEOUT = 120.0

# The default topology plus a third target (scenario 7); no viewer needed.
TOPO = Topology(
    relay=TOPOLOGY.relay,
    targets=(*TOPOLOGY.targets,
             Target(name="target3", hostname="target3", address="10.77.0.13")),
)

# The steady load of scenarios 1-4: 20 000 ev/s for 11 s.
N = 220_000
RATE = 20_000
PAYLOAD = 64

RESULTS: dict[str, dict] = {}


def record(name: str, **figures) -> None:
    """Keep one scenario's costs; print them and rewrite the JSON summary."""
    RESULTS[name] = figures
    print(f"\n[reliability] {name}: {json.dumps(figures, sort_keys=True)}", flush=True)
    with contextlib.suppress(OSError):
        with open(SUMMARY, "w") as f:
            json.dump(RESULTS, f, indent=2, sort_keys=True)
            f.write("\n")


# ---------------------------------------------------------------- processes


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False



def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_all(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
        pids = [p for p in pids if _alive(p)]
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.02)


def _reap(p: subprocess.Popen) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    with contextlib.suppress(Exception):
        p.communicate(timeout=10)


class Relay:
    """tracewire-relayd on the collector; stderr to a log file (appended
    across restarts)."""

    def __init__(self, net: Network, output: str, log: str) -> None:
        self.net, self.output, self.log = net, output, log
        self.proc: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 30.0) -> Relay:
        offset = os.path.getsize(self.log) if os.path.exists(self.log) else 0
        with open(self.log, "ab") as err:
            self.proc = self.net.popen(
                "collector",
                ["tracewire-relayd", "--output", self.output, "--listen", f"0.0.0.0:{RELAY_PORT}",
                 "--live-listen", "0.0.0.0:6344"],
                stdout=subprocess.DEVNULL, stderr=err)
        self.procs.append(self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                f.seek(offset)
                if b"listening on" in f.read():
                    return self
            if self.proc.poll() is not None:
                pytest.fail(f"tracewire-relayd exited {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.05)
        pytest.fail(f"tracewire-relayd did not start within {timeout:.0f} s:\n{self.tail()}")

    def kill9(self) -> None:
        """SIGKILL the relay (the Popen's pid is relayd itself: `ip netns
        exec`, `unshare` and `sh -c 'exec ...'` all exec)."""
        assert self.proc is not None and self.proc.poll() is None
        assert "relayd" in _cmdline(self.proc.pid), _cmdline(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def tail(self, n: int = 3000) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return "(no relay log)"

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            _reap(p)


class Demo:
    """tracewire-demo on a target, with a thread reading its ``emitted K``
    lines (so that waiting for progress never blocks without a deadline)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.emitted = 0            # highest K of an `emitted K` line read so far
        self.final: str | None = None
        self.elapsed = 0.0          # the app's own run time (final line)
        self.lines = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.fullmatch(r"emitted (\d+)( events in ([\d.]+) s)?\n", line)
            with self._cond:
                self.lines += 1
                if m:
                    self.emitted = max(self.emitted, int(m.group(1)))
                    if m.group(2):
                        self.final = line.strip()
                        self.elapsed = float(m.group(3))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_emitted(self, k: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.emitted < k:
                left = deadline - time.monotonic()
                if left <= 0 or (not self._thread.is_alive() and self.emitted < k):
                    pytest.fail(f"the demo did not report {k} events within {timeout:.0f} s "
                                f"(last: emitted {self.emitted}, exit {self.proc.poll()})")
                self._cond.wait(min(left, 0.5))
            return self.emitted

    def wait(self, timeout: float = DEMO_TIMEOUT) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tracewire-demo still running after {timeout:.0f} s")
        self._thread.join(timeout=10)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        assert self.proc.returncode == 0, f"tracewire-demo exited {self.proc.returncode}: {err}"
        assert self.final is not None, "the demo printed no final line"

    def kill9(self) -> int:
        """SIGKILL the app; return the highest ``emitted K`` it printed before
        dying (every line in the pipe was written before the kill)."""
        assert "demo" in _cmdline(self.proc.pid), _cmdline(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._thread.join(timeout=10)
        return self.emitted


_STATUS = re.compile(r": (?:\d+ events, )?(\d+) packets, .*?discarded (\d+), unacked (\d+)")


class TargetHost:
    """One target host of the network, with a run directory of this test's."""

    def __init__(self, net: Network, name: str, tag: str) -> None:
        self.net, self.name = net, name
        self.hostname = net.host(name).hostname
        self.rundir = os.path.join(net.host(name).rundir, tag)   # short: unix socket paths
        os.makedirs(self.rundir)
        self.env = {"TRACEWIRE_RUNDIR": self.rundir}
        self.demos: list[Demo] = []
        self.daemons: set[int] = set()

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
        try:
            r = self.net.run(self.name, ["tracewire", *args], env=self.env, timeout=timeout, check=False)
        except NetnsError as exc:
            pytest.fail(f"{self.name}: {exc}\n{self.log_tail()}")
        self._note()
        if check and r.returncode != 0:
            pytest.fail(f"{self.name}: tracewire {' '.join(args)} exited {r.returncode}:\n"
                        f"{r.stdout}{r.stderr}\n{self.log_tail()}")
        return r

    def timed_stop(self, session: str = "s1") -> float:
        t0 = time.monotonic()
        self.cli("stop", session, timeout=STOP_TIMEOUT)
        return time.monotonic() - t0

    def status(self, session: str = "s1") -> tuple[int, int, int]:
        """(packets, discarded, unacked) summed over the session's streams."""
        out = self.cli("status", session).stdout
        rows = [(int(a), int(b), int(c)) for a, b, c in _STATUS.findall(out)]
        assert rows, out
        return tuple(sum(col) for col in zip(*rows))  # type: ignore[return-value]

    def session(self, *create_args: str, channel: tuple[str, ...] = ()) -> None:
        self.cli("create", "s1", "--url", f"tw://collector:{RELAY_PORT}", *create_args)
        if channel:
            self.cli("enable-channel", "c", *channel)
            self.cli("enable-event", "-c", "c", "demo:*")
        else:
            self.cli("enable-event", "demo:*")
        self.cli("start")

    def demo(self, events: int, rate: int, payload: int, progress: int) -> Demo:
        p = self.net.popen(self.name, ["tracewire-demo", "--events", str(events), "--rate", str(rate),
                                       "--payload-bytes", str(payload), "--progress-every", str(progress)],
                           env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        d = Demo(p)
        self.demos.append(d)
        return d

    def sessiond_pid(self) -> int | None:
        try:
            with open(os.path.join(self.rundir, "sessiond.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def _note(self) -> None:
        pid = self.sessiond_pid()
        if pid is not None:
            self.daemons.add(pid)

    def consumerd_pid(self, not_pid: int | None = None, timeout: float = 30.0) -> int:
        """The pid of the consumerd serving the sessions: a child of the
        sessiond in RUNDIR/sessiond.pid (found through
        /proc/<pid>/task/*/children).  sessiond keeps a warm standby consumerd
        too, so the active one is the child named by the last "consumerd for
        uid U running (pid P)" line of sessiond.log."""
        sd = self.sessiond_pid()
        assert sd is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kids = {c for c in _children(sd) if _alive(c)}
            running = [int(x) for x in re.findall(r"consumerd for uid \d+ running \(pid (\d+)\)", self.log())]
            if running and running[-1] in kids and running[-1] != not_pid:
                return running[-1]
            time.sleep(0.02)
        pytest.fail(f"{self.name}: no running consumerd child of sessiond {sd}"
                    f"{' other than ' + str(not_pid) if not_pid else ''}\n{self.log_tail()}")

    def tcp_counters(self) -> dict[str, int]:
        """The host's TCP MIB (/proc/net/snmp of its network namespace)."""
        lines = [ln.split() for ln in self.net.run(self.name, ["cat", "/proc/net/snmp"]).stdout.splitlines()
                 if ln.startswith("Tcp:")]
        return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}

    def relay_rto_ms(self) -> int | None:
        """The retransmission timeout (ms) of the host's TCP connection to the
        relay, from `ss -ti` (None without ss or connection): after a
        blackhole, data flows again only at the next, backed-off retransmission."""
        if shutil.which("ss") is None:
            return None
        r = self.net.run(self.name, ["ss", "-tin", "state", "established", "dport", f"= :{RELAY_PORT}"],
                         check=False, timeout=10)
        m = re.search(r"\brto:(\d+(?:\.\d+)?)", r.stdout)
        return int(float(m.group(1))) if m else None

    def log(self) -> str:
        try:
            with open(os.path.join(self.rundir, "sessiond.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n: int = 3000) -> str:
        return f"--- {self.name} sessiond.log (tail) ---\n{self.log()[-n:]}"

    def reconnects(self) -> int:
        """How many times consumerd logged a failed / broken relay connection."""
        return self.log().count("retrying in")

    def hold(self, seconds: float, until: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
        """Let a failure last at least ``seconds`` and until ``until()`` holds
        (checked every 0.1 s; fail after ``timeout``): what the scenario needs
        happens whatever the machine's speed, and no longer only if the
        machine is fast enough."""
        t0 = time.monotonic()
        while not (time.monotonic() - t0 >= seconds and until()):
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"{self.name}: {what} did not happen within {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.1)

    def cleanup(self) -> None:
        for d in self.demos:
            _reap(d.proc)
        self._note()
        sessionds = [p for p in self.daemons if _alive(p)]
        consumers = [c for p in sessionds for c in _children(p)]
        for p in sessionds:  # the first signal stops the sessions, the second (SIGTERM) exits at once
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGINT)
        _kill_all(sessionds + consumers)


# ---------------------------------------------------------------- reading traces


_BT2_SEQ = re.compile(rb" demo:tick: \{[^}]*\}, \{ seq = (\d+),")
_BT2_DISCARDED = re.compile(rb"discarded (\d+) events", re.IGNORECASE)


def bt2(path: str) -> tuple[list[int], int]:
    """(seq of every demo:tick, sum of the "discarded N events" warnings) from
    babeltrace2's text output; babeltrace2 must exit 0."""
    assert BT2 is not None
    p = subprocess.Popen([BT2, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    timer = threading.Timer(BT2_TIMEOUT, p.kill)   # the timeout of the streaming read
    timer.start()
    seqs: list[int] = []
    discarded = 0
    tail = b""
    assert p.stdout is not None
    try:
        while chunk := p.stdout.read(1 << 20):
            data = tail + chunk
            cut = data.rfind(b"\n") + 1
            seqs += map(int, _BT2_SEQ.findall(data, 0, cut))
            discarded += sum(map(int, _BT2_DISCARDED.findall(data, 0, cut)))
            tail = data[cut:]
        seqs += map(int, _BT2_SEQ.findall(tail))
        discarded += sum(map(int, _BT2_DISCARDED.findall(tail)))
        _, err = p.communicate(timeout=BT2_TIMEOUT)
    finally:
        timer.cancel()
        _reap(p)
    assert p.returncode == 0, f"babeltrace2 {path} exited {p.returncode}: {err.decode(errors='replace')[-2000:]}"
    discarded += sum(map(int, _BT2_DISCARDED.findall(err)))
    return seqs, discarded


def ctf_discarded(path: str) -> tuple[int, int]:
    """(demo:tick events, events reported discarded) as tracewire.ctf reads them."""
    events = discarded = 0
    for item in ctf.read_trace(path):
        if isinstance(item, ctf.Discarded):
            discarded += item.count
        elif item.name == "demo:tick":
            events += 1
    return events, discarded


@dataclass
class Tally:
    count: int
    missing: list[int] = field(default_factory=list)
    duplicates: int = 0
    out_of_range: int = 0

    def ranges(self, limit: int = 8) -> list[tuple[int, int]]:
        out: list[list[int]] = []
        for v in self.missing:
            if out and out[-1][1] == v - 1:
                out[-1][1] = v
            else:
                out.append([v, v])
        return [(a, b) for a, b in out[:limit]]


def tally(seqs: list[int], n: int) -> Tally:
    seen = bytearray(n)
    t = Tally(len(seqs))
    for s in seqs:
        if not 0 <= s < n:
            t.out_of_range += 1
        elif seen[s]:
            t.duplicates += 1
        else:
            seen[s] = 1
    t.missing = [i for i in range(n) if not seen[i]]
    return t


def host_dir(relay: Relay, t: TargetHost) -> str:
    d = os.path.join(relay.output, t.hostname)
    assert os.path.isdir(d), f"the relay wrote nothing for {t.hostname}:\n{relay.tail()}"
    return d


def check_exactly_once(relay: Relay, t: TargetHost, n: int) -> Tally:
    """Every seq 0..n-1 exactly once in babeltrace2's reading of the trace,
    nothing reported discarded; status: 0 discarded, 0 unacked."""
    seqs, bt2_lost = bt2(host_dir(relay, t))
    got = tally(seqs, n)
    _packets, discarded, unacked = t.status()
    assert (got.count, len(got.missing), got.duplicates, got.out_of_range, bt2_lost) == (n, 0, 0, 0, 0), (
        f"{t.name}: {got.count} events, {len(got.missing)} missing {got.ranges()}, "
        f"{got.duplicates} duplicates, {got.out_of_range} out of range, {bt2_lost} reported discarded"
        f"\n{t.log_tail()}\n--- relay ---\n{relay.tail()}")
    assert (discarded, unacked) == (0, 0), f"status after stop: discarded {discarded}, unacked {unacked}"
    return got


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    skip_unless_netns("tc", "nft")
    if BT2 is None:
        pytest.skip("babeltrace2 is not installed (apt-get install babeltrace2)")
    cleanup_stale()
    with Network(topology=TOPO) as n:
        yield n


class Lab:
    """One test's relay and targets; everything killed at teardown."""

    def __init__(self, net: Network, tag: str) -> None:
        self.net, self.tag = net, tag
        self.dir = os.path.join(net.workdir, tag)
        os.makedirs(self.dir)
        self.relays: list[Relay] = []
        self.targets: list[TargetHost] = []

    def relay(self) -> Relay:
        r = Relay(self.net, os.path.join(self.dir, "traces"), os.path.join(self.dir, "relayd.log"))
        self.relays.append(r)
        return r.start()

    def target(self, name: str = "target1") -> TargetHost:
        t = TargetHost(self.net, name, self.tag)
        self.targets.append(t)
        return t

    def cleanup(self) -> None:
        for t in self.targets:
            t.cleanup()
        for r in self.relays:
            r.stop()
        self.net.clear_all()


_counter = iter(range(1, 1000))


@pytest.fixture
def lab(net: Network) -> Iterator[Lab]:
    net.clear_all()
    lb = Lab(net, f"r{next(_counter)}")
    try:
        yield lb
    finally:
        lb.cleanup()


# ---------------------------------------------------------------- scenarios 1-4: exactly once


def test_relayd_kill9_and_restart(lab: Lab) -> None:
    """1. relayd SIGKILLed at ~3 s, restarted 3 s later on the same --output:
    consumerd reconnects, asks where each stream stands and resends; the relay
    recovers its files and drops duplicates."""
    relay = lab.relay()
    t = lab.target()
    t.session()
    demo = t.demo(N, RATE, PAYLOAD, 10_000)
    demo.wait_emitted(60_000)
    relay.kill9()
    killed = time.monotonic()
    # Down for 3 s at least, and until consumerd has noticed.
    t.hold(3, lambda: "relay unreachable" in t.cli("status").stdout, "consumerd noticing the relay is down")
    unacked_before_restart = t.status()[2]
    relay.start()
    down_s = time.monotonic() - killed
    demo.wait()
    stop_s = t.timed_stop()
    got = check_exactly_once(relay, t, N)
    record("relayd_kill9", stop_s=round(stop_s, 2), relay_down_s=round(down_s, 2),
           unacked_packets_before_restart=unacked_before_restart, discarded=0,
           duplicates=got.duplicates, events=got.count, reconnect_attempts=t.reconnects(),
           demo_s=demo.elapsed)


def test_link_cut_5s(lab: Lab) -> None:
    """2. The target's link blackholed for 5 s mid-run, then restored."""
    relay = lab.relay()
    t = lab.target()
    t.session()
    demo = t.demo(N, RATE, PAYLOAD, 10_000)
    demo.wait_emitted(60_000)
    lab.net.cut(t.name)
    # 5 s at least, and until packets wait for acknowledgement ("did the cut act?").
    t.hold(5, lambda: t.status()[2] > 0, "a packet left unacknowledged by the cut")
    unacked_at_restore = t.status()[2]
    rto_ms = t.relay_rto_ms()
    lab.net.restore(t.name)
    demo.wait()
    stop_s = t.timed_stop()
    got = check_exactly_once(relay, t, N)
    assert unacked_at_restore > 0, "nothing was pending at the end of the cut: did the cut act?"
    record("link_cut_5s", stop_s=round(stop_s, 2), unacked_packets_at_restore=unacked_at_restore,
           tcp_rto_ms_at_restore=rto_ms,
           discarded=0, duplicates=got.duplicates, events=got.count,
           reconnect_attempts=t.reconnects(), demo_s=demo.elapsed)


def test_packet_loss_20pct(lab: Lab) -> None:
    """3. 20 % random loss, both directions, on the target's link for the whole run."""
    relay = lab.relay()
    t = lab.target()
    before = t.tcp_counters()
    lab.net.loss(t.name, 20)
    t.session()
    demo = t.demo(N, RATE, PAYLOAD, 10_000)
    demo.wait()
    stop_s = t.timed_stop()
    after = t.tcp_counters()
    lab.net.clear_loss(t.name)
    got = check_exactly_once(relay, t, N)
    out_segs = after["OutSegs"] - before["OutSegs"]
    retrans = after["RetransSegs"] - before["RetransSegs"]
    assert retrans > 0, "no TCP retransmission: did the loss act?"
    record("loss_20pct", stop_s=round(stop_s, 2), tcp_out_segs=out_segs, tcp_retrans_segs=retrans,
           discarded=0, duplicates=got.duplicates, events=got.count,
           reconnect_attempts=t.reconnects(), demo_s=demo.elapsed)


def test_consumerd_kill9(lab: Lab) -> None:
    """4. consumerd SIGKILLed mid-run: sessiond restarts it (its warm standby
    takes over), the new one reloads the spool, resumes the rings where the
    spool ends and resends.  A 4 MiB channel holds what the app emits during
    the restart."""
    relay = lab.relay()
    t = lab.target()
    t.session(channel=("--subbuf-size", "256k", "--num-subbuf", "16"))
    demo = t.demo(N, RATE, PAYLOAD, 10_000)
    demo.wait_emitted(60_000)
    victim = t.consumerd_pid()
    assert _comm(victim) == "tw-consumerd", _comm(victim)  # forked by sessiond's zygote
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    t.consumerd_pid(not_pid=victim)  # the standby took over
    takeover_s = time.monotonic() - t0
    demo.wait()
    stop_s = t.timed_stop()
    got = check_exactly_once(relay, t, N)
    assert not _alive(victim)
    record("consumerd_kill9", stop_s=round(stop_s, 2), consumerd_takeover_s=round(takeover_s, 2),
           discarded=0, duplicates=got.duplicates, events=got.count, demo_s=demo.elapsed)


# ---------------------------------------------------------------- 5: the app dies


def test_app_kill9(lab: Lab) -> None:
    """5. The traced app SIGKILLed mid-run: every event it reported as emitted
    (the last `emitted K` line read before the kill, and any line still in
    the pipe: all were written before it died) is in the trace, no
    duplicate; the trace is a prefix 0..M-1 (M > K when events committed
    after the last report made it)."""
    n = 200_000
    relay = lab.relay()
    t = lab.target()
    t.session()
    demo = t.demo(n, RATE, PAYLOAD, 1_000)
    read_before_kill = demo.wait_emitted(50_000)
    reported = demo.kill9()
    stop_s = t.timed_stop()
    seqs, bt2_lost = bt2(host_dir(relay, t))
    got = tally(seqs, n)
    have = n - len(got.missing)
    assert got.duplicates == 0 and got.out_of_range == 0, (got.duplicates, got.out_of_range)
    assert reported >= read_before_kill >= 50_000
    first_missing = got.missing[0] if got.missing else n
    assert first_missing >= reported, (
        f"reported {reported} emitted, but seq {first_missing} is missing: {got.ranges()}\n{t.log_tail()}")
    assert got.missing == list(range(have, n)), f"the trace is not a prefix: missing {got.ranges()}"
    assert bt2_lost == 0
    _packets, discarded, unacked = t.status()
    assert (discarded, unacked) == (0, 0)
    record("app_kill9", stop_s=round(stop_s, 2), read_before_kill=read_before_kill,
           reported_emitted=reported, in_trace=have, beyond_last_report=have - reported,
           discarded=0, duplicates=got.duplicates)


# ---------------------------------------------------------------- 6: spool cap


def test_spool_cap_loss_is_counted(lab: Lab) -> None:
    """6. A 1 MiB spool and an 8 s outage at 20 000 ev/s x 200 bytes: the
    spool fills, consumerd stops reading the rings, which discard and count.
    events in the trace + discarded in the trace == emitted (babeltrace2's
    warnings and tracewire.ctf's Discarded items agree), and `tracewire
    status` reports the same discarded count."""
    n, payload = 240_000, 200
    relay = lab.relay()
    t = lab.target()
    t.session("--spool-size", "1M")
    demo = t.demo(n, RATE, payload, 10_000)
    cut_at = demo.wait_emitted(40_000)
    lab.net.cut(t.name)
    # 8 s at least, and while the app emits 8 s of its events (or all of
    # them): the data of the outage, not its wall time, fills the spool.
    t.hold(8, lambda: demo.emitted >= cut_at + 8 * RATE or demo.proc.poll() is not None,
           f"the app emitting {8 * RATE} events during the outage")
    unacked_at_restore = t.status()[2]
    rto_ms = t.relay_rto_ms()
    lab.net.restore(t.name)
    demo.wait()
    stop_s = t.timed_stop()
    _packets, st_discarded, unacked = t.status()
    seqs, bt2_lost = bt2(host_dir(relay, t))
    got = tally(seqs, n)
    ctf_events, ctf_lost = ctf_discarded(host_dir(relay, t))
    summary = (f"trace: {got.count} events, babeltrace2 discarded {bt2_lost}, ctf discarded {ctf_lost}, "
               f"status discarded {st_discarded}, unacked {unacked}, duplicates {got.duplicates}")
    assert got.duplicates == 0 and got.out_of_range == 0, summary
    assert unacked == 0, summary
    assert st_discarded > 0, f"the spool never filled: the scenario tests nothing. {summary}"
    assert ctf_events == got.count, summary
    assert got.count + ctf_lost == n, summary
    assert bt2_lost == ctf_lost, summary
    assert st_discarded == ctf_lost, summary
    record("spool_cap_1M_outage_8s", stop_s=round(stop_s, 2), discarded=st_discarded,
           events=got.count, emitted=n, duplicates=got.duplicates,
           lost_seq_ranges=len(got.ranges(limit=10_000)), unacked_packets_at_restore=unacked_at_restore,
           tcp_rto_ms_at_restore=rto_ms,
           reconnect_attempts=t.reconnects(), demo_s=demo.elapsed)


# ---------------------------------------------------------------- 7: three shaped targets


def test_three_targets_shaped_20mbit(lab: Lab) -> None:
    """7. Three targets at once into one relay (the topology's two targets
    plus a third), each link shaped to 20 Mbit/s both ways.  Uncompressed
    (--compress none) and 256-byte payloads, so that each target offers
    about 22 Mbit/s and the shaping really limits it: the spools absorb the
    excess and `stop` waits for them to drain."""
    n, rate, payload = 60_000, 10_000, 256
    relay = lab.relay()
    targets = [lab.target(name) for name in ("target1", "target2", "target3")]
    for t in targets:
        lab.net.shape(t.name, rate="20mbit")
        t.session("--compress", "none")
    demos = [t.demo(n, rate, payload, 10_000) for t in targets]
    for d in demos:
        d.wait()
    pending = [t.status()[2] for t in targets]
    stops = [round(t.timed_stop(), 2) for t in targets]
    for t in targets:
        check_exactly_once(relay, t, n)
    assert sorted(os.listdir(relay.output)) == [t.hostname for t in targets]
    record("three_targets_20mbit", stop_s=stops, unacked_packets_when_apps_done=pending, discarded=0,
           duplicates=0, events_each=n, demo_s=[d.elapsed for d in demos])
