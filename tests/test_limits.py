"""The limits file (sessiond/limits.py) and the accounting (sessiond/accounting.py),
without I/O: a registry built by hand, checked against a policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessiond import accounting
from sessiond.limits import BUILTIN, KEYS, LimitsFileError, LimitsPolicy, format_size, parse_size
from sessiond.model import Channel, Registry, Session, SessiondConfig, SessionState, Stream, UserError

ALICE, BOB, GROUP = 12345, 12346, 4242
MiB = 1024 * 1024


def _policy(tmp_path, text: str) -> LimitsPolicy:
    path = tmp_path / "limits.toml"
    path.write_text(text)
    return LimitsPolicy.load(str(path))


def _error(tmp_path, text: str) -> str:
    with pytest.raises(LimitsFileError) as info:
        _policy(tmp_path, text)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "limits.toml") in msg
    return msg


# ------------------------------------------------------------------ sizes
@pytest.mark.parametrize(("text", "n"), [
    (4096, 4096), ("4096", 4096), ("64M", 64 * MiB), ("64m", 64 * MiB), ("64MiB", 64 * MiB),
    ("512K", 512 * 1024), ("2G", 2 * 1024 * MiB), (" 1 T ", 1024**4), ("0", 0), ("unlimited", None),
])
def test_sizes(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1", "64X", "1e6", True, 1.0, [1], "9" * 30, 2**61])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert format_size(64 * MiB) == "64 MiB"
    assert format_size(80 * MiB + 512 * 1024) == "80.5 MiB"
    assert format_size(100) == "100 B"


# ------------------------------------------------------------------ the file
FILE = f"""\
# limits of a shared root sessiond
[default]
sessions = 4
buffers = "256M"

[group.{GROUP}]
buffers = "1G"
channels = 10

[user.{ALICE}]
buffers = "64M"
apps = "unlimited"

