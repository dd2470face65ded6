"""Saved sessions without daemons: the file format and its checks
(tracewire/saved.py), the resume journal and who a ``--load`` file makes a
session for (sessiond/saved.py)."""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from sessiond import resume
from sessiond import saved as sd_saved
from sessiond.model import Session, SessionState, Stream, Trace, UserError
from tracewire import consumer_ops, ops
from tracewire import saved as fmt

from fuzzing import examples

FULL = fmt.SavedSession(
    name="s1", created="20261202T183000", url="tw://collector:6342", compress=ops.Compression.NONE,
    compress_level=3, spool_size=8 * 1024 * 1024, auth_key_file="/etc/tracewire/key", tls_ca=None,
    rotation_timer_ms=600_000, rotation_size=256 * 1024 * 1024, started=True,
    channels=(
        fmt.SavedChannel("channel0", events=("demo:*", "app:tick")),
        fmt.SavedChannel("c1", 8192, 8, False, 100, ops.BLOCK_FOREVER, 65536, 3, ("x:*", "python:app.*"),
                         (("python:app.*", 30, False), ("x:*", 40, True))),
    ),
)


def _obj(s: fmt.SavedSession = FULL) -> dict:
    return json.loads(fmt.dumps(s))


def test_round_trip() -> None:
    assert fmt.parse(fmt.dumps(FULL)) == FULL
    snap = fmt.SavedSession(name="snap", output="/srv/t", snapshot=True,
                            channels=(fmt.SavedChannel("channel0", overwrite=True, events=("a:*",)),))
    assert fmt.parse(fmt.dumps(snap)) == snap
    live = fmt.SavedSession(name="lv", url="tws://h:7000", live_timer_us=200_000, tls_ca="/ca.pem")
    assert fmt.parse(fmt.dumps(live)) == live
    # The file names the key file, never holds a secret.
    assert "auth_key_file" in fmt.dumps(FULL) and "secret" not in fmt.dumps(FULL)


def test_optional_fields_take_the_defaults() -> None:
    s = fmt.parse(json.dumps({"format": "tracewire-session", "version": 1, "name": "m",
                              "sink": {"output": "/tmp/t"}, "channels": [{"name": "channel0"}]}))
    assert s.channels[0] == fmt.SavedChannel("channel0")
    assert (s.created, s.compress_level, s.spool_size, s.started) == ("", ops.DEFAULT_COMPRESS_LEVEL,
                                                                     ops.DEFAULT_SPOOL_SIZE, False)


