"""The tracer trusts only its own sessiond (or root's).

A traced app hands its event buffers, tracepoint names, procname and pid to
whatever listens on ``RUNDIR/apps.sock``.  With neither ``XDG_RUNTIME_DIR``
nor ``TRACEWIRE_RUNDIR`` set, a user's last-resort run directory is
``/tmp/tracewire-UID/tracewire``, which another user can create first.  These
tests plant listeners where a victim's app looks and check that it sends them
nothing, says why in one line, and still registers with a trusted listener.

"Nothing" is proved without sleeping: the app waits until its listener has
tried (and been refused) several times, exits, and only then is the listener
told to report what reached it; a connection queued before the app exited is
in its backlog by then, a message in its socket buffer.

Tests that need other users create throwaway ones (root only; skipped
elsewhere) and run commands as them with setpriv, with a world-readable copy
of the (stdlib-only) tracer package and the system Python.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from sessiond import SessiondConfig, UserError, serve_sessiond
from tracewire.cli import Client, CliError
from tracewire.rundir import UnsafeRundirError, default_rundir, ensure_rundir, rundir_problem

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and switch to them")

# A passive apps.sock listener: binds PATH, optionally drops to UID:GID
# before listen() (SO_PEERCRED then names that uid), says "ready", and once
# its stdin closes reports the connections queued and the ops they sent.
LISTENER = r"""
import json, os, socket, sys
path, drop = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    os.chmod(os.path.dirname(os.path.dirname(path)), 0o755)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
srv.bind(path)
os.chmod(path, 0o777)
if drop != "-":
    uid, gid = map(int, drop.split(":"))
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
srv.listen(64)
print("ready", flush=True)
sys.stdin.read()
srv.setblocking(False)
conns, ops = 0, []
while True:
    try:
        conn, _ = srv.accept()
    except BlockingIOError:
        break
    conns += 1
    conn.setblocking(False)
    while True:
        try:
            data = conn.recv(1 << 20)
        except BlockingIOError:
            break
        if not data:
            break
        ops.append(json.loads(data).get("op"))
print(json.dumps({"connections": conns, "ops": ops}), flush=True)
"""

# A traced app: declares a tracepoint, then waits until its listener thread
# has registered, or (when the test expects a refusal) has tried five times,
# emits, and prints the apps.sock path it used.
APP = r"""
import sys, time
from tracewire import _tracer, tracepoint
attempts = [0]
session = _tracer._Registry._session
def counted(self):
    attempts[0] += 1
    session(self)
_tracer._Registry._session = counted
tick = tracepoint("trust:tick", n=int)
reg = _tracer._get_registry()
def done():
    if sys.argv[1] == "refused" and attempts[0] >= 5:
        return True
    with reg.lock:
        return reg.sock is not None
deadline = time.monotonic() + 60
while not done():
    if time.monotonic() > deadline:
        sys.exit("timed out waiting for the listener thread")
    time.sleep(0.01)
tick(n=1)
print(reg.path)
"""


@dataclass(frozen=True)
class User:
    """A throwaway user."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class World:
    """Two throwaway users and a tracer package they can import."""

    lib: str
    victim: User
    attacker: User


@dataclass(frozen=True)
class Heard:
    """What a listener received."""

    connections: int
    ops: list[str]


def _free_uid(taken: set[int]) -> int:
    """A uid (and gid) nobody uses, with no tracewire directories of its own."""
    for uid in range(61000, 62000):
        if uid in taken or os.path.lexists(f"/tmp/tracewire-{uid}") or os.path.lexists(f"/run/user/{uid}"):
            continue
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
            continue
        except KeyError:
            return uid
    raise RuntimeError("no free uid in 61000-61999")


def _make_user(taken: set[int]) -> User:
    uid = _free_uid(taken)
    name = f"twtrust{uid}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", "-u", str(uid), "-U", name],
                   check=True, capture_output=True, timeout=30)
    taken.add(uid)
    return User(name, uid, pwd.getpwnam(name).pw_gid)


def _drop_user(user: User) -> str:
    """Remove a throwaway user and its directories; what went wrong, if anything."""
    for d in (f"/tmp/tracewire-{user.uid}", f"/run/user/{user.uid}"):
        shutil.rmtree(d, ignore_errors=True)
    r = subprocess.run(["userdel", user.name], capture_output=True, text=True, timeout=30)
    return "" if r.returncode == 0 else f"userdel {user.name}: {r.stderr.strip()}"


