"""Where one tracewire instance keeps its sockets: ``TRACEWIRE_RUNDIR``.

Stdlib only: the tracer imports it inside traced apps.

Trust
-----
A run directory is where a traced app hands its event buffers over, so it
must not be one another user can plant.  ``default_rundir`` prefers places
nobody else can create (``/run/tracewire`` for root, the user's runtime
directory otherwise); its last resort, ``/tmp/tracewire-UID/tracewire``,
sits in a world-writable directory, where another user could create
``/tmp/tracewire-UID`` first.  ``rundir_problem`` says why a run directory
must not be trusted (the tracer stays off), ``ensure_rundir`` creates one
privately or refuses it (the CLI and sessiond), and ``trusted_uid`` is the
rule both apply to owners, and the tracer to the process serving
``apps.sock``: this process's effective uid, or root.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

__all__ = ["default_rundir", "ensure_rundir", "rundir_problem", "trusted_uid", "UnsafeRundirError"]


class UnsafeRundirError(Exception):
    """A run directory that another user may control (one line)."""


def default_rundir() -> str:
    """The run directory this process uses.

    Returns:
        ``$TRACEWIRE_RUNDIR``, else ``/run/tracewire`` for root, else
        ``$XDG_RUNTIME_DIR/tracewire``, else ``/run/user/UID/tracewire``
        when ``/run/user/UID`` is the user's own directory (what
        ``XDG_RUNTIME_DIR`` would be), else ``/tmp/tracewire-UID/tracewire``.
    """
    rd = os.environ.get("TRACEWIRE_RUNDIR")
    if rd:
        return rd
    euid = os.geteuid()
    if euid == 0:
        return "/run/tracewire"
    base = os.environ.get("XDG_RUNTIME_DIR") or _user_runtime_dir(euid) or _tmp_fallback(euid)
    return os.path.join(base, "tracewire")


def trusted_uid(uid: int) -> bool:
    """Whether a directory or a peer owned by ``uid`` can be trusted: it is
    this process's effective uid, or root's."""
    return uid in (os.geteuid(), 0)


def rundir_problem(path: str) -> str | None:
    """Why this process must not use the run directory ``path``.

    The directory itself, and for the ``/tmp`` fallback its parent
    ``/tmp/tracewire-UID`` too, must be real directories (not symbolic
    links) owned by this process's effective uid or by root, and not
    writable by group or others.  A directory that is absent, or that this
    process cannot look at, is no problem here: no socket can be reached
    through it either.

    Args:
        path: the run directory.

    Returns:
        One phrase naming the directory and what is wrong with it, or None.
    """
    euid = os.geteuid()
    for d in _dirs_to_check(path, euid):
        try:
            st = os.lstat(d)
        except OSError:
            return None
        problem = _stat_problem(d, st)
        if problem is not None:
            return problem
    return None


def ensure_rundir(path: str, error: Callable[[str], Exception] = UnsafeRundirError) -> None:
    """Create the run directory ``path`` if it is missing, and check it.

    The directory is created with mode 0700.  For the ``/tmp`` fallback its
    parent ``/tmp/tracewire-UID`` is created 0700 as well (``os.makedirs``
    would give it the umask's mode); other missing parents get the default
    mode, since a root sessiond's run directory must stay reachable by every
    user's apps.

    Args:
        path: the run directory.
        error: the exception type to raise when a directory is unsafe, given
            one line (the CLI passes its ``CliError``, sessiond its
            ``UserError``).

    Raises:
        error: ``path`` or ``/tmp/tracewire-UID`` exists and belongs to
            another user, is writable by group or others, or is not a
            directory (see ``rundir_problem``).
        OSError: a directory could not be created.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if parent == _tmp_fallback(os.geteuid()):
        _mkdir_private(parent)
        _refuse_unsafe(path, error)  # before creating anything inside it
    else:
        os.makedirs(parent, exist_ok=True)
    _mkdir_private(path)
    _refuse_unsafe(path, error)


def _user_runtime_dir(euid: int) -> str | None:
    """``/run/user/EUID`` when it is a directory owned by ``euid``, else None."""
    path = f"/run/user/{euid}"
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return path if stat.S_ISDIR(st.st_mode) and st.st_uid == euid else None


def _tmp_fallback(euid: int) -> str:
    """The last-resort parent of a user's run directory."""
    return f"/tmp/tracewire-{euid}"


def _dirs_to_check(path: str, euid: int) -> list[str]:
    """The directories whose owner and mode decide whether ``path`` is safe,
    outermost first."""
    parent = os.path.dirname(os.path.abspath(path))
    return [parent, path] if parent == _tmp_fallback(euid) else [path]


def _stat_problem(path: str, st: os.stat_result) -> str | None:
    """What makes directory ``path`` (its ``lstat``) unsafe, or None."""
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if not trusted_uid(st.st_uid):
        return f"{path} belongs to uid {st.st_uid}, not to uid {os.geteuid()} or root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _refuse_unsafe(path: str, error: Callable[[str], Exception]) -> None:
    """Raise ``error`` when ``rundir_problem(path)`` finds a problem."""
    problem = rundir_problem(path)
    if problem is not None:
        raise error(f"refusing run directory {path}: {problem}")


def _mkdir_private(path: str) -> None:
    """Create directory ``path`` with mode 0700 unless something is there."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