def _set(path: str, value: object):
    def edit(obj: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            obj = obj[int(p)] if p.isdigit() else obj[p]
        key: int | str = int(last) if last.isdigit() else last
        if value is _DELETE:
            del obj[key]  # type: ignore[arg-type]
        else:
            obj[key] = value  # type: ignore[index]
    return edit


_DELETE = object()


@pytest.mark.parametrize(("edit", "message"), [
    (_set("format", "lttng"), r"^format: must be 'tracewire-session'"),
    (_set("version", 2), r"^version: 2 is not a version this tracewire reads"),
    (_set("bogus", 1), r"^bogus: unknown field"),
    (_set("name", _DELETE), r"^name: missing"),
    (_set("name", "a/b"), r"^name: "),
    (_set("name", 7), r"^name: must be a string"),
    (_set("created", "yesterday"), r"^created: must be a stamp"),
    (_set("sink", {"output": "rel/dir"}), r"^sink\.output: must be an absolute path"),
    (_set("sink", {"output": "/a", "url": "tw://h"}), r"^sink: give either output"),
    (_set("sink", {}), r"^sink: give either output"),
    (_set("sink", {"output": "/a", "compress_level": 3}), r"^sink: compression, spool"),
    (_set("sink.url", "http://h"), r"^sink\.url: "),
    (_set("sink.compress_level", 23), r"^sink\.compress_level: must be an integer from 1 to 22, not 23"),
    (_set("sink.compress_level", True), r"^sink\.compress_level: must be an integer"),
    (_set("sink.spool_size", 1000), r"^sink\.spool_size: must be an integer from 1048576"),
    (_set("sink.compress", "lz4"), r"^sink\.compress: must be one of zstd, none, not 'lz4'"),
    (_set("sink.auth_key_file", "key"), r"^sink\.auth_key_file: must be an absolute path"),
    (_set("sink.extra", 1), r"^sink\.extra: unknown field"),
    (_set("mode", "fast"), r"^mode: must be one of normal, snapshot, live"),
    (_set("live_timer_us", -5), r"^live_timer_us: must be an integer from 0"),
    (_set("live_timer_us", 100_000), r"^live_timer_us: only a live session has one"),
    (_set("mode", "snapshot"), r"^rotation: a snapshot session is not rotated"),
    (_set("rotation.timer_ms", -1), r"^rotation\.timer_ms: must be an integer from 0"),
    (_set("rotation.every", 1), r"^rotation\.every: unknown field"),
    (_set("channels", {}), r"^channels: must be a list"),
    (_set("channels.0", []), r"^channels\[0\]: must be a JSON object"),
    (_set("channels.1.name", "channel0"), r"^channels: a channel name is given twice"),
    (_set("channels.1.name", "../x"), r"^channels\[1\]\.name: "),
    (_set("channels.1.subbuf_size", 12288), r"^channels\[1\]\.subbuf_size: must be a power of two"),
    (_set("channels.1.subbuf_size", 1024), r"^channels\[1\]\.subbuf_size: must be an integer from 4096"),
    (_set("channels.1.num_subbuf", 1), r"^channels\[1\]\.num_subbuf: must be an integer from 2 to 1024"),
    (_set("channels.1.mode", "overwrite"), r"^channels: overwrite channels belong to snapshot sessions"),
    (_set("channels.1.mode", "drop"), r"^channels\[1\]\.mode: must be one of discard, overwrite"),
    (_set("channels.1.switch_timer_ms", -5), r"^channels\[1\]\.switch_timer_ms: must be an integer"),
    (_set("channels.1.blocking_timeout_ms", "forever"), r"^channels\[1\]\.blocking_timeout_ms: must be"),
    (_set("channels.1.tracefile_size", 0), r"^channels\[1\]: --tracefile-count needs --tracefile-size"),
    (_set("channels.1.tracefile_size", 4096), r"^channels\[1\]: --tracefile-size 4\.0 KiB is smaller"),
    (_set("channels.1.events", "x:*"), r"^channels\[1\]\.events: must be a list"),
    (_set("channels.1.events", [3]), r"^channels\[1\]\.events\[0\]: must be a string"),
    (_set("channels.1.events", ["x" * 300]), r"^channels\[1\]\.events\[0\]: event pattern must be 1 to 255"),
    (_set("channels.1.events", ["a", "a"]), r"^channels\[1\]\.events: a pattern is given twice"),
    (_set("channels.1.colour", "red"), r"^channels\[1\]\.colour: unknown field"),
    (_set("channels.1.loglevels", ["x:*"]), r"^channels\[1\]\.loglevels: must be an object"),
    (_set("channels.1.loglevels", {"y:*": {"level": 30}}), r"^channels\[1\]\.loglevels: 'y:\*' is not one of"),
    (_set("channels.1.loglevels", {"x:*": {"level": -1}}), r"^channels\[1\]\.loglevels\['x:\*'\]\.level: must be"),
    (_set("channels.1.loglevels", {"x:*": {"only": True}}), r"^channels\[1\]\.loglevels\['x:\*'\]\.level: missing"),
    (_set("channels.1.loglevels", {"x:*": {"level": 30, "only": 1}}), r"\.only: must be true or false"),
    (_set("channels.1.loglevels", {"x:*": {"level": 30, "at": 1}}), r"\.at: unknown field"),
    (_set("started", "yes"), r"^started: must be true or false"),
    (_set("channels", []), r"^started: a session without an enabled event cannot be started"),
])
def test_every_field_is_checked(edit, message: str) -> None:
    obj = _obj()
    edit(obj)
    with pytest.raises(fmt.SavedSessionError, match=message) as info:
        fmt.parse(json.dumps(obj))
    assert "\n" not in str(info.value)


def test_live_needs_a_url_and_a_timer_in_range() -> None:
    obj = _obj(fmt.SavedSession(name="l", output="/t"))
    obj["mode"] = "live"
    with pytest.raises(fmt.SavedSessionError, match=r"^mode: a live session streams to a relay"):
        fmt.parse(json.dumps(obj))
    obj = _obj(fmt.SavedSession(name="l", url="tw://h", live_timer_us=100_000))
    obj["live_timer_us"] = 5
    with pytest.raises(fmt.SavedSessionError, match=r"^live_timer_us: must be an integer from 10000"):
        fmt.parse(json.dumps(obj))


@pytest.mark.parametrize(("text", "message"), [
    (b"", r"^not JSON"),
    (b"\xff\xfe{", r"^not JSON"),
    (b"[1, 2]", r"^the file: must be a JSON object"),
    (b"[" * 100_000, r"^not JSON"),
    (b" " * (fmt.MAX_FILE + 1), r"larger than"),
])
def test_not_a_saved_session(text: bytes, message: str) -> None:
    with pytest.raises(fmt.SavedSessionError, match=message):
        fmt.parse(text)


@settings(max_examples=examples(100))
@given(hs.recursive(hs.none() | hs.booleans() | hs.integers() | hs.text(max_size=20),
                    lambda kids: hs.lists(kids, max_size=4) | hs.dictionaries(hs.text(max_size=8), kids, max_size=4),
                    max_leaves=20))
def test_hostile_json_fails_with_the_typed_error(value: object) -> None:
    obj = _obj()
    obj["channels"][1]["subbuf_size"] = value
    for text in (json.dumps(value), json.dumps(obj)):
        try:
            fmt.parse(text)
        except fmt.SavedSessionError:
            pass


@settings(max_examples=examples(200))
@given(hs.binary(max_size=300))
def test_hostile_bytes_fail_with_the_typed_error(data: bytes) -> None:
    try:
        fmt.parse(data)
    except fmt.SavedSessionError:
        pass


def test_saved_of_a_session() -> None:
    sess = Session("s1", 1, 0, 0, None, "tw://collector:6342", "20261202T183000",
                   state=SessionState.STARTED, auth_key_file="/etc/tracewire/key")
    from sessiond.model import Channel

    sess.channels["channel0"] = Channel("channel0", 0, patterns=["demo:*", "python:*"],
                                        loglevels={"python:*": (30, True)})
    s = sd_saved.saved_of(sess)
    assert s.started and s.url == "tw://collector:6342" and s.channels[0].events == ("demo:*", "python:*")
    assert fmt.parse(fmt.dumps(s)) == s
    # enable-event --loglevel-only WARNING comes back as it was given.
    reqs = {r.pattern: r for r in s.event_requests()}
    assert (reqs["python:*"].loglevel, reqs["python:*"].loglevel_only) == (30, True)
    assert (reqs["demo:*"].loglevel, reqs["demo:*"].loglevel_only) == (None, False)


# ------------------------------------------------------------ the resume journal
def _session_with_traces() -> Session:
    sess = Session("s1", 3, 1000, 1000, None, "tw://h:6342", "20261202T183000", chunk=2,
                   chunk_begin="20261202T183500+0000")
    for app_id in (4, 9):
        tr = Trace(f"3-{app_id}", f"ust/pid/demo-{app_id}-20261202T183001", uuid.uuid4().bytes, 1000)
        tr.add_pieces("/* CTF 1.8 */\n" + "x" * 40_000)
        sess.traces[app_id] = tr
        sess.streams[f"3-channel0-{app_id}"] = Stream(f"3-channel0-{app_id}", "s1", "channel0", app_id, -1, -1)
    return sess


def test_journal_round_trip(tmp_path: Path) -> None:
    j = resume.ResumeJournal(str(tmp_path), 16 * 1024 * 1024)
    sess = _session_with_traces()
    j.write(sess)
    path = Path(j.path("s1", sess.created))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rec = j.read("s1", sess.created)
    assert rec is not None
    assert (rec.owner_uid, rec.chunk, rec.chunk_begin) == (1000, 2, "20261202T183500+0000")
    assert {a: (t.trace_id, t.path, t.uuid, t.uid, t.size, t.metadata_ops()) for a, t in rec.traces.items()} == \
        {a: (t.trace_id, t.path, t.uuid, t.uid, t.size, t.metadata_ops()) for a, t in sess.traces.items()}
    assert [(s.key, s.channel, s.app_id, s.memfd) for s in rec.streams] == \
        [(s.key, s.channel, s.app_id, -1) for s in sess.streams.values()]
    assert j.read("s1", "20261202T999999") is None
    j.remove(sess)
    assert not path.exists()


def _journal_edit(tmp_path: Path, edit) -> str:
    j = resume.ResumeJournal(str(tmp_path), 16 * 1024 * 1024)
    sess = _session_with_traces()
    j.write(sess)
    path = Path(j.path("s1", sess.created))
    obj = resume.fold_journal(path.read_bytes())
    edit(obj)
    path.write_bytes(resume.unfold_journal(obj))
    with pytest.raises(resume.JournalError) as info:
        j.read("s1", sess.created)
    return str(info.value)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda o: o.update(version=9), "not a resume journal"),
    (lambda o: o["streams"].append(o["streams"][0]), "is not <session>-<channel>-<app>"),
    (lambda o: o.update(name="s2"), "another session's"),
    (lambda o: o["traces"][0].update(path="ust/../../etc"), "is not ust/pid/"),
    (lambda o: o["traces"][0].update(trace_id="3-5"), "is not <session>-<app>"),
    (lambda o: o["traces"][1].update(app_id=4, trace_id="3-4"), "again"),
    (lambda o: o["traces"][0].update(uuid="00"), "uuid"),
    (lambda o: o["traces"][0]["metadata"][1].__setitem__(0, 7), "gap"),
    (lambda o: o["traces"][0]["metadata"][0].__setitem__(1, "!!"), ""),
    (lambda o: o["streams"][0].update(key="../../x"), "is not <session>-<channel>-<app>"),
    (lambda o: o["streams"][0].update(app_id=77), "is not <session>-<channel>-<app>"),
    (lambda o: o["streams"][0].update(channel="a/b"), ""),
    (lambda o: o.update(owner_uid=-1), "not an integer"),
    (lambda o: o.update(chunk_begin="soon"), "chunk_begin"),
])
def test_journal_is_checked(tmp_path: Path, edit, message: str) -> None:
    assert message in _journal_edit(tmp_path, edit)


