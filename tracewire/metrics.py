"""Prometheus metrics: what the daemons expose on ``--metrics-listen``.

Theory of operation
-------------------
A daemon's counters live in its trio event loop (consumerd's streams behind
sessiond's StatusOp round trip, the relay's :class:`relayd.metrics.RelayCounters`).
A scrape runs in a thread of the metrics HTTP server
(:mod:`tracewire.metrics_server`), which asks the loop for a *snapshot*: plain
frozen dataclasses (:class:`TargetSnapshot`, :class:`RelaySnapshot`) copied in
the loop, so the scrape thread never reads a structure the loop mutates.  This
module turns a snapshot into Prometheus metric families (pure functions, unit
tested) and reads the CPU time and resident memory of the processes the
snapshot names from ``/proc`` (in the scrape thread: no loop time).

Naming follows Prometheus: counters end in ``_total``, sizes are bytes, CPU
time is seconds.  Stream metrics are labelled with the session, the stream's
path and its channel (target: and the owner's uid; relay: the target's host).

This module imports ``prometheus_client``; only a daemon started with
``--metrics-listen`` imports it (sessiond and consumerd on a target that does
not scrape pay nothing).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tracewire.consumer_ops import StreamStats

__all__ = [
    "ProcessRef", "ProcessUsage", "RelaySnapshot", "RelayStreamRow", "split_path",
    "SnapshotCollector", "TargetSnapshot", "TargetStream", "parse_proc_stat", "process_families",
    "read_process", "relay_families", "target_families",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MAX_PROC_FILE = 4096  # /proc/PID/stat and statm are far smaller

_Take = Callable[[], Any]
_Families = Callable[[Any], list[Metric]]
_Processes = Callable[[Any], Iterable["ProcessRef"]]


# ------------------------------------------------------------------ snapshots


@dataclass(frozen=True, slots=True)
class ProcessRef:
    """A process whose CPU and memory are exposed: its role (``sessiond``,
    ``zygote``, ``consumerd``, ``relayd``), pid, and the uid it works for
    ("" when it works for everyone)."""

    process: str
    pid: int
    uid: str = ""


@dataclass(frozen=True, slots=True)
class TargetStream:
    """One stream of a target's session, as consumerd's status reports it."""

    session: str
    uid: int
    stats: StreamStats


@dataclass(frozen=True, slots=True)
class TargetSnapshot:
    """What sessiond's scrape shows: every stream of every session whose
    consumerd answered, the sessions whose consumerd did not (``unanswered``),
    and sessiond's processes."""

    streams: tuple[TargetStream, ...] = ()
    processes: tuple[ProcessRef, ...] = ()
    unanswered: int = 0


# (stream file below the output "HOST/SESSION-CREATED/TRACE.../CHANNEL_N",
#  packets, raw bytes, frame bytes, events discarded)
RelayStreamRow = tuple[str, int, int, int, int]


@dataclass(frozen=True, slots=True)
class RelaySnapshot:
    """What the relay's scrape shows.  Rows are plain tuples: the loop only
    copies numbers (0.3 ms for 5,000 streams, where building a dataclass per
    stream took 11 ms); the scrape thread splits the paths into labels.

    Attributes:
        streams: one row per stream file the relay counts.
        sessions: ("HOST/SESSION-CREATED", reconnects: declarations after the first).
        live_viewers: ("HOST/SESSION-CREATED", viewers attached now).
    """

    streams: tuple[RelayStreamRow, ...] = ()
    sessions: tuple[tuple[str, int], ...] = ()
    live_viewers: tuple[tuple[str, int], ...] = ()
    connections: int = 0
    auth_failures: int = 0
    decompression_errors: int = 0
    write_errors: tuple[tuple[str, int], ...] = ()  # (reason, count)
    processes: tuple[ProcessRef, ...] = ()


def split_path(rel: str) -> tuple[str, str, str]:
    """(host, session, stream) of a path below the relay's output."""
    parts = rel.split("/", 2)
    while len(parts) < 3:
        parts.append("")
    return parts[0], parts[1], parts[2]


# ------------------------------------------------------------------ families


_STREAM_LABELS = ["session", "uid", "stream", "channel"]