@pytest.fixture(scope="module")
def module_world() -> Iterator[World]:
    """A victim and an attacker, created for this module and removed after."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create users and switch to them")
    if not os.path.exists(SYSTEM_PYTHON) or shutil.which("useradd") is None or shutil.which("setpriv") is None:
        pytest.skip("needs /usr/bin/python3, useradd and setpriv")
    top = tempfile.mkdtemp(prefix="twtrust-", dir="/tmp")
    os.chmod(top, 0o755)
    lib = os.path.join(top, "lib")
    shutil.copytree(REPO / "tracewire", os.path.join(lib, "tracewire"), ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", top], check=True)
    taken: set[int] = set()
    users: list[User] = []
    try:
        users.append(_make_user(taken))
        users.append(_make_user(taken))
        yield World(lib, users[0], users[1])
    finally:
        shutil.rmtree(top, ignore_errors=True)
        errors = [e for e in map(_drop_user, users) if e]
    assert not errors, errors


@pytest.fixture
def world(module_world: World) -> Iterator[World]:
    """The module's users; the victim's default directories are removed
    after each test, whoever created them."""
    yield module_world
    for d in (f"/tmp/tracewire-{module_world.victim.uid}", f"/run/user/{module_world.victim.uid}"):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A fresh directory every user can traverse (pytest's tmp_path is 0700)."""
    top = tempfile.mkdtemp(prefix="twtrust-", dir="/tmp")
    os.chmod(top, 0o755)
    yield Path(top)
    shutil.rmtree(top, ignore_errors=True)


def _as(user: User | None, argv: list[str]) -> list[str]:
    if user is None:
        return argv
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--", *argv]


def _user_env(world: World, **extra: str) -> dict[str, str]:
    """A login-less user's environment: no XDG_RUNTIME_DIR, no TRACEWIRE_RUNDIR."""
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": world.lib, "HOME": "/", "LANG": "C.UTF-8",
            "TRACEWIRE_RETRY_S": "0.01", "TRACEWIRE_REGISTER_TIMEOUT": "0", **extra}


