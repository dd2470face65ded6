"""The relay sink's spool: every packet read from a ring buffer is written to
a local segment file before the ring space is given back, and forgotten once
the relay acknowledges it.

Why: the ring buffers belong to sessiond and survive consumerd; the spool is
the bridge between "read from the ring" and "acknowledged by the relay".  A
consumerd killed at any moment restarts, reloads the spool (every packet it
had read and not seen acknowledged, with its seq), resumes reading the ring
after the last spooled packet, and resends — the relay drops duplicates.
While the relay is unreachable the spool grows up to its cap; past the cap
the consumer stops reading the rings, which then discard new events and count
them in the trace (``events_discarded``) and in ``tracewire status``.

The spool is also where a packet is sent *from* when it cannot go at once:
a packet's bytes are written once, from the ring's shared memory to the
segment (``pwritev`` of the CTF header and a view of the ring: no copy in
Python); one the socket takes at once goes from the ring itself, the rest
from the segment's pages (``os.sendfile``).  No packet is kept in
consumerd's memory.

Cost: writing to a file page that does not exist yet allocates and zeroes it
(on tmpfs, ``/run``, most of the write's cost), and truncating or unlinking
frees it again.  So segments are *recycled*: a segment whose packets are all
acknowledged is not deleted but kept as a spare (``keep_free`` per stream),
and the next segment is written over it.  Steady streaming then writes into
pages that are already there.  How many spares a stream keeps follows what
it needs: as many as it had segments in use at most over the last
``trim_after`` seconds (at least ``keep_free``), so a stream streaming fast
behind a relay that acknowledges every 0.1 s writes over its own spares,
and a stream gone quiet, or past an outage, gives the space back within
``2 * trim_after`` seconds (``trim()``, which consumerd calls every
``trim_after`` seconds).  Spares hold disk (on tmpfs: memory) space, and
go with their stream.  Beyond ``keep_free`` per stream, a spare is kept only
while the segments in use and all spares fit in the cap, and a new segment
file first deletes such extra spares (any stream's) that would take the
spool past it: what the spool holds on disk then stays within the cap, plus
``keep_free`` spares and the segment being written per stream, plus the
packet written after the last check (sessiond's accounting charges exactly
that to the session's owner, see sessiond/accounting.py).

Layout: ``<dir>/<stream key>.<n>``.  A segment starts with a 16-byte header
``<IIQ`` (magic ``TWSP``, version, generation); each reuse of the file writes
a new generation.  Then records: a 64-byte header ``<IIQQQQQQII`` (CRC-32 of
the 60 bytes after it, codec, generation, seq, ts_begin, ts_end,
events_discarded, ring_end, raw_len, data_len) followed by ``data_len``
bytes.  A record's data is written before its header, so a consumerd killed
mid-append leaves no header in front of data that is not all there; a
segment's records end at the first header that is not of the segment's
generation, fails its CRC, runs past the file's end or breaks the seq
sequence (a reused segment's older records stay behind the new ones and
are never read as new).  The spool is written and read by consumerd only (a
directory of the session owner's), but its content is checked on load, not
trusted.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tracewire.wire import Buffer

__all__ = ["Spool", "SpoolRecord", "SpoolRef", "parts_size", "spool_in_use"]

_SEG = struct.Struct("<IIQ")
_SEG_MAGIC = 0x50535754  # "TWSP"
_SEG_VERSION = 2
_REC = struct.Struct("<IIQQQQQQII")
MAX_RECORD_DATA = 256 * 1024 * 1024


@dataclass(slots=True)
class SpoolRecord:
    """One spooled packet: its place in the stream and the ring, and where
    its (possibly compressed) bytes are."""

    seq: int
    ts_begin: int
    ts_end: int
    events_discarded: int
    ring_end: int
    raw_len: int
    codec: int
    ref: SpoolRef


def parts_size(parts: Sequence[Buffer]) -> int:
    """The bytes of ``parts`` (bytes-like objects) back to back."""
    return sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)


class _Segment:
    """One segment file of a stream: its open fd, generation, size (the end
    of its last record), last seq (-1: empty) and the file's size (what it
    holds on disk, old records past ``size`` included: kept here as the
    spool writes and truncates it, rather than asked of the kernel each
    time the spool weighs its spares)."""

    __slots__ = ("path", "fd", "gen", "size", "last_seq", "closed", "file_size")

    def __init__(self, path: str, fd: int, gen: int, file_size: int = 0) -> None:
        self.path, self.fd, self.gen = path, fd, gen
        self.size = _SEG.size
        self.last_seq = -1
        self.closed = False
        self.file_size = file_size

    def start(self, gen: int) -> None:
        """(Re)start the segment empty, with generation ``gen``.

        Raises:
            OSError: the header could not be written.
        """
        os.pwrite(self.fd, _SEG.pack(_SEG_MAGIC, _SEG_VERSION, gen), 0)
        self.gen, self.size, self.last_seq = gen, _SEG.size, -1
        self.file_size = max(self.file_size, _SEG.size)

    def truncate(self, size: int) -> None:
        """Cut the file to ``size`` bytes.

        Raises:
            OSError: it could not be truncated.
        """
        os.ftruncate(self.fd, size)
        self.file_size = size

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


@dataclass(frozen=True, slots=True)
class SpoolRef:
    """Where a spooled packet's bytes are: ``length`` bytes at ``offset`` of
    a segment (valid until the packet is acknowledged)."""

    segment: _Segment
    offset: int
    length: int

    @property
    def fd(self) -> int:
        """The segment's descriptor (for ``os.sendfile``)."""
        return self.segment.fd

    def read(self) -> bytes:
        """The bytes (a copy: for a TLS connection, which cannot sendfile).

        Raises:
            OSError: the segment could not be read, or is shorter than the record.
        """
        data = os.pread(self.segment.fd, self.length, self.offset)
        if len(data) != self.length:
            raise OSError(f"spool {self.segment.path}: record cut short")
        return data


