"""The CLI's commands: create, enable-channel, enable-event, start, stop,
destroy, list, list --apps, status, rotate, enable-rotation, disable-rotation.

:meth:`Commands.run` takes one decoded request (``tracewire.ops``), checks
who may do it, and answers with the JSON-ready reply.  One command that
changes something runs at a time (the registry's lock); ``list``, ``list
--apps`` (``sessiond.applist``), ``status`` and ``ping`` only read, and
answer at once.  ``stop`` is the barrier: apps disable the
session's events and wait for writers in flight; then consumerd flushes every
stream of the session down to the last whole event and answers once it is
written (or acknowledged by the relay).  The barrier gives up after the
request's timeout (default ``--stop-timeout``): the session stays stopped,
and a later ``stop`` runs the flush again until one completes.

``rotate`` archives the session's current trace chunk: consumerd drains
every stream to its last whole event, switches each to the next chunk's
files and answers once the closed chunk is complete in the sink (moved to
``archives/<begin>-<end>-<index>/``).  A rotation schedule
(``enable-rotation``) is run by :meth:`Commands.rotation_loop`, one task
for every session of this sessiond, taking the same turn as a CLI request.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import trio

from sessiond import accounting
from sessiond.applist import describe_apps
from sessiond.apps import AppProtocol
from sessiond.consumers import ConsumerPool
from sessiond.model import Channel, Registry, Session, SessionState, UserError, chunk_stamp, now_stamp
from tracewire.consumer_ops import (
    FlushOp,
    RemoveSessionOp,
    RotatedReply,
    RotateOp,
    SnapshotOp,
    SnapshotReply,
    StatusOp,
    StreamsReply,
)
from tracewire.names import MAX_SESSION_NAME, InvalidName, validate_name
from tracewire.ops import (
    DEFAULT_CHANNEL,
    CreateRequest,
    DestroyRequest,
    DisableRotationRequest,
    EnableChannelRequest,
    EnableEventRequest,
    EnableRotationRequest,
    ListAppsRequest,
    ListRequest,
    LoadRequest,
    PingRequest,
    Request,
    RotateRequest,
    SaveRequest,
    SnapshotRecordRequest,
    StartRequest,
    StatusRequest,
    StopRequest,
    encode,
    human_size,
)
from tracewire.ringbuf import BufferSpec
from tracewire.url import parse_url

__all__ = ["Commands"]

logger = logging.getLogger(__name__)

Reply = dict[str, Any]


def _name(value: str, what: str) -> str:
    try:
        return validate_name(value, what, MAX_SESSION_NAME)
    except InvalidName as exc:
        raise UserError(str(exc)) from None


class Commands:
    """What each CLI request does to the registry, the apps and consumerd."""

    def __init__(self, registry: Registry, consumers: ConsumerPool, apps: AppProtocol) -> None:
        self.reg = registry
        self.consumers = consumers
        self.apps = apps

    async def run(self, req: Request, uid: int, gid: int) -> Reply:
        """Carry out one request of user ``uid``.

        Raises:
            UserError: the request cannot be done (one line for the CLI).
            trio.TooSlowError: consumerd did not answer in time.
        """
        # Reading needs no turn: status and list answer while a stop waits
        # for a relay (minutes, with a full disk), whoever's stop it is.
        match req:
            case PingRequest():
                return {"pid": os.getpid(), "rundir": self.reg.config.rundir}
            case ListRequest():
                return self.list(req, uid)
            case StatusRequest():
                return await self.status(self.reg.session_for(req.session, uid))
            case ListAppsRequest():
                # Root sees every app, anyone else their own (as for sessions).
                return describe_apps(self.reg.apps.values(), uid)
            case SaveRequest():  # saved sessions' code is imported by those who use them
                from sessiond.saved import save_sessions

                return save_sessions(self.reg, req, uid)
        async with self.reg.lock:
            match req:
                case CreateRequest():
                    return self.create(req, uid, gid)
                case EnableChannelRequest():
                    return self.enable_channel(req, uid)
                case EnableEventRequest():
                    return await self.enable_event(req, uid)
                case StartRequest():
                    return await self.start(self.reg.session_for(req.session, uid))
                case StopRequest():
                    return await self.stop(self.reg.session_for(req.session, uid), req.timeout)
                case DestroyRequest():
                    return await self.destroy(self.reg.session_for(req.session, uid))
                case SnapshotRecordRequest():
                    return await self.snapshot_record(req, uid)
                case RotateRequest():
                    return await self.rotate(self.reg.session_for(req.session, uid))
                case EnableRotationRequest():
                    return self.enable_rotation(self.reg.session_for(req.session, uid), req)
                case DisableRotationRequest():
                    return self.disable_rotation(self.reg.session_for(req.session, uid))
                case LoadRequest():
                    from sessiond.saved import load_session
                    from tracewire.saved import SavedSessionError, parse

                    try:
                        saved = parse(req.text)
                    except SavedSessionError as exc:
                        raise UserError(str(exc)) from None
                    return await load_session(self, saved, uid, gid, req.force)
        raise UserError(f"unknown command {req.KIND!r}")

    def create(self, req: CreateRequest, uid: int, gid: int) -> Reply:
        name = _name(req.name, "session name")
        if name in self.reg.sessions:
            raise UserError(f"session {name!r} already exists")
        output, url = req.output, req.url
        if url:
            try:
                url = str(parse_url(url))
            except ValueError as exc:
                raise UserError(str(exc)) from None
            output = None
        elif output:
            output = os.path.abspath(output)
        else:
            raise UserError("give an output directory or a relay URL")
        if req.live_timer_us and not url:
            raise UserError("a live session streams to a relay: give --url (live viewers attach to the relay)")
        if req.live_timer_us and req.snapshot:
            raise UserError("a session is either live or a snapshot session, not both")
        accounting.check_create(self.reg, uid, gid, req.spool_size if url and not req.snapshot else 0)
        sess = Session(name, self.reg.next_session_id, uid, gid, output, url, now_stamp(),
                       compress=req.compress, compress_level=req.compress_level,
                       spool_size=req.spool_size, auth_key_file=req.auth_key_file or None,
                       tls_ca=req.tls_ca or None, clock_offset_ns=time.time_ns() - time.monotonic_ns(),
                       snapshot=req.snapshot, live_timer_us=req.live_timer_us)
        self.reg.next_session_id += 1
        self.reg.sessions[name] = sess
        self.reg.current[uid] = name
        return {"session": name, "sink": sess.sink()}

    def enable_channel(self, req: EnableChannelRequest, uid: int) -> Reply:
        sess = self.reg.session_for(req.session, uid)
        name = _name(req.channel, "channel name")
        if sess.state is not SessionState.CREATED and name not in sess.channels:
            raise UserError(f"session {sess.name!r} has been started: channels can no longer be added")
        try:
            BufferSpec(req.subbuf_size, req.num_subbuf)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        overwrite = req.overwrite or (sess.snapshot and not req.discard)
        if overwrite and not sess.snapshot:
            raise UserError("overwrite channels belong to snapshot sessions (tracewire create NAME --snapshot): "
                            "a streaming session's consumer must read every sub-buffer before it is reused")
        if overwrite and req.blocking_timeout_ms:
            raise UserError("an overwrite channel never makes the app wait: use --discard with --blocking-timeout")
        _check_file_names(sess.channels, name, req.tracefile_size)
        ch = sess.channels.get(name)
        if ch is not None and sess.state is not SessionState.CREATED:
            raise UserError(f"channel {name!r} exists and the session has been started")
        accounting.check_channel(self.reg, sess, "enable-channel",
                                 Channel(name, 0, req.subbuf_size, req.num_subbuf, overwrite), ch)
        if ch is not None:
            ch.subbuf_size, ch.num_subbuf, ch.switch_timer_ms = req.subbuf_size, req.num_subbuf, req.switch_timer_ms
            ch.blocking_timeout_ms = req.blocking_timeout_ms
            ch.overwrite = overwrite
            ch.tracefile_size, ch.tracefile_count = req.tracefile_size, req.tracefile_count
        else:
            sess.channels[name] = Channel(name, len(sess.channels), req.subbuf_size, req.num_subbuf,
                                          overwrite, req.switch_timer_ms,
                                          blocking_timeout_ms=req.blocking_timeout_ms,
                                          tracefile_size=req.tracefile_size, tracefile_count=req.tracefile_count)
        return {"session": sess.name, "channel": name}

    async def enable_event(self, req: EnableEventRequest, uid: int) -> Reply:
        sess = self.reg.session_for(req.session, uid)
        chname = req.channel
        if chname is None:
            chname = DEFAULT_CHANNEL
            if chname not in sess.channels:
                if sess.state is not SessionState.CREATED:
                    raise UserError(f"session {sess.name!r} has been started: channels can no longer be added")
                new = Channel(chname, len(sess.channels), overwrite=sess.snapshot)
                accounting.check_channel(self.reg, sess, "enable-event", new)
                sess.channels[chname] = new
        ch = sess.channels.get(chname)
        if ch is None:
            raise UserError(f"no channel named {chname!r} in session {sess.name!r}")
        rule = None if req.loglevel is None else (req.loglevel, req.loglevel_only)
        if req.pattern in ch.patterns and ch.loglevels.get(req.pattern) != rule:
            raise UserError(f"event {req.pattern!r} is already enabled in channel {ch.name!r} "
                            f"with {_describe_loglevel(ch.loglevels.get(req.pattern))}")
        if req.pattern not in ch.patterns:
            ch.patterns.append(req.pattern)
            if rule is not None:
                ch.loglevels[req.pattern] = rule
        refused = sess.refused_total
        if sess.state is SessionState.STARTED:
            for app in list(self.reg.apps.values()):
                await self.apps.setup(sess, app)
            await self.apps.sync(sess)
        return {"session": sess.name, "channel": ch.name, "pattern": req.pattern,
                **_refused_warning(sess, refused)}

    async def start(self, sess: Session) -> Reply:
        if sess.state is SessionState.STARTED:
            raise UserError(f"session {sess.name!r} is already started")
        if not any(ch.patterns for ch in sess.channels.values()):
            raise UserError(f"session {sess.name!r} has no enabled event (use 'tracewire enable-event PATTERN')")
        await self._declare(sess)
        sess.state = SessionState.STARTED
        sess.stop_pending = False  # the next stop's flush covers what the last one left
        sess.chunk_begin = sess.chunk_begin or chunk_stamp()
        sess.rotated_while_stopped = False
        self._schedule(sess)
        refused = sess.refused_total
        for app in list(self.reg.apps.values()):
            await self.apps.setup(sess, app)
        await self.apps.enable_existing(sess)
        await self.apps.sync(sess)
        return {"session": sess.name, **_refused_warning(sess, refused)}

    async def _declare(self, sess: Session) -> None:
        """Tell the owner's consumerd about the session (once)."""
        if sess.declared:
            return
        if sess.url:
            # The spool is the owner's: their consumerd writes it.
            d = self.reg.spool_dir(sess)
            os.makedirs(os.path.dirname(d), mode=0o711, exist_ok=True)
            os.makedirs(d, mode=0o700, exist_ok=True)
            if os.geteuid() == 0 and sess.owner_uid != 0:
                os.chown(d, sess.owner_uid, sess.owner_gid)
        await self.consumers.call(sess.owner_uid, self.reg.session_op(sess))
        sess.declared = True

    async def stop(self, sess: Session, timeout: float | None = None) -> Reply:
        """Stop a started session; or, when the last stop of a stopped one
        did not complete (its flush timed out or failed), run the flush again."""
        if sess.state is SessionState.STARTED:
            return await self._stop(sess, timeout)
        if sess.state is SessionState.STOPPED and sess.stop_pending:
            return await self._flush(sess, timeout)
        raise UserError(f"session {sess.name!r} is not started")

    async def _stop(self, sess: Session, timeout: float | None = None) -> Reply:
        """The stop barrier: quiesce apps, then flush every stream to the sink."""
        sess.state = SessionState.STOPPED
        sess.stop_pending = True
        config = self.reg.config
        slow = await self.apps.ask_and_wait(
            sess, lambda keys, seq: {"op": "stop", "keys": keys, "seq": seq, "timeout": config.app_stop_timeout},
            config.app_stop_timeout)
        result = await self._flush(sess, timeout)
        if slow:
            result["warning"] = f"apps did not confirm the stop in time: {', '.join(a.label for a in slow)}"
        return result

    async def _flush(self, sess: Session, timeout: float | None) -> Reply:
        """The barrier's second half: every stream of the (stopped) session
        in its sink, within ``timeout`` s (None: ``--stop-timeout``).  Until
        it completes, the session's stop stays pending.

        Raises:
            UserError: not done in time (the text says what is still kept),
                or the sink failed.
        """
        wait = timeout if timeout is not None else self.reg.config.stop_timeout
        sess.stopping = True
        try:
            reply = await self.consumers.call(sess.owner_uid, FlushOp(session=sess.name, timeout=wait),
                                              timeout=wait + 30)
        finally:
            sess.stopping = False
        sess.stop_pending = False
        return {"session": sess.name, "streams": _streams(reply), "snapshot": sess.snapshot}

    async def destroy(self, sess: Session) -> Reply:
        result: Reply = {"session": sess.name}
        if sess.state is SessionState.STARTED:
            result = await self._stop(sess)
        await self.apps.close_streams(sess)
        if sess.declared and sess.chunk > 0 and not sess.rotated_while_stopped and not sess.stop_pending:
            # A session that was rotated ends with its last chunk archived
            # too (as LTTng's destroy does): every chunk is then in archives/.
            try:
                result["archive"] = (await self.rotate(sess, last=True))["path"]
            except (UserError, trio.TooSlowError) as exc:
                why = f"the last trace chunk stays in {sess.sink()}/active-chunk-{sess.chunk}: {exc}"
                result["warning"] = f"{result['warning']}; {why}" if result.get("warning") else why
        if sess.declared:
            # After a stop that timed out the user has waited already: a
            # short last chance, then what is left is counted as lost.
            op = RemoveSessionOp(session=sess.name, timeout=1.0) if sess.stop_pending \
                else RemoveSessionOp(session=sess.name)
            reply = await self.consumers.call(sess.owner_uid, op)
            lost = _lost(reply)
            if lost:
                result["warning"] = f"{result['warning']}; {lost}" if result.get("warning") else lost
        self.reg.remove(sess)
        return result

    async def snapshot_record(self, req: SnapshotRecordRequest, uid: int) -> Reply:
        """Write what the session's ring buffers hold now as a trace of its own,
        in ``NAME-YYYYmmdd-HHMMSS-SEQ`` (LTTng's naming) below the session's
        output, or below ``req.output`` / ``req.url``."""
        sess = self.reg.session_for(req.session, uid)
        if not sess.declared or not sess.streams:
            raise UserError(f"session {sess.name!r} holds no ring buffer yet: start it, and trace an app")
        name = _name(req.name or "snapshot-1", "snapshot name")
        directory = f"{name}-{datetime.now():%Y%m%d-%H%M%S}-{sess.snapshots}"
        sink: str | None = None
        if req.url:
            try:
                sink = str(parse_url(req.url))
            except ValueError as exc:
                raise UserError(str(exc)) from None
        elif req.output:
            if not os.path.isabs(req.output):
                raise UserError(f"--output {req.output!r} is not an absolute directory")
            sink = req.output
        sess.snapshots += 1
        wait = self.reg.config.stop_timeout
        reply = await self.consumers.call(
            sess.owner_uid, SnapshotOp(session=sess.name, directory=directory, sink=sink,
                                       max_size=req.max_size, timeout=wait), timeout=wait + 30)
        if not isinstance(reply, SnapshotReply):
            raise UserError("consumerd answered the snapshot without its figures")
        return {"session": sess.name, **{k: v for k, v in encode(reply).items() if k != "ok"}}
    async def rotate(self, sess: Session, last: bool = False) -> Reply:
        """Archive the session's current trace chunk; tracing goes on in the
        next one (``last``: none, the session is being destroyed).  A
        started session rotates at any time; a stopped one once (its last
        chunk), as with LTTng.

        Raises:
            UserError: nothing to rotate, or consumerd could not complete it
                in ``--stop-timeout`` (the chunk is then closed by the next
                rotation).
        """
        if sess.snapshot:
            raise UserError(f"session {sess.name!r} is a snapshot session: it writes no trace to rotate "
                            f"('tracewire snapshot record' writes its buffers)")
        if sess.live_timer_us:
            raise UserError(f"session {sess.name!r} is a live session: its viewers follow one trace, "
                            f"which is not rotated (as with LTTng)")
        if sess.state is SessionState.CREATED or not sess.declared:
            raise UserError(f"session {sess.name!r} has not been started: it has no trace chunk to rotate")
        if sess.state is SessionState.STOPPED and sess.rotated_while_stopped:
            raise UserError(f"session {sess.name!r} is stopped and its last trace chunk is archived already")
        wait = self.reg.config.stop_timeout
        end = chunk_stamp()
        archive = f"{sess.chunk_begin}-{end}-{sess.chunk}"
        reply = await self.consumers.call(
            sess.owner_uid, RotateOp(session=sess.name, chunk=sess.chunk, archive=archive, timeout=wait, last=last),
            timeout=wait + 30)
        if not isinstance(reply, RotatedReply):
            raise UserError("consumerd answered the rotation without a path")
        index = sess.chunk
        sess.chunk += 1
        sess.chunk_begin = end
        sess.last_archive = reply.path
        sess.rotated_while_stopped = sess.state is SessionState.STOPPED
        self.reg.journal_changed(sess)
        self._schedule(sess)
        return {"session": sess.name, "chunk": index, "path": reply.path}

    def enable_rotation(self, sess: Session, req: EnableRotationRequest) -> Reply:
        """Set the session's rotation schedule (a condition not given is kept)."""
        if sess.snapshot:
            raise UserError(f"session {sess.name!r} is a snapshot session: it writes no trace to rotate")
        if sess.live_timer_us:
            raise UserError(f"session {sess.name!r} is a live session: its viewers follow one trace, "
                            f"which is not rotated (as with LTTng)")
        if req.timer_ms:
            sess.rotation_timer_ms = req.timer_ms
        if req.size:
            sess.rotation_size = req.size
        self._schedule(sess)
        return {"session": sess.name, "rotation": _schedule_of(sess)}

    def disable_rotation(self, sess: Session) -> Reply:
        if not (sess.rotation_timer_ms or sess.rotation_size):
            raise UserError(f"session {sess.name!r} has no rotation schedule")
        sess.rotation_timer_ms = sess.rotation_size = 0
        return {"session": sess.name}

    @staticmethod
    def _schedule(sess: Session) -> None:
        """The next timed rotation: a timer's period after now."""
        if sess.rotation_timer_ms:
            sess.rotation_due = trio.current_time() + sess.rotation_timer_ms / 1000

    async def rotation_loop(self) -> None:
        """Rotate every started session whose schedule is due, until
        cancelled: a timer every ``rotation_check_interval`` at the latest,
        a size when consumerd says the current chunk holds that much.  A
        rotation that fails is logged and shown by ``status`` (the session's
        error); the next check tries again."""
        while True:
            await trio.sleep(self.reg.config.rotation_check_interval)
            for sess in list(self.reg.sessions.values()):
                if sess.state is not SessionState.STARTED or not (sess.rotation_timer_ms or sess.rotation_size):
                    continue
                try:
                    if not await self._rotation_due(sess):
                        continue
                    async with self.reg.lock:
                        if self.reg.sessions.get(sess.name) is sess and sess.state is SessionState.STARTED:
                            await self.rotate(sess)
                except (UserError, trio.TooSlowError) as exc:
                    sess.error = f"automatic rotation failed: {exc}"
                    logger.warning("session %s: %s", sess.name, sess.error)

    async def _rotation_due(self, sess: Session) -> bool:
        if sess.rotation_timer_ms and trio.current_time() >= sess.rotation_due:
            return True
        if not sess.rotation_size:
            return False
        reply = await self.consumers.call(sess.owner_uid, StatusOp(session=sess.name))
        if not isinstance(reply, StreamsReply):
            return False
        return sum(s.chunk_bytes for s in reply.streams) >= sess.rotation_size

    def list(self, req: ListRequest, uid: int) -> Reply:
        if req.session:
            visible = [self.reg.session_for(req.session, uid)]
        else:
            visible = [s for s in self.reg.sessions.values() if uid == 0 or s.owner_uid == uid]
        return {"sessions": [_describe(s) for s in visible], "current": self.reg.current.get(uid)}

    async def status(self, sess: Session) -> Reply:
        reply = await self.consumers.call(sess.owner_uid, StatusOp(session=sess.name))
        return {"session": _describe(sess, self.reg.config.snapshot_keep_dead), "streams": _streams(reply),
                "limits": accounting.describe_limits(self.reg, sess.owner_uid, sess.owner_gid)}


