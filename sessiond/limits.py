"""Per-user resource limits of a sessiond: the ``--limits`` file and its policy.

Theory of operation
-------------------
A root sessiond is reached by every member of the ``tracing`` group; each
request and each app is attributed to a uid by SO_PEERCRED.  What one user's
sessions may hold is bounded by four limits (:class:`Limits`):

* ``sessions``: sessions the user owns;
* ``channels``: channels over those sessions;
* ``buffers``: bytes of ring buffers and relay spool those sessions hold
  (:mod:`sessiond.accounting` counts them);
* ``apps``: the user's connections on ``apps.sock``.

The file (TOML, read once at start-up with the standard library's
``tomllib``) has a ``[default]`` table, ``[group.NAME]`` and ``[user.NAME]``
tables (a name, or a numeric id); each sets any of the four keys.  Sizes are
bytes or ``512K``, ``64M``, ``2G`` (powers of 1024); ``"unlimited"`` lifts a
limit.  A user's limit for a key is the user table's, else the largest of
their groups' tables (the user's primary and supplementary groups, looked up
when the limit is needed), else ``[default]``'s, else the built-in default
(:data:`BUILTIN`), which a single user never reaches.  Root is unlimited
unless a ``[user.root]`` (or ``[user.0]``) table says otherwise: groups and
``[default]`` do not apply to root.

A root sessiond refuses a file that is not root's or that group or others
may write (whoever may write it may lift their own limits).  The file is
root's, but it is still read as hostile-ish input: a size, key or
table it does not know, a user or group that does not exist, and TOML
errors are refused at start-up with one line naming the file and the line
(:class:`LimitsFileError`).  Nothing here does I/O but reading the file and
the user and group databases.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BUILTIN", "KEYS", "Limits", "LimitsFileError", "LimitsPolicy", "UserLimits", "format_size",
           "parse_size"]

MAX_FILE = 1024 * 1024  # bytes of a limits file
MAX_LIMIT = 2**60
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"\s*(\d{1,19})\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
KEYS = ("sessions", "channels", "buffers", "apps")


class LimitsFileError(Exception):
    """The limits file cannot be used: one line naming the file and line."""


@dataclass(frozen=True, slots=True)
class Limits:
    """One table's limits; None: not set there (or, resolved, unlimited)."""

    sessions: int | None = None
    channels: int | None = None
    buffers: int | None = None  # bytes
    apps: int | None = None

    def get(self, key: str) -> int | None:
        value: int | None = getattr(self, key)
        return value


# A single-user machine never reaches these; a shared root sessiond's admin
# lowers them in the file.
BUILTIN = Limits(sessions=256, channels=4096, buffers=16 * 1024**3, apps=1024)


@dataclass(frozen=True, slots=True)
class UserLimits:
    """The limits that apply to one user, and where each comes from."""

    limits: Limits
    sources: dict[str, str] = field(default_factory=dict)  # key -> "[user.alice] in FILE"

    def source(self, key: str) -> str:
        return self.sources.get(key, "built-in default")


