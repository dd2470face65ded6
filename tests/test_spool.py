"""consumerd's spool (consumerd/spool.py): records written from parts,
segments recycled rather than deleted, and what a restarted consumerd loads
after a crash at any point of an append or a recycle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumerd.spool import Spool, SpoolRecord

SEG = 4096  # small segments: a few records each


def put(sp: Spool, seq: int, size: int = 1000, key: str = "s0") -> SpoolRecord:
    """Append packet ``seq``: a header part and a body part, ``size`` bytes in all."""
    head = seq.to_bytes(8, "little")
    body = memoryview(bytes([seq % 251]) * (size - len(head)))
    return sp.append(key, [head, body], seq, 10 * seq, 10 * seq + 5, seq // 3, 4096 * (seq + 1), size, 0)


def payload(rec: SpoolRecord) -> bytes:
    return rec.ref.read()


def expected(seq: int, size: int = 1000) -> bytes:
    return seq.to_bytes(8, "little") + bytes([seq % 251]) * (size - 8)


def segment_files(d: Path, key: str = "s0") -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.startswith(key + "."))


def test_records_round_trip_through_a_restart(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path), 1 << 20, segment_size=SEG)
    recs = [put(sp, s) for s in range(10)]
    assert [payload(r) for r in recs] == [expected(s) for s in range(10)]
    sp.close()
    again = Spool(str(tmp_path), 1 << 20, segment_size=SEG)
    loaded = again.load("s0")
    assert [r.seq for r in loaded] == list(range(10))
    assert [payload(r) for r in loaded] == [expected(s) for s in range(10)]
    r = loaded[4]
    assert (r.ts_begin, r.ts_end, r.events_discarded, r.ring_end, r.raw_len) == (40, 45, 1, 4096 * 5, 1000)
    # The next record continues the last segment.
    put(again, 10)
    again.close()
    assert [r.seq for r in Spool(str(tmp_path), 1 << 20, segment_size=SEG).load("s0")] == list(range(11))


def test_acknowledged_segments_are_recycled_not_deleted(tmp_path: Path) -> None:
    """Steady streaming writes over its own acknowledged segments: the files
    (and their pages) stay, no new file is made."""
    sp = Spool(str(tmp_path), 1 << 20, segment_size=SEG, keep_free=2)
    for s in range(12):  # three segments of four records
        put(sp, s)
    names = segment_files(tmp_path)
    assert len(names) == 3
    sp.acknowledged("s0", 7)  # the first two segments are acknowledged
    assert sp.size < 3 * SEG
    for s in range(12, 20):
        put(sp, s)
    assert segment_files(tmp_path) == names, "a new segment file was made instead of a spare reused"
    sp.close()
    loaded = Spool(str(tmp_path), 1 << 20, segment_size=SEG).load("s0")
    # The spares written over hold the newest records; the order is by seq, not by file name.
    assert [r.seq for r in loaded] == list(range(8, 20))
    assert [payload(r) for r in loaded] == [expected(s) for s in range(8, 20)]


def test_spares_beyond_what_a_stream_needs_are_deleted(tmp_path: Path) -> None:
    now = [100.0]
    sp = Spool(str(tmp_path), 1 << 20, segment_size=SEG, keep_free=1, trim_after=10.0, clock=lambda: now[0])
    for s in range(12):
        put(sp, s)
    sp.acknowledged("s0", 11)  # all three segments (full) become spares
    assert len(segment_files(tmp_path)) == 3
    now[0] += 10
    sp.trim()  # the period that needed three is still counted
    assert len(segment_files(tmp_path)) == 3
    now[0] += 10
    sp.trim()  # a period with none in use: one spare (keep_free) is left
    assert len(segment_files(tmp_path)) == 1
    put(sp, 12)
    assert len(segment_files(tmp_path)) == 1  # written over the spare
    sp.close()
    assert [r.seq for r in Spool(str(tmp_path), 1 << 20, segment_size=SEG).load("s0")] == [12]


def test_a_recycled_segment_never_brings_old_records_back(tmp_path: Path) -> None:
    """A spare's old records are made invalid when it becomes a spare: a
    restart does not resend them, nor take them for the stream's tail."""
    sp = Spool(str(tmp_path), 1 << 20, segment_size=SEG)
    for s in range(8):
        put(sp, s)
    sp.acknowledged("s0", 3)  # the first segment becomes a spare
    sp.close()
    loaded = Spool(str(tmp_path), 1 << 20, segment_size=SEG).load("s0")
    assert [r.seq for r in loaded] == [4, 5, 6, 7]


