"""Tests for tracewire.ringbuf: a Producer and a ConsumerCursor on one memfd in
one process, events written by hand, no daemons."""

from __future__ import annotations

import inspect
import os
import random
import struct
import time

import pytest
from fuzzing import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracewire import ringbuf as rb
from tracewire.ringbuf import (
    PACKET_HEADER_SIZE,
    BufferSpec,
    ConsumerCursor,
    MemoryBarrier,
    Producer,
    RingBufferCorrupt,
    create_buffer,
)

S = 4096
N = 4
USABLE = S - PACKET_HEADER_SIZE  # 4012
START_TS = 1_000_000
U64 = struct.Struct("=Q")  # control words are native 64-bit words

# Control-page offsets (documented in the ringbuf module docstring).
if hasattr(rb, "Q_HEAD"):
    OFF_HEAD, OFF_TS, OFF_DISCARDED = 8 * rb.Q_HEAD, 8 * rb.Q_TS, 8 * rb.Q_DISCARDED
    OFF_SLOTS = 8 * rb.Q_SLOTS
    SLOT_END, SLOT_TS = 8, 0  # slot k: (ts_end, virtual end)
else:  # the first layout: head, ts; slot k: (virtual end, ts_end)
    OFF_HEAD, OFF_TS, OFF_DISCARDED, OFF_SLOTS = 16, 24, 32, 64
    SLOT_END, SLOT_TS = 0, 8


def flush_limit(c: ConsumerCursor) -> tuple[int, int]:
    """The (head, ts) flush limit as consumerd takes it (whichever API this
    ringbuf version offers)."""
    if hasattr(c, "flush_limit"):
        for _ in range(1000):
            limit = c.flush_limit(MemoryBarrier())
            if limit is not None:
                return limit
        raise AssertionError("flush_limit() never caught a consistent (head, ts)")
    head = c.read_head()
    MemoryBarrier()()
    if isinstance(head, tuple):
        return head
    return head, c.read_ts()


def empty_chunk(c: ConsumerCursor, limit: tuple[int, int] | None = None):
    """``c.empty_chunk``, given the flush limit's ts when it takes one."""
    if inspect.signature(c.empty_chunk).parameters:
        return c.empty_chunk((limit or flush_limit(c))[1])
    return c.empty_chunk()


class Ring:
    """A producer and a consumer on one fresh buffer, plus a byte log of what
    was written so that chunks can be checked byte for byte."""

    def __init__(self, subbuf: int = S, num: int = N, start_ts: int = START_TS) -> None:
        self.spec = BufferSpec(subbuf, num)
        self.fd = create_buffer(self.spec, start_ts)
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.p = Producer(self.fd, self.efd)
        self.c = ConsumerCursor(self.fd)
        self.ts = start_ts
        self.seq = 0

    def close(self) -> None:
        self.p.close()
        self.c.close()
        os.close(self.fd)
        os.close(self.efd)

    def event_bytes(self, n: int) -> bytes:
        """n bytes that identify this event (its sequence number, repeated)."""
        tag = self.seq.to_bytes(4, "little")
        return (tag * (n // 4 + 1))[:n]

    def write(self, n: int, ts: int | None = None) -> bytes | None:
        """Write one n-byte event; returns its bytes, or None when dropped."""
        off = self.p.reserve(n)
        if off < 0:
            return None
        data = self.event_bytes(n)
        self.p.view[off : off + n] = data
        self.ts = self.ts + 1 if ts is None else ts
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
        """Every chunk available now, copied, each released after reading."""
        self.announce()
        limit = flush_limit(self.c) if flush else None
        out = []
        while (ch := self.c.next_chunk(limit)) is not None:
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
    assert [len(c[0]) for c in chunks] == [USABLE, USABLE]


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
    assert limit == (300, ring.ts)
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
    if hasattr(ring.c, "flush_limit"):
        limit = flush_limit(ring.c)  # the flush's snapshot...
        head = None
    else:
        head = ring.c.read_head()
    b = ring.write(100)  # ...the app goes on: b lands after that head...
    ring.write(USABLE)  # ...and the next event closes sub-buffer 0
    if head is not None:
        MemoryBarrier()()
        limit = head if isinstance(head, tuple) else (head, ring.c.read_ts())
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
    stored = 0
    for _ in range(N):
        assert ring.write(USABLE) is not None
        stored += 1
    # Sub-buffer N would reuse slot 0, which was never released.
    for k in range(1, 51):
        assert ring.p.reserve(100) == -1
        assert ring.p.discarded == k
    assert U64.unpack_from(ring.p.mm, OFF_DISCARDED)[0] == 50
    assert ring.c.discarded_pending() == 50
    chunks = ring.take(flush=True)
    assert len(chunks) == N
    assert all(c[3] == 50 for c in chunks)  # free-running counter in every chunk
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
    assert ring.c.discarded_pending() == 3
    assert ring.c.next_chunk(flush_limit(ring.c)) is None
    ch = empty_chunk(ring.c)
    assert len(ch.data) == 0
    assert ch.events_discarded == 3
    assert ch.ts_begin <= ch.ts_end
    ring.c.release()
    assert ring.c.discarded_pending() == 0
    # The stream carries on normally afterwards.
    d = ring.write(50)
    assert [c[0] for c in ring.take(flush=True)] == [d]


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
    for prev, cur in zip(chunks, chunks[1:]):
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
    """Drive the cursor as consumerd does; only RingBufferCorrupt may escape."""
    for _ in range(rounds):
        c.announce(1)
        for limit in (None, flush_limit(c)):
            for _ in range(3 * c.spec.num_subbuf):
                ch = c.next_chunk(limit)
                if ch is None:
                    break
                assert 0 <= len(ch.data) <= c.spec.usable
                assert ch.ts_begin <= ch.ts_end
                c.release()
        if c.discarded_pending() > 0:
            ch = empty_chunk(c)
            assert len(ch.data) == 0
            c.release()


u64 = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 2**64 - 1, 2**63, S - 84, S - 83, S, 2 * S, 5 * S, 100 * S]),
    st.integers(0, 12 * S),
)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pre=st.integers(0, 6),
    writes=st.lists(st.tuples(st.sampled_from([OFF_HEAD, OFF_TS, OFF_DISCARDED] + [OFF_SLOTS + 16 * k + f for k in range(N) for f in (SLOT_END, SLOT_TS)]), u64), max_size=12),
)
def test_hostile_control_page_only_raises_ringbuffercorrupt(pre: int, writes) -> None:
    r = Ring()
    try:
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
    finally:
        r.close()


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
    _poke(ring.p.mm, OFF_SLOTS + SLOT_TS, START_TS + 5)
    _poke(ring.p.mm, OFF_SLOTS + SLOT_END, S - 10)  # slot 0 "closed" inside the reserved tail
    ring.c.announce(1)
    with pytest.raises(RingBufferCorrupt):
        ring.c.next_chunk()


