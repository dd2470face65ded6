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
from collections.abc import Callable, Sequence
from typing import NamedTuple

from tracewire import ctf

__all__ = ["Checkpoint", "StreamFile", "StreamFiles", "open_stream_files"]

_MAX_FILE_DIGITS = 20  # a file number is a u64: longer suffixes are not ours


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

    def continue_from(self, next_seq: int, last_discarded: int, last_ts_end: int) -> None:
        """Make an empty file continue a stream whose earlier packets are in
        another file (:class:`StreamFiles`): its first packet gets seq
        ``next_seq``.

        Raises:
            ValueError: the file holds packets already.
        """
        if self.offset or self._pending:
            raise ValueError(f"{self.path}: holds packets, it cannot start at seq {next_seq}")
        self.next_seq, self.last_discarded, self.last_ts_end = next_seq, last_discarded, last_ts_end
        self._indexed = self._checkpoint()

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


class StreamFiles:
    """A stream written as a series of files of bounded size, of which only
    the newest are kept (``enable-channel --tracefile-size S
    --tracefile-count C``): ``<directory>/<name>_<k>`` and
    ``<directory>/index/<name>_<k>.idx``, LTTng's names.

    Theory of operation: each file is a :class:`StreamFile` (whole packets,
    its own index).  ``append`` switches to a new file *before* a packet that
    would take the current one past ``size`` bytes, unless the current file
    is empty: a packet is never split, and a file is larger than ``size``
    only when that one packet alone is.  The file being left is finished
    first (its data made durable with ``sync`` when given, its index written,
    then the index made durable), so every packet before the switch is in a
    complete file, and a checkpoint taken before the switch is as good as
    the start of the new file (``rollback`` to one lands there).  The new
    file continues the stream's ``packet_seq_num`` (babeltrace2 merges the
    files of one stream and reports a gap as lost packets).

    With ``count`` C > 0, file numbers cycle 0..C-1 as LTTng's do: before the
    new file is created, the files that would make more than C are removed
    (the oldest first, data then index), so no more than C files are ever on
    disk.  With C = 1 the one file is emptied in place (truncated, which also
    works on a full disk).  With C = 0 numbers grow and nothing is removed.

    Opening continues the newest file: the stream's files are ordered by the
    ``packet_seq_num`` of their first indexed packet, files without one
    (cut by a crash right after a switch) are removed, the newest is
    recovered as a StreamFile is (if recovery leaves it empty, it goes too
    and the one before is the newest), and files beyond ``count`` are
    removed, oldest first.  The one window: with C = 1, a crash after the
    file was emptied and before its next packet is indexed leaves no packet
    to continue the numbering from, and the stream starts again at seq 0.

    The interface is StreamFile's (``append``, ``flush``, ``checkpoint``,
    ``rollback``, ``close``, ``fd`` / ``ifd`` of the current file, ...);
    ``path`` is the stream's base name, which no file has.

    Args:
        directory: the trace directory.
        name: the stream's base name (``<channel>_<n>``).
        size: bytes per file, > 0.
        count: files kept, 0: all.
        mode: permissions of files created.
        flush_every: as for StreamFile.
        sync: makes a descriptor durable (``os.fdatasync``), called when a
            file is finished; None: the caller promises no durability.

    Raises:
        ValueError: ``size`` <= 0 or ``count`` < 0.
        OSError: the files cannot be opened.
    """

    def __init__(self, directory: str, name: str, size: int, count: int = 0, mode: int = 0o640,
                 flush_every: int | None = 64, sync: Callable[[int], None] | None = None) -> None:
        if size <= 0 or count < 0:
            raise ValueError(f"tracefile size {size} must be > 0 and count {count} >= 0")
        self.directory = directory
        self.name = name
        self.path = os.path.join(directory, name)
        self.size = size
        self.count = count
        self.mode = mode
        self.flush_every = flush_every
        self._sync = sync
        self.recovered_bytes = 0  # data cut off by recovery
        self.removed_files = 0  # files removed to keep the count
        os.makedirs(os.path.join(directory, "index"), exist_ok=True)
        self._files: list[int] = []  # file numbers on disk, oldest first; the last is written
        self._file = self._open_newest()
        self._start = self._file.checkpoint() if self._file.offset == 0 else self._first_checkpoint()

    # -- naming
    def file_name(self, k: int) -> str:
        return f"{self.name}_{k}"

    @property
    def files(self) -> list[str]:
        """Paths of the stream's files, oldest first."""
        return [os.path.join(self.directory, self.file_name(k)) for k in self._files]

    # -- StreamFile's interface
    @property
    def fd(self) -> int:
        return self._file.fd

    @property
    def ifd(self) -> int:
        return self._file.ifd

    @property
    def offset(self) -> int:
        """Bytes in the current file."""
        return self._file.offset

    @property
    def next_seq(self) -> int:
        return self._file.next_seq

    @property
    def last_discarded(self) -> int:
        return self._file.last_discarded

    @property
    def last_ts_end(self) -> int:
        return self._file.last_ts_end

    @property
    def indexed_seq(self) -> int:
        return self._file.indexed_seq

    @property
    def unindexed(self) -> int:
        return self._file.unindexed

    def checkpoint(self) -> Checkpoint:
        return self._file.checkpoint()

    def append(
        self,
        parts: Sequence[bytes | memoryview],
        ts_begin: int,
        ts_end: int,
        events_discarded: int,
        stream_id: int,
        stream_instance_id: int = 0,
    ) -> int:
        """As ``StreamFile.append``, in a new file when the packet would take
        the current one past ``size``.

        Raises:
            OSError: finishing the current file, or creating the next one,
                or the write failed; the packet is not written, and the
                stream stays in a state ``append`` can go on from.
        """
        total = sum(len(p) for p in parts)
        if self._file.offset and self._file.offset + total > self.size:
            self._switch()
        return self._file.append(parts, ts_begin, ts_end, events_discarded, stream_id, stream_instance_id)

    def flush(self) -> None:
        self._file.flush()

    def rollback(self, point: Checkpoint | None = None) -> None:
        """As ``StreamFile.rollback``; a point from before the last switch is
        the start of the current file (everything before it is in finished
        files, durable when ``sync`` is given)."""
        if point is not None and point.next_seq <= self._start.next_seq:
            point = self._start
        self._file.rollback(point)

    def close(self) -> None:
        self._file.close()

    # -- files
    def _index_path(self, k: int) -> str:
        return os.path.join(self.directory, "index", self.file_name(k) + ".idx")

    def _first_seq(self, k: int) -> int | None:
        """The seq of file ``k``'s first indexed packet (None: it has none)."""
        size = len(ctf.INDEX_HEADER) + ctf.INDEX_ENTRY_SIZE
        try:
            fd = os.open(self._index_path(k), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        if len(data) < size:
            return None
        try:
            return ctf.read_index(data, path=self._index_path(k))[0].packet_seq_num
        except (ctf.CTFError, IndexError):
            return None

    def _scan(self) -> list[tuple[int, int]]:
        """(first seq, number) of the stream's files holding a packet, oldest
        first; files holding none are removed."""
        prefix = self.name + "_"
        found: list[tuple[int, int]] = []
        with os.scandir(self.directory) as it:
            for entry in it:
                rest = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
                if not (rest.isascii() and rest.isdigit() and len(rest) <= _MAX_FILE_DIGITS) \
                        or rest != str(int(rest)) or not entry.is_file(follow_symlinks=False):
                    continue
                k = int(rest)
                first = self._first_seq(k)
                if first is None:
                    self._remove(k)
                else:
                    found.append((first, k))
        found.sort()
        return found

    def _open_newest(self) -> StreamFile:
        found = self._scan()
        while found:
            k = found[-1][1]
            f = StreamFile(self.directory, self.file_name(k), self.mode, self.flush_every)
            self.recovered_bytes += f.recovered_bytes
            if f.offset:
                break
            f.close()  # recovery left nothing: the one before is the newest
            self._remove(k)
            found.pop()
        else:
            self._files = [0]
            return StreamFile(self.directory, self.file_name(0), self.mode, self.flush_every)
        while self.count and len(found) > self.count:
            self._remove(found.pop(0)[1])
        self._files = [k for _, k in found]
        return f

    def _first_checkpoint(self) -> Checkpoint:
        """The start of the current (reopened) file: where its first packet begins."""
        first = self._first_seq(self._files[-1])
        assert first is not None
        return Checkpoint(0, first, 0, 0, len(ctf.INDEX_HEADER))

    def _remove(self, k: int) -> None:
        """Remove file ``k`` and its index (either may be missing)."""
        for path in (os.path.join(self.directory, self.file_name(k)), self._index_path(k)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if k in self._files:
            self._files.remove(k)
        self.removed_files += 1

    def _switch(self) -> None:
        """Finish the current file and go on in the next one."""
        old = self._file
        if self._sync is not None:
            self._sync(old.fd)
        old.flush()
        if self._sync is not None:
            self._sync(old.ifd)
        start = Checkpoint(0, old.next_seq, old.last_discarded, old.last_ts_end, len(ctf.INDEX_HEADER))
        if self.count == 1:
            # Emptied in place: only shrinking, so it works on a full disk.
            old.rollback(start)
            self._start = start
            self.removed_files += 1
            return
        cur = self._files[-1]
        nxt = (cur + 1) % self.count if self.count else cur + 1
        if nxt in self._files:
            self._remove(nxt)  # an older file of that name (LTTng's cycle)
        while self.count and len(self._files) >= self.count:
            self._remove(self._files[0])
        new = StreamFile(self.directory, self.file_name(nxt), self.mode, self.flush_every)
        try:
            if new.offset:  # not ours, or left behind: start it afresh
                new.rollback(Checkpoint(0, 0, 0, 0, len(ctf.INDEX_HEADER)))
            new.continue_from(start.next_seq, start.last_discarded, start.last_ts_end)
        except BaseException:
            new.close()
            raise
        self._files.append(nxt)
        self._file, self._start = new, new.checkpoint()
        old.close()


def open_stream_files(directory: str, name: str, size: int = 0, count: int = 0, mode: int = 0o640,
                      flush_every: int | None = 64,
                      sync: Callable[[int], None] | None = None) -> StreamFile | StreamFiles:
    """Stream ``name`` of ``directory``: one StreamFile (``size`` 0, the
    stream's file is ``name``), or StreamFiles of at most ``size`` bytes,
    the newest ``count`` (0: all) kept.

    Raises:
        ValueError: a negative size or count, or a count without a size.
        OSError: the files cannot be opened.
    """
    if size:
        return StreamFiles(directory, name, size, count, mode, flush_every, sync)
    if count:
        raise ValueError(f"tracefile count {count} without a tracefile size")
    return StreamFile(directory, name, mode, flush_every)


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
