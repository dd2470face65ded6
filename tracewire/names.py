"""Validation of names that become path components (host, session, channel,
process) for the CLI and the local daemons.  The rules are the wire
protocol's (``tracewire.wire``): no ``/``, no NUL, no leading dot (so not
``.`` or ``..``), printable, at most 255 UTF-8 bytes — and 200 for session and
channel names, which get a suffix appended on disk.  One rule set, so a name
the CLI accepts is one the relay accepts.
"""

from __future__ import annotations

from tracewire import wire

__all__ = ["InvalidName", "validate_name", "MAX_NAME", "MAX_SESSION_NAME"]

MAX_NAME = wire.MAX_NAME_BYTES
MAX_SESSION_NAME = wire.MAX_SESSION_NAME_BYTES


class InvalidName(ValueError):
    """A name that must not become a path component."""


def validate_name(name: object, what: str = "name", max_bytes: int = MAX_NAME) -> str:
    """Return ``name`` if it is safe as one path component.

    Raises:
        InvalidName: with a message naming ``what`` and the problem.
    """
    try:
        return wire.validate_name(name, what, max_bytes=max_bytes)
    except wire.ProtocolError as exc:
        raise InvalidName(exc.message) from None
