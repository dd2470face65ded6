"""Session rotation end to end, through the real CLI and daemons: ``rotate``
while tracewire-demo emits, to a local output and through a relay (restarted
between rotations), then each archived chunk read alone with babeltrace2
and the project's CTF reader, and the union of the chunks checked: every seq
exactly once.

Robust on a loaded 2-core machine: rotations are driven by the demo's own
progress lines, never by the clock; no timing assertions.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import test_relay_e2e
from test_relay_e2e import BT2, Relay, bt2_seqs, check_once, ctf_seqs

from tracewire import ctf

from conftest import TW

relayd = test_relay_e2e.relayd  # the fixture

needs_bt2 = pytest.mark.skipif(BT2 is None, reason="babeltrace2 is not installed")

ARCHIVE = re.compile(r"\d{8}T\d{6}[+-]\d{4}-\d{8}T\d{6}[+-]\d{4}-(\d+)")
ROTATED = re.compile(r"^Session (\S+): trace chunk (\d+) archived at (.+)$")


def rotate(tw: TW, *args: str) -> tuple[int, str]:
    """``tracewire rotate ARGS``: (chunk index, path) it printed."""
    out = tw.cli("rotate", *args).stdout.strip()
    m = ROTATED.match(out)
    assert m, out
    return int(m[2]), m[3]


def _step(n: int, rotations: int) -> int:
    """A progress step that puts ``rotations`` progress lines inside ``n``
    events (a multiple of 2000: the demo reports at the ends of its batches)."""
    return (n // (rotations + 1)) // 2000 * 2000


def rotate_while_emitting(tw: TW, n: int, rotations: int, *, rate: str) -> list[tuple[int, str]]:
    """Run a demo of ``n`` events and rotate ``rotations`` times as it
    reports its progress (at evenly spaced seqs); returns what rotate printed."""
    demo = tw.demo_popen("--events", str(n), "--rate", rate, "--progress-every", str(_step(n, rotations)))
    assert demo.stdout is not None
    done = []
    for line in demo.stdout:
        m = re.fullmatch(r"emitted (\d+)\n", line)
        if m and len(done) < rotations and int(m[1]) < n:
            done.append(rotate(tw))
    _out, err = demo.communicate(timeout=180)
    assert demo.returncode == 0, err
    while len(done) < rotations:  # the demo outran the CLI: rotate what is left
        done.append(rotate(tw))
    return done


def check_chunks(archives: Path, n: int, expect: int, min_full: int | None = None) -> None:
    """Each chunk under ``archives`` opens alone (babeltrace2, tracewire.ctf),
    and together they hold every seq of 0..n-1 exactly once; at least
    ``min_full`` (default: 3, or every chunk if fewer) hold events."""
    chunks = sorted(archives.iterdir(), key=lambda p: int(ARCHIVE.fullmatch(p.name)[1]))  # type: ignore[index]
    assert [int(ARCHIVE.fullmatch(p.name)[1]) for p in chunks] == list(range(expect))  # type: ignore[index]
    union: list[int] = []
    full = 0
    for chunk in chunks:
        assert [p.name for p in chunk.iterdir()] == ["ust"], chunk
        seqs, lost = ctf_seqs(chunk)
        full += bool(seqs)  # none: a rotation after the app exited (a slow machine)
        assert lost == 0, chunk
        if BT2 is not None:
            assert sorted(bt2_seqs(chunk)) == sorted(seqs), chunk
        assert seqs == sorted(seqs), chunk  # one app, one stream: in order within the chunk
        union += seqs
    check_once(union, n, "the union of the chunks")
    want = min(expect, 3) if min_full is None else min_full
    assert full >= want, f"only {full} of {expect} chunks hold events"


def session_dir(out: Path) -> Path:
    (d,) = out.iterdir()
    return d


@needs_bt2
def test_rotate_local_output(tw: TW, out_dir: Path) -> None:
    n, rotations = 80_000, 10
    tw.cli("create", "rot", "--output", str(out_dir))
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    printed = rotate_while_emitting(tw, n, rotations, rate="20000")
    sdir = session_dir(out_dir)
    assert [i for i, _ in printed] == list(range(rotations))
    for i, path in printed:
        assert Path(path).parent == sdir / "archives" and ARCHIVE.fullmatch(Path(path).name), path
        assert int(ARCHIVE.fullmatch(Path(path).name)[1]) == i  # type: ignore[index]
    stop = tw.cli("stop")
    assert "DISCARDED" not in stop.stdout + stop.stderr, stop.stdout
    # A stopped session rotates once more: its last chunk.
    last, path = rotate(tw, "-s", "rot")
    assert last == rotations
    again = tw.cli("rotate", "rot", check=False)
    assert again.returncode != 0 and again.stderr.count("\n") == 1, again.stderr
    assert "archived already" in again.stderr
    check_chunks(sdir / "archives", n, rotations + 1)
    assert not (sdir / "ust").exists()
    listed = tw.cli("list", "rot").stdout
    assert f"rotation: by hand, {rotations + 1} chunks archived (last: {path})" in listed, listed
    # Tracing again after a stop continues in the next chunk.
    tw.cli("start")
    tw.demo("--events", "1000")
    tw.cli("stop")
    seqs, _ = ctf_seqs(sdir / f"active-chunk-{rotations + 1}")
    check_once(seqs, 1000, "the chunk after the restart")
    # Destroying a rotated session archives its last chunk too.
    out = tw.cli("destroy").stdout
    assert f"last trace chunk archived at {sdir}/archives/" in out, out
    assert sorted(p.name for p in sdir.iterdir()) == ["archives"]
    last = max((sdir / "archives").iterdir(), key=lambda p: int(ARCHIVE.fullmatch(p.name)[1]))  # type: ignore[index]
    assert last.name.endswith(f"-{rotations + 1}")
    seqs, _ = ctf_seqs(last)
    check_once(seqs, 1000, "the last chunk, archived by destroy")


def test_rotate_refusals(tw: TW, out_dir: Path) -> None:
    tw.cli("create", "r1", "--output", str(out_dir))
    tw.cli("enable-event", "demo:*")
    r = tw.cli("rotate", check=False)
    assert r.returncode == 1 and "has not been started" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = tw.cli("rotate", "r1", "-s", "other", check=False)
    assert r.returncode == 1 and "two sessions given" in r.stderr, r.stderr
    for bad, why in ((["--timer", "10 parsecs"], "is not a period"), (["--size", "lots"], "is not a size"),
                     ([], "give --timer")):
        r = tw.cli("enable-rotation", *bad, check=False)
        assert r.returncode == 2 and why in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = tw.cli("disable-rotation", check=False)
    assert r.returncode == 1 and "no rotation schedule" in r.stderr, r.stderr


def test_rotation_schedule_in_list_and_status(tw: TW, out_dir: Path) -> None:
    tw.cli("create", "r2", "--output", str(out_dir))
    tw.cli("enable-event", "demo:*")
    assert "every 10m" in tw.cli("enable-rotation", "--timer", "10m").stdout
    tw.cli("enable-rotation", "-s", "r2", "--size", "256M")
    for verb in ("list", "status"):
        out = tw.cli(verb, "r2").stdout
        assert "rotation: every 10m or at 256.0 MiB, 0 chunks archived" in out, out
    tw.cli("disable-rotation", "-s", "r2")
    assert "rotation:" not in tw.cli("list", "r2").stdout


def test_rotation_by_size(tw: TW, out_dir: Path) -> None:
    """``--size``: sessiond rotates by itself once the current chunk holds
    that much; every chunk is complete, the union exact."""
    n = 60_000
    tw.cli("create", "rs", "--output", str(out_dir))
    tw.cli("enable-event", "demo:*")
    tw.cli("enable-rotation", "--size", "200k")
    tw.cli("start")
    demo = tw.demo_popen("--events", str(n), "--rate", "20000", "--progress-every", "1000")
    _out, err = demo.communicate(timeout=180)
    assert demo.returncode == 0, err
    # ~750 KiB of events in packets of 256 KiB at most: the schedule rotates
    # at least twice by itself, whenever its checks come (a busy machine
    # may take its time; the session stays started until then).
    deadline = time.monotonic() + 120
    while not re.search(r"rotation: at 200\.0 KiB, ([2-9]|\d\d+) chunks archived", out := tw.cli("list", "rs").stdout):
        assert time.monotonic() < deadline, out
        time.sleep(0.1)
    tw.cli("stop")
    tw.cli("disable-rotation")
    rotate(tw)
    sdir = session_dir(out_dir)
    archives = sorted((sdir / "archives").iterdir(), key=lambda p: int(ARCHIVE.fullmatch(p.name)[1]))  # type: ignore[index]
    assert len(archives) >= 3, archives
    # A chunk the schedule closed holds at least --size of packets (a
    # later check may find more: it closes at the first check past it).
    for chunk in archives[:2]:
        held = sum(f.stat().st_size for f in chunk.rglob("channel0_0"))
        assert held >= 200 * 1024, (chunk, held)
    check_chunks(sdir / "archives", n, len(archives), min_full=2)


@needs_bt2
def test_rotate_through_a_relay_restarted_between_rotations(tw: TW, relayd) -> None:
    relay: Relay = relayd()
    n, rotations = 80_000, 10
    tw.env["TRACEWIRE_HOSTNAME"] = "rothost"
    tw.cli("create", "rr", "--url", relay.url)
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    demo = tw.demo_popen("--events", str(n), "--rate", "20000", "--progress-every", str(_step(n, rotations)))
    assert demo.stdout is not None
    printed = []
    for line in demo.stdout:
        m = re.fullmatch(r"emitted (\d+)\n", line)
        if m and len(printed) < rotations and int(m[1]) < n:
            if len(printed) in (3, 6):
                relay.stop()  # the relay goes away between rotations...
                relay.start(port=relay.port)  # ...and comes back on its port
            printed.append(rotate(tw))
    _out, err = demo.communicate(timeout=180)
    assert demo.returncode == 0, err
    while len(printed) < rotations:
        printed.append(rotate(tw))
    tw.cli("stop")
    out = tw.cli("destroy").stdout  # archives the last chunk on the relay too
    m = re.search(r"last trace chunk archived at (\S+)", out)
    assert m, out
    printed.append((rotations, m[1]))
    sessions = list((relay.output / "rothost").iterdir())
    assert len(sessions) == 1
    sdir = sessions[0]
    for _i, path in printed:
        assert path.startswith(f"rothost/{sdir.name}/archives/"), path
        assert (relay.output / path).is_dir()
    check_chunks(sdir / "archives", n, rotations + 1)
    assert sorted(p.name for p in sdir.iterdir()) == ["archives"]  # no chunk left behind


def test_chunk_of_the_project_reader_is_a_whole_trace(tw: TW, out_dir: Path) -> None:
    """An archived chunk carries its own metadata: tracewire view opens it alone."""
    tw.cli("create", "rv", "--output", str(out_dir))
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    tw.demo("--events", "500")
    _i, path = rotate(tw)
    tw.demo("--events", "300")
    tw.cli("stop")
    first = [e for e in ctf.read_trace(Path(path)) if isinstance(e, ctf.Event)]
    assert len(first) == 500
    view = tw.cli("view", path, "--limit", "3").stdout
    assert view.count("demo:tick") == 3, view
    rest, _ = ctf_seqs(session_dir(out_dir) / "active-chunk-1")
    check_once(rest, 300, "the second chunk")


@needs_bt2
def test_a_chunk_without_events_is_still_a_trace(tw: TW, out_dir: Path) -> None:
    """Rotations after the only app exited: those chunks hold its metadata
    and no stream, and babeltrace2 opens each alone (no event)."""
    tw.cli("create", "re", "--output", str(out_dir))
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    tw.demo("--events", "500")
    first = [rotate(tw)[1] for _ in range(3)]
    tw.cli("stop")
    assert len(bt2_seqs(Path(first[0]))) == 500
    for path in first[1:]:
        assert [p.name for p in Path(path).rglob("metadata")], path
        assert bt2_seqs(Path(path)) == []
        assert ctf_seqs(Path(path)) == ([], 0)


def test_consumerd_killed_in_a_relay_rotation_loses_nothing(tw: TW, relayd) -> None:
    """The relay is down during a rotation: consumerd has switched to the next
    chunk, the old chunk waits in the spool unacknowledged, and the rotation
    times out (sessiond keeps its chunk count).  consumerd is then killed:
    the restarted one finds in the spool that the switch happened, goes on in
    the new chunk and sends both chunks' spooled packets again; the next
    rotate archives the old chunk.  Every seq ends in exactly one chunk."""
    import os
    import signal

    from test_relay_e2e import consumerd_pid

    relay: Relay = relayd()
    n = 120_000
    tw.env["TRACEWIRE_HOSTNAME"] = "crashhost"
    tw.env["TRACEWIRE_SESSIOND_STOP_TIMEOUT"] = "2"  # how long rotate waits for the relay
    tw.cli("create", "rc", "--url", relay.url)
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    demo = tw.demo_popen("--events", str(n), "--rate", "20000", "--progress-every", "10000")
    assert demo.stdout is not None
    step = 0
    for line in demo.stdout:
        if not re.fullmatch(r"emitted (\d+)\n", line):
            continue
        step += 1
        if step == 1:
            assert rotate(tw)[0] == 0
        elif step == 3:
            relay.stop()
            r = tw.cli("rotate", check=False)  # switches to chunk 2, cannot archive chunk 1
            assert r.returncode == 1 and "next 'tracewire rotate' completes it" in r.stderr, r.stderr
            os.kill(consumerd_pid(tw), signal.SIGKILL)  # chunk 1 and chunk 2 packets are in its spool
            relay.start(port=relay.port)
        elif step == 6:
            assert rotate(tw)[0] == 1  # the restarted consumerd archives chunk 1
    _out, err = demo.communicate(timeout=180)
    assert demo.returncode == 0, err
    tw.cli("stop")
    out = tw.cli("destroy").stdout
    assert "last trace chunk archived at" in out, out
    (sdir,) = (relay.output / "crashhost").iterdir()
    assert sorted(p.name for p in sdir.iterdir()) == ["archives"]
    check_chunks(sdir / "archives", n, 3)
