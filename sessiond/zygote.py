"""The consumerd fork server ("zygote"): consumerds forked from one
pre-imported process, so that they share its pages.

Theory of operation
-------------------
A consumerd is mostly its imports: trio alone is ~10 MB of Python objects,
and sessiond, consumerd and its warm spare used to hold three private copies
(~22 MB of PSS each).  Pages a forked child has not written stay shared with
its parent, and PSS splits a shared page between the processes that map it.

So sessiond, before it starts trio (still single-threaded), imports what a
consumerd runs (:func:`preload`), moves every object it has into the
collector's permanent generation (``gc.freeze()``, so that a collection does
not write to them and un-share their pages), and forks the *zygote*
(:func:`fork_zygote`).  The zygote does one thing: on its private
SEQPACKET socketpair with sessiond it receives a request (the owner's
credentials, with consumerd's control socket as SCM_RIGHTS) and forks a
consumerd, which runs :func:`consumerd.run_consumerd` on that socket.  The
zygote never holds session data: it is forked before sessiond has any, and
its requests carry only credentials and one descriptor.

A consumerd must be sessiond's own child (sessiond waits for it, kills it,
and a supervisor that could lose track of a pid could signal a stranger), so
the zygote forks twice: the intermediate child forks consumerd and exits at
once, and consumerd is re-parented to sessiond, which made itself a child
subreaper (``PR_SET_CHILD_SUBREAPER``) for that.  By the time the zygote
answers with the pid, the process is sessiond's child; sessiond opens a
pidfd on it (:class:`Child`): it is then waited for and killed through the
pidfd, never by a pid that could have been reused.

In the new consumerd, before anything else runs: every descriptor but 0, 1,
2 and its control socket is closed (the zygote's socket above all: with it,
a consumerd could ask for a process with someone else's credentials), then
it takes the owner's supplementary groups, gid and uid (``setgroups``,
``setresgid``, ``setresuid``: real, effective and saved), as ``subprocess``
did before exec, and only then reports that it is ready.  A failure there
ends the child (status 127) with the reason in the zygote's answer.  Having
changed credentials without an exec, the kernel marks it non-dumpable: its
owner cannot ptrace it (it was forked from a process of sessiond's user).

When the zygote dies (or does not answer a request within 10 s, and is
killed), sessiond reaps it and at once starts another by exec (``python -c
EXEC_ZYGOTE FD RUNDIR``: it cannot fork itself once trio runs), which
preloads the same modules; consumerds forked from it share pages with it,
not with sessiond.  Without a pre-forked zygote (``serve_sessiond`` called
on its own, as in tests) the first one is started that way too.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import trio

from tracewire.control import ControlError, close_fds, dumps, loads
from tracewire.seqpacket import SeqPacket, received_fds

__all__ = ["Child", "Credentials", "ForkedZygote", "Zygote", "fork_zygote", "preload", "zygote_main"]

logger = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
SPAWN_TIMEOUT = 10.0  # for the zygote to answer one request
MAX_REQUEST = 1024 * 1024
MAX_GROUPS = 65536
# The command line of a zygote started by exec (``-m sessiond.zygote`` would
# import this module twice: once as part of the package, once as __main__).
# The daemon, its sinks and relay client, and what net.py imports only for an
# authenticated relay.
PRELOAD = ("consumerd", "consumerd.net", "tracewire.keyfile", "tracewire.names")
EXEC_ZYGOTE = "import sys; from sessiond.zygote import zygote_main; sys.exit(zygote_main(sys.argv[1:]))"


@dataclass(frozen=True)
class Credentials:
    """Who a consumerd runs as (set in the child, never changed later)."""

    uid: int
    gid: int
    groups: tuple[int, ...]


def preload() -> None:
    """Import everything a consumerd runs, including what it imports only when
    a session needs it, so that none of it is imported (and private) in each
    consumerd."""
    for name in PRELOAD:
        importlib.import_module(name)


# -- the zygote's side (blocking code; it never runs trio) ---------------------------------


def _set_comm(name: str) -> None:
    """The process name ps and top show (/proc/self/comm); best effort."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


