"""An app that forks: the child must not write into its parent's ring
buffers (they are shared memory, inherited by fork, with no lock between
the two processes), and the child's own events are traced as those of a
new app.  Real sessiond and consumerd, the trace read back."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
from test_local_e2e import setup_session

from tracewire import ctf

from conftest import TW

APP = textwrap.dedent(
    """
    import os, sys
    from tracewire import tracepoint
    tick = tracepoint("demo:tick", seq=int, msg=str)
    for i in range(1000):
        tick(seq=i, msg="parent")
    pid = os.fork()
    if pid == 0:
        for i in range(20000):
            tick(seq=100000 + i, msg="child")
        sys.exit(0)  # a normal exit: atexit handlers run in the child too
    for i in range(1000, 21000):
        tick(seq=i, msg="parent")
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status), "pid", pid)
    """
)


@pytest.mark.parametrize("speedups", ["1", "0"])
def test_a_forked_child_writes_its_own_stream_never_its_parents(tw: TW, out_dir: Path, speedups: str) -> None:
    setup_session(tw, out_dir)
    tw.env["TRACEWIRE_SPEEDUPS"] = speedups
    r = tw.run([sys.executable, "-c", APP])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("child 0"), r.stdout
    tw.cli("stop")
    by_pid: dict[int, list[tuple[int, str]]] = {}
    discarded = 0
    for meta in out_dir.rglob("metadata"):  # one trace per app: .../ust/pid/<proc>-<pid>-<datetime>/
        pid = int(re.fullmatch(r".*-(\d+)-\d{8}T\d{6}", meta.parent.name).group(1))
        for item in ctf.read_trace(meta.parent):
            if isinstance(item, ctf.Discarded):
                discarded += item.count
            else:
                by_pid.setdefault(pid, []).append((item.fields["seq"], item.fields["msg"]))
    assert discarded == 0
    child_pid = int(r.stdout.split()[-1])
    parent = [v for pid, v in by_pid.items() if pid != child_pid]
    assert len(parent) == 1
    assert parent[0] == [(i, "parent") for i in range(21000)]  # whole, in order, nothing of the child's
    child = by_pid.get(child_pid, [])
    # The child registered as a new app before it went on: its events are
    # in its own stream, from the first one after the fork.
    assert child == [(100000 + i, "child") for i in range(20000)]
