"""Tests for overwrite rings and ``ringbuf.read_snapshot``: a producer and a
snapshot reader on one memfd in one process (and a producer thread for the
concurrent case), events written by hand, no daemons."""

from __future__ import annotations

import os
import signal
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracewire import ringbuf as rb
from tracewire.ringbuf import (
    PACKET_HEADER_SIZE,
    BufferSpec,
    ConsumerCursor,
    MemoryBarrier,
    Producer,
    create_buffer,
    read_snapshot,
)

S = 4096
N = 4
EVENT = 100  # bytes per event: 40 whole events per sub-buffer
PER_SB = (S - PACKET_HEADER_SIZE) // EVENT
START = 1_000_000
SEQ = struct.Struct("<Q")


class OverwriteRing:
    """A producer on a fresh ring; each event is its seq (8 bytes) repeated."""

    def __init__(self, overwrite: bool = True, subbuf: int = S, num: int = N) -> None:
        self.spec = BufferSpec(subbuf, num, overwrite)
        self.fd = create_buffer(self.spec, START)
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.p = Producer(self.fd, self.efd)
        self.c = ConsumerCursor(self.fd)  # only its mapping is used (it never consumes)
        self.seq = 0
        self.ts = START
        self.barrier = MemoryBarrier()  # a no-op on x86; one test forces membarrier(2)

    def emit(self, count: int) -> int:
        """Write ``count`` events; returns how many were dropped."""
        dropped = 0
        for _ in range(count):
            self.ts += 10
            off = self.p.reserve(EVENT, self.ts)
            if off < 0:
                dropped += 1
                self.seq += 1
                continue
            self.p.view[off : off + EVENT] = SEQ.pack(self.seq) * (EVENT // 8) + b"\0" * (EVENT % 8)
            self.p.commit(EVENT, self.ts)
            self.seq += 1
        return dropped

    def snapshot(self, max_bytes: int | None = None) -> rb.Snapshot:
        return read_snapshot(self.c.view, self.c.q, self.c.spec, self.barrier, max_bytes)

    def close(self) -> None:
        self.p.close()
        self.c.close()
        os.close(self.fd)
        os.close(self.efd)


def seqs_of(snap: rb.Snapshot) -> list[int]:
    """Every event's seq, in order, checking each event is whole."""
    out = []
    for pkt in snap.packets:
        assert len(pkt.data) % EVENT == 0
        for i in range(0, len(pkt.data), EVENT):
            ev = pkt.data[i : i + EVENT]
            (seq,) = SEQ.unpack_from(ev)
            assert ev == SEQ.pack(seq) * (EVENT // 8) + b"\0" * (EVENT % 8), "a torn event"
            out.append(seq)
    return out


def test_overwrite_ring_keeps_the_newest_events_and_never_drops() -> None:
    r = OverwriteRing()
    try:
        assert r.emit(10 * N * PER_SB + 7) == 0  # ten laps: nothing dropped
        snap = r.snapshot()
        seqs = seqs_of(snap)
        assert seqs == list(range(seqs[0], r.seq))  # contiguous, ending at the last event
        # The newest N sub-buffers: N-1 closed ones and the open one's 7 events.
        assert len(snap.packets) == N and len(seqs) == (N - 1) * PER_SB + 7
        assert [p.subbuf for p in snap.packets] == list(range(10 * N - N + 1, 10 * N + 1))
        assert snap.torn == 0 and snap.corrupt is None
        for a, b in zip(snap.packets, snap.packets[1:]):
            assert a.ts_end == b.ts_begin  # each close's time opens the next
        assert snap.packets[-1].ts_end == r.ts
    finally:
        r.close()


def test_discard_ring_in_a_snapshot_keeps_the_oldest_and_counts_drops() -> None:
    r = OverwriteRing(overwrite=False)
    try:
        dropped = r.emit(2 * N * PER_SB)
        assert dropped == N * PER_SB  # the ring filled up, and nothing consumes it
        snap = r.snapshot()
        seqs = seqs_of(snap)
        assert seqs == list(range(len(seqs)))  # the first events, in order
        assert snap.packets[-1].discarded == dropped > 0
    finally:
        r.close()


def test_a_snapshot_of_a_fresh_ring_is_empty_and_of_one_event_holds_it() -> None:
    r = OverwriteRing()
    try:
        assert r.snapshot().packets == []
        r.emit(1)
        snap = r.snapshot()
        assert seqs_of(snap) == [0] and snap.packets[0].subbuf == 0
        assert snap.packets[0].ts_begin == START
    finally:
        r.close()


def test_the_forced_barrier_path_reads_the_same_snapshot() -> None:
    """membarrier(2) as on weakly ordered CPUs (slow: no producer runs here)."""
    r = OverwriteRing()
    try:
        r.emit(3 * N * PER_SB + 5)
        plain = r.snapshot()
        r.barrier = MemoryBarrier(force=True)
        assert r.snapshot() == plain and len(plain.packets) == N
    finally:
        r.close()


def test_max_bytes_keeps_the_newest_whole_sub_buffers() -> None:
    r = OverwriteRing()
    try:
        r.emit(3 * N * PER_SB + 5)
        full = r.snapshot()
        snap = r.snapshot(max_bytes=2 * S)
        assert snap.packets == full.packets[-2:]  # 5 events + one whole sub-buffer fit in 2 * S
        assert sum(len(p.data) + PACKET_HEADER_SIZE for p in snap.packets) <= 2 * S
        assert snap.skipped >= 1
        assert seqs_of(snap)[-1] == r.seq - 1
    finally:
        r.close()


def test_an_app_that_exits_closes_its_sub_buffer_and_the_snapshot_keeps_it() -> None:
    r = OverwriteRing()
    try:
        r.emit(N * PER_SB + 3)
        r.p.close_current()  # what the tracer's hand_over does at exit
        seqs = seqs_of(r.snapshot())
        assert seqs[-1] == r.seq - 1 and seqs == list(range(seqs[0], r.seq))
    finally:
        r.close()


def test_a_sub_buffer_reopened_during_the_copy_is_left_out() -> None:
    """The producer laps the ring between the copy and the check (the barrier
    is where the test makes it write): the lapped copies are torn."""
    r = OverwriteRing()
    try:
        r.emit(2 * N * PER_SB)

        def lap() -> None:
            r.emit(2 * PER_SB)  # reopens the slots of sub-buffers 4 and 5

        calls = []

        def barrier() -> None:
            calls.append(1)
            if len(calls) == 2:  # after the copies, before the final check
                lap()

        snap = read_snapshot(r.c.view, r.c.q, r.c.spec, barrier)
        # The slots of 4 and 5 were reopened after their copies: left out.
        assert snap.torn == 2
        assert [p.subbuf for p in snap.packets] == [6, 7]
        seqs = seqs_of(snap)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    finally:
        r.close()


def test_snapshots_beside_a_producer_process_hold_only_whole_contiguous_events() -> None:
    """The producer is another process writing as fast as it can (as an app
    does); every snapshot holds whole events with contiguous seqs."""
    r = OverwriteRing(subbuf=64 * 1024, num=16)
    r.emit(1)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the producer
        try:
            os.close(ready_r)
            os.write(ready_w, b"1")
            while True:
                r.emit(1000)
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        kept = 0
        for _ in range(10):
            seqs = seqs_of(r.snapshot())  # whole events only
            if seqs:
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
                kept += 1
        assert kept > 0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        r.close()


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(words=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=64),
       where=st.lists(st.integers(0, 200), min_size=1, max_size=64))
def test_hostile_control_words_never_make_the_read_leave_the_ring(words: list[int], where: list[int]) -> None:
    r = OverwriteRing()
    try:
        r.emit(N * PER_SB + 3)
        limit = rb.Q_SLOTS + rb.SLOT_WORDS * N
        for w, i in zip(words, where):
            i = 2 + i % (limit - 2)  # never the magic/geometry words
            r.p.q[i] = w
        snap = r.snapshot(max_bytes=None)
        for pkt in snap.packets:
            assert len(pkt.data) <= S - PACKET_HEADER_SIZE
            assert pkt.ts_begin <= pkt.ts_end
        for a, b in zip(snap.packets, snap.packets[1:]):
            assert a.subbuf < b.subbuf and a.ts_end <= b.ts_begin and a.discarded <= b.discarded
    finally:
        r.close()