def _close_all_but(keep: set[int]) -> None:
    for fd in _open_fds():
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _open_fds() -> list[int]:
    try:
        return [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: every possible descriptor
        return list(range(3, os.sysconf("SC_OPEN_MAX")))


def _parse_request(msg: dict[str, Any]) -> Credentials | None:
    """The credentials a request asks for (None: the zygote's own).

    Raises:
        ControlError: a malformed request.
    """
    creds = msg.get("credentials")
    if creds is None:
        return None
    if not isinstance(creds, dict):
        raise ControlError("credentials must be an object")
    uid, gid, groups = creds.get("uid"), creds.get("gid"), creds.get("groups")
    if not isinstance(groups, list) or len(groups) > MAX_GROUPS or not all(
            type(i) is int and 0 <= i < 2**32 - 1 for i in [uid, gid, *groups]):
        raise ControlError("credentials need a uid, a gid and a list of groups (integers)")
    assert isinstance(uid, int) and isinstance(gid, int)
    return Credentials(uid, gid, tuple(groups))


def serve_zygote(sock: socket.socket, rundir: str) -> int:
    """The zygote's loop: one consumerd per request, until sessiond closes
    the socket; the exit status."""
    _set_comm("tw-zygote")
    _close_all_but({0, 1, 2, sock.fileno()})
    # A Ctrl-C of a foreground sessiond is sessiond's to handle; the zygote
    # ends when sessiond closes the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(MAX_REQUEST + 1, socket.CMSG_SPACE(4 * 4))
        except InterruptedError:
            continue
        except OSError:
            return 0
        fds = received_fds(ancdata)
        if not data and not fds:
            return 0
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 1:
                raise ControlError("a request is one message with one descriptor")
            request = loads(data, MAX_REQUEST)
            reply = _fork_consumerd(fds[0], _parse_request(request), rundir, _rt_priority(request))
        except ControlError as exc:
            reply = {"error": str(exc)}
        except OSError as exc:
            reply = {"error": f"cannot fork consumerd: {exc}"}
        finally:
            close_fds(fds)
        try:
            sock.sendmsg([dumps(reply)])
        except OSError:
            return 0


def _rt_priority(msg: dict[str, Any]) -> int:
    """The request's real-time priority (0: none).

    Raises:
        ControlError: not an integer from 0 to 99.
    """
    prio = msg.get("rt_priority", 0)
    if type(prio) is not int or not 0 <= prio <= 99:
        raise ControlError("rt_priority must be an integer from 0 to 99")
    return prio


def _realtime(prio: int) -> None:
    """Run this thread (consumerd's main thread, which drains the rings)
    SCHED_RR at ``prio``, if the process may (root, RLIMIT_RTPRIO); if not,
    it keeps normal scheduling.  Threads it starts inherit the policy
    (consumerd's compression threads: compression is on the drain's
    critical path).  sessiond asks for it for root's sessions only."""
    if prio <= 0:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(prio))
    except OSError:
        pass  # not allowed: normal scheduling (docs/design.md)


def _fork_consumerd(control_fd: int, creds: Credentials | None, rundir: str,
                    rt_priority: int = 0) -> dict[str, Any]:
    """Fork (twice) a consumerd serving ``control_fd``; its pid, and what went
    wrong if it could not take ``creds``.

    Raises:
        OSError: fork or pipe failed.
    """
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the intermediate child: fork consumerd, exit
            code = 0
            try:
                if os.fork() == 0:
                    os.close(r)
                    _become_consumerd(control_fd, creds, rundir, w, rt_priority)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(w)
        w = -1
        os.waitpid(pid, 0)
        # The child writes "<pid>" once it has the owner's credentials, or
        # "<pid> <why>" and exits; nothing (EOF) if it never got that far.
        report = b""
        while chunk := os.read(r, 4096):
            report += chunk
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    head, _, why = report.decode(errors="replace").partition(" ")
    if not head.isdigit():
        return {"error": "consumerd's process could not start"}
    return {"pid": int(head), "error": why} if why else {"pid": int(head)}


