"""Tests for tracewire.ringbuf: a Producer and a ConsumerCursor on one memfd in
one process, events written by hand, no daemons."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import random
import select
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracewire import ringbuf as rb
from tracewire.ringbuf import (
    PACKET_HEADER_SIZE,
    BufferSpec,
    Chunk,
    ConsumerCursor,
    FlushLimit,
    MemoryBarrier,
    Producer,
    RingBufferCorrupt,
    create_buffer,
)

from fuzzing import examples

S = 4096
N = 4
USABLE = S - PACKET_HEADER_SIZE  # 4012
START_TS = 1_000_000
U64 = struct.Struct("=Q")  # control words are native 64-bit words

# Control-page offsets (documented in the ringbuf module docstring).
OFF_HEAD, OFF_TS, OFF_DISCARDED = 8 * rb.Q_HEAD, 8 * rb.Q_TS, 8 * rb.Q_DISCARDED
SLOT_BYTES = 8 * rb.SLOT_WORDS
SLOT_TS, SLOT_DISCARDED, SLOT_END = 8 * rb.SLOT_TS, 8 * rb.SLOT_DISCARDED, 8 * rb.SLOT_END


def slot_off(k: int, field: int) -> int:
    """Byte offset of ``field`` (SLOT_TS, SLOT_DISCARDED, SLOT_END) of slot k."""
    return rb.OFF_SLOTS + SLOT_BYTES * k + field


def flush_limit(c: ConsumerCursor) -> FlushLimit:
    """The flush limit as consumerd takes it (nothing writes concurrently in
    the tests that use this, so a consistent one comes at once)."""
    for _ in range(1000):
        limit = c.flush_limit(MemoryBarrier())
        if limit is not None:
            return limit
    raise AssertionError("flush_limit() never caught a consistent (head, ts, discarded)")


def empty_chunk(c: ConsumerCursor, limit: FlushLimit | None = None) -> Chunk:
    """``c.empty_chunk`` with the ts of ``limit`` (a fresh flush limit if None)."""
    return c.empty_chunk((limit or flush_limit(c)).ts)


class Ring:
    """A producer and a consumer on one fresh buffer, plus a byte log of what
    was written so that chunks can be checked byte for byte."""

    def __init__(self, subbuf: int = S, num: int = N, start_ts: int = START_TS,
                 block_timeout: float | None = 0.0) -> None:
        """A discard-mode ring, or (``block_timeout`` not 0) a blocking
        channel's, with its space pipe (``space_r``: the producer's end)."""
        self.spec = BufferSpec(subbuf, num)
        self.fd = create_buffer(self.spec, start_ts)
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.space_r = space_w = -1
        if block_timeout != 0:
            self.space_r, space_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.p = Producer(self.fd, self.efd, space_fd=self.space_r, block_timeout=block_timeout)
        self.c = ConsumerCursor(self.fd, space_fd=space_w)
        self.ts = start_ts
        self.seq = 0

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.p.close()
        self.c.close()  # closes the space pipe's write end
        os.close(self.fd)
        os.close(self.efd)
        if self.space_r >= 0:
            os.close(self.space_r)

    def event_bytes(self, n: int) -> bytes:
        """n bytes that identify this event (its sequence number, repeated)."""
        tag = self.seq.to_bytes(4, "little")
        return (tag * (n // 4 + 1))[:n]

    def write(self, n: int, ts: int | None = None) -> bytes | None:
        """Write one n-byte event at ``ts`` (default: 1 ns after the last
        event or drop), as the tracer does; returns its bytes, or None when
        dropped."""
        self.ts = self.ts + 1 if ts is None else ts
        off = self.p.reserve(n, self.ts)
        if off < 0:
            return None
        data = self.event_bytes(n)
        self.p.view[off : off + n] = data
        self.p.commit(n, self.ts)
        self.seq += 1
        return data

    def announce(self) -> int:
        try:
            n = os.eventfd_read(self.efd)
        except BlockingIOError:
            return 0
        self.c.announce(n)
        return n

    def take(self, flush: bool = False) -> list[tuple[bytes, int, int, int]]:
        """Every chunk available now, as consumerd's drain takes them (on a
        flush, an empty chunk for discards no event chunk carries), copied,
        each released after reading: (data, ts_begin, ts_end, discarded)."""
        self.announce()
        limit = flush_limit(self.c) if flush else None
        out = []
        while (ch := self.c.next_chunk(limit)) is not None:
            out.append((bytes(ch.data), ch.ts_begin, ch.ts_end, ch.events_discarded))
            self.c.release()
        if limit is not None and self.c.discarded_pending() > 0:
            ch = self.c.empty_chunk(limit.ts)
            out.append((bytes(ch.data), ch.ts_begin, ch.ts_end, ch.events_discarded))
            self.c.release()
        return out


@pytest.fixture
def ring():
    r = Ring()
    yield r
    r.close()


def test_chunks_hold_exactly_the_bytes_written_in_order(ring: Ring) -> None:
    events = []
    log = []
    for i in range(300):
        d = ring.write(10 + i % 50)
        assert d is not None
        events.append(d)
        log += ring.take()
    log += ring.take(flush=True)
    assert len(log) > 1
    assert b"".join(c[0] for c in log) == b"".join(events)


def test_subbuffer_capacity_and_no_straddling(ring: Ring) -> None:
    rng = random.Random(7)
    sizes = [rng.randrange(1, 400) for _ in range(2000)]
    events = []
    chunks = []
    for n in sizes:
        d = ring.write(n)
        while d is None:  # ring full: consume, then retry
            chunks += ring.take()
            d = ring.write(n)
        events.append(d)
    chunks += ring.take(flush=True)
    # Every chunk is at most S-84 bytes and a concatenation of whole events.
    boundaries = set()
    pos = 0
    for e in events:
        pos += len(e)
        boundaries.add(pos)
    pos = 0
    for data, *_ in chunks:
        assert 0 < len(data) <= USABLE
        pos += len(data)
        assert pos in boundaries, "a chunk ends in the middle of an event"
    assert b"".join(c[0] for c in chunks) == b"".join(events)


def test_event_of_exactly_usable_size_fits_and_one_more_is_dropped(ring: Ring) -> None:
    assert ring.write(USABLE) is not None
    assert ring.write(USABLE + 1) is None
    assert ring.p.discarded == 1
    assert ring.write(USABLE) is not None  # closes the first, fills the second
    chunks = ring.take(flush=True)
    # The stream's first packet would report a discard: an empty one with 0 comes first.
    assert [(len(c[0]), c[3]) for c in chunks] == [(0, 0), (USABLE, 1), (USABLE, 1)]


def test_closed_but_unannounced_subbuffer_is_not_returned(ring: Ring) -> None:
    ring.write(3000)
    ring.write(3000)  # does not fit: closes sub-buffer 0 and signals the eventfd
    # Nothing announced yet: without a flush limit the cursor returns nothing.
    assert ring.c.next_chunk() is None
    assert ring.announce() == 1
    ch = ring.c.next_chunk()
    assert ch is not None and len(ch.data) == 3000
    ring.c.release()
    # The second sub-buffer is open: only a flush takes it.
    assert ring.c.next_chunk() is None


def test_flush_takes_open_subbuffer_up_to_head(ring: Ring) -> None:
    a = ring.write(100)
    b = ring.write(200)
    assert ring.c.next_chunk() is None
    limit = flush_limit(ring.c)
    assert limit == (300, ring.ts, 0)
    ch = ring.c.next_chunk(limit)
    assert ch is not None
    assert bytes(ch.data) == a + b
    assert ch.ts_end == ring.ts
    ring.c.release()
    assert ring.c.next_chunk(flush_limit(ring.c)) is None


def test_flush_limit_is_a_snapshot_of_head(ring: Ring) -> None:
    a = ring.write(100)
    limit = flush_limit(ring.c)
    ring.write(50)  # after the snapshot: not part of this flush
    ch = ring.c.next_chunk(limit)
    assert ch is not None and bytes(ch.data) == a
    ring.c.release()
    assert ring.c.next_chunk(limit) is None


def test_partially_flushed_subbuffer_later_closed_yields_the_rest(ring: Ring) -> None:
    a = ring.write(1000)
    first = ring.take(flush=True)
    assert [c[0] for c in first] == [a]
    b = ring.write(1000)
    c = ring.write(1000)
    ring.write(3000)  # closes sub-buffer 0 (a, b, c)
    rest = ring.take()
    assert [x[0] for x in rest] == [b + c]
    assert rest[0][1] == first[0][2]  # ts chain across the partial flush


def test_flush_racing_with_a_close_delivers_the_rest(ring: Ring) -> None:
    """Regression (dee6a74): the flush read head, then the barrier, then ts;
    an event committed in between gave the packet a later ts_end than the
    events that followed in the same sub-buffer: the next packet began after
    its first event (compact timestamps decoded 2**27 ns late) or the
    sub-buffer's slot looked stale and the stream stalled for good."""
    a = ring.write(100)
    limit = flush_limit(ring.c)  # the flush's snapshot...
    b = ring.write(100)  # ...the app goes on: b lands after that head...
    ring.write(USABLE)  # ...and the next event closes sub-buffer 0
    ch = ring.c.next_chunk(limit)
    assert ch is not None and bytes(ch.data) == a
    first_end = ch.ts_end
    del ch
    ring.c.release()
    rest = ring.take()  # sub-buffer 0 was announced: the rest comes out
    assert [x[0] for x in rest] == [b]
    assert first_end <= rest[0][2]
    # The packet holding b must not begin after b was emitted (START_TS + 2).
    assert rest[0][1] <= START_TS + 2


