"""End to end with hostile apps: real sessiond and consumerd (started by the
CLI in a private TRACEWIRE_RUNDIR, tests/conftest.py), and small traced apps
(the real tracer, driven line by line on stdin) of which two attack their own
ring through the tracer's mapping: one overwrites the magic (harmless to the
consumerd that mapped it already, fatal to a replay before issue 9), one the
control words (a slot that says its sub-buffer closed past its end).

Session A holds a good app and both hostile ones; session B another good app.
consumerd is killed with SIGKILL in the middle; sessiond restarts it once and
replays.  Every event of the good apps is in the traces, sessiond did not
restart consumerd in a loop, and ``tracewire status`` shows the hostile
streams broken or quarantined.

Robust on a loaded 2-core machine: generous deadlines, no timing assertions.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tracewire import ctf

from conftest import TW, _alive, _children

DEADLINE = 90.0
BATCH = 1000  # events per emit: a few KiB, far from filling a ring
T = TypeVar("T")

APP = r'''
import os, sys, time
from tracewire import tracepoint
from tracewire._tracer import _get_registry
from tracewire.ringbuf import Q_CONSUMED, Q_SLOTS, SLOT_END, SLOT_TS, SLOT_WORDS

emit = tracepoint(sys.argv[1], seq=int)
reg = _get_registry()
seq = 0


def producers():
    return [s.producer for s in list(reg.streams.values()) if s.producer is not None and s.enabled]


def corrupt_words(p):
    """A slot saying the sub-buffer being read closed past its end."""
    S, N = p.spec.subbuf_size, p.spec.num_subbuf
    j = p.q[Q_CONSUMED] // S
    k = Q_SLOTS + SLOT_WORDS * (j % N)
    p.q[k + SLOT_TS] = 2**62
    p.q[k + SLOT_END] = (j + 1) * S - 1
    os.eventfd_write(p.wakeup_fd, 1)


for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "ready":  # wait for the ring of the session that enables us
        deadline = time.monotonic() + 60
        while not producers() and time.monotonic() < deadline:
            time.sleep(0.02)
        print(f"streams {len(producers())}", flush=True)
    elif cmd == "emit":
        for _ in range(int(arg[0])):
            emit(seq=seq)
            seq += 1
        print(f"emitted {seq}", flush=True)
    elif cmd == "magic":
        for p in producers():
            p.view[0:4] = b"EVIL"
        print("done", flush=True)
    elif cmd == "words":
        for p in producers():
            corrupt_words(p)
        print("done", flush=True)
    elif cmd == "exit":
        break
'''


class App:
    """One traced app (the script above), emitting ``event``."""

    def __init__(self, tw: TW, script: Path, event: str) -> None:
        env = dict(tw.env, TRACEWIRE_REGISTER_TIMEOUT="30")
        self.event = event
        self.proc = subprocess.Popen(
            [sys.executable, str(script), event], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        tw.procs.append(self.proc)  # killed at teardown

    def ask(self, line: str, expect: str) -> None:
        """Send a command, and fail unless the app answers ``expect``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        got = self.proc.stdout.readline().strip()
        if got != expect:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            pytest.fail(f"app {self.event}: {line!r} answered {got!r}, not {expect!r}:\n{err[-3000:]}")

    def exit(self) -> None:
        """Tell the app to exit; it must exit 0."""
        _, err = self.proc.communicate("exit\n", timeout=DEADLINE)
        assert self.proc.returncode == 0, err[-3000:]


