"""Auth key files: the one parser for the target's key and the relay's keys.

Format (one for both sides)
---------------------------
A UTF-8 text file of at most :data:`MAX_KEY_FILE_SIZE` bytes, one key per
line::

    # comment
    KEY_ID SECRET HOST...

* Words are separated by whitespace (``str.split``); lines end as
  ``str.splitlines`` ends them.
* A word that *starts* with ``#`` starts a comment up to the end of the
  line; a ``#`` inside a word is part of it (so a secret may hold ``#``).
  Blank and comment-only lines are skipped.
* ``KEY_ID`` and every ``HOST`` other than ``*`` (any host) must pass the
  caller's name check (the wire protocol's rule for names); the key id is
  unique in the file.
* ``SECRET`` is at least :data:`MIN_SECRET_CHARS` characters; the HMAC key is
  its UTF-8 bytes.
* The file is a regular file (opened without blocking, so a FIFO cannot
  hang the reader) and holds at least one key.

Sides
-----
:attr:`Side.RELAY` (``tracewire-relayd --auth-keys``) needs at least one HOST
per line, uses every key, and refuses a file that group or others may
access. :attr:`Side.TARGET` (``--auth-key-file``) needs ``KEY_ID SECRET``,
uses the first key, and checks, but does not use, HOST words (so a line of
the relay's file is a valid target file); a file others may read is
accepted, and :meth:`KeyFile.permission_problem` says why it should not be.

The module is stdlib-only and does no I/O beyond reading the one file.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "ANY_HOST",
    "MAX_KEY_FILE_SIZE",
    "MIN_SECRET_CHARS",
    "Key",
    "KeyFile",
    "KeyFileError",
    "KeyFileErrorCode",
    "NameCheck",
    "Side",
    "parse_keys",
    "read_key_file",
]

#: Largest key file read, in bytes (a relay's file of thousands of keys fits).
MAX_KEY_FILE_SIZE = 1024 * 1024
#: Shortest secret accepted, in characters.
MIN_SECRET_CHARS = 32
#: The HOST word that lets a key write under any hostname.
ANY_HOST = "*"

#: Checks a name: ``check(name, what)`` raises ValueError, whose text says
#: what is wrong (``what`` is "key id" or "host"), if ``name`` is unfit.
NameCheck = Callable[[str, str], object]

_PRIVATE_MODE_MASK = 0o077


class Side(enum.Enum):
    """Who reads the file, which decides the few rules that differ."""

    TARGET = "target"
    RELAY = "relay"

    @property
    def label(self) -> str:
        """How messages name the file."""
        return "auth key file" if self is Side.RELAY else "key file"

    @property
    def syntax(self) -> str:
        """The shortest valid key line, as messages show it."""
        return "KEY_ID SECRET HOST..." if self is Side.RELAY else "KEY_ID SECRET"


class KeyFileErrorCode(enum.Enum):
    """Machine-readable reason carried by :class:`KeyFileError`."""

    UNREADABLE = "unreadable"
    NOT_REGULAR = "not-regular"
    LOOSE_PERMISSIONS = "loose-permissions"
    TOO_LARGE = "too-large"
    NOT_UTF8 = "not-utf8"
    BAD_LINE = "bad-line"
    BAD_NAME = "bad-name"
    SHORT_SECRET = "short-secret"
    DUPLICATE_KEY = "duplicate-key"
    NO_KEY = "no-key"


class KeyFileError(ValueError):
    """A key file is unsafe, unreadable or malformed.

    The text names the file, and ``FILE:LINE`` for a problem on one line.

    Attributes:
        code: What kind of problem it is.
        path: The key file.
        line: The 1-based line number, or None for the file as a whole.
    """

    def __init__(self, message: str, *, code: KeyFileErrorCode, path: str, line: int | None = None) -> None:
        super().__init__(message if line is None else f"{path}:{line}: {message}")
        self.code = code
        self.path = path
        self.line = line


@dataclass(frozen=True, slots=True)
class Key:
    """One key line.

    Attributes:
        key_id: The name the peer presents in its Hello.
        secret: The shared secret (the UTF-8 bytes of SECRET); not in repr.
        hosts: The HOST words (``*`` for any), possibly empty on a target.
        line: Where it is in the file (1-based).
    """

    key_id: str
    secret: bytes = field(repr=False)
    hosts: tuple[str, ...]
    line: int


@dataclass(frozen=True, slots=True)
class KeyFile:
    """A key file read and parsed.

    Attributes:
        path: The file.
        mode: Its permission bits.
        side: The side it was read for.
        keys: Its keys in file order; at least one.
    """

    path: str
    mode: int
    side: Side
    keys: tuple[Key, ...]

    def permission_problem(self) -> str | None:
        """Why the file's permissions are unsafe, or None if only its owner may access it."""
        return _permission_problem(self.side, self.path, self.mode)


def _permission_problem(side: Side, path: str, mode: int) -> str | None:
    """Why permission bits ``mode`` are unsafe for a key file, or None."""
    if not mode & _PRIVATE_MODE_MASK:
        return None
    return f"{side.label} {path} is accessible by group or others (mode {mode:04o}); run: chmod 600 {path}"