def test_journal_is_appended_to(tmp_path: Path) -> None:
    """A new trace, stream, metadata or chunk is one append; a last line cut
    short (a crash mid-append) is left out; a bad line elsewhere is refused."""
    j = resume.ResumeJournal(str(tmp_path), 16 * 1024 * 1024)
    sess = _session_with_traces()
    j.write(sess)
    path = Path(j.path("s1", sess.created))
    size = path.stat().st_size
    j.write(sess)
    assert path.stat().st_size == size  # nothing new: nothing written
    tr = Trace("3-12", "ust/pid/late-12-20261202T183009", uuid.uuid4().bytes, 1000)
    tr.add_pieces("/* late */")
    sess.traces[12] = tr
    sess.streams["3-channel0-12"] = Stream("3-channel0-12", "s1", "channel0", 12, -1, -1)
    sess.chunk = 3
    j.write(sess)
    lines = path.read_bytes()[size:].splitlines()
    assert [next(iter(json.loads(ln))) for ln in lines] == ["trace", "metadata", "stream", "chunk"]
    rec = j.read("s1", sess.created)
    assert rec is not None and sorted(rec.traces) == [4, 9, 12] and rec.chunk == 3
    assert [st.key for st in rec.streams] == list(sess.streams)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"stream": {"key": "3-chan')
    rec = j.read("s1", sess.created)
    assert rec is not None and len(rec.streams) == 3
    path.write_bytes(whole.replace(b"\n", b"\nnot json\n", 1))
    with pytest.raises(resume.JournalError):
        j.read("s1", sess.created)
    # A new sessiond's first write rewrites the journal whole.
    j2 = resume.ResumeJournal(str(tmp_path), 16 * 1024 * 1024)
    j2.write(sess)
    assert path.read_bytes() != whole
    assert resume.fold_journal(path.read_bytes()) == resume.fold_journal(whole)


def test_journal_metadata_bomb_refused(tmp_path: Path) -> None:
    import base64
    import zlib

    bomb = base64.b64encode(zlib.compress(b"x" * (consumer_ops.MetadataOp.MAX_CHARS * 4 + 1))).decode()
    assert "larger than a piece" in _journal_edit(tmp_path, lambda o: o["traces"][0].update(metadata=[[0, bomb]]))


# ------------------------------------------------------------ who a --load file is for
def _stat(uid: int, mode: int = 0o600) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 1, 1, 1, uid, uid, 100, 0, 0, 0))


