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
(JSON lines, :class:`ResumeJournal`) whenever a trace, a stream or metadata
is added, or the session rotates, before the app is given the stream: any
packet in the spool has its stream in the journal.  ``destroy`` deletes it.

A load of a saved relay session whose ``created`` names a journal of the
same owner takes that stamp again (the same relay directory, and the same
spool) and *recovers*: the journal's traces and streams go into the
registry as those of dead apps (streams without a ring) and are declared to
consumerd as a restarted consumerd would be told them, so consumerd reloads
each stream's spool, declares the traces and metadata to the relay, and
sends what the relay lacks (it drops what it has).  App ids of the new
sessiond start after the recovered ones, so no new stream takes a
recovered stream's key (its spool files' name).

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

import base64
import binascii
import json
import logging
import os
import re
import stat
import zlib
from typing import TYPE_CHECKING, Any

import trio

from sessiond.model import Registry, Session, SessionState, Stream, Trace, UserError
from tracewire import saved as fmt
from tracewire.names import validate_name
from tracewire.ops import MetadataOp, SaveRequest, short_repr

if TYPE_CHECKING:
    from sessiond.commands import Commands

__all__ = ["ResumeJournal", "load_directory", "load_session", "save_sessions", "saved_of"]

logger = logging.getLogger(__name__)

JOURNAL_VERSION = 1
MAX_JOURNAL_TRACES = 4096
MAX_JOURNAL_STREAMS = 65536
MAX_SPOOL_FILES = 65536
MAX_LOAD_FILES = 1024  # saved sessions read from one --load directory
_STAMP = re.compile(r"\d{8}T\d{6}\Z")
_CHUNK_STAMP = re.compile(r"(\d{8}T\d{6}[+-]\d{4})?\Z")
_ID = re.compile(r"(\d{1,18})-(\d{1,18})\Z")


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
                             ch.blocking_timeout_ms, ch.tracefile_size, ch.tracefile_count, tuple(ch.patterns))
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
    return {"sessions": [{"name": s.name, "text": fmt.dumps(saved_of(s))} for s in chosen]}


# ------------------------------------------------------------------ the journal
class JournalError(ValueError):
    """A resume journal that cannot be used (one line)."""


class _Recovered:
    """What a journal says of a session that had traces."""

    def __init__(self, owner_uid: int, chunk: int, chunk_begin: str, traces: dict[int, Trace],
                 streams: list[Stream]) -> None:
        self.owner_uid = owner_uid
        self.chunk = chunk
        self.chunk_begin = chunk_begin
        self.traces = traces
        self.streams = streams


class _Written:
    """What this sessiond has appended to one journal."""

    __slots__ = ("traces", "pieces", "streams", "chunk")

    def __init__(self) -> None:
        self.traces: set[str] = set()
        self.pieces: dict[str, int] = {}  # trace id -> metadata pieces written
        self.streams: set[str] = set()
        self.chunk: tuple[int, str] = (0, "")


