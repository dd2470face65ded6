"""Metrics (tracewire/metrics.py, tracewire/metrics_server.py, relayd/metrics.py):
the metric families built from snapshots, the relay's counters, /proc parsing,
and the HTTP endpoint over loopback (bounded connections, snapshot timeout),
all without daemons; tests/test_metrics_e2e.py scrapes real ones."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
from functools import partial

import pytest
import trio
from click.testing import CliRunner
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from relayd.metrics import RelayCounters
from tracewire.consumer_ops import StatusOp, StreamsReply, StreamStats, decode_reply
from tracewire.metrics import (
    ProcessRef,
    RelaySnapshot,
    SnapshotCollector,
    TargetSnapshot,
    TargetStream,
    parse_proc_stat,
    read_process,
    relay_families,
    split_path,
    target_families,
)
from tracewire.metrics_config import MetricsConfig, parse_listen
from tracewire.metrics_server import LoopSnapshot, SnapshotUnavailable, serve_metrics
from tracewire.ops import encode


def _render(collector: SnapshotCollector) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} of what a scrape shows."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _stats(path: str, **kw: object) -> StreamStats:
    return StreamStats(key=path, path=path, channel="channel0", **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ families


def test_target_families_carry_status_counters() -> None:
    snap = TargetSnapshot(
        streams=(
            TargetStream("s1", 1000, _stats("tw://r/ust/a/channel0_0", packets=7, raw_bytes=7000, wire_bytes=900,
                                            discarded=3, unacked=2, unacked_bytes=250, ring_unread=1,
                                            relay_reconnects=4, events=1234)),
            TargetStream("s1", 1000, _stats("tw://r/ust/a/channel0_1", packets=1, raw_bytes=10, wire_bytes=9,
                                            relay_reconnects=4, error="relay unreachable: x")),
            TargetStream("local", 0, _stats("/tmp/t/ust/a/channel0_0", packets=2, raw_bytes=20, wire_bytes=20)),
        ),
        unanswered=1,
    )
    m = _render(SnapshotCollector(lambda: snap, target_families, lambda s: (), TargetSnapshot()))
    a = (("channel", "channel0"), ("session", "s1"), ("stream", "tw://r/ust/a/channel0_0"), ("uid", "1000"))
    assert m["tracewire_stream_packets_total"][a] == 7
    assert m["tracewire_stream_events_total"][a] == 1234
    assert m["tracewire_stream_raw_bytes_total"][a] == 7000
    assert m["tracewire_stream_wire_bytes_total"][a] == 900
    assert m["tracewire_stream_events_discarded_total"][a] == 3
    assert m["tracewire_stream_unacked_packets"][a] == 2
    assert m["tracewire_stream_spool_bytes"][a] == 250
    assert m["tracewire_stream_ring_unread_subbuffers"][a] == 1
    assert m["tracewire_stream_error"][a] == 0
    assert sorted(m["tracewire_stream_error"].values()) == [0, 0, 1]
    assert len(m["tracewire_stream_packets_total"]) == 3
    # Reconnects are the session's, once; a local session has none.
    assert m["tracewire_session_reconnects_total"] == {(("session", "s1"), ("uid", "1000")): 4}
    assert m["tracewire_metrics_unanswered_sessions"] == {(): 1}


def test_relay_families() -> None:
    snap = RelaySnapshot(
        streams=(("h/s-1/ust/uid/0/64-bit/channel0_0", 5, 500, 120, 2),),
        sessions=(("h/s-1", 3),), live_viewers=(("h/s-1", 2),),
        connections=1, auth_failures=4, decompression_errors=5, write_errors=(("nospace", 6),),
    )
    m = _render(SnapshotCollector(lambda: snap, relay_families, lambda s: (), RelaySnapshot()))
    k = (("host", "h"), ("session", "s-1"), ("stream", "ust/uid/0/64-bit/channel0_0"))
    assert m["tracewire_relay_stream_packets_total"][k] == 5
    assert m["tracewire_relay_stream_raw_bytes_total"][k] == 500
    assert m["tracewire_relay_stream_wire_bytes_total"][k] == 120
    assert m["tracewire_relay_stream_events_discarded_total"][k] == 2
    assert m["tracewire_relay_session_reconnects_total"] == {(("host", "h"), ("session", "s-1")): 3}
    assert m["tracewire_relay_live_viewers"] == {(("host", "h"), ("session", "s-1")): 2}
    assert m["tracewire_relay_connections"] == {(): 1}
    assert m["tracewire_relay_auth_failures_total"] == {(): 4}
    assert m["tracewire_relay_decompression_errors_total"] == {(): 5}
    assert m["tracewire_relay_write_errors_total"] == {(("reason", "nospace"),): 6}


def test_process_families_read_this_process() -> None:
    snap = RelaySnapshot()
    me, gone = os.getpid(), 2**22 + 1  # above pid_max's default ceiling: never a process
    m = _render(SnapshotCollector(lambda: snap, relay_families,
                                  lambda s: (ProcessRef("relayd", me), ProcessRef("consumerd", gone, "7")), snap))
    labels = (("pid", str(me)), ("process", "relayd"), ("uid", ""))
    assert m["tracewire_process_resident_memory_bytes"][labels] > 1024 * 1024
    assert m["tracewire_process_cpu_seconds_total"][labels] > 0
    assert len(m["tracewire_process_cpu_seconds_total"]) == 1  # the gone one is left out


def test_parse_proc_stat() -> None:
    # A command name with spaces and parentheses; utime 250, stime 50 ticks.
    fields = ["S", "1"] + ["0"] * 9 + ["250", "50"] + ["0"] * 30
    usage = parse_proc_stat(f"42 (a) b (c)) {' '.join(fields)}", "100 25 3 1 0 5 0")
    assert usage.cpu_seconds == pytest.approx(300 / os.sysconf("SC_CLK_TCK"))
    assert usage.rss_bytes == 25 * os.sysconf("SC_PAGE_SIZE")
    for stat, statm in [("", "1 2"), ("42 (x) S 1", "1 2"), ("42 x " + " ".join(fields), "1 2"),
                        (f"42 (x) {' '.join(fields)}", "1"), (f"42 (x) {' '.join(['z'] * 20)}", "1 2")]:
        with pytest.raises(ValueError):
            parse_proc_stat(stat, statm)
    assert read_process(os.getpid()) is not None


def test_stream_stats_round_trip_with_reconnects() -> None:
    reply = StreamsReply((_stats("p", relay_reconnects=3), _stats("q")))
    back = decode_reply(StatusOp, encode(reply))
    assert back == reply


# ------------------------------------------------------------------ relay counters


def test_relay_counters() -> None:
    c = RelayCounters(max_closed=2)
    assert split_path("h/s-1/ust/uid/0/64-bit/channel0_0") == ("h", "s-1", "ust/uid/0/64-bit/channel0_0")
    c.session_opened("h/s-1")
    c.stream_opened("h/s-1/a")
    c.written("h/s-1/a", 100, 40, 0)
    c.written("h/s-1/a", 100, 50, 7)
    c.written("h/s-1/a", 100, 50, 5)  # events_discarded is a running count: the highest is kept
    # A reconnect: the same stream is declared again (taken over), counters go on.
    c.session_opened("h/s-1")
    c.stream_opened("h/s-1/a")
    c.stream_closed("h/s-1/a")
    c.written("h/s-1/a", 1, 1, 0)
    c.write_error("nospace")
    c.write_error("nospace")
    snap = c.snapshot({"h/s-1": 2, "h/live-only": 1})
    assert snap.streams == (("h/s-1/a", 4, 301, 141, 7),)
    assert snap.sessions == (("h/s-1", 1),)
    assert snap.live_viewers == (("h/s-1", 2), ("h/live-only", 1))
    assert snap.write_errors == (("nospace", 2),)
    # Closed streams are kept, the oldest dropped beyond max_closed; open ones always.
    for name in "bcd":
        c.stream_opened(f"h/s-1/{name}")
        c.stream_closed(f"h/s-1/{name}")
    c.stream_closed("h/s-1/a")  # a is closed last: b is the oldest closed one
    assert sorted(row[0] for row in c.snapshot({}).streams) == ["h/s-1/a", "h/s-1/d"]
    c.stream_closed("h/s-1/zzz")  # never opened: ignored
    assert len(c.snapshot({}).streams) == 2


def test_relay_sessions_are_bounded() -> None:
    c = RelayCounters(max_closed=3)
    for i in range(10):
        c.session_opened(f"h/s-{i}")
    c.session_opened("h/s-7")
    assert sorted(rel for rel, _ in c.snapshot({}).sessions) == ["h/s-7", "h/s-8", "h/s-9"]


# ------------------------------------------------------------------ endpoint


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:0") == MetricsConfig("127.0.0.1", 0)
    assert parse_listen("[::1]:9464") == MetricsConfig("::1", 9464)
    assert parse_listen("9464") == MetricsConfig("127.0.0.1", 9464)  # loopback unless told otherwise
    for bad in ("70000", "host:", ":80", "h:70000", "h:x", "-1"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


def _get(port: int, path: str = "/metrics") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


async def _serve(nursery: trio.Nursery, take, config: MetricsConfig) -> int:  # type: ignore[no-untyped-def]
    snapshot = LoopSnapshot(take, config.timeout)
    collector = SnapshotCollector(snapshot.get, relay_families, lambda s: s.processes, RelaySnapshot())
    _host, port = await nursery.start(partial(serve_metrics, config, collector, snapshot))
    return int(port)


async def test_scrape_takes_the_snapshot_in_the_loop(nursery: trio.Nursery) -> None:
    calls = []

    async def take() -> RelaySnapshot:
        calls.append(trio.lowlevel.current_task())  # runs as a task of the loop
        return RelaySnapshot(auth_failures=len(calls), processes=(ProcessRef("relayd", os.getpid()),))

    with trio.fail_after(60):
        port = await _serve(nursery, take, MetricsConfig("127.0.0.1", 0))
        status, text = await trio.to_thread.run_sync(_get, port)
        assert status == 200
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert fams["tracewire_relay_auth_failures"].samples[0].value == 1
        assert fams["tracewire_process_resident_memory_bytes"].samples[0].labels["process"] == "relayd"
        status, _ = await trio.to_thread.run_sync(_get, port, "/other")
        assert status == 404
        status, text = await trio.to_thread.run_sync(_get, port)
        assert "tracewire_relay_auth_failures_total 2.0" in text
        # name[] selects families (their names come from describe(), not from a snapshot).
        status, text = await trio.to_thread.run_sync(_get, port, "/metrics?name[]=tracewire_relay_connections")
        assert status == 200
        assert [f.name for f in text_string_to_metric_families(text)] == ["tracewire_relay_connections"]


async def test_silent_clients_take_a_bounded_number_of_slots(nursery: trio.Nursery) -> None:
    """Clients that connect and send nothing hold at most max_connections
    threads; more are closed at once; the loop and later scrapes go on."""

    async def take() -> RelaySnapshot:
        return RelaySnapshot()

    with trio.fail_after(60):
        port = await _serve(nursery, take, MetricsConfig("127.0.0.1", 0, max_connections=2, request_timeout=60))
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            extra = socket.create_connection(("127.0.0.1", port))
            extra.settimeout(30)
            # Once both slots are held, the extra connection is closed unanswered.
            assert await trio.to_thread.run_sync(extra.recv, 100) == b""
            extra.close()
        finally:
            for s in idle:
                s.close()
        # Their slots are given back once they hang up.
        while True:
            try:
                status, _ = await trio.to_thread.run_sync(_get, port)
                break
            except (ConnectionError, http.client.RemoteDisconnected):
                await trio.sleep(0.05)  # a slot not released yet
        assert status == 200


async def test_snapshot_timeout_is_503(nursery: trio.Nursery) -> None:
    async def take() -> RelaySnapshot:
        await trio.sleep_forever()
        raise AssertionError

    with trio.fail_after(60):
        port = await _serve(nursery, take, MetricsConfig("127.0.0.1", 0, timeout=0.2))
        status, _ = await trio.to_thread.run_sync(_get, port)
        assert status == 503


def test_unattached_snapshot_is_unavailable() -> None:
    async def take() -> int:
        return 1

    with pytest.raises(SnapshotUnavailable, match="not attached"):
        LoopSnapshot(take, 1.0).get()


async def test_bind_failure_is_oserror(nursery: trio.Nursery) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        async def take() -> RelaySnapshot:
            return RelaySnapshot()

        with pytest.raises(OSError):
            await _serve(nursery, take, MetricsConfig("127.0.0.1", port))


# ------------------------------------------------------------------ command lines, imports


def test_daemons_without_the_flag_do_not_import_prometheus_client() -> None:
    # Nor does parsing the flag: sessiond forks its consumerd zygote after
    # parsing it, and the zygote must not inherit the metrics modules.
    code = ("import sys, sessiond.main, sessiond.server, relayd.main, consumerd.daemon, tracewire.cli; "
            "sessiond.main._metrics_listen(None, None, '127.0.0.1:0'); "
            "relayd.main._metrics_config('127.0.0.1:0'); "
            "assert 'prometheus_client' not in sys.modules, 'imported'; "
            "assert 'tracewire.metrics_server' not in sys.modules, 'imported'; "
            "assert 'http.server' not in sys.modules, 'imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_bad_metrics_listen_is_a_usage_error() -> None:
    from relayd.main import main as relayd_main
    from sessiond.main import main as sessiond_main

    r = CliRunner().invoke(sessiond_main, ["--metrics-listen", "nope"])
    assert r.exit_code == 2 and "HOST:PORT" in r.output
    r = CliRunner().invoke(relayd_main, ["--output", "/nonexistent", "--metrics-listen", "nope"])
    assert r.exit_code == 2 and "HOST:PORT" in r.output


# ------------------------------------------------------------------ the relay's hooks, in process


async def test_relay_hooks_count_what_happens(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """serve_relayd with metrics: written packets and frame bytes, a reconnect,
    an auth failure and a packet that does not decompress, as a scrape shows them."""
    from test_relayd import AUTH_KEYS, SECRET_A, Client, Trace, packet_msg, send_trace

    from relayd import RelaydConfig, serve_relayd
    from tracewire import wire

    def value(m: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
        return sum(v for _, v in m[name])

    def parsed(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out

    config = RelaydConfig(output=str(tmp_path / "out"), listen_host="127.0.0.1", listen_port=0,
                          auth_keys=AUTH_KEYS, metrics=MetricsConfig("127.0.0.1", 0))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_relayd, config)
            port = listeners[0].socket.getsockname()[1]
            assert listeners.metrics is not None
            mport = listeners.metrics[1]
            trace = Trace("host-a")
            key = ("key-a", SECRET_A)
            await send_trace(port, trace, range(3), key=key)
            await send_trace(port, trace, range(3, 5), key=key)  # the same session again: a reconnect
            bad = await Client.connect(port)
            assert isinstance(await bad.handshake("host-a", ("key-a", b"wrong" * 8)), wire.Error)
            await bad.aclose()
            junk = await Client.connect(port)
            assert isinstance(await junk.handshake("host-a", key), wire.Welcome)
            await junk.open_stream(Trace("host-a", session="s2"))
            p = packet_msg(1, 0, trace.packet(0))
            await junk.send(wire.Packet(p.stream_id, p.seq, wire.Codec.ZSTD, p.raw_len, p.ts_begin, p.ts_end,
                                        p.events_discarded, p.content_size_bits, p.packet_size_bits,
                                        p.packet_seq_num, b"\x28\xb5\x2f\xfd" + b"\x00" * 40))
            assert (await junk.expect_error()).code == wire.ErrorCode.DECOMPRESS
            _status, text = await trio.to_thread.run_sync(_get, mport)
            nursery.cancel_scope.cancel()
    m = parsed(text)
    ((labels, packets),) = [(labels, v) for labels, v in m["tracewire_relay_stream_packets_total"]
                            if labels["session"].startswith("s1-")]
    assert labels["host"] == "host-a" and labels["stream"].endswith("/channel0_0") and packets == 5
    # Raw bytes: the packets themselves; wire bytes: their frames, as the sender framed them.
    raws = [trace.packet(n) for n in range(5)]
    assert value(m, "tracewire_relay_stream_raw_bytes_total") == sum(len(r) for r in raws)
    frames = sum(len(wire.encode(packet_msg(1, n, raws[n], compress=n % 2 == 0))) for n in range(5))
    assert value(m, "tracewire_relay_stream_wire_bytes_total") == frames
    reconnects = {labels["session"][:2]: v for labels, v in m["tracewire_relay_session_reconnects_total"]}
    assert reconnects == {"s1": 1, "s2": 0}
    assert value(m, "tracewire_relay_auth_failures_total") == 1
    assert value(m, "tracewire_relay_decompression_errors_total") == 1


def test_metrics_address_in_use_is_a_startup_failure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bin_dir = os.path.dirname(sys.executable)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        for argv in ([os.path.join(bin_dir, "tracewire-sessiond"), "--rundir", str(tmp_path / "run")],
                     [os.path.join(bin_dir, "tracewire-relayd"), "--output", str(tmp_path / "out"),
                      "--listen", "127.0.0.1:0", "--live-listen", "off"]):
            r = subprocess.run([*argv, "--metrics-listen", addr], capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
            assert r.returncode == 3, r.stderr
            assert r.stderr.strip().splitlines()[-1].endswith(f"cannot serve metrics on {addr}: Address already in use")


async def test_relay_snapshot_counts_live_viewers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from relayd import RelaydConfig
    from relayd.daemon import RelayServer

    out = tmp_path / "out"
    out.mkdir()
    server = RelayServer(RelaydConfig(output=str(out)), str(out))
    server.live.session_declared("h", "lv", str(out / "h" / "lv-20260101T000000"))
    (sess,) = server.live.sessions.values()
    server.live.attach(sess)
    server.live.attach(sess)
    snap = server.metrics_snapshot()
    assert snap.live_viewers == (("h/lv-20260101T000000", 2),)