def test_wrap_around_many_laps_contents_checked() -> None:
    r = Ring(S, 4)
    rng = random.Random(1)
    try:
        expected = bytearray()
        got = bytearray()
        nchunks = 0
        drops = 0
        while r.p.sb_index < 1000:
            n = rng.randrange(1, 600)
            d = r.write(n)
            if d is None:
                drops += 1
                for ch in r.take():
                    got += ch[0]
                    nchunks += 1
                d = r.write(n)
                assert d is not None, "consumer released everything; the event must fit"
            expected += d
        for ch in r.take(flush=True):
            got += ch[0]
            nchunks += 1
        assert nchunks >= 1000
        assert got == expected
        assert r.p.discarded == drops
    finally:
        r.close()


def test_discard_mode_counts_exactly(ring: Ring) -> None:
    # Fill all N sub-buffers without consuming.
    for _ in range(N):
        assert ring.write(USABLE) is not None
    # Sub-buffer N would reuse slot 0, which was never released.
    for k in range(1, 51):
        assert ring.p.reserve(100) == -1
        assert ring.p.discarded == k
    assert U64.unpack_from(ring.p.mm, OFF_DISCARDED)[0] == 50
    chunks = ring.take(flush=True)
    assert len(chunks) == N
    # The free-running counter as it was at each packet's end: the first N-1
    # closed before any drop; the last (flushed, open) saw all 50.
    assert [c[3] for c in chunks] == [0] * (N - 1) + [50]
    assert ring.c.discarded_pending() == 0
    # Space released: the producer writes again.
    assert ring.write(100) is not None


