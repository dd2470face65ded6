"""A multi-host test harness made of Linux network namespaces.

Built from ``tracewire.topology`` (the same source the compose file is rendered
from), a :class:`Network` gives every host of the topology its own network
namespace, wired to a bridge in a private "switch" namespace::

      ns <tag>-collector          ns <tag>-target1   ns <tag>-target2   ...
      eth0 10.77.0.10/24          eth0 10.77.0.11    eth0 10.77.0.12
          |  veth                     |                  |
      ----vs0------------------------vs1----------------vs2----  br0   ns <tag>-sw

Nothing is created in the root namespace: both ends of every veth are made
directly inside their namespaces, so the 10.77.0.0/24 addresses exist only in
namespaces this harness owns, and the machine's own interfaces, routes and
firewall are not touched.  ``<tag>`` is ``twnet-<pid>-<random>`` so parallel
runs never collide, and :func:`cleanup_stale` can tell leftovers of dead runs.

Per host: ``lo`` up, its address on ``eth0``, an /etc/hosts naming every host
(``ip netns exec`` bind-mounts ``/etc/netns/<ns>/hosts``), a kernel hostname of
its own (each command runs in a fresh UTS namespace), a private
``TRACEWIRE_RUNDIR`` and ``TRACEWIRE_HOSTNAME``; targets also get the
environment of ``compose/entrypoint-target.sh`` (``TW_*``), so
``net.run("target1", ["sh", ENTRYPOINT_TARGET])`` does exactly what a target
container does.  ``net.traces`` / ``net.status`` stand for the compose volumes.

Link control (all per host; "out" is what the host sends, "in" what it receives):

* ``cut(host)`` / ``restore(host)`` -- a silent blackhole (nftables drop of
  every frame from and to the host's switch port: TCP sees timeouts, like a
  pulled cable in the middle of the network); ``cut(host, how="down")``
  instead takes the switch port down (the host sees carrier loss).
* ``shape(host, rate=, burst=, latency=, direction=)`` / ``unshape(host)`` --
  a ``tbf`` qdisc on the host's eth0 (out) and on its switch port (in).
* ``loss(host, percent, direction=)`` / ``clear_loss(host)`` -- nftables
  ``numgen random mod 100 < N drop`` on the frames from / to the host's
  switch port, independently per direction.  cut and loss rules live in one
  ``bridge twnet`` table (forward hook) in the switch namespace, so a drop is
  a loss on the wire: the host's own stack is not told (no EPERM/ENOBUFS).
* ``delay(host, ms)`` / ``clear_delay(host)`` -- see below.
* ``clear(host)`` / ``clear_all()`` -- remove every impairment.

Generic segmentation offload is turned off on the veths (when ``ethtool`` is
available) so that loss and shaping act on wire-sized packets, not 64 KiB GSO
super-packets.

Delay.  This machine's kernel has no ``sch_netem``, and nothing else in tc or
nftables holds a packet back for a given time (tbf's ``latency`` only bounds the
queue; nftables can drop, not delay).  So delay is done in user space: while a
host has a delay, its switch port is moved to a small bridge of its own, joined
to the main bridge through two TAP devices, and a "delay line" process (this
file run as a script, in the switch namespace) copies Ethernet frames between
the two TAPs, holding each frame for ``ms`` milliseconds, in each direction
(so the round trip to an undelayed host grows by ``2 * ms``).  Order is kept,
there is no jitter; it costs a Python process forwarding the host's frames
(tens of thousands of frames per second -- plenty for these tests, not for
gigabit benchmarks).  With no delay set, frames take the plain kernel path.

Requires root (or CAP_NET_ADMIN + CAP_SYS_ADMIN), ``ip`` (iproute2); ``tc`` for
shape, ``nft`` for cut/loss.  :func:`netns_unavailable_reason` /
:data:`requires_netns` / :func:`skip_unless_netns` turn their absence into a
clear skip.  Every teardown (also after a failed setup or test) kills the
processes left in the namespaces and deletes the namespaces (which takes their
interfaces, qdiscs and nft tables with them), the /etc/netns entries and the
temp directories.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tracewire.topology import Topology

try:  # the delay line runs this file as a script, where pytest is not needed
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

PREFIX = "twnet"
BIN_DIR = os.path.dirname(sys.executable)
PYTHON = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT_TARGET = os.path.join(REPO, "compose", "entrypoint-target.sh")
IFACE = "eth0"          # every host's interface, inside its own namespace
BRIDGE = "br0"          # the switch, in the switch namespace
CMD_TIMEOUT = 30.0

__all__ = [
    "PREFIX", "ENTRYPOINT_TARGET", "NetnsError", "Network", "NetHost",
    "cleanup_stale", "netns_unavailable_reason", "requires_netns", "skip_unless_netns",  # noqa: F822 (module __getattr__)
    "network",
]


class NetnsError(RuntimeError):
    """A command that sets up or controls the network failed."""


def _cmd(argv: Sequence[str], *, timeout: float = CMD_TIMEOUT, check: bool = True,
         input: str | None = None) -> subprocess.CompletedProcess:
    """Run an administrative command; a failure raises NetnsError naming it."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise NetnsError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from None
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r