class Listener:
    """A passive apps.sock listener in a subprocess."""

    def __init__(self, path: str, *, user: User | None = None, drop_to: User | None = None,
                 make_dirs: bool = False, python: str = SYSTEM_PYTHON) -> None:
        drop = f"{drop_to.uid}:{drop_to.gid}" if drop_to else "-"
        argv = [python, "-c", LISTENER, path, drop, *(["mkdirs"] if make_dirs else [])]
        self.proc = subprocess.Popen(_as(user, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line != "ready\n":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"listener did not start: {line!r} {err}")

    def close(self) -> None:
        """Kill the listener if it still runs (a test failed before asking)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)

    def heard(self) -> Heard:
        """Stop listening; what reached the socket until now."""
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        got = json.loads(out)
        return Heard(got["connections"], got["ops"])


Listen = Callable[..., Listener]  # the ``listen`` fixture


@pytest.fixture
def listen() -> Iterator[Listen]:
    """``listen(path, **options)`` starts a Listener; any still running when
    the test ends is killed (a leftover process would keep its user alive)."""
    made: list[Listener] = []

    def factory(path: str, **options: Any) -> Listener:
        made.append(Listener(path, **options))
        return made[-1]

    yield factory
    for listener in made:
        listener.close()


def _run_app(argv_prefix: list[str], env: dict[str, str], want: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*argv_prefix, "-c", APP, want], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def _run_victim_app(world: World, want: str, **env: str) -> subprocess.CompletedProcess[str]:
    return _run_app(_as(world.victim, [SYSTEM_PYTHON]), _user_env(world, **env), want)


def _one_refusal(stderr: str) -> str:
    """The app's one line saying why it did not register."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tracewire: not registering with sessiond: "), stderr
    return lines[0]


# ------------------------------------------------------------ a planted default


@needs_root
def test_socket_planted_at_the_default_path_gets_nothing(world: World, listen: Listen) -> None:
    victim, attacker = world.victim, world.attacker
    path = f"/tmp/tracewire-{victim.uid}/tracewire/apps.sock"
    planted = listen(path, user=attacker, make_dirs=True)
    r = _run_victim_app(world, "refused")
    heard = planted.heard()
    assert heard == Heard(0, [])  # refused before connecting: the planter learns nothing
    assert r.stdout.strip() == path  # the app did look there
    line = _one_refusal(r.stderr)  # once, over five attempts
    assert f"/tmp/tracewire-{victim.uid} belongs to uid {attacker.uid}" in line


@needs_root
def test_victims_cli_refuses_a_planted_tmp_parent(world: World) -> None:
    os.mkdir(f"/tmp/tracewire-{world.victim.uid}", 0o755)
    os.chown(f"/tmp/tracewire-{world.victim.uid}", world.attacker.uid, world.attacker.gid)
    try:
        r = subprocess.run(_as(world.victim, [SYSTEM_PYTHON, "-c",
                                              "from tracewire.rundir import default_rundir, ensure_rundir\n"
                                              "ensure_rundir(default_rundir())"]),
                           env=_user_env(world), capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert f"UnsafeRundirError: refusing run directory /tmp/tracewire-{world.victim.uid}/tracewire:" in r.stderr
        assert os.listdir(f"/tmp/tracewire-{world.victim.uid}") == []  # nothing created inside
    finally:
        shutil.rmtree(f"/tmp/tracewire-{world.victim.uid}")


@needs_root
def test_default_tmp_rundir_is_created_private(world: World) -> None:
    victim = world.victim
    # umask 0: os.makedirs would leave /tmp/tracewire-UID world-writable
    code = "import os\nos.umask(0)\nfrom tracewire.rundir import default_rundir, ensure_rundir\n" \
           "ensure_rundir(default_rundir())"
    try:
        r = subprocess.run(_as(victim, [SYSTEM_PYTHON, "-c", code]), env=_user_env(world),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for d in (f"/tmp/tracewire-{victim.uid}", f"/tmp/tracewire-{victim.uid}/tracewire"):
            st = os.lstat(d)
            assert (st.st_uid, st.st_mode & 0o7777) == (victim.uid, 0o700), d
    finally:
        shutil.rmtree(f"/tmp/tracewire-{victim.uid}", ignore_errors=True)


@needs_root
@pytest.mark.skipif(not os.path.isdir("/run/user"), reason="no /run/user on this machine")
@pytest.mark.parametrize("owned_by_victim", [True, False])
def test_default_prefers_the_users_own_run_user_dir(world: World, owned_by_victim: bool) -> None:
    victim = world.victim
    runtime = f"/run/user/{victim.uid}"
    os.mkdir(runtime, 0o700)
    try:
        if owned_by_victim:
            os.chown(runtime, victim.uid, victim.gid)
        r = subprocess.run(_as(victim, [SYSTEM_PYTHON, "-c",
                                        "from tracewire.rundir import default_rundir; print(default_rundir())"]),
                           env=_user_env(world), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        base = runtime if owned_by_victim else f"/tmp/tracewire-{victim.uid}"
        assert r.stdout.strip() == f"{base}/tracewire"
    finally:
        os.rmdir(runtime)


# ------------------------------------------------------------ unsafe run directories


@needs_root
def test_group_or_other_writable_tmp_parent_is_refused(world: World, listen: Listen) -> None:
    victim = world.victim
    parent = f"/tmp/tracewire-{victim.uid}"
    os.mkdir(parent)
    os.chmod(parent, 0o777)
    os.chown(parent, victim.uid, victim.gid)
    os.mkdir(f"{parent}/tracewire", 0o700)
    os.chown(f"{parent}/tracewire", victim.uid, victim.gid)
    try:
        own = listen(f"{parent}/tracewire/apps.sock", user=victim)  # the victim's own, but plantable
        r = _run_victim_app(world, "refused")
        assert own.heard() == Heard(0, [])
        assert f"{parent} is writable by group or others (mode 0777)" in _one_refusal(r.stderr)
    finally:
        shutil.rmtree(parent)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777], ids=lambda m: f"{m:04o}")
def test_group_or_other_writable_rundir_is_refused(tmp_path: Path, listen: Listen, mode: int) -> None:
    rundir = tmp_path / "run"
    rundir.mkdir()
    listener = listen(str(rundir / "apps.sock"), python=sys.executable)
    rundir.chmod(mode)
    r = _run_app([sys.executable], dict(os.environ, TRACEWIRE_RUNDIR=str(rundir), TRACEWIRE_RETRY_S="0.01",
                                       TRACEWIRE_REGISTER_TIMEOUT="0"), "refused")
    assert listener.heard() == Heard(0, [])
    assert f"{rundir} is writable by group or others (mode {mode:04o})" in _one_refusal(r.stderr)


def test_symlinked_rundir_is_refused(tmp_path: Path, listen: Listen) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    listener = listen(str(real / "apps.sock"), python=sys.executable)
    env = dict(os.environ, TRACEWIRE_RUNDIR=str(tmp_path / "link"), TRACEWIRE_RETRY_S="0.01",
               TRACEWIRE_REGISTER_TIMEOUT="0")
    r = _run_app([sys.executable], env, "refused")
    assert listener.heard() == Heard(0, [])
    assert f"{tmp_path / 'link'} is a symbolic link" in _one_refusal(r.stderr)


def test_own_private_rundir_registers(tmp_path: Path, listen: Listen) -> None:
    """The harness sees a registration when there is one."""
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    listener = listen(str(rundir / "apps.sock"), python=sys.executable)
    env = dict(os.environ, TRACEWIRE_RUNDIR=str(rundir), TRACEWIRE_REGISTER_TIMEOUT="0")
    r = _run_app([sys.executable], env, "registered")
    assert listener.heard() == Heard(1, ["register"])
    assert r.stderr == ""


# ------------------------------------------------------------ the peer's credentials


@needs_root
@pytest.mark.parametrize("served_by", ["attacker", "victim", "root"])
def test_only_the_apps_own_uid_or_root_may_serve_apps_sock(
    world: World, listen: Listen, shared_tmp: Path, served_by: str,
) -> None:
    victim = world.victim
    rundir = shared_tmp / "run"
    rundir.mkdir(mode=0o700)
    os.chown(rundir, victim.uid, victim.gid)  # a directory the victim owns: it passes the directory checks
    # Bound by root, served (listen() and after) by the chosen user: SO_PEERCRED names who listens.
    drop = {"attacker": world.attacker, "victim": victim, "root": None}[served_by]
    listener = listen(str(rundir / "apps.sock"), drop_to=drop)
    want = "refused" if served_by == "attacker" else "registered"
    r = _run_victim_app(world, want, TRACEWIRE_RUNDIR=str(rundir))
    heard = listener.heard()
    if served_by == "attacker":
        assert heard.connections >= 1 and heard.ops == []  # it connected, checked, hung up without a word
        line = _one_refusal(r.stderr)
        assert f"is served by uid {world.attacker.uid}, not by uid {victim.uid} or root" in line
    else:
        assert heard == Heard(1, ["register"])
        assert r.stderr == ""


# ------------------------------------------------------------ ensure_rundir, the CLI, sessiond


def test_ensure_rundir_creates_a_private_directory(tmp_path: Path) -> None:
    rundir = tmp_path / "a" / "run"
    ensure_rundir(str(rundir))
    assert rundir.stat().st_mode & 0o7777 == 0o700
    ensure_rundir(str(rundir))  # an existing safe one is fine
    assert rundir_problem(str(rundir)) is None


def test_ensure_rundir_refuses_an_unsafe_one(tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    rundir.mkdir()
    rundir.chmod(0o775)
    with pytest.raises(UnsafeRundirError, match=r"^refusing run directory .*run: .* writable by group or others"):
        ensure_rundir(str(rundir))


@needs_root
def test_ensure_rundir_refuses_another_users_directory(tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    os.chown(rundir, 65534, 65534)
    assert rundir_problem(str(rundir)) == f"{rundir} belongs to uid 65534, not to uid 0 or root"


def test_absent_rundir_is_no_problem(tmp_path: Path) -> None:
    assert rundir_problem(str(tmp_path / "nothing" / "here")) is None


def test_cli_refuses_an_unsafe_rundir_in_one_line(tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    rundir.mkdir()
    rundir.chmod(0o777)
    with pytest.raises(CliError) as info:
        Client(str(rundir)).ensure_daemon()
    assert info.value.format_message() == (
        f"refusing run directory {rundir}: {rundir} is writable by group or others (mode 0777)")
    assert os.listdir(rundir) == []  # no log, no sessiond


def test_sessiond_refuses_an_unsafe_rundir_in_one_line(tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    rundir.mkdir()
    rundir.chmod(0o757)
    with pytest.raises(UserError) as info:
        trio.run(partial(serve_sessiond, SessiondConfig(rundir=str(rundir))))
    assert str(info.value) == f"refusing run directory {rundir}: {rundir} is writable by group or others (mode 0757)"
    assert os.listdir(rundir) == []  # no lock, no socket


def test_default_rundir_keeps_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACEWIRE_RUNDIR", "/somewhere/else")
    assert default_rundir() == "/somewhere/else"
    monkeypatch.delenv("TRACEWIRE_RUNDIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/xdg")
    expected = "/run/tracewire" if os.geteuid() == 0 else "/xdg/tracewire"
    assert default_rundir() == expected