def test_drops_resume_once_consumer_releases(ring: Ring) -> None:
    for _ in range(N):
        ring.write(USABLE)
    assert ring.write(10) is None
    ring.announce()
    ch = ring.c.next_chunk()
    assert ch is not None
    ring.c.release()
    assert ring.write(10) is not None
    assert ring.p.discarded == 1


def test_empty_chunk_carries_pending_discarded(ring: Ring) -> None:
    ring.write(100)
    ring.take(flush=True)
    assert ring.c.discarded_pending() == 0
    ring.p.drop(3)
    limit = flush_limit(ring.c)
    assert limit.discarded == 3
    assert ring.c.discarded_pending() == 3
    assert ring.c.next_chunk(limit) is None
    ch = empty_chunk(ring.c, limit)
    assert len(ch.data) == 0
    assert ch.events_discarded == 3
    assert ch.ts_begin <= ch.ts_end
    ring.c.release()
    assert ring.c.discarded_pending() == 0
    # The stream carries on normally afterwards.
    d = ring.write(50)
    assert [c[0] for c in ring.take(flush=True)] == [d]


# ------------------------------------------------------------------ per-packet discarded snapshot


def test_each_packet_carries_the_total_at_its_close_not_at_its_reading(ring: Ring) -> None:
    """The count a closed sub-buffer reports is the producer's snapshot at
    the close, however late the consumer reads it: drops made after the close
    go to the next packet (babeltrace2 places them between the two ends)."""
    ring.write(3000)
    for _ in range(2):
        assert ring.write(USABLE + 1) is None  # can never fit: dropped, counted
    ring.write(3000)  # closes sub-buffer 0 with 2 discarded
    ring.write(USABLE + 1)
    ring.write(3000)  # closes sub-buffer 1 with 3 discarded
    for _ in range(4):
        ring.write(USABLE + 1)  # 7 so far: after both closes, before any read
    chunks = ring.take()
    assert [(len(c[0]), c[3]) for c in chunks] == [(0, 0), (3000, 2), (3000, 3)]
    rest = ring.take(flush=True)
    assert [(len(c[0]), c[3]) for c in rest] == [(3000, 7)]
    assert ring.p.discarded == 7


def test_close_time_covers_the_drops_before_it(ring: Ring) -> None:
    """A sub-buffer ends at the time of its switch: after every event it
    holds and every drop its count includes, and not after the next event."""
    ring.write(USABLE, ts=START_TS + 10)
    assert ring.write(USABLE + 1, ts=START_TS + 20) is None
    ring.write(100, ts=START_TS + 30)  # switches: sub-buffer 0 ends at 30
    (lead, first) = ring.take()
    assert (lead[0], lead[1], lead[2], lead[3]) == (b"", START_TS, START_TS, 0)
    assert (first[1], first[2], first[3]) == (START_TS, START_TS + 30, 1)
    (second,) = ring.take(flush=True)
    assert (second[1], second[2], second[3]) == (START_TS + 30, START_TS + 30, 1)


