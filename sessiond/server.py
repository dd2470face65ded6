"""tracewire-sessiond: the registry of tracing sessions.

Theory of operation
-------------------
sessiond listens on two unix sockets in its run directory:

* ``control.sock`` (stream, length-prefixed JSON): one request per
  connection from the ``tracewire`` CLI (:mod:`sessiond.commands`); the caller
  is identified by SO_PEERCRED, never by what it claims.
* ``apps.sock`` (SOCK_SEQPACKET, JSON + SCM_RIGHTS): traced apps register,
  declare tracepoints, and receive their ring buffers and enable sets
  (:mod:`sessiond.apps`).

It spawns a consumerd per session owner as a child, connected by a SEQPACKET
socketpair, and restarts it if it dies (:mod:`sessiond.consumers`); each
consumerd is forked from a zygote that shares sessiond's imports
(:mod:`sessiond.zygote`).  For every
(session, channel, app) that records events sessiond creates the ring buffer
memfd and its eventfd (and, for a blocking channel, the pipe that wakes an
app waiting for space: consumerd gets its write end, the app its read end),
keeps them open, and passes them to consumerd and to the app, in that
order: consumerd must know a stream before the app can fill it.  Metadata
is generated here (the app's tracepoint declarations are the source) and
appended through consumerd before the app is told to enable the events it
describes.  The state itself is :mod:`sessiond.model`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from functools import partial

import trio

from sessiond.apps import AppProtocol
from sessiond.commands import Commands
from sessiond.consumers import ConsumerPool
from sessiond.model import Registry, SessiondConfig, UserError
from sessiond.zygote import ForkedZygote, Zygote
from tracewire.control import ControlError, FrameReader, encode_frame
from tracewire.ops import MessageError, decode_request
from tracewire.peercred import peer_credentials
from tracewire.rundir import ensure_rundir

__all__ = ["serve_sessiond"]

logger = logging.getLogger(__name__)

MAX_REQUEST = 1024 * 1024
REQUEST_TIMEOUT = 10.0  # for the request to arrive whole


class Sessiond:
    """One sessiond: its registry, consumerds, app protocol and commands."""

    def __init__(self, config: SessiondConfig, nursery: trio.Nursery, zygote: Zygote) -> None:
        self.config = config
        self.registry = Registry(config)
        self.consumers = ConsumerPool(config, nursery, self.registry.replay_ops, zygote)
        self.apps = AppProtocol(self.registry, self.consumers)
        self.commands = Commands(self.registry, self.consumers, self.apps)

    async def handle_control(self, stream: trio.SocketStream) -> None:
        """Answer one CLI request; nothing a client sends ends sessiond."""
        try:
            _pid, uid, gid = peer_credentials(stream.socket)
            reader = FrameReader(limit=MAX_REQUEST)
            raw = None
            with trio.fail_after(REQUEST_TIMEOUT):
                while raw is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    reader.feed(data)
                    raw = reader.next()
            await stream.send_all(encode_frame(await self._answer(raw, uid, gid)))
        except (ControlError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            logger.info("control connection dropped: %s", exc)
        finally:
            await stream.aclose()

    async def _answer(self, raw: dict[str, object], uid: int, gid: int) -> dict[str, object]:
        cmd = raw.get("cmd")
        try:
            result = await self.commands.run(decode_request(raw), uid, gid)
            return {"ok": True, **result}
        except (UserError, MessageError) as exc:
            return {"ok": False, "error": str(exc)}
        except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            logger.exception("request %r of uid %d failed", cmd, uid)
            return {"ok": False, "error": f"failed: {exc!r}"}
        except Exception as exc:  # a bug: logged with its traceback, this client only
            logger.exception("internal error serving %r for uid %d", cmd, uid)
            return {"ok": False, "error": f"internal error: {exc!r} (see sessiond's log)"}


async def serve_sessiond(
    config: SessiondConfig, *, zygote: ForkedZygote | None = None,
    task_status: trio.TaskStatus[Sessiond] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one sessiond in ``config.rundir`` until cancelled.  ``zygote``: the
    consumerd fork server forked before trio started (:func:`sessiond.zygote.fork_zygote`,
    whose pages sessiond shares); without one, one is started by exec when the
    first consumerd is needed.

    Raises:
        UserError: another sessiond holds the run directory.
    """
    ensure_rundir(config.rundir, error=UserError)
    if os.geteuid() == 0:
        os.chmod(config.rundir, 0o755)  # apps of every user must reach apps.sock
    lock_fd = _lock_rundir(config.rundir)
    ctl_path = os.path.join(config.rundir, "control.sock")
    app_path = os.path.join(config.rundir, "apps.sock")
    pid_path = os.path.join(config.rundir, "sessiond.pid")
    metrics = None
    if config.metrics is not None:  # prometheus_client is imported only then
        from sessiond.metrics import bind_metrics

        try:
            metrics = bind_metrics(config.metrics)
        except UserError:
            os.close(lock_fd)
            raise
    forks = Zygote(config.rundir, zygote)
    try:
        async with trio.open_nursery() as nursery:
            sd = Sessiond(config, nursery, forks)
            nursery.start_soon(forks.supervise)
            if config.load_dir:  # before apps register: a loaded started session traces them
                from sessiond.saved import load_directory

                await load_directory(sd.commands, config.load_dir)
            ctl = await _listen(ctl_path, socket.SOCK_STREAM, 64)
            apps = await _listen(app_path, socket.SOCK_SEQPACKET, 256)
            # Any local app may register with a root sessiond (a user's session
            # traces only that user's apps); a user's sessiond is theirs alone.
            # The root control socket is open to the "tracing" group.
            os.chmod(app_path, 0o777 if os.geteuid() == 0 else 0o700)
            _restrict_control_socket(ctl_path)
            nursery.start_soon(partial(trio.serve_listeners, sd.handle_control, [trio.SocketListener(ctl)]))
            nursery.start_soon(_accept_apps, apps, sd.apps, nursery)
            nursery.start_soon(sd.commands.rotation_loop)
            if metrics is not None:
                from sessiond.metrics import serve_sessiond_metrics

                await nursery.start(partial(serve_sessiond_metrics, metrics, sd.registry, sd.consumers, forks))
            with open(pid_path, "w") as f:
                f.write(f"{os.getpid()}\n")
            logger.info("sessiond ready in %s", config.rundir)
            task_status.started(sd)
    finally:
        if metrics is not None:
            metrics.close()
        await forks.aclose()
        for p in (ctl_path, app_path, pid_path):
            try:
                os.unlink(p)
            except OSError:
                pass
        os.close(lock_fd)


