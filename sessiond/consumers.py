"""Consumer supervision: one consumerd per session owner, spawned, watched,
replaced by a warm spare when it dies, and given back its state.

sessiond talks to a consumerd through :meth:`ConsumerHandle.call` (one typed
operation, one typed reply); the supervisor knows nothing of sessions: what to
replay to a restarted consumerd comes from a function it is given
(:data:`ReplayFn`), which returns the operations to send, in order.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import trio

from sessiond.model import SessiondConfig, UserError
from sessiond.zygote import Child, Credentials, Zygote
from tracewire.consumer_ops import ErrorReply, HelloOp, Op, Reply, decode_reply
from tracewire.control import close_fds
from tracewire.ops import MessageError, encode
from tracewire.seqpacket import SeqPacket

__all__ = ["ConsumerHandle", "ConsumerPool", "ReplayFn"]

logger = logging.getLogger(__name__)

# uid -> the operations (and descriptors, which the caller may close once
# sent) that give a restarted consumerd of that owner its state back.
ReplayFn = Callable[[int], list[tuple[Op, tuple[int, ...]]]]

_Waiter = tuple[type[Op], trio.Event, list[Reply]]


@dataclass
class _Spawned:
    proc: Child
    conn: SeqPacket

    async def kill(self) -> None:
        self.conn.close()
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


class ConsumerHandle:
    """One consumerd (per session owner), supervised: restarted when it dies,
    then given back every trace and stream of its owner's sessions.

    consumerd is forked by sessiond's zygote (:mod:`sessiond.zygote`).  When
    sessiond runs as root and the owner is another user, it takes that user's
    uid, gid and supplementary groups in the child before any consumerd code
    runs, never changed afterwards, so the trace files are the owner's and the
    process can map only the buffers sessiond hands it.
    """

    def __init__(self, config: SessiondConfig, uid: int, replay: ReplayFn, zygote: Zygote) -> None:
        self.config = config
        self.uid = uid
        self.replay = replay
        self.zygote = zygote
        self.conn: SeqPacket | None = None
        self.ready = trio.Event()
        self.waiters: dict[int, _Waiter] = {}
        self.pid: int | None = None
        self.failure: str | None = None
        self._standby: _Spawned | None = None
        self._seq = itertools.count(1)

    def _rt_priority(self) -> int:
        """The real-time priority of this owner's consumerd: root's sessions'
        only.  Another user's consumerd runs at normal priority: a user who
        traces at full speed must not get real-time CPU on a shared machine
        (docs/security.md)."""
        return self.config.consumer_rt_priority if self.uid == 0 else 0

    def _credentials(self) -> Credentials | None:
        if os.geteuid() != 0 or self.uid == os.geteuid():
            return None
        import pwd

        try:
            pw = pwd.getpwuid(self.uid)
            gid, groups = pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid)
        except KeyError:  # a uid without a passwd entry: its own group only
            gid, groups = self.uid, []
        return Credentials(self.uid, gid, tuple(groups))

    async def supervise(self) -> None:
        """Keep a consumerd running (until cancelled)."""
        restarts = 0
        try:
            while True:
                current, self._standby = self._standby or await self._spawn(), None
                if current is None:  # could not even fork/exec: retry with backoff
                    await trio.sleep(min(5.0, 0.2 * 2**restarts))
                    restarts += 1
                    continue
                await self._run(current, restarts)
                logger.warning("consumerd for uid %d exited with %s; restarting",
                               self.uid, current.proc.returncode)
                restarts += 1
                # At once the first times (its ring buffers are filling up),
                # then with backoff if it keeps dying.
                if restarts >= 3:
                    await trio.sleep(min(5.0, 0.1 * 2**restarts))
        finally:
            if self._standby is not None:
                await self._standby.kill()

    async def _run(self, current: _Spawned, restarts: int) -> None:
        """Serve through ``current`` until it exits (a warm spare is then ready)."""
        self.conn, self.pid = current.conn, current.proc.pid
        logger.info("consumerd for uid %d running (pid %d)", self.uid, current.proc.pid)
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._reader, current.conn)
                await self.call(HelloOp(), timeout=30, wait_ready=False)
                if restarts:
                    await self._replay()
                self.failure = None
                self.ready.set()
                # A warm spare, its imports done, takes over at once if this
                # one dies: the rings only have to hold the replay, not a
                # Python start-up.
                self._standby = await self._spawn()
                await current.proc.wait()
                n.cancel_scope.cancel()
        except* (UserError, trio.TooSlowError, OSError, trio.BrokenResourceError) as group:
            for exc in group.exceptions:
                logger.error("consumerd for uid %d: %s", self.uid, exc)
        finally:
            self.ready = trio.Event()
            self.conn = None
            self._fail_waiters("consumerd exited")
            await current.kill()

    async def _replay(self) -> None:
        """Give the new consumerd its owner's state.  An operation it refuses
        (one app's corrupt ring, say) is logged and skipped: it never stops
        the replay of everyone else's streams."""
        ops = self.replay(self.uid)
        try:
            for op, fds in ops:
                try:
                    await self.call(op, fds, wait_ready=False)
                except UserError as exc:
                    logger.error("consumerd for uid %d refused %s during replay: %s", self.uid, op.KIND, exc)
        finally:
            for _op, fds in ops:
                close_fds(list(fds))

    async def _spawn(self) -> _Spawned | None:
        """Start a consumerd process (it then waits for requests)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await self.zygote.spawn(child.fileno(), self._credentials(), self._rt_priority())
        except OSError as exc:
            self.failure = f"cannot start consumerd for uid {self.uid}: {exc}"
            logger.error("%s", self.failure)
            parent.close()
            self._fail_waiters(self.failure)
            return None
        finally:
            child.close()
        return _Spawned(proc, SeqPacket(trio.socket.from_stdlib_socket(parent)))

    def _fail_waiters(self, why: str) -> None:
        for _op, ev, box in self.waiters.values():
            box.append(ErrorReply(why))
            ev.set()
        self.waiters.clear()

    async def _reader(self, conn: SeqPacket) -> None:
        while True:
            got = await conn.receive()
            if got is None:
                return
            msg, fds = got
            close_fds(fds)
            seq = msg.get("seq")
            w = self.waiters.pop(seq, None) if isinstance(seq, int) else None
            if w is None:
                continue
            op_type, ev, box = w
            try:
                box.append(decode_reply(op_type, msg))
            except MessageError as exc:
                logger.error("consumerd for uid %d: bad reply to %s: %s", self.uid, op_type.KIND, exc)
                box.append(ErrorReply(f"bad reply: {exc}", internal=True))
            ev.set()

    async def call(self, op: Op, fds: tuple[int, ...] = (), timeout: float | None = None,
                   wait_ready: bool = True) -> Reply:
        """Send one operation and wait for its answer.

        Raises:
            UserError: consumerd refused, failed, or is not available.
            trio.TooSlowError: no answer in time.
        """
        if wait_ready and not self.ready.is_set():
            with trio.move_on_after(self.config.consumer_timeout):
                await self.ready.wait()
        conn = self.conn
        if conn is None or (wait_ready and not self.ready.is_set()):
            raise UserError(self.failure or "consumerd is not available")
        seq = next(self._seq)
        ev, box = trio.Event(), list[Reply]()
        self.waiters[seq] = (type(op), ev, box)
        await conn.send(encode(op, seq), fds)
        with trio.fail_after(timeout or self.config.consumer_timeout):
            await ev.wait()
        reply = box[0]
        if isinstance(reply, ErrorReply):
            raise UserError(f"consumerd: {reply.error}")
        return reply


class ConsumerPool:
    """The consumerds of one sessiond, by session owner, started on first use."""

    def __init__(self, config: SessiondConfig, nursery: trio.Nursery, replay: ReplayFn, zygote: Zygote) -> None:
        self.config = config
        self.nursery = nursery
        self.replay = replay
        self.zygote = zygote
        self.handles: dict[int, ConsumerHandle] = {}
        self.closing = False  # sessiond exits: calls fail at once (see close)

    def close(self) -> None:
        """sessiond is exiting: every call from now on fails at once instead
        of waiting (up to consumer_timeout) for a consumerd being killed, so
        that the clean-ups that run shielded as sessiond is cancelled (an
        app's connection ending) cannot hold its exit."""
        self.closing = True

    def get(self, uid: int) -> ConsumerHandle:
        h = self.handles.get(uid)
        if h is None:
            h = self.handles[uid] = ConsumerHandle(self.config, uid, self.replay, self.zygote)
            self.nursery.start_soon(h.supervise)
        return h

    async def call(self, uid: int, op: Op, fds: tuple[int, ...] = (),
                   timeout: float | None = None) -> Reply:
        """:meth:`ConsumerHandle.call` on the consumerd of owner ``uid``.

        Raises:
            UserError: as ConsumerHandle.call, or sessiond is exiting (close).
        """
        if self.closing:
            raise UserError("sessiond is shutting down")
        return await self.get(uid).call(op, fds, timeout)