def test_flush_counts_drops_up_to_its_timestamp(ring: Ring) -> None:
    """A flushed (open) sub-buffer reports the drops up to the flush, and its
    end time is at or after them (a drop publishes its time before its count)."""
    ring.write(100, ts=START_TS + 10)
    ring.take(flush=True)
    ring.write(100, ts=START_TS + 20)
    assert ring.write(USABLE + 1, ts=START_TS + 25) is None
    limit = flush_limit(ring.c)
    assert limit == (200, START_TS + 25, 1)
    (chunk,) = ring.take(flush=True)
    assert chunk[2:] == (START_TS + 25, 1)
    ring.write(100, ts=START_TS + 30)  # later than the drop: a valid next packet
    (nxt,) = ring.take(flush=True)
    assert nxt[1:] == (START_TS + 25, START_TS + 30, 1)


def test_stream_with_only_drops_begins_with_a_zero_packet(ring: Ring) -> None:
    """No event, only drops: the flush writes an empty packet with 0, then
    an empty packet with the count, so that babeltrace2 counts them."""
    ring.p.drop(5)
    chunks = ring.take(flush=True)
    assert [(c[0], c[3]) for c in chunks] == [(b"", 0), (b"", 5)]
    assert ring.take(flush=True) == []  # nothing more to say
    ring.p.drop(2)
    assert [(c[0], c[3]) for c in ring.take(flush=True)] == [(b"", 7)]  # no second zero packet


def test_no_zero_packet_when_the_first_packet_reports_none(ring: Ring) -> None:
    ring.write(100)
    assert [(len(c[0]), c[3]) for c in ring.take(flush=True)] == [(100, 0)]
    ring.p.drop(1)
    ring.write(USABLE)  # closes sub-buffer 0 (read already) with 1
    assert [(len(c[0]), c[3]) for c in ring.take(flush=True)] == [(USABLE, 1)]


def test_restarted_consumer_does_not_begin_the_stream_again(ring: Ring) -> None:
    """A second cursor (consumerd restarted) after packets were released
    writes no zero packet, and keeps the count where the trace has it."""
    ring.write(100)
    ring.take(flush=True)
    ring.p.drop(3)
    ring.write(100)
    c2 = ConsumerCursor(ring.fd)
    try:
        c2.last_discarded = 0  # as read back from the stream file
        ch = c2.next_chunk(flush_limit(c2))
        assert ch is not None and len(ch.data) == 100 and ch.events_discarded == 3
        del ch
    finally:
        c2.close()


def _closed_subbuffer_ring(snapshot: int, counter: int) -> Ring:
    """A ring whose sub-buffer 1 closed (announced) with ``snapshot`` while
    the live counter says ``counter``; sub-buffer 0 (count 1) already read."""
    r = Ring()
    r.write(100)
    r.p.drop(1)
    r.write(USABLE)  # closes sub-buffer 0 with 1
    r.take()
    r.write(USABLE)  # closes sub-buffer 1
    _poke(r.p.mm, slot_off(1, SLOT_DISCARDED), snapshot)
    _poke(r.p.mm, OFF_DISCARDED, counter)
    r.announce()
    return r


@pytest.mark.parametrize("snapshot,counter,ok", [
    (1, 1, True),
    (4, 9, True),
    (0, 1, False),  # a snapshot below the previous one: went backwards
    (10, 9, False),  # more than the producer's own counter
    (2**64 - 1, 2**64 - 1, True),  # consistent, if absurd: the counter says so too
    (2**64 - 1, 9, False),
])
def test_hostile_snapshot_is_corrupt(snapshot: int, counter: int, ok: bool) -> None:
    r = _closed_subbuffer_ring(snapshot, counter)
    try:
        if ok:
            ch = r.c.next_chunk()
            assert ch is not None and ch.events_discarded == snapshot
            del ch
        else:
            with pytest.raises(RingBufferCorrupt, match="discarded"):
                r.c.next_chunk()
    finally:
        r.close()


def test_snapshot_of_a_subbuffer_flushed_whole_is_never_checked_against_the_flush(ring: Ring) -> None:
    """A flush can read the counter after a close it does not see yet (the
    event after the switch failed and was dropped): that sub-buffer was
    taken whole by the flush, so its lower snapshot is never reported."""
    ring.write(USABLE - 100)
    assert ring.p.reserve(200, ring.ts + 1) >= 0  # the switch, for an event...
    ring.p.drop(1)  # ...that then fails (the tracer counts it)
    limit = flush_limit(ring.c)  # the eventfd not read yet
    got = []
    while (ch := ring.c.next_chunk(limit)) is not None:
        got.append((len(ch.data), ch.events_discarded))
        ring.c.release()
    assert got == [(0, 0), (USABLE - 100, 1)]
    assert ring.announce() == 1
    assert ring.c.next_chunk() is None  # sub-buffer 0, already read: released, snapshot 0 unused
    assert ring.write(100) is not None
    assert [(len(c[0]), c[3]) for c in ring.take(flush=True)] == [(100, 1)]