# -- can we? -------------------------------------------------------------------------

_reason_cache: list[str | None] = []


def netns_unavailable_reason() -> str | None:
    """None when network namespaces can be made here, else why not (for a skip)."""
    if _reason_cache:
        return _reason_cache[0]
    reason: str | None = None
    if not sys.platform.startswith("linux"):
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = "needs root to create network namespaces (ip netns); CI runs these as root"
    elif shutil.which("ip") is None:
        reason = "`ip` (iproute2) is not installed"
    else:
        probe = f"{PREFIX}-{os.getpid()}-probe{secrets.token_hex(2)}"
        try:
            _cmd(["ip", "netns", "add", probe], timeout=10)
            _cmd(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], timeout=10)
        except NetnsError as exc:
            reason = f"`ip netns` / veth do not work here: {exc}"
        finally:
            _cmd(["ip", "netns", "del", probe], timeout=10, check=False)
    _reason_cache.append(reason)
    return reason


def _tool_reason(tool: str, what: str) -> str | None:
    return None if shutil.which(tool) else f"`{tool}` is not installed (needed for {what})"


def skip_unless_netns(*tools: str) -> None:
    """pytest.skip with a clear reason unless netns (and ``tools``: "tc", "nft") work."""
    reason = netns_unavailable_reason()
    for t in tools:
        reason = reason or _tool_reason(t, {"tc": "shaping", "nft": "cut/loss"}.get(t, t))
    if reason:
        pytest.skip(reason)


def __getattr__(name: str):
    # ``requires_netns`` (a skipif marker) is computed on first use, not at import:
    # finding out means creating a probe namespace.
    if name == "requires_netns" and pytest is not None:
        reason = netns_unavailable_reason()
        return pytest.mark.skipif(reason is not None, reason=reason or "")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the network ---------------------------------------------------------------------

@dataclass
class NetHost:
    """One host of a running Network."""

    name: str
    hostname: str
    address: str
    ns: str                  # network namespace name
    port: str                # its veth's peer in the switch namespace
    rundir: str              # TRACEWIRE_RUNDIR
    env: dict[str, str]
    # impairment state
    cut: str | None = None   # None, "drop" or "down"
    loss_in: int = 0
    loss_out: int = 0
    shaped: set[str] = field(default_factory=set)   # {"in", "out"}
    delay_ms: float = 0.0
    delay_proc: subprocess.Popen | None = None


