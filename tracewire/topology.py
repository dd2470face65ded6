"""The multi-host test topology, in one place.

One relay (the collection host), N targets (each a sessiond + a traced demo
app streaming to the relay) and an optional viewer, on one private IPv4 /24.
Two things are rendered from it, so they cannot drift apart:

* ``compose/docker-compose.yml`` -- ``python -m tracewire.topology compose``
  writes it (the checked-in file is compared with this rendering by the
  tests);
* the network-namespace harness of the tests (``tests/netns.py``) builds one
  namespace per host, with the same names, hostnames, addresses, /etc/hosts
  and target environment (``target_environment``), and can run the very
  entrypoint script the target containers run (``compose/entrypoint-target.sh``).

This module is pure: no I/O at import, no trio / socket / click.

Command line::

    python -m tracewire.topology compose   # the docker-compose document (YAML)
    python -m tracewire.topology hosts     # /etc/hosts lines for the topology
    python -m tracewire.topology json      # the topology itself, as JSON
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "DEFAULT_SUBNET",
    "Host",
    "Relay",
    "Target",
    "Viewer",
    "Topology",
    "TOPOLOGY",
    "target_environment",
    "to_compose",
    "to_yaml",
    "render_compose",
    "hosts_file",
    "main",
]

DEFAULT_SUBNET = "10.77.0.0/24"

# Paths inside the containers (the netns harness substitutes temp dirs).
CONTAINER_RUNDIR = "/run/tracewire"
CONTAINER_TRACES = "/traces"
CONTAINER_STATUS = "/status"
IMAGE = "tracewire:dev"
NETWORK = "tracenet"

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


@dataclass(frozen=True, slots=True)
class Host:
    """A machine of the topology.

    ``name`` is the compose service name and the harness's key for the host;
    ``hostname`` is the machine's hostname (and what a target reports to the
    relay as ``TRACEWIRE_HOSTNAME``); ``address`` its IPv4 address.
    """

    name: str
    hostname: str
    address: str


@dataclass(frozen=True, slots=True)
class Relay(Host):
    port: int = 6342
    live_port: int = 6344


@dataclass(frozen=True, slots=True)
class Target(Host):
    """A traced machine: sessiond + ``tracewire-demo`` with this load."""

    events: int = 10_000
    rate: float | None = 2_000.0  # events per second; None: as fast as possible
    payload_bytes: int = 64
    session: str = "s1"


@dataclass(frozen=True, slots=True)
class Viewer(Host):
    """Reads the relay's output with babeltrace2 (compose only needs it)."""


@dataclass(frozen=True, slots=True)
class Topology:
    relay: Relay
    targets: tuple[Target, ...]
    viewer: Viewer | None = None
    subnet: str = DEFAULT_SUBNET
    network: str = NETWORK
    image: str = IMAGE

    def __post_init__(self) -> None:
        net = ipaddress.IPv4Network(self.subnet)
        if not net.is_private:
            raise ValueError(f"subnet {self.subnet} is not a private network")
        if not self.targets:
            raise ValueError("a topology needs at least one target")
        names: set[str] = set()
        addrs: set[str] = set()
        reserved = {net.network_address, net.broadcast_address, net.network_address + 1}
        for h in self.hosts:
            if not _NAME.match(h.name) or not _NAME.match(h.hostname):
                raise ValueError(f"bad host name {h.name!r} / hostname {h.hostname!r}")
            a = ipaddress.IPv4Address(h.address)
            if a not in net or a in reserved:
                # .1 is left out: docker takes it for the network's gateway.
                raise ValueError(f"{h.name}: address {h.address} is not a usable address of {net}")
            if h.name in names or h.address in addrs:
                raise ValueError(f"duplicate host name or address: {h.name} {h.address}")
            names.add(h.name)
            addrs.add(h.address)

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    @property
    def hosts(self) -> tuple[Host, ...]:
        """Every host: the relay, the targets, then the viewer if any."""
        return (self.relay, *self.targets, *((self.viewer,) if self.viewer else ()))

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in the topology (hosts: {', '.join(h.name for h in self.hosts)})")

    @property
    def relay_url(self) -> str:
        """What the targets give ``tracewire create --url`` (a name, not an address)."""
        return f"tw://{self.relay.name}:{self.relay.port}"


TOPOLOGY = Topology(
    relay=Relay(name="collector", hostname="collector", address="10.77.0.10"),
    targets=(
        Target(name="target1", hostname="target1", address="10.77.0.11",
               events=20_000, rate=5_000.0, payload_bytes=64),
        Target(name="target2", hostname="target2", address="10.77.0.12",
               events=10_000, rate=2_000.0, payload_bytes=256),
    ),
    viewer=Viewer(name="viewer", hostname="viewer", address="10.77.0.20"),
)


# -- renderings -------------------------------------------------------------------