def test_timestamps_chain(ring: Ring) -> None:
    rng = random.Random(3)
    chunks = []
    for i in range(3000):
        ts = ring.ts + rng.randrange(0, 1000)
        if ring.write(rng.randrange(8, 300), ts=ts) is None:
            chunks += ring.take()
            assert ring.write(8, ts=ts) is not None
        if i % 500 == 0:
            chunks += ring.take(flush=True)
    chunks += ring.take(flush=True)
    assert chunks[0][1] == START_TS
    for prev, cur in itertools.pairwise(chunks):
        assert cur[1] == prev[2]
        assert cur[1] <= cur[2]
    assert chunks[-1][2] == ring.ts


def test_consumer_reopened_resumes_where_released(ring: Ring) -> None:
    a = ring.write(500)
    ring.take(flush=True)
    b = ring.write(700)
    c2 = ConsumerCursor(ring.fd)
    try:
        ch = c2.next_chunk(flush_limit(c2))
        assert ch is not None and bytes(ch.data) == b
        assert a != b
        del ch
    finally:
        c2.close()


# ------------------------------------------------------------------ hostile producer


def _poke(mm, off: int, value: int) -> None:
    U64.pack_into(mm, off, value & 0xFFFFFFFFFFFFFFFF)


def _exercise_cursor(c: ConsumerCursor, rounds: int = 4) -> None:
    """Drive the cursor as consumerd does; only RingBufferCorrupt may escape,
    and whatever the producer wrote, the counts the chunks carry (what the
    trace will say) never go back."""
    counts = [c.last_discarded]

    def check(ch: Chunk) -> None:
        assert 0 <= len(ch.data) <= c.spec.usable
        assert ch.ts_begin <= ch.ts_end
        assert ch.events_discarded >= counts[-1]
        counts.append(ch.events_discarded)
        c.release()

    for _ in range(rounds):
        c.announce(1)
        for limit in (None, flush_limit(c)):
            for _ in range(3 * c.spec.num_subbuf + 1):
                ch = c.next_chunk(limit)
                if ch is None:
                    break
                check(ch)
            if limit is not None and c.discarded_pending() > 0:
                ch = empty_chunk(c, limit)
                assert len(ch.data) == 0
                check(ch)


u64 = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 2**64 - 1, 2**63, S - 84, S - 83, S, 2 * S, 5 * S, 100 * S]),
    st.integers(0, 12 * S),
)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pre=st.integers(0, 6),
    writes=st.lists(st.tuples(st.sampled_from([OFF_HEAD, OFF_TS, OFF_DISCARDED, 8 * rb.Q_WAITING] + [
        slot_off(k, f) for k in range(N) for f in (SLOT_END, SLOT_TS, SLOT_DISCARDED)]), u64), max_size=12),
    blocking=st.booleans(),
)
def test_hostile_control_page_only_raises_ringbuffercorrupt(pre: int, writes, blocking: bool) -> None:
    # A blocking stream's cursor also reads the waiting word (announce, publish).
    with Ring(block_timeout=None if blocking else 0.0) as r:
        # Some honest traffic first, so that the cursor has state.
        for _ in range(pre):
            r.write(1500)
        r.take()
        for off, v in writes:
            _poke(r.p.mm, off, v)
        try:
            _exercise_cursor(r.c)
        except RingBufferCorrupt:
            pass


def test_discarded_going_backwards_is_corrupt(ring: Ring) -> None:
    ring.p.drop(10)
    ring.write(100)
    ring.take(flush=True)
    _poke(ring.p.mm, OFF_DISCARDED, 5)
    ring.write(100)
    with pytest.raises(RingBufferCorrupt, match="discarded"):
        ring.take(flush=True)


def test_head_far_ahead_is_corrupt(ring: Ring) -> None:
    ring.write(100)
    _poke(ring.p.mm, OFF_HEAD, 50 * S)
    with pytest.raises(RingBufferCorrupt):
        ring.take(flush=True)


def test_head_behind_consumed_is_corrupt(ring: Ring) -> None:
    for _ in range(6):
        while ring.write(2000) is None:
            ring.take()
    ring.take(flush=True)
    _poke(ring.p.mm, OFF_HEAD, 0)
    with pytest.raises(RingBufferCorrupt):
        ring.take(flush=True)


def test_slot_closed_past_end_is_corrupt(ring: Ring) -> None:
    ring.write(100)
    _poke(ring.p.mm, slot_off(0, SLOT_TS), START_TS + 5)
    _poke(ring.p.mm, slot_off(0, SLOT_END), S - 10)  # slot 0 "closed" inside the reserved tail
    ring.c.announce(1)
    with pytest.raises(RingBufferCorrupt):
        ring.c.next_chunk()


