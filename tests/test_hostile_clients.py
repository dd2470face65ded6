"""sessiond against hostile local clients (issue 9), end to end.

Each test runs the real daemons and CLI and one kind of misbehaving client on
``apps.sock``:

* an app that never reads its socket (run as a user outside the ``tracing``
  group): it is dropped, and neither ``stop`` nor ``list`` waits on it;
* more connections than half the descriptor limit of sessiond: sessiond
  survives, and root's session still records a real app;
* many short-lived apps: every event is recorded and the descriptors of
  sessiond and consumerd come back to where they were;
* an app that declares more tracepoints than its budget: it is dropped, and
  sessiond's memory stays bounded;
* an app with many tracepoints (within its budget), then a consumerd restart:
  root's session goes on recording.

TRACEWIRE_SHORT_LIVED_APPS sets how many short-lived apps run (300 by
default).

Every wait is a condition with a deadline; every process a test starts is
ended by pid at teardown (the ``tw`` fixture, or the test's own ``finally``).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import resource
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tracewire import ctf

from conftest import TW, _alive, _children, _kill_wait

SYSTEM_PYTHON = "/usr/bin/python3"  # other users cannot run the venv's (it lives in root's home)
OUTSIDER = "nobody"  # a user outside the "tracing" group
STOP_BOUND = 30.0  # the acceptance numbers
LIST_BOUND = 5.0
MAX_TRACEPOINTS_PER_APP = 4096  # SessiondConfig default
FD_SLACK = 8
RSS_SLACK_KIB = 50 * 1024
SHORT_LIVED_APPS = int(os.environ.get("TRACEWIRE_SHORT_LIVED_APPS", "300"))

T = TypeVar("T")

# A traced app that registers demo:tick, then declares COUNT more tracepoints
# (demo:x1, demo:x2, ...: each matches the session, so each costs sessiond
# an "enable" and a "registered" to send back), and never reads its socket
# nor closes it.  It says how far it got on stdout.  Standard library only:
# it runs as another user with the system Python.
NEVER_READS = r"""
import json, os, socket, sys, time
path, procname, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(path)
def send(msg):
    s.send(json.dumps(msg, separators=(",", ":")).encode())
send({"op": "register", "pid": os.getpid(), "procname": procname,
      "tracepoints": [{"id": 0, "name": "demo:tick", "fields": [["seq", "int"], ["msg", "str"]]}]})
sent, why = 0, "all sent"
for i in range(1, count + 1):
    try:
        send({"op": "tracepoints", "tracepoints": [{"id": i, "name": "demo:x%d" % i, "fields": [["seq", "int"]]}]})
    except OSError as exc:
        why = exc.strerror
        break
    sent += 1
print("sent %d declarations; %s" % (sent, why), flush=True)
while True:
    time.sleep(3600)
"""

# Opens COUNT connections to apps.sock (non-blocking connect, retried while
# the backlog is full), says "open N", holds them until stdin closes, then
# closes them and says "closed".
HOLD_CONNECTIONS = r"""
import socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
socks = []
deadline = time.monotonic() + 120
while len(socks) < count:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
    while True:
        try:
            s.connect(path)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                print("stuck at %d" % len(socks), flush=True)
                sys.exit(1)
            time.sleep(0.005)
    socks.append(s)
print("open %d" % len(socks), flush=True)
sys.stdin.read()
for s in socks:
    s.close()
print("closed", flush=True)
"""


# ---------------------------------------------------------------- helpers


def wait_for(cond: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``cond`` until it returns something true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def sessiond_log(tw: TW) -> str:
    try:
        with open(os.path.join(tw.rundir, "sessiond.log"), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def log_tail(tw: TW, lines: int = 30) -> str:
    return "\n".join(sessiond_log(tw).splitlines()[-lines:])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    assert m, field
    return int(m.group(1))


def consumerd_pid(tw: TW, uid: int = 0) -> int:
    """The consumerd of ``uid`` that sessiond runs now (the last one its log names)."""
    found = re.findall(rf"consumerd for uid {uid} running \(pid (\d+)\)", sessiond_log(tw))
    assert found, log_tail(tw)
    return int(found[-1])


def read_line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """The next line ``proc`` prints (its stdout is a text pipe)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail(f"no line from {what} within {timeout:g} s")
    return proc.stdout.readline().strip()


