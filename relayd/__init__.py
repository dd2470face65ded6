"""The relay daemon: accepts consumers over TCP/TLS and writes CTF traces."""

from relayd.daemon import (
    AuthKeyError,
    AuthKeys,
    RelaydConfig,
    RelaydStartupError,
    parse_auth_keys,
    serve_relayd,
)

__all__ = [
    "AuthKeyError",
    "AuthKeys",
    "RelaydConfig",
    "RelaydStartupError",
    "parse_auth_keys",
    "serve_relayd",
]
