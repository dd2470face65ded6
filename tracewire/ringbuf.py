"""Shared-memory ring buffer: one per (session, channel, traced process).

Theory of operation
-------------------
sessiond creates the buffer (a memfd holding a control page and N sub-buffers of
S bytes) and an eventfd, and hands both to the traced app (the producer) and to
consumerd (the consumer).  The app never creates or frees a buffer, so what it
wrote survives its exit.

Positions are *virtual* 64-bit byte counts: sub-buffer number ``i`` (counting
from 0 for the life of the stream, never wrapping) covers ``[i*S, i*S + S - 84)``
and lives in slot ``i % N`` of the memfd.  The last 84 bytes of a sub-buffer are
never used for events: the consumer prepends the 84-byte CTF packet header and
context, so one sub-buffer becomes one CTF packet of at most S bytes.  Events
never straddle sub-buffers.

Control page (little-endian), fields and their single writer:

====== ========== =========== =============================================
offset type       writer      meaning
====== ========== =========== =============================================
0      u32        sessiond    magic ``RB_MAGIC``
4      u32        sessiond    layout version (4)
8      u32        sessiond    sub-buffer size S
12     u32        sessiond    number of sub-buffers N
16     u64        producer    ts: the latest timestamp the producer handed
                              out: of the last whole event, or of a later
                              dropped one (start time if none)
24     u64        producer    head: virtual end of the last *whole* event
32     u64        producer    events discarded so far (free-running)
40     u64        consumer    consumed: everything below it has been read
48     u64        sessiond    stream start timestamp
56     u64        consumer    timestamp_end of the last released chunk
64     u64        producer    waiting: 0, or the ``consumed`` position a
                              producer of a blocking channel waits for
72     u64        sessiond    flags: bit 0 = overwrite mode
80+32k u64 x 4    producer    slot k, for the sub-buffer last opened in
                              slot k: (ts_end, discarded, end, ts_begin);
                              end = ``OPEN | j`` while sub-buffer j is
                              written, its virtual end once it closed;
                              all-ones = never used
C-8    u64        producer    events: whole events written so far
                              (free-running; C = the control area's size,
                              so this word follows the slots)
====== ========== =========== =============================================

The ``events`` word is only ever shown (``tracewire status``: events and
events/s); nothing reads it to decide anything, so a value the app made up
misleads only its own user's statistics.  Slots end 16 bytes past a
multiple of 32 and the control area is whole pages, so the last word of
the control area is always free for it.

Producer (``Producer.reserve``): an event that does not fit in the current
sub-buffer *closes* it and moves on to the next one, if the consumer has
released it; otherwise the event is dropped: ``discarded`` grows, after ``ts``
took the dropped event's timestamp (discard mode).  Closing writes the slot --
``ts_end`` (the time of the switch: the event that caused it, or the latest
drop), a snapshot of ``discarded``, then ``end`` -- and signals the eventfd
once, as lttng-ust writes ``timestamp_end`` and ``events_discarded`` into a
sub-buffer's header when it switches out of it.  *Opening* the next
sub-buffer j stores its ``ts_begin`` (the close's time), then ``end = OPEN |
j``, before any byte of it is written: whoever copied the slot's previous
sub-buffer (a snapshot) sees, when it reads ``end`` again, that the copy may
be torn (``SnapshotReader``).  After every event the producer publishes
``ts``, then ``head``.

Overwrite channels (``flags`` bit 0, written by sessiond): the producer never
waits for ``consumed`` -- it opens the next sub-buffer over whatever the slot
held, so the ring always holds the newest ``N`` sub-buffers and the app never
drops an event for want of room.  Nothing drains such a ring while tracing
(they exist in snapshot sessions only); ``SnapshotReader`` copies it on
demand, keeping only the sub-buffers whose slot still names the same
sub-buffer after the copy.  Packet sequence numbers (sub-buffer number + 1)
tell a reader how many older packets were overwritten.

Blocking channels (``--blocking-timeout``): when the next sub-buffer is not
consumed yet, a producer given a *space fd* (the read end of a pipe whose
write end the consumer holds) and a timeout waits instead of dropping: it
stores the position it needs in ``waiting``, re-reads ``consumed`` (a release
between its first read and that store is not missed), and sleeps in
``poll()`` on the pipe -- never longer than ``RECHECK_S`` at a time, after
which it re-reads ``consumed`` anyway -- until the space is released, the
timeout expires (the event is then dropped and counted as in discard mode) or
``cancel_wait`` is called (the stream is being closed).  A re-check that
finds no room also writes the eventfd (at most once per ``RECHECK_S``): a
consumer that lost the announcements of closed sub-buffers (its predecessor
read them and died) is woken, and ``ConsumerCursor.announce`` takes the
number of closes from ``waiting`` rather than from the eventfd.  The consumer, after
it stores a new ``consumed``, writes one byte to the pipe only when
``waiting`` is non-zero and at or below it: a non-blocking channel's consumer
costs one comparison more per release, and a hostile ``waiting`` costs at
most one needless byte per release (the write end is non-blocking and
consumer-owned, so the app cannot make it block).  See docs/design.md,
"Blocking channels".

Consumer (``ConsumerCursor``): reads closed sub-buffers in order, but never
more than the eventfd has announced (see docs/design.md for why that is the
ordering guarantee on weakly ordered CPUs); a *flush* (switch timer, stop, dead
app) also takes the open sub-buffer up to ``head`` after a system-wide memory
barrier (``flush_limit``).  A packet may therefore start in the middle of a
sub-buffer.  Each chunk's ``events_discarded`` is the stream's total at the
chunk's end: the slot's snapshot for a closed sub-buffer, the counter read
with the flush limit for a flushed one.  babeltrace2 cannot count what the
first packet of a stream reports (it has no earlier packet to subtract), so a
stream whose first chunk would carry discards begins with an empty chunk that
carries 0.  The consumer owns ``consumed`` and treats every producer-written
field as hostile: a value outside what the layout allows (a snapshot that
goes back or exceeds the counter, a counter that goes back) is reported as
``RingBufferCorrupt``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "RB_MAGIC",
    "PACKET_HEADER_SIZE",
    "RingBufferCorrupt",
    "BufferSpec",
    "create_buffer",
    "map_buffer",
    "Producer",
    "ConsumerCursor",
    "Chunk",
    "FlushLimit",
    "MemoryBarrier",
    "SnapPacket",
    "Snapshot",
    "read_snapshot",
]

RB_MAGIC = 0x54575242  # "TWRB"
RB_VERSION = 4
PACKET_HEADER_SIZE = 84
MIN_SUBBUF_SIZE = 4096
MAX_SUBBUF_SIZE = 64 * 1024 * 1024
MIN_NUM_SUBBUF = 2
MAX_NUM_SUBBUF = 1024

# The 64-bit control words are read and written through a memoryview cast
# to "Q" (``q[i]`` is the word at byte offset 8*i): CPython stores and loads
# such an item with one aligned 8-byte memcpy, which another CPU sees whole.
# struct.pack_into cannot be used for them: it zeroes the destination before
# packing (s_pack_internal's memset), so a concurrent reader can see 0, and
# "<Q" is packed byte by byte besides.  The buffer never leaves the machine,
# so native byte order is the right one.
_HDR = struct.Struct("IIII")
_FLAGS = struct.Struct("Q")
Q_TS = 2  # producer: latest ts handed out (event or drop); stored *before* Q_HEAD / Q_DISCARDED
Q_HEAD = 3  # producer: virtual end of the last whole event
Q_DISCARDED = 4  # producer: events discarded so far
Q_CONSUMED = 5  # consumer
Q_START = 6  # sessiond: stream start timestamp
Q_CONSUMED_TS = 7  # consumer: timestamp_end of the last chunk released
Q_WAITING = 8  # producer: 0, or the consumed position a blocked producer waits for
Q_FLAGS = 9  # sessiond: FLAG_OVERWRITE
Q_SLOTS = 10  # slot k: q[10+4k] = ts_end, q[11+4k] = discarded (both stored first), q[12+4k] = end,
#               q[13+4k] = ts_begin (stored before end = OPEN | j)
SLOT_WORDS = 4
SLOT_TS, SLOT_DISCARDED, SLOT_END, SLOT_BEGIN = 0, 1, 2, 3
OFF_SLOTS = 8 * Q_SLOTS
NEVER = 0xFFFFFFFFFFFFFFFF
OPEN = 1 << 63  # slot end = OPEN | j: sub-buffer j is being written
FLAG_OVERWRITE = 1
# A blocked producer re-reads ``consumed`` at least this often (seconds),
# woken or not: the bound on a missed wake-up (a consumer that died, or a
# store and a load the CPU reordered: docs/design.md) and on how long a
# cancelled wait takes to notice.
RECHECK_S = 0.1
# The size never changes, and no other seal can be added (F_SEAL_FUTURE_WRITE
# would make a restarted consumer's mapping fail).
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class RingBufferCorrupt(Exception):
    """A producer-written control field holds a value the layout forbids."""


@dataclass(frozen=True, slots=True)
class BufferSpec:
    """Geometry of one ring buffer.

    Raises:
        ValueError: a size outside the supported range, or not a power of two.
    """

    subbuf_size: int
    num_subbuf: int
    overwrite: bool = False

    def __post_init__(self) -> None:
        """Check the geometry (see the class docstring)."""
        s, n = self.subbuf_size, self.num_subbuf
        if not (MIN_SUBBUF_SIZE <= s <= MAX_SUBBUF_SIZE) or s & (s - 1):
            raise ValueError(
                f"sub-buffer size must be a power of two between "
                f"{MIN_SUBBUF_SIZE} and {MAX_SUBBUF_SIZE} bytes, got {s}"
            )
        if not (MIN_NUM_SUBBUF <= n <= MAX_NUM_SUBBUF):
            raise ValueError(
                f"number of sub-buffers must be between {MIN_NUM_SUBBUF} "
                f"and {MAX_NUM_SUBBUF}, got {n}"
            )

    @property
    def ctrl_size(self) -> int:
        """Bytes of the control page(s) before the first sub-buffer."""
        return (OFF_SLOTS + 8 * SLOT_WORDS * self.num_subbuf + 4095) & ~4095

    @property
    def q_events(self) -> int:
        """Index, in the control words, of the producer's ``events`` word
        (the last word of the control area)."""
        return self.ctrl_size // 8 - 1

    @property
    def total_size(self) -> int:
        """Bytes of the whole memfd."""
        return self.ctrl_size + self.subbuf_size * self.num_subbuf

    @property
    def usable(self) -> int:
        """Event bytes one sub-buffer can hold."""
        return self.subbuf_size - PACKET_HEADER_SIZE


def create_buffer(spec: BufferSpec, start_ts: int, name: str = "tracewire-rb") -> int:
    """Create and initialise a ring buffer memfd.

    The control page gets the geometry, ``head = 0``, ``ts = start_ts``, a
    discarded count of 0 and every slot marked "never closed".  The memfd is
    sealed against any change of size, and against new seals: the app that
    gets it cannot shrink it under the consumer's mapping (a read past the
    end would kill the consumer with SIGBUS).

    Args:
        spec: the geometry.
        start_ts: the stream's start, on the clock the producer will use
            (``time.monotonic_ns()`` now): no event can be earlier.
        name: the memfd's name (seen in /proc/PID/fd).

    Returns:
        The memfd (close-on-exec).
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, spec.total_size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        with mmap.mmap(fd, spec.ctrl_size) as m:
            _HDR.pack_into(m, 0, RB_MAGIC, RB_VERSION, spec.subbuf_size, spec.num_subbuf)
            q = memoryview(m).cast("Q")
            q[Q_TS] = start_ts
            q[Q_HEAD] = 0
            q[Q_START] = start_ts
            q[Q_FLAGS] = FLAG_OVERWRITE if spec.overwrite else 0
            for k in range(spec.num_subbuf):
                base = Q_SLOTS + SLOT_WORDS * k
                q[base + SLOT_TS] = 0
                q[base + SLOT_DISCARDED] = 0
                q[base + SLOT_END] = NEVER
                q[base + SLOT_BEGIN] = 0
            # Sub-buffer 0 is open from the start.
            q[Q_SLOTS + SLOT_BEGIN] = start_ts
            q[Q_SLOTS + SLOT_END] = OPEN
            q.release()
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_buffer(fd: int, expected: BufferSpec | None = None) -> tuple[mmap.mmap, BufferSpec]:
    """Map a ring buffer fd and check its geometry.

    Args:
        fd: the ring buffer's memfd.
        expected: the geometry the channel declares, if known.

    Returns:
        The shared mapping of the whole memfd and its geometry.

    Raises:
        RingBufferCorrupt: bad magic/version/geometry or a size mismatch.
    """
    size = os.fstat(fd).st_size
    if size < 4096:
        raise RingBufferCorrupt(f"ring buffer too small: {size} bytes")
    m = mmap.mmap(fd, size)
    magic, version, s, n = _HDR.unpack_from(m, 0)
    try:
        if magic != RB_MAGIC or version != RB_VERSION:
            raise RingBufferCorrupt(f"bad ring buffer magic/version {magic:#x}/{version}")
        try:
            (flags,) = _FLAGS.unpack_from(m, 8 * Q_FLAGS)
            spec = BufferSpec(s, n, bool(flags & FLAG_OVERWRITE))
        except ValueError as exc:
            raise RingBufferCorrupt(str(exc)) from None
        if expected is not None and (s, n) != (expected.subbuf_size, expected.num_subbuf):
            raise RingBufferCorrupt(f"geometry {spec} differs from the declared {expected}")
        if spec.total_size != size:
            raise RingBufferCorrupt(f"size {size} does not match geometry {spec}")
    except BaseException:
        m.close()
        raise
    return m, spec