def test_load_file_owner_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="its group or others may write it"):
        sd_saved._owner_of(_stat(os.geteuid(), 0o620))
    with pytest.raises(UserError, match="its group or others may write it"):
        sd_saved._owner_of(_stat(os.geteuid(), 0o602))
    # A user's sessiond takes only the user's files.
    monkeypatch.setattr(sd_saved.os, "geteuid", lambda: 1234)
    monkeypatch.setattr(sd_saved.os, "getegid", lambda: 1234)
    assert sd_saved._owner_of(_stat(1234)) == (1234, 1234)
    with pytest.raises(UserError, match="belongs to uid 0, not to this sessiond's user"):
        sd_saved._owner_of(_stat(0))
    # Root's: root's own files; a user's only for a 'tracing' member.
    monkeypatch.setattr(sd_saved.os, "geteuid", lambda: 0)
    assert sd_saved._owner_of(_stat(0))[0] == 0
    with pytest.raises(UserError, match="is no user"):
        sd_saved._owner_of(_stat(2**31 - 7))
    import pwd

    nobody = pwd.getpwnam("nobody")
    with pytest.raises(UserError, match="'tracing'"):
        sd_saved._owner_of(_stat(nobody.pw_uid))


def test_load_file_refuses_links_and_special_files(tmp_path: Path) -> None:
    good = tmp_path / "s.json"
    good.write_text(fmt.dumps(fmt.SavedSession(name="s", output="/tmp/x")))
    good.chmod(0o600)
    saved, uid, _gid = sd_saved._read_file(str(good))
    assert (saved.name, uid) == ("s", os.geteuid())
    link = tmp_path / "l.json"
    link.symlink_to(good)
    with pytest.raises(UserError, match="cannot open it"):
        sd_saved._read_file(str(link))
    fifo = tmp_path / "f.json"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UserError, match="not a regular file"):
        sd_saved._read_file(str(fifo))
    bad = tmp_path / "b.json"
    bad.write_text('{"format": "tracewire-session", "version": 1}')
    bad.chmod(0o600)
    with pytest.raises(UserError, match=r"^name: missing$"):
        sd_saved._read_file(str(bad))


