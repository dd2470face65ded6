"""Identity is not a pid: two processes that get the same pid in one session
are both traced.

The two apps really get the same pid: sessiond, the CLI and the apps all run
in a new pid namespace (``unshare --pid --fork --mount-proc``, root only),
where the driver sets ``/proc/sys/kernel/ns_last_pid`` before starting each
app.  When the driver (pid 1 of that namespace) exits, the kernel ends every
process in it, sessiond and consumerd included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tracewire import ctf

from conftest import DEMO, short_tmpdir

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private pid namespace",
)

APP_PID = 4000  # what both apps get inside the namespace
EVENTS = 200

DRIVER = textwrap.dedent("""
    import os, subprocess, sys
    rundir, out, demo, events, app_pid = sys.argv[1:6]
    env = dict(os.environ, TRACEWIRE_RUNDIR=rundir)

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "tracewire", *args], env=env,
                           capture_output=True, text=True, timeout=120)
        if r.returncode:
            sys.exit(f"tracewire {' '.join(args)}: {r.stderr.strip()}")

    cli("create", "s", "--output", out)
    cli("enable-event", "demo:*")
    cli("start")
    for _ in range(2):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(int(app_pid) - 1))
        app = subprocess.Popen([demo, "--events", events], env=env, stdout=subprocess.DEVNULL)
        if app.wait(timeout=120):
            sys.exit(f"the app exited {app.returncode}")
        print("app pid", app.pid, flush=True)
    cli("stop")
""")


def test_two_processes_with_the_same_pid_are_both_traced() -> None:
    work = Path(short_tmpdir("twpid"))
    try:
        driver = work / "driver.py"
        driver.write_text(DRIVER)
        out = work / "out"
        r = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(driver),
             str(work / "run"), str(out), DEMO, str(EVENTS), str(APP_PID)],
            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.split().count(str(APP_PID)) == 2, f"the apps did not share a pid: {r.stdout}"
        traces = sorted(out.glob("s-*/ust/pid/*"))
        assert len(traces) == 2, traces
        assert all(f"-{APP_PID}-" in t.name for t in traces), traces
        for t in traces:
            seqs = [e.fields["seq"] for e in ctf.read_trace(str(t)) if isinstance(e, ctf.Event)]
            assert sorted(seqs) == list(range(EVENTS)), t
    finally:
        shutil.rmtree(work, ignore_errors=True)
