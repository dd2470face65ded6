"""A CTF stream file and its LTTng index, written one whole packet at a time.

Used by consumerd's local sink and by relayd.  Opening an existing stream
*recovers* it: a partial index entry is cut off, index entries pointing past
the end of the data are dropped, and data past the last indexed packet (a
packet whose write was interrupted) is truncated — so the file always ends on
a packet boundary and appending continues the same trace with the next
``packet_seq_num``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tracewire import ctf

__all__ = ["StreamFile"]


class StreamFile:
    """``<directory>/<name>`` and ``<directory>/index/<name>.idx``."""

    def __init__(self, directory: str, name: str, mode: int = 0o640) -> None:
        self.path = os.path.join(directory, name)
        self.index_path = os.path.join(directory, "index", name + ".idx")
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
        self._recover()

    def _recover(self) -> None:
        size = os.fstat(self.ifd).st_size
        if size < len(ctf.INDEX_HEADER):
            os.ftruncate(self.ifd, 0)
            os.pwrite(self.ifd, ctf.INDEX_HEADER, 0)
            entries = []
        else:
            n = (size - len(ctf.INDEX_HEADER)) // ctf.INDEX_ENTRY_SIZE
            keep = len(ctf.INDEX_HEADER) + n * ctf.INDEX_ENTRY_SIZE
            data = os.pread(self.ifd, keep, 0)
            try:
                entries = ctf.read_index(data, path=self.index_path)
            except ctf.CTFError:
                entries = []
                keep = 0
            if keep == 0:
                os.ftruncate(self.ifd, 0)
                os.pwrite(self.ifd, ctf.INDEX_HEADER, 0)
            elif keep != size:
                os.ftruncate(self.ifd, keep)
        data_size = os.fstat(self.fd).st_size
        good = 0
        end = 0
        for e in entries:
            e_end = e.offset + e.packet_size // 8
            if e.offset != end or e_end > data_size:
                break
            end = e_end
            good += 1
        if good != len(entries):
            os.ftruncate(self.ifd, len(ctf.INDEX_HEADER) + good * ctf.INDEX_ENTRY_SIZE)
        if data_size != end:
            self.recovered_bytes = data_size - end
            os.ftruncate(self.fd, end)
        self.offset = end
        if good:
            last = entries[good - 1]
            self.next_seq = last.packet_seq_num + 1
            self.last_discarded = last.events_discarded
            self.last_ts_end = last.timestamp_end
        os.lseek(self.fd, end, os.SEEK_SET)
        os.lseek(self.ifd, 0, os.SEEK_END)

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

        The index entry is buffered until ``flush()``: the data always reaches
        the file first, so a crash leaves an index that is a prefix of the data.
        """
        total = sum(len(p) for p in parts)
        try:
            written = os.writev(self.fd, parts)
            if written != total:  # short write: finish it (or raise, e.g. ENOSPC)
                rest = b"".join(bytes(p) for p in parts)[written:]
                while rest:
                    rest = rest[os.write(self.fd, rest):]
        except OSError:
            # Never leave a partial packet behind: cut back to the last whole
            # one (best effort: the write's own error is the one to report).
            try:
                os.ftruncate(self.fd, self.offset)
                os.lseek(self.fd, self.offset, os.SEEK_SET)
            except OSError:
                pass
            raise
        bits = total * 8
        seq = self.next_seq
        self._pending.append(
            ctf.pack_index_entry(
                self.offset, bits, bits, ts_begin, ts_end, events_discarded, stream_id,
                stream_instance_id, seq,
            )
        )
        if len(self._pending) >= 64:
            self.flush()
        self.offset += total
        self.next_seq = seq + 1
        self.last_discarded = events_discarded
        self.last_ts_end = ts_end
        return seq

    def flush(self) -> None:
        if self._pending:
            os.write(self.ifd, b"".join(self._pending))
            self._pending.clear()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            os.close(self.fd)
            os.close(self.ifd)
