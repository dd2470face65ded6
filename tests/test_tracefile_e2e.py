"""End to end, real CLI and daemons: ``enable-channel --tracefile-size S
--tracefile-count C`` bounds each stream's files, locally and through a
relay, and every file left (alone, in any combination, and the trace as a
whole) opens in babeltrace2.

Robust on a loaded 2-core machine: generous deadlines, no timing
assertions.  The channel blocks (``--blocking-timeout inf``) so that no event
is discarded and the kept files hold an unbroken run of seqs.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_relay_e2e import (  # noqa: F401 (relayd: a fixture)
    BT2,
    bt2_seqs,
    kill_consumerd_mid_stream,
    needs_bt2,
    relayd,
    the_trace_dir,
)

from tracewire import ctf

from conftest import TW, _alive, _children

EVENTS = 20_000
PAYLOAD = 200  # ~4 MiB of packets: some 17 files of 256 KiB
SUBBUF = 64 * 1024
SIZE = 256 * 1024
COUNT = 3
CHANNEL = ["enable-channel", "channel0", "--subbuf-size", "64k", "--tracefile-size", "256k",
           "--tracefile-count", str(COUNT), "--blocking-timeout", "inf"]
_LOST = re.compile(r"Tracer discarded (\d+) packets")


def _stream_files(td: Path) -> dict[str, list[ctf.IndexEntry]]:
    """{stream file name: its index entries}, each index checked to cover its
    file exactly, and no index without its file."""
    names = sorted(p.name for p in td.iterdir() if p.is_file() and p.name != "metadata")
    assert names and all(re.fullmatch(r"channel0_0_\d+", n) for n in names), names
    assert sorted(p.name for p in (td / "index").iterdir()) == sorted(n + ".idx" for n in names)
    out = {}
    for n in names:
        entries = ctf.read_index((td / "index" / (n + ".idx")).read_bytes())
        end = 0
        for e in entries:
            assert e.offset == end
            end += e.packet_size // 8
        assert end == (td / n).stat().st_size
        out[n] = entries
    return out


def _bt2(td: Path, names: tuple[str, ...]) -> tuple[int, int]:
    """babeltrace2 on the metadata and these stream files (and their indexes)
    alone: (events, packets it reports lost); it must exit 0."""
    assert BT2 is not None
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        (Path(d) / "index").mkdir()
        shutil.copy(td / "metadata", d)
        for n in names:
            shutil.copy(td / n, d)
            shutil.copy(td / "index" / (n + ".idx"), Path(d) / "index")
        r = subprocess.run([BT2, d], capture_output=True, timeout=120)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0, f"babeltrace2 on {names}: {err[-2000:]}"
    return r.stdout.count(b" demo:tick: "), sum(int(m) for m in _LOST.findall(err))


def check_bounded_and_readable(root: Path, packets: int | None, events: int = EVENTS) -> None:
    """At most COUNT files, each at most SIZE bytes (a packet is at most a
    sub-buffer, never more than SIZE), holding the newest packets up to the
    last one in order; every combination of them opens in babeltrace2, which
    reports the packets of a missing file between two others as lost; the
    trace as a whole holds the newest events, ending at the last one
    (``packets`` None: a restart happened, the count is not known, and
    events are only checked to be in order, without duplicates, up to the
    last one)."""
    strict = packets is not None
    td = the_trace_dir(root)
    files = _stream_files(td)
    assert 1 <= len(files) <= COUNT, files
    assert all((td / n).stat().st_size <= SIZE for n in files)
    assert all(e.packet_size // 8 <= SUBBUF for es in files.values() for e in es)
    by_age = sorted(files, key=lambda n: files[n][0].packet_seq_num)
    seqs = [e.packet_seq_num for n in by_age for e in files[n]]
    if packets is None:
        packets = seqs[-1] + 1
    assert seqs == list(range(packets - len(seqs), packets))  # the newest, none missing
    assert len(files) == COUNT  # many more files were written: the oldest went
    assert packets - len(seqs) > 0
    for k in range(1, len(by_age) + 1):
        for combo in itertools.combinations(by_age, k):
            shown, lost = _bt2(td, combo)
            assert shown > 0
            first, last = by_age.index(combo[0]), by_age.index(combo[-1])
            missing = [n for n in by_age[first:last + 1] if n not in combo]
            assert lost == sum(len(files[n]) for n in missing), (combo, lost)
    got = bt2_seqs(root)
    if strict:
        assert got == list(range(events - len(got), events)), (got[:3], got[-3:])
    else:
        assert got == sorted(set(got)) and got[-1] == events - 1, (got[:3], got[-3:])


def _stop_packets(tw: TW) -> int:
    out = tw.cli("stop").stdout
    m = re.search(r": (\d+) packets", out)
    assert m, out
    return int(m.group(1))


@needs_bt2
def test_local_stream_files_are_bounded_and_readable(tw: TW, out_dir: Path) -> None:
    tw.cli("create", "tf", "--output", str(out_dir))
    tw.cli(*CHANNEL)
    tw.cli("enable-event", "demo:*", "-c", "channel0")
    listed = tw.cli("list", "tf").stdout
    assert "tracefile-size 256.0 KiB, tracefile-count 3" in listed, listed
    tw.cli("start")
    tw.demo("--events", str(EVENTS), "--payload-bytes", str(PAYLOAD))
    packets = _stop_packets(tw)
    check_bounded_and_readable(out_dir, packets)


@needs_bt2
def test_relay_stream_files_are_bounded_and_readable(tw: TW, relayd) -> None:  # noqa: F811
    relay = relayd()
    tw.env["TRACEWIRE_HOSTNAME"] = "tfhost"
    tw.cli("create", "tf", "--url", relay.url)
    tw.cli(*CHANNEL)
    tw.cli("enable-event", "demo:*", "-c", "channel0")
    tw.cli("start")
    tw.demo("--events", str(EVENTS), "--payload-bytes", str(PAYLOAD))
    packets = _stop_packets(tw)
    check_bounded_and_readable(relay.output, packets)


@needs_bt2
@pytest.mark.parametrize("sink", ["local", "relay"])
def test_consumerd_killed_continues_the_newest_file(tw: TW, out_dir: Path, relayd, sink: str) -> None:  # noqa: F811
    """SIGKILL consumerd while it writes: the restarted one continues the
    newest file (recovered) and keeps the bounds; every file left opens."""
    n = 150_000
    if sink == "relay":
        relay = relayd()
        tw.env["TRACEWIRE_HOSTNAME"] = "tfhost"
        tw.cli("create", "tf", "--url", relay.url)
        root = relay.output
    else:
        tw.cli("create", "tf", "--output", str(out_dir))
        root = out_dir
    tw.cli(*CHANNEL)
    tw.cli("enable-event", "demo:*", "-c", "channel0")
    tw.cli("start")
    demo, killed = kill_consumerd_mid_stream(tw, n, rate="50000")
    _out, err = demo.communicate(timeout=180)
    assert demo.returncode == 0, err
    sd = tw.sessiond_pid()
    assert sd is not None and [c for c in _children(sd) if _alive(c) and c != killed]
    tw.cli("stop")
    check_bounded_and_readable(root, None, n)


@needs_bt2
def test_the_limits_hold_in_every_trace_chunk_after_a_rotation(tw: TW, out_dir: Path) -> None:
    tw.cli("create", "tf", "--output", str(out_dir))
    tw.cli(*CHANNEL)
    tw.cli("enable-event", "demo:*", "-c", "channel0")
    tw.cli("start")
    tw.demo("--events", str(EVENTS), "--payload-bytes", str(PAYLOAD))
    archive = Path(tw.cli("rotate").stdout.split()[-1])
    tw.demo("--events", str(EVENTS), "--payload-bytes", str(PAYLOAD))
    tw.cli("stop")
    (session,) = [p for p in out_dir.iterdir() if p.name.startswith("tf-")]
    chunks = [archive, *(p for p in session.iterdir() if p.name.startswith("active-chunk-"))]
    assert len(chunks) == 2, chunks
    for chunk in chunks:
        # The chunk's trace with streams (a chunk begun when no app ran also
        # holds the metadata of the app before, without a stream).
        (td,) = [p.parent for p in chunk.rglob("metadata") if any(p.parent.glob("channel0_*"))]
        files = _stream_files(td)
        assert 1 <= len(files) <= COUNT, (chunk, files)
        assert all((td / n).stat().st_size <= SIZE for n in files)
        assert _bt2(td, tuple(files))[0] > 0
