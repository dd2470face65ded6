"""The multi-host harness (tests/netns.py) and the compose setup (compose/), which
both come from tracewire/topology.py.

The netns tests need root and working ``ip netns`` (CI runs as root); elsewhere
they skip, saying so.  The compose tests need no root: the checked-in compose
file must be exactly what the topology renders, and ``docker-compose config``
must accept it (skipped when docker-compose is not installed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tracewire.topology import TOPOLOGY, Relay, Target, Topology, render_compose, to_compose

from netns import (  # noqa: F401  (network: a module-scoped fixture)
    ENTRYPOINT_TARGET,
    PREFIX,
    NetnsError,
    Network,
    cleanup_stale,
    network,
    skip_unless_netns,
)

PY = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPOSE_DIR = os.path.join(REPO, "compose")
COMPOSE_FILE = os.path.join(COMPOSE_DIR, "docker-compose.yml")
ENTRYPOINT_VIEWER = os.path.join(COMPOSE_DIR, "entrypoint-viewer.sh")


# -- compose: generated from the topology ------------------------------------------------

def test_compose_file_is_rendered_from_topology():
    with open(COMPOSE_FILE) as f:
        checked_in = f.read()
    assert checked_in == render_compose(TOPOLOGY), (
        "compose/docker-compose.yml is stale: run "
        "`python -m tracewire.topology compose > compose/docker-compose.yml`")


def test_compose_document_shape():
    doc = to_compose(TOPOLOGY)
    services = doc["services"]
    assert set(services) == {h.name for h in TOPOLOGY.hosts}
    assert services["collector"]["command"][:3] == ["tracewire-relayd", "--output", "/traces"]
    for t in TOPOLOGY.targets:
        s = services[t.name]
        assert s["environment"]["TRACEWIRE_HOSTNAME"] == t.hostname
        assert s["environment"]["TW_RELAY_URL"] == "tw://collector:6342"
        assert s["networks"]["tracenet"]["ipv4_address"] == t.address
    with open(ENTRYPOINT_VIEWER) as f:
        assert "babeltrace2" in f.read()
    for script in (ENTRYPOINT_TARGET, ENTRYPOINT_VIEWER):
        assert os.access(script, os.X_OK), f"{script} is not executable"
        subprocess.run(["sh", "-n", script], check=True, timeout=10)


def test_docker_compose_config_accepts_it():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    r = subprocess.run([exe, "-f", COMPOSE_FILE, "config", "--services"], capture_output=True,
                       text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) == {h.name for h in TOPOLOGY.hosts}


def test_topology_module_is_pure():
    import ast

    import tracewire.topology as topo
    with open(topo.__file__) as f:
        tree = ast.parse(f.read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    assert not imported & {"trio", "socket", "click", "subprocess", "os"}, imported


def test_topology_rejects_bad_addresses():
    relay = Relay("collector", "collector", "10.77.0.10")
    with pytest.raises(ValueError, match="not a usable address"):
        Topology(relay=relay, targets=(Target("t1", "t1", "10.78.0.11"),))
    with pytest.raises(ValueError, match="duplicate"):
        Topology(relay=relay, targets=(Target("t1", "t1", "10.77.0.10"),))
    with pytest.raises(ValueError, match="private"):
        Topology(relay=Relay("r", "r", "8.8.8.10"), targets=(Target("t", "t", "8.8.8.11"),), subnet="8.8.8.0/24")


# -- netns: helpers run inside the namespaces ------------------------------------------------

# A TCP server: prints "ready", accepts one connection, answers a line with
# "peer-address hostname" (mode echo) or reads to EOF (mode sink); prints JSON.
SERVER = r"""
import json, socket, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(8); s.settimeout(30)
print("ready", flush=True)
c, peer = s.accept(); t0 = time.monotonic(); n = 0
if mode == "echo":
    c.recv(100); c.sendall(f"{peer[0]} {socket.gethostname()}\n".encode())
else:
    while True:
        b = c.recv(1 << 16)
        if not b: break
        n += len(b)
print(json.dumps({"peer": peer[0], "bytes": n, "elapsed": time.monotonic() - t0}), flush=True)
"""

# A TCP client: connect (timeout), optionally send N bytes; prints JSON.
CLIENT = r"""
import json, socket, sys, time
host, port, nbytes, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
t0 = time.monotonic()
try:
    c = socket.create_connection((host, port), timeout=timeout)
except OSError as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__, "elapsed": time.monotonic() - t0})); sys.exit(0)
connect = time.monotonic() - t0
c.settimeout(60)
if nbytes:
    c.sendall(b"x" * nbytes); c.shutdown(socket.SHUT_WR); c.recv(1)
    answer = ""
else:
    c.sendall(b"hi\n"); answer = c.recv(200).decode().strip()