class ResumeJournal:
    """``RUNDIR/resume/<name>-<created>.json`` for every relay session with
    traces (see the module docstring).

    The file is JSON lines, appended to: a first line for the session, then
    one per trace, metadata piece, stream and chunk change, so that a new
    app costs one short append, not a rewrite of every app's metadata.
    The first write of a sessiond to a journal rewrites it whole (a loaded
    session's journal goes on from what the registry holds)."""

    def __init__(self, rundir: str, max_metadata: int) -> None:
        self.directory = os.path.join(rundir, "resume")
        self.max_bytes = max_metadata * 2 + 16 * 1024 * 1024  # base64 of the kept pieces, and the rest
        self._written: dict[str, _Written] = {}

    def path(self, name: str, created: str) -> str:
        return os.path.join(self.directory, f"{name}-{created}.json")

    @staticmethod
    def wanted(sess: Session) -> bool:
        return bool(sess.url) and not sess.snapshot and bool(sess.traces)

    def write(self, sess: Session) -> None:
        """Record what ``sess`` got since the last write.  A failure is
        logged: tracing goes on, without resume after a crash."""
        if not self.wanted(sess):
            return
        path = self.path(sess.name, sess.created)
        done = self._written.get(path)
        lines: list[dict[str, Any]] = []
        if done is None:
            done = _Written()
            lines.append({"session": {"version": JOURNAL_VERSION, "name": sess.name, "created": sess.created,
                                      "owner_uid": sess.owner_uid}})
        for app_id, tr in sess.traces.items():
            if tr.trace_id not in done.traces:
                lines.append({"trace": {"app_id": app_id, "trace_id": tr.trace_id, "path": tr.path,
                                        "uuid": tr.uuid.hex(), "uid": tr.uid}})
            lines += [{"metadata": {"trace_id": tr.trace_id, "offset": off, "data": base64.b64encode(c).decode()}}
                      for off, c in tr.pieces[done.pieces.get(tr.trace_id, 0):]]
        lines += [{"stream": {"key": st.key, "channel": st.channel, "app_id": st.app_id}}
                  for st in sess.streams.values() if st.key not in done.streams]
        if (sess.chunk, sess.chunk_begin) != done.chunk:
            lines.append({"chunk": {"chunk": sess.chunk, "begin": sess.chunk_begin}})
        if not lines:
            return
        text = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
        try:
            if path not in self._written:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                tmp = f"{path}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    _write_all(fd, text)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    _write_all(fd, text)
                finally:
                    os.close(fd)
        except OSError as exc:
            logger.error("session %s: cannot write its resume journal %s: %s", sess.name, path, exc)
            self._written.pop(path, None)  # the next write starts it again, whole
            return
        self._written[path] = done
        done.traces.update(tr.trace_id for tr in sess.traces.values())
        done.pieces.update((tr.trace_id, len(tr.pieces)) for tr in sess.traces.values())
        done.streams.update(sess.streams)
        done.chunk = (sess.chunk, sess.chunk_begin)

    def remove(self, sess: Session) -> None:
        path = self.path(sess.name, sess.created)
        self._written.pop(path, None)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("session %s: cannot remove %s: %s", sess.name, path, exc)

    def read(self, name: str, created: str) -> _Recovered | None:
        """The journal of session ``name``-``created``; None when there is none.

        Raises:
            JournalError: it is unreadable or does not check.
        """
        path = self.path(name, created)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise JournalError(f"cannot open {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > self.max_bytes:
                raise JournalError(f"{path} is not sessiond's own file of at most {self.max_bytes} bytes")
            data = f.read(self.max_bytes + 1)
        try:
            return _check_journal(fold_journal(data), name, created)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, binascii.Error,
                zlib.error) as exc:
            raise JournalError(f"{path}: {exc}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fold_journal(data: bytes) -> dict[str, Any]:
    """A journal's lines as one object (what ``_check_journal`` checks).  A
    last line cut short (a crash in the middle of an append) is left out.

    Raises:
        ValueError, KeyError, TypeError, AttributeError: not a journal.
    """
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    obj: dict[str, Any] = {}
    traces: dict[str, dict[str, Any]] = {}
    for i, raw in enumerate(lines):
        try:
            line = json.loads(raw)
        except ValueError:
            if i == len(lines) - 1 and not data.endswith(b"\n"):
                break
            raise
        if not isinstance(line, dict) or len(line) != 1:
            raise ValueError(f"line {i + 1} is not one record")
        ((kind, rec),) = line.items()
        if not isinstance(rec, dict):
            raise ValueError(f"line {i + 1} is not one record")
        if i == 0:
            if kind != "session":
                raise ValueError("the first line is not the session's")
            obj.update(rec, chunk=0, chunk_begin="", traces=[], streams=[])
        elif kind == "trace":
            if rec.get("trace_id") in traces:
                raise ValueError(f"line {i + 1}: trace {rec.get('trace_id')!r} again")
            t = dict(rec, metadata=[])
            traces[rec["trace_id"]] = t
            obj["traces"].append(t)
        elif kind == "metadata":
            traces[rec["trace_id"]]["metadata"].append([rec["offset"], rec["data"]])
        elif kind == "stream":
            obj["streams"].append(rec)
        elif kind == "chunk":
            obj["chunk"], obj["chunk_begin"] = rec["chunk"], rec["begin"]
        else:
            raise ValueError(f"line {i + 1}: unknown record {kind!r}")
    if not obj:
        raise ValueError("empty")
    return obj


def unfold_journal(obj: dict[str, Any]) -> bytes:
    """The lines of a journal object (tests write edited journals with it)."""
    lines: list[dict[str, Any]] = [{"session": {k: obj[k] for k in ("version", "name", "created", "owner_uid")}}]
    for t in obj["traces"]:
        lines.append({"trace": {k: v for k, v in t.items() if k != "metadata"}})
        lines += [{"metadata": {"trace_id": t["trace_id"], "offset": off, "data": d}} for off, d in t["metadata"]]
    lines += [{"stream": st} for st in obj["streams"]]
    lines.append({"chunk": {"chunk": obj["chunk"], "begin": obj["chunk_begin"]}})
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _int(v: object, low: int = 0, high: int = 2**62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise ValueError(f"not an integer from {low} to {high}: {short_repr(v)}")
    return v


def _str(v: object, limit: int = 4096) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= limit or "\0" in v:
        raise ValueError(f"not a string of 1 to {limit} characters: {short_repr(v)}")
    return v


def _check_journal(obj: Any, name: str, created: str) -> _Recovered:
    """The journal's content, every field checked.

    Raises:
        ValueError, KeyError, TypeError: it does not check.
    """
    if not isinstance(obj, dict) or obj.get("version") != JOURNAL_VERSION:
        raise ValueError("not a resume journal of a version this sessiond reads")
    if obj["name"] != name or obj["created"] != created:
        raise ValueError("it is another session's")
    chunk_begin = obj.get("chunk_begin") or ""
    if not isinstance(chunk_begin, str) or not _CHUNK_STAMP.match(chunk_begin):
        raise ValueError("chunk_begin is not a stamp")
    traces = obj["traces"]
    streams = obj["streams"]
    if not isinstance(traces, list) or len(traces) > MAX_JOURNAL_TRACES:
        raise ValueError(f"traces: not a list of at most {MAX_JOURNAL_TRACES}")
    if not isinstance(streams, list) or len(streams) > MAX_JOURNAL_STREAMS:
        raise ValueError(f"streams: not a list of at most {MAX_JOURNAL_STREAMS}")
    out_traces: dict[int, Trace] = {}
    for t in traces:
        app_id = _int(t["app_id"], 1)
        trace_id = _str(t["trace_id"], 40)
        m = _ID.match(trace_id)
        if m is None or int(m.group(2)) != app_id or app_id in out_traces:
            raise ValueError(f"trace id {trace_id!r} is not <session>-<app> of a new app")
        path = _str(t["path"])
        if not path.startswith("ust/pid/") or any(p in ("", ".", "..") for p in path.split("/")):
            raise ValueError(f"trace path {path!r} is not ust/pid/...")
        uuid = bytes.fromhex(_str(t["uuid"], 32))
        if len(uuid) != 16:
            raise ValueError("uuid is not 16 bytes")
        tr = Trace(trace_id, path, uuid, _int(t["uid"], 0, 2**32 - 1))
        pieces = t["metadata"]
        if not isinstance(pieces, list):
            raise ValueError("metadata is not a list")
        for off, b64 in pieces:
            if _int(off) != tr.size:
                raise ValueError("metadata pieces leave a gap")
            comp = base64.b64decode(_str(b64, 1 << 26), validate=True)
            d = zlib.decompressobj()
            text = d.decompress(comp, MetadataOp.MAX_CHARS * 4)
            if d.unconsumed_tail or not d.eof:
                raise ValueError("a metadata piece is larger than a piece may be")
            text.decode()  # UnicodeDecodeError is a ValueError
            tr.pieces.append((off, comp))
            tr.size += len(text)
        out_traces[app_id] = tr
    out_streams: list[Stream] = []
    keys: set[str] = set()
    for s in streams:
        key = _str(s["key"], 300)
        channel = validate_name(_str(s["channel"], 300), "channel name")
        app_id = _int(s["app_id"], 1)
        owner = out_traces.get(app_id)
        if owner is None or key != f"{owner.trace_id.split('-')[0]}-{channel}-{app_id}" or key in keys:
            raise ValueError(f"stream {key!r} is not <session>-<channel>-<app> of a journal's trace")
        keys.add(key)
        out_streams.append(Stream(key, name, channel, app_id, -1, -1))
    return _Recovered(_int(obj["owner_uid"], 0, 2**32 - 1), _int(obj["chunk"], 0, 2**32 - 1), chunk_begin,
                      out_traces, out_streams)


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
    journal = reg.journal
    recovered = None
    warning = None
    if saved.created and saved.url and journal is not None:
        try:
            recovered = journal.read(saved.name, saved.created)
        except JournalError as exc:
            warning = f"what a sessiond left spooled is not resumed: {exc}"
        if recovered is not None and recovered.owner_uid != uid:
            warning = "what a sessiond left spooled is not resumed: it is another user's session"
            recovered = None
    reply = cmds.create(saved.create_request(), uid, gid)
    sess = reg.sessions[saved.name]
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
            if why:
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


async def _recover(cmds: Commands, sess: Session, rec: _Recovered) -> str | None:
    """Put the journal's traces and streams in ``sess`` as a dead app's, and
    declare them to consumerd; returns why not, when not."""
    reg = cmds.reg
    used_traces = {tr.trace_id for s in reg.sessions.values() for tr in s.traces.values()}
    used_keys = {k for s in reg.sessions.values() for k in s.streams}
    if any(tr.trace_id in used_traces for tr in rec.traces.values()) or any(st.key in used_keys for st in rec.streams):
        return "its trace or stream ids are taken by another session"
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