def target_families(snap: TargetSnapshot) -> list[Metric]:
    """The metric families of a target's snapshot (without process usage)."""
    packets = CounterMetricFamily("tracewire_stream_packets", "Packets the stream produced (read from its ring "
                                  "buffer and written or sent).", labels=_STREAM_LABELS)
    raw = CounterMetricFamily("tracewire_stream_raw_bytes", "Bytes of the stream's packets before compression.",
                              labels=_STREAM_LABELS)
    wire = CounterMetricFamily("tracewire_stream_wire_bytes", "Bytes of the stream's packets as sent (compressed; "
                               "equal to raw bytes for a local sink).", labels=_STREAM_LABELS)
    events = CounterMetricFamily("tracewire_stream_events", "Whole events the app's tracer says it wrote into "
                                 "the stream's ring buffer (its ring's events word: the app's own account, as "
                                 "'tracewire status' shows it).", labels=_STREAM_LABELS)
    discarded = CounterMetricFamily("tracewire_stream_events_discarded", "Events the stream's ring buffer "
                                    "discarded (full, discard mode).", labels=_STREAM_LABELS)
    unacked = GaugeMetricFamily("tracewire_stream_unacked_packets", "Packets sent to the relay and not "
                                "acknowledged yet.", labels=_STREAM_LABELS)
    spool = GaugeMetricFamily("tracewire_stream_spool_bytes", "Bytes the stream's unacknowledged packets take "
                              "in the spool (compressed once compressed).", labels=_STREAM_LABELS)
    unread = GaugeMetricFamily("tracewire_stream_ring_unread_subbuffers", "Sub-buffers of the ring buffer "
                               "holding events not read yet.", labels=_STREAM_LABELS)
    broken = GaugeMetricFamily("tracewire_stream_error", "1 when status reports an error for the stream.",
                               labels=_STREAM_LABELS)
    reconnects = CounterMetricFamily("tracewire_session_reconnects", "Connections to the relay the session "
                                     "made after its first one.", labels=["session", "uid"])
    seen: dict[tuple[str, str], int] = {}
    for ts in snap.streams:
        s = ts.stats
        labels = [ts.session, str(ts.uid), s.path, s.channel]
        packets.add_metric(labels, s.packets)
        events.add_metric(labels, s.events)
        raw.add_metric(labels, s.raw_bytes)
        wire.add_metric(labels, s.wire_bytes)
        discarded.add_metric(labels, s.discarded)
        unacked.add_metric(labels, s.unacked)
        spool.add_metric(labels, s.unacked_bytes)
        unread.add_metric(labels, s.ring_unread)
        broken.add_metric(labels, 0 if s.error is None else 1)
        if s.relay_reconnects is not None:
            key = (ts.session, str(ts.uid))
            seen[key] = max(seen.get(key, 0), s.relay_reconnects)
    for (session, uid), n in sorted(seen.items()):
        reconnects.add_metric([session, uid], n)
    incomplete = GaugeMetricFamily("tracewire_metrics_unanswered_sessions", "Sessions left out of this scrape: "
                                   "their consumerd did not answer in time.", value=snap.unanswered)
    return [packets, events, raw, wire, discarded, unacked, spool, unread, broken, reconnects, incomplete]


_RELAY_LABELS = ["host", "session", "stream"]


