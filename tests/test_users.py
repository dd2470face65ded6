"""Per-user sessions on a root sessiond, checked with real users.

A root sessiond serves the ``tracing`` group on its control socket; every
request is attributed by SO_PEERCRED.  A user sees and controls only their own
sessions, their consumerd runs with their uid/gid, and the trace files are
theirs.  Needs root (to create users and run commands as them); skipped
elsewhere.

The test Python and packages live in a world-readable copy: the project's
interpreter may sit in root's home, which other users cannot enter.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time

import pytest

from conftest import _alive, _children, _comm, _kill_wait

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and switch to them")

USER_IN_GROUP = "twtest1"
USER_OUTSIDE = "twtest2"
RUNTIME = ("trio", "attr", "attrs", "outcome", "sniffio", "sortedcontainers", "idna", "cbor2",
           "zstandard", "click")
PROJECT = ("tracewire", "sessiond", "consumerd", "relayd")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ensure_user(name: str, groups: str | None) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        pass
    argv = ["useradd", "--no-create-home", "--shell", "/bin/sh"]
    if groups:
        argv += ["-G", groups]
    subprocess.run(argv + [name], check=True, timeout=30)
    return pwd.getpwnam(name).pw_uid


@pytest.fixture(scope="module")
def world():
    """A world-readable Python tree, the two users, and a root sessiond."""
    python = shutil.which("python3.11", path="/usr/bin") or "/usr/bin/python3"
    if not os.path.exists(python) or shutil.which("useradd") is None:
        pytest.skip("needs /usr/bin/python3 (3.11) and useradd")
    if subprocess.run(["getent", "group", "tracing"], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "tracing"], check=True, timeout=30)
    uid1 = _ensure_user(USER_IN_GROUP, "tracing")
    uid2 = _ensure_user(USER_OUTSIDE, None)
    top = tempfile.mkdtemp(prefix="twu-", dir="/tmp")
    os.chmod(top, 0o755)
    lib = os.path.join(top, "lib")
    site = sysconfig.get_paths()["purelib"]
    for name in RUNTIME:
        src = os.path.join(site, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(lib, name))
    for name in PROJECT:
        shutil.copytree(os.path.join(REPO, name), os.path.join(lib, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", top], check=True)
    rundir = os.path.join(top, "run")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": lib, "TRACEWIRE_RUNDIR": rundir,
           "HOME": "/", "LANG": "C.UTF-8"}
    # root's sessiond, started the way the CLI starts it
    r = subprocess.run([python, "-m", "tracewire", "list"], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0  # no daemon yet: `list` must not start one
    root_out = os.path.join(top, "root-traces")
    _run(python, env, None, "create", "rootsess", "--output", root_out)
    yield {"python": python, "env": env, "top": top, "uid1": uid1, "uid2": uid2,
           "root_out": root_out}
    _stop_sessiond(rundir)
    shutil.rmtree(top, ignore_errors=True)


def _stop_sessiond(rundir: str) -> None:
    """End the sessiond this module started and its consumerds (by pid, no
    pattern matching): SIGTERM, wait for them to go, SIGKILL what is left."""
    try:
        with open(os.path.join(rundir, "sessiond.pid")) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return
    pids = [pid, *_children(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _kill_wait([p for p in pids if _alive(p)], sig, time.monotonic() + 10)



def _status(pid: int) -> dict[str, list[str]]:
    """/proc/PID/status's Uid, Gid and Groups lines, split."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("Uid", "Gid", "Groups"):
                    out[key] = value.split()
    except OSError:
        pass
    return out


def _run(python: str, env: dict, user: str | None, *args: str, check: bool = True):
    argv = [python, "-m", "tracewire", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
                "--init-groups", "--"] + argv
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _demo(world, user: str, events: int) -> None:
    argv = ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups",
            "--", world["python"], "-m", "tracewire.demo", "--events", str(events)]
    subprocess.run(argv, env=world["env"], check=True, capture_output=True, timeout=120)


