"""Per-user limits at a root sessiond, checked with real users.

The module restarts test_users' root sessiond (its ``world``: users, the
``tracing`` group, a world-readable Python tree) with ``--limits FILE``
(through TRACEWIRE_SESSIOND_LIMITS, as the CLI starts sessiond with its own
environment).  One ``tracing`` member is held to a small buffers limit;
another member's session must not notice.  Needs root; skipped elsewhere.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import time

import pytest
from test_users import USER_IN_GROUP, _demo, _ensure_user, _run, _stop_sessiond, world  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and switch to them")

OTHER_MEMBER = "twtest3"


@pytest.fixture(scope="module")
def limited(world):  # noqa: F811 (the imported fixture)
    """world's root sessiond, restarted with a limits file."""
    _ensure_user(OTHER_MEMBER, "tracing")
    rundir = world["env"]["TRACEWIRE_RUNDIR"]
    _stop_sessiond(rundir)
    path = os.path.join(world["top"], "limits.toml")
    with open(path, "w") as f:
        f.write(f'[default]\nbuffers = "64M"\n\n[user.{USER_IN_GROUP}]\nbuffers = "2560K"\nsessions = 2\n'
                f'apps = 1\n')
    env = dict(world["env"], TRACEWIRE_SESSIOND_LIMITS=path)
    world = dict(world, env=env, limits=path)
    _run(world["python"], env, None, "create", "rootsess", "--output", world["root_out"])  # starts sessiond
    yield world
    _stop_sessiond(rundir)


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _wait_for(cond, what: str, deadline: float = 60.0) -> None:
    """Wait on a condition (no fixed sleeps), generously."""
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _user_dir(env_world: dict, name: str, user: str) -> str:
    out = os.path.join(env_world["top"], name)
    os.makedirs(out)
    subprocess.run(["chown", user, out], check=True)
    return out


def test_a_member_over_their_buffers_limit_gets_one_line_and_others_are_untouched(limited):
    py, env, path = limited["python"], limited["env"], limited["limits"]
    # Another member's session, started before and traced after the refusals.
    other_out = _user_dir(limited, "other", OTHER_MEMBER)
    _run(py, env, OTHER_MEMBER, "create", "other", "--output", other_out)
    _run(py, env, OTHER_MEMBER, "enable-event", "demo:*")
    _run(py, env, OTHER_MEMBER, "start")

    # enable-channel over the limit: one line, nothing changes.
    out = _user_dir(limited, "u1-snap", USER_IN_GROUP)
    _run(py, env, USER_IN_GROUP, "create", "snap", "--snapshot", "--output", out)
    r = _run(py, env, USER_IN_GROUP, "enable-channel", "big", "--subbuf-size", "1M", "--num-subbuf", "4",
             check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"Error: enable-channel refused: user {USER_IN_GROUP}'s sessions would hold 4 MiB of buffers, "
        f"over their limit of 2.5 MiB ([user.{USER_IN_GROUP}] in {path})"], r.stderr
    assert "big" not in _run(py, env, USER_IN_GROUP, "list", "snap").stdout

    # A flight recorder keeps the rings of dead apps: 1 MiB each, so the
    # first two apps fit in 2.5 MiB and the third app's ring is not created.
    _run(py, env, USER_IN_GROUP, "enable-event", "demo:*")
    _run(py, env, USER_IN_GROUP, "start")
    for _ in range(3):
        _demo(limited, USER_IN_GROUP, 200)
    status = _run(py, env, USER_IN_GROUP, "status").stdout
    assert "buffers: 2.0 MiB (rings 2.0 MiB" in status, status
    assert f"user {USER_IN_GROUP}: buffers 2.0 MiB of 2.5 MiB ([user.{USER_IN_GROUP}] in {path})" in status, status
    assert "NOT TRACED: 1 ring buffers were not created" in status, status
    assert re.search(rf"channel channel0 of demo[.]py-\d+: user {USER_IN_GROUP}'s sessions would hold 3 MiB of "
                     r"buffers, over their limit of 2.5 MiB", status), status
    record = _run(py, env, USER_IN_GROUP, "snapshot", "record").stdout
    assert "2 streams" in record, record  # the third app's events were not traced

    # The sessions limit (2): a third session is refused, the first stays.
    _run(py, env, USER_IN_GROUP, "create", "second", "--output", out)
    r = _run(py, env, USER_IN_GROUP, "create", "third", "--output", out, check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert f"user {USER_IN_GROUP} would have 3 sessions, over their limit of 2" in r.stderr, r.stderr

    # The apps limit (1): while one app of the member is connected, a
    # second one is refused at connection time (logged once, with the limit).
    pw = pwd.getpwnam(USER_IN_GROUP)
    first = subprocess.Popen(["setpriv", f"--reuid={USER_IN_GROUP}", f"--regid={pw.pw_gid}", "--init-groups",
                              "--", py, "-m", "tracewire.demo", "--events", "1000000", "--rate", "10"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: "apps 1 of 1" in _run(py, env, USER_IN_GROUP, "status").stdout,
                  "the member's first app to register")
        _demo(limited, USER_IN_GROUP, 10)
        log = os.path.join(env["TRACEWIRE_RUNDIR"], "sessiond.log")
        want = f"uid {pw.pw_uid} has 1 apps connected, its limit ([user.{USER_IN_GROUP}] in {path})"
        _wait_for(lambda: want in _read(log), "sessiond to log the refused connection")
    finally:
        first.kill()
        first.wait(30)

    # The other member's session went on: their app is traced, their limit is [default]'s.
    _demo(limited, OTHER_MEMBER, 300)
    status = _run(py, env, OTHER_MEMBER, "status", "other").stdout
    assert "NOT TRACED" not in status and "ERROR" not in status, status
    assert f"user {OTHER_MEMBER}: buffers 1.0 MiB of 64.0 MiB ([default] in {path})" in status, status
    _run(py, env, OTHER_MEMBER, "stop")
    files = [f for _d, _, fs in os.walk(other_out) for f in fs if f.startswith("channel0")]
    assert files, other_out
    for user, name in ((USER_IN_GROUP, "snap"), (USER_IN_GROUP, "second"), (OTHER_MEMBER, "other")):
        _run(py, env, user, "destroy", name)