def parse_size(value: object) -> int | None:
    """A limit's value: an int, ``"64M"``-style text, or ``"unlimited"`` (None).

    Raises:
        ValueError: anything else (the text says what is expected).
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (examples: 1048576, \"512K\", \"64M\", \"unlimited\")")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        if value.strip().lower() == "unlimited":
            return None
        m = _SIZE.fullmatch(value)
        if m is None:
            raise ValueError(f"{value!r} is not a size (examples: 1048576, \"512K\", \"64M\", \"unlimited\")")
        n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"{value!r} is not a size (examples: 1048576, \"512K\", \"64M\", \"unlimited\")")
    if n < 0 or n > MAX_LIMIT:
        raise ValueError(f"{value!r} is out of range (0 to 2**60)")
    return n


def parse_count(value: object) -> int | None:
    """A count limit: a non-negative int or ``"unlimited"`` (None)."""
    if isinstance(value, str) and value.strip().lower() == "unlimited":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
        raise ValueError(f"{value!r} is not a count (a whole number of at least 0, or \"unlimited\")")
    return value


def format_size(n: int) -> str:
    """``n`` bytes as people read them (``64 MiB``, ``1.5 GiB``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _line_of(text: str, table: str, key: str | None) -> int:
    """The line of ``[table]`` (or of ``key`` inside it) in ``text``; 1 when
    it cannot be told (dotted or inline tables)."""
    lines = text.splitlines()
    head = re.compile(r"\s*\[\s*" + r"\s*\.\s*".join(re.escape(p) for p in table.split(".")) + r"\s*\]")
    for i, line in enumerate(lines):
        if head.match(line):
            if key is None:
                return i + 1
            for j in range(i + 1, len(lines)):
                if lines[j].lstrip().startswith("["):
                    break
                if re.match(r"\s*" + re.escape(key) + r"\s*=", lines[j]):
                    return j + 1
            return i + 1
    return 1


Table = dict[str, int | None]  # the keys one table of the file sets ("unlimited": None)


class LimitsPolicy:
    """The limits of every user, from a file (or the built-in defaults)."""

    def __init__(self, path: str | None = None, default: Table | None = None,
                 users: dict[int, Table] | None = None, groups: dict[int, Table] | None = None,
                 names: dict[tuple[str, int], str] | None = None) -> None:
        self.path = path
        self.default = default or {}
        self.users = users or {}
        self.groups = groups or {}
        self._names = names or {}  # (kind, id) -> the name the file gave

    @classmethod
    def load(cls, path: str) -> LimitsPolicy:
        """Read and check ``path``.

        Raises:
            LimitsFileError: unreadable, not TOML, or not a limits file.
        """
        import tomllib  # only a sessiond given --limits needs it

        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read(MAX_FILE + 1)
        except OSError as exc:
            raise LimitsFileError(f"cannot read limits file {path}: {exc.strerror}") from None
        if os.geteuid() == 0 and (st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            # Whoever may write it may lift their own limits.
            raise LimitsFileError(f"{path}: must belong to root and be writable by root only "
                                  f"(it is uid {st.st_uid}'s, mode {stat.S_IMODE(st.st_mode):04o})")
        if len(raw) > MAX_FILE:
            raise LimitsFileError(f"{path}: larger than {MAX_FILE} bytes: not a limits file")
        try:
            text = raw.decode("utf-8")
            doc = tomllib.loads(text)
        except UnicodeDecodeError:
            raise LimitsFileError(f"{path}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise LimitsFileError(f"{path}: {' '.join(str(exc).split())}") from None
        return cls.from_document(path, text, doc)

    @classmethod
    def from_document(cls, path: str, text: str, doc: dict[str, Any]) -> LimitsPolicy:
        """The policy of a parsed file (``text``: its source, for line numbers).

        Raises:
            LimitsFileError: not a limits file (one line: file, line, why).
        """
        def fail(table: str, key: str | None, why: str) -> LimitsFileError:
            # Names come from the file: no control character reaches the line.
            why = "".join(c if c.isprintable() else repr(c)[1:-1] for c in why)
            return LimitsFileError(f"{path}, line {_line_of(text, table, key)}: {why}")

        def table_of(table: str, body: object) -> Table:
            if not isinstance(body, dict):
                raise fail(table, None, f"[{table}] must be a table of limits")
            values: Table = {}
            for key, value in body.items():
                if key not in KEYS:
                    raise fail(table, key, f"unknown limit {key!r} in [{table}] (known: {', '.join(KEYS)})")
                try:
                    values[key] = parse_size(value) if key == "buffers" else parse_count(value)
                except ValueError as exc:
                    raise fail(table, key, f"{key} in [{table}]: {exc}") from None
            return values

        default: Table = {}
        users: dict[int, Table] = {}
        groups: dict[int, Table] = {}
        names: dict[tuple[str, int], str] = {}
        for name, body in doc.items():
            if name == "default":
                default = table_of("default", body)
            elif name in ("user", "group"):
                if not isinstance(body, dict):
                    raise fail(name, None, f"[{name}] must hold [{name}.NAME] tables")
                for who, table_body in body.items():
                    table = f"{name}.{who}"
                    try:
                        ident = _uid(who) if name == "user" else _gid(who)
                    except KeyError:
                        raise fail(table, None, f"no {name} named {who!r} on this system") from None
                    (users if name == "user" else groups)[ident] = table_of(table, table_body)
                    names[(name, ident)] = who
            else:
                raise fail(name, None, f"unknown table [{name}] (known: [default], [user.NAME], [group.NAME])")
        return cls(path, default, users, groups, names)

    def _where(self, kind: str, ident: int | None = None) -> str:
        if ident is None:
            return f"[{kind}] in {self.path}"
        return f"[{kind}.{self._names.get((kind, ident), ident)}] in {self.path}"

    def for_user(self, uid: int, gid: int | None = None) -> UserLimits:
        """The limits of ``uid`` (with primary group ``gid``, else the
        passwd one), and where each comes from."""
        mine = self.users.get(uid, {})
        group_ids = self._groups_of(uid, gid) if self.groups and uid != 0 and set(mine) != set(KEYS) else []
        values: dict[str, int | None] = {}
        sources: dict[str, str] = {}
        for key in KEYS:
            if key in mine:
                values[key], sources[key] = mine[key], self._where("user", uid)
            elif uid == 0:
                values[key], sources[key] = None, "root is unlimited"
            elif found := [(self.groups[g][key], g) for g in group_ids if key in self.groups.get(g, {})]:
                # The most generous of the user's groups.
                value, g = max(found, key=lambda vg: MAX_LIMIT + 1 if vg[0] is None else vg[0])
                values[key], sources[key] = value, self._where("group", g)
            elif key in self.default:
                values[key], sources[key] = self.default[key], self._where("default")
            else:
                values[key] = BUILTIN.get(key)
        return UserLimits(Limits(**values), sources)

    @staticmethod
    def _groups_of(uid: int, gid: int | None) -> list[int]:
        """The user's primary and supplementary groups (the group database's)."""
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return [gid] if gid is not None else []
        groups = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
        if gid is not None:
            groups.add(gid)
        return sorted(groups)


def _uid(who: str) -> int:
    if who.isdigit():
        return int(who)
    return pwd.getpwnam(who).pw_uid


def _gid(who: str) -> int:
    if who.isdigit():
        return int(who)
    return grp.getgrnam(who).gr_gid
