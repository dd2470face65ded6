"""The app protocol: traced processes on ``apps.sock``.

An app registers (pid, uid from SO_PEERCRED; its process name and tracepoint
declarations from the message), and declares more tracepoints as it defines
them.  For every started session that may trace it, sessiond creates a trace
(its metadata comes from the declarations) and, per channel with a matching
event, a ring buffer: consumerd is given the buffer first, then the app, then
the set of event ids to enable.  Asking apps and waiting (``sync``, ``stop``)
goes through :meth:`AppProtocol.ask`.  When an app's connection ends, its
streams are handed to consumerd as ``producer_gone`` and their buffers freed
once written.
"""

from __future__ import annotations

import logging
import os
import resource
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from sessiond.accounting import ring_refusal
from sessiond.consumers import ConsumerPool
from sessiond.model import (
    App,
    AppLink,
    Outgoing,
    Registry,
    Session,
    SessionState,
    Stream,
    Trace,
    UserError,
    now_stamp,
)
from tracewire import ctf
from tracewire.consumer_ops import ProducerGoneOp, ReleasedReply
from tracewire.control import ControlError, close_fds
from tracewire.names import InvalidName, validate_name
from tracewire.ops import short_repr
from tracewire.peercred import peer_credentials
from tracewire.ringbuf import BufferSpec, create_buffer
from tracewire.seqpacket import SeqPacket

__all__ = ["AppProtocol"]

logger = logging.getLogger(__name__)

# (stream keys of the app in the session, seq) -> the message to send
MakeMsg = Callable[[list[str], int], dict[str, Any]]