print(json.dumps({"ok": True, "connect": connect, "answer": answer, "hostname": socket.gethostname()}))
"""

# UDP: the sender sends N datagrams, paced, then "END" until the receiver
# answers "ACK" (either may be lost); the receiver counts the datagrams that
# came before the first END -- no silence timeout, so a slow sender loses
# nothing.
UDP_RECV = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try: s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
except OSError: pass
s.bind(("0.0.0.0", int(sys.argv[1]))); s.settimeout(120)
print("ready", flush=True)
n = 0
while True:
    data, peer = s.recvfrom(2048)
    if data == b"END":
        s.sendto(b"ACK", peer)
        break
    n += 1
print(n, flush=True)
"""
UDP_SEND = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
for i in range(int(sys.argv[3])):
    s.send(b"y" * 100)
    if i % 100 == 99: time.sleep(0.005)
s.settimeout(0.05)
for _ in range(600):  # the receiver has its count once one END arrives
    s.send(b"END")
    try:
        if s.recv(16) == b"ACK": break
    except socket.timeout:
        continue
    except ConnectionRefusedError:  # the receiver got an END and has gone
        break
"""


class Server:
    """A helper script started on a host, ready when it prints 'ready'."""

    def __init__(self, net: Network, host: str, code: str, *args: str) -> None:
        self.p = net.popen(host, [PY, "-c", code, *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if line.strip() != "ready":
            self.p.kill()
            _out, err = self.p.communicate(timeout=10)
            raise AssertionError(f"server on {host} did not start: {line!r} {err}")

    def result(self, timeout: float = 30) -> str:
        out, err = self.p.communicate(timeout=timeout)
        assert self.p.returncode == 0, err
        return out.strip()


def client(net: Network, host: str, to: str, port: int, nbytes: int = 0, timeout: float = 5) -> dict:
    r = net.run(host, [PY, "-c", CLIENT, to, str(port), str(nbytes), str(timeout)], timeout=timeout + 60)
    return json.loads(r.stdout)


def tcp_transfer(net: Network, src: str, dst: str, nbytes: int, port: int) -> float:
    """Seconds the receiver needs to get ``nbytes`` from ``src`` (accept to EOF)."""
    srv = Server(net, dst, SERVER, "sink", str(port))
    c = client(net, src, dst, port, nbytes=nbytes, timeout=10)
    assert c["ok"], c
    res = json.loads(srv.result())
    assert res["bytes"] == nbytes
    return res["elapsed"]


def udp_received(net: Network, src: str, dst: str, count: int, port: int) -> int:
    srv = Server(net, dst, UDP_RECV, str(port))
    net.run(src, [PY, "-c", UDP_SEND, dst, str(port), str(count)], timeout=120)
    return int(srv.result(timeout=120))


@pytest.fixture
def net(network):  # noqa: F811  (the module-scoped fixture, imported above, by name)
    """The module's network, with every impairment removed after each test."""
    skip_unless_netns("tc", "nft")
    yield network
    network.clear_all()


# -- netns: the harness itself ------------------------------------------------------------------

def test_hosts_reach_each_other_by_name(net):
    for h in TOPOLOGY.hosts:
        assert net.address(h.name) == h.address
    for src, dst, port in (("target1", "collector", 7001), ("target2", "collector", 7002),
                           ("target1", "target2", 7003), ("viewer", "collector", 7004)):
        srv = Server(net, dst, SERVER, "echo", str(port))
        c = client(net, src, dst, port)
        assert c["ok"], c
        srv.result()
        # the server saw the source's address; each side has its own hostname
        assert c["answer"] == f"{net.address(src)} {net.host(dst).hostname}"
        assert c["hostname"] == net.host(src).hostname
    env = net.env("target1")
    assert env["TRACEWIRE_HOSTNAME"] == "target1"
    assert env["TRACEWIRE_RUNDIR"] != net.env("target2")["TRACEWIRE_RUNDIR"]
    assert os.path.isdir(env["TRACEWIRE_RUNDIR"])


@pytest.mark.parametrize("how", ["drop", "down"])
def test_cut_and_restore(net, how):
    net.cut("target1", how=how)
    srv = Server(net, "collector", SERVER, "echo", "7010")
    c = client(net, "target1", "collector", 7010, timeout=1.5)
    assert not c["ok"], c
    if how == "drop":  # a blackhole: no refusal, the connect times out
        assert c["error"] in ("TimeoutError", "timeout"), c
    # the other target is not affected
    c2 = client(net, "target2", "collector", 7010)
    assert c2["ok"], c2
    srv.result()
    net.restore("target1")
    srv = Server(net, "collector", SERVER, "echo", "7011")
    c = client(net, "target1", "collector", 7011)
    assert c["ok"], c
    srv.result()


def test_shape_limits_throughput_both_ways(net):
    nbytes = 2 * 1024 * 1024
    base = tcp_transfer(net, "target1", "collector", nbytes, 7020)
    expect = nbytes * 8 / 8e6  # 8 Mbit/s: ~2.1 s
    net.shape("target1", rate="8mbit", direction="out")
    up = tcp_transfer(net, "target1", "collector", nbytes, 7021)
    assert up >= 0.75 * expect, (up, expect)
    assert up < 6 * expect
    net.unshape("target1")
    net.shape("target1", rate="8mbit", direction="in")  # on the switch port, towards target1
    down = tcp_transfer(net, "collector", "target1", nbytes, 7022)
    assert down >= 0.75 * expect, (down, expect)
    net.unshape("target1")
    assert base < up / 3, (base, up)


