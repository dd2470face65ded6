"""A CTF stream file and its LTTng index, written one whole packet at a time.

Used by consumerd's local sink and by relayd.  Opening an existing stream
*recovers* it: a partial index entry is cut off, index entries pointing past
the end of the data are dropped, and data past the last indexed packet (a
packet whose write was interrupted) is truncated — so the file always ends on
a packet boundary and appending continues the same trace with the next
``packet_seq_num``.  Recovery only ever shrinks files, so it works on a full
filesystem; only a brand-new (or unreadable) index needs its 32-byte header
written.

A failed write never leaves a partial packet: ``append`` cuts its own partial
packet back, and ``rollback`` returns both files to the last packet whose
index entry is written (shrinking only), which is what a failed index write
needs and what the relay does before asking a consumer to resend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

from tracewire import ctf

__all__ = ["Checkpoint", "StreamFile"]


class Checkpoint(NamedTuple):
    """A point a StreamFile can roll back to."""

    offset: int  # end of the last packet
    next_seq: int
    last_discarded: int
    last_ts_end: int
    index_size: int  # bytes of the index file


class StreamFile:
    """``<directory>/<name>`` and ``<directory>/index/<name>.idx``.

    Args:
        directory: the trace directory.
        name: the stream file's name.
        mode: permissions of files created.
        flush_every: index entries buffered before ``append`` writes them
            itself; None: only ``flush()`` writes them (a caller that makes
            the data durable before its index entries).
    """

    def __init__(self, directory: str, name: str, mode: int = 0o640, flush_every: int | None = 64) -> None:
        self.path = os.path.join(directory, name)
        self.index_path = os.path.join(directory, "index", name + ".idx")
        self.flush_every = flush_every
        os.makedirs(os.path.dirname(self.index_path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        try:
            self.ifd = os.open(self.index_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        except OSError:
            os.close(self.fd)
            raise
        self.next_seq = 0
        self.offset = 0
        self.last_discarded = 0
        self.last_ts_end = 0
        self.recovered_bytes = 0  # data cut off by recovery
        self._pending: list[bytes] = []
        self._index_size = len(ctf.INDEX_HEADER)
        # The state as of the last index entry written: what rollback() returns to.
        self._indexed = Checkpoint(0, 0, 0, 0, self._index_size)
        try:
            self._recover()
        except OSError:
            os.close(self.fd)
            os.close(self.ifd)
            raise

    @property
    def indexed_seq(self) -> int:
        """The seq of the last packet whose index entry is written (-1: none)."""
        return self._indexed.next_seq - 1

    @property
    def unindexed(self) -> int:
        """Packets written whose index entries wait for ``flush()``."""
        return len(self._pending)

    def _recover(self) -> None:
        # Shrink first, write last: on a full filesystem every step but the
        # header of a new index succeeds.
        size = os.fstat(self.ifd).st_size
        header_ok = False
        entries: list[ctf.IndexEntry] = []
        if size >= len(ctf.INDEX_HEADER):
            n = (size - len(ctf.INDEX_HEADER)) // ctf.INDEX_ENTRY_SIZE
            keep = len(ctf.INDEX_HEADER) + n * ctf.INDEX_ENTRY_SIZE
            try:
                entries = ctf.read_index(os.pread(self.ifd, keep, 0), path=self.index_path)
                header_ok = True
            except ctf.CTFError:
                entries = []
        data_size = os.fstat(self.fd).st_size
        good = 0
        end = 0
        for e in entries:
            e_end = e.offset + e.packet_size // 8
            if e.offset != end or e_end > data_size:
                break
            end = e_end
            good += 1
        self._index_size = len(ctf.INDEX_HEADER) + good * ctf.INDEX_ENTRY_SIZE
        if data_size != end:
            self.recovered_bytes = data_size - end
            os.ftruncate(self.fd, end)
        if not header_ok:
            os.ftruncate(self.ifd, 0)
            _pwrite_all(self.ifd, ctf.INDEX_HEADER, 0)
        elif size != self._index_size:
            os.ftruncate(self.ifd, self._index_size)
        self.offset = end
        if good:
            last = entries[good - 1]
            self.next_seq = last.packet_seq_num + 1
            self.last_discarded = last.events_discarded
            self.last_ts_end = last.timestamp_end
        self._indexed = self._checkpoint()

    def _checkpoint(self) -> Checkpoint:
        return Checkpoint(self.offset, self.next_seq, self.last_discarded, self.last_ts_end, self._index_size)

    def checkpoint(self) -> Checkpoint:
        """Where the files stand as of the last index entry written; give it
        to ``rollback`` to come back here (e.g. the last point made durable)."""
        return self._indexed

    def append(
        self,
        parts: Sequence[bytes | memoryview],
        ts_begin: int,
        ts_end: int,
        events_discarded: int,
        stream_id: int,
        stream_instance_id: int = 0,
    ) -> int:
        """Write one whole packet (its parts in order); returns its seq number.

        The index entry is buffered until ``flush()`` (or ``flush_every``
        entries): the data always reaches the file first, so a crash leaves
        an index that is a prefix of the data.

        Raises:
            OSError: the write failed; no byte of this packet is left in the
                file (an automatic index flush failing: see ``flush``).
        """
        total = sum(len(p) for p in parts)
        try:
            written = _pwritev_all(self.fd, parts, total, self.offset)
        except OSError:
            # Never leave a partial packet behind: cut back to the last whole
            # one (best effort: the write's own error is the one to report).
            try:
                os.ftruncate(self.fd, self.offset)
            except OSError:
                pass
            raise
        assert written == total
        bits = total * 8
        seq = self.next_seq
        self._pending.append(
            ctf.pack_index_entry(
                self.offset, bits, bits, ts_begin, ts_end, events_discarded, stream_id,
                stream_instance_id, seq,
            )
        )
        self.offset += total
        self.next_seq = seq + 1
        self.last_discarded = events_discarded
        self.last_ts_end = ts_end
        if self.flush_every is not None and len(self._pending) >= self.flush_every:
            self.flush()
        return seq

    def flush(self) -> None:
        """Write the buffered index entries.

        Raises:
            OSError: the write failed; the entries stay buffered and the
                index may end in a partial entry until ``rollback()`` (or
                recovery at the next open) cuts it.
        """
        if self._pending:
            _pwrite_all(self.ifd, b"".join(self._pending), self._index_size)
            self._index_size += len(self._pending) * ctf.INDEX_ENTRY_SIZE
            self._pending.clear()
            self._indexed = self._checkpoint()

    def rollback(self, point: Checkpoint | None = None) -> None:
        """Forget every packet after ``point`` (default: every packet whose
        index entry is not written): cut both files back (only shrinking, so
        it works on a full disk) and continue from there.

        Raises:
            OSError: a truncate failed (the files are then recovered at the
                next open); the in-memory state is rolled back regardless.
        """
        point = point or self._indexed
        self._pending.clear()
        self._indexed = point
        self.offset, self.next_seq, self.last_discarded = point.offset, point.next_seq, point.last_discarded
        self.last_ts_end, self._index_size = point.last_ts_end, point.index_size
        os.ftruncate(self.fd, self.offset)
        os.ftruncate(self.ifd, self._index_size)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            os.close(self.fd)
            os.close(self.ifd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pwritev_all(fd: int, parts: Sequence[bytes | memoryview], total: int, offset: int) -> int:
    """Write ``parts`` at ``offset``, finishing short writes; returns ``total``."""
    written = os.pwritev(fd, parts, offset)
    if written != total:
        rest = memoryview(b"".join(bytes(p) for p in parts))[written:]
        _pwrite_all(fd, bytes(rest), offset + written)
    return total
