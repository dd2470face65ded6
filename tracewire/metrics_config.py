"""The ``--metrics-listen`` configuration, apart from the metrics server.

Standard library only and cheap to import: the daemons' command lines parse
the option with it before sessiond forks its consumerd zygote, which must not
inherit the metrics server's modules (:mod:`tracewire.metrics_server`, imported
by the daemon once it serves).
"""

from __future__ import annotations

from dataclasses import dataclass

from tracewire.url import format_hostport

__all__ = ["MetricsConfig", "parse_listen"]


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Where and how the metrics endpoint serves.

    Attributes:
        host, port: the address (port 0: a free one).
        timeout: seconds a snapshot may take in the loop (and a scrape waits).
        max_connections: scrape connections served at once; more are closed.
        request_timeout: seconds any read or write of a connection may take.
    """

    host: str = "127.0.0.1"
    port: int = 9464
    timeout: float = 10.0
    max_connections: int = 8
    request_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if self.timeout <= 0 or self.request_timeout <= 0 or self.max_connections < 1:
            raise ValueError("metrics timeouts must be > 0 and max_connections >= 1")

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


def parse_listen(text: str) -> MetricsConfig:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``PORT`` alone (on 127.0.0.1:
    whoever reaches the port reads every session's names) as a
    MetricsConfig; port 0: a free one.

    Raises:
        ValueError: not of that form (the text says what is expected).
    """
    if text.isdigit() and int(text) <= 65535:
        return MetricsConfig(host="127.0.0.1", port=int(text))
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT or PORT (e.g. 127.0.0.1:9464, [::1]:9464, 9464)")
    return MetricsConfig(host=host, port=int(port))