def test_slot_timestamp_going_backwards_never_yields_a_chunk(ring: Ring) -> None:
    ring.write(100)
    ring.take(flush=True)  # the cursor's last timestamp is now START_TS + 1
    ring.write(USABLE - 100)
    ring.write(USABLE)  # closes sub-buffer 0
    _poke(ring.p.mm, slot_off(0, SLOT_TS), START_TS - 1)
    ring.announce()
    try:
        ch = ring.c.next_chunk()
    except RingBufferCorrupt:
        return
    assert ch is None or ch.ts_begin <= ch.ts_end


def _drain_as_consumerd(r: Ring, flush: bool = True) -> list[tuple[bytes, int]]:
    """One drain as consumerd does it (a flush gives up when the producer
    is too busy for a consistent limit); returns (data, discarded) of the
    chunks written."""
    r.announce()
    limit = r.c.flush_limit(MemoryBarrier()) if flush else None
    out = []
    while (ch := r.c.next_chunk(limit)) is not None:
        out.append((bytes(ch.data), ch.events_discarded))
        r.c.release()
    if limit is not None and r.c.discarded_pending() > 0:
        out.append((b"", r.c.empty_chunk(limit.ts).events_discarded))
        r.c.release()
    return out


def test_concurrent_producer_never_looks_corrupt() -> None:
    """A producer process dropping events while this process drains: the
    cursor must never report a corruption that did not happen, and once the
    producer is done the last count is exactly what it dropped.

    Regression: control words written with struct.pack_into were zeroed
    (s_pack_internal's memset) before being written, so a concurrent reader
    saw ``discarded`` go back to 0 and consumerd abandoned the stream."""
    drops = 200_000
    r = Ring()
    pid = os.fork()
    if pid == 0:  # the producer: drop (and count) a fixed number of events
        try:
            for _ in range(drops):
                r.p.drop()
        finally:
            os._exit(0)
    try:
        counts = [0]
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            counts += [d for _, d in _drain_as_consumerd(r)]
        counts += [d for _, d in _drain_as_consumerd(r)]  # the producer has exited: settled
        assert counts == sorted(counts)
        assert counts[-1] == r.c.last_discarded == drops
    finally:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        r.close()


# ------------------------------------------------------------------ geometry, barrier


@pytest.mark.parametrize(
    "size,num",
    [(3, 4), (5000, 4), (2048, 4), (4095, 4), (0, 4), (-4096, 4), (128 * 1024 * 1024, 4),
     (4096, 1), (4096, 0), (4096, 1025), (4096 * 3, 4)],
)
def test_bufferspec_rejects_bad_geometry(size: int, num: int) -> None:
    with pytest.raises(ValueError):
        BufferSpec(size, num)


@pytest.mark.parametrize("size,num", [(4096, 2), (256 * 1024, 4), (64 * 1024 * 1024, 1024)])
def test_bufferspec_accepts_good_geometry(size: int, num: int) -> None:
    spec = BufferSpec(size, num)
    assert spec.usable == size - 84
    assert spec.total_size == spec.ctrl_size + size * num
    assert spec.ctrl_size % 4096 == 0


def test_cursor_rejects_mismatched_geometry(ring: Ring) -> None:
    with pytest.raises(RingBufferCorrupt):
        ConsumerCursor(ring.fd, BufferSpec(S, N * 2))


def test_memory_barrier_forced_runs() -> None:
    b = MemoryBarrier(force=True)
    assert b.needed
    b()
    MemoryBarrier()()


def _parse_events(data: bytes) -> list[int]:
    """Split the self-describing events of the concurrent test; check each."""
    seqs = []
    pos = 0
    while pos < len(data):
        seq, n = struct.unpack_from("<II", data, pos)
        assert 8 <= n <= 600, f"bad event length {n} at {pos}"
        body = data[pos + 8 : pos + n]
        assert body == bytes([seq & 0xFF]) * (n - 8), f"event {seq} corrupted"
        seqs.append(seq)
        pos += n
    assert pos == len(data)
    return seqs


def _produce_until_accepted(r: Ring, wfd: int, accepted: int, deadline_s: float = 120.0) -> None:
    """The producer process: self-describing events of random sizes, as fast
    as it can, until ``accepted`` of them found room (whatever the consumer's
    speed); then the number attempted goes to ``wfd``."""
    rng = random.Random(5)
    written = ok = 0
    deadline = time.monotonic() + deadline_s
    while ok < accepted:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {ok} events found room in {deadline_s:.0f} s")
        n = rng.randrange(8, 600)
        ts = time.monotonic_ns()
        off = r.p.reserve(n, ts)
        if off >= 0:
            r.p.view[off : off + n] = struct.pack("<II", written, n) + bytes([written & 0xFF]) * (n - 8)
            r.p.commit(n, ts)
            ok += 1
        written += 1
    os.write(wfd, str(written).encode())