def test_user_session_is_private_and_files_belong_to_the_user(world):
    py, env = world["python"], world["env"]
    out = os.path.join(world["top"], "u1-traces")
    os.makedirs(out)
    os.chown(out, world["uid1"], -1)
    _run(py, env, USER_IN_GROUP, "create", "usess", "--output", out)
    _run(py, env, USER_IN_GROUP, "enable-event", "demo:*")
    _run(py, env, USER_IN_GROUP, "start")
    _demo(world, USER_IN_GROUP, 2000)
    _run(py, env, USER_IN_GROUP, "stop")

    # The user sees only their session; root sees both.
    mine = _run(py, env, USER_IN_GROUP, "list").stdout
    assert "usess" in mine and "rootsess" not in mine
    every = _run(py, env, None, "list").stdout
    assert "usess" in every and "rootsess" in every

    # Files are the user's, written by a consumerd running as the user.
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert any(f.endswith("channel0_0") for f in files), files
    for f in files:
        assert os.stat(f).st_uid == world["uid1"], f
    # That consumerd is sessiond's child (forked by its zygote) with the user's
    # real, effective, saved and file-system uid and gid, and the user's groups.
    with open(os.path.join(env["TRACEWIRE_RUNDIR"], "sessiond.pid")) as f:
        sessiond = int(f.read())
    pw = pwd.getpwuid(world["uid1"])
    want = {"Uid": [str(pw.pw_uid)] * 4, "Gid": [str(pw.pw_gid)] * 4,
            "Groups": sorted(str(g) for g in os.getgrouplist(pw.pw_name, pw.pw_gid))}
    kids = {c: _status(c) for c in _children(sessiond) if _comm(c) == "tw-consumerd"}
    assert any(st.get("Uid") == want["Uid"] for st in kids.values()), kids
    for st in kids.values():
        if st.get("Uid") == want["Uid"]:
            assert st["Gid"] == want["Gid"] and sorted(st["Groups"]) == want["Groups"], (st, want)
    # Only root's consumerd drains at real-time priority (--consumer-rt-priority,
    # default 1): a user's runs at normal priority.
    policies = {st.get("Uid", ["?"])[0]: os.sched_getscheduler(c) for c, st in kids.items()}
    assert policies.get(str(pw.pw_uid)) == os.SCHED_OTHER, policies


