"""The relay sink's spool: every packet read from a ring buffer is appended to
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

Layout: ``<dir>/<stream key>.<segment>``, segments of ``segment_size`` bytes;
a segment is deleted when all its packets are acknowledged.  Record:
``<QQQQQIB I`` (seq, ts_begin, ts_end, events_discarded, ring_end, raw_len,
codec, data_len) then ``data_len`` bytes.  The spool is written and read by
consumerd only (a directory of the session owner's), but a truncated or
damaged tail — a crash mid-append — is cut off on load, not trusted.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

__all__ = ["Spool", "SpoolRecord"]

_REC = struct.Struct("<QQQQQIBI")
MAX_RECORD_DATA = 256 * 1024 * 1024


@dataclass(slots=True)
class SpoolRecord:
    """One spooled packet: its place in the stream and the ring, and its
    (possibly compressed) bytes."""

    seq: int
    ts_begin: int
    ts_end: int
    events_discarded: int
    ring_end: int
    raw_len: int
    codec: int
    data: bytes


class _Segment:
    """One segment file of a stream: its open fd, size and last seq (-1: empty)."""

    __slots__ = ("path", "fd", "size", "last_seq")

    def __init__(self, path: str, fd: int, size: int, last_seq: int) -> None:
        self.path, self.fd, self.size, self.last_seq = path, fd, size, last_seq


class Spool:
    """Segment files per stream, with a total size cap."""

    def __init__(self, directory: str, cap_bytes: int, segment_size: int = 8 * 1024 * 1024) -> None:
        self.directory = directory
        self.cap = cap_bytes
        self.segment_size = segment_size
        self.size = 0
        self._segments: dict[str, list[_Segment]] = {}
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def has_room(self) -> bool:
        """False once the spool holds its cap: stop reading the rings."""
        return self.size < self.cap

    def load(self, key: str) -> list[SpoolRecord]:
        """Records left by an earlier consumerd for stream ``key``, in order."""
        prefix = key + "."
        names = sorted(
            (n for n in os.listdir(self.directory) if n.startswith(prefix) and n[len(prefix):].isdigit()),
            key=lambda n: int(n[len(prefix):]),
        )
        out: list[SpoolRecord] = []
        segs = self._segments.setdefault(key, [])
        for name in names:
            path = os.path.join(self.directory, name)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            data = b""
            size = os.fstat(fd).st_size
            while len(data) < size:
                chunk = os.pread(fd, size - len(data), len(data))
                if not chunk:
                    break
                data += chunk
            off, last = 0, -1
            while off + _REC.size <= len(data):
                seq, tb, te, disc, ring_end, raw_len, codec, n = _REC.unpack_from(data, off)
                if n > MAX_RECORD_DATA or off + _REC.size + n > len(data):
                    break
                body = data[off + _REC.size : off + _REC.size + n]
                if out and seq != out[-1].seq + 1:
                    break
                out.append(SpoolRecord(seq, tb, te, disc, ring_end, raw_len, codec, body))
                last = seq
                off += _REC.size + n
            if off != len(data):
                os.ftruncate(fd, off)  # a crash mid-append: cut the partial record
            segs.append(_Segment(path, fd, off, last))
            self.size += off
        return out

    def append(self, key: str, rec: SpoolRecord) -> None:
        """Add a packet of stream ``key`` at the end of its last segment.

        Raises:
            OSError: the write failed (disk full): the record is not kept.
        """
        segs = self._segments.setdefault(key, [])
        if not segs or segs[-1].size >= self.segment_size:
            n = int(segs[-1].path.rsplit(".", 1)[1]) + 1 if segs else 0
            path = os.path.join(self.directory, f"{key}.{n}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            segs.append(_Segment(path, fd, 0, -1))
        seg = segs[-1]
        head = _REC.pack(rec.seq, rec.ts_begin, rec.ts_end, rec.events_discarded, rec.ring_end,
                         rec.raw_len, rec.codec, len(rec.data))
        total = len(head) + len(rec.data)
        written = os.pwritev(seg.fd, [head, rec.data], seg.size)
        if written != total:
            raise OSError(f"short write to spool {seg.path}")
        seg.size += total
        seg.last_seq = rec.seq
        self.size += total

    def acknowledged(self, key: str, seq: int) -> None:
        """Forget whole segments whose packets are all acknowledged."""
        segs = self._segments.get(key)
        while segs and segs[0].last_seq <= seq and (len(segs) > 1 or segs[0].last_seq >= 0):
            seg = segs[0]
            if len(segs) == 1:
                # The live segment: empty it in place.
                os.ftruncate(seg.fd, 0)
                self.size -= seg.size
                seg.size, seg.last_seq = 0, -1
                break
            segs.pop(0)
            os.close(seg.fd)
            try:
                os.unlink(seg.path)
            except FileNotFoundError:
                pass
            self.size -= seg.size

    def remove(self, key: str) -> None:
        """Delete every segment of stream ``key`` (its session is removed)."""
        for seg in self._segments.pop(key, []):
            os.close(seg.fd)
            self.size -= seg.size
            try:
                os.unlink(seg.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Close the segment files (they stay, for a restarted consumerd)."""
        for segs in self._segments.values():
            for seg in segs:
                os.close(seg.fd)
        self._segments.clear()