def relay_families(snap: RelaySnapshot) -> list[Metric]:
    """The metric families of a relay's snapshot (without process usage)."""
    packets = CounterMetricFamily("tracewire_relay_stream_packets", "Packets written to the stream's file.",
                                  labels=_RELAY_LABELS)
    raw = CounterMetricFamily("tracewire_relay_stream_raw_bytes", "Bytes of the packets written (decompressed).",
                              labels=_RELAY_LABELS)
    wire = CounterMetricFamily("tracewire_relay_stream_wire_bytes", "Bytes of the written packets' frames as "
                               "received (compressed payload and frame header, as the target counts them).",
                               labels=_RELAY_LABELS)
    discarded = CounterMetricFamily("tracewire_relay_stream_events_discarded", "Events the target discarded "
                                    "(the last written packet's events_discarded).", labels=_RELAY_LABELS)
    for rel, n_packets, n_raw, n_wire, n_discarded in snap.streams:
        labels = list(split_path(rel))
        packets.add_metric(labels, n_packets)
        raw.add_metric(labels, n_raw)
        wire.add_metric(labels, n_wire)
        discarded.add_metric(labels, n_discarded)
    reconnects = CounterMetricFamily("tracewire_relay_session_reconnects", "Times a connection declared the "
                                     "session again (its target reconnected).", labels=["host", "session"])
    viewers = GaugeMetricFamily("tracewire_relay_live_viewers", "Live viewers attached to the session.",
                                labels=["host", "session"])
    for rel, n in snap.sessions:
        reconnects.add_metric(list(split_path(rel)[:2]), n)
    for rel, n in snap.live_viewers:
        viewers.add_metric(list(split_path(rel)[:2]), n)
    errors = CounterMetricFamily("tracewire_relay_write_errors", "Writes to the output that failed, by kind "
                                 "(a target resends what a failure that heals refused).", labels=["reason"])
    for reason, n in snap.write_errors:
        errors.add_metric([reason], n)
    return [
        packets, raw, wire, discarded, reconnects, viewers, errors,
        GaugeMetricFamily("tracewire_relay_connections", "Consumer connections open now.", value=snap.connections),
        CounterMetricFamily("tracewire_relay_auth_failures", "Handshakes refused: bad or unknown key, or a key "
                            "not allowed for the host.", value=snap.auth_failures),
        CounterMetricFamily("tracewire_relay_decompression_errors", "Packets that did not decompress (the "
                            "connection was dropped).", value=snap.decompression_errors),
    ]


# ---------------------------------------------------------------- processes


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    cpu_seconds: float  # user + system
    rss_bytes: int


def parse_proc_stat(stat: str, statm: str) -> ProcessUsage:
    """CPU time and resident size from ``/proc/PID/stat`` and ``/proc/PID/statm``.

    Raises:
        ValueError: the text is not what Linux writes there.
    """
    # The command name (field 2) may hold spaces and parentheses: the
    # fields after it start after the last ')'.
    head, sep, rest = stat.rpartition(")")
    fields = rest.split()
    if not sep or not head or len(fields) < 13:
        raise ValueError("not a /proc/PID/stat line")
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    pages = statm.split()
    if len(pages) < 2:
        raise ValueError("not a /proc/PID/statm line")
    return ProcessUsage((utime + stime) / _CLK_TCK, int(pages[1]) * _PAGE)


def read_process(pid: int, proc: str = "/proc") -> ProcessUsage | None:
    """The usage of ``pid`` now; None when it is gone or unreadable."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read(_MAX_PROC_FILE).decode(errors="replace")
        with open(f"{proc}/{pid}/statm", "rb") as f:
            statm = f.read(_MAX_PROC_FILE).decode(errors="replace")
        return parse_proc_stat(stat, statm)
    except (OSError, ValueError):
        return None


def process_families(procs: Iterable[ProcessRef], proc: str = "/proc") -> list[Metric]:
    """CPU and RSS of ``procs`` (those still there)."""
    labels = ["process", "pid", "uid"]
    cpu = CounterMetricFamily("tracewire_process_cpu_seconds", "User and system CPU time of the process.",
                              labels=labels)
    rss = GaugeMetricFamily("tracewire_process_resident_memory_bytes", "Resident memory of the process.",
                            labels=labels)
    for p in procs:
        usage = read_process(p.pid, proc)
        if usage is None:
            continue
        cpu.add_metric([p.process, str(p.pid), p.uid], usage.cpu_seconds)
        rss.add_metric([p.process, str(p.pid), p.uid], usage.rss_bytes)
    return [cpu, rss]


class SnapshotCollector(Collector):
    """A prometheus_client collector over a snapshot source.

    Args:
        take: called in the scrape thread; returns the daemon's snapshot
            (raises :class:`tracewire.metrics_server.SnapshotUnavailable`
            when the loop does not answer).
        families: turns the snapshot into metric families.
        processes: the processes a snapshot names.
        empty: an empty snapshot: ``describe()`` names the families from it
            (without asking the loop), so that ``/metrics?name[]=...`` works.
    """

    def __init__(self, take: _Take, families: _Families, processes: _Processes, empty: Any) -> None:
        self._take = take
        self._families = families
        self._processes = processes
        self._empty = empty

    def describe(self) -> Iterator[Metric]:
        yield from self._families(self._empty)
        yield from process_families(())

    def collect(self) -> Iterator[Metric]:
        snap = self._take()
        yield from self._families(snap)
        yield from process_families(self._processes(snap))

