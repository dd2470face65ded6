"""The resume journal: what a new sessiond needs to send what a killed one
left in a relay session's spool (the theory is in sessiond/saved.py's
docstring, and docs/reliability.md, "A sessiond killed with packets
spooled").

Kept apart from sessiond/saved.py (save, load, --load): every relay session
writes its journal, while the loading code is imported only when a session
is saved or loaded.
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
from typing import Any

from sessiond.model import Session, Stream, Trace
from tracewire.consumer_ops import MetadataOp
from tracewire.names import validate_name
from tracewire.ops import short_repr

__all__ = ["JournalError", "Recovered", "ResumeJournal", "fold_journal", "unfold_journal"]

logger = logging.getLogger(__name__)

JOURNAL_VERSION = 1
MAX_JOURNAL_TRACES = 4096
MAX_JOURNAL_STREAMS = 65536
_CHUNK_STAMP = re.compile(r"(\d{8}T\d{6}[+-]\d{4})?\Z")
_ID = re.compile(r"(\d{1,18})-(\d{1,18})\Z")


class JournalError(ValueError):
    """A resume journal that cannot be used (one line)."""


class Recovered:
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

    def read(self, name: str, created: str) -> Recovered | None:
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


def _check_journal(obj: Any, name: str, created: str) -> Recovered:
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
    return Recovered(_int(obj["owner_uid"], 0, 2**32 - 1), _int(obj["chunk"], 0, 2**32 - 1), chunk_begin,
                      out_traces, out_streams)
