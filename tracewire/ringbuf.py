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

====== ======== =========== ===============================================
offset type     writer      meaning
====== ======== =========== ===============================================
0      u32      sessiond    magic ``RB_MAGIC``
4      u32      sessiond    layout version
8      u32      sessiond    sub-buffer size S
12     u32      sessiond    number of sub-buffers N
16     u64      producer    timestamp of the last whole event (start time if none)
24     u64      producer    head: virtual end of the last *whole* event
32     u64      producer    events discarded (free-running)
40     u64      consumer    consumed: everything below it has been read
48     u64      sessiond    stream start timestamp
56     u64      consumer    timestamp_end of the last released chunk
64+16k u64,u64  producer    slot k: (ts_end, virtual end) of the sub-buffer
                            that last closed in slot k; all-ones = never
====== ======== =========== ===============================================

Producer (``Producer.reserve``): an event that does not fit in the current
sub-buffer *closes* it (writes the slot, then signals the eventfd once) and
moves on to the next one, if the consumer has released it; otherwise the event
is dropped and ``discarded`` grows (discard mode).  After every event the
producer publishes ``head`` and the event's timestamp.

Consumer (``ConsumerCursor``): reads closed sub-buffers in order, but never
more than the eventfd has announced (see docs/design.md for why that is the
ordering guarantee on weakly ordered CPUs); a *flush* (switch timer, stop, dead
app) also takes the open sub-buffer up to ``head`` after a system-wide memory
barrier.  A packet may therefore start in the middle of a sub-buffer.  The
consumer owns ``consumed`` and treats every producer-written field as hostile:
a value outside what the layout allows is reported as ``RingBufferCorrupt``.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

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
]

RB_MAGIC = 0x54575242  # "TWRB"
RB_VERSION = 1
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
Q_TS = 2  # producer: ts of the last whole event; stored *before* Q_HEAD
Q_HEAD = 3  # producer: virtual end of the last whole event
Q_DISCARDED = 4  # producer
Q_CONSUMED = 5  # consumer
Q_START = 6  # sessiond: stream start timestamp
Q_CONSUMED_TS = 7  # consumer: timestamp_end of the last chunk released
Q_SLOTS = 8  # slot k: q[8+2k] = ts_end (stored first), q[9+2k] = virtual end
OFF_SLOTS = 8 * Q_SLOTS
NEVER = 0xFFFFFFFFFFFFFFFF


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

    def __post_init__(self) -> None:
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
        return (OFF_SLOTS + 16 * self.num_subbuf + 4095) & ~4095

    @property
    def total_size(self) -> int:
        return self.ctrl_size + self.subbuf_size * self.num_subbuf

    @property
    def usable(self) -> int:
        """Event bytes one sub-buffer can hold."""
        return self.subbuf_size - PACKET_HEADER_SIZE


def create_buffer(spec: BufferSpec, start_ts: int, name: str = "tracewire-rb") -> int:
    """Create and initialise a ring buffer memfd; returns its fd (close-on-exec).

    The control page gets the geometry, ``head = 0``, ``last_ts = start_ts``,
    and every slot marked "never closed".
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, spec.total_size)
        with mmap.mmap(fd, spec.ctrl_size) as m:
            _HDR.pack_into(m, 0, RB_MAGIC, RB_VERSION, spec.subbuf_size, spec.num_subbuf)
            q = memoryview(m).cast("Q")
            q[Q_TS] = start_ts
            q[Q_HEAD] = 0
            q[Q_START] = start_ts
            for k in range(spec.num_subbuf):
                q[Q_SLOTS + 2 * k] = 0
                q[Q_SLOTS + 2 * k + 1] = NEVER
            q.release()
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_buffer(fd: int, expected: BufferSpec | None = None) -> tuple[mmap.mmap, BufferSpec]:
    """Map a ring buffer fd and check its geometry.

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
            spec = BufferSpec(s, n)
        except ValueError as exc:
            raise RingBufferCorrupt(str(exc)) from None
        if expected is not None and spec != expected:
            raise RingBufferCorrupt(f"geometry {spec} differs from the declared {expected}")
        if spec.total_size != size:
            raise RingBufferCorrupt(f"size {size} does not match geometry {spec}")
    except BaseException:
        m.close()
        raise
    return m, spec


