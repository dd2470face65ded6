"""Relay URLs: ``tw://HOST[:PORT]`` (TCP) and ``tws://HOST[:PORT]`` (TLS)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["DEFAULT_PORT", "RelayURL", "parse_url"]

DEFAULT_PORT = 6342


@dataclass(frozen=True, slots=True)
class RelayURL:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'tws' if self.tls else 'tw'}://{host}:{self.port}"


def parse_url(url: str) -> RelayURL:
    """Parse a relay URL.

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
