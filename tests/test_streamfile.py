"""StreamFiles: a stream cut into files of bounded size, the newest kept
(``--tracefile-size`` / ``--tracefile-count``).  Plain sync tests on a
temporary directory; packets come from tests/test_relayd.py's Trace."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from test_relayd import CREATED, TICK, TIMEOUT, Client, Trace, event_seqs, packet_msg, running_relay

from tracewire import ctf
from tracewire.streamfile import StreamFile, StreamFiles
from tracewire.wire import Metadata, SessionDecl, StreamDecl, Welcome


class _Fixed(Trace):
    """Packets of one size whatever their number."""

    def packet(self, n: int) -> bytes:
        body = b"".join(ctf.encode_event(0, 1000 + n, 1000 + n, [n, f"m{n:08d}" + "x" * self.pad],
                                         TICK.fields)
                        for _ in range(4))
        return ctf.pack_packet_header(self.uuid, 0, 0, 1000 + n, 1000 + n, len(body), n, 0) + body


TRACE = _Fixed("h", pad=200)
PACKET = len(TRACE.packet(0))
assert len(TRACE.packet(12345)) == PACKET


def _append(sf: StreamFiles | StreamFile, seqs: range) -> None:
    for n in seqs:
        assert sf.append([TRACE.packet(n)], 0, 0, 0, stream_id=0) == n


def _files(d: Path) -> dict[str, int]:
    """{stream file name: size} (index files checked to match)."""
    out = {}
    for p in sorted(d.iterdir()):
        if p.is_file() and p.name != "metadata":
            out[p.name] = p.stat().st_size
            entries = ctf.read_index((d / "index" / (p.name + ".idx")).read_bytes())
            end = 0
            for e in entries:  # the index covers the file exactly, packet after packet
                assert e.offset == end
                end += e.packet_size // 8
            assert end == p.stat().st_size
    return out


def _seqs(path: Path) -> list[int]:
    return [e.packet_seq_num for e in ctf.read_index((path.parent / "index" / (path.name + ".idx")).read_bytes())]


def test_switch_before_a_packet_that_would_pass_the_size(tmp_path: Path) -> None:
    size = 3 * PACKET + PACKET // 2  # room for three packets, not four
    sf = StreamFiles(str(tmp_path), "c_0", size)
    _append(sf, range(7))
    sf.close()
    assert _files(tmp_path) == {"c_0_0": 3 * PACKET, "c_0_1": 3 * PACKET, "c_0_2": PACKET}
    assert [_seqs(tmp_path / f"c_0_{k}") for k in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_exact_fit_stays_in_the_file(tmp_path: Path) -> None:
    sf = StreamFiles(str(tmp_path), "c_0", 2 * PACKET)
    _append(sf, range(5))
    sf.close()
    assert _files(tmp_path) == {"c_0_0": 2 * PACKET, "c_0_1": 2 * PACKET, "c_0_2": PACKET}


def test_a_packet_bigger_than_the_size_has_a_file_of_its_own(tmp_path: Path) -> None:
    big = _Fixed("h", pad=5000)
    sf = StreamFiles(str(tmp_path), "c_0", 1000)
    for n in range(3):
        sf.append([big.packet(n)], 0, 0, 0, stream_id=0)
    sf.close()
    sizes = _files(tmp_path)
    assert sorted(sizes) == ["c_0_0", "c_0_1", "c_0_2"]
    assert set(sizes.values()) == {len(big.packet(0))}


def test_count_keeps_the_newest_files_in_a_cycle_of_names(tmp_path: Path) -> None:
    sf = StreamFiles(str(tmp_path), "c_0", 2 * PACKET, count=3)
    for n in range(11):
        _append(sf, range(n, n + 1))
        assert len([p for p in tmp_path.iterdir() if p.is_file()]) <= 3  # never more, not even during a switch
    sf.close()
    # 11 packets, 2 a file: files 0..5, numbered modulo 3; files 3, 4, 5 are left.
    assert _files(tmp_path) == {"c_0_0": 2 * PACKET, "c_0_1": 2 * PACKET, "c_0_2": PACKET}
    assert (_seqs(tmp_path / "c_0_0"), _seqs(tmp_path / "c_0_1"), _seqs(tmp_path / "c_0_2")) == \
        ([6, 7], [8, 9], [10])
    assert sf.removed_files == 3


def test_count_one_empties_the_file_in_place(tmp_path: Path) -> None:
    sf = StreamFiles(str(tmp_path), "c_0", 2 * PACKET, count=1)
    _append(sf, range(5))
    sf.close()
    assert _files(tmp_path) == {"c_0_0": PACKET}
    assert _seqs(tmp_path / "c_0_0") == [4]
    again = StreamFiles(str(tmp_path), "c_0", 2 * PACKET, count=1)
    assert again.next_seq == 5
    again.close()


def test_unlimited_count_numbers_grow(tmp_path: Path) -> None:
    sf = StreamFiles(str(tmp_path), "c_0", PACKET)
    _append(sf, range(4))
    sf.close()
    assert list(_files(tmp_path)) == ["c_0_0", "c_0_1", "c_0_2", "c_0_3"]


def test_reopen_continues_the_newest_file_after_a_wrap(tmp_path: Path) -> None:
    sf = StreamFiles(str(tmp_path), "c_0", 2 * PACKET, count=3)
    _append(sf, range(9))  # files 0..4: names 0 1 2 0 1, the newest is c_0_1 with [8]
    sf.close()
    again = StreamFiles(str(tmp_path), "c_0", 2 * PACKET, count=3)
    assert (again.next_seq, again.files[-1]) == (9, str(tmp_path / "c_0_1"))
    _append(again, range(9, 12))  # fills c_0_1, then c_0_2 replaces [4, 5]
    again.close()
    assert [_seqs(tmp_path / f"c_0_{k}") for k in range(3)] == [[6, 7], [8, 9], [10, 11]]


def test_reopen_recovers_a_partial_packet_in_the_newest_file(tmp_path: Path) -> None:
    sf = StreamFiles(str(tmp_path), "c_0", 2 * PACKET, count=3, flush_every=1)
    _append(sf, range(3))
    sf.close()
    with open(tmp_path / "c_0_1", "ab") as f:  # a packet cut by a crash
        f.write(TRACE.packet(3)[:100])
    again = StreamFiles(str(tmp_path), "c_0", 2 * PACKET, count=3)
    assert (again.next_seq, again.recovered_bytes) == (3, 100)
    _append(again, range(3, 5))
    again.close()
    assert _files(tmp_path) == {"c_0_0": 2 * PACKET, "c_0_1": 2 * PACKET, "c_0_2": PACKET}


def test_reopen_drops_a_file_left_empty_by_a_crash_after_a_switch(tmp_path: Path) -> None:
    sf = StreamFiles(str(tmp_path), "c_0", 2 * PACKET, count=3, flush_every=None)
    _append(sf, range(3))  # the switch wrote c_0_0's index; c_0_1's is not written
    os.close(sf.fd)  # a crash: nothing more is written
    os.close(sf.ifd)
    again = StreamFiles(str(tmp_path), "c_0", 2 * PACKET, count=3)
    assert again.next_seq == 2  # c_0_1 held no indexed packet: c_0_0 is continued
    assert not (tmp_path / "c_0_1").exists()
    _append(again, range(2, 3))
    again.close()
    assert _seqs(tmp_path / "c_0_1") == [2]


def test_reopen_with_a_smaller_count_removes_the_oldest(tmp_path: Path) -> None:
    sf = StreamFiles(str(tmp_path), "c_0", PACKET)
    _append(sf, range(5))
    sf.close()
    again = StreamFiles(str(tmp_path), "c_0", PACKET, count=2)
    again.close()
    assert list(_files(tmp_path)) == ["c_0_3", "c_0_4"]


def test_other_files_are_left_alone(tmp_path: Path) -> None:
    for name in ("c_0", "c_0_x", "c_0_01", "c_00_1", "d_0_0"):
        (tmp_path / name).write_bytes(b"x")
    sf = StreamFiles(str(tmp_path), "c_0", PACKET, count=1)
    _append(sf, range(3))
    sf.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == \
        ["c_0", "c_00_1", "c_0_0", "c_0_01", "c_0_x", "d_0_0"]


def test_rollback_to_before_a_switch_is_the_start_of_the_new_file(tmp_path: Path) -> None:
    synced: list[int] = []
    sf = StreamFiles(str(tmp_path), "c_0", 2 * PACKET, count=3, flush_every=None, sync=synced.append)
    _append(sf, range(1))
    sf.flush()
    durable = sf.checkpoint()
    _append(sf, range(1, 4))  # the switch synced c_0_0 (data, then index): 0, 1 are durable
    assert len(synced) == 2
    sf.rollback(durable)
    assert sf.next_seq == 2
    assert _files(tmp_path) == {"c_0_0": 2 * PACKET, "c_0_1": 0}
    _append(sf, range(2, 3))
    sf.close()
    assert _seqs(tmp_path / "c_0_1") == [2]


def test_a_failed_switch_keeps_the_current_file(tmp_path: Path) -> None:
    def failing(fd: int) -> None:
        raise OSError(5, "EIO")

    sf = StreamFiles(str(tmp_path), "c_0", 2 * PACKET, flush_every=None, sync=failing)
    _append(sf, range(2))
    with pytest.raises(OSError):
        sf.append([TRACE.packet(2)], 0, 0, 0, stream_id=0)
    assert (sf.next_seq, sf.unindexed) == (2, 2)
    sf._sync = None  # healed
    _append(sf, range(2, 3))
    sf.close()
    assert [_seqs(tmp_path / f"c_0_{k}") for k in range(2)] == [[0, 1], [2]]


def test_bad_limits_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        StreamFiles(str(tmp_path), "c_0", 0)
    with pytest.raises(ValueError):
        StreamFiles(str(tmp_path), "c_0", 4096, count=-1)


@given(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=40),
    limit=st.integers(1, 6000),
    count=st.integers(0, 4),
    reopen_at=st.integers(0, 40),
)
def test_any_packet_sizes_keep_the_bounds(sizes: list[int], limit: int, count: int, reopen_at: int) -> None:
    """Whatever the packet sizes, size and count (and a reopen anywhere): at
    most ``count`` files, each within ``limit`` unless it holds one packet,
    every index covering its file, the newest packets kept in order."""
    with tempfile.TemporaryDirectory() as d:
        sf = StreamFiles(d, "c_0", limit, count)
        for n, size in enumerate(sizes):
            if n == reopen_at:
                sf.close()
                sf = StreamFiles(d, "c_0", limit, count)
            assert sf.append([bytes(size)], 0, 0, 0, stream_id=0) == n
        sf.close()
        files = _files(Path(d))
        if count:
            assert len(files) <= count
        else:
            assert len(files) == len(set(files))
        seqs = []
        for name in sorted(files, key=lambda f: _seqs(Path(d) / f)[0]):
            got = _seqs(Path(d) / name)
            assert files[name] <= limit or len(got) == 1
            seqs += got
        assert seqs == list(range(len(sizes) - len(seqs), len(sizes)))


# -- through a relay (serve_relayd in-process, the wire client of test_relayd)

@contextlib.asynccontextmanager
async def _same(port: int) -> AsyncIterator[int]:
    yield port


async def _declare(c: Client, trace: Trace, size: int, count: int) -> None:
    await c.send(SessionDecl(1, trace.session, CREATED, False))
    await c.send(Metadata(1, trace.trace_path, 0, trace.metadata))
    await c.send(StreamDecl(1, 1, trace.trace_path, trace.channel, 0, size, count))


@pytest.mark.parametrize("fsync", [False, True])
@pytest.mark.parametrize("restart", [False, True], ids=["reconnect", "relay-restart"])
async def test_relay_resumes_and_drops_duplicates_across_files(tmp_path: Path, fsync: bool, restart: bool) -> None:
    out = tmp_path / "out"
    trace = _Fixed("host-a", pad=2000)
    size = 3 * len(trace.packet(0))  # three packets a file
    with trio.fail_after(TIMEOUT):
        async with running_relay(out, fsync=fsync) as port:
            c = await Client.connect(port)
            assert isinstance(await c.handshake(trace.host), Welcome)
            await _declare(c, trace, max(size, 4096), 2)
            assert await c.stream_state(1) == 0
            for n in range(8):
                await c.send(packet_msg(1, n, trace.packet(n)))
            await c.wait_ack(1, 7)
            if restart:
                await c.bye()
            else:
                await c.aclose()  # dropped: a consumer that reconnects
            # relay-restart: a fresh relay (new state) on the files the first one left.
            async with running_relay(out, fsync=fsync) if restart else _same(port) as port2:
                c = await Client.connect(port2)
                assert isinstance(await c.handshake(trace.host), Welcome)
                await _declare(c, trace, max(size, 4096), 2)
                assert await c.stream_state(1) == 8  # continued from the newest file
                for n in range(5, 11):  # 5..7 again: dropped
                    await c.send(packet_msg(1, n, trace.packet(n)))
                await c.wait_ack(1, 10)
                await c.bye()
    td = trace.trace_dir(out)
    files = _files(td)
    assert sorted(files) == ["channel0_0_0", "channel0_0_1"]  # files 2 (6..8) and 3 (9, 10)
    assert (_seqs(td / "channel0_0_0"), _seqs(td / "channel0_0_1")) == ([6, 7, 8], [9, 10])
    assert sorted(event_seqs(td)) == sorted(list(range(6, 11)) * 4)  # 4 events a packet, numbered as it
