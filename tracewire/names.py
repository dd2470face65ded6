"""Validation of names that become path components (host, session, channel,
process): no ``/``, no NUL, not ``.`` or ``..``, no leading dot, printable,
1..255 characters.  Everything that turns a name into a path goes through here.
"""

from __future__ import annotations

__all__ = ["InvalidName", "validate_name", "MAX_NAME"]

MAX_NAME = 255


class InvalidName(ValueError):
    """A name that must not become a path component."""


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is safe as one path component.

    Raises:
        InvalidName: with a message naming ``what`` and the problem.
    """
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be a string")
    if not 1 <= len(name) <= MAX_NAME:
        raise InvalidName(f"{what} must be 1 to {MAX_NAME} characters long")
    if "/" in name or "\0" in name:
        raise InvalidName(f"{what} {name!r} must not contain '/' or NUL")
    if name.startswith("."):
        raise InvalidName(f"{what} {name!r} must not start with '.'")
    if not name.isprintable() or any(c.isspace() for c in name):
        raise InvalidName(f"{what} {name!r} must be printable, without spaces")
    return name
