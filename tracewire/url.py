"""Relay URLs: ``tw://HOST[:PORT]`` (TCP) and ``tws://HOST[:PORT]`` (TLS);
``HOST:PORT`` text for addresses (``[IPv6]:PORT``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["DEFAULT_PORT", "RelayURL", "format_hostport", "parse_url"]

DEFAULT_PORT = 6342


def format_hostport(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 address in brackets (``[::1]:6342``).

    Args:
        host: A hostname, an IPv4 address or an IPv6 address (any host
            holding ``:`` is taken for IPv6).
        port: The port.

    Returns:
        The text, as URLs and ``--listen`` options write it.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class RelayURL:
    """A parsed relay URL.

    Attributes:
        host: Hostname or address (an IPv6 address without brackets).
        port: TCP port.
        tls: ``tws://`` (TLS) rather than ``tw://``.
    """

    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'tws' if self.tls else 'tw'}://{format_hostport(self.host, self.port)}"


def parse_url(url: str) -> RelayURL:
    """Parse a relay URL.

    Args:
        url: ``tw://HOST[:PORT]`` or ``tws://HOST[:PORT]``.

    Returns:
        The URL's parts; the port defaults to :data:`DEFAULT_PORT`.

    Raises:
        ValueError: another scheme, no host, a path or query, or a bad port.
    """
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as exc:
        raise ValueError(f"bad relay URL {url!r}: {exc}") from None
    if u.scheme not in ("tw", "tws"):
        raise ValueError(f"bad relay URL {url!r}: use tw://HOST[:PORT] or tws://HOST[:PORT]")
    if not u.hostname:
        raise ValueError(f"bad relay URL {url!r}: no host")
    if u.path not in ("", "/") or u.query or u.fragment or u.username:
        raise ValueError(f"bad relay URL {url!r}: only tw[s]://HOST[:PORT] is allowed")
    return RelayURL(u.hostname, port or DEFAULT_PORT, u.scheme == "tws")
