"""Saved sessions in sessiond: ``save``, ``load``, ``--load DIR``, and the
resume journal that lets a new sessiond send what a killed one left in a
relay spool.

Theory of operation
-------------------
``save`` answers with the definitions (``tracewire.saved``) of the sessions
the caller may see; the CLI writes the files, as the caller.  ``load``
takes a file's text, checks it again (the client is not trusted), and
replays it through the very commands a user would run: ``create``,
``enable-channel``, ``enable-event``, ``enable-rotation``, then ``start``
when the session was started.

A relay session's packets wait in its spool
(``RUNDIR/spool/<name>-<created>/``, written by the owner's consumerd) until
the relay acknowledges them.  The spool survives sessiond and consumerd (a
SIGKILL leaves the files; only a reboot that empties ``/run`` loses them),
but the spool alone cannot be sent: the relay files a session under
``<host>/<name>-<created>/``, each stream belongs to a trace whose metadata
and path the relay may never have received.  So sessiond keeps, for every
relay session that has traces, a *resume journal*
``RUNDIR/resume/<name>-<created>.json`` (a directory of sessiond's own
user, 0700): the owner, the session's stamp and trace chunk, each trace (its
id, path, uuid, the app's uid and the metadata pieces sent so far, zlib as
kept in memory) and each stream (its key, channel, app).  It is appended to
(JSON lines, ``sessiond.resume.ResumeJournal``) whenever a trace, a stream or metadata
is added, or the session rotates, before the app is given the stream: any
packet in the spool has its stream in the journal.  ``destroy`` deletes it.

A load of a saved relay session whose ``created`` names a journal of the
same owner takes that stamp again (the same relay directory, and the same
spool) and *recovers*: the journal's traces and streams go into the
registry as those of dead apps (streams without a ring) and are declared to
consumerd as a restarted consumerd would be told them, so consumerd reloads
each stream's spool, declares the traces and metadata to the relay, and
sends what the relay lacks (it drops what it has).  App ids of the new
sessiond, and the ids of sessions made from then on, start after the
recovered ones, so no new stream takes a recovered stream's key
(``<session id>-<channel>-<app id>``, its spool files' name).

Bounds: the journal is read from sessiond's own directory but still
checked like a user's file (size, counts, names, key forms); its metadata
counts against the app uid's metadata budget, as when it was sent; a
recovered session whose spool directory holds more than
``_spool_bound(sess)`` bytes, or more than ``MAX_SPOOL_FILES`` files, is
not recovered (one log line; the spool stays for a look by hand).

``--load DIR`` reads every ``*.json`` in DIR at start-up.  A file makes a
session for the file's owner: a user's sessiond takes only the user's
files; root's takes a file of user U for U if U is root or a member of the
``tracing`` group (who may create sessions anyway).  A file that its group
or others may write, a symbolic link, or anything but a regular file is
refused: nobody but its owner decides what a file makes sessiond do.  An
error in one file is one log line; the others still load.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import TYPE_CHECKING, Any

import trio

from sessiond.model import Registry, Session, SessionState, UserError
from sessiond.resume import JournalError, Recovered
from tracewire import saved as fmt
from tracewire.ops import SaveRequest

if TYPE_CHECKING:
    from sessiond.commands import Commands

__all__ = ["load_directory", "load_session", "save_sessions", "saved_of"]

logger = logging.getLogger(__name__)

MAX_SPOOL_FILES = 65536
# How long a resuming load waits for the consumerd of a killed sessiond to
# let go of the spool (it writes out what it can, then exits, within 10 s).
SPOOL_FREE_TIMEOUT = 30.0
MAX_LOAD_FILES = 1024  # saved sessions read from one --load directory


def saved_of(sess: Session) -> fmt.SavedSession:
    """The definition of ``sess``, as a saved session."""
    return fmt.SavedSession(
        name=sess.name, created=sess.created, output=sess.output, url=sess.url, compress=sess.compress,
        compress_level=sess.compress_level, spool_size=sess.spool_size, auth_key_file=sess.auth_key_file,
        tls_ca=sess.tls_ca, snapshot=sess.snapshot, live_timer_us=sess.live_timer_us,
        rotation_timer_ms=sess.rotation_timer_ms, rotation_size=sess.rotation_size,
        started=sess.state is SessionState.STARTED,
        channels=tuple(
            fmt.SavedChannel(ch.name, ch.subbuf_size, ch.num_subbuf, ch.overwrite, ch.switch_timer_ms,
                             ch.blocking_timeout_ms, ch.tracefile_size, ch.tracefile_count, tuple(ch.patterns),
                             tuple((p, level, only) for p, (level, only) in ch.loglevels.items()))
            for ch in sess.channels_in_order()),
    )


def save_sessions(reg: Registry, req: SaveRequest, uid: int) -> dict[str, Any]:
    """The reply to ``save``: one saved session's text per session."""
    if req.session:
        chosen = [reg.session_for(req.session, uid)]
    else:
        chosen = [s for s in reg.sessions.values() if uid == 0 or s.owner_uid == uid]
        if not chosen:
            raise UserError("no session to save")
    return {"sessions": [{"name": s.name, "owner_uid": s.owner_uid, "text": fmt.dumps(saved_of(s))}
                         for s in chosen]}