def start_helper(tw: TW, script: str, args: list[str], user: tuple[int, int] | None) -> subprocess.Popen:
    """Run ``script`` with the system Python, as ``user`` (uid, gid) if given;
    stdin and stdout are text pipes.  Ended by the ``tw`` fixture."""
    argv = [SYSTEM_PYTHON, "-c", script, *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", "--", *argv]
    p = subprocess.Popen(argv, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/",
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tw.procs.append(p)
    return p


def need_system_python() -> None:
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"needs {SYSTEM_PYTHON} for the fake clients")


def outsider() -> tuple[int, int]:
    """(uid, gid) of a user outside the ``tracing`` group; skips unless we
    are root and can switch to it."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to run the fake app as another user)")
    need_system_python()
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    try:
        pw = pwd.getpwnam(OUTSIDER)
    except KeyError:
        pytest.skip(f"needs a user {OUTSIDER!r}")
    try:
        tracing = grp.getgrnam("tracing")
        if OUTSIDER in tracing.gr_mem or pw.pw_gid == tracing.gr_gid:
            pytest.skip(f"{OUTSIDER!r} is in the tracing group here")
    except KeyError:
        pass
    return pw.pw_uid, pw.pw_gid


def require_reachable(rundir: str) -> None:
    """Another user must reach apps.sock: the run directory (0755 on a root
    sessiond) and every directory above it must be searchable by others."""
    st = os.stat(rundir)
    assert stat.S_IMODE(st.st_mode) == 0o755, oct(st.st_mode)
    assert stat.S_IMODE(os.stat(os.path.join(rundir, "apps.sock")).st_mode) == 0o777
    d = os.path.dirname(os.path.abspath(rundir))
    while True:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            pytest.skip(f"{d} cannot be searched by other users")
        if d == "/":
            return
        d = os.path.dirname(d)


def start_session(tw: TW, out: Path, name: str = "s") -> None:
    tw.cli("create", name, "--output", str(out))
    tw.cli("enable-event", "demo:*", "-s", name)
    tw.cli("start", name)


def demo_traces(out: Path) -> list[Path]:
    """The trace directories of tracewire-demo apps below ``out``."""
    return sorted(p.parent for p in out.rglob("metadata") if p.parent.name.startswith("tracewire-demo-"))


def demo_seqs(trace: Path) -> tuple[list[int], int]:
    """(sorted seq of every demo:tick event, events discarded) in one trace."""
    seqs, discarded = [], 0
    for item in ctf.read_trace(trace):
        if isinstance(item, ctf.Discarded):
            discarded += item.count
        elif item.name == "demo:tick":
            seqs.append(int(item.fields["seq"]))
    return sorted(seqs), discarded


def raise_nofile(at_least: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= at_least:
        return
    if hard != resource.RLIM_INFINITY and hard < at_least:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {at_least}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (at_least, hard))


# ---------------------------------------------------------------- 1. an app that never reads


@pytest.mark.parametrize(
    "declarations",
    [
        # Far more replies than the queue and the socket buffer hold: the
        # queue overflows while the app is still declaring.
        pytest.param(3000, id="queue-overflows"),
        # Enough to fill the socket buffer but not the queue: the writer
        # blocks on the app, which is dropped at app_send_timeout.
        pytest.param(200, id="send-stalls"),
    ],
)
def test_app_that_never_reads_is_dropped_and_does_not_hold_up_stop_or_list(
        tw: TW, out_dir: Path, declarations: int) -> None:
    """A user outside ``tracing`` registers an app that root's session
    traces, declares ``declarations`` tracepoints and never reads: root's
    ``stop`` answers within 30 s and ``list`` within 5 s while it is still
    connected, sessiond lives on and its log names the app as dropped, and a
    real app of the same session has all its events in the trace."""
    uid, gid = outsider()
    start_session(tw, out_dir)
    require_reachable(tw.rundir)
    sd = tw.sessiond_pid()
    assert sd is not None

    tw.demo("--events", "2000")  # a real app, before the hostile one

    fake = start_helper(tw, NEVER_READS, [os.path.join(tw.rundir, "apps.sock"), "hostile", str(declarations)],
                        (uid, gid))
    wait_for(lambda: f"app hostile-{fake.pid} registered (uid {uid}," in sessiond_log(tw), 60,
             "the fake app to register")
    report = read_line(fake, 60, "the fake app")
    assert report.startswith("sent "), report
    assert fake.poll() is None, report
    dropped_re = re.compile(rf"^(\S+ \S+) .*app {fake.pid} \(uid {uid}\): (.*); dropped$", re.M)

    def handled_all() -> bool:
        """sessiond has handled every declaration the app sent (the last
        one is in its trace's metadata), or has dropped it."""
        last = f'name = "demo:x{report.split()[1]}";'
        return bool(dropped_re.search(sessiond_log(tw))) or any(
            last in p.read_text(errors="replace") for p in out_dir.glob(f"*/ust/pid/hostile-{fake.pid}-*/metadata"))

    wait_for(handled_all, 60, "sessiond to handle the fake app's declarations")

    list_during = timed(lambda: tw.cli("list", timeout=60))
    stop_started = time.time()
    stop_s = timed(lambda: tw.cli("stop", "s", timeout=120))
    list_after = timed(lambda: tw.cli("list", timeout=60))
    assert fake.poll() is None  # it never closed its end: still connected as far as it knows

    drop = wait_for(lambda: dropped_re.search(sessiond_log(tw)), 30, "sessiond to log the fake app as dropped")
    dropped_at = time.mktime(time.strptime(drop.group(1).split(",")[0], "%Y-%m-%d %H:%M:%S")) \
        + int(drop.group(1).split(",")[1]) / 1000
    print(f"\n[{declarations} declarations] fake app: {report!r}; dropped: {drop.group(2)!r}; "
          f"stop began {dropped_at - stop_started:+.2f} s before the drop; "
          f"list during {list_during:.2f} s, stop {stop_s:.2f} s, list after {list_after:.2f} s")
    assert stop_s < STOP_BOUND, log_tail(tw)
    assert list_during < LIST_BOUND and list_after < LIST_BOUND, log_tail(tw)
    assert drop.group(2) in ("does not read its socket (its queue is full)", "did not read its socket for 5 s")
    assert _alive(sd) and tw.sessiond_pid() == sd
    assert "[stopped]" in tw.cli("list", "s").stdout

    traces = demo_traces(out_dir)
    assert len(traces) == 1, traces
    seqs, discarded = demo_seqs(traces[0])
    assert discarded == 0
    assert seqs == list(range(2000))


# ---------------------------------------------------------------- 2. more connections than descriptors


@pytest.fixture
def limited_sessiond(tw: TW) -> Iterator[subprocess.Popen]:
    """A sessiond in ``tw.rundir`` with RLIMIT_NOFILE 1024; ended (with its
    consumerds) by pid at teardown."""
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit")
    with open(os.path.join(tw.rundir, "sessiond.log"), "ab") as log:
        proc = subprocess.Popen(
            ["prlimit", "--nofile=1024:1024", sys.executable, "-m", "sessiond", "--rundir", tw.rundir],
            env=tw.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or tw.cli("list", check=False, timeout=30).returncode == 0,
                 60, "the sessiond to answer")
        assert proc.poll() is None, log_tail(tw)
        assert tw.sessiond_pid() == proc.pid  # prlimit execs sessiond
        with open(f"/proc/{proc.pid}/limits") as f:
            assert re.search(r"Max open files\s+1024\s+1024", f.read())
        yield proc
    finally:
        pids = [proc.pid, *_children(proc.pid)] if proc.poll() is None else []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            _kill_wait([p for p in pids if _alive(p)], sig, time.monotonic() + 10)
        proc.wait(10)


@pytest.mark.parametrize("holder", ["root", OUTSIDER])
def test_more_connections_than_descriptors_leave_root_session_working(
        tw: TW, out_dir: Path, limited_sessiond: subprocess.Popen, holder: str) -> None:
    """1,100 connections to apps.sock (held open by ``holder``) against a
    sessiond limited to 1,024 descriptors: sessiond lives, and root's session
    records all 1,000 events of a real app while they are open.  Another
    user gets at most half of sessiond's connection slots, so root's app is
    served at once; root's own flood takes every slot until its unregistered
    connections are closed (register_timeout), then root's app is served."""
    need_system_python()
    user = outsider() if holder == OUTSIDER else None
    sd = limited_sessiond.pid
    raise_nofile(1300)  # the holder inherits it
    hold = start_helper(tw, HOLD_CONNECTIONS, [os.path.join(tw.rundir, "apps.sock"), "1100"], user)
    assert read_line(hold, 150, "the connection holder") == "open 1100"
    assert hold.poll() is None
    assert _alive(sd), log_tail(tw)
    wait_for(lambda: "apps.sock: refusing connections" in sessiond_log(tw), 30,
             "sessiond to refuse connections beyond its budget")
    print(f"\n[{holder}] sessiond holds {fd_count(sd)} descriptors with 1100 connections made")
    if user is None:
        wait_for(lambda: fd_count(sd) < 100, 120,
                 "sessiond to close the connections that did not register in time")

    start_session(tw, out_dir)
    tw.demo("--events", "1000")
    tw.cli("stop", "s")
    assert _alive(sd) and hold.poll() is None
    traces = demo_traces(out_dir)
    seqs, discarded = demo_seqs(traces[0]) if traces else ([], 0)
    assert len(traces) == 1, (traces, log_tail(tw))
    assert discarded == 0
    assert seqs == list(range(1000))

    assert hold.stdin is not None
    hold.stdin.close()
    assert read_line(hold, 60, "the connection holder") == "closed"
    hold.wait(30)
    assert hold.stdout is not None
    hold.stdout.close()
    assert _alive(sd)
    tw.cli("list")


# ---------------------------------------------------------------- 3. many short-lived apps


def test_many_short_lived_apps_are_all_recorded_and_leak_no_descriptors(tw: TW, out_dir: Path) -> None:
    """SHORT_LIVED_APPS apps of 10 events each, 8 at a time, in a started
    session: sessiond lives, every event is in its app's trace, and the
    descriptors of sessiond and consumerd come back to within FD_SLACK of
    what they were after the first app."""
    n = SHORT_LIVED_APPS
    start_session(tw, out_dir)
    sd = tw.sessiond_pid()
    assert sd is not None

    def gone() -> int:
        return len(re.findall(r"app tracewire-demo-\d+ gone", sessiond_log(tw)))

    first = tw.demo("--events", "10")
    assert first.returncode == 0
    wait_for(lambda: gone() >= 1, 60, "the first app to be gone")
    cd = consumerd_pid(tw)
    base_sd, base_cd = fd_count(sd), fd_count(cd)

    t0 = time.monotonic()
    running: list[subprocess.Popen] = []
    started = 1
    deadline = time.monotonic() + 600
    while started < n or running:
        while started < n and len(running) < 8:
            running.append(tw.demo_popen("--events", "10"))
            started += 1
        for p in [p for p in running if p.poll() is not None]:
            out, err = p.communicate()
            assert p.returncode == 0, (out, err)
            running.remove(p)
        assert time.monotonic() < deadline, f"{started} of {n} apps started in 600 s"
        time.sleep(0.01)
    elapsed = time.monotonic() - t0

    wait_for(lambda: gone() >= n, 120, f"all {n} apps to be gone")
    assert _alive(sd) and consumerd_pid(tw) == cd, log_tail(tw)

    def settled() -> bool:
        return fd_count(sd) <= base_sd + FD_SLACK and fd_count(cd) <= base_cd + FD_SLACK

    try:
        wait_for(settled, 60, "the descriptor counts to come back")
    finally:
        print(f"\n{n} apps in {elapsed:.1f} s; sessiond fds {base_sd} -> {fd_count(sd)}, "
              f"consumerd fds {base_cd} -> {fd_count(cd)}")

    tw.cli("stop", "s")
    traces = demo_traces(out_dir)
    assert len(traces) == n
    for trace in traces:
        assert demo_seqs(trace) == (list(range(10)), 0), trace
    assert _alive(sd)


# ---------------------------------------------------------------- 4. too many declarations


def declarations(prefix: str, first: int, count: int, fields: int) -> list[dict[str, object]]:
    return [{"id": i, "name": f"{prefix}:tp{i}", "fields": [[f"f{k:02d}", "int"] for k in range(fields)]}
            for i in range(first, first + count)]


def until_registered(s: socket.socket) -> bool:
    """Read what sessiond sends (closing any descriptors) up to its
    ``registered``; False at end of stream."""
    while True:
        data, fds, _, _ = socket.recv_fds(s, 65536, 8)
        for fd in fds:
            os.close(fd)
        if not data:
            return False
        if json.loads(data).get("op") == "registered":
            return True


def declare(apps_sock: str, procname: str, prefix: str, batches: int, batch: int, fields: int,
            stay: bool = False) -> tuple[int, int, socket.socket | None]:
    """Register on ``apps_sock`` and declare ``batches`` messages of ``batch``
    tracepoints ``PREFIX:tpN`` of ``fields`` int fields each, one message at
    a time as the tracer does (waiting for ``registered``), until sessiond
    closes the connection.  Returns (tracepoints sent, bytes sent, the open
    connection if ``stay`` and sessiond did not close it)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(120)
    sent = nbytes = 0
    try:
        s.connect(apps_sock)
        s.send(json.dumps({"op": "register", "pid": os.getpid(), "procname": procname,
                           "tracepoints": []}).encode())
        open_ = until_registered(s)
        for _ in range(batches):
            if not open_:
                break
            msg = json.dumps({"op": "tracepoints", "tracepoints": declarations(prefix, sent, batch, fields)},
                             separators=(",", ":")).encode()
            try:
                s.send(msg)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += batch
            nbytes += len(msg)
            open_ = until_registered(s)
        if stay and open_:
            kept, s = s, None
            return sent, nbytes, kept
        assert not open_, f"sessiond kept a connection that declared {sent} tracepoints"
        return sent, nbytes, None
    finally:
        if s is not None:
            s.close()


@pytest.mark.parametrize("prefix", [
    # declarations no session enables: what they cost while declared
    pytest.param("hostile", id="names-no-session-enables"),
    # declarations root's session enables: each also becomes metadata
    pytest.param("demo", id="names-the-session-enables"),
])
def test_app_declaring_too_many_tracepoints_is_dropped_and_memory_stays_bounded(
        tw: TW, out_dir: Path, prefix: str) -> None:
    """Four connections, one after the other, each declaring ~3.6 MiB of
    tracepoints (4,100 of 64 fields, 25 per message): each is closed by
    sessiond once over its 4,096, sessiond's VmRSS grows by less than 50 MB,
    and root's session still records a real app."""
    start_session(tw, out_dir)
    sd = tw.sessiond_pid()
    assert sd is not None
    tw.demo("--events", "100")  # warm up every code path of a traced app
    base_rss = status_kib(sd, "VmRSS")
    apps_sock = os.path.join(tw.rundir, "apps.sock")
    drop_line = f"app {os.getpid()} (uid {os.geteuid()}): declares more than "
    totals, rss_after = [], []
    t0 = time.monotonic()
    for k in range(4):
        sent, nbytes, _ = declare(apps_sock, f"declarer{k}", prefix, batches=200, batch=25, fields=64)
        totals.append((sent, nbytes))
        assert sent <= MAX_TRACEPOINTS_PER_APP + 25  # closed by sessiond, over a budget
        wait_for(lambda k=k: sessiond_log(tw).count(drop_line) >= k + 1, 60,
                 f"sessiond to log connection {k} as dropped for its declarations")
        rss_after.append(status_kib(sd, "VmRSS"))
    wait_for(lambda: len(re.findall(r"app declarer\d-\d+ gone", sessiond_log(tw))) >= 4, 60,
             "the four connections to be gone")
    rss, hwm = status_kib(sd, "VmRSS"), status_kib(sd, "VmHWM")
    print(f"\n[{prefix}] {time.monotonic() - t0:.1f} s; declared (tracepoints, bytes) per connection: {totals}; "
          f"sessiond VmRSS {base_rss} -> {rss_after} -> {rss} KiB (+{(rss - base_rss) / 1024:.1f} MiB), "
          f"VmHWM {hwm} KiB")
    assert _alive(sd)
    assert rss - base_rss < RSS_SLACK_KIB

    tw.demo("--events", "1000")
    tw.cli("stop", "s")
    traces = demo_traces(out_dir)
    assert len(traces) == 2, traces
    assert sorted(demo_seqs(t) for t in traces) == [(list(range(100)), 0), (list(range(1000)), 0)]


# ---------------------------------------------------------------- 5. many declarations, then a consumerd restart


def test_consumerd_restart_after_an_app_declared_many_tracepoints(tw: TW, out_dir: Path) -> None:
    """An app declares 1,300 one-field tracepoints that root's session
    enables (within its budget, 100 per message); root's consumerd is then
    killed: sessiond's replacement answers, and the session records all the
    events of a real app."""
    start_session(tw, out_dir)
    sd = tw.sessiond_pid()
    assert sd is not None
    apps_sock = os.path.join(tw.rundir, "apps.sock")
    sent, _, conn = declare(apps_sock, "declarer", "demo", batches=13, batch=100, fields=1, stay=True)
    assert conn is not None and sent == 1300
    try:
        cd = consumerd_pid(tw)
        os.kill(cd, signal.SIGKILL)
        wait_for(lambda: consumerd_pid(tw) != cd, 60, "sessiond to run a new consumerd")

        def answers() -> bool:
            try:
                return tw.cli("status", "s", check=False, timeout=30).returncode == 0
            except subprocess.TimeoutExpired:
                return False

        try:
            wait_for(answers, 30, "the new consumerd to have the session back")
        finally:
            print("\n" + "\n".join(line for line in sessiond_log(tw).splitlines()
                                   if "sessiond.consumers" in line)[-1500:])
        tw.demo("--events", "1000")
        tw.cli("stop", "s")
    finally:
        conn.close()
    assert _alive(sd)
    traces = demo_traces(out_dir)
    assert len(traces) == 1, traces
    assert demo_seqs(traces[0]) == (list(range(1000)), 0)
