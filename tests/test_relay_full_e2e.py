"""End to end, the relay's disk fills in the middle of a session: the real
CLI, sessiond, consumerd, tracewire-demo and a tracewire-relayd process whose
output is a small tmpfs (tests/faultfs.py: needs root, skipped elsewhere).

The target keeps what the relay could not write; `stop --timeout` says how
much when the disk stays full; `stop` waits for the rest once the disk grows,
and every event arrives exactly once.  The relay process never exits.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from faultfs import small_tmpfs
from test_relay_e2e import Relay, bt2_seqs, check_once, ctf_seqs, needs_bt2, start_session

from conftest import TW, short_tmpdir

EVENTS = 200_000


def _wait_status(tw: TW, pattern: str, timeout: float = 90.0) -> str:
    """Polls `tracewire status` until its output matches `pattern`."""
    deadline = time.monotonic() + timeout
    while True:
        out = tw.cli("status", timeout=30).stdout
        if re.search(pattern, out):
            return out
        assert time.monotonic() < deadline, f"status never matched {pattern!r}:\n{out}"
        time.sleep(0.2)


@needs_bt2
def test_relay_disk_fills_then_grows_while_stop_waits(tw: TW) -> None:
    d = Path(short_tmpdir("twfull"))
    out = d / "out"
    with small_tmpfs(out, "2m") as fs:
        relay = Relay(out, d / "relayd.log").start()
        try:
            start_session(tw, "full", relay, "fullhost")
            # ~17 MB of trace into 2 MiB: the relay fills early; the target
            # spools the rest (compressed, well under its 64 MiB cap).
            tw.demo("--events", str(EVENTS), "--rate", "100000", "--payload-bytes", "64")
            status = _wait_status(tw, r"relay full, retrying \(No space left on device\)")
            assert re.search(r"\d+ packets \([\d.]+ \w+\) held on the target", status), status

            # The disk stays full: a bounded stop fails, saying what is held.
            t0 = time.monotonic()
            r = tw.cli("stop", "--timeout", "2", check=False, timeout=60)
            assert r.returncode != 0, r.stdout
            assert time.monotonic() - t0 < 30
            m = re.search(r"(\d+) packets \([\d.]+ \w+\) held on the target", r.stderr)
            assert m and int(m.group(1)) > 0, r.stderr
            assert "relay full" in r.stderr and r.stderr.count("\n") == 1, r.stderr

            # A stop waits; the disk grows under it; the stop completes.
            stop = subprocess.Popen([sys.executable, "-m", "tracewire", "stop"], env=tw.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
            tw.procs.append(stop)
            try:
                stop.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            assert stop.poll() is None, "stop returned while the relay's disk was still full"
            fs.resize("256m")
            so, se = stop.communicate(timeout=150)
            assert stop.returncode == 0, so + se
            assert relay.proc is not None and relay.proc.poll() is None, relay.log_tail()

            log = relay.log_tail(100_000)
            assert log.count("holding back acknowledgements") == 1, log
            assert "writable again" in log, log
            tds = [p.parent for p in out.rglob("metadata")]
            assert len(tds) == 1, tds
            check_once(bt2_seqs(tds[0]), EVENTS, "babeltrace2")
            seqs, discarded = ctf_seqs(tds[0])
            assert discarded == 0
            check_once(seqs, EVENTS, "ctf.read_trace")
        finally:
            relay.stop()