# ------------------------------------------------------------------ loading
def _spool_bound(sess: Session, streams: int) -> int:
    """The most a recovered session's spool may hold: its cap, and the
    spare segments its streams may keep (consumerd/spool.py)."""
    return sess.spool_size + (streams + 1) * 4 * 1024 * 1024


def _spool_problem(path: str, bound: int) -> str | None:
    """Why the spool directory ``path`` is too big to be reloaded (None: it is not)."""
    total = files = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                files += 1
                if files > MAX_SPOOL_FILES:
                    return f"{path} holds more than {MAX_SPOOL_FILES} files"
                if e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if total > bound:
        return f"{path} holds {total} bytes, more than the {bound} its session may spool"
    return None


async def load_session(cmds: Commands, saved: fmt.SavedSession, uid: int, gid: int,
                       force: bool = False) -> dict[str, Any]:
    """Create session ``saved`` for ``uid`` (the caller holds the registry's
    lock), resuming what a killed sessiond left in its spool.

    Raises:
        UserError: a session of that name exists (without ``force``), or
            one of the commands refused (the session is then destroyed).
    """
    reg = cmds.reg
    if saved.name in reg.sessions:
        if not force:
            raise UserError(f"session {saved.name!r} already exists (load --force replaces it)")
        await cmds.destroy(reg.session_for(saved.name, uid))
    recovered = None
    warning = None
    if saved.created and saved.url and not saved.snapshot:
        try:
            recovered = reg.resume_journal().read(saved.name, saved.created)
        except JournalError as exc:
            warning = f"what a sessiond left spooled is not resumed: {exc}"
        if recovered is not None and recovered.owner_uid != uid:
            warning = "what a sessiond left spooled is not resumed: it is another user's session"
            recovered = None
    if recovered is not None:
        # This session and every later one get ids above the recovered
        # keys' (<session id>-<channel>-<app id>): no new stream takes one.
        reg.next_session_id = max(reg.next_session_id, max(_old_session_ids(recovered), default=0) + 1)
    reply = cmds.create(saved.create_request(), uid, gid)
    sess = reg.sessions[saved.name]
    fresh = sess.created
    try:
        if recovered is not None:
            sess.created = saved.created  # the same relay directory, the same spool
        for ch in saved.channels:
            cmds.enable_channel(saved.channel_request(ch), uid)
        for ev in saved.event_requests():
            await cmds.enable_event(ev, uid)
        rot = saved.rotation_request()
        if rot is not None:
            cmds.enable_rotation(sess, rot)
        if recovered is not None:
            why = await _recover(cmds, sess, recovered)
            if why:  # nothing was changed: a session of its own, as a new one
                sess.created = fresh
                warning = f"what a sessiond left spooled is not resumed: {why}"
            else:
                reply["resumed"] = {"traces": len(recovered.traces), "streams": len(recovered.streams)}
        if saved.started:
            await cmds.start(sess)
    except BaseException:
        if reg.sessions.get(saved.name) is sess:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await cmds.destroy(sess)
        raise
    if warning:
        logger.warning("session %s: %s", saved.name, warning)
        reply["warning"] = warning
    reply["state"] = sess.state.value
    return reply


async def _wait_spool_free(path: str, timeout: float) -> str | None:
    """Wait until no consumerd holds the spool in ``path`` (the killed
    sessiond's may still be writing out what it could read): two
    consumerds must not recycle the same segment files.  Returns why not."""
    from consumerd.spool import spool_in_use

    with trio.move_on_after(timeout):
        while True:
            try:
                if not spool_in_use(path):
                    return None
            except OSError as exc:
                return f"cannot open {path}: {exc.strerror}"
            await trio.sleep(0.1)
    return f"a consumerd still uses {path} after {timeout:g} s"


def _old_session_ids(rec: Recovered) -> set[int]:
    return {int(tr.trace_id.split("-")[0]) for tr in rec.traces.values()}