class Spool:
    """Segment files per stream, recycled, with a total size cap."""

    def __init__(self, directory: str, cap_bytes: int, segment_size: int = 1024 * 1024,
                 keep_free: int = 2, trim_after: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.cap = cap_bytes
        self.segment_size = segment_size
        self.keep_free = keep_free
        self.trim_after = trim_after
        self._clock = clock
        # Per stream: the most segments in use since the last trim, the
        # number of spares it may keep until the next, and when that is.
        self._peak: dict[str, int] = {}
        self._keep: dict[str, int] = {}
        self._trim_at: dict[str, float] = {}
        self.size = 0  # bytes of the segments in use (not the spares)
        self._segments: dict[str, list[_Segment]] = {}  # in use, oldest first
        self._free: dict[str, list[_Segment]] = {}  # spares, ready to be written over
        self._numbers: dict[str, int] = {}  # the next new segment's number
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # Held while this spool is in use (see spool_in_use): a new
        # sessiond resuming the spool waits for an earlier consumerd to go.
        self._lock_fd = _lock_directory(directory)

    def has_room(self) -> bool:
        """False once the spool holds its cap: stop reading the rings."""
        return self.size < self.cap

    # ------------------------------------------------------------ loading
    def holds(self, key: str) -> bool:
        """Whether stream ``key`` has segment files (spooled packets, or
        spares an earlier consumerd left)."""
        prefix = key + "."
        return any(n.startswith(prefix) and n[len(prefix):].isdigit() for n in os.listdir(self.directory))

    def load(self, key: str) -> list[SpoolRecord]:
        """Records left by an earlier consumerd for stream ``key``, in order."""
        prefix = key + "."
        numbers = sorted(int(n[len(prefix):]) for n in os.listdir(self.directory)
                         if n.startswith(prefix) and n[len(prefix):].isdigit())
        self._numbers[key] = numbers[-1] + 1 if numbers else 0
        loaded: list[tuple[_Segment, list[SpoolRecord]]] = []
        free = self._free.setdefault(key, [])
        for number in numbers:
            path = os.path.join(self.directory, f"{key}.{number}")
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            seg = _Segment(path, fd, 0)
            try:
                seg.file_size = os.fstat(fd).st_size
                recs = self._read_segment(seg)
            except BaseException:
                seg.close()
                raise
            if recs:
                loaded.append((seg, recs))
            else:
                free.append(seg)
        # Recycled files are not in seq order by name: by their first seq.
        # The stream's records are the run of consecutive seqs that ends
        # with the newest one; a segment before a gap is an old one (a spare
        # whose new generation was not written yet when consumerd died).
        loaded.sort(key=lambda sr: sr[1][0].seq)
        start = len(loaded)
        while start > 0 and (start == len(loaded) or loaded[start - 1][1][-1].seq + 1 == loaded[start][1][0].seq):
            start -= 1
        out: list[SpoolRecord] = []
        segs = self._segments.setdefault(key, [])
        for i, (seg, recs) in enumerate(loaded):
            if i < start:
                free.append(seg)
                continue
            out += recs
            segs.append(seg)
            self.size += seg.size
        spares = free[:]
        free.clear()
        for seg in spares:
            self._recycle(key, seg, in_use=False)
        return out

    def _read_segment(self, seg: _Segment) -> list[SpoolRecord]:
        """The valid records of ``seg`` (see the module docstring); sets its
        generation, size and seqs."""
        file_size = seg.file_size
        head = os.pread(seg.fd, _SEG.size, 0)
        if len(head) < _SEG.size:
            return []
        magic, version, gen = _SEG.unpack(head)
        if magic != _SEG_MAGIC or version != _SEG_VERSION:
            return []
        seg.gen = gen
        out: list[SpoolRecord] = []
        off = _SEG.size
        while off + _REC.size <= file_size:
            raw = os.pread(seg.fd, _REC.size, off)
            if len(raw) < _REC.size:
                break
            crc, codec, rgen, seq, tb, te, disc, ring_end, raw_len, n = _REC.unpack(raw)
            if crc != zlib.crc32(raw[4:]) or rgen != gen or n > MAX_RECORD_DATA:
                break
            if off + _REC.size + n > file_size or (out and seq != out[-1].seq + 1):
                break
            ref = SpoolRef(seg, off + _REC.size, n)
            out.append(SpoolRecord(seq, tb, te, disc, ring_end, raw_len, codec, ref))
            off += _REC.size + n
        seg.size = off
        if out:
            seg.last_seq = out[-1].seq
        return out

    # ------------------------------------------------------------ writing
    def append(self, key: str, parts: Sequence[Buffer], seq: int, ts_begin: int, ts_end: int,
               events_discarded: int, ring_end: int, raw_len: int, codec: int) -> SpoolRecord:
        """Write a packet of stream ``key`` (its bytes: ``parts`` back to back)
        after the stream's last one.

        Raises:
            OSError: the write failed (disk full): the record is not kept.
        """
        seg = self._writable(key)
        n = parts_size(parts)
        data_off = seg.size + _REC.size
        # The data first, then the header that makes it a record.
        written = os.pwritev(seg.fd, parts, data_off) if n else 0
        if written != n:
            raise OSError(f"short write to spool {seg.path}")
        body = _REC.pack(0, codec, seg.gen, seq, ts_begin, ts_end, events_discarded, ring_end, raw_len, n)
        head = struct.pack("<I", zlib.crc32(memoryview(body)[4:])) + body[4:]
        if os.pwrite(seg.fd, head, seg.size) != _REC.size:
            raise OSError(f"short write to spool {seg.path}")
        total = _REC.size + n
        seg.size += total
        seg.file_size = max(seg.file_size, seg.size)
        seg.last_seq = seq
        self.size += total
        return SpoolRecord(seq, ts_begin, ts_end, events_discarded, ring_end, raw_len, codec,
                           SpoolRef(seg, data_off, n))

    def _writable(self, key: str) -> _Segment:
        """The segment the next record of ``key`` goes to: the last one, or a
        spare written over, or a new file."""
        segs = self._segments.setdefault(key, [])
        if segs and segs[-1].size < self.segment_size:
            return segs[-1]
        if segs and segs[-1].file_size > segs[-1].size:
            # A full segment written over a spare: the spare's older records
            # past its end hold space for nothing.
            segs[-1].truncate(segs[-1].size)
        free = self._free.setdefault(key, [])
        if free:
            seg = free.pop()
            if seg.file_size > 2 * self.segment_size:
                seg.truncate(self.segment_size)  # a huge packet's file: give the excess back
            self.size += seg.size
        else:
            self._shed_extra_spares()
            number = self._numbers.get(key, 0)
            self._numbers[key] = number + 1
            path = os.path.join(self.directory, f"{key}.{number}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            seg = _Segment(path, fd, 0)
            try:
                seg.start(1)
            except BaseException:
                self._drop(seg)
                raise
            self.size += seg.size
        segs.append(seg)
        if len(segs) > self._peak.get(key, 0):
            self._peak[key] = len(segs)
        return seg

    def acknowledged(self, key: str, seq: int) -> None:
        """Recycle whole segments whose packets are all acknowledged (the one
        being written stays while it has room: the next packets go after what
        it holds)."""
        segs = self._segments.get(key)
        self._spares_wanted(key)  # a new period starts counting from the segments in use now
        while segs and segs[0].last_seq <= seq and (len(segs) > 1 or segs[0].size >= self.segment_size):
            if segs[0].last_seq < 0:
                break  # a segment just started: nothing in it yet
            self._recycle(key, segs.pop(0))

    def _spares_wanted(self, key: str) -> int:
        """How many spares stream ``key`` may keep now (see the module
        docstring); past a trim period, the extra ones go."""
        now = self._clock()
        segs, free = self._segments.get(key, []), self._free.setdefault(key, [])
        if now >= self._trim_at.get(key, 0.0):
            self._keep[key] = max(self.keep_free, self._peak.get(key, 0))
            self._peak[key] = len(segs)
            self._trim_at[key] = now + self.trim_after
            while len(free) > self._keep[key]:
                self._drop(free.pop(0))
        # What it needed before, or needs now if that is more.
        return max(self._keep.get(key, self.keep_free), self._peak.get(key, 0))

    def trim(self) -> None:
        """Delete the spares each stream no longer needs (see the module docstring)."""
        for key in list(self._free):
            self._spares_wanted(key)

    def _recycle(self, key: str, seg: _Segment, in_use: bool = True) -> None:
        """Keep ``seg`` as a spare (its old records made invalid at once by a
        new generation), or delete it when the stream has enough spares."""
        if in_use:
            self.size -= seg.size
        free = self._free.setdefault(key, [])
        if len(free) < self._spares_wanted(key) and (
                len(free) < self.keep_free or self.size + self.spare_bytes() + seg.file_size <= self.cap):
            try:
                seg.start(seg.gen + 1)
                free.append(seg)
                return
            except OSError:
                pass
        self._drop(seg)

    def spare_bytes(self) -> int:
        """What the spares hold on disk (their files, old records and all)."""
        return sum(seg.file_size for free in self._free.values() for seg in free)

    def _shed_extra_spares(self) -> None:
        """Delete spares beyond each stream's ``keep_free``, oldest first,
        while the segments in use and the spares exceed the cap."""
        extra = [(key, seg) for key, free in self._free.items() for seg in free[:max(0, len(free) - self.keep_free)]]
        total = self.size + self.spare_bytes()
        for key, seg in extra:
            if total <= self.cap:
                return
            total -= seg.file_size
            self._free[key].remove(seg)
            self._drop(seg)

    def remove(self, key: str) -> None:
        """Delete every segment of stream ``key`` (finished and acknowledged,
        or its session removed)."""
        for seg in self._segments.pop(key, []):
            self.size -= seg.size
            self._drop(seg)
        for seg in self._free.pop(key, []):
            self._drop(seg)
        for d in (self._numbers, self._peak, self._keep, self._trim_at):
            d.pop(key, None)

    @staticmethod
    def _drop(seg: _Segment) -> None:
        seg.close()
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Close the segment files (they stay, for a restarted consumerd)."""
        for group in (self._segments, self._free):
            for segs in group.values():
                for seg in segs:
                    seg.close()
            group.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _lock_directory(directory: str) -> int:
    """An flock on ``directory``, held by the returned descriptor; -1 when
    another process holds it (the spool is used all the same, as before)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return -1
    return fd


def spool_in_use(directory: str) -> bool:
    """Whether a live consumerd holds the spool in ``directory`` (a missing
    directory is in nobody's use).

    Raises:
        OSError: ``directory`` cannot be opened (not a directory, a link).
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