class AppProtocol:
    """Registration, buffer hand-out, and asking apps and waiting."""

    def __init__(self, registry: Registry, consumers: ConsumerPool) -> None:
        self.reg = registry
        self.consumers = consumers
        self._next_seq = 1
        self._deaths = 0  # apps gone so far whose rings a snapshot session kept
        self._refused: set[int] = set()  # uids whose refusal was logged
        # Each connection costs a descriptor, and each of its streams two
        # (three on a blocking channel):
        # connections beyond half the descriptor limit are refused, so that
        # root's sessions always have descriptors left.
        self.max_connections = max(16, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)

    # ------------------------------------------------------------ connection
    async def handle(self, sock: trio.socket.SocketType) -> None:
        """Serve one app's connection until it ends, then let its streams go.

        Nothing the app sends ends sessiond: a protocol error, an exception
        or a budget exceeded drops this app only (logged with its reason)."""
        conn = SeqPacket(sock, limit=self.reg.config.app_message_limit)
        peer: _Peer | None = None
        try:
            pid, uid, gid = peer_credentials(sock)
            per_uid = self._per_uid_limit(uid)
            if self.reg.apps_of_uid[uid] >= per_uid:
                self._refuse_once(uid, f"uid {uid} has {per_uid} apps connected, its limit")
                return
            user_limit = self.reg.config.limits.for_user(uid, gid)
            if user_limit.limits.apps is not None and self.reg.apps_of_uid[uid] >= user_limit.limits.apps:
                self._refuse_once(uid, f"uid {uid} has {user_limit.limits.apps} apps connected, its limit "
                                  f"({user_limit.source('apps')})")
                return
            if self.reg.apps_of_uid.total() >= self.max_connections:
                self._refuse_once(uid, f"{self.max_connections} apps connected, half the descriptor limit")
                return
            self.reg.apps_of_uid[uid] += 1
            outbox, inbox = trio.open_memory_channel[Outgoing](self.reg.config.app_queue)
            peer = _Peer(pid, uid, conn, AppLink(outbox, trio.CancelScope()))
            with peer.link.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, peer, inbox)
                    nursery.start_soon(self._register_deadline, peer)
                    await self._reader(peer)
                    nursery.cancel_scope.cancel()
            if peer.link.dropped:
                level = logging.WARNING if peer.app is not None else logging.INFO
                logger.log(level, "app %d (uid %d): %s; dropped", pid, uid, peer.link.dropped)
        except (OSError, trio.BrokenResourceError) as exc:
            logger.info("app connection lost: %s", exc)
        except Exception:  # one misbehaving app never takes sessiond down
            logger.exception("app connection dropped after an unexpected error")
        finally:
            conn.close()
            if peer is not None:
                await self._release(peer)

    async def _reader(self, peer: _Peer) -> None:
        while True:
            try:
                got = await peer.conn.receive()
            except ControlError as exc:
                peer.link.drop(str(exc))
                return
            if got is None:
                return
            msg, fds = got
            close_fds(fds)
            if not await self._on_message(peer, msg):
                return

    def _per_uid_limit(self, uid: int) -> int:
        """Connections one uid may hold: root up to the total; any other uid
        up to half of it, so that one user cannot lock everyone out."""
        if uid == 0:
            return self.max_connections
        return min(self.reg.config.max_apps_per_uid, self.max_connections // 2)

    async def _register_deadline(self, peer: _Peer) -> None:
        """A connection that does not register in time is closed: an idle
        one costs a descriptor and a slot of its uid's budget."""
        timeout = self.reg.config.register_timeout
        await trio.sleep(timeout)
        if peer.app is None:
            peer.link.drop(f"did not register within {timeout:g} s")

    async def _writer(self, peer: _Peer, inbox: trio.MemoryReceiveChannel[Outgoing]) -> None:
        """Send what was posted to the app, each send bounded in time."""
        timeout = self.reg.config.app_send_timeout
        async with inbox:
            async for msg, fds in inbox:
                try:
                    with trio.move_on_after(timeout) as cs:
                        await peer.conn.send(msg, fds)
                finally:
                    close_fds(list(fds))
                if cs.cancelled_caught:
                    peer.link.drop(f"did not read its socket for {timeout:g} s")
                    return

    async def _release(self, peer: _Peer) -> None:
        # Counter's -= keeps only positive counts: a uid at zero leaves the table.
        self.reg.apps_of_uid -= Counter({peer.uid: 1})
        if peer.app is not None:
            self.reg.declared_of_uid -= Counter({peer.uid: peer.declared})
            await self._gone(peer.app)

    def _refuse_once(self, uid: int, why: str) -> None:
        """Log a refused connection once per uid until that uid registers an app again."""
        if uid not in self._refused:
            self._refused.add(uid)
            logger.warning("apps.sock: refusing connections: %s", why)

    async def _on_message(self, peer: _Peer, msg: dict[str, Any]) -> bool:
        """Handle one message; False ends the connection."""
        op, app = msg.get("op"), peer.app
        if op == "stopped" and app is not None:
            seq = msg.get("seq")
            ev = app.stop_waiters.pop(seq, None) if isinstance(seq, int) else None
            if ev is not None:
                ev.set()
            return True
        if op == "register" and app is None:
            app = peer.app = self._register(peer, msg)
        elif op != "tracepoints" or app is None:
            peer.link.drop(f"unexpected {short_repr(op)}")
            return False
        if not self._add_tracepoints(peer, app, msg.get("tracepoints")):
            return False
        async with self.reg.lock:
            await self.setup_everywhere(app)
        app.link.post({"op": "registered"})
        return True

    def _register(self, peer: _Peer, msg: dict[str, Any]) -> App:
        self._refused.discard(peer.uid)
        try:
            procname = validate_name(str(msg.get("procname")), "process name")
        except InvalidName:
            procname = "app"
        app = App(self.reg.next_app_id, peer.pid, peer.uid, procname, peer.link, now_stamp())
        self.reg.next_app_id += 1
        self.reg.apps[app.id] = app
        logger.info("app %s registered (uid %d, registration %d)", app.label, app.uid, app.id)
        return app

    def _add_tracepoints(self, peer: _Peer, app: App, tps: Any) -> bool:
        """Add the declarations of ``tps`` within the app's and its uid's
        budgets; False (the app is dropped) when over them."""
        if not isinstance(tps, list):
            return True
        config = self.reg.config
        if len(app.tracepoints) + len(tps) > config.max_tracepoints_per_app:
            app.link.drop(f"declares more than {config.max_tracepoints_per_app} tracepoints")
            return False
        for tp in tps:
            decl = _declaration(app, tp)
            if decl is None:
                continue
            size = _declared_size(decl)
            if peer.declared + size > config.max_declared_per_app:
                app.link.drop(f"declares more than {config.max_declared_per_app} bytes of tracepoints")
                return False
            if self.reg.declared_of_uid[app.uid] + size > config.max_declared_per_uid:
                app.link.drop(f"uid {app.uid} would declare more than {config.max_declared_per_uid} bytes "
                              "of tracepoints over its apps")
                return False
            app.tracepoints.append(decl)
            level = _loglevel(tp)
            if level is not None:
                app.loglevels[decl.id] = level
            peer.declared += size
            self.reg.declared_of_uid[app.uid] += size
        return True

    async def _gone(self, app: App) -> None:
        """The app's connection ended: hand its streams over as dead."""
        self.reg.apps.pop(app.id, None)
        for ev in app.stop_waiters.values():
            ev.set()
        with trio.CancelScope(shield=True):
            for sess in list(self.reg.sessions.values()):
                for st in [st for st in sess.streams.values() if st.app_id == app.id and st.memfd >= 0]:
                    if await self._producer_gone(sess, st):
                        st.free_buffer()
                    elif sess.snapshot:
                        self._deaths += 1
                        st.dead = self._deaths
                if sess.snapshot:
                    await self._keep_last_dead(sess)
            logger.info("app %s gone", app.label)

    async def _producer_gone(self, sess: Session, st: Stream, release: bool = False) -> bool:
        """Tell consumerd; whether the ring may be freed now."""
        try:
            reply = await self.consumers.call(sess.owner_uid, ProducerGoneOp(key=st.key, release=release))
        except (UserError, trio.TooSlowError, trio.BrokenResourceError, OSError):
            return False
        return isinstance(reply, ReleasedReply) and reply.released

    async def _keep_last_dead(self, sess: Session) -> None:
        """A snapshot session keeps the rings of its last ``snapshot_keep_dead``
        dead apps: the memory they hold is bounded by that many apps' rings."""
        dead: dict[int, list[Stream]] = {}
        for st in sess.streams.values():
            if st.dead and st.memfd >= 0:
                dead.setdefault(st.app_id, []).append(st)
        by_age = sorted(dead.values(), key=lambda sts: max(s.dead for s in sts))
        for streams in by_age[:max(0, len(by_age) - self.reg.config.snapshot_keep_dead)]:
            for st in streams:
                if await self._producer_gone(sess, st, release=True):
                    st.free_buffer()
                    logger.info("session %s: ring %s of a dead app freed (--snapshot-keep-dead %d)",
                                sess.name, st.key, self.reg.config.snapshot_keep_dead)

    # ------------------------------------------------------------ buffer hand-out
    async def setup_everywhere(self, app: App) -> None:
        """Give a (re)registered app the streams of every started session.  A
        session whose consumerd refuses is marked in error (``status`` shows
        it); the app and the other sessions carry on."""
        for sess in list(self.reg.sessions.values()):
            if sess.state is SessionState.STARTED:
                try:
                    await self.setup(sess, app)
                except (UserError, trio.TooSlowError) as exc:
                    sess.error = f"cannot trace {app.label}: {exc}"
                    logger.error("session %s: %s", sess.name, sess.error)

    async def setup(self, sess: Session, app: App) -> None:
        """Create what (session, app) needs and enable the matching events."""
        if sess.owner_uid != 0 and app.uid != sess.owner_uid:
            return  # a user traces their own apps only; root traces every app
        wanted: dict[str, frozenset[int]] = {}
        for ch in sess.channels.values():
            ids = frozenset(tp.id for tp in app.tracepoints if ch.matches(tp.name, app.loglevels.get(tp.id)))
            if ids:
                wanted[ch.name] = ids
        if not wanted and app.id not in sess.traces:
            return
        tr = sess.traces.get(app.id) or await self._new_trace(sess, app)
        if tr.declared < len(app.tracepoints):
            text = "".join(
                ctf.metadata_event(ctf.EventDecl(tp.name, tp.id, tp.fields, stream_id=ch.index,
                                                 loglevel=_ctf_loglevel(app.loglevels.get(tp.id))))
                for tp in app.tracepoints[tr.declared:]
                for ch in sess.channels_in_order()
            )
            await self._add_metadata(sess, tr, text)
            tr.declared = len(app.tracepoints)
        for ch_name, ids in wanted.items():
            key = _stream_key(sess, ch_name, app)
            st = sess.streams.get(key)
            if st is None:
                why = ring_refusal(self.reg, sess, sess.channels[ch_name])
                if why is not None:
                    # Not created: the app's events of this channel are not
                    # traced; status shows it, the log says it once.
                    if key not in sess.refused:
                        sess.refuse(key, f"channel {ch_name} of {app.label}: {why}")
                        logger.warning("session %s: ring buffer of channel %s for app %s not created, its "
                                       "events are not traced: %s", sess.name, ch_name, app.label, why)
                    continue
                sess.refused.pop(key, None)
                st = await self._new_stream(sess, app, ch_name)
            if st.ids != ids:
                st.ids = ids
                self.reg.journal_changed(sess)  # the metadata of what is enabled now
                app.link.post({"op": "enable", "key": st.key, "ids": sorted(ids)})

    async def _new_trace(self, sess: Session, app: App) -> Trace:
        path = sess.trace_path(app.procname, app.pid, app.started)
        tr = Trace(f"{sess.id}-{app.id}", path, uuid.uuid4().bytes, app.uid)
        sess.traces[app.id] = tr
        await self.consumers.call(sess.owner_uid, self.reg.trace_op(sess, tr))
        info = ctf.TraceInfo(
            uuid=tr.uuid,
            hostname=self.reg.hostname,
            trace_name=sess.name,
            creation_datetime=sess.created,
            procname=app.procname,
            vpid=app.pid,
            clock_offset_ns=sess.clock_offset_ns,
            channels=tuple(ch.name for ch in sess.channels_in_order()),
        )
        await self._add_metadata(sess, tr, ctf.metadata_preamble(info))
        return tr

    async def _add_metadata(self, sess: Session, tr: Trace, text: str) -> None:
        """Send ``text`` to consumerd in pieces that fit a message, and keep it
        (compressed) for a restarted consumerd, within the app uid's budget.

        Raises:
            UserError: over the budget, or consumerd refused.
        """
        limit = self.reg.config.max_metadata_per_uid
        if self.reg.metadata_of_uid[tr.uid] >= limit:
            raise UserError(f"uid {tr.uid} holds {limit} bytes of trace metadata, its limit")
        before = tr.kept
        pieces = tr.add_pieces(text)
        self.reg.metadata_of_uid[tr.uid] += tr.kept - before
        for op in pieces:
            await self.consumers.call(sess.owner_uid, op)

    async def _new_stream(self, sess: Session, app: App, ch_name: str) -> Stream:
        key = _stream_key(sess, ch_name, app)
        ch = sess.channels[ch_name]
        memfd = create_buffer(BufferSpec(ch.subbuf_size, ch.num_subbuf, ch.overwrite), time.monotonic_ns(),
                              f"tw-{key}")
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        st = Stream(key, sess.name, ch_name, app.id, memfd, efd)
        app_fds = [memfd, efd]
        if ch.blocking_timeout_ms:
            # A blocking channel: a pipe wakes the app waiting for space.
            # consumerd (and sessiond, for a restarted one) hold the write
            # end, the app only the read end: two open file descriptions,
            # so the app cannot make the consumer's writes block.
            space_r, st.space_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            app_fds.append(space_r)
        sess.streams[key] = st
        try:
            await self.consumers.call(sess.owner_uid, self.reg.stream_op(sess, st), st.fds)
            self.reg.journal_changed(sess)  # before the app may fill it (sessiond/saved.py)
            app.link.post(
                {"op": "stream", "key": key, "subbuf_size": ch.subbuf_size, "num_subbuf": ch.num_subbuf,
                 "blocking_timeout_ms": ch.blocking_timeout_ms},
                tuple(app_fds),
            )
        finally:
            if len(app_fds) > 2:
                os.close(app_fds[2])  # posted as a duplicate; sessiond keeps no read end
        return st

    # ------------------------------------------------------------ ask and wait
    async def ask(self, sess: Session, make_msg: MakeMsg) -> list[tuple[App, trio.Event]]:
        """Send ``make_msg(keys, seq)`` to every app with streams in the
        session; each answers ``stopped`` with the seq once it has handled it
        (and everything sent before).  Returns what to wait for."""
        waits = []
        for app in list(self.reg.apps.values()):
            keys = sess.keys_of(app.id)
            if not keys or app.link.dropped:
                continue
            seq = self._next_seq
            self._next_seq += 1
            ev = trio.Event()
            app.stop_waiters[seq] = ev
            app.link.post(make_msg(keys, seq))
            waits.append((app, ev))
        return waits

    async def ask_and_wait(self, sess: Session, make_msg: MakeMsg, timeout: float) -> list[App]:
        """:meth:`ask`, then wait (at most ``timeout`` s); returns the apps
        that did not answer in time."""
        waits = await self.ask(sess, make_msg)
        with trio.move_on_after(timeout):
            for _app, ev in waits:
                await ev.wait()
        return [app for app, ev in waits if not ev.is_set()]

    async def sync(self, sess: Session) -> None:
        """Wait (bounded) until every app of the session has applied what it
        was sent, so events emitted once ``start``/``enable-event`` returns
        are recorded."""
        await self.ask_and_wait(sess, lambda keys, seq: {"op": "sync", "seq": seq},
                                self.reg.config.app_stop_timeout)

    async def enable_existing(self, sess: Session) -> None:
        """Streams that exist from an earlier start get their events back."""
        for st in list(sess.streams.values()):
            app = self.reg.apps.get(st.app_id)
            if app is not None:
                app.link.post({"op": "enable", "key": st.key, "ids": sorted(st.ids)})

    async def close_streams(self, sess: Session) -> None:
        """Tell every app to let go of the session's streams (destroy)."""
        for app in list(self.reg.apps.values()):
            keys = sess.keys_of(app.id)
            if keys:
                app.link.post({"op": "close", "keys": keys})


def _stream_key(sess: Session, channel: str, app: App) -> str:
    return f"{sess.id}-{channel}-{app.id}"


@dataclass
class _Peer:
    """One connection on apps.sock, before and after it registers."""

    pid: int
    uid: int
    conn: SeqPacket
    link: AppLink
    app: App | None = None
    declared: int = 0  # bytes of its tracepoint declarations


def _declared_size(decl: ctf.EventDecl) -> int:
    """What keeping a declaration costs, roughly, in bytes."""
    return 64 + len(decl.name) + sum(48 + len(name) for name, _type in decl.fields)


def _ctf_loglevel(level: int | None) -> int:
    """The CTF/LTTng log level (0 EMERG ... 14 DEBUG) the metadata gives a
    log event of this ``logging`` level; a plain tracepoint keeps LTTng's
    default, 13 (DEBUG_LINE)."""
    if level is None:
        return 13
    for floor, ctf_level in ((50, 2), (40, 3), (30, 4), (20, 6)):  # CRIT, ERR, WARNING, INFO
        if level >= floor:
            return ctf_level
    return 14  # DEBUG


def _loglevel(tp: Any) -> int | None:
    """A log event's level (``tracewire.logging``), from a declaration
    already checked by ``_declaration``; None for a plain tracepoint or a
    level that is not an int in 0..2**31-1 (the event then matches only
    patterns without a level)."""
    level = tp.get("loglevel")
    if isinstance(level, int) and not isinstance(level, bool) and 0 <= level < 2**31:
        return level
    return None


def _declaration(app: App, tp: Any) -> ctf.EventDecl | None:
    """One declared tracepoint, or None (logged) when it is malformed."""
    try:
        tp_id, name, fields = int(tp["id"]), str(tp["name"]), tp["fields"]
        decl = ctf.EventDecl(name, tp_id, tuple((str(n), ctf.FieldType[str(t).upper()]) for n, t in fields))
    except Exception as exc:  # anything an app sends: refused, never raised
        logger.warning("app %s: bad tracepoint %s: %s", app.label, short_repr(tp), exc)
        return None
    if tp_id != len(app.tracepoints):
        logger.warning("app %s: tracepoint id %d out of order", app.label, tp_id)
        return None
    return decl