def parse_keys(text: str, side: Side, *, path: str, check_name: NameCheck) -> tuple[Key, ...]:
    """Parse the text of a key file (see the module docstring for the format).

    Args:
        text: The whole file.
        side: Whose file it is.
        path: The file's name, for messages.
        check_name: The rule for key ids and hosts.

    Returns:
        Every key, in file order; at least one.

    Raises:
        KeyFileError: A line is malformed (BAD_LINE, BAD_NAME, SHORT_SECRET,
            DUPLICATE_KEY) or there is no key (NO_KEY).
    """
    keys: dict[str, Key] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        key = _parse_line(line, lineno, side, path, check_name)
        if key is None:
            continue
        if key.key_id in keys:
            raise KeyFileError(f"key id {key.key_id!r} appears twice", code=KeyFileErrorCode.DUPLICATE_KEY,
                               path=path, line=lineno)
        keys[key.key_id] = key
    if not keys:
        raise KeyFileError(f"{side.label} {path} holds no key", code=KeyFileErrorCode.NO_KEY, path=path)
    return tuple(keys.values())


def _parse_line(line: str, lineno: int, side: Side, path: str, check_name: NameCheck) -> Key | None:
    """One line: its key, or None for a blank or comment line.

    Raises:
        KeyFileError: BAD_LINE, BAD_NAME or SHORT_SECRET, at this line.
    """
    words = line.split()
    for i, word in enumerate(words):
        if word.startswith("#"):
            del words[i:]
            break
    if not words:
        return None
    if len(words) < (3 if side is Side.RELAY else 2):
        raise KeyFileError(f"expected '{side.syntax}', got {len(words)} field(s)",
                           code=KeyFileErrorCode.BAD_LINE, path=path, line=lineno)
    key_id, secret, hosts = words[0], words[1], tuple(words[2:])
    try:
        check_name(key_id, "key id")
        for host in hosts:
            if host != ANY_HOST:
                check_name(host, "host")
    except ValueError as exc:
        raise KeyFileError(str(exc), code=KeyFileErrorCode.BAD_NAME, path=path, line=lineno) from None
    if len(secret) < MIN_SECRET_CHARS:
        raise KeyFileError(f"secret of key {key_id!r} is shorter than {MIN_SECRET_CHARS} characters",
                           code=KeyFileErrorCode.SHORT_SECRET, path=path, line=lineno)
    return Key(key_id, secret.encode("utf-8"), hosts, lineno)


def read_key_file(
    path: str | os.PathLike[str],
    side: Side,
    *,
    check_name: NameCheck,
    max_size: int = MAX_KEY_FILE_SIZE,
) -> KeyFile:
    """Read and parse a key file.

    Args:
        path: The key file.
        side: Whose file it is; on :attr:`Side.RELAY` it must not be
            accessible by group or others.
        check_name: The rule for key ids and hosts (raises ValueError).
        max_size: Refuse files larger than this many bytes.

    Returns:
        The file's keys and permissions.

    Raises:
        KeyFileError: The file cannot be read (UNREADABLE), is not a regular
            file (NOT_REGULAR), is too large (TOO_LARGE), is not UTF-8
            (NOT_UTF8), is accessible by others on the relay
            (LOOSE_PERMISSIONS), or fails :func:`parse_keys`.
    """
    name = os.fspath(path)
    data, mode = _read_regular_file(name, side, max_size)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{side.label} {name} is not UTF-8 text: {exc.reason} at byte {exc.start}",
                           code=KeyFileErrorCode.NOT_UTF8, path=name) from None
    return KeyFile(name, mode, side, parse_keys(text, side, path=name, check_name=check_name))


def _read_regular_file(name: str, side: Side, max_size: int) -> tuple[bytes, int]:
    """The bytes and permission bits of a regular file of at most ``max_size`` bytes.

    On :attr:`Side.RELAY` the file must also be private to its owner.

    Raises:
        KeyFileError: UNREADABLE, NOT_REGULAR, LOOSE_PERMISSIONS or TOO_LARGE.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(name, flags)
    except OSError as exc:
        raise KeyFileError(f"cannot read {side.label} {name}: {exc.strerror or exc}",
                           code=KeyFileErrorCode.UNREADABLE, path=name) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{side.label} {name}: not a regular file", code=KeyFileErrorCode.NOT_REGULAR,
                               path=name)
        problem = _permission_problem(side, name, stat.S_IMODE(st.st_mode))
        if side is Side.RELAY and problem is not None:
            raise KeyFileError(problem, code=KeyFileErrorCode.LOOSE_PERMISSIONS, path=name)
        with open(fd, "rb", closefd=False) as f:
            data = f.read(max_size + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {side.label} {name}: {exc.strerror or exc}",
                           code=KeyFileErrorCode.UNREADABLE, path=name) from None
    finally:
        os.close(fd)
    if len(data) > max_size:
        raise KeyFileError(f"{side.label} {name} is larger than {max_size} bytes", code=KeyFileErrorCode.TOO_LARGE,
                           path=name)
    return data, stat.S_IMODE(st.st_mode)