[user.root]
sessions = 100
"""


def test_a_user_table_wins_then_groups_then_default_then_builtin(tmp_path):
    p = _policy(tmp_path, FILE)
    alice = p.for_user(ALICE, GROUP)
    assert alice.limits.buffers == 64 * MiB and alice.limits.apps is None  # her table ("unlimited")
    assert alice.limits.channels == 10 and alice.limits.sessions == 4  # her group's, then [default]
    assert alice.source("buffers") == f"[user.{ALICE}] in {tmp_path / 'limits.toml'}"
    assert alice.source("channels").startswith(f"[group.{GROUP}]")
    assert alice.source("sessions").startswith("[default]")
    bob = p.for_user(BOB, GROUP)
    assert bob.limits.buffers == 1024 * MiB  # the group's is larger than [default]'s: a group raises it
    bob_alone = p.for_user(BOB, 999)
    assert bob_alone.limits.buffers == 256 * MiB and bob_alone.limits.apps == BUILTIN.apps
    assert bob_alone.source("apps") == "built-in default"


def test_root_is_unlimited_unless_its_own_table_says(tmp_path):
    root = _policy(tmp_path, FILE).for_user(0, 0)
    assert root.limits.sessions == 100
    assert root.limits.buffers is None and root.limits.channels is None and root.limits.apps is None
    assert LimitsPolicy().for_user(0, 0).limits.buffers is None


def test_no_file_gives_the_builtin_defaults():
    assert LimitsPolicy().for_user(ALICE, GROUP).limits == BUILTIN


def test_the_most_generous_group_wins(tmp_path):
    p = _policy(tmp_path, f'[group.{GROUP}]\nbuffers = "1G"\n[group.{GROUP + 1}]\nbuffers = "unlimited"\n')
    # A user in both groups (no passwd entry: the primary group only, so ask twice).
    assert p.for_user(ALICE, GROUP).limits.buffers == 1024 * MiB
    assert p.for_user(ALICE, GROUP + 1).limits.buffers is None


@pytest.mark.parametrize(("text", "line", "words"), [
    ('[default]\nbuffers = "64Q"\n', 2, "buffers in [default]"),
    ('[default]\nsessions = 2\n\n[user.root]\nsesions = 3\n', 5, "unknown limit 'sesions'"),
    ('[default]\nsessions = -1\n', 2, "not a count"),
    ('[default]\nsessions = "many"\n', 2, "not a count"),
    ('[default]\nsessions = 1.5\n', 2, "not a count"),
    ('[default]\n\n[user.no-such-user-tw]\nsessions = 1\n', 3, "no user named 'no-such-user-tw'"),
    ('[group.no-such-group-tw]\nsessions = 1\n', 1, "no group named"),
    ('[defaults]\nsessions = 1\n', 1, "unknown table [defaults]"),
    ('user = 3\n', 1, "[user] must hold"),
    ('[default]\nsessions = 1\nsessions = 2\n', 3, "line 3"),  # TOML's own error names the line
    ('[default\n', 1, "line 1"),
])
def test_bad_files_name_the_file_and_line(tmp_path, text, line, words):
    msg = _error(tmp_path, text)
    assert words in msg, msg
    assert f"line {line}" in msg, msg


def test_unreadable_binary_and_huge_files(tmp_path):
    with pytest.raises(LimitsFileError, match="cannot read limits file"):
        LimitsPolicy.load(str(tmp_path / "missing.toml"))
    (tmp_path / "limits.toml").write_bytes(b"\xff\xfe[default]")
    with pytest.raises(LimitsFileError, match="not UTF-8"):
        LimitsPolicy.load(str(tmp_path / "limits.toml"))
    (tmp_path / "limits.toml").write_text("#" * (2 * MiB))
    with pytest.raises(LimitsFileError, match="larger than"):
        LimitsPolicy.load(str(tmp_path / "limits.toml"))


# ------------------------------------------------------------------ accounting
def _registry(tmp_path, text: str) -> Registry:
    return Registry(SessiondConfig(rundir=str(tmp_path), limits=_policy(tmp_path, text)))


def _session(reg: Registry, name: str, uid: int, url: str | None = None, spool: int = 2 * MiB,
             snapshot: bool = False) -> Session:
    sess = Session(name, len(reg.sessions) + 1, uid, GROUP, None if url else "/tmp/x", url, "20260101T000000",
                   spool_size=spool, snapshot=snapshot)
    reg.sessions[name] = sess
    return sess


def _ring(sess: Session, channel: str, app_id: int, held: bool = True) -> None:
    key = f"{sess.id}-{channel}-{app_id}"
    sess.streams[key] = Stream(key, sess.name, channel, app_id, 1000 if held else -1, 1001 if held else -1)


def test_buffers_of_a_local_and_a_relay_session(tmp_path):
    reg = _registry(tmp_path, "")
    local = _session(reg, "l", ALICE)
    local.channels["a"] = Channel("a", 0, 256 * 1024, 4)  # 1 MiB rings
    local.channels["b"] = Channel("b", 1, 64 * 1024, 2)  # 128 KiB rings
    assert accounting.session_buffers(local) == accounting.Buffers(0, MiB + 128 * 1024, 0)  # one ring each, reserved
    _ring(local, "a", 1)
    _ring(local, "a", 2)
    _ring(local, "a", 3, held=False)  # freed: a dead app's ring, written out
    assert accounting.session_buffers(local) == accounting.Buffers(2 * MiB, 128 * 1024, 0)
    relay = _session(reg, "r", ALICE, url="tcp://relay:5342")
    relay.channels["a"] = Channel("a", 0, 256 * 1024, 4)
    # The spool: its cap, and per stream what consumerd keeps outside it
    # (the segment being written, two spares, a packet past the cap).
    per_stream = 3 * (MiB + 256 * 1024 + 64 + 16) + 256 * 1024 + 64
    assert accounting.spool_per_stream(relay.channels["a"]) == per_stream
    assert accounting.session_buffers(relay).spool == 2 * MiB + per_stream
    _ring(relay, "a", 1)
    _ring(relay, "a", 2)
    assert accounting.session_buffers(relay) == accounting.Buffers(2 * MiB, 0, 2 * MiB + 2 * per_stream)
    assert accounting.usage_of(reg, ALICE).buffers == (
        accounting.session_buffers(local).total + accounting.session_buffers(relay).total)
    assert accounting.usage_of(reg, BOB).buffers == 0
    snap = _session(reg, "s", BOB, url="tcp://relay:5342", snapshot=True)  # a snapshot session spools nothing
    snap.channels["a"] = Channel("a", 0, 4096, 2)
    assert accounting.session_buffers(snap) == accounting.Buffers(0, 8192, 0)


def test_create_is_refused_over_sessions_or_buffers(tmp_path):
    reg = _registry(tmp_path, f'[user.{ALICE}]\nsessions = 2\nbuffers = "4M"\n')
    accounting.check_create(reg, ALICE, GROUP, 0)
    _session(reg, "one", ALICE)
    with pytest.raises(UserError) as info:
        accounting.check_create(reg, ALICE, GROUP, 8 * MiB)  # a relay session's spool
    assert str(info.value).startswith("create refused: user uid 12345's sessions would hold 8 MiB of buffers, "
                                      "over their limit of 4 MiB ([user.12345] in ")
    _session(reg, "two", ALICE)
    with pytest.raises(UserError, match="would have 3 sessions, over their limit of 2"):
        accounting.check_create(reg, ALICE, GROUP, 0)
    accounting.check_create(reg, BOB, GROUP, 8 * MiB)  # another user's limits are theirs


def test_enable_channel_reserves_one_ring(tmp_path):
    reg = _registry(tmp_path, f'[user.{ALICE}]\nbuffers = "3M"\nchannels = 3\n')
    sess = _session(reg, "one", ALICE)
    sess.channels["a"] = Channel("a", 0, 256 * 1024, 4)
    big = Channel("b", 1, 512 * 1024, 4)  # 2 MiB: 3 MiB in all, at the limit
    assert accounting.channel_refusal(reg, sess, "enable-channel", big, None) is None
    bigger = Channel("b", 1, 1024 * 1024, 4)
    why = accounting.channel_refusal(reg, sess, "enable-channel", bigger, None)
    assert why is not None and why.startswith("enable-channel refused: user uid 12345's sessions would hold "
                                              "5 MiB of buffers, over their limit of 3 MiB")
    # Changing a channel counts the difference.
    sess.channels["b"] = big
    assert accounting.channel_refusal(reg, sess, "enable-channel", Channel("b", 1, 4096, 2), big) is None
    assert accounting.channel_refusal(reg, sess, "enable-channel", bigger, big) is not None
    sess.channels["c"] = Channel("c", 2, 4096, 2)
    with pytest.raises(UserError, match="would have 4 channels, over their limit of 3"):
        accounting.check_channel(reg, sess, "enable-channel", Channel("d", 3, 4096, 2))


def test_an_apps_ring_fits_or_is_refused(tmp_path):
    reg = _registry(tmp_path, f'[user.{ALICE}]\nbuffers = "2M"\n')
    sess = _session(reg, "one", ALICE)
    sess.state = SessionState.STARTED
    ch = sess.channels["a"] = Channel("a", 0, 256 * 1024, 4)  # 1 MiB rings
    assert accounting.ring_refusal(reg, sess, ch) is None  # the first ring takes the reservation's place
    _ring(sess, "a", 1)
    assert accounting.ring_refusal(reg, sess, ch) is None  # 2 MiB: at the limit
    _ring(sess, "a", 2)
    why = accounting.ring_refusal(reg, sess, ch)
    assert why is not None and "would hold 3 MiB of buffers, over their limit of 2 MiB" in why
    sess.streams["1-a-1"].memfd = -1  # an app's ring written out and freed: room again
    assert accounting.ring_refusal(reg, sess, ch) is None
    # Root (no table of its own) is never refused.
    root = _session(reg, "root", 0)
    rch = root.channels["a"] = Channel("a", 0, 1024 * 1024, 1024)
    _ring(root, "a", 1)
    assert accounting.ring_refusal(reg, root, rch) is None


def test_status_describes_usage_against_limits(tmp_path):
    reg = _registry(tmp_path, f'[user.{ALICE}]\nbuffers = "2M"\n')
    sess = _session(reg, "one", ALICE)
    sess.channels["a"] = Channel("a", 0, 256 * 1024, 4)
    reg.apps_of_uid[ALICE] = 3
    d = accounting.describe_limits(reg, ALICE, GROUP)
    assert d["buffers"] == {"used": MiB, "limit": 2 * MiB,
                            "source": f"[user.{ALICE}] in {tmp_path / 'limits.toml'}"}
    assert d["sessions"] == {"used": 1, "limit": BUILTIN.sessions, "source": "built-in default"}
    assert d["apps"]["used"] == 3 and d["channels"]["used"] == 1


def test_sessiond_refuses_a_bad_limits_file_at_start_up_with_one_line(tmp_path):
    """The file is read before anything starts: exit 3 (start-up failure),
    one line naming the file and line, no traceback, nothing left running."""
    bad = tmp_path / "limits.toml"
    bad.write_text('[default]\nsessions = 4\n\n[user.root]\nbuffers = "lots"\n')
    r = subprocess.run([sys.executable, "-m", "sessiond", "--rundir", str(tmp_path / "run"), "--limits", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert r.stderr.strip().splitlines() == [
        f"tracewire-sessiond: {bad}, line 5: buffers in [user.root]: 'lots' is not a size "
        "(examples: 1048576, \"512K\", \"64M\", \"unlimited\")"], r.stderr
    assert not (tmp_path / "run" / "control.sock").exists()


def test_the_spool_constants_are_consumerds():
    import inspect

    from consumerd.spool import _REC, _SEG, Spool

    params = inspect.signature(Spool).parameters
    assert params["segment_size"].default == accounting.SPOOL_SEGMENT
    assert params["keep_free"].default == accounting.SPOOL_KEEP_FREE
    assert _REC.size == accounting.SPOOL_RECORD and _SEG.size == accounting.SPOOL_FILE_HEADER


@pytest.mark.skipif(os.geteuid() != 0, reason="a root sessiond's check (run as root)")
def test_root_refuses_a_limits_file_others_may_write(tmp_path):
    path = tmp_path / "limits.toml"
    path.write_text("[default]\nsessions = 4\n")
    path.chmod(0o666)
    with pytest.raises(LimitsFileError, match=r"writable by root only .*mode 0666"):
        LimitsPolicy.load(str(path))
    path.chmod(0o644)
    os.chown(path, 1, -1)
    with pytest.raises(LimitsFileError, match=r"must belong to root .*uid 1's"):
        LimitsPolicy.load(str(path))
    os.chown(path, 0, -1)
    assert LimitsPolicy.load(str(path)).for_user(ALICE, GROUP).limits.sessions == 4


_values = st.one_of(st.integers(-5, 2**62), st.text(max_size=12), st.booleans(), st.floats(allow_nan=False),
                    st.lists(st.integers(), max_size=2), st.just("64M"), st.just("unlimited"))
_tables = st.dictionaries(st.sampled_from([*KEYS, "other", ""]), _values, max_size=5)
_docs = st.dictionaries(
    st.sampled_from(["default", "user", "group", "x"]),
    st.one_of(_tables, st.dictionaries(st.sampled_from(["root", "0", "12345", "nobody-tw", "4242"]),
                                       st.one_of(_tables, _values), max_size=3), _values),
    max_size=4)


@settings(max_examples=100, deadline=None)
@given(doc=_docs)
def test_any_document_is_a_policy_or_one_line(doc):
    """Whatever the (parsed) file holds: a policy whose limits are counts or
    None, or one LimitsFileError line; nothing else is raised."""
    try:
        policy = LimitsPolicy.from_document("/etc/tw.toml", "", doc)
    except LimitsFileError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("/etc/tw.toml, line ")
        return
    for uid in (0, ALICE):
        lim = policy.for_user(uid, GROUP).limits
        assert all(lim.get(k) is None or (isinstance(lim.get(k), int) and lim.get(k) >= 0) for k in KEYS)


@settings(max_examples=100, deadline=None)
@given(text=st.one_of(st.text(max_size=200), st.just('["a\\nb"]\nx = 1\n'), st.just('[user]\n"a\\nb" = {}\n')))
def test_any_text_is_a_policy_or_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("lim") / "limits.toml"
    path.write_text(text)
    try:
        LimitsPolicy.load(str(path))
    except LimitsFileError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)