# ------------------------------------------------------------ load_session, without daemons
class _Consumers:
    """consumerd as the commands see it: every operation done at once."""

    def __init__(self) -> None:
        self.ops: list[consumer_ops.Op] = []

    async def call(self, uid: int, op: consumer_ops.Op, fds: tuple[int, ...] = (), timeout: float | None = None):
        self.ops.append(op)
        if isinstance(op, consumer_ops.FlushOp | consumer_ops.RemoveSessionOp | consumer_ops.StatusOp):
            return consumer_ops.StreamsReply(())
        return consumer_ops.DoneReply()


class _Apps:
    async def setup(self, sess, app) -> None: ...
    async def sync(self, sess) -> None: ...
    async def enable_existing(self, sess) -> None: ...
    async def close_streams(self, sess) -> None: ...
    async def ask_and_wait(self, sess, make_msg, timeout):
        return []


def _commands(rundir: str):
    from sessiond.commands import Commands
    from sessiond.model import Registry, SessiondConfig

    reg = Registry(SessiondConfig(rundir=rundir, hostname="h"))
    consumers = _Consumers()
    return Commands(reg, consumers, _Apps()), consumers  # type: ignore[arg-type]


def _saved_relay(started: bool = True, channel: str = "channel0") -> fmt.SavedSession:
    return fmt.SavedSession(name="s1", created="20261202T183000", url="tw://h:6342", started=started,
                            channels=(fmt.SavedChannel(channel, events=("demo:*",)),))


async def test_load_resumes_the_journal(tmp_path: Path) -> None:
    journal = resume.ResumeJournal(str(tmp_path), 16 * 1024 * 1024)
    old = _session_with_traces()
    old.owner_uid = os.geteuid()
    journal.write(old)
    cmds, consumers = _commands(str(tmp_path))
    reply = await sd_saved.load_session(cmds, _saved_relay(), os.geteuid(), os.getegid())
    assert reply["resumed"] == {"traces": 2, "streams": 2} and reply["state"] == "started"
    sess = cmds.reg.sessions["s1"]
    # The same relay identity and chunk; new ids above the recovered ones.
    assert (sess.created, sess.chunk, sess.chunk_begin) == ("20261202T183000", 2, "20261202T183500+0000")
    assert sess.id > 3 and cmds.reg.next_app_id == 10
    assert sorted(sess.streams) == ["3-channel0-4", "3-channel0-9"]
    assert all(st.memfd < 0 for st in sess.streams.values())
    kinds = [type(op).__name__ for op in consumers.ops]
    assert kinds == ["SessionOp", "AddTraceOp", "MetadataOp", "MetadataOp", "MetadataOp",
                     "AddTraceOp", "MetadataOp", "MetadataOp", "MetadataOp", "AddStreamOp", "AddStreamOp"]
    streams = [op for op in consumers.ops if isinstance(op, consumer_ops.AddStreamOp)]
    assert all(op.replay and op.gone for op in streams)
    session_op = consumers.ops[0]
    assert isinstance(session_op, consumer_ops.SessionOp) and session_op.spool_dir is not None
    assert session_op.spool_dir.endswith("/spool/s1-20261202T183000") and session_op.chunk == 2
    # destroy forgets the journal.
    await cmds.destroy(sess)
    assert journal.read("s1", "20261202T183000") is None


