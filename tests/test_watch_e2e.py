"""``status --watch`` on a pseudo-terminal and ``list --apps`` against real
daemons and a demo app emitting at a fixed rate (issue 14, points 2 and 3)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

from conftest import TW

DEADLINE = 60.0  # generous: a loaded 2-core machine
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _wait_for_app(tw: TW, pid: int) -> dict:
    """``list --apps --json`` once it shows app ``pid`` with its tracepoint."""
    deadline = time.monotonic() + DEADLINE
    while True:
        doc = json.loads(tw.cli("list", "--apps", "--json").stdout)
        mine = [a for a in doc["apps"] if a["pid"] == pid]
        if mine and mine[0]["tracepoints"]:
            return mine[0]
        assert time.monotonic() < deadline, doc
        time.sleep(0.05)


def _rate_rows(screen: str) -> list[float]:
    """The EVENTS/S cells of the table rows the screen shows last."""
    last = ANSI.sub("\n", screen.rsplit("\x1b[H", 1)[-1])
    rows = []
    for line in last.splitlines():
        cells = line.split()
        if cells and line.rstrip().endswith("channel0_0") and re.fullmatch(r"[0-9.]+", cells[0]):
            rows.append(float(cells[0]))
    return rows


def test_watch_shows_rates_on_a_terminal_and_list_apps_shows_the_app(tw: TW, out_dir) -> None:
    tw.cli("create", "s1", "--output", str(out_dir))
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    demo = tw.demo_popen("--events", "20000", "--rate", "500")

    app = _wait_for_app(tw, demo.pid)
    assert app["procname"] == "tracewire-demo" and app["uid"] == os.geteuid() and app["user"]
    assert app["tracepoints"] == [{"name": "demo:tick", "fields": [{"name": "seq", "type": "int64"},
                                                                   {"name": "msg", "type": "string"}]}]
    text = tw.cli("list", "--apps").stdout
    assert f"(pid {demo.pid}, " in text and "  demo:tick (seq: int64, msg: string)" in text

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 200, 0, 0))
    watch = subprocess.Popen([sys.executable, "-m", "tracewire", "status", "--watch", "--interval", "0.3"],
                             env=tw.env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    tw.procs.append(watch)
    screen = ""
    try:
        deadline = time.monotonic() + DEADLINE
        while not any(r > 0 for r in _rate_rows(screen)):
            assert time.monotonic() < deadline and watch.poll() is None, screen[-2000:]
            if select.select([master], [], [], 1.0)[0]:
                screen += os.read(master, 65536).decode(errors="replace")
        watch.send_signal(signal.SIGINT)  # Ctrl-C
        assert watch.wait(timeout=DEADLINE) == 0
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            screen += chunk.decode(errors="replace")
    finally:
        os.close(master)
    assert "Traceback" not in screen
    assert screen.endswith("\x1b[?25h")  # the cursor is back

    # Not on a terminal, --json: one object per refresh; the session's end ends it.
    lines = subprocess.Popen([sys.executable, "-m", "tracewire", "status", "--watch", "--json", "-i", "0.2"],
                             env=tw.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tw.procs.append(lines)
    assert lines.stdout is not None
    first = json.loads(lines.stdout.readline())
    assert first["session"]["name"] == "s1" and first["streams"][0]["producer"] == "alive"
    demo.kill()
    tw.cli("destroy", "s1")
    out, err = lines.communicate(timeout=DEADLINE)
    assert lines.returncode == 0, err
    *refreshes, last = out.splitlines()
    assert all(json.loads(r)["session"]["name"] == "s1" for r in refreshes)
    assert last == "Session s1 was destroyed; nothing more to watch." and err == ""