def test_concurrent_producer_and_flushing_consumer_lose_nothing_unreported() -> None:
    """A producer process writes as fast as it can while this process drains
    and flushes (as the switch timer does): every event read is intact, in
    order, the counts never go back, and read + discarded == written."""
    r = Ring(S, 4, start_ts=time.monotonic_ns())
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rfd)
            _produce_until_accepted(r, wfd, accepted=3000)
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        got: list[tuple[bytes, int]] = []
        i = 0
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            got += _drain_as_consumerd(r, flush=i % 7 == 0)
            i += 1
        got += _drain_as_consumerd(r)  # the producer has exited: settled
        written = int(os.read(rfd, 64) or b"-1")
        assert written > 0, "the producer did not finish"
        seqs = _parse_events(b"".join(d for d, _ in got))
        counts = [disc for _, disc in got]
        assert counts == sorted(counts)
        assert seqs == sorted(set(seqs))
        assert len(seqs) + counts[-1] == written
        assert len(seqs) == 3000
    finally:
        os.close(rfd)
        r.close()


# -- blocking channels (--blocking-timeout) ------------------------------------------------
OFF_WAITING = 8 * rb.Q_WAITING
JOIN_S = 60  # a guard against a hung test, never a timing assert


class SpyPoll:
    """The producer's poller, counting the waits (a spin would count many)
    and saying when the producer is about to sleep."""

    def __init__(self, fd: int) -> None:
        self.real = select.poll()
        self.real.register(fd, select.POLLIN)
        self.calls = 0
        self.entered = threading.Event()

    def poll(self, timeout_ms: float) -> list[tuple[int, int]]:
        self.calls += 1
        self.entered.set()
        return self.real.poll(timeout_ms)


def _full(r: Ring) -> None:
    """Fill every sub-buffer: the next sub-buffer needs a release."""
    for _ in range(N):
        assert r.write(USABLE) is not None


def _write_in_thread(r: Ring, n: int) -> tuple[threading.Thread, list[bytes | None]]:
    out: list[bytes | None] = []
    t = threading.Thread(target=lambda: out.append(r.write(n)), daemon=True)
    t.start()
    return t, out


def test_blocked_producer_proceeds_when_the_consumer_releases(monkeypatch: pytest.MonkeyPatch) -> None:
    # No periodic re-check to fall back on: only the consumer's wake-up can
    # end this wait.
    monkeypatch.setattr(rb, "RECHECK_S", 3600.0)
    with Ring(block_timeout=None) as r:
        spy = r.p._poll = SpyPoll(r.space_r)
        _full(r)
        t, out = _write_in_thread(r, 100)
        assert spy.entered.wait(JOIN_S), "the producer never waited"
        assert U64.unpack_from(r.c.mm, OFF_WAITING)[0] == S  # it waits for sub-buffer 0's release
        r.announce()
        assert r.c.next_chunk() is not None
        r.c.release()  # publishes consumed, and wakes the producer
        t.join(JOIN_S)
        assert not t.is_alive(), "the release did not wake the producer"
        assert out[0] is not None
        assert spy.calls == 1  # slept once, woken once: no spinning
        assert r.p.discarded == 0
        assert U64.unpack_from(r.c.mm, OFF_WAITING)[0] == 0
        got = r.take(flush=True)
        assert [len(d) for d, *_ in got] == [USABLE] * (N - 1) + [100]
        assert got[-1][3] == 0


def test_finite_timeout_without_consumer_drops_and_counts() -> None:
    with Ring(block_timeout=0.01) as r:
        _full(r)
        assert r.write(100) is None
        assert r.write(100) is None
        assert r.p.discarded == 2
        assert U64.unpack_from(r.c.mm, OFF_DISCARDED)[0] == 2
        assert U64.unpack_from(r.c.mm, OFF_WAITING)[0] == 0  # nobody waits any more
        got = r.take(flush=True)
        assert got[-1][3] == 2  # the trace reports both
        assert r.write(100) is not None  # room again: written, no wait needed


@pytest.mark.parametrize("blocking", [False, True])
def test_non_blocking_channel_never_waits(blocking: bool) -> None:
    # A producer without a space pipe, or with one and a timeout of 0.
    r = Ring()
    rd, wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if blocking:
            r.p.close()
            r.p = Producer(r.fd, r.efd, space_fd=rd, block_timeout=0)
        _full(r)
        for k in range(1, 4):
            assert r.write(100) is None
            assert r.p.discarded == k
        assert r.p._poll is None  # never polled
        assert U64.unpack_from(r.c.mm, OFF_WAITING)[0] == 0
    finally:
        r.close()
        os.close(rd)
        os.close(wr)