def test_loss_drops_a_fraction_of_datagrams(net):
    n = 2000
    assert udp_received(net, "target1", "collector", n, 7030) >= 0.97 * n
    net.loss("target1", 50, direction="out")
    got = udp_received(net, "target1", "collector", n, 7031)
    assert 0.35 * n < got < 0.65 * n, got
    net.clear_loss("target1")
    net.loss("collector", 50, direction="in")
    got = udp_received(net, "target2", "collector", n, 7032)
    assert 0.35 * n < got < 0.65 * n, got
    net.clear_loss("collector")
    assert udp_received(net, "target1", "collector", n, 7033) >= 0.97 * n


def test_delay_adds_latency_each_way(net):
    def connect_time(first_port: int, samples: int = 3) -> float:
        """The shortest of a few connection times: the delay line adds its
        delay to every one of them, a busy machine only to some."""
        times = []
        for port in range(first_port, first_port + samples):
            srv = Server(net, "collector", SERVER, "echo", str(port))
            c = client(net, "target1", "collector", port)
            srv.result()
            assert c["ok"], c
            times.append(c["connect"])
        return min(times)

    net.delay("target1", 100)  # SYN out +100 ms, SYN-ACK in +100 ms
    t = connect_time(7040)
    assert 0.19 <= t < 1.5, t
    net.delay("target1", 30)   # changed on the fly
    t = connect_time(7043)
    assert 0.05 <= t < 0.5, t
    net.clear_delay("target1")
    assert connect_time(7046) < 0.05


def test_targets_stream_to_the_relay_like_compose(net):
    """compose/entrypoint-target.sh on both targets, the relay on collector, the viewer
    script at the end: the compose setup, run in the namespaces."""
    if shutil.which("babeltrace2") is None:
        pytest.skip("babeltrace2 is not installed (apt-get install babeltrace2)")
    relay = net.popen("collector", ["tracewire-relayd", "--output", net.traces, "--listen", "0.0.0.0:6342",
                                    "--live-listen", "0.0.0.0:6344"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        targets = {t.name: net.popen(t.name, ["sh", ENTRYPOINT_TARGET], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True) for t in TOPOLOGY.targets}
        for name, p in targets.items():
            out, _ = p.communicate(timeout=180)
            assert p.returncode == 0, f"{name}:\n{out}"
        viewer = net.run("viewer", ["sh", ENTRYPOINT_VIEWER, *(t.hostname for t in TOPOLOGY.targets)],
                         env={"TW_STATUS_DIR": net.status, "TW_TRACES": net.traces}, timeout=120)
    finally:
        relay.terminate()
        relay.communicate(timeout=30)
    lines = viewer.stdout.splitlines()
    for t in TOPOLOGY.targets:
        assert os.path.isdir(os.path.join(net.traces, t.hostname))
        mine = [ln for ln in lines if "] (+" in ln and f" {t.hostname}:" in ln and "demo:tick" in ln]
        assert len(mine) == t.events, (t.name, len(mine))


# -- netns: teardown ---------------------------------------------------------------------------

def _namespaces() -> set[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def test_teardown_leaves_nothing_behind():
    skip_unless_netns("tc", "nft")
    with Network() as n:
        tag = n.tag
        dirs = [h.rundir for h in n.hosts.values()] + [n.workdir]
        sleeper = n.popen("target1", ["sleep", "300"])
        n.shape("target1", rate="10mbit")
        n.loss("target2", 10)
        n.delay("collector", 5)
        assert len([ns for ns in _namespaces() if ns.startswith(tag)]) == len(TOPOLOGY.hosts) + 1
    assert not [ns for ns in _namespaces() if ns.startswith(tag)]
    assert n.leftovers() == []
    assert sleeper.poll() is not None
    assert not any(os.path.exists(d) for d in dirs)
    etc = os.listdir("/etc/netns") if os.path.isdir("/etc/netns") else []
    assert not [d for d in etc if d.startswith(tag)]


def test_teardown_after_a_failed_setup(monkeypatch):
    skip_unless_netns()

    def boom(self, timeout=10.0):
        raise NetnsError("injected failure")

    monkeypatch.setattr(Network, "_wait_ready", boom)
    n = Network()
    with pytest.raises(NetnsError, match="injected"):
        n.start()
    assert n.leftovers() == []
    assert not os.path.exists(n.workdir)


def test_cleanup_stale_removes_dead_runs_only():
    skip_unless_netns()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}-{dead.pid}-abc123-sw"
    live = f"{PREFIX}-{os.getpid()}-abc123-sw"
    for ns in (stale, live):
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        removed = cleanup_stale()
        assert stale in removed and live not in removed
        assert stale not in _namespaces() and live in _namespaces()
    finally:
        for ns in (stale, live):
            subprocess.run(["ip", "netns", "del", ns], timeout=10, capture_output=True)