def test_cross_user_control_is_denied_and_changes_nothing(world):
    py, env = world["python"], world["env"]
    for verb in (["stop", "rootsess"], ["destroy", "rootsess"], ["start", "rootsess"],
                 ["list", "rootsess"], ["status", "rootsess"], ["snapshot", "record", "-s", "rootsess"]):
        r = _run(py, env, USER_IN_GROUP, *verb, check=False)
        assert r.returncode != 0
        assert "permission denied" in r.stderr, (verb, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    assert "rootsess (current) [created]" in _run(py, env, None, "list").stdout


def test_user_outside_the_tracing_group_cannot_reach_root_sessiond(world):
    r = _run(world["python"], world["env"], USER_OUTSIDE, "list", check=False)
    assert r.returncode != 0
    assert "permission denied" in r.stderr


def test_root_session_does_not_trace_into_user_files_and_user_session_ignores_others_apps(world):
    """A user's session records only that user's apps."""
    py, env = world["python"], world["env"]
    out = os.path.join(world["top"], "u1-only")
    os.makedirs(out)
    os.chown(out, world["uid1"], -1)
    _run(py, env, USER_IN_GROUP, "create", "usess2", "--output", out)
    _run(py, env, USER_IN_GROUP, "enable-event", "demo:*")
    _run(py, env, USER_IN_GROUP, "start")
    # an app of another user (root here) emits: not recorded in usess2
    subprocess.run([py, "-m", "tracewire.demo", "--events", "500"], env=env, check=True,
                   capture_output=True, timeout=120)
    _run(py, env, USER_IN_GROUP, "stop")
    files = [f for d, _, fs in os.walk(out) for f in fs if f.startswith("channel0")]
    assert files == []
    _run(py, env, USER_IN_GROUP, "destroy", "usess2")


def test_another_users_rotate_is_refused_and_changes_nothing(world):
    """rotate, enable-rotation and disable-rotation go through sessiond's
    ownership check: user 1 cannot rotate root's started session."""
    py, env = world["python"], world["env"]
    out = os.path.join(world["top"], "root-rot")
    _run(py, env, None, "create", "rootrot", "--output", out)
    _run(py, env, None, "enable-event", "demo:*", "-s", "rootrot")
    _run(py, env, None, "start", "rootrot")
    subprocess.run([py, "-m", "tracewire.demo", "--events", "1000"], env=env, check=True,
                   capture_output=True, timeout=120)
    for verb in (["rotate", "rootrot"], ["rotate", "-s", "rootrot"],
                 ["enable-rotation", "-s", "rootrot", "--timer", "1s"], ["disable-rotation", "-s", "rootrot"]):
        r = _run(py, env, USER_IN_GROUP, *verb, check=False)
        assert r.returncode == 1, (verb, r.stderr)
        assert "permission denied: session 'rootrot' belongs to another user" in r.stderr, (verb, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    (sdir,) = os.listdir(out)
    assert os.listdir(os.path.join(out, sdir)) == ["ust"]  # no chunk archived, none begun
    assert "rotation:" not in _run(py, env, None, "list", "rootrot").stdout
    # The owner can.
    done = _run(py, env, None, "rotate", "rootrot").stdout
    assert "trace chunk 0 archived at" in done, done
    _run(py, env, None, "destroy", "rootrot")


def test_a_members_snapshot_session_at_roots_sessiond(world):
    """A tracing member's flight recorder at root's sessiond: the rings hold
    only the member's apps, the snapshot's files are the member's, another
    user's snapshot record of it is refused and changes nothing."""
    py, env = world["python"], world["env"]
    out = os.path.join(world["top"], "u1-snap")
    os.makedirs(out)
    os.chown(out, world["uid1"], -1)
    _run(py, env, USER_IN_GROUP, "create", "usnap", "--snapshot", "--output", out)
    _run(py, env, USER_IN_GROUP, "enable-event", "demo:*")
    _run(py, env, USER_IN_GROUP, "start")
    _demo(world, USER_IN_GROUP, 3000)
    subprocess.run([py, "-m", "tracewire.demo", "--events", "500"], env=env, check=True,  # root's app: not in it
                   capture_output=True, timeout=120)
    r = _run(py, env, USER_OUTSIDE, "snapshot", "record", "-s", "usnap", check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(out) == []  # nothing written for them (a snapshot session writes only snapshots)
    text = _run(py, env, USER_IN_GROUP, "snapshot", "record").stdout
    assert "1 streams" in text, text
    (sdir,) = os.listdir(out)
    (snap,) = os.listdir(os.path.join(out, sdir))
    assert snap.endswith("-0")  # the refused record did not count
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(out, sdir, snap)) for f in fs]
    assert any(f.endswith("channel0_0") for f in files), files
    for f in files:
        assert os.stat(f).st_uid == world["uid1"], f
    _run(py, env, USER_IN_GROUP, "destroy", "usnap")


def test_list_apps_shows_a_user_their_own_apps_and_root_all(world):
    """``list --apps`` at root's sessiond: a tracing member sees their app and
    its declaration, not root's app; root sees both."""
    import json

    py, env = world["python"], world["env"]
    user = USER_IN_GROUP
    argv = [py, "-m", "tracewire.demo", "--events", "6000", "--rate", "100"]  # about a minute, killed below
    theirs = subprocess.Popen(["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
                               "--init-groups", "--", *argv], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    roots = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            doc = json.loads(_run(py, env, None, "list", "--apps", "--json").stdout)
            declared = {a["pid"] for a in doc["apps"] if a["tracepoints"]}
            if {theirs.pid, roots.pid} <= declared:
                break
            assert time.monotonic() < deadline, doc
            time.sleep(0.05)
        mine = json.loads(_run(py, env, user, "list", "--apps", "--json").stdout)["apps"]
        assert [a["pid"] for a in mine] == [theirs.pid]
        assert mine[0]["user"] == user and mine[0]["uid"] == world["uid1"]
        text = _run(py, env, user, "list", "--apps").stdout
        assert f"(pid {theirs.pid}, user {user}," in text and "demo:tick (seq: int64, msg: string)" in text
        assert f"pid {roots.pid}," not in text
    finally:
        for p in (theirs, roots):
            p.kill()
            p.wait(timeout=30)