class Producer:
    """The app side of one ring buffer.  Not thread-safe by itself: the tracer
    serialises calls with one lock per stream.

    The hot path is ``reserve(size)``: it returns the memfd offset at which the
    caller writes ``size`` event bytes, then the caller calls ``commit(ts)``.
    ``reserve`` returns -1 when the event must be dropped (already counted).
    """

    __slots__ = (
        "mm", "view", "q", "spec", "wakeup_fd", "pos", "sb_end", "sb_index",
        "last_ts", "discarded", "_S", "_N", "_ctrl", "_released_upto", "base",
    )

    def __init__(self, fd: int, wakeup_fd: int, spec: BufferSpec | None = None) -> None:
        self.mm, self.spec = map_buffer(fd, spec)
        self.view = memoryview(self.mm)
        self.q = self.view.cast("Q")
        self.wakeup_fd = wakeup_fd
        sp = self.spec
        self._S = sp.subbuf_size
        self._N = sp.num_subbuf
        self._ctrl = sp.ctrl_size
        head, last_ts = self.q[Q_HEAD], self.q[Q_TS]
        # Resume where a previous producer (same buffer) left off.
        self.pos = head
        self.sb_index = head // self._S
        self.sb_end = self.sb_index * self._S + sp.usable
        # memfd offset of virtual position p in the current sub-buffer: base + p
        self.base = self._ctrl + (self.sb_index % self._N - self.sb_index) * self._S
        self.last_ts = last_ts
        self.discarded = self.q[Q_DISCARDED]
        self._released_upto = 0

    def reserve(self, size: int) -> int:
        """Find room for ``size`` event bytes; returns the memfd offset or -1."""
        p = self.pos
        if p + size <= self.sb_end:
            return self.base + p
        return self._switch(size)

    def _switch(self, size: int) -> int:
        S = self._S
        if size > S - PACKET_HEADER_SIZE:
            self.drop()
            return -1
        nxt = self.sb_index + 1
        need = (nxt - self._N + 1) * S  # sub-buffer nxt-N must be fully consumed
        if need > self._released_upto:
            self._released_upto = self.q[Q_CONSUMED]
            if need > self._released_upto:
                self.drop()
                return -1
        self.close_current()
        self.sb_index = nxt
        self.pos = nxt * S
        self.sb_end = self.pos + S - PACKET_HEADER_SIZE
        self.base = self._ctrl + (nxt % self._N - nxt) * S
        return self.base + self.pos

    def close_current(self) -> None:
        """Close the current sub-buffer at ``pos`` and wake the consumer."""
        k = Q_SLOTS + 2 * (self.sb_index % self._N)
        self.q[k] = self.last_ts
        self.q[k + 1] = self.pos
        try:
            os.eventfd_write(self.wakeup_fd, 1)
        except OSError:
            pass  # consumer gone or counter saturated: never block or raise

    def commit(self, size: int, ts: int) -> None:
        self.pos += size
        self.last_ts = ts
        self.q[Q_TS] = ts
        self.q[Q_HEAD] = self.pos

    def drop(self, count: int = 1) -> None:
        self.discarded += count
        self.q[Q_DISCARDED] = self.discarded

    def close(self) -> None:
        self.q.release()
        self.view.release()
        self.mm.close()


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of whole events ready to become one CTF packet.

    ``data`` views the shared memory: copy or write it out before calling
    ``ConsumerCursor.release``.
    """

    data: memoryview
    ts_begin: int
    ts_end: int
    events_discarded: int
    end: int  # virtual ring position right after the chunk


class ConsumerCursor:
    """The consumer side of one ring buffer: turns sub-buffers into chunks."""

    def __init__(self, fd: int, spec: BufferSpec | None = None) -> None:
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

    def _slot(self, j: int) -> tuple[int, int] | None:
        k = Q_SLOTS + 2 * (j % self._N)
        end = self.q[k + 1]
        lo = j * self._S
        if end == NEVER or end < lo or end >= lo + self._S:
            return None  # not closed in this lap (stale or never)
        ts_end = self.q[k]
        if ts_end < self.last_ts:
            return None  # the slot's ts is from an earlier lap: not visible yet
        if end > lo + self._S - PACKET_HEADER_SIZE:
            raise RingBufferCorrupt(f"sub-buffer {j} closed past its end ({end})")
        return end, ts_end

    def _view(self, start: int, end: int) -> memoryview:
        off = self._ctrl + (start // self._S % self._N) * self._S + start % self._S
        return self.view[off : off + (end - start)]

    def _chunk(self, start: int, end: int, ts_end: int) -> Chunk:
        if ts_end < self.last_ts:
            raise RingBufferCorrupt(f"timestamp went backwards ({ts_end} < {self.last_ts})")
        discarded = self.q[Q_DISCARDED]
        if discarded < self.last_discarded:
            raise RingBufferCorrupt(f"events_discarded went backwards ({discarded} < {self.last_discarded})")
        c = Chunk(self._view(start, end), self.last_ts, ts_end, discarded, self._advance_to)
        self.last_ts = ts_end
        self.last_discarded = discarded
        return c

    def announce(self, count: int) -> None:
        """Add what the eventfd said: ``count`` more sub-buffers were closed."""
        self.announced += count

    def next_chunk(self, limit: tuple[int, int] | None = None) -> Chunk | None:
        """The next chunk to write, or None when there is nothing (yet).

        Sub-buffers are closed in order and each close writes the eventfd once,
        so closed sub-buffer ``j`` may be read once ``announced > j``: the
        eventfd write/read pair orders the producer's stores before our loads.

        Args:
            limit: for a flush (switch timer, stop, dead app), the
                ``(head, ts)`` pair from ``flush_limit()``.  Closed
                sub-buffers ending at or below that head, and the open one
                up to it, are taken too.

        Raises:
            RingBufferCorrupt: the producer wrote a control value the layout
                forbids; the stream must be abandoned.
        """
        S = self._S
        while True:
            c = self.consumed
            j = c // S
            slot = self._slot(j)
            if slot is not None and (self.announced > j or (limit is not None and slot[0] <= limit[0])):
                end, ts_end = slot
                if end < c:
                    raise RingBufferCorrupt(f"sub-buffer {j} closed at {end} before {c}")
                self._advance_to = (j + 1) * S
                if end == c:
                    self.release()
                    continue
                return self._chunk(c, end, ts_end)
            if limit is None:
                return None
            head, ts = limit
            if head <= c:
                # A closed sub-buffer leaves head at its end until the next
                # event lands in the following one.
                if c - head > S:
                    raise RingBufferCorrupt(f"head {head} is behind consumed {c}")
                return None
            if head // S > j + self._N:
                raise RingBufferCorrupt(f"head {head} is not reachable from {c}")
            if head // S == j and head > c:
                if head > j * S + S - PACKET_HEADER_SIZE:
                    raise RingBufferCorrupt(f"head {head} past the end of sub-buffer {j}")
                self._advance_to = head
                return self._chunk(c, head, ts)
            return None

    def discarded_pending(self) -> int:
        """Events dropped since the last chunk (a flush with none reports them)."""
        return self.q[Q_DISCARDED] - self.last_discarded

    def empty_chunk(self, ts: int) -> Chunk:
        """A chunk with no events, to carry a discarded count in a packet.

        Args:
            ts: the ``ts`` of the flush limit everything was read up to.
        """
        self._advance_to = self.consumed
        return self._chunk(self.consumed, self.consumed, max(self.last_ts, ts))

    def release(self) -> int:
        """Mark the last chunk read; returns the position after it.  Unless
        ``deferred``, the producer may reuse its space at once."""
        self.consumed = self._advance_to
        if not self.deferred:
            self.publish(self.consumed, self.last_ts)
        return self.consumed

    def publish(self, pos: int, ts: int) -> None:
        """Give the space below ``pos`` back to the producer (never backwards)."""
        q = self.q
        if pos > q[Q_CONSUMED]:
            q[Q_CONSUMED_TS] = ts
            q[Q_CONSUMED] = pos

    def skip_to(self, pos: int, ts: int) -> None:
        """Resume reading at ``pos`` (a restarted consumer that had already
        saved everything below it), publishing it."""
        if pos > self.consumed:
            self.consumed = self._advance_to = pos
            self.announced = max(self.announced, pos // self._S)
        self.last_ts = max(self.last_ts, ts)
        self.publish(pos, ts)

    def flush_limit(self, barrier=None, tries: int = 16) -> tuple[int, int] | None:
        """A consistent ``(head, ts)`` for a flush, or None if the producer
        kept moving (try again later).

        The producer stores ts, then head.  Reading ts (T1), head (H), then
        ts again (T2) and keeping the pair only when T1 == T2 gives a ts that
        is the timestamp of the event ending at H, or of the event right
        after it — both valid as the packet's timestamp_end *and* the next
        packet's timestamp_begin.  ``barrier`` (a ``MemoryBarrier``) runs
        between H and T2: after it, every byte below H is visible.
        """
        q = self.q
        for _ in range(tries):
            t1 = q[Q_TS]
            head = q[Q_HEAD]
            if barrier is not None:
                barrier()
            if q[Q_TS] == t1:
                return head, t1
        return None

    def read_head(self) -> int:
        """``head`` as the producer last published it."""
        return self.q[Q_HEAD]

    def read_ts(self) -> int:
        """The producer's last timestamp; read it *after* ``read_head`` (and
        the barrier): it is stored before head, so it is at least the
        timestamp of the event that ends at that head."""
        return self.q[Q_TS]

    def close(self) -> None:
        self.q.release()
        self.view.release()
        self.mm.close()


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
        self._syscall = None
        if self.needed and self._nr is not None:
            import ctypes

            self._syscall = ctypes.CDLL(None, use_errno=True).syscall

    def __call__(self) -> None:
        if not self.needed:
            return
        if self._syscall is None or self._syscall(self._nr, _MEMBARRIER_CMD_GLOBAL, 0, 0) != 0:
            # No membarrier (old kernel, seccomp): fall back to waiting for the
            # producer's stores to drain, which every CPU does within
            # microseconds; documented as best effort in docs/design.md.
            import time

            time.sleep(0.001)