def _become_consumerd(control_fd: int, creds: Credentials | None, rundir: str, report_fd: int,
                      rt_priority: int = 0) -> NoReturn:
    """The new consumerd: drop what it must not keep, take the owner's
    credentials, run consumerd, exit.  Never returns to the zygote's code."""
    code = 127
    try:
        _close_all_but({0, 1, 2, control_fd, report_fd})
        _set_comm("tw-consumerd")  # while /proc/self is still writable (see below)
        _realtime(rt_priority)  # while it may (before the owner's credentials)
        try:
            if creds is not None:
                os.setgroups(list(creds.groups))
                os.setresgid(creds.gid, creds.gid, creds.gid)
                os.setresuid(creds.uid, creds.uid, creds.uid)
        except OSError as exc:
            os.write(report_fd, f"{os.getpid()} cannot take uid {creds.uid if creds else '?'}: {exc}".encode())
            os._exit(127)
        os.write(report_fd, str(os.getpid()).encode())
        os.close(report_fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ["TRACEWIRE_RUNDIR"] = rundir
        os.chdir("/")
        from consumerd import run_consumerd

        code = run_consumerd(control_fd)
    except BaseException as exc:  # nothing may return into the zygote's loop
        try:
            print(f"tracewire-consumerd: {exc!r}", file=sys.stderr)
        except BaseException:
            pass
    finally:
        try:
            logging.shutdown()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)


def fork_zygote(rundir: str) -> ForkedZygote:
    """Preload consumerd's modules, freeze them, and fork the zygote.  Call
    before trio runs (the process must be single-threaded)."""
    preload()
    gc.collect()
    gc.freeze()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            parent.close()
            code = serve_zygote(child, rundir)
        finally:
            os._exit(code)
    child.close()
    return ForkedZygote(parent, pid)


@dataclass
class ForkedZygote:
    """A zygote forked before trio started: sessiond's end of its socket and its pid."""

    sock: socket.socket
    pid: int


def zygote_main(argv: list[str]) -> int:
    """``python -c "...zygote_main..." FD RUNDIR`` (see :data:`EXEC_ZYGOTE`):
    a zygote started by exec."""
    if len(argv) != 2 or not argv[0].isdigit():
        print("usage: python -m sessiond.zygote FD RUNDIR (started by tracewire-sessiond)", file=sys.stderr)
        return 2
    preload()
    gc.collect()
    gc.freeze()
    return serve_zygote(socket.socket(fileno=int(argv[0])), argv[1])


# -- sessiond's side (trio) ------------------------------------------------------------------


class Child:
    """A consumerd that sessiond did not spawn itself but that is its child
    (re-parented to it), waited for and killed through a pidfd: the same
    ``pid``/``returncode``/``kill()``/``wait()`` as a ``trio.Process``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None
        self._lock = trio.Lock()

    def kill(self) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def wait(self) -> int:
        async with self._lock:
            if self.returncode is None:
                await trio.lowlevel.wait_readable(self.pidfd)
                # It has exited (the pidfd is readable): this does not block.
                _, status = os.waitpid(self.pid, 0)  # noqa: ASYNC222
                self.returncode = os.waitstatus_to_exitcode(status)
                os.close(self.pidfd)
            return self.returncode


class _Link:
    """One zygote process and sessiond's connection to it."""

    def __init__(self, conn: SeqPacket, proc: Child | trio.Process) -> None:
        self.conn = conn
        self.proc = proc

    async def close(self) -> None:
        self.conn.close()
        with trio.CancelScope(shield=True):
            self.proc.kill()
            await self.proc.wait()