def _check_sealed(fd: int) -> None:
    """Refuse a ring buffer whose size its producer could change.

    Raises:
        RingBufferCorrupt: ``fd`` is not a memfd sealed as ``create_buffer`` seals it.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise RingBufferCorrupt(f"ring buffer is not a sealed memfd: {exc.strerror}") from None
    if seals & _SEALS != _SEALS:
        raise RingBufferCorrupt(f"ring buffer memfd is not sealed against resizing (seals {seals:#x})")


class Producer:
    """The app side of one ring buffer.

    Not thread-safe by itself: the tracer serialises calls with one lock per
    stream, and takes each event's timestamp under that lock, so the
    timestamps given to ``reserve``, ``commit`` and ``drop`` never decrease.

    The hot path is ``reserve(size, ts)``: it returns the memfd offset at
    which the caller writes ``size`` event bytes, then the caller calls
    ``commit(size, ts)``.  ``reserve`` returns -1 when the event must be
    dropped (already counted).

    A blocking channel's producer (``space_fd`` >= 0 and ``block_timeout``
    not 0) waits, in ``reserve``, for the consumer to release the next
    sub-buffer instead of dropping the event at once: at most
    ``block_timeout`` seconds per event (None: for ever), or until
    ``cancel_wait``.

    Attributes:
        last_ts: timestamp of the last event written, the reference of the
            next compact event header.
        high_ts: the latest timestamp published other than by an event
            written (a dropped event's, a close's); a sub-buffer closes at
            ``max(last_ts, high_ts)`` or later.
    """

    __slots__ = (
        "mm", "view", "q", "spec", "wakeup_fd", "pos", "sb_end", "sb_index",
        "last_ts", "high_ts", "discarded", "_S", "_N", "_ctrl", "_released_upto", "base",
        "space_fd", "block_timeout", "cancelled", "_poll", "events", "qev",
    )

    def __init__(self, fd: int, wakeup_fd: int, spec: BufferSpec | None = None,
                 space_fd: int = -1, block_timeout: float | None = 0.0) -> None:
        """Map the ring buffer ``fd`` (of geometry ``spec``, if given).

        Args:
            fd: the ring buffer's memfd (the caller may close it after).
            wakeup_fd: the eventfd that announces closed sub-buffers.
            spec: the geometry the channel declares, if known.
            space_fd: a blocking channel's space pipe (read end; the caller
                closes it after ``close``), or -1.
            block_timeout: how long one event may wait for space, in
                seconds: 0 never (discard mode), None for ever.

        Raises:
            RingBufferCorrupt: bad magic/version/geometry or size.
        """
        self.mm, self.spec = map_buffer(fd, spec)
        self.view = memoryview(self.mm)
        self.q = self.view.cast("Q")
        self.wakeup_fd = wakeup_fd
        sp = self.spec
        self._S = sp.subbuf_size
        self._N = sp.num_subbuf
        self._ctrl = sp.ctrl_size
        head = self.q[Q_HEAD]
        # Resume where a previous producer (same buffer) left off.
        self.pos = head
        self.sb_index = head // self._S
        self.sb_end = self.sb_index * self._S + sp.usable
        # memfd offset of virtual position p in the current sub-buffer: base + p
        self.base = self._ctrl + (self.sb_index % self._N - self.sb_index) * self._S
        # The ts word may be a dropped event's, later than the last event
        # written: the stream start is a header reference no reader can be
        # behind (a resumed producer's first event may get an extended header).
        self.last_ts = self.q[Q_START]
        self.high_ts = self.q[Q_TS]
        self.discarded = self.q[Q_DISCARDED]
        # Whole events written (the ``events`` word), resumed like head.
        self.qev = sp.q_events
        self.events = self.q[self.qev]
        # An overwrite channel never waits for the consumer: the room check
        # in _switch can never fail (no cost on the fast path).
        self._released_upto = NEVER if self.spec.overwrite else 0
        self.space_fd = space_fd
        self.block_timeout = block_timeout if space_fd >= 0 else 0.0
        self.cancelled = False
        self._poll: select.poll | None = None

    def reserve(self, size: int, ts: int | None = None) -> int:
        """Find room for ``size`` event bytes.

        Args:
            size: the event's size in bytes.
            ts: the event's timestamp: the time of the switch if the event
                closes the current sub-buffer, and of the drop if it is
                dropped (None: unknown, e.g. a test writing by hand).

        Returns:
            The memfd offset to write the event at, or -1 (dropped, counted).
        """
        p = self.pos
        if p + size <= self.sb_end:
            return self.base + p
        return self._switch(size, ts)

    def _switch(self, size: int, ts: int | None = None) -> int:
        """Close the current sub-buffer and move to the next, or drop.

        Args:
            size: the event that did not fit.
            ts: its timestamp (see ``reserve``).

        Returns:
            The memfd offset for the event, or -1 (dropped and counted).
        """
        S = self._S
        if size > S - PACKET_HEADER_SIZE:
            self.drop(1, ts)
            return -1
        nxt = self.sb_index + 1
        need = (nxt - self._N + 1) * S  # sub-buffer nxt-N must be fully consumed
        if need > self._released_upto:
            self._released_upto = self.q[Q_CONSUMED]
            if need > self._released_upto and (self.block_timeout == 0 or not self._wait_room(need)):
                self.drop(1, ts)
                return -1
        self.close_current(ts)
        # Open sub-buffer nxt: its begin time, then the mark that tells a
        # snapshot copying the slot's previous sub-buffer that its copy may
        # be torn -- both before the first byte of it is written.
        k = Q_SLOTS + SLOT_WORDS * (nxt % self._N)
        q = self.q
        q[k + SLOT_BEGIN] = self.high_ts
        q[k + SLOT_END] = OPEN | nxt
        self.sb_index = nxt
        self.pos = nxt * S
        self.sb_end = self.pos + S - PACKET_HEADER_SIZE
        self.base = self._ctrl + (nxt % self._N - nxt) * S
        return self.base + self.pos

    def _wait_room(self, need: int) -> bool:
        """Wait until ``consumed`` reaches ``need`` (a blocking channel).

        Publishes ``need`` in the ``waiting`` word, then re-reads
        ``consumed``: a consumer that released before it saw the word is
        seen here, one that releases after it writes the space pipe.  Sleeps
        in ``poll()`` between checks, never longer than ``RECHECK_S``, so
        a missed wake-up or a ``cancel_wait`` costs at most that.

        Args:
            need: the ``consumed`` position the next sub-buffer needs.

        Returns:
            True once there is room; False when the timeout expired, the
            wait was cancelled, or the pipe reached its end (every write
            end closed: the session is gone) -- the caller drops the event.
        """
        q = self.q
        timeout = self.block_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = self._poll
        if poller is None:
            poller = self._poll = select.poll()
            poller.register(self.space_fd, select.POLLIN)
        try:
            while True:
                q[Q_WAITING] = need
                consumed = q[Q_CONSUMED]
                if consumed >= need:
                    self._released_upto = consumed
                    return True
                wait = RECHECK_S
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                if wait <= 0 or self.cancelled:
                    return False
                if poller.poll(wait * 1000 + 1):  # ms, rounded up: no zero-timeout spin
                    try:
                        if not os.read(self.space_fd, 4096):  # the wake-ups so far: re-check
                            break  # end of file: no consumer nor sessiond holds the ring
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        break  # the pipe is unusable: never spin on it
                elif wait >= RECHECK_S:
                    # A whole re-check without a release: nudge the consumer
                    # (a restarted one never saw the announcements its
                    # predecessor read; ConsumerCursor.announce).
                    try:
                        os.eventfd_write(self.wakeup_fd, 1)
                    except OSError:
                        pass
            # Nobody can release space any more (the session was destroyed):
            # discard mode from now on, without a system call per event.
            self.block_timeout = 0.0
            return False
        finally:
            q[Q_WAITING] = 0

    def cancel_wait(self) -> None:
        """End a wait for space (now or later) within ``RECHECK_S``: the
        stream is being closed.  Callable from any thread, without the
        stream's lock; events that would wait are dropped from then on."""
        self.cancelled = True

    def close_current(self, ts: int | None = None) -> None:
        """Close the current sub-buffer at ``pos`` and wake the consumer.

        The slot gets the close's timestamp (``ts``, or the latest the
        producer handed out) and a snapshot of the discarded count, both
        before the end position that makes the slot current; then the
        eventfd write publishes all three (docs/design.md).

        Args:
            ts: the time of the switch: the timestamp of the event that
                does not fit (None: the latest known, e.g. at exit).
        """
        end_ts = max(self.last_ts, self.high_ts) if ts is None else max(self.last_ts, self.high_ts, ts)
        self.high_ts = end_ts
        k = Q_SLOTS + SLOT_WORDS * (self.sb_index % self._N)
        q = self.q
        q[k + SLOT_TS] = end_ts
        q[k + SLOT_DISCARDED] = self.discarded
        q[k + SLOT_END] = self.pos
        try:
            os.eventfd_write(self.wakeup_fd, 1)
        except OSError:
            pass  # consumer gone or counter saturated: never block or raise

    def commit(self, size: int, ts: int) -> None:
        """Publish an event written at the offset ``reserve`` returned.

        Args:
            size: the event's size, as reserved.
            ts: its timestamp (never earlier than the previous one's).
        """
        self.pos += size
        self.last_ts = ts
        self.q[Q_TS] = ts
        self.q[Q_HEAD] = self.pos
        self.events += 1
        self.q[self.qev] = self.events

    def drop(self, count: int = 1, ts: int | None = None) -> None:
        """Count ``count`` events as discarded.

        Args:
            count: how many.
            ts: the dropped event's timestamp, if known: published in the
                ts word *before* the count, so that a flush that sees the
                count also sees a time at or after the drop.
        """
        if ts is not None and ts > self.last_ts and ts > self.high_ts:
            self.high_ts = ts
            self.q[Q_TS] = ts
        self.discarded += count
        self.q[Q_DISCARDED] = self.discarded

    def close(self) -> None:
        """Unmap the buffer (the caller closes ``wakeup_fd``)."""
        self.q.release()
        self.view.release()
        self.mm.close()


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of whole events ready to become one CTF packet.

    ``data`` views the shared memory: copy or write it out before calling
    ``ConsumerCursor.release``.  ``events_discarded`` is the stream's
    discarded total at the chunk's end (``ts_end``), as the CTF packet
    context wants it.
    """

    data: memoryview
    ts_begin: int
    ts_end: int
    events_discarded: int
    end: int  # virtual ring position right after the chunk


class FlushLimit(NamedTuple):
    """A consistent snapshot of the producer's state for a flush.

    ``ts`` is at or after the last event below ``head`` and at or before
    the next one; ``discarded`` counts the events dropped up to ``ts``.
    """

    head: int
    ts: int
    discarded: int


class ConsumerCursor:
    """The consumer side of one ring buffer: turns sub-buffers into chunks.

    Attributes:
        consumed: everything below this virtual position has been read.
        last_ts: ``ts_end`` of the last chunk (the next one's ``ts_begin``).
        last_discarded: ``events_discarded`` of the last chunk: what the
            trace reports so far (a restarted consumerd sets it from the
            stream file's last packet).
        deferred: release space to the producer only through ``publish``.
        announced: closed sub-buffers the eventfd has announced, in total.
        space_fd: a blocking channel's space pipe (write end, non-blocking;
            the cursor owns it and closes it in ``close``), or -1.
    """

    def __init__(self, fd: int, spec: BufferSpec | None = None, space_fd: int = -1) -> None:
        """Map the ring buffer ``fd`` (of geometry ``spec``, if given).

        ``space_fd`` (a blocking channel's) is the cursor's once this
        returns; if it raises, it is still the caller's.

        Raises:
            RingBufferCorrupt: bad magic/version/geometry or size, or a memfd
                not sealed against shrinking (the producer could make a read
                of the mapping kill the consumer).
        """
        _check_sealed(fd)
        self.mm, self.spec = map_buffer(fd, spec)
        self.view = memoryview(self.mm)
        self.q = self.view.cast("Q")
        sp = self.spec
        self._S = sp.subbuf_size
        self._N = sp.num_subbuf
        self._ctrl = sp.ctrl_size
        self.consumed = self.q[Q_CONSUMED]
        # A restarted consumer continues the timestamp chain where it stopped.
        self.last_ts = max(self.q[Q_START], self.q[Q_CONSUMED_TS])
        # Deferred release: the space of a chunk goes back to the producer
        # only through publish() (a relay sink publishes once a packet is
        # spooled, so a consumerd crash loses nothing it had read).
        self.deferred = False
        # Closed sub-buffers announced through the eventfd, in total; those
        # below ``consumed`` were announced to an earlier consumer.
        self.announced = self.consumed // self._S
        self._advance_to = self.consumed
        self.last_discarded = 0
        self._snap_floor = 0  # highest slot snapshot accepted
        self._live_floor = 0  # highest discarded counter read
        self._flush: FlushLimit | None = None  # the last flush_limit() result
        self._started = False  # a chunk has been returned
        self._fresh = self.consumed == 0  # no earlier consumer released anything
        self.space_fd = space_fd

    # -- reading the control page -------------------------------------------------------
    def _slot(self, j: int) -> tuple[int, int, int] | None:
        """``(end, ts_end, discarded)`` of sub-buffer ``j`` if its slot says
        it closed in this lap, else None.  Read end first: the other two
        were stored before it."""
        k = Q_SLOTS + SLOT_WORDS * (j % self._N)
        q = self.q
        end = q[k + SLOT_END]
        lo = j * self._S
        if end == NEVER or end < lo or end >= lo + self._S:
            return None  # not closed in this lap (stale or never)
        ts_end = q[k + SLOT_TS]
        if ts_end < self.last_ts:
            return None  # the slot's ts is from an earlier lap: not visible yet
        if end > lo + self._S - PACKET_HEADER_SIZE:
            raise RingBufferCorrupt(f"sub-buffer {j} closed past its end ({end})")
        return end, ts_end, q[k + SLOT_DISCARDED]

    def _check_counter(self, discarded: int) -> None:
        """Accept a read of the live discarded counter, or raise."""
        floor = max(self._live_floor, self._snap_floor, self.last_discarded)
        if discarded < floor:
            raise RingBufferCorrupt(f"events_discarded went backwards ({discarded} < {floor})")
        self._live_floor = discarded

    def _check_snapshot(self, j: int, snapshot: int) -> None:
        """Accept sub-buffer ``j``'s discarded snapshot, or raise.

        Snapshots are taken in sub-buffer order, so they never go back, and
        the counter (read after the slot, so its stores are visible too) is
        never below them.
        """
        if snapshot < self._snap_floor:
            raise RingBufferCorrupt(
                f"events_discarded of sub-buffer {j} went backwards ({snapshot} < {self._snap_floor})")
        counter = self.q[Q_DISCARDED]
        if snapshot > counter:
            raise RingBufferCorrupt(
                f"sub-buffer {j} closed with {snapshot} events discarded, more than the {counter} counted")
        self._check_counter(counter)
        self._snap_floor = snapshot

    def _view(self, start: int, end: int) -> memoryview:
        """The shared memory holding virtual positions [start, end)."""
        off = self._ctrl + (start // self._S % self._N) * self._S + start % self._S
        return self.view[off : off + (end - start)]

    def _chunk(self, start: int, end: int, ts_end: int, discarded: int) -> Chunk:
        """The chunk [start, end) ending at ``ts_end``, after the previous one.

        Raises:
            RingBufferCorrupt: ``ts_end`` is before the previous chunk's end.
        """
        if ts_end < self.last_ts:
            raise RingBufferCorrupt(f"timestamp went backwards ({ts_end} < {self.last_ts})")
        # A flush's counter may run ahead of a snapshot the producer took
        # before it (only on weakly ordered CPUs): the trace's count never
        # goes back, whatever order the reads saw.
        count = max(discarded, self.last_discarded)
        c = Chunk(self._view(start, end), self.last_ts, ts_end, count, self._advance_to)
        self.last_ts = ts_end
        self.last_discarded = count
        self._started = True
        return c

    # -- chunks ---------------------------------------------------------------------------
    def announce(self, count: int) -> None:
        """Add what the eventfd said: ``count`` more sub-buffers were closed.

        On a blocking channel, a producer waiting for space has closed
        exactly the sub-buffers below ``waiting // S + N - 2`` (the one it
        is in), and it writes the eventfd, once per ``RECHECK_S`` it waits
        in vain, after all its closes: that count replaces ours.  A
        restarted consumer, whose predecessor read (and took with it) the
        announcements of sub-buffers it did not release, catches up so, and
        the extra eventfd writes are not counted as closes.  A hostile
        ``waiting`` only misleads the reading of its own ring."""
        self.announced += count
        if self.space_fd >= 0:
            waiting = self.q[Q_WAITING]
            if waiting:
                self.announced = waiting // self._S + self._N - 2

    def next_chunk(self, limit: FlushLimit | None = None) -> Chunk | None:
        """The next chunk to write, or None when there is nothing (yet).

        Sub-buffers are closed in order and each close writes the eventfd once,
        so closed sub-buffer ``j`` may be read once ``announced > j``: the
        eventfd write/read pair orders the producer's stores before our loads.

        The first chunk of a stream whose count would not be 0 is preceded by
        an empty chunk with a count of 0 (babeltrace2 cannot count what a
        stream's first packet reports): write and release it, then call
        again.  Call until None before ``empty_chunk``.

        Args:
            limit: for a flush (switch timer, stop, dead app), the
                ``flush_limit()`` result.  Closed sub-buffers the producer
                left before that head, and the open one up to it, are taken
                too.

        Raises:
            RingBufferCorrupt: the producer wrote a control value the layout
                forbids; the stream must be abandoned.
        """
        found = self._find(limit)
        pending = limit.discarded if limit is not None else 0  # what empty_chunk would carry
        count = found[3] if found is not None else pending
        if count > self.last_discarded and self._unstarted():
            return self._lead()
        return None if found is None else self._chunk(*found)

    def _find(self, limit: FlushLimit | None) -> tuple[int, int, int, int] | None:
        """``(start, end, ts_end, discarded)`` of the next chunk, with
        ``_advance_to`` set for ``release``; releases empty sub-buffers."""
        S = self._S
        while True:
            c = self.consumed
            j = c // S
            slot = self._slot(j)
            # An unannounced close is visible after the flush's barrier only
            # if the producer had moved past it when the head was read.
            if slot is not None and (self.announced > j or (limit is not None and limit.head // S > j)):
                end, ts_end, snapshot = slot
                if end < c:
                    raise RingBufferCorrupt(f"sub-buffer {j} closed at {end} before {c}")
                self._advance_to = (j + 1) * S
                if end == c:
                    self.release()
                    continue
                self._check_snapshot(j, snapshot)
                return c, end, ts_end, snapshot
            return None if limit is None else self._find_open(limit, c, j)

    def _find_open(self, limit: FlushLimit, c: int, j: int) -> tuple[int, int, int, int] | None:
        """The open sub-buffer ``j`` from ``c`` up to the flush limit's head."""
        S = self._S
        head = limit.head
        if head <= c:
            # A closed sub-buffer leaves head at its end until the next
            # event lands in the following one.
            if c - head > S:
                raise RingBufferCorrupt(f"head {head} is behind consumed {c}")
            return None
        if head // S > j + self._N:
            raise RingBufferCorrupt(f"head {head} is not reachable from {c}")
        if head // S != j:
            return None
        if head > j * S + S - PACKET_HEADER_SIZE:
            raise RingBufferCorrupt(f"head {head} past the end of sub-buffer {j}")
        self._advance_to = head
        return c, head, limit.ts, limit.discarded

    def _unstarted(self) -> bool:
        """No packet of this stream was written yet, as far as we know."""
        return self._fresh and not self._started and self.last_discarded == 0

    def _lead(self) -> Chunk:
        """The empty chunk, with a count of 0, that opens a stream whose
        first real chunk reports discarded events."""
        self._advance_to = self.consumed
        return self._chunk(self.consumed, self.consumed, self.last_ts, 0)

    def discarded_pending(self) -> int:
        """Events counted as dropped at the last flush limit that no chunk
        carries yet (a flush with no event to write reports them with
        ``empty_chunk``)."""
        if self._flush is None:
            return 0
        return max(0, self._flush.discarded - self.last_discarded)

    def empty_chunk(self, ts: int) -> Chunk:
        """A chunk with no events, to carry the flush's discarded count.

        Args:
            ts: the ``ts`` of the flush limit everything was read up to.
        """
        self._advance_to = self.consumed
        discarded = self._flush.discarded if self._flush is not None else self.last_discarded
        return self._chunk(self.consumed, self.consumed, max(self.last_ts, ts), discarded)

    # -- releasing --------------------------------------------------------------------------
    def release(self) -> int:
        """Mark the last chunk read; returns the position after it.  Unless
        ``deferred``, the producer may reuse its space at once."""
        self.consumed = self._advance_to
        if not self.deferred:
            self.publish(self.consumed, self.last_ts)
        return self.consumed

    def publish(self, pos: int, ts: int) -> None:
        """Give the space below ``pos`` back to the producer (never backwards),
        and wake a blocked producer waiting for it (a blocking channel).

        The ``waiting`` word is the producer's: whatever it holds costs at
        most one byte written to a non-blocking pipe per call, whose
        failure (full, closed) is ignored; this never blocks."""
        q = self.q
        if pos > q[Q_CONSUMED]:
            q[Q_CONSUMED_TS] = ts
            q[Q_CONSUMED] = pos
            if self.space_fd >= 0:
                waiting = q[Q_WAITING]
                if waiting and waiting <= pos:
                    try:
                        os.write(self.space_fd, b"\1")
                    except OSError:
                        pass  # full (the app is not reading) or no reader: nobody to wake

    def skip_to(self, pos: int, ts: int) -> None:
        """Resume reading at ``pos`` (a restarted consumer that had already
        saved everything below it), publishing it."""
        if pos > self.consumed:
            self.consumed = self._advance_to = pos
            self.announced = max(self.announced, pos // self._S)
            self._fresh = False
        self.last_ts = max(self.last_ts, ts)
        self.publish(pos, ts)

    # -- flushes ----------------------------------------------------------------------------
    def flush_limit(self, barrier: Callable[[], None] | None = None, tries: int = 16) -> FlushLimit | None:
        """A consistent ``(head, ts, discarded)`` for a flush, or None if the
        producer kept moving (try again later).

        The producer stores ts, then head (an event) or ts, then the count (a
        drop).  Reading ts (T1), head (H), the count (D), then ts again (T2)
        and keeping the triple only when T1 == T2 gives a ts that is the
        timestamp of the event ending at H, or of the event or drop right
        after it -- valid as the packet's timestamp_end *and* the next
        packet's timestamp_begin -- and a count of the drops up to that ts.
        ``barrier`` (a ``MemoryBarrier``) runs between H and D: after it,
        every byte below H is visible, and D is at least every snapshot the
        producer took before.

        Raises:
            RingBufferCorrupt: the discarded counter went back.
        """
        q = self.q
        for _ in range(tries):
            t1 = q[Q_TS]
            head = q[Q_HEAD]
            if barrier is not None:
                barrier()
            discarded = q[Q_DISCARDED]
            if q[Q_TS] == t1:
                self._check_counter(discarded)
                self._flush = FlushLimit(head, t1, discarded)
                return self._flush
        return None

    def read_head(self) -> int:
        """``head`` as the producer last published it."""
        return self.q[Q_HEAD]

    def read_events(self) -> int:
        """The producer's ``events`` word: whole events written so far, as
        the producer says (for display only: an app may write anything)."""
        return self.q[self.spec.q_events]

    def read_ts(self) -> int:
        """The producer's last timestamp; read it *after* ``read_head`` (and
        the barrier): it is stored before head, so it is at least the
        timestamp of the event that ends at that head."""
        return self.q[Q_TS]

    def close(self) -> None:
        """Unmap the buffer and close ``space_fd``."""
        if self.space_fd >= 0:
            os.close(self.space_fd)
            self.space_fd = -1
        self.q.release()
        self.view.release()
        self.mm.close()


class SnapPacket(NamedTuple):
    """One sub-buffer copied out of a ring by ``read_snapshot``: its whole
    events (a closed sub-buffer's, or the open one's up to ``head``)."""

    subbuf: int  # the sub-buffer's number j; as a packet its seq is j + 1
    data: bytes
    ts_begin: int
    ts_end: int
    discarded: int


class Snapshot(NamedTuple):
    """What ``read_snapshot`` copied from one ring.

    Attributes:
        packets: the sub-buffers kept, oldest first, each a whole packet.
        torn: sub-buffers overwritten while they were copied: left out.
        skipped: older sub-buffers left out to stay within ``max_bytes``.
        corrupt: why control values the layout forbids were ignored, or None.
    """

    packets: list[SnapPacket]
    torn: int
    skipped: int
    corrupt: str | None


def _slot_lap(end: int, k: int, S: int, N: int) -> tuple[int, bool] | None:
    """(sub-buffer number, closed?) that slot ``k``'s end word names, or None
    for a slot never used or a value the layout forbids."""
    if end == NEVER:
        return None
    if end & OPEN:
        j = end & ~OPEN
        return (j, False) if j % N == k else None
    j = end // S
    if j % N != k or end - j * S > S - PACKET_HEADER_SIZE:
        return None
    return j, True


def read_snapshot(view: memoryview, q: memoryview, spec: BufferSpec,
                  barrier: Callable[[], None] | None = None, max_bytes: int | None = None) -> Snapshot:
    """Copy the newest whole sub-buffers of a ring that a producer may be
    writing right now, leaving out every copy it may have torn.

    Reads nothing the consumer owns and writes nothing: a snapshot can run
    beside a consumer, any number of times.  Steps (docs/design.md, "The
    snapshot read"):

    1. a consistent (ts, head, discarded) of the open sub-buffer, as a
       flush takes it (``barrier`` between head and the counter);
    2. every slot's ``end`` word: the sub-buffer each slot holds, closed
       (its virtual end) or open (``OPEN | j``); the highest is the newest;
    3. ``barrier``, then, newest first, each sub-buffer's control words and
       bytes are copied -- a closed one whole, the open one up to ``head``
       -- until ``max_bytes`` (packet headers included) is reached;
    4. ``barrier`` once, then each copied slot's ``end`` word again: a slot
       that now names a later sub-buffer was reopened (and maybe written)
       during the copy, so that copy is dropped (``torn``), and so is every
       older one (the producer reopens slots oldest first).  The producer
       stores the mark before the first byte of the new sub-buffer, so a
       copy that holds any such byte sees the mark on this second read.
       (Each copy is also checked at once, without the barrier, only to
       stop early.)

    Every producer-written value is bounded before use: a hostile app can
    spoil only its own snapshot, never make this read outside the ring.

    Args:
        view: the whole ring's mapping.
        q: the same mapping cast to "Q".
        spec: its geometry.
        barrier: a ``MemoryBarrier`` (needed on weakly ordered CPUs).
        max_bytes: keep at most this many packet bytes (None: no limit).
    """
    S, N = spec.subbuf_size, spec.num_subbuf
    ctrl = spec.ctrl_size
    fence = barrier if barrier is not None else (lambda: None)
    corrupt: str | None = None
    # 1. The open sub-buffer's limit.
    limit: FlushLimit | None = None
    for _ in range(16):
        t1 = q[Q_TS]
        head = q[Q_HEAD]
        fence()
        discarded = q[Q_DISCARDED]
        if q[Q_TS] == t1:
            limit = FlushLimit(head, t1, discarded)
            break
    # 2. What each slot holds.
    base = [Q_SLOTS + SLOT_WORDS * k for k in range(N)]
    ends = [q[b + SLOT_END] for b in base]
    laps: dict[int, tuple[int, bool, int]] = {}  # j -> (k, closed, end word)
    for k, end in enumerate(ends):
        lap = _slot_lap(end, k, S, N)
        if lap is None:
            if end != NEVER:
                corrupt = f"slot {k} holds {end:#x}"
            continue
        laps[lap[0]] = (k, lap[1], end)
    if not laps:
        return Snapshot([], 0, 0, corrupt)
    newest = max(laps)
    fence()
    # 3. and 4. Copy, newest first, and check each copy; the producer
    # reopens slots oldest first, so the first torn copy ends the run.
    kept: list[SnapPacket] = []
    used = skipped = torn = 0
    for j in range(newest, max(newest - N, -1), -1):
        got = laps.get(j)
        if got is None:
            continue
        k, closed, end = got
        b = base[k]
        lo = j * S
        if closed:
            ts_end, disc = q[b + SLOT_TS], q[b + SLOT_DISCARDED]
        elif limit is not None and limit.head // S == j and lo < limit.head <= lo + S - PACKET_HEADER_SIZE:
            end, ts_end, disc = limit.head, limit.ts, limit.discarded
        else:
            continue  # the open sub-buffer holds no whole event (or head moved on)
        begin = q[b + SLOT_BEGIN]
        size = end - lo
        if size <= 0:
            continue
        if max_bytes is not None and used + size + PACKET_HEADER_SIZE > max_bytes:
            skipped = sum(1 for i in laps if i <= j)
            break
        off = ctrl + k * S
        data = bytes(view[off : off + size])
        lap = _slot_lap(q[b + SLOT_END], k, S, N)
        if lap is None or lap[0] != j:
            torn = sum(1 for i in laps if i <= j)  # reopened already: stop early
            break
        kept.append(SnapPacket(j, data, begin, ts_end, disc))
        used += size + PACKET_HEADER_SIZE
    # The definitive check, after one barrier for all the copies (on weakly
    # ordered CPUs the barrier is membarrier(2), which can take milliseconds).
    fence()
    for i, pkt in enumerate(kept):
        k = pkt.subbuf % N
        lap = _slot_lap(q[base[k] + SLOT_END], k, S, N)
        if lap is None or lap[0] != pkt.subbuf:
            torn += len(kept) - i
            del kept[i:]
            break
    kept.reverse()
    # Times and counts must never go back (a hostile producer's would make
    # a reader refuse the trace): keep the newest run where they do not.
    first = len(kept) - 1
    while first > 0:
        a, b2 = kept[first - 1], kept[first]
        if not (a.ts_begin <= a.ts_end <= b2.ts_begin and a.discarded <= b2.discarded):
            corrupt = corrupt or f"sub-buffer {a.subbuf}: timestamps or counts go back"
            break
        first -= 1
    if kept and kept[-1].ts_begin > kept[-1].ts_end:
        return Snapshot([], torn, skipped, f"sub-buffer {kept[-1].subbuf} ends before it begins")
    return Snapshot(kept[first:] if kept else [], torn, skipped, corrupt)


# membarrier(2) commands; see docs/design.md, "Ordering on weakly ordered CPUs".
_MEMBARRIER_CMD_GLOBAL = 1
_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "armv7l": 389, "armv6l": 389, "riscv64": 283}


class MemoryBarrier:
    """A system-wide memory barrier for the consumer's flush path.

    On x86 (TSO) stores become visible in program order, so reading ``head``
    and then the bytes below it needs nothing more.  On weakly ordered CPUs
    (ARM, RISC-V) ``membarrier(MEMBARRIER_CMD_GLOBAL)`` makes every running
    thread pass a full barrier before it returns: everything a producer stored
    before the ``head`` value we read is then visible.  ``force`` issues the
    syscall even on x86 (tests use it to exercise the path).
    """

    def __init__(self, machine: str | None = None, force: bool = False) -> None:
        machine = machine or os.uname().machine
        self.needed = force or machine not in ("x86_64", "i686", "i386")
        self._nr = _SYS_MEMBARRIER.get(machine)
        self._syscall: Callable[..., int] | None = None
        if self.needed and self._nr is not None:
            import ctypes

            self._syscall = ctypes.CDLL(None, use_errno=True).syscall

    def __call__(self) -> None:
        """Issue the barrier (nothing on x86 unless forced)."""
        if not self.needed:
            return
        if self._syscall is None or self._syscall(self._nr, _MEMBARRIER_CMD_GLOBAL, 0, 0) != 0:
            # No membarrier (old kernel, seccomp): fall back to waiting for the
            # producer's stores to drain, which every CPU does within
            # microseconds; documented as best effort in docs/design.md.
            import time

            time.sleep(0.001)