def test_waiting_producer_nudges_a_restarted_consumer() -> None:
    """consumerd died after reading the eventfd (the announcements of the
    closed sub-buffers went with it): its successor learns of them from the
    producer, which writes the eventfd when a re-check finds no room, and
    from the waiting word, which says how many it closed."""
    with Ring(block_timeout=None) as r:
        _full(r)
        assert r.announce() == N - 1  # the consumer that dies took these
        space_w = r.c.space_fd
        r.c.space_fd = -1
        r.c.close()
        r.c = ConsumerCursor(r.fd, space_fd=space_w)  # the restarted one
        t, out = _write_in_thread(r, 100)
        ready, _, _ = select.select([r.efd], [], [], JOIN_S)  # the producer's nudge
        assert ready, "the waiting producer never nudged the consumer"
        r.announce()
        assert r.c.announced == N - 1  # the closes, not the nudges
        assert r.c.next_chunk() is not None
        r.c.release()
        t.join(JOIN_S)
        assert not t.is_alive() and out[0] is not None
        assert r.p.discarded == 0


def test_cancel_wait_ends_a_wait_for_ever() -> None:
    with Ring(block_timeout=None) as r:
        spy = r.p._poll = SpyPoll(r.space_r)
        _full(r)
        t, out = _write_in_thread(r, 100)
        assert spy.entered.wait(JOIN_S)
        r.p.cancel_wait()  # the stream is being closed (from another thread, no lock)
        t.join(JOIN_S)
        assert not t.is_alive()
        assert out == [None] and r.p.discarded == 1
        assert r.write(100) is None  # cancelled for good: drops at once
        assert r.p.discarded == 2


def test_wait_ends_when_nobody_holds_the_ring_any_more() -> None:
    # Every write end closed (the session destroyed, its consumer gone):
    # the pipe's end of file ends an endless wait; discard mode from then on.
    with Ring(block_timeout=None) as r:
        _full(r)
        os.close(r.c.space_fd)
        r.c.space_fd = -1
        assert r.write(100) is None
        assert r.p.block_timeout == 0
        assert r.write(100) is None
        assert r.p.discarded == 2


@pytest.mark.parametrize("waiting,wakes", [(0, 0), (1, 3), (S, 3), (2 * S, 2), (2**64 - 1, 0)])
def test_hostile_waiting_word_costs_one_byte_per_release_at_most(waiting: int, wakes: int) -> None:
    with Ring(block_timeout=None) as r:
        _poke(r.p.mm, OFF_WAITING, waiting)  # the app may write anything there
        for k in (1, 2, 3):
            r.c.publish(k * S, START_TS + k)
        r.c.publish(2 * S, START_TS)  # not forward: no release, no wake-up
        pending = b""
        with contextlib.suppress(BlockingIOError):
            pending = os.read(r.space_r, 4096)
        assert len(pending) == wakes


def test_consumer_never_blocks_on_a_full_space_pipe() -> None:
    with Ring(block_timeout=None) as r:
        _poke(r.p.mm, OFF_WAITING, 1)
        size = fcntl.fcntl(r.c.space_fd, fcntl.F_SETPIPE_SZ, 4096)
        for k in range(1, size + 100):  # more releases than the pipe holds bytes
            r.c.publish(k, START_TS)
        assert len(os.read(r.space_r, 2 * size)) == size


def test_producer_waits_across_processes_and_loses_nothing() -> None:
    """A producer process on a blocking channel (for ever) with a ring of
    two sub-buffers, this process draining: every event arrives, none is
    discarded."""
    r = Ring(S, 2, start_ts=time.monotonic_ns(), block_timeout=None)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            rng = random.Random(7)
            for seq in range(3000):
                n = rng.randrange(8, 600)
                ts = time.monotonic_ns()
                off = r.p.reserve(n, ts)
                if off < 0:
                    raise SystemExit(f"event {seq} dropped")
                r.p.view[off : off + n] = struct.pack("<II", seq, n) + bytes([seq & 0xFF]) * (n - 8)
                r.p.commit(n, ts)
            code = 0
        finally:
            os._exit(code)
    try:
        got: list[tuple[bytes, int]] = []
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            got += _drain_as_consumerd(r, flush=False)
            select.select([r.efd], [], [], 0.05)  # as consumerd: wait for the eventfd
        got += _drain_as_consumerd(r)
        seqs = _parse_events(b"".join(d for d, _ in got))
        assert seqs == list(range(3000))
        assert [disc for _, disc in got][-1] == 0
    finally:
        r.close()


@pytest.mark.parametrize("num", [2, 4, 125, 126, 1024])
def test_events_word_is_the_control_areas_last_and_counts_commits(num: int) -> None:
    """``commit`` counts each event in the ``events`` word, which is the
    control area's last word (past every slot, whatever the geometry); a
    dropped event is not counted."""
    spec = BufferSpec(S, num)
    assert rb.OFF_SLOTS + SLOT_BYTES * num <= 8 * spec.q_events < spec.ctrl_size
    with Ring(num=2) as r:
        written = sum(r.write(1000) is not None for _ in range(12))  # 2 sub-buffers of 4 events: the rest drop
        assert written == 8 and r.p.discarded == 4
        assert r.c.read_events() == r.p.events == written