@pytest.mark.parametrize(("setup", "warning"), [
    ("other_user", "it is another user's session"),
    ("missing_channel", "the saved session has no channel 'channel0'"),
    ("big_spool", "more than the"),
])
async def test_load_does_not_resume(tmp_path: Path, setup: str, warning: str) -> None:
    journal = resume.ResumeJournal(str(tmp_path), 16 * 1024 * 1024)
    old = _session_with_traces()
    old.owner_uid = os.geteuid() + 1 if setup == "other_user" else os.geteuid()
    journal.write(old)
    if setup == "big_spool":
        spool = tmp_path / "spool" / "s1-20261202T183000"
        spool.mkdir(parents=True)
        with open(spool / "3-channel0-4.0", "wb") as f:
            f.truncate(ops.DEFAULT_SPOOL_SIZE + 64 * 1024 * 1024)  # sparse: no disk taken
    cmds, consumers = _commands(str(tmp_path))
    saved = _saved_relay(channel="other" if setup == "missing_channel" else "channel0")
    reply = await sd_saved.load_session(cmds, saved, os.geteuid(), os.getegid())
    assert warning in reply["warning"] and "resumed" not in reply
    assert not cmds.reg.sessions["s1"].traces
    assert not any(isinstance(op, consumer_ops.AddStreamOp) for op in consumers.ops)
    # Nor its identity: a trace directory and a spool of its own.
    assert cmds.reg.sessions["s1"].created != "20261202T183000"


async def test_load_refuses_a_taken_name_and_force_replaces(tmp_path: Path) -> None:
    cmds, _ = _commands(str(tmp_path))
    await sd_saved.load_session(cmds, _saved_relay(started=False), os.geteuid(), os.getegid())
    with pytest.raises(UserError, match="already exists"):
        await sd_saved.load_session(cmds, _saved_relay(started=False), os.geteuid(), os.getegid())
    first = cmds.reg.sessions["s1"].id
    await sd_saved.load_session(cmds, _saved_relay(started=False), os.geteuid(), os.getegid(), force=True)
    assert cmds.reg.sessions["s1"].id != first


async def test_resume_waits_for_an_earlier_consumerd_to_let_go_of_the_spool(tmp_path: Path, autojump_clock) -> None:
    import trio

    from consumerd.spool import Spool, spool_in_use

    d = tmp_path / "spool" / "s1-20261202T183000"
    assert not spool_in_use(str(d))  # no directory: nobody's
    held = Spool(str(d), 1 << 20)
    assert spool_in_use(str(d))
    assert "a consumerd still uses" in (await sd_saved._wait_spool_free(str(d), 5.0) or "")

    async def let_go() -> None:
        await trio.sleep(2)
        held.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(let_go)
        assert await sd_saved._wait_spool_free(str(d), 5.0) is None
    assert not spool_in_use(str(d))
    (tmp_path / "link").symlink_to(d)
    assert "cannot open" in (await sd_saved._wait_spool_free(str(tmp_path / "link"), 5.0) or "")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_root_saves_a_users_session_as_that_users_file(tmp_path: Path) -> None:
    """So that ``tracewire-sessiond --load`` makes it that user's again."""
    from tracewire.cli import CliError, _write_saved

    path = tmp_path / "us.json"
    _write_saved(str(path), "{}", force=False, owner=4321)
    st = path.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (4321, 0o600)
    with pytest.raises(CliError, match="exists"):
        _write_saved(str(path), "{}", force=False, owner=4321)
    _write_saved(str(path), "{}", force=True)
    assert path.stat().st_uid == 0
    assert [p.name for p in tmp_path.iterdir()] == ["us.json"]  # no temporary file left