def test_slot_timestamp_going_backwards_never_yields_a_chunk(ring: Ring) -> None:
    ring.write(100)
    ring.take(flush=True)  # the cursor's last timestamp is now START_TS + 1
    ring.write(USABLE - 100)
    ring.write(USABLE)  # closes sub-buffer 0
    _poke(ring.p.mm, OFF_SLOTS + SLOT_TS, START_TS - 1)
    ring.announce()
    try:
        ch = ring.c.next_chunk()
    except RingBufferCorrupt:
        return
    assert ch is None or ch.ts_begin <= ch.ts_end


def test_concurrent_producer_never_looks_corrupt() -> None:
    """A producer process dropping events while this process drains: the
    cursor must never report a corruption that did not happen.

    Regression: control words written with struct.pack_into were zeroed
    (s_pack_internal's memset) before being written, so a concurrent reader
    saw ``discarded`` go back to 0 and consumerd abandoned the stream."""
    r = Ring()
    pid = os.fork()
    if pid == 0:  # the producer: keep dropping (and counting) for a while
        try:
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                r.p.drop()
        finally:
            os._exit(0)
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            if r.c.discarded_pending() > 0:
                empty_chunk(r.c)
                r.c.release()
    finally:
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


def test_concurrent_producer_and_flushing_consumer_lose_nothing_unreported() -> None:
    """A producer process writes as fast as it can while this process drains
    and flushes (as the switch timer does): every event read is intact, in
    order, and read + discarded == written."""
    r = Ring(S, 4)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rfd)
            rng = random.Random(5)
            written = 0
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                n = rng.randrange(8, 600)
                off = r.p.reserve(n)
                if off >= 0:
                    r.p.view[off : off + n] = struct.pack("<II", written, n) + bytes([written & 0xFF]) * (n - 8)
                    r.p.commit(n, time.monotonic_ns())
                written += 1
            os.write(wfd, str(written).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        data = bytearray()
        discarded = 0
        i = 0
        done = False
        while not done:
            done = os.waitpid(pid, os.WNOHANG)[0] != 0
            chunks = r.take(flush=done or i % 7 == 0)
            for d, _b, _e, disc in chunks:
                data += d
                discarded = disc
            if done and r.c.discarded_pending() > 0:
                discarded = empty_chunk(r.c).events_discarded
                r.c.release()
            i += 1
        written = int(os.read(rfd, 64))
        seqs = _parse_events(bytes(data))
        assert seqs == sorted(set(seqs))
        assert len(seqs) + discarded == written
        assert len(seqs) > 1000
    finally:
        os.close(rfd)
        r.close()