class Network:
    """The topology as network namespaces.  Use as a context manager::

        with Network() as net:
            net.run("target1", ["ping", "-c1", "collector"])
    """

    def __init__(self, topology: Topology | None = None, *, prefix: str = PREFIX, offload: bool = False,
                 base_env: dict[str, str] | None = None) -> None:
        from tracewire.topology import TOPOLOGY
        self.topology = topology if topology is not None else TOPOLOGY
        self.prefix = prefix
        self.offload = offload
        self.tag = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.switch_ns = f"{self.tag}-sw"
        self.hosts: dict[str, NetHost] = {}
        self.workdir = ""
        self.traces = ""         # the relay's --output (compose volume "traces")
        self.status = ""         # the targets' TW_STATUS_DIR (compose volume "status")
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> Network:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self._started:
            raise NetnsError("network already started")
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsError(reason)
        self._started = True
        try:
            self._build()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    def _build(self) -> None:
        from tracewire.topology import Target, hosts_file, target_environment
        top = self.topology
        self.workdir = tempfile.mkdtemp(prefix=f"{self.tag}-", dir="/tmp")
        self.traces = os.path.join(self.workdir, "traces")
        self.status = os.path.join(self.workdir, "status")
        os.makedirs(self.traces)
        os.makedirs(self.status)

        sw = self.switch_ns
        self._add_ns(sw)
        _cmd(["ip", "-n", sw, "link", "set", "lo", "up"])
        _cmd(["ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge"])
        _cmd(["ip", "-n", sw, "link", "set", BRIDGE, "up"])
        hosts_text = hosts_file(top)
        plen = top.prefixlen
        for i, h in enumerate(top.hosts):
            ns = f"{self.tag}-{h.name}"
            port = f"vs{i}"
            self._add_ns(ns)
            etc = f"/etc/netns/{ns}"
            os.makedirs(etc, exist_ok=True)
            with open(os.path.join(etc, "hosts"), "w") as f:
                f.write(hosts_text)
            _cmd(["ip", "link", "add", IFACE, "netns", ns, "type", "veth", "peer", "name", port, "netns", sw])
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            _cmd(["ip", "-n", ns, "addr", "add", f"{h.address}/{plen}", "dev", IFACE])
            _cmd(["ip", "-n", ns, "link", "set", IFACE, "up"])
            _cmd(["ip", "-n", sw, "link", "set", port, "master", BRIDGE])
            _cmd(["ip", "-n", sw, "link", "set", port, "up"])
            # No IPv6 chatter (router solicitations, DAD) in the measurements.
            _cmd(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"], check=False)
            if not self.offload and shutil.which("ethtool"):
                _cmd(["ip", "netns", "exec", ns, "ethtool", "-K", IFACE, "tso", "off", "gso", "off"], check=False)
                _cmd(["ip", "netns", "exec", sw, "ethtool", "-K", port, "tso", "off", "gso", "off"], check=False)
            rundir = tempfile.mkdtemp(prefix=f"twn-{h.name}-", dir="/tmp")  # short: unix socket paths
            env = dict(self._base_env)
            env.pop("TRACEWIRE_DEBUG", None)
            env["PATH"] = BIN_DIR + os.pathsep + env.get("PATH", "")
            env["TRACEWIRE_RUNDIR"] = rundir
            env["TRACEWIRE_HOSTNAME"] = h.hostname
            if isinstance(h, Target):
                env.update(target_environment(top, h, rundir=rundir, status_dir=self.status))
            self.hosts[h.name] = NetHost(h.name, h.hostname, h.address, ns, port, rundir, env)
        self._wait_ready()

    def _add_ns(self, ns: str) -> None:
        _cmd(["ip", "netns", "add", ns])
        self._namespaces.append(ns)

    def _wait_ready(self, timeout: float = 10.0) -> None:
        """Every bridge port forwarding (no STP, so at once; but check)."""
        deadline = time.monotonic() + timeout
        while True:
            out = _cmd(["ip", "-n", self.switch_ns, "-o", "link", "show", "master", BRIDGE]).stdout
            if out.count("state UP") >= len(self.hosts):
                return
            if time.monotonic() > deadline:
                raise NetnsError(f"bridge ports not up after {timeout:.0f} s:\n{out}")
            time.sleep(0.05)

    def close(self) -> None:
        """Tear everything down; safe to call twice, and after a failed start."""
        errors: list[str] = []
        for h in self.hosts.values():
            self._stop_delay_line(h)
        for p in self._procs:
            _terminate(p)
        self._procs.clear()
        for ns in self._namespaces:
            _kill_ns_processes(ns)
        for ns in reversed(self._namespaces):
            r = _cmd(["ip", "netns", "del", ns], check=False)
            if r.returncode != 0 and "No such file" not in r.stderr:
                errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        self._namespaces.clear()
        for h in self.hosts.values():
            shutil.rmtree(h.rundir, ignore_errors=True)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise NetnsError("teardown: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        """Namespaces of this network that still exist (empty after close())."""
        return [ns for ns in _list_netns() if ns.startswith(self.tag + "-")]

    # -- hosts and commands ----------------------------------------------------------------
    def host(self, name: str) -> NetHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(f"no host {name!r} (hosts: {', '.join(self.hosts)})") from None

    def address(self, name: str) -> str:
        return self.host(name).address

    def env(self, name: str) -> dict[str, str]:
        """A copy of the host's environment (TRACEWIRE_RUNDIR, TRACEWIRE_HOSTNAME, TW_*...)."""
        return dict(self.host(name).env)

    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run in the host's namespace, with its own hostname."""
        h = self.host(name)
        return ["ip", "netns", "exec", h.ns, "unshare", "--uts", "--",
                "sh", "-c", 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"', h.hostname, *argv]

    def run(self, name: str, argv: Sequence[str], *, timeout: float = 60.0, check: bool = True,
            env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` on host ``name`` to completion (text, output captured by default)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        if "input" not in kwargs:
            kwargs.setdefault("stdin", subprocess.DEVNULL)
        full_env = self.env(name) | (env or {})
        try:
            r = subprocess.run(self.argv(name, argv), env=full_env, timeout=timeout, **kwargs)
        except subprocess.TimeoutExpired as exc:
            raise NetnsError(f"on {name}: {' '.join(argv)}: still running after {timeout:.0f} s "
                             f"(output: {exc.stdout!r} {exc.stderr!r})") from None
        if check and r.returncode != 0:
            raise NetnsError(f"on {name}: {' '.join(argv)} exited {r.returncode}:\n"
                             f"{r.stdout or ''}{r.stderr or ''}")
        return r

    def popen(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              **kwargs) -> subprocess.Popen:
        """Start ``argv`` on host ``name``; it is killed at teardown if still running."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self.argv(name, argv), env=self.env(name) | (env or {}), **kwargs)
        self._procs.append(p)
        return p

    # -- link control --------------------------------------------------------------------
    def cut(self, name: str, how: str = "drop") -> None:
        """Cut the host off: ``drop`` (silent blackhole) or ``down`` (switch port down)."""
        h = self.host(name)
        if how not in ("drop", "down"):
            raise ValueError("how must be 'drop' or 'down'")
        if h.cut and h.cut != how:
            self.restore(name)
        h.cut = how
        if how == "down":
            _cmd(["ip", "-n", self.switch_ns, "link", "set", h.port, "down"])
        else:
            self._apply_nft(h)

    def restore(self, name: str) -> None:
        """Undo cut()."""
        h = self.host(name)
        how, h.cut = h.cut, None
        if how == "down":
            _cmd(["ip", "-n", self.switch_ns, "link", "set", h.port, "up"])
        elif how == "drop":
            self._apply_nft(h)

    def loss(self, name: str, percent: float, direction: str = "both") -> None:
        """Drop ``percent`` % of the host's packets at random (per direction)."""
        h = self.host(name)
        pct = round(percent)
        if not 0 <= pct <= 100:
            raise ValueError("percent must be within 0..100")
        ins, outs = _directions(direction)
        if ins:
            h.loss_in = pct
        if outs:
            h.loss_out = pct
        self._apply_nft(h)

    def clear_loss(self, name: str) -> None:
        h = self.host(name)
        h.loss_in = h.loss_out = 0
        self._apply_nft(h)

    def _apply_nft(self, h: NetHost | None = None) -> None:
        """Rewrite the switch's nft table from every host's state, atomically.

        The rules live in the switch namespace, in the bridge's forward hook:
        ``iifname PORT`` is what the host sends, ``oifname PORT`` what it
        receives.  Dropped there, a frame is lost "on the wire": the hosts'
        stacks see nothing (no EPERM / ENOBUFS to the sender), and ARP is cut
        too."""
        table = f"bridge {PREFIX}"
        rules: list[str] = []
        for x in self.hosts.values():
            if x.cut == "drop":
                rules += [f'iifname "{x.port}" drop', f'oifname "{x.port}" drop']
            if x.loss_out:
                rules.append(f'iifname "{x.port}" numgen random mod 100 < {x.loss_out} drop')
            if x.loss_in:
                rules.append(f'oifname "{x.port}" numgen random mod 100 < {x.loss_in} drop')
        script = f"add table {table}\ndelete table {table}\n"
        if rules:
            script += (f"table {table} {{\n  chain forward {{\n"
                       "    type filter hook forward priority 0; policy accept;\n"
                       + "".join(f"    {r}\n" for r in rules) + "  }\n}\n")
        _cmd(["ip", "netns", "exec", self.switch_ns, "nft", "-f", "-"], input=script)

    def shape(self, name: str, rate: str = "20mbit", burst: str = "32kb", latency: str = "50ms",
              direction: str = "both") -> None:
        """Limit the host's bandwidth with tbf: out on its eth0, in on its switch port."""
        h = self.host(name)
        ins, outs = _directions(direction)
        tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        if outs:
            _cmd(["tc", "-n", h.ns, "qdisc", "replace", "dev", IFACE, *tbf])
            h.shaped.add("out")
        if ins:
            _cmd(["tc", "-n", self.switch_ns, "qdisc", "replace", "dev", h.port, *tbf])
            h.shaped.add("in")

    def unshape(self, name: str) -> None:
        h = self.host(name)
        if "out" in h.shaped:
            _cmd(["tc", "-n", h.ns, "qdisc", "del", "dev", IFACE, "root"], check=False)
        if "in" in h.shaped:
            _cmd(["tc", "-n", self.switch_ns, "qdisc", "del", "dev", h.port, "root"], check=False)
        h.shaped.clear()

    def delay(self, name: str, ms: float) -> None:
        """Hold every frame to and from the host ``ms`` milliseconds (each way); 0 removes."""
        h = self.host(name)
        if ms < 0:
            raise ValueError("ms must be >= 0")
        if ms == 0:
            self.clear_delay(name)
            return
        if h.delay_proc is not None and h.delay_proc.poll() is None:
            assert h.delay_proc.stdin is not None
            h.delay_proc.stdin.write(f"{ms}\n")
            h.delay_proc.stdin.flush()
            h.delay_ms = ms
            return
        i = h.port[2:]
        tap_host, tap_bridge, small = f"ta{i}", f"tb{i}", f"bd{i}"
        sw = self.switch_ns
        p = subprocess.Popen(
            ["ip", "netns", "exec", sw, PYTHON, os.path.abspath(__file__), "delayline",
             tap_host, tap_bridge, str(ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        h.delay_proc = p
        h.delay_ms = ms
        try:
            ready, _, _ = select.select([p.stdout], [], [], 15)
            line = p.stdout.readline() if ready else ""
            if line.strip() != "ready":
                raise NetnsError(f"delay line for {name} did not start: {line.strip()} {_drain(p)}")
            _cmd(["ip", "-n", sw, "link", "add", small, "type", "bridge"])
            _cmd(["ip", "-n", sw, "link", "set", small, "up"])
            _cmd(["ip", "-n", sw, "link", "set", tap_host, "master", small, "up"])
            _cmd(["ip", "-n", sw, "link", "set", tap_bridge, "master", BRIDGE, "up"])
            _cmd(["ip", "-n", sw, "link", "set", h.port, "nomaster"])
            _cmd(["ip", "-n", sw, "link", "set", h.port, "master", small])
            if h.cut != "down":
                _cmd(["ip", "-n", sw, "link", "set", h.port, "up"])
        except BaseException:
            with contextlib.suppress(Exception):
                self.clear_delay(name)
            raise

    def clear_delay(self, name: str) -> None:
        h = self.host(name)
        if h.delay_proc is None:
            return
        sw = self.switch_ns
        _cmd(["ip", "-n", sw, "link", "set", h.port, "nomaster"], check=False)
        _cmd(["ip", "-n", sw, "link", "set", h.port, "master", BRIDGE], check=False)
        if h.cut != "down":
            _cmd(["ip", "-n", sw, "link", "set", h.port, "up"], check=False)
        self._stop_delay_line(h)
        _cmd(["ip", "-n", sw, "link", "del", f"bd{h.port[2:]}"], check=False)

    def _stop_delay_line(self, h: NetHost) -> None:
        p, h.delay_proc, h.delay_ms = h.delay_proc, None, 0.0
        if p is not None:
            _terminate(p)

    def clear(self, name: str) -> None:
        """Remove every impairment of the host (cut, loss, shaping, delay)."""
        h = self.host(name)
        if h.cut:
            self.restore(name)
        if h.loss_in or h.loss_out:
            self.clear_loss(name)
        if h.shaped:
            self.unshape(name)
        if h.delay_proc is not None:
            self.clear_delay(name)

    def clear_all(self) -> None:
        for name in self.hosts:
            self.clear(name)


def _directions(direction: str) -> tuple[bool, bool]:
    if direction not in ("both", "in", "out"):
        raise ValueError("direction must be 'both', 'in' or 'out'")
    return direction in ("both", "in"), direction in ("both", "out")


def _drain(p: subprocess.Popen) -> str:
    """Stop ``p`` and return what it wrote on stderr."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    try:
        _out, err = p.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        err = ""
    return (err or "").strip()


def _terminate(p: subprocess.Popen, grace: float = 3.0) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
    try:
        p.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        with contextlib.suppress(Exception):
            p.kill()
            p.wait(5)
    for f in (p.stdin, p.stdout, p.stderr):
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()


def _ns_pids(ns: str) -> list[int]:
    r = _cmd(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()] if r.returncode == 0 else []


def _kill_ns_processes(ns: str) -> None:
    """SIGINT and SIGTERM (a daemon's first signal drains or stops its
    sessions, the second exits at once), then SIGKILL, whatever still runs in
    one of our namespaces."""
    pids = _ns_pids(ns)
    for sig, wait in ((signal.SIGINT, 0.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pids = _ns_pids(ns)
            if not pids:
                return
            time.sleep(0.05)


def _list_netns() -> list[str]:
    r = _cmd(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Remove namespaces (and /etc/netns entries) left by dead runs: those named
    ``<prefix>-<pid>-...`` whose pid no longer exists.  Returns what was removed."""
    removed: list[str] = []
    pat = re.compile(rf"^{re.escape(prefix)}-(\d+)-")
    names = set(_list_netns())
    with contextlib.suppress(FileNotFoundError):
        names |= set(os.listdir("/etc/netns"))
    for ns in sorted(names):
        m = pat.match(ns)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if ns in _list_netns():
            _kill_ns_processes(ns)
            _cmd(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        removed.append(ns)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if pytest is not None:
    @pytest.fixture(scope="module")
    def network() -> Iterator[Network]:
        """A Network of the default topology, shared by a test module: import it into
        the module (``from netns import network``).  Impairments persist between
        tests; clear them (``network.clear_all()``) in a function fixture."""
        skip_unless_netns()
        cleanup_stale()
        with Network() as net:
            yield net


# -- the delay line (run as a script in the switch namespace) ------------------------------

def _open_tap(name: str) -> int:
    import fcntl
    import struct
    TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def _delayline(tap_a: str, tap_b: str, ms: float) -> int:
    """Copy frames tap_a <-> tap_b, each held ``ms`` ms; a line on stdin sets a new
    delay; EOF on stdin (the harness gone) ends it.  The TAPs vanish with it."""
    from collections import deque
    a, b = _open_tap(tap_a), _open_tap(tap_b)
    other = {a: b, b: a}
    queues: dict[int, deque] = {a: deque(), b: deque()}
    max_queue = 20000
    delay = ms / 1000.0
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    poller = select.poll()
    for fd in (a, b, 0):
        poller.register(fd, select.POLLIN)
    pending = b""
    while True:
        now = time.monotonic()
        nxt = None
        for src, q in queues.items():
            while q and q[0][0] <= now:
                frame = q.popleft()[1]
                try:
                    os.write(other[src], frame)
                except OSError as exc:  # the far TAP down or full: the frame is lost
                    if exc.errno not in (errno.EAGAIN, errno.EIO, errno.ENOBUFS, errno.EINVAL):
                        raise
            if q and (nxt is None or q[0][0] < nxt):
                nxt = q[0][0]
        timeout = None if nxt is None else max(0, math.ceil((nxt - time.monotonic()) * 1000))
        for fd, _ev in poller.poll(timeout):
            if fd == 0:
                data = os.read(0, 4096)
                if not data:
                    return 0
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip():
                        delay = float(line) / 1000.0
                continue
            q = queues[fd]
            for _ in range(256):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EIO:  # TAP not up yet
                        break
                    raise
                if len(q) < max_queue:
                    q.append((time.monotonic() + delay, frame))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "delayline":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        sys.exit(_delayline(sys.argv[2], sys.argv[3], float(sys.argv[4])))
    sys.stderr.write("usage: netns.py delayline TAP_A TAP_B MS\n")
    sys.exit(2)
