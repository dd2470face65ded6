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
import time
import uuid
from collections.abc import Callable
from typing import Any

import trio

from sessiond.consumers import ConsumerPool
from sessiond.model import App, Registry, Session, SessionState, Stream, Trace, UserError, now_stamp
from tracewire import ctf
from tracewire.control import ControlError, close_fds
from tracewire.names import InvalidName, validate_name
from tracewire.ops import MetadataOp, ProducerGoneOp, ReleasedReply
from tracewire.ringbuf import BufferSpec, create_buffer
from tracewire.seqpacket import SeqPacket, peer_credentials

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

    # ------------------------------------------------------------ connection
    async def handle(self, sock: trio.socket.SocketType) -> None:
        """Serve one app's connection until it ends, then let its streams go."""
        conn = SeqPacket(sock)
        app: App | None = None
        try:
            pid, uid, _gid = peer_credentials(sock)
            while True:
                try:
                    got = await conn.receive()
                except ControlError as exc:
                    logger.warning("app %d: %s; dropping it", pid, exc)
                    return
                if got is None:
                    return
                msg, fds = got
                close_fds(fds)
                app = await self._on_message(conn, app, pid, uid, msg)
        except _DropApp as exc:
            logger.warning("app %s: %s; dropping it", exc.args[0], exc.args[1])
        except (OSError, trio.BrokenResourceError) as exc:
            logger.info("app connection lost: %s", exc)
        except Exception:  # one misbehaving app never takes sessiond down
            logger.exception("app connection dropped after an unexpected error")
        finally:
            conn.close()
            if app is not None:
                await self._gone(app)

    async def _on_message(self, conn: SeqPacket, app: App | None, pid: int, uid: int,
                          msg: dict[str, Any]) -> App:
        op = msg.get("op")
        if op == "register" and app is None:
            try:
                procname = validate_name(str(msg.get("procname")), "process name")
            except InvalidName:
                procname = "app"
            app = App(pid, uid, procname, conn, now_stamp())
            self.reg.apps[pid] = app
            logger.info("app %s registered", app.label)
        elif op == "stopped" and app is not None:
            seq = msg.get("seq")
            ev = app.stop_waiters.pop(seq, None) if isinstance(seq, int) else None
            if ev is not None:
                ev.set()
            return app
        elif op != "tracepoints" or app is None:
            raise _DropApp(pid, f"unexpected {op!r}")
        async with self.reg.lock:
            self._add_tracepoints(app, msg.get("tracepoints"))
            await self.setup_everywhere(app)
        await conn.send({"op": "registered"})
        return app

    def _add_tracepoints(self, app: App, tps: Any) -> None:
        if not isinstance(tps, list):
            return
        for tp in tps:
            try:
                tp_id, name, fields = int(tp["id"]), str(tp["name"]), tp["fields"]
                decl = ctf.EventDecl(
                    name, tp_id, tuple((str(n), ctf.FieldType[str(t).upper()]) for n, t in fields)
                )
            except Exception as exc:
                logger.warning("app %d: bad tracepoint %r: %s", app.pid, tp, exc)
                continue
            if tp_id != len(app.tracepoints):
                logger.warning("app %d: tracepoint id %d out of order", app.pid, tp_id)
                continue
            app.tracepoints.append(decl)

    async def _gone(self, app: App) -> None:
        """The app's connection ended: hand its streams over as dead."""
        self.reg.apps.pop(app.pid, None)
        for ev in app.stop_waiters.values():
            ev.set()
        with trio.CancelScope(shield=True):
            for sess in list(self.reg.sessions.values()):
                for st in [st for st in sess.streams.values() if st.pid == app.pid and st.memfd >= 0]:
                    try:
                        reply = await self.consumers.call(sess.owner_uid, ProducerGoneOp(key=st.key))
                    except (UserError, trio.TooSlowError, trio.BrokenResourceError, OSError):
                        continue
                    if isinstance(reply, ReleasedReply) and reply.released:
                        st.free_buffer()
            logger.info("app %s gone", app.label)

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
            ids = frozenset(tp.id for tp in app.tracepoints if ch.matches(tp.name))
            if ids:
                wanted[ch.name] = ids
        if not wanted and app.pid not in sess.traces:
            return
        tr = sess.traces.get(app.pid) or await self._new_trace(sess, app)
        if tr.declared < len(app.tracepoints):
            text = "".join(
                ctf.metadata_event(ctf.EventDecl(tp.name, tp.id, tp.fields, stream_id=ch.index))
                for tp in app.tracepoints[tr.declared:]
                for ch in sess.channels_in_order()
            )
            await self._add_metadata(sess, tr, text)
            tr.declared = len(app.tracepoints)
        for ch_name, ids in wanted.items():
            st = sess.streams.get(f"{sess.id}-{ch_name}-{app.pid}") or await self._new_stream(sess, app, ch_name)
            if st.ids != ids:
                st.ids = ids
                await app.conn.send({"op": "enable", "key": st.key, "ids": sorted(ids)})

    async def _new_trace(self, sess: Session, app: App) -> Trace:
        tr = Trace(f"{sess.id}-{app.pid}", f"ust/pid/{app.label}-{app.started}", uuid.uuid4().bytes)
        sess.traces[app.pid] = tr
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
        await self.consumers.call(sess.owner_uid, MetadataOp(trace_id=tr.trace_id, text=text))
        tr.metadata += text

    async def _new_stream(self, sess: Session, app: App, ch_name: str) -> Stream:
        key = f"{sess.id}-{ch_name}-{app.pid}"
        ch = sess.channels[ch_name]
        memfd = create_buffer(BufferSpec(ch.subbuf_size, ch.num_subbuf), time.monotonic_ns(), f"tw-{key}")
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        st = Stream(key, sess.name, ch_name, app.pid, memfd, efd)
        sess.streams[key] = st
        await self.consumers.call(sess.owner_uid, self.reg.stream_op(sess, st), (memfd, efd))
        await app.conn.send(
            {"op": "stream", "key": key, "subbuf_size": ch.subbuf_size, "num_subbuf": ch.num_subbuf},
            (memfd, efd),
        )
        return st

    # ------------------------------------------------------------ ask and wait
    async def ask(self, sess: Session, make_msg: MakeMsg) -> list[tuple[App, trio.Event]]:
        """Send ``make_msg(keys, seq)`` to every app with streams in the
        session; each answers ``stopped`` with the seq once it has handled it
        (and everything sent before).  Returns what to wait for."""
        waits = []
        for app in list(self.reg.apps.values()):
            keys = sess.keys_of(app.pid)
            if not keys:
                continue
            seq = self._next_seq
            self._next_seq += 1
            ev = trio.Event()
            app.stop_waiters[seq] = ev
            try:
                await app.conn.send(make_msg(keys, seq))
            except (OSError, trio.BrokenResourceError):
                app.stop_waiters.pop(seq, None)
                continue
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
            app = self.reg.apps.get(st.pid)
            if app is not None:
                await app.conn.send({"op": "enable", "key": st.key, "ids": sorted(st.ids)})

    async def close_streams(self, sess: Session) -> None:
        """Tell every app to let go of the session's streams (destroy)."""
        for app in list(self.reg.apps.values()):
            keys = sess.keys_of(app.pid)
            if keys:
                try:
                    await app.conn.send({"op": "close", "keys": keys})
                except (OSError, trio.BrokenResourceError):
                    pass


class _DropApp(Exception):
    """The app broke the protocol: (pid, why)."""
