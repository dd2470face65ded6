"""Shared fixtures: a private TRACEWIRE_RUNDIR per test, and helpers that run the
real ``tracewire`` CLI and ``tracewire-demo`` as subprocesses (always with a
timeout) and kill whatever sessiond / consumerd / demo they started.

Run directories live directly under /tmp with a short name: unix socket paths
are limited to 107 bytes, and pytest's tmp_path is often longer than that.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN_DIR = os.path.dirname(sys.executable)
DEMO = os.path.join(BIN_DIR, "tracewire-demo")
CLI_TIMEOUT = 120.0  # generous: a loaded 2-core machine
DEMO_TIMEOUT = 180.0


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc), best effort."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def _comm(pid: int) -> str:
    """The process's name (what ps and top show), "" once it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _kill_wait(pids: list[int], sig: int, deadline: float) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.02)


class TW:
    """One tracewire instance: a run directory and the processes started in it."""

    def __init__(self, rundir: str) -> None:
        self.rundir = rundir
        self.env = dict(os.environ)
        self.env["TRACEWIRE_RUNDIR"] = rundir
        self.env["PATH"] = BIN_DIR + os.pathsep + self.env.get("PATH", "")
        self.env.pop("TRACEWIRE_DEBUG", None)
        self.procs: list[subprocess.Popen] = []
        self.daemons: set[int] = set()

    # -- running things --------------------------------------------------------
    def cli(self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        """Run ``tracewire ARGS``; with ``check``, fail the test on a non-zero exit."""
        r = subprocess.run(
            [sys.executable, "-m", "tracewire", *args], env=self.env, capture_output=True,
            text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        self._note_daemon()
        if check and r.returncode != 0:
            pytest.fail(f"tracewire {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def run(self, argv: list[str], timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def demo(self, *args: str, timeout: float = DEMO_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``tracewire-demo ARGS`` to completion."""
        r = subprocess.run([DEMO, *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            pytest.fail(f"tracewire-demo {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def demo_popen(self, *args: str) -> subprocess.Popen:
        """Start ``tracewire-demo ARGS`` (stdout piped, text); killed at teardown."""
        p = subprocess.Popen([DEMO, *args], env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.procs.append(p)
        return p

    # -- daemons -----------------------------------------------------------------
    def sessiond_pid(self) -> int | None:
        try:
            with open(os.path.join(self.rundir, "sessiond.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def _note_daemon(self) -> None:
        pid = self.sessiond_pid()
        if pid is not None:
            self.daemons.add(pid)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError, OSError):
                pass
        self._note_daemon()
        sessionds = [p for p in self.daemons if _alive(p)]
        consumers = [c for p in sessionds for c in _children(p)]
        if sessionds:
            # A sessiond's first signal stops its started sessions (up to
            # --shutdown-timeout), a second one exits at once: teardown wants that.
            _kill_wait(sessionds, signal.SIGINT, time.monotonic())
            _kill_wait(sessionds, signal.SIGTERM, time.monotonic() + 5)
        _kill_wait([p for p in sessionds + consumers if _alive(p)], signal.SIGKILL, time.monotonic() + 5)


def short_tmpdir(prefix: str = "tw") -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@pytest.fixture
def make_tw() -> Iterator:
    """Factory: ``make_tw()`` gives a fresh, independent instance (own rundir)."""
    made: list[TW] = []
    dirs: list[str] = []

    def factory() -> TW:
        d = short_tmpdir()
        dirs.append(d)
        tw = TW(d)
        made.append(tw)
        return tw

    yield factory
    for tw in made:
        tw.cleanup()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tw(make_tw) -> TW:
    """A tracewire instance in a private run directory (no sessiond yet)."""
    return make_tw()


@pytest.fixture
def rundir(tw: TW) -> str:
    return tw.rundir


@pytest.fixture
def out_dir() -> Iterator[Path]:
    """A trace output directory (short path, removed afterwards)."""
    d = short_tmpdir("twout")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


# Property tests: bounded in `make test`, scaled up by `make fuzz`.
from hypothesis import settings as _hyp_settings  # noqa: E402

from fuzzing import SCALE as _FUZZ_SCALE  # noqa: E402

_hyp_settings.register_profile("tracewire", max_examples=100 * _FUZZ_SCALE, deadline=None)
_hyp_settings.load_profile("tracewire")
