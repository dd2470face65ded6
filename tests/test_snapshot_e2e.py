"""Flight recorder end to end, with the real CLI and daemons: snapshot
sessions, overwrite channels, ``snapshot record`` (locally and to a relay),
an app's buffer surviving its SIGKILL, and snapshots of a streaming session;
every snapshot read back with tracewire.ctf and babeltrace2.

Robust on a loaded 2-core machine: generous deadlines, no timing assertions.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_local_e2e import Progress, read_back
from test_relay_e2e import consumerd_pid, relayd  # noqa: F401 (a fixture)

from conftest import TW

BT2 = shutil.which("babeltrace2")
pytestmark = pytest.mark.skipif(BT2 is None, reason="babeltrace2 is not installed (make test installs it)")

SNAPSHOT_DIR = re.compile(r"written to (\S+)")


def flight_recorder(tw: TW, out: Path, *channel: str, name: str = "fr") -> None:
    tw.cli("create", name, "--snapshot", "--output", str(out))
    tw.cli("enable-channel", "big", *channel)
    tw.cli("enable-event", "demo:*", "-c", "big")
    tw.cli("start")


def wait_traced(tw: TW) -> None:
    """Return once the running app writes its ring: its stream exists, and
    it applied the session's events (``enable-event`` answers after a sync
    round trip with every app)."""
    deadline = time.monotonic() + 60
    while "discarded" not in (out := tw.cli("status", "fr").stdout):
        if time.monotonic() > deadline:
            pytest.fail(f"no stream after 60 s:\n{out}")
        time.sleep(0.05)
    tw.cli("enable-event", "demo:*", "-s", "fr", "-c", "big")


def record(tw: TW, *args: str) -> tuple[Path, str]:
    """``snapshot record ARGS``: the snapshot's directory and the command's output."""
    out = tw.cli("snapshot", "record", *args).stdout
    m = SNAPSHOT_DIR.search(out)
    assert m, out
    return Path(m.group(1)), out


def bt2(path: Path) -> tuple[int, str]:
    """babeltrace2 on ``path``: (demo:tick events printed, its stderr); it must succeed."""
    r = subprocess.run([BT2, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.count(" demo:tick: "), r.stderr


def lost_packets(stderr: str) -> int:
    """The packets babeltrace2 says the tracer discarded (lost)."""
    return sum(int(n) for n in re.findall(r"Tracer discarded (\d+) packets", stderr))


def contiguous(seqs: list[int]) -> None:
    assert seqs, "the snapshot holds no event"
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap, a duplicate or disorder inside"


def test_flight_recorder_keeps_the_last_events_of_an_exited_app(tw: TW, out_dir: Path) -> None:
    flight_recorder(tw, out_dir, "--subbuf-size", "64k", "--num-subbuf", "8")
    tw.demo("--events", "1000000")
    snap, text = record(tw)
    # NAME-YYYYmmdd-HHMMSS-SEQ below the session's directory, as LTTng names it.
    assert re.fullmatch(r"snapshot-1-\d{8}-\d{6}-0", snap.name), snap
    assert snap.parent.parent == out_dir and snap.parent.name.startswith("fr-")
    seqs, discarded = read_back(snap)
    contiguous(seqs)
    assert seqs[-1] == 999_999 and discarded == 0
    assert len(seqs) < 1_000_000  # 8 x 64 KiB cannot hold them all: the oldest were overwritten
    events, stderr = bt2(snap)
    assert events == len(seqs)
    overwritten = int(re.search(r"(\d+) older sub-buffers already overwritten", text).group(1))
    assert overwritten > 0 and lost_packets(stderr) == overwritten  # babeltrace2 reports them as lost
    # A second snapshot of the same buffers: the next SEQ, the same events.
    again, _ = record(tw, "--name", "again")
    assert re.fullmatch(r"again-\d{8}-\d{6}-1", again.name)
    assert read_back(again)[0] == seqs


def test_buffer_of_an_app_killed_by_sigkill_is_in_the_next_snapshot(tw: TW, out_dir: Path) -> None:
    flight_recorder(tw, out_dir, "--subbuf-size", "64k", "--num-subbuf", "8")
    prog = Progress(tw.demo_popen("--events", "100000000", "--progress-every", "1000"))
    wait_traced(tw)
    prog.wait_for(prog.values[-1] + 50_000)
    prog.proc.send_signal(signal.SIGKILL)
    prog.finish()
    reported = prog.values[-1]  # printed after those events were committed
    status = tw.cli("status").stdout
    assert "producer gone" in status and "1 of them of apps that are gone" in status, status
    snap, _ = record(tw)
    seqs, _ = read_back(snap)
    contiguous(seqs)
    assert seqs[-1] >= reported - 1, f"the snapshot ends at {seqs[-1]}, the app reported {reported}"
    assert bt2(snap)[0] == len(seqs)


def test_ten_snapshots_while_an_app_writes_at_full_speed(tw: TW, out_dir: Path) -> None:
    flight_recorder(tw, out_dir, "--subbuf-size", "64k", "--num-subbuf", "16")
    prog = Progress(tw.demo_popen("--events", "1000000000", "--progress-every", "100000"))
    try:
        wait_traced(tw)
        snaps = [record(tw)[0] for _ in range(10)]
    finally:
        prog.proc.send_signal(signal.SIGKILL)
        prog.finish()
    assert len({s.name for s in snaps}) == 10
    for snap in snaps:
        seqs, _ = read_back(snap)
        contiguous(seqs)  # whole packets only: nothing torn
        assert bt2(snap)[0] == len(seqs)


def test_rings_survive_a_consumerd_crash(tw: TW, out_dir: Path) -> None:
    flight_recorder(tw, out_dir, "--subbuf-size", "16k", "--num-subbuf", "4")
    tw.demo("--events", "20000")
    before, _ = record(tw)
    os.kill(consumerd_pid(tw), signal.SIGKILL)
    after, _ = record(tw)  # sessiond restarts consumerd and gives it the rings again
    seqs = read_back(after)[0]
    contiguous(seqs)
    assert seqs == read_back(before)[0] and seqs[-1] == 19_999


def test_only_the_last_dead_apps_rings_are_kept(tw: TW, out_dir: Path) -> None:
    tw.env["TRACEWIRE_SESSIOND_SNAPSHOT_KEEP_DEAD"] = "2"
    flight_recorder(tw, out_dir, "--subbuf-size", "16k", "--num-subbuf", "4")
    for _ in range(3):
        tw.demo("--events", "1000")
    status = tw.cli("status").stdout
    assert "2 ring buffers held (128.0 KiB)" in status and "2 of them of apps that are gone" in status, status
    snap, text = record(tw)
    assert "2 streams" in text
    assert len(list(snap.glob("ust/pid/*"))) == 2


def test_max_size_keeps_the_newest_data_that_fits(tw: TW, out_dir: Path) -> None:
    flight_recorder(tw, out_dir, "--subbuf-size", "16k", "--num-subbuf", "16")
    tw.demo("--events", "200000")
    full, _ = record(tw)
    small, text = record(tw, "--max-size", "40k")
    everything, part = read_back(full)[0], read_back(small)[0]
    contiguous(part)
    assert part[-1] == everything[-1] == 199_999
    assert len(part) < len(everything)
    data = sum(f.stat().st_size for f in small.rglob("big_0*") if f.parent.name != "index")
    assert data <= 40 * 1024
    assert "left out for --max-size" in text
    r = tw.cli("snapshot", "record", "--max-size", "1k", check=False)
    assert r.returncode == 1 and "less than one of their packets" in r.stderr, r.stderr


def test_snapshot_of_a_streaming_session_holds_what_its_buffers_hold(tw: TW, out_dir: Path) -> None:
    tw.cli("create", "fr", "--output", str(out_dir))  # a streaming session, discard mode
    tw.cli("enable-channel", "big")
    tw.cli("enable-event", "demo:*", "-c", "big")
    tw.cli("start")
    prog = Progress(tw.demo_popen("--events", "100000000", "--rate", "50000", "--progress-every", "1000"))
    try:
        wait_traced(tw)
        reported = prog.wait_for(prog.values[-1] + 20_000)
        snap, _ = record(tw, "--output", str(out_dir / "snaps"))
    finally:
        prog.proc.send_signal(signal.SIGKILL)
        prog.finish()
    assert snap.parent == out_dir / "snaps"
    seqs, _ = read_back(snap)
    contiguous(seqs)
    assert seqs[-1] >= reported - 1
    assert bt2(snap)[0] == len(seqs)
    tw.cli("stop")
    (session,) = [p for p in out_dir.iterdir() if p.name.startswith("fr-")]
    streamed, discarded = read_back(session / "ust")
    # The snapshot took nothing from the stream.
    assert streamed == list(range(len(streamed))) and discarded == 0 and streamed[-1] >= seqs[-1]
    # The snapshot is a trace of its own (its own uuid): babeltrace2 reads a
    # directory holding both, the events of each once.
    both = out_dir / "both"
    both.mkdir()
    shutil.copytree(session / "ust", both / "streamed")
    shutil.copytree(snap, both / "snapshot")
    assert bt2(both)[0] == len(streamed) + len(seqs)
    # Once the app is gone its buffers are freed (a streaming session): nothing left to snapshot.
    r = tw.cli("snapshot", "record", check=False)
    assert r.returncode == 1 and "no event" in r.stderr


def test_snapshot_to_a_relay_lands_in_the_session_directory(tw: TW, relayd) -> None:  # noqa: F811
    relay = relayd()
    tw.env["TRACEWIRE_HOSTNAME"] = "target1"
    tw.cli("create", "fr", "--snapshot", "--url", relay.url)
    tw.cli("enable-channel", "big", "--subbuf-size", "64k", "--num-subbuf", "8")
    tw.cli("enable-event", "demo:*", "-c", "big")
    tw.cli("start")
    tw.demo("--events", "300000")
    paths = [record(tw)[0] for _ in range(2)]
    (session,) = (relay.output / "target1").iterdir()
    assert [str(p).split("/target1/", 1)[1] for p in paths] == [f"{session.name}/{p.name}" for p in paths]
    assert session.name.startswith("fr-")
    snaps = sorted(session.glob("snapshot-1-*"), key=lambda p: p.name.rsplit("-", 1)[1])
    assert [s.name.rsplit("-", 1)[1] for s in snaps] == ["0", "1"]
    for snap in snaps:
        seqs, _ = read_back(snap)
        contiguous(seqs)
        assert seqs[-1] == 299_999
        assert bt2(snap)[0] == len(seqs)


def test_channel_modes_and_refusals(tw: TW, out_dir: Path) -> None:
    tw.cli("create", "s1", "--output", str(out_dir))
    r = tw.cli("enable-channel", "c", "--overwrite", check=False)
    assert r.returncode == 1 and "snapshot sessions" in r.stderr and "Traceback" not in r.stderr
    r = tw.cli("snapshot", "record", check=False)
    assert r.returncode == 1 and "no ring buffer yet" in r.stderr
    tw.cli("create", "fr", "--snapshot", "--output", str(out_dir))
    tw.cli("enable-channel", "ring")
    tw.cli("enable-channel", "keep", "--discard")
    r = tw.cli("enable-channel", "wait", "--blocking-timeout", "10", check=False)
    assert r.returncode == 1 and "never makes the app wait" in r.stderr
    for verb in (["rotate", "fr"], ["enable-rotation", "-s", "fr", "--timer", "10s"]):
        r = tw.cli(*verb, check=False)
        assert r.returncode == 1 and "snapshot session" in r.stderr
    listing = tw.cli("list", "fr").stdout
    assert re.search(r"channel ring: overwrite", listing) and re.search(r"channel keep: discard", listing)