def _refused_warning(sess: Session, before: int) -> Reply:
    """A warning for the reply when rings were refused since ``before``."""
    n = sess.refused_total - before
    if n <= 0:
        return {}
    why = next(reversed(sess.refused.values()), "over the buffers limit")
    return {"warning": f"{n} ring buffers not created, their events are not traced: {why} "
                       "(see 'tracewire status')"}


def _lost(reply: object) -> str | None:
    """What a removed session's sink still held, and so lost, in words."""
    if not isinstance(reply, StreamsReply):
        return None
    packets = sum(s.unacked for s in reply.streams)
    size = sum(s.unacked_bytes for s in reply.streams)
    unread = sum(s.ring_unread for s in reply.streams)
    if not packets and not unread:
        return None
    return (f"destroyed with {packets} packets ({human_size(size)}) never acknowledged by the relay and "
            f"{unread} sub-buffers never read from the ring buffers: they are lost")


def _streams(reply: object) -> list[dict[str, Any]]:
    if not isinstance(reply, StreamsReply):
        raise UserError("consumerd answered without stream counters")
    return list(encode(reply)["streams"])


def _check_file_names(channels: Mapping[str, Channel], name: str, tracefile_size: int) -> None:
    """Channel ``name`` must not write another channel's stream files: with
    --tracefile-size, channel ``c`` writes ``c_0_0``, the one file of a
    channel ``c_0`` without it (and they would remove each other's files).

    Raises:
        UserError: the names collide.
    """
    clash = None
    if tracefile_size and name + "_0" in channels and not channels[name + "_0"].tracefile_size:
        clash = (name, name + "_0")
    elif name.endswith("_0") and not tracefile_size and channels.get(name[:-2]) is not None \
            and channels[name[:-2]].tracefile_size:
        clash = (name[:-2], name)
    if clash is not None:
        raise UserError(f"channel {clash[1]!r} would write {clash[1]}_0, a file of channel {clash[0]!r} "
                        f"(which has --tracefile-size): rename one of them")


