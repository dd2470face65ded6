"""Tests for the in-process tracer (tracewire._tracer) without sessiond: the
public ``tracepoint()`` API with no daemon, and the generated emitters writing
into a real ring buffer, decoded back with tracewire.ctf."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracewire import _tracer, ctf, tracepoint
from tracewire.ringbuf import BufferSpec, ConsumerCursor, MemoryBarrier, Producer, create_buffer


@pytest.fixture(autouse=True)
def _empty_rundir(monkeypatch, tmp_path):
    """Whatever this process's tracer registry is, it must not find a sessiond."""
    monkeypatch.setenv("TRACEWIRE_RUNDIR", str(tmp_path))


def _run_py(code: str, rundir: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRACEWIRE_RUNDIR=rundir)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=60)


# ---------------------------------------------------------------- public API, no sessiond


def test_import_starts_no_thread_and_loads_no_heavy_module(tmp_path) -> None:
    r = _run_py(
        """
        import json, sys, threading
        import tracewire
        print(json.dumps({
            "threads": threading.active_count(),
            "loaded": sorted(m for m in ("trio", "cbor2", "zstandard", "click") if m in sys.modules),
            "has_tracepoint": callable(tracewire.tracepoint),
        }))
        """,
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == {"threads": 1, "loaded": [], "has_tracepoint": True}


def test_tracepoint_without_sessiond_does_nothing_and_never_raises(tmp_path) -> None:
    r = _run_py(
        """
        import json, sys
        from tracewire import tracepoint
        tick = tracepoint("demo:x", a=int)
        other = tracepoint("demo:y", s=str, f=float, b=bytes)
        results = [
            tick(1), tick(a=2), tick("not an int"), tick(a=None), tick(a=2**80), tick(a=1.5),
            other("x", 1.0, b"y"), other(s=3, f="no", b=object()), other(s="\\ud800", f=1e400, b="str"),
        ]
        for i in range(100000):
            tick(a=i)
        print(json.dumps({"results": results, "callable": callable(tick),
                          "heavy": [m for m in ("trio", "cbor2", "zstandard") if m in sys.modules]}))
        """,
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == {"results": [None] * 9, "callable": True, "heavy": []}
    assert r.stderr == ""
    assert os.listdir(tmp_path) == []  # an app never creates anything in the rundir


@pytest.mark.parametrize(
    "name",
    ["", "x", "nocolon", ":event", "provider:", "a b:c", "p:e/f", "p:e\0", "p:é", "a" * 300 + ":e", 42, None],
)
def test_bad_names_raise_valueerror(name) -> None:
    with pytest.raises(ValueError, match="provider:event"):
        tracepoint(name, a=int)


@pytest.mark.parametrize("ftype", [list, dict, bool, complex, "int", None, bytearray, object])
def test_bad_field_types_raise_valueerror(ftype) -> None:
    with pytest.raises(ValueError, match="type must be int, float, str or bytes"):
        tracepoint("test:badtype", a=ftype)


def test_field_names_with_underscore_are_refused() -> None:
    with pytest.raises(ValueError, match="must not start with '_'"):
        tracepoint("test:under", _x=int)


def test_redeclaration(tmp_path) -> None:
    # In a subprocess: declaring for real creates the process's tracer registry.
    r = _run_py(
        """
        from tracewire import tracepoint
        e1 = tracepoint("test:redecl", a=int, b=str)
        e2 = tracepoint("test:redecl", a=int, b=str)
        assert callable(e1) and callable(e2)
        assert e1(a=1, b="x") is None and e2(1, "x") is None
        for fields in ({"a": int}, {"a": int, "b": bytes}, {"b": str, "a": int}, {}):
            try:
                tracepoint("test:redecl", **fields)
            except ValueError as exc:
                assert "other fields" in str(exc), exc
            else:
                raise AssertionError(f"redeclaring with {fields} did not raise")
        print("ok")
        """,
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"


LISTENER_ATTEMPTS = """
import gc, sys, threading
from tracewire import _tracer, tracepoint
ATTEMPTS = 5
done = threading.Event()
count = [0]
attempt = _tracer._Registry._session
def counted(self):
    try:
        return attempt(self)
    finally:
        count[0] += 1
        if count[0] >= ATTEMPTS:
            done.set()
_tracer._Registry._session = counted
tracepoint("demo:x", a=int)
if not done.wait(60):
    sys.exit(f"the listener made {count[0]} connection attempts in 60 s")
gc.collect()  # any socket left unclosed is finalized (and warned about) now
print(count[0])
"""


def test_listener_without_sessiond_leaks_no_socket(tmp_path) -> None:
    """The listener retries (and fails) to connect several times: counted,
    not timed, so a slow machine runs the same number of attempts."""
    env = dict(os.environ, TRACEWIRE_RUNDIR=str(tmp_path), TRACEWIRE_RETRY_S="0.01")
    r = subprocess.run([sys.executable, "-X", "dev", "-c", LISTENER_ATTEMPTS],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 5
    assert "ResourceWarning" not in r.stderr, r.stderr[:500]


# ---------------------------------------------------------------- emitters on a real buffer


class Rig:
    """Generated emitters attached to one real ring buffer (no sessiond): the
    same objects the tracer's listener thread builds for a stream."""

    def __init__(self, subbuf: int = 64 * 1024, num: int = 16, start_ts: int | None = None,
                 c_path: bool = True) -> None:
        # c_path False: every emitter declared here is the Python one, as in
        # a process without tracewire._speedups.
        self.c_path = c_path
        self.spec = BufferSpec(subbuf, num)
        # As sessiond does: the stream starts "now" on the clock the emitters
        # read, whatever its absolute value (CLOCK_MONOTONIC counts from boot).
        self.start_ts = time.monotonic_ns() if start_ts is None else start_ts
        self.fd = create_buffer(self.spec, self.start_ts)
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.producer = Producer(self.fd, self.efd, self.spec)
        self.cursor = ConsumerCursor(self.fd, self.spec)
        self.stream = _tracer._StreamW("test-stream", self.producer)
        self.tps: list[_tracer.Tracepoint] = []
        self.uuid = uuid.uuid4().bytes
        self.packets = bytearray()
        self.seq = 0

    def declare(self, name: str, fields: dict[str, type], tp_id: int | None = None,
                consts: dict[str, Any] | None = None) -> _tracer.Tracepoint:
        decl = [(n, _tracer._TYPES[t]) for n, t in fields.items()]
        tp = _tracer.Tracepoint(None, len(self.tps) if tp_id is None else tp_id, name, decl, consts=consts)
        tp.set_streams((self.stream,))
        if not self.c_path:
            tp.emit = tp._pyemit
        self.tps.append(tp)
        return tp

    def clock(self, tp: _tracer.Tracepoint, values: list[int]) -> None:
        """Make ``tp`` take its timestamps from ``values``, in order.  Only
        the Python emitter's clock can be replaced (the C one reads
        CLOCK_MONOTONIC itself), so ``tp.emit`` becomes the Python emitter."""
        it = iter(values)
        tp.globals["_mono"] = lambda: next(it)
        tp.emit = tp._pyemit

    def drain(self) -> list[bytes]:
        """Flush everything into CTF packets as consumerd's drain does;
        returns the event chunks (not the empty ones)."""
        try:
            self.cursor.announce(os.eventfd_read(self.efd))
        except BlockingIOError:
            pass
        limit = None
        while limit is None:  # nothing writes concurrently here
            limit = self.cursor.flush_limit(MemoryBarrier())
        chunks = []
        while (ch := self.cursor.next_chunk(limit)) is not None:
            data = self._packet(ch)
            if data:
                chunks.append(data)
            del ch
            self.cursor.release()
        if self.cursor.discarded_pending() > 0:
            ch = self.cursor.empty_chunk(limit.ts)
            self._packet(ch)
            del ch
            self.cursor.release()
        return chunks

    def packet_ends(self) -> list[tuple[int, int]]:
        """(timestamp_end, events_discarded) of every packet written, in order."""
        out = []
        pos = 0
        while pos < len(self.packets):
            ts_end, _content, size, _seq, discarded = struct.unpack_from("<5Q", self.packets, pos + 40)
            out.append((ts_end, discarded))
            pos += size // 8
        return out

    def _packet(self, ch) -> bytes:
        data = bytes(ch.data)
        self.packets += ctf.pack_packet_header(self.uuid, 0, 0, ch.ts_begin, ch.ts_end, len(data), self.seq,
                                               ch.events_discarded)
        self.packets += data
        self.seq += 1
        return data

    def meta(self) -> ctf.TraceMeta:
        info = ctf.TraceInfo(self.uuid, "testhost", "s", "20260101T000000", "test", 1, 0, ("channel0",))
        text = ctf.metadata_preamble(info) + "".join(
            ctf.metadata_event(ctf.EventDecl(tp.name, tp.id, tuple((n, ctf.FieldType[t.upper()])
                                                                   for n, t in tp.fields)))
            for tp in self.tps
        )
        return ctf.parse_metadata(text)

    def read(self) -> list:
        self.drain()
        return list(ctf.read_stream(io.BytesIO(bytes(self.packets)), self.meta()))

    def close(self) -> None:
        for tp in self.tps:
            tp.set_streams(())
        self.stream.mv = None
        self.producer.close()
        self.cursor.close()
        os.close(self.fd)
        os.close(self.efd)


@pytest.fixture(params=["c", "python"])
def rig(request):
    """A Rig whose emitters are the C ones (tracewire._speedups), or the
    Python ones every call of a process without it goes through."""
    if request.param == "c" and _tracer._speedups is None:
        pytest.skip("tracewire._speedups is not built here (make venv builds it; TRACEWIRE_SPEEDUPS=0 turns it off)")
    r = Rig(c_path=request.param == "c")
    yield r
    r.close()


@pytest.fixture
def py_rig():
    """A Rig with the Python emitters only (what their own caches do)."""
    r = Rig(c_path=False)
    yield r
    r.close()


def _events(items) -> list[ctf.Event]:
    return [i for i in items if isinstance(i, ctf.Event)]


VALUES = [
    (0, 0.0, "", b""),
    (-1, -1.5, "hello", b"\x00\x01\xff"),
    (2**63 - 1, 1e308, "ünïcødé ✓ 𝄞 日本", bytes(range(256))),
    (-(2**63), float("inf"), "x" * 5000, b"y" * 3000),
]


def test_fields_roundtrip_through_ctf(rig: Rig) -> None:
    tp = rig.declare("test:all", {"i": int, "f": float, "s": str, "b": bytes})
    for v in VALUES:
        assert tp.emit(*v) is None
    tp.emit(i=7, f=2.5, s="kw", b=b"kw")
    evs = _events(rig.read())
    assert [(e.fields["i"], e.fields["f"], e.fields["s"], e.fields["b"]) for e in evs] == VALUES + [
        (7, 2.5, "kw", b"kw")
    ]
    assert all(e.name == "test:all" for e in evs)
    assert rig.producer.discarded == 0


def test_event_bytes_match_the_reference_encoder(rig: Rig) -> None:
    tp = rig.declare("test:ref", {"i": int, "s": str, "f": float, "b": bytes})
    t0 = rig.start_ts
    ts = [t0 + 5, t0 + 6, t0 + 6 + 2**27, t0 + 6 + 2**27 + 3]
    rig.clock(tp, ts)
    vals = [(1, "a", 0.5, b"b"), (2, "é", -0.0, b""), (3, "", 1e-300, b"\xff"), (4, "zz", 3.0, b"12")]
    for v in vals:
        tp.emit(*v)
    (chunk,) = rig.drain()
    fields = tuple((n, ctf.FieldType[t.upper()]) for n, t in tp.fields)
    expected = b""
    prev = t0
    for t, v in zip(ts, vals):
        expected += ctf.encode_event(tp.id, t, prev, v, fields)
        prev = t
    assert chunk == expected


def test_compact_or_extended_header_by_timestamp_delta(rig: Rig) -> None:
    tp = rig.declare("test:hdr", {"a": int})
    t0 = rig.start_ts
    ts = [
        t0 + 1,  # compact: small delta from the stream start
        t0 + 1 + 2**27 - 1,  # compact: largest delta that fits 27 bits
        t0 + 1 + 2**27 - 1 + 2**27,  # extended: delta == 2**27
        t0 + 2 + 2**28 + 2**27 + 10**10,  # extended: large delta
        t0 + 3 + 2**28 + 2**27 + 10**10,  # compact again
    ]
    rig.clock(tp, ts)
    for k in range(len(ts)):
        tp.emit(a=k)
    (chunk,) = rig.drain()
    kinds = []
    pos = 0
    while pos < len(chunk):
        word = int.from_bytes(chunk[pos : pos + 4], "little")
        ext = word & 0x1F == 31
        kinds.append("ext" if ext else "compact")
        pos += (16 if ext else 4) + 8
    assert kinds == ["compact", "compact", "ext", "ext", "compact"]
    evs = _events(list(ctf.read_stream(io.BytesIO(bytes(rig.packets)), rig.meta())))
    assert [e.timestamp for e in evs] == ts  # clock offset 0: the raw clock values
    assert [e.fields["a"] for e in evs] == list(range(len(ts)))


def test_ids_above_30_always_use_the_extended_header(rig: Rig) -> None:
    tp = rig.declare("test:bigid", {"a": int}, tp_id=40)
    rig.clock(tp, [rig.start_ts + 1, rig.start_ts + 2])
    tp.emit(a=1)
    tp.emit(a=2)
    (chunk,) = rig.drain()
    assert len(chunk) == 2 * (16 + 8)
    assert int.from_bytes(chunk[0:4], "little") & 0x1F == 31
    assert int.from_bytes(chunk[4:8], "little") == 40
    evs = _events(list(ctf.read_stream(io.BytesIO(bytes(rig.packets)), rig.meta())))
    assert [e.fields["a"] for e in evs] == [1, 2]


def test_constant_fields_are_written_and_not_passed(rig: Rig) -> None:
    """A log event's level and level name are constants of its emitter: it
    takes the other fields, in order, and every path (the one-pack fast
    path, the general path of a long string, the extended header after a
    clock jump) writes the constants where the fields stand."""
    consts = {"level": 20, "name": "IN\0F\ud800O", "f": 0.5}
    tp = rig.declare("test:const", {"level": int, "name": str, "msg": str, "f": float, "n": int}, consts=consts)
    t0 = rig.start_ts
    rig.clock(tp, [t0 + 1, t0 + 2, t0 + 3 + 2**27, t0 + 4 + 2**27])
    msgs = ["short", "x" * 5000, "after a jump", ""]
    for i, m in enumerate(msgs):
        assert tp.emit(m, i) is None
    evs = _events(rig.read())
    name = "IN" + ctf.NUL_REPLACEMENT + "F?O"
    assert [e.fields for e in evs] == [{"level": 20, "name": name, "msg": m, "f": 0.5, "n": i}
                                       for i, m in enumerate(msgs)]
    assert rig.producer.discarded == 0
    tp.emit(5, "x")  # wrong types: discarded, as in any emitter
    assert rig.producer.discarded == 1


@pytest.mark.parametrize("consts", [{"level": "20"}, {"level": 2**63}, {"levelname": 5}, {"nope": 1},
                                    {"level": True}])
def test_log_event_constants_must_be_values_of_their_fields(consts) -> None:
    with pytest.raises(ValueError, match="constant"):
        _tracer.log_event("python:x", [("level", "int"), ("levelname", "str"), ("msg", "str")], 20, consts)


def test_string_with_embedded_nul_keeps_the_rest_of_the_event(rig: Rig) -> None:
    tp = rig.declare("test:nul", {"s": str, "after": int})
    tp.emit(s="a\0b\0", after=99)
    tp.emit(s="\0", after=100)
    evs = _events(rig.read())
    assert [e.fields["after"] for e in evs] == [99, 100]
    s0 = evs[0].fields["s"]
    assert len(s0) == 4 and s0[0] == "a" and s0[2] == "b" and "\0" not in s0


def test_string_with_embedded_nul_matches_reference_replacement(rig: Rig) -> None:
    tp = rig.declare("test:nul2", {"s": str})
    tp.emit(s="a\0b")
    (ev,) = _events(rig.read())
    assert ev.fields["s"] == "a" + ctf.NUL_REPLACEMENT + "b"


def test_string_with_a_lone_surrogate_is_recorded_with_a_replacement(rig: Rig) -> None:
    tp = rig.declare("test:surrogate", {"s": str, "after": int})
    tp.emit(s="a\ud800b", after=7)
    (ev,) = _events(rig.read())
    assert ev.fields == {"s": "a?b", "after": 7}


def test_wrong_argument_is_discarded_and_never_raises(rig: Rig) -> None:
    tp = rig.declare("test:wrong", {"i": int, "s": str, "f": float, "b": bytes})
    tp.emit(1, "ok", 1.0, b"ok")
    bad = [
        ("x", "s", 1.0, b""),  # str for int
        (1, 2, 1.0, b""),  # int for str
        (1, "s", "f", b""),  # str for float
        (1, "s", 1.0, 12.5),  # float for bytes
        (2**64, "s", 1.0, b""),  # int out of int64
        (None, None, None, None),
    ]
    for args in bad:
        assert tp.emit(*args) is None
    tp.emit(2, "ok", 2.0, b"ok")
    assert rig.producer.discarded == len(bad)
    items = rig.read()
    evs = _events(items)
    assert [e.fields["i"] for e in evs] == [1, 2]
    assert sum(i.count for i in items if isinstance(i, ctf.Discarded)) == len(bad)


def test_event_larger_than_a_subbuffer_is_discarded() -> None:
    r = Rig(subbuf=4096, num=2)
    try:
        tp = r.declare("test:big", {"s": str})
        r.clock(tp, [r.start_ts + 1, r.start_ts + 2])  # compact headers (4 bytes)
        tp.emit(s="x" * 4000)  # 4 + 4001 bytes: fits the 4012 usable
        tp.emit(s="x" * 4008)  # 4 + 4009 > 4012: can never fit
        assert r.producer.discarded == 1
        items = r.read()
        assert [len(e.fields["s"]) for e in _events(items)] == [4000]
        assert sum(i.count for i in items if isinstance(i, ctf.Discarded)) == 1
        # The drop reaches the stream's first packet: an empty packet saying 0
        # comes first, so that babeltrace2 (which subtracts) can count it.
        assert [d for _, d in r.packet_ends()] == [0, 1]
    finally:
        r.close()


def test_full_buffer_discards_and_counts_exactly() -> None:
    r = Rig(subbuf=4096, num=2)
    try:
        tp = r.declare("test:full", {"a": int, "pad": str})
        n = 2000
        for k in range(n):
            tp.emit(a=k, pad="p" * 50)
        items = r.read()
        evs = _events(items)
        disc = sum(i.count for i in items if isinstance(i, ctf.Discarded))
        assert disc > 0
        assert len(evs) + disc == n
        assert [e.fields["a"] for e in evs] == list(range(len(evs)))  # the first ones, in order
        counts = [d for _, d in r.packet_ends()]
        assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == disc
    finally:
        r.close()


def test_every_packet_counts_the_drops_up_to_its_end() -> None:
    """What each packet's events_discarded says is the number of events
    dropped at or before its timestamp_end: a sub-buffer closes at the time
    of its switch with the producer's count then; a flush reports the count
    up to its timestamp.  Several rounds of overflow, then draining."""
    r = Rig(subbuf=4096, num=2)
    try:
        tp = r.declare("test:placed", {"a": int, "pad": str})
        n, step = 3000, 1000
        ts = [r.start_ts + step * (k + 1) for k in range(n)]  # event k's timestamp
        r.clock(tp, ts)
        for k in range(n):
            tp.emit(a=k, pad="p" * 50)
            if k % 600 == 599:
                r.drain()  # the consumer catches up now and then
        items = r.read()
        read = {e.fields["a"] for e in _events(items)}
        dropped_ts = sorted(ts[k] for k in range(n) if k not in read)
        assert dropped_ts, "2 x 4 KiB must overflow"
        for ts_end, discarded in r.packet_ends():
            assert discarded == sum(1 for t in dropped_ts if t <= ts_end), (ts_end, discarded)
        assert r.packet_ends()[-1][1] == len(dropped_ts) == n - len(read)
    finally:
        r.close()


def test_disabled_emitter_writes_nothing(rig: Rig) -> None:
    tp = rig.declare("test:off", {"a": int})
    tp.emit(a=1)
    tp.set_streams(())
    tp.emit(a=2)
    tp.emit(a="wrong type, still nothing")
    tp.set_streams((rig.stream,))
    tp.emit(a=3)
    assert [e.fields["a"] for e in _events(rig.read())] == [1, 3]
    assert rig.producer.discarded == 0


def test_two_tracepoints_one_stream(rig: Rig) -> None:
    a = rig.declare("test:a", {"x": int})
    b = rig.declare("test:b", {"y": str})
    for k in range(50):
        a.emit(x=k)
        b.emit(y=str(k))
    evs = _events(rig.read())
    assert [(e.name, e.fields) for e in evs] == [
        item for k in range(50) for item in (("test:a", {"x": k}), ("test:b", {"y": str(k)}))
    ]


def _emit_from_threads(tp: _tracer.Tracepoint, nthreads: int, per: int) -> None:
    """``nthreads`` threads, released at once, each emitting ``per`` events
    (thread, i, tag "t<thread>-<i>") on ``tp``."""
    start = threading.Barrier(nthreads)

    def work(t: int) -> None:
        start.wait()
        emit = tp.emit
        if t % 2:  # keyword arguments: the C emitter hands these to the Python one
            for i in range(per):
                emit(thread=t, i=i, tag=f"t{t}-{i}")
        else:
            for i in range(per):
                emit(t, i, f"t{t}-{i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)


def _check_threads_events(r: Rig, nthreads: int, per: int) -> None:
    """``r``'s stream holds every event of ``_emit_from_threads``, each
    whole, each thread's in order, timestamps not going back; none discarded."""
    assert r.producer.discarded == 0
    evs = _events(r.read())
    assert len(evs) == nthreads * per
    assert all(e.fields["tag"] == f"t{e.fields['thread']}-{e.fields['i']}" for e in evs)
    for t in range(nthreads):
        assert [e.fields["i"] for e in evs if e.fields["thread"] == t] == list(range(per))
    ts = [e.timestamp for e in evs]
    assert ts == sorted(ts)


def test_threads_emitting_at_once_lose_and_corrupt_nothing(rig: Rig) -> None:
    tp = rig.declare("test:mt", {"thread": int, "i": int, "tag": str})
    _emit_from_threads(tp, 4, 5000)
    _check_threads_events(rig, 4, 5000)


# The one-pack fast path: a layout with at most one variable-size field, whose
# length picks a cached packer (up to _PACK_MAX_LEN bytes), header compact or
# extended by the timestamp gap; everything else takes the general path.
FAST_LAYOUTS = [
    ({"s": str}, ("",)),
    ({"i": int, "s": str}, (-5, "request 1 path")),
    ({"s": str, "f": float, "i": int}, ("mid", 2.5, 2**63 - 1)),
    ({"b": bytes, "i": int}, (b"\x00\xff", -(2**63))),
    ({"i": int, "f": float}, (3, -0.0)),
    # several variable fields: one Struct per tuple of lengths
    ({"level": int, "levelname": str, "msg": str}, (20, "INFO", "request 1 path")),
    ({"s": str, "b": bytes, "i": int, "t": str}, ("a", b"\x00", 7, "z")),
]


@pytest.mark.parametrize("tp_id", [0, 7, 30, 31, 40])
@pytest.mark.parametrize("layout", FAST_LAYOUTS, ids=lambda x: ",".join(x[0]) if isinstance(x, tuple) else x)
def test_fast_path_bytes_match_the_reference_encoder(rig: Rig, layout, tp_id: int) -> None:
    decl, sample = layout
    tp = rig.declare("test:fast", decl, tp_id=tp_id)
    var = [n for n, t in decl.items() if t in (str, bytes)]
    lengths = [0, 1, _tracer._PACK_MAX_LEN - 1, _tracer._PACK_MAX_LEN, _tracer._PACK_MAX_LEN + 1, 3000]
    vals = []
    for k in lengths:
        v = dict(zip(decl, sample))
        for n in var:  # k bytes once encoded
            v[n] = "é" * (k // 2) + "x" * (k % 2) if decl[n] is str else (bytes(range(256)) * 12)[:k]
        vals.append(tuple(v.values()))
    t0 = rig.start_ts
    ts = [t0 + 1, t0 + 2, t0 + 2 + 2**27, t0 + 3 + 2**27, t0 + 3 + 2**28, t0 + 4 + 2**28]  # compact and extended
    rig.clock(tp, ts)
    for v in vals:
        tp.emit(*v)
    (chunk,) = rig.drain()
    fields = tuple((n, ctf.FieldType[t.upper()]) for n, t in tp.fields)
    expected = b"".join(ctf.encode_event(tp_id, t, prev, v, fields) for t, prev, v in zip(ts, [t0] + ts, vals))
    assert chunk == expected
    assert rig.producer.discarded == 0
    if var:  # lengths past the limit are not cached
        assert all(max(k if isinstance(k, tuple) else (k,)) <= _tracer._PACK_MAX_LEN for k in tp._packers)


def test_packer_cache_is_bounded(py_rig: Rig) -> None:
    tp = py_rig.declare("test:lens", {"s": str})
    for k in range(2 * _tracer._PACK_MAX_LEN):
        tp.emit(s="x" * k)
    assert sorted(tp._packers) == list(range(_tracer._PACK_MAX_LEN + 1))
    assert [e.fields["s"] for e in _events(py_rig.read())] == ["x" * k for k in range(2 * _tracer._PACK_MAX_LEN)]
    assert py_rig.producer.discarded == 0


def test_several_variable_fields_packer_cache_is_bounded(py_rig: Rig, monkeypatch) -> None:
    monkeypatch.setattr(_tracer, "_PACK_MAX_MULTI", 10)
    tp = py_rig.declare("test:lens2", {"a": str, "b": str})
    vals = [("x" * k, "y" * (k % 3)) for k in range(40)]
    for v in vals:
        tp.emit(*v)
    assert len(tp._packers) == 10
    assert [(e.fields["a"], e.fields["b"]) for e in _events(py_rig.read())] == vals
    assert py_rig.producer.discarded == 0


@contextlib.contextmanager
def _second_rig(rig: Rig, tp: _tracer.Tracepoint) -> Iterator[Rig]:
    """A second ring buffer for ``tp``; closing it disables ``tp``."""
    other = Rig(start_ts=rig.start_ts)
    other.tps.append(tp)
    try:
        yield other
    finally:
        other.close()


def test_one_and_several_streams_get_the_same_events(rig: Rig) -> None:
    tp = rig.declare("test:multi", {"k": int, "s": str})
    with _second_rig(rig, tp) as other:
        sets = [(rig.stream,), (rig.stream, other.stream), (other.stream,), (), (other.stream, rig.stream)]
        for phase, streams in enumerate(sets):
            tp.set_streams(streams)
            for k in range(3):
                tp.emit(k=10 * phase + k, s=f"p{phase}")
        got = [[e.fields["k"] for e in _events(r.read())] for r in (rig, other)]
        assert got[0] == [0, 1, 2, 10, 11, 12, 40, 41, 42]
        assert got[1] == [10, 11, 12, 20, 21, 22, 40, 41, 42]
        assert rig.producer.discarded == other.producer.discarded == 0


def test_several_streams_get_byte_identical_events(rig: Rig) -> None:
    tp = rig.declare("test:same", {"k": int, "s": str, "b": bytes})
    with _second_rig(rig, tp) as other:
        tp.set_streams((rig.stream, other.stream))
        rig.clock(tp, [v for t in range(1, 41) for v in (rig.start_ts + t, rig.start_ts + t)])  # one per stream
        for k in range(20):
            tp.emit(k=k, s="é" * k, b=bytes(k))
            tp.emit(k=-k, s="x" * 300, b=b"")
        assert rig.drain() == other.drain()
        assert len(_events(rig.read())) == 40


def test_a_one_stream_body_left_running_writes_nowhere_once_streams_are_gone(rig: Rig) -> None:
    tp = rig.declare("test:late", {"k": int})
    tp.emit(k=1)
    tp.set_streams(())
    tp._pyemit.__code__ = tp._one_code  # an emitter that entered the body just before the change
    tp._pyemit(k=2)
    assert [e.fields["k"] for e in _events(rig.read())] == [1]
    assert rig.producer.discarded == 0


def test_a_one_stream_body_left_running_keeps_its_stream_when_another_is_added(rig: Rig) -> None:
    tp = rig.declare("test:grow", {"k": int})
    with _second_rig(rig, tp) as other:
        tp.set_streams((rig.stream, other.stream))
        tp._pyemit.__code__ = tp._one_code  # an emitter that entered the one-stream body just before the change
        tp._pyemit(k=1)
        assert [e.fields["k"] for e in _events(rig.read())] == [1]
        assert _events(other.read()) == []


def test_threads_emitting_into_several_streams_lose_and_corrupt_nothing(rig: Rig) -> None:
    tp = rig.declare("test:mt2", {"thread": int, "i": int, "tag": str})
    with _second_rig(rig, tp) as other:
        tp.set_streams((rig.stream, other.stream))
        _emit_from_threads(tp, 4, 3000)
        for r in (rig, other):
            _check_threads_events(r, 4, 3000)


def test_events_word_counts_the_events_written_not_the_dropped() -> None:
    """The ring's ``events`` word (status' events/s) counts every event
    written, on the fast path and the general one, and none dropped; a
    producer mapped again (a resumed app) goes on from it."""
    r = Rig(subbuf=4096, num=2)
    try:
        fast = r.declare("test:fast", {"a": int, "s": str})
        general = r.declare("test:general", {"s": str, "b": bytes})
        for k in range(300):
            fast.emit(a=k, s="x" * (k % 40))
            general.emit(s="y", b=b"z" * 30)
        written = len(_events(r.read()))
        assert 0 < written < 600  # the ring was full: some were dropped
        assert r.cursor.read_events() == written
        again = Producer(r.fd, r.efd, r.spec)
        try:
            assert again.events == written
        finally:
            again.close()
    finally:
        r.close()


# ---------------------------------------------------------------- the C path (tracewire._speedups)

needs_c = pytest.mark.skipif(_tracer._speedups is None, reason="tracewire._speedups is not built here")


@pytest.fixture
def c_rig():
    if _tracer._speedups is None:
        pytest.skip("tracewire._speedups is not built here (make venv builds it)")
    r = Rig(c_path=True)
    yield r
    r.close()


def _python_calls(tp: _tracer.Tracepoint) -> list[int]:
    """A list that grows by one each time ``tp``'s Python body writes or
    drops an event (it reads its clock once per event); the C path never
    adds to it."""
    calls: list[int] = []
    real = tp.globals["_mono"]

    def mono() -> int:
        calls.append(1)
        return real()

    tp.globals["_mono"] = mono
    return calls


def _reference_bytes(r: Rig, tp: _tracer.Tracepoint, vals: list[tuple]) -> tuple[bytes, bytes]:
    """(what ``r``'s stream holds, what the reference encoder writes for
    ``vals`` at the timestamps the events carry)."""
    (chunk,) = r.drain()
    evs = _events(list(ctf.read_stream(io.BytesIO(bytes(r.packets)), r.meta())))
    ts = [e.timestamp for e in evs]
    fields = tuple((n, ctf.FieldType[t.upper()]) for n, t in tp.fields)
    full = [tuple(tp.consts[n] if n in tp.consts else next(it) for n, _ in tp.fields) for it in map(iter, vals)]
    expected = b"".join(ctf.encode_event(tp.id, t, prev, v, fields)
                        for t, prev, v in zip(ts, [r.start_ts] + ts, full, strict=False))
    return chunk, expected


C_LAYOUTS = [
    *FAST_LAYOUTS,
    ({"i": int, "f": float, "s": str, "b": bytes}, (-1, 0.25, "ünïcødé ✓ 𝄞", b"\x00\x01")),
]


@needs_c
@pytest.mark.parametrize("tp_id", [0, 30, 31, 40])
@pytest.mark.parametrize("layout", C_LAYOUTS, ids=lambda x: ",".join(x[0]) if isinstance(x, tuple) else x)
def test_c_path_writes_what_the_reference_encoder_writes(c_rig: Rig, layout, tp_id: int) -> None:
    decl, sample = layout
    tp = c_rig.declare("test:c", decl, tp_id=tp_id)
    calls = _python_calls(tp)
    vals = []
    for k in (0, 1, 255, 256, 3000):
        v = dict(zip(decl, sample, strict=True))
        for n, t in decl.items():
            if t is str:
                v[n] = ("é" * k)[: k // 2] + "x" * (k % 2)
            elif t is bytes:
                v[n] = (bytes(range(256)) * 12)[:k]
        vals.append(tuple(v.values()))
    for v in vals:
        assert tp.emit(*v) is None
    chunk, expected = _reference_bytes(c_rig, tp, vals)
    assert chunk == expected
    assert c_rig.producer.discarded == 0
    # The C path wrote them (the Python body only after a 2^27 ns stall of
    # this process, which forces an extended header).
    assert len(calls) < len(vals)
    assert c_rig.cursor.read_events() == len(vals)


@needs_c
def test_c_path_writes_constant_fields(c_rig: Rig) -> None:
    consts = {"level": 20, "levelname": "INFO", "f": -2.5}
    tp = c_rig.declare("test:cconst", {"level": int, "levelname": str, "msg": str, "f": float, "n": int},
                       consts=consts)
    calls = _python_calls(tp)
    vals = [("request 1 path", 1), ("", -(2**63)), ("日本" * 500, 2**63 - 1)]
    for v in vals:
        tp.emit(*v)
    chunk, expected = _reference_bytes(c_rig, tp, vals)
    assert chunk == expected
    assert len(calls) < len(vals)


@needs_c
def test_c_path_hands_over_what_it_cannot_write_as_python_would(c_rig: Rig) -> None:
    """A str with a NUL or a lone surrogate, bytes that are not exactly
    ``bytes``, an int for a float field, an int out of int64's range,
    subclasses, keyword arguments: the Python emitter takes each, and the
    trace holds what it always held."""
    tp = c_rig.declare("test:hand", {"i": int, "s": str, "f": float, "b": bytes})
    calls = _python_calls(tp)

    class Str(str):
        pass

    cases = [
        ((1, "a\0b", 1.0, b""), (1, "a\ufffdb", 1.0, b"")),
        ((2, "\ud800x", 1.0, b""), (2, "?x", 1.0, b"")),  # encode("utf-8", "replace")
        ((3, "s", 1.0, bytearray(b"ba")), (3, "s", 1.0, b"ba")),
        ((4, "s", 1.0, memoryview(b"mv")), (4, "s", 1.0, b"mv")),
        ((5, "s", 7, b""), (5, "s", 7.0, b"")),
        ((6, Str("sub"), 1.0, b""), (6, "sub", 1.0, b"")),
    ]
    for args, _ in cases:
        tp.emit(*args)
    assert len(calls) == len(cases)
    tp.emit(2**64, "too big", 1.0, b"")  # Python raises inside: dropped and counted
    assert len(calls) == len(cases) + 1
    tp.emit(True, "bool", 1.0, b"")  # an int: the C path writes 1
    assert len(calls) == len(cases) + 1
    evs = _events(c_rig.read())
    assert [tuple(e.fields.values()) for e in evs] == [*(want for _, want in cases), (1, "bool", 1.0, b"")]
    assert c_rig.producer.discarded == 1


@needs_c
def test_c_path_writes_calls_with_keywords_and_refuses_wrong_ones_as_python_does(c_rig: Rig) -> None:
    tp = c_rig.declare("test:kw", {"i": int, "s": str, "f": float})
    calls = _python_calls(tp)
    tp.emit(i=1, s="a", f=0.5)
    tp.emit(f=1.5, s="b", i=2)  # any order
    tp.emit(3, f=2.5, s="c")  # positional, then keywords
    tp.emit(**{"".join(["i"]): 4, "s": "d", "f": 3.5})  # names not interned at the call site
    assert calls == []
    for bad in ({"i": 5, "s": "e"}, {"i": 5, "s": "e", "f": 1.0, "x": 1}, {"i": 5, "s": "e", "g": 1.0}):
        with pytest.raises(TypeError):
            tp.emit(**bad)
    with pytest.raises(TypeError):
        tp.emit(5, i=5, s="e", f=1.0)  # i twice
    assert [tuple(e.fields.values()) for e in _events(c_rig.read())] == [
        (1, "a", 0.5), (2, "b", 1.5), (3, "c", 2.5), (4, "d", 3.5)]
    assert c_rig.producer.discarded == 0


@needs_c
def test_c_path_switches_sub_buffers_through_python_and_loses_nothing() -> None:
    r = Rig(subbuf=4096, num=64)
    try:
        tp = r.declare("test:cswitch", {"a": int, "s": str})
        calls = _python_calls(tp)
        n = 3000  # ~25 bytes each: ~20 sub-buffers
        for k in range(n):
            tp.emit(k, "x" * (k % 20))
        evs = _events(r.read())
        assert [(e.fields["a"], e.fields["s"]) for e in evs] == [(k, "x" * (k % 20)) for k in range(n)]
        assert r.producer.discarded == 0
        assert 15 <= len(calls) < n // 10  # a switch is Python's, the rest C's
        ts = [e.timestamp for e in evs]
        assert ts == sorted(ts)
    finally:
        r.close()


@needs_c
def test_c_path_waits_behind_a_python_writer_that_holds_the_stream(c_rig: Rig) -> None:
    """While a Python writer holds the stream's lock (a switch, a wait for
    space, a close), a call the C path could write is handed to the Python
    emitter, which waits for the lock: it never writes under another
    writer's feet."""
    tp = c_rig.declare("test:cwait", {"a": int})
    tp.emit(1)
    pos = c_rig.producer.pos
    done = threading.Event()

    def writer() -> None:
        tp.emit(2)
        done.set()

    with c_rig.stream.lock:
        th = threading.Thread(target=writer)
        th.start()
        # Wait (bounded) until that thread is blocked inside the Python body.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(th.ident or -1)
            if frame is not None and frame.f_code.co_filename == "<tracepoint test:cwait>":
                break
            time.sleep(0.001)
        else:
            pytest.fail("the writer never reached the Python body")
        assert not done.is_set()
        assert c_rig.producer.pos == pos  # nothing written while the lock is held
    th.join(30)
    assert done.is_set()
    assert [e.fields["a"] for e in _events(c_rig.read())] == [1, 2]


@needs_c
@pytest.mark.parametrize("damage", ["base", "pos", "pos_huge", "base_huge", "qev", "mv_readonly", "mv_released",
                                    "mv_misaligned", "producer_none"])
def test_c_path_never_writes_outside_the_buffer(c_rig: Rig, damage: str) -> None:
    """Producer state that would put an event (or a control word) outside
    the mapping makes the C path hand over; the Python body then fails and
    counts the event as discarded (or writes nowhere): nothing outside the
    buffer is touched and the app goes on."""
    tp = c_rig.declare("test:cdamage", {"a": int, "s": str})
    tp.emit(1, "ok")
    p, s = c_rig.producer, c_rig.stream
    saved = (p.base, p.pos, p.qev, s.mv, s.producer)
    calls = _python_calls(tp)
    released = None
    if damage == "base":
        p.base = len(p.view) * 4
    elif damage == "pos":
        p.pos = -(2**40)
    elif damage == "pos_huge":
        p.pos = 2**63 - 8  # pos + the event's size overflows int64
    elif damage == "base_huge":
        p.base = 2**63 - 1  # base + pos overflows int64
    elif damage == "mv_misaligned":
        s.mv = memoryview(bytearray(len(p.view) + 1))[1:]  # control words off their 8-byte alignment
    elif damage == "qev":
        p.qev = len(p.view)
    elif damage == "mv_readonly":
        s.mv = memoryview(bytes(len(p.view)))
    elif damage == "mv_released":
        released = memoryview(bytearray(len(p.view)))
        released.release()
        s.mv = released
    else:
        s.producer = None
    tp.emit(2, "damaged")
    assert len(calls) == (0 if damage == "producer_none" else 1)  # no producer: the Python body returns first
    p.base, p.pos, p.qev, s.mv, s.producer = saved
    tp.emit(3, "ok")
    evs = _events(c_rig.read())
    assert [e.fields["a"] for e in evs] == [1, 3]


@needs_c
def test_c_emitter_stands_for_the_python_one(c_rig: Rig) -> None:
    tp = c_rig.declare("test:clook", {"a": int, "s": str})
    emit = tp.emit
    assert isinstance(emit, _tracer._speedups.Emitter)
    assert emit.tracepoint is tp and emit.__name__ == "test_clook" and "a: int, s: str" in emit.__doc__
    assert emit.pyemit is tp._pyemit and emit.mode == 1
    import inspect

    assert str(inspect.signature(emit)) == "(a, s)"
    with pytest.raises(TypeError):
        emit(1, "x", "one too many")  # as the Python emitter raises for a wrong call
    tp.set_streams(())
    assert emit.mode == 0 and emit(1, "x") is None and emit("wrong", 5) is None
    with pytest.raises(ValueError):
        emit.set(1, None)
    assert _events(c_rig.read()) == []


def test_the_c_path_is_built_where_it_can_be() -> None:
    """``make venv`` builds tracewire._speedups (make test installs gcc and
    Python's headers as root): where both are here, it must import."""
    import shutil
    import sysconfig

    if os.environ.get("TRACEWIRE_SPEEDUPS") == "0":
        pytest.skip("TRACEWIRE_SPEEDUPS=0: the C path is off on purpose")
    if not shutil.which("cc") or not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        pytest.skip("no C compiler or no Python.h here: the tracer runs in pure Python")
    assert _tracer._speedups is not None


_VALUE = {
    "int": st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(2**63, 2**70), st.booleans()),
    "float": st.one_of(st.floats(allow_nan=False), st.integers(-5, 5)),
    "str": st.one_of(st.text(max_size=300), st.text(alphabet="ab\0\ud800é", max_size=20)),
    "bytes": st.one_of(st.binary(max_size=300), st.binary(max_size=20).map(bytearray)),
}


@needs_c
@given(fields=st.lists(st.sampled_from(["int", "float", "str", "bytes"]), min_size=1, max_size=5),
       data=st.data())
def test_c_and_python_emitters_record_the_same_events(fields: list[str], data) -> None:
    """Differential: the same calls, any values (out of range, NULs, lone
    surrogates, bytearrays, ints for floats), through the C emitter into one
    ring and the Python emitter into another, decode to the same events and
    the same number discarded."""
    decl = {f"f{k}": {"int": int, "float": float, "str": str, "bytes": bytes}[t] for k, t in enumerate(fields)}
    calls = data.draw(st.lists(st.tuples(*(_VALUE[t] for t in fields)), max_size=30))
    got = []
    for c_path in (True, False):
        r = Rig(subbuf=4096, num=16, c_path=c_path)
        try:
            tp = r.declare("test:diff", decl)
            for k, args in enumerate(calls):
                if k % 2:
                    assert tp.emit(**dict(zip(decl, args, strict=True))) is None
                else:
                    assert tp.emit(*args) is None
            got.append(([e.fields for e in _events(r.read())], r.producer.discarded))
        finally:
            r.close()
    assert got[0] == got[1]


def test_a_forked_child_without_sessiond_goes_on_at_once(tmp_path) -> None:
    """The child's registry finds no sessiond: the fork handler neither waits
    nor fails, and both processes emit as before (tests/test_fork_e2e.py
    has the case with a sessiond)."""
    r = _run_py(
        """
        import os
        os.environ["TRACEWIRE_REGISTER_TIMEOUT"] = "600"  # a wrongful wait outlasts the test's timeout
        from tracewire import _tracer, tracepoint
        tick = tracepoint("demo:fork", a=int)
        parent = _tracer._get_registry()
        pid = os.fork()
        if pid == 0:
            child = _tracer._get_registry()
            ok = child is not parent and child.pid == os.getpid() and child.tracepoints == parent.tracepoints
            ok = ok and all(tp.registry is child and not tp.enabled for tp in child.tracepoints)
            for i in range(1000):
                tick(a=i)
            os._exit(0 if ok else 3)
        for i in range(1000):
            tick(a=i)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """,
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"
    assert r.stderr == ""


@needs_c
def test_c_path_reads_only_slots_of_the_producers_own_class(c_rig: Rig) -> None:
    """A producer whose class borrowed another class's slot descriptor (so
    the slot's offset is not its own) is not read by offset: the C path
    hands the call over, and the Python emitter writes it as before."""
    tp = c_rig.declare("test:cslots", {"a": int})

    real = c_rig.producer
    # Another class whose "pos" slot sits where a Producer keeps an int of
    # its own (wakeup_fd): read by that offset, the event would be written
    # at the wrong place and head moved back.
    at = Producer.__slots__.index("wakeup_fd")
    Other = type("Other", (), {"__slots__": (*(f"s{i}" for i in range(at)), "pos")})

    class Lying(Producer):
        __slots__ = ()

    lying = object.__new__(Lying)
    for name in Producer.__slots__:
        if hasattr(real, name):
            getattr(Producer, name).__set__(lying, getattr(real, name))
    Lying.pos = Other.__dict__["pos"]  # the descriptor of another class's slot
    calls = _python_calls(tp)
    tp.emit(1)
    assert calls == []  # the real producer: the C path
    c_rig.stream.producer = lying
    with pytest.raises(TypeError):
        lying.pos  # noqa: B018  (Python refuses it as well)
    tp.emit(2)
    assert len(calls) == 1  # handed over; the Python body fails on it and counts it
    c_rig.stream.producer = real
    tp.emit(3)
    assert [e.fields["a"] for e in _events(c_rig.read())] == [1, 3]


@needs_c
def test_an_emitter_without_its_set_up_refuses_calls() -> None:
    """An Emitter made without __init__ (or whose __init__ failed) has no
    Python emitter to hand over to: a call raises instead of crashing."""
    emit = _tracer._speedups.Emitter.__new__(_tracer._speedups.Emitter)
    with pytest.raises(TypeError, match="not initialized"):
        emit(1)
    with pytest.raises(ValueError):
        _tracer._speedups.Emitter(print, 0, [("a", "nonsense", None)])