@pytest.mark.parametrize("cut", ["header", "data"])
def test_a_crash_mid_append_leaves_the_records_before_it(tmp_path: Path, cut: str) -> None:
    """A consumerd killed while appending: the data is written before the
    header, so either the header is missing, or half the data is (a torn
    header fails its CRC): the record is not loaded, those before it are."""
    sp = Spool(str(tmp_path), 1 << 20, segment_size=1 << 20)
    for s in range(3):
        put(sp, s)
    last = put(sp, 3)
    sp.close()
    path = segment_files(tmp_path)[0]
    header_at = last.ref.offset - 64
    with open(path, "r+b") as f:
        if cut == "header":
            f.seek(header_at + 10)
            f.write(b"\xff" * 20)  # a header torn across a page: its CRC fails
        else:
            f.truncate(last.ref.offset + 100)  # the data cut short
    loaded = Spool(str(tmp_path), 1 << 20, segment_size=1 << 20).load("s0")
    assert [r.seq for r in loaded] == [0, 1, 2]


def test_garbage_in_a_segment_file_is_not_trusted(tmp_path: Path) -> None:
    (tmp_path / "s0.0").write_bytes(os.urandom(5000))
    (tmp_path / "s0.1").write_bytes(b"")
    sp = Spool(str(tmp_path), 1 << 20, segment_size=SEG)
    assert sp.load("s0") == []
    put(sp, 0)  # and the files are usable as spares
    sp.close()
    assert [r.seq for r in Spool(str(tmp_path), 1 << 20, segment_size=SEG).load("s0")] == [0]


def test_cap_and_remove(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path), 3000, segment_size=SEG)
    put(sp, 0)
    put(sp, 1)
    assert sp.has_room()
    put(sp, 2)
    assert not sp.has_room()
    sp.acknowledged("s0", 2)  # the segment being written stays (it has room)
    put(sp, 3)
    put(sp, 4)  # now the first segment is full
    sp.acknowledged("s0", 4)
    assert sp.has_room()
    sp.remove("s0")
    assert segment_files(tmp_path) == []
    assert sp.size == 0


def test_what_the_spool_holds_on_disk_stays_within_the_cap_and_the_per_stream_allowance(tmp_path: Path) -> None:
    """An outage fills the spool from stream s0, the relay takes it all, then
    a second outage fills it from s1: s0's spares beyond ``keep_free`` do
    not stay on top of s1's segments (sessiond charges the session owner
    the cap plus, per stream, the segment being written, ``keep_free``
    spares and one packet; see sessiond/accounting.py)."""
    from sessiond.accounting import SPOOL_FILE_HEADER, SPOOL_RECORD

    cap, size, keep = 32 * SEG, 1000, 2
    packet = size + SPOOL_RECORD
    allowance = 2 * ((keep + 1) * (SEG + packet + SPOOL_FILE_HEADER) + packet)  # two streams
    sp = Spool(str(tmp_path), cap, segment_size=SEG, keep_free=keep)

    def on_disk() -> int:
        return sum(p.stat().st_size for p in tmp_path.iterdir())

    seq = {"s0": 0, "s1": 0}

    def fill(key: str) -> None:
        while sp.has_room():
            put(sp, seq[key], size, key)
            seq[key] += 1
            assert on_disk() <= cap + allowance

    fill("s0")
    sp.acknowledged("s0", seq["s0"] - 1)
    put(sp, seq["s0"], size, "s0")  # the stream goes on: its full segments are recycled
    seq["s0"] += 1
    fill("s1")
    assert on_disk() <= cap + allowance


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["put", "ack", "trim"]), st.integers(100, 3 * SEG)), max_size=60))
def test_the_file_sizes_the_spool_weighs_spares_by_are_the_files_sizes(tmp_path_factory: pytest.TempPathFactory,
                                                                       ops: list[tuple[str, int]]) -> None:
    """The spool keeps each segment file's size itself instead of asking the
    kernel each time it weighs its spares against the cap: through appends,
    segments written over longer spares (and cut back once full), a huge
    packet's file cut back when reused, and spares deleted, the size it keeps
    is the file's."""
    d = tmp_path_factory.mktemp("spool")
    now = [0.0]
    sp = Spool(str(d), 8 * SEG, segment_size=SEG, keep_free=1, trim_after=1.0, clock=lambda: now[0])
    seq = 0

    def check() -> None:
        segments = [seg for group in (sp._segments, sp._free) for segs in group.values() for seg in segs]
        assert {seg.path: seg.file_size for seg in segments} == {seg.path: os.fstat(seg.fd).st_size for seg in segments}

    for op, n in ops:
        if op == "put" and sp.has_room():
            put(sp, seq, n)
            seq += 1
        elif op == "ack" and seq:
            sp.acknowledged("s0", min(seq - 1, n % (seq + 1)))
        elif op == "trim":
            now[0] += n / 1000
            sp.trim()
        check()
    sp.close()