async def _recover(cmds: Commands, sess: Session, rec: Recovered) -> str | None:
    """Put the journal's traces and streams in ``sess`` as a dead app's, and
    declare them to consumerd; returns why not, when not."""
    reg = cmds.reg
    used_traces = {tr.trace_id for s in reg.sessions.values() for tr in s.traces.values()}
    used_keys = {k for s in reg.sessions.values() for k in s.streams}
    if any(tr.trace_id in used_traces for tr in rec.traces.values()) or any(st.key in used_keys for st in rec.streams):
        return "its trace or stream ids are taken by another session"
    # A session made before the load, with a recovered key's session id,
    # could give an app already registered (an id below next_app_id) that
    # very key: only a load before any app (--load at start-up) is sure.
    clash = _old_session_ids(rec) & {s.id for s in reg.sessions.values() if s is not sess}
    if clash and min(rec.traces, default=reg.next_app_id) < reg.next_app_id:
        return f"session id {min(clash)} of its streams is another session's now (load it before apps register)"
    missing = sorted({st.channel for st in rec.streams} - set(sess.channels))
    if missing:
        return f"the saved session has no channel {missing[0]!r} (the spool has streams of it)"
    kept = sum(tr.kept for tr in rec.traces.values())
    for uid in {tr.uid for tr in rec.traces.values()}:
        mine = sum(tr.kept for tr in rec.traces.values() if tr.uid == uid)
        if reg.metadata_of_uid[uid] + mine > reg.config.max_metadata_per_uid:
            return f"uid {uid} would hold more than {reg.config.max_metadata_per_uid} bytes of trace metadata"
    problem = _spool_problem(reg.spool_dir(sess), _spool_bound(sess, len(rec.streams)))
    if problem:
        return problem
    problem = await _wait_spool_free(reg.spool_dir(sess), SPOOL_FREE_TIMEOUT)
    if problem:
        return problem
    reg.next_app_id = max(reg.next_app_id, max(rec.traces, default=0) + 1)
    for app_id, tr in rec.traces.items():
        sess.traces[app_id] = tr
        reg.metadata_of_uid[tr.uid] += tr.kept
    for st in rec.streams:
        sess.streams[st.key] = st
    sess.chunk, sess.chunk_begin = rec.chunk, rec.chunk_begin
    logger.info("session %s: resuming %d streams of %d traces (%d bytes of metadata) from %s",
                sess.name, len(rec.streams), len(rec.traces), kept, reg.spool_dir(sess))
    await cmds._declare(sess)
    for tr in rec.traces.values():
        await cmds.consumers.call(sess.owner_uid, reg.trace_op(sess, tr))
        for op in tr.metadata_ops():
            await cmds.consumers.call(sess.owner_uid, op)
    for st in rec.streams:
        await cmds.consumers.call(sess.owner_uid, reg.stream_op(sess, st, replay=True))
    return None


def _owner_of(st: os.stat_result) -> tuple[int, int]:
    """(uid, gid) a file of ``st`` makes a session for.

    Raises:
        UserError: this sessiond takes no session from that file's owner.
    """
    import grp
    import pwd

    euid = os.geteuid()
    if st.st_mode & 0o022:
        raise UserError("its group or others may write it: refused (chmod go-w)")
    if euid != 0:
        if st.st_uid != euid:
            raise UserError(f"it belongs to uid {st.st_uid}, not to this sessiond's user")
        return euid, os.getegid()
    try:
        pw = pwd.getpwuid(st.st_uid)
    except KeyError:
        raise UserError(f"its owner uid {st.st_uid} is no user") from None
    if st.st_uid != 0:
        try:
            tracing = grp.getgrnam("tracing").gr_gid
        except KeyError:
            raise UserError("it belongs to a user, and there is no 'tracing' group to allow one") from None
        if tracing not in os.getgrouplist(pw.pw_name, pw.pw_gid):
            raise UserError(f"its owner {pw.pw_name} is not in the 'tracing' group")
    return st.st_uid, pw.pw_gid


def _read_file(path: str) -> tuple[fmt.SavedSession, int, int]:
    """A saved session file and who it makes a session for.

    Raises:
        UserError: refused, unreadable or invalid (one line).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"cannot open it: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UserError("not a regular file")
        uid, gid = _owner_of(st)
        data = f.read(fmt.MAX_FILE + 1)
    try:
        return fmt.parse(data), uid, gid
    except fmt.SavedSessionError as exc:
        raise UserError(str(exc)) from None


async def load_directory(cmds: Commands, directory: str) -> int:
    """``--load DIR``: every ``*.json`` file of ``directory``; returns how
    many loaded.  Each failure is one log line."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".json"))
    except OSError as exc:
        logger.error("--load %s: %s", directory, exc.strerror)
        return 0
    if len(names) > MAX_LOAD_FILES:
        logger.error("--load %s: %d files, only the first %d are read", directory, len(names), MAX_LOAD_FILES)
        names = names[:MAX_LOAD_FILES]
    loaded = 0
    for n in names:
        path = os.path.join(directory, n)
        try:
            saved, uid, gid = _read_file(path)
            async with cmds.reg.lock:
                reply = await load_session(cmds, saved, uid, gid)
        except (UserError, trio.TooSlowError, OSError) as exc:
            logger.error("--load %s: not loaded: %s", path, exc)
            continue
        loaded += 1
        logger.info("--load %s: session %s loaded for uid %d (%s)%s", path, saved.name, uid, reply["state"],
                    f"; resumed {reply['resumed']}" if "resumed" in reply else "")
    return loaded