def poll(what: str, check: Callable[[], T | None], tw: TW, timeout: float = DEADLINE) -> T:
    """``check()``'s first true value, within ``timeout`` seconds; else fail
    with the end of sessiond's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}; sessiond.log ends with:\n{log_text(tw)[-4000:]}")


def log_text(tw: TW) -> str:
    """sessiond's log (consumerd's stderr goes there too)."""
    with open(os.path.join(tw.rundir, "sessiond.log"), errors="replace") as f:
        return f.read()


def stream_lines(tw: TW, session: str) -> list[str]:
    """The per-stream lines of ``tracewire status SESSION``."""
    out = tw.cli("status", session).stdout
    return [ln for ln in out.splitlines() if "packets" in ln]


def line_of(lines: list[str], pid: int) -> str:
    """The status line of the stream of app ``pid`` (its trace path names
    it), or "" if status shows none."""
    found = [ln for ln in lines if f"-{pid}-" in ln]
    assert len(found) <= 1, lines
    return found[0] if found else ""


def consumerd_pid(tw: TW) -> int:
    """The child of sessiond that maps ring buffers (not the warm spare)."""
    sd = tw.sessiond_pid()
    assert sd is not None

    def mapping() -> int | None:
        for c in _children(sd):
            try:
                with open(f"/proc/{c}/maps") as f:
                    if "/memfd:" in f.read() and _alive(c):
                        return c
            except OSError:
                pass
        return None

    return poll("a consumerd mapping the rings", mapping, tw)


def consumerd_starts(tw: TW) -> int:
    """How many times sessiond's log says a consumerd started serving."""
    return len(re.findall(r"consumerd for uid \d+ running", log_text(tw)))


def seqs_of(out: Path, pid: int, event: str) -> list[int]:
    """The ``seq`` of every ``event`` in app ``pid``'s trace below ``out``."""
    [trace] = [p.parent for p in out.rglob("metadata") if f"-{pid}-" in p.parent.name]
    seqs = []
    for item in ctf.read_trace(trace):
        assert not isinstance(item, ctf.Discarded), f"{event}: {item}"
        if item.name == event:
            seq = item.fields["seq"]
            assert isinstance(seq, int)
            seqs.append(seq)
    return seqs


def test_hostile_apps_and_a_killed_consumerd(tw: TW, out_dir: Path, tmp_path: Path) -> None:
    """See the module docstring: the good apps lose nothing, sessiond starts
    one consumerd for the one killed, status shows both attacks."""
    script = tmp_path / "app.py"
    script.write_text(APP)
    out_a, out_b = out_dir / "a", out_dir / "b"
    for name, out, pattern in (("sa", out_a, "a:*"), ("sb", out_b, "b:*")):
        tw.cli("create", name, "--output", str(out))
        tw.cli("enable-event", pattern, "-s", name)
        tw.cli("start", name)
    good_a, magic, words = App(tw, script, "a:good"), App(tw, script, "a:magic"), App(tw, script, "a:words")
    good_b = App(tw, script, "b:good")
    apps = [good_a, magic, words, good_b]
    for app in apps:
        app.ask("ready", "streams 1")
        app.ask(f"emit {BATCH}", f"emitted {BATCH}")

    # The attacks: the running consumerd breaks the stream whose control
    # words are corrupt; the bad magic is only seen by a replay.
    magic.ask("magic", "done")
    words.ask("words", "done")
    poll("the corrupt stream to be broken",
         lambda: "ERROR" in line_of(stream_lines(tw, "sa"), words.proc.pid), tw)
    starts = consumerd_starts(tw)
    sessiond = tw.sessiond_pid()
    assert sessiond is not None
    os.kill(consumerd_pid(tw), signal.SIGKILL)

    # A new consumerd, given everything again, quarantines the bad magic.
    poll("the bad magic to be quarantined",
         lambda: "quarantined" in line_of(stream_lines(tw, "sa"), magic.proc.pid), tw)
    for app in (good_a, good_b):
        app.ask(f"emit {BATCH}", f"emitted {2 * BATCH}")
        app.exit()
    tw.cli("stop", "sa")
    tw.cli("stop", "sb")

    assert seqs_of(out_a, good_a.proc.pid, "a:good") == list(range(2 * BATCH))
    assert seqs_of(out_b, good_b.proc.pid, "b:good") == list(range(2 * BATCH))
    assert _alive(sessiond) and tw.sessiond_pid() == sessiond
    restarts = consumerd_starts(tw) - starts
    assert restarts <= 2, f"consumerd started {restarts} times after one kill"
    lines = stream_lines(tw, "sa")
    assert "ERROR: quarantined: bad ring buffer magic" in line_of(lines, magic.proc.pid), lines
    assert "ERROR: quarantined: sub-buffer 0 closed past its end" in line_of(lines, words.proc.pid), lines
    assert "ERROR" not in line_of(lines, good_a.proc.pid), lines
    assert "ERROR" not in "\n".join(stream_lines(tw, "sb"))