def _schedule_of(sess: Session) -> Reply:
    return {"timer_ms": sess.rotation_timer_ms, "size": sess.rotation_size}


def _describe(sess: Session, keep_dead: int = 0) -> Reply:
    held = [st for st in sess.streams.values() if st.memfd >= 0]
    buffers = accounting.session_buffers(sess)
    return {
        "buffers": {"rings": buffers.rings, "reserved": buffers.reserved, "spool": buffers.spool,
                    "total": buffers.total},
        "refused_streams": [{"key": k, "why": w} for k, w in sess.refused.items()],
        "refused_total": sess.refused_total,
        "rings": len(held),
        "ring_bytes": sum(sess.channels[st.channel].subbuf_size * sess.channels[st.channel].num_subbuf
                          for st in held),
        "dead_rings": sum(1 for st in held if st.dead),
        "keep_dead": keep_dead,
        "name": sess.name,
        "state": sess.state.value,
        "sink": sess.sink(),
        "owner_uid": sess.owner_uid,
        "error": sess.error,
        "stop_pending": sess.stop_pending,
        "stopping": sess.stopping,
        "snapshot": sess.snapshot,
        "snapshots": sess.snapshots,
        "rotation": _schedule_of(sess),
        "chunks_archived": sess.chunk,
        "last_archive": sess.last_archive,
        "live_timer_us": sess.live_timer_us,
        "channels": [
            {
                "name": ch.name,
                "subbuf_size": ch.subbuf_size,
                "num_subbuf": ch.num_subbuf,
                "switch_timer_ms": sess.switch_timer_ms(ch),
                "blocking_timeout_ms": ch.blocking_timeout_ms,
                "tracefile_size": ch.tracefile_size,
                "tracefile_count": ch.tracefile_count,
                "mode": "overwrite" if ch.overwrite else "discard",
                "events": list(ch.patterns),
                "event_loglevels": {p: {"level": lv, "only": only} for p, (lv, only) in ch.loglevels.items()},
            }
            for ch in sess.channels_in_order()
        ],
    }


def _describe_loglevel(rule: tuple[int, bool] | None) -> str:
    """An ``enable-event`` rule's log level, for an error line."""
    if rule is None:
        return "no log level"
    return f"{'--loglevel-only' if rule[1] else '--loglevel'} {rule[0]}"