def _lock_rundir(rundir: str) -> int:
    """Hold ``sessiond.lock``: one sessiond per run directory.

    Raises:
        UserError: another sessiond holds it.
    """
    lock_fd = os.open(os.path.join(rundir, "sessiond.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise UserError(f"another tracewire-sessiond already runs in {rundir}") from None
    return lock_fd


async def _listen(path: str, kind: int, backlog: int) -> trio.socket.SocketType:
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, kind)
    await sock.bind(path)
    sock.listen(backlog)
    return sock


def _restrict_control_socket(path: str) -> None:
    """0600 for a user's sessiond; 0660 with group ``tracing`` for root's
    when that group exists (members may then create and control their own
    sessions; SO_PEERCRED tells sessiond who they are)."""
    if os.geteuid() == 0:
        import grp

        try:
            gid = grp.getgrnam("tracing").gr_gid
        except KeyError:
            os.chmod(path, 0o600)
            return
        os.chown(path, 0, gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)


# accept() errors that mean "out of resources for now" (trio.serve_listeners' list).
_ACCEPT_CAPACITY_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF = 0.1  # seconds to wait before accepting again when out of descriptors


async def _accept_apps(listener: trio.socket.SocketType, apps: AppProtocol, nursery: trio.Nursery) -> None:
    """Serve every connection on apps.sock; out of descriptors, wait and go on."""
    short = False
    while True:
        try:
            sock, _ = await listener.accept()
        except OSError as exc:  # never fatal: the listening socket is ours, the peers are not
            if exc.errno not in _ACCEPT_CAPACITY_ERRORS:
                logger.warning("apps.sock: accept failed: %s", exc)
            if not short:
                logger.error("apps.sock: cannot accept: %s; retrying every %g s", exc.strerror, ACCEPT_BACKOFF)
                short = True
            await trio.sleep(ACCEPT_BACKOFF)
            continue
        if short:
            logger.warning("apps.sock: accepting again")
            short = False
        nursery.start_soon(apps.handle, sock)