def hosts_file(topology: Topology) -> str:
    """/etc/hosts content giving every host's name and hostname."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for h in topology.hosts:
        names = [h.name] + ([h.hostname] if h.hostname != h.name else [])
        lines.append(f"{h.address}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def target_environment(topology: Topology, target: Target, *, rundir: str = CONTAINER_RUNDIR,
                       status_dir: str = CONTAINER_STATUS) -> dict[str, str]:
    """The environment ``compose/entrypoint-target.sh`` runs with, for ``target``."""
    env = {
        "TRACEWIRE_HOSTNAME": target.hostname,
        "TRACEWIRE_RUNDIR": rundir,
        "TW_RELAY_URL": topology.relay_url,
        "TW_SESSION": target.session,
        "TW_EVENTS": str(target.events),
        "TW_RATE": "" if target.rate is None else _num(target.rate),
        "TW_PAYLOAD_BYTES": str(target.payload_bytes),
        "TW_STATUS_DIR": status_dir,
    }
    return env


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def to_compose(topology: Topology = TOPOLOGY) -> dict[str, Any]:
    """The docker-compose (file format 3.8) document for ``topology``."""
    build = {"context": "..", "dockerfile": "compose/Dockerfile"}

    def net(h: Host) -> dict[str, Any]:
        return {topology.network: {"ipv4_address": h.address}}

    r = topology.relay
    services: dict[str, Any] = {
        r.name: {
            "build": dict(build),
            "image": topology.image,
            "hostname": r.hostname,
            "command": ["tracewire-relayd", "--output", CONTAINER_TRACES,
                        "--listen", f"0.0.0.0:{r.port}", "--live-listen", f"0.0.0.0:{r.live_port}"],
            "volumes": [f"traces:{CONTAINER_TRACES}"],
            "networks": net(r),
        }
    }
    for t in topology.targets:
        services[t.name] = {
            "build": dict(build),
            "image": topology.image,
            "hostname": t.hostname,
            "command": ["entrypoint-target.sh"],
            "environment": target_environment(topology, t),
            "volumes": [f"status:{CONTAINER_STATUS}"],
            "depends_on": [r.name],
            "networks": net(t),
        }
    if topology.viewer is not None:
        v = topology.viewer
        services[v.name] = {
            "build": dict(build),
            "image": topology.image,
            "hostname": v.hostname,
            "command": ["entrypoint-viewer.sh", *(t.hostname for t in topology.targets)],
            "volumes": [f"traces:{CONTAINER_TRACES}:ro", f"status:{CONTAINER_STATUS}:ro"],
            "depends_on": [t.name for t in topology.targets],
            "networks": net(v),
        }
    return {
        "version": "3.8",
        "services": services,
        "networks": {topology.network: {"ipam": {"config": [{"subnet": topology.subnet}]}}},
        "volumes": {"traces": {}, "status": {}},
    }


_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _num(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a YAML double-quoted scalar
    raise TypeError(f"cannot render {type(v).__name__} as YAML")


def _key(k: Any) -> str:
    if not isinstance(k, str):
        raise TypeError(f"mapping keys must be strings, not {type(k).__name__}")
    return k if _PLAIN.match(k) and k not in ("true", "false", "null", "yes", "no", "on", "off") else json.dumps(k)


def to_yaml(doc: Any, indent: int = 0) -> str:
    """A small, deterministic YAML emitter for dicts / lists / scalars (no PyYAML needed)."""
    pad = " " * indent
    out: list[str] = []
    if isinstance(doc, dict):
        if not doc:
            return pad + "{}\n"
        for k, v in doc.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{_key(k)}:\n{to_yaml(v, indent + 2)}")
            elif isinstance(v, dict):
                out.append(f"{pad}{_key(k)}: {{}}\n")
            elif isinstance(v, list):
                out.append(f"{pad}{_key(k)}: []\n")
            else:
                out.append(f"{pad}{_key(k)}: {_scalar(v)}\n")
    elif isinstance(doc, list):
        if not doc:
            return pad + "[]\n"
        for v in doc:
            if isinstance(v, (dict, list)) and v:
                inner = to_yaml(v, indent + 2)
                out.append(f"{pad}- {inner[indent + 2:]}")  # first line after the dash
            else:
                out.append(f"{pad}- {to_yaml(v, 0).strip() if isinstance(v, (dict, list)) else _scalar(v)}\n")
    else:
        out.append(f"{pad}{_scalar(doc)}\n")
    return "".join(out)


COMPOSE_HEADER = (
    "# GENERATED from tracewire/topology.py -- do not edit by hand.\n"
    "# Regenerate:  python -m tracewire.topology compose > compose/docker-compose.yml\n"
    "# The tests (tests/test_netns.py) check that this file matches the topology.\n"
)


def render_compose(topology: Topology = TOPOLOGY) -> str:
    """The text of ``compose/docker-compose.yml``."""
    return COMPOSE_HEADER + to_yaml(to_compose(topology))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    what = args[0] if args else ""
    if what == "compose":
        sys.stdout.write(render_compose(TOPOLOGY))
    elif what == "hosts":
        sys.stdout.write(hosts_file(TOPOLOGY))
    elif what == "json":
        d = asdict(TOPOLOGY)
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
    else:
        sys.stderr.write("usage: python -m tracewire.topology compose|hosts|json\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