class Zygote:
    """sessiond's handle on its zygote: :meth:`spawn` forks a consumerd;
    :meth:`supervise` replaces a zygote that exits by one started by exec.
    A request the zygote does not answer (it died, or hangs) kills it and is
    tried once more on a new one."""

    def __init__(self, rundir: str, forked: ForkedZygote | None = None) -> None:
        self.rundir = rundir
        self._link: _Link | None = None
        self._lock = trio.Lock()
        _become_subreaper()
        if forked is not None:
            self._link = _Link(SeqPacket(trio.socket.from_stdlib_socket(forked.sock)), Child(forked.pid))

    @property
    def pid(self) -> int | None:
        """The running zygote's pid (None: none runs now); for metrics."""
        link = self._link
        return None if link is None else link.proc.pid

    async def supervise(self) -> None:
        """Keep a zygote running (until cancelled): one that exits is reaped
        and replaced at once (with backoff if it keeps dying), so that the
        next consumerd does not wait for a Python start-up."""
        failures = 0
        while True:
            async with self._lock:
                link = self._link
                if link is None:
                    try:
                        link = await self._start()
                    except OSError as exc:
                        logger.error("cannot start a zygote: %s", exc)
            if link is None:
                failures += 1
                await trio.sleep(min(5.0, 0.1 * 2**failures))
                continue
            started = trio.current_time()
            code = await link.proc.wait()
            async with self._lock:
                if self._link is link:
                    self._link = None
            link.conn.close()
            logger.warning("zygote (pid %d) exited with %s; starting another", link.proc.pid, code)
            failures = failures + 1 if trio.current_time() - started < 10 else 1
            if failures >= 3:
                await trio.sleep(min(5.0, 0.1 * 2**failures))

    async def spawn(self, control_fd: int, creds: Credentials | None, rt_priority: int = 0) -> Child:
        """A new consumerd on ``control_fd`` (which the caller still closes),
        its draining thread at real-time priority ``rt_priority`` if it may
        have it (0: normal scheduling).

        Raises:
            OSError: no consumerd could be started (the reason in one line).
        """
        request = {"credentials": None if creds is None else
                   {"uid": creds.uid, "gid": creds.gid, "groups": list(creds.groups)},
                   "rt_priority": rt_priority}
        async with self._lock:
            why = "?"
            for _attempt in range(2):
                link = self._link or await self._start()
                try:
                    await link.conn.send(request, (control_fd,))
                    with trio.fail_after(SPAWN_TIMEOUT):
                        got = await link.conn.receive()
                    if got is None:
                        raise ControlError("the zygote closed its socket")
                    reply, fds = got
                    close_fds(fds)
                except (OSError, ControlError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                    why = f"the zygote failed: {exc or type(exc).__name__}"
                    logger.warning("%s; starting another", why)
                    self._link = None
                    await link.close()
                    continue
                return await _child_of(reply)
            raise OSError(why)

    async def _start(self) -> _Link:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-P", "-c", EXEC_ZYGOTE, str(child.fileno()), self.rundir],
                pass_fds=(child.fileno(),), cwd="/")
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        self._link = _Link(SeqPacket(trio.socket.from_stdlib_socket(parent)), proc)
        logger.info("zygote started (pid %d)", proc.pid)
        return self._link

    async def aclose(self) -> None:
        if self._link is not None:
            link, self._link = self._link, None
            await link.close()


async def _child_of(reply: dict[str, Any]) -> Child:
    """The consumerd a zygote's reply names.

    Raises:
        OSError: the zygote could not start it.
    """
    pid, error = reply.get("pid"), reply.get("error")
    if type(pid) is not int or pid <= 0:
        raise OSError(error if isinstance(error, str) else "the zygote gave no pid")
    child = Child(pid)
    if error:  # it could not take the owner's credentials and exits
        child.kill()
        await child.wait()
        raise OSError(str(error))
    return child


def _become_subreaper() -> None:
    """Make this process adopt its orphaned descendants (the consumerds the
    zygote forks).

    Raises:
        OSError: prctl refused.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


