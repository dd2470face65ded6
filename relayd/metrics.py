"""The relay's counters for ``--metrics-listen`` (see :mod:`tracewire.metrics`).

Theory of operation
-------------------
:class:`RelayCounters` is plain bookkeeping the relay's event loop updates
with O(1) calls from a few hooks in :mod:`relayd.daemon` (a batch written,
a session declared, a handshake refused, a packet that does not decompress,
a write that failed).  It imports nothing beyond the standard library, so a
relay without ``--metrics-listen`` pays a few integer additions per batch.
:meth:`RelayCounters.snapshot` copies it, in the loop, into the frozen
:class:`tracewire.metrics.RelaySnapshot` a scrape thread renders.

Streams are keyed by their file's path relative to the output directory
(``HOST/SESSION-CREATED/TRACE.../CHANNEL_N``), so a target that reconnects
and declares a stream again continues its counters.  The counters of closed
streams are kept (a scrape after ``tracewire stop`` or ``destroy`` still sees
them), the oldest dropped beyond ``max_closed``: a long-running relay's
memory does not grow with every session it ever wrote.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from relayd.daemon import RelayServer
    from tracewire.metrics import RelaySnapshot
    from tracewire.metrics_config import MetricsConfig
    from tracewire.metrics_server import MetricsServer

__all__ = ["RelayCounters", "bind_metrics", "serve_relay_metrics"]

DEFAULT_MAX_CLOSED = 4096


@dataclass(slots=True)
class _StreamCount:
    packets: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    discarded: int = 0
    open: int = 0  # connections holding it now


@dataclass(slots=True)
class _SessionCount:
    declared: int = 0  # SessionDecl seen for it, over every connection


class RelayCounters:
    """Counters of one relay process (one serve_relayd call)."""

    def __init__(self, max_closed: int = DEFAULT_MAX_CLOSED) -> None:
        self.max_closed = max_closed
        self.streams: dict[str, _StreamCount] = {}
        # "HOST/SESSION-CREATED", the most recently declared last; the
        # oldest dropped beyond max_closed.
        self.sessions: dict[str, _SessionCount] = {}
        # Closed entries, oldest first: dropped beyond max_closed.
        self._closed_streams: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.connections = 0
        self.auth_failures = 0
        self.decompression_errors = 0
        self.write_errors: dict[str, int] = {}

    # -- hooks (called in the relay's loop) ----------------------------------

    def session_opened(self, rel: str) -> None:
        """A connection declared session directory ``rel`` ("HOST/SESSION-CREATED")."""
        s = self.sessions.pop(rel, None) or _SessionCount()
        s.declared += 1
        self.sessions[rel] = s  # the most recently declared last
        while len(self.sessions) > self.max_closed:
            del self.sessions[next(iter(self.sessions))]

    def stream_opened(self, rel: str) -> None:
        s = self.streams.get(rel)
        if s is None:
            s = self.streams[rel] = _StreamCount()
        s.open += 1
        self._closed_streams.pop(rel, None)

    def stream_closed(self, rel: str) -> None:
        s = self.streams.get(rel)
        if s is None or s.open == 0:
            return
        s.open -= 1
        if s.open == 0:
            _retire(rel, self.streams, self._closed_streams, self.max_closed)

    def written(self, rel: str, raw_bytes: int, wire_bytes: int, discarded: int) -> None:
        """One packet is in the stream's file."""
        s = self.streams.get(rel)
        if s is None:
            s = self.streams[rel] = _StreamCount()
        s.packets += 1
        s.raw_bytes += raw_bytes
        s.wire_bytes += wire_bytes
        s.discarded = max(s.discarded, discarded)

    def write_error(self, reason: str) -> None:
        self.write_errors[reason] = self.write_errors.get(reason, 0) + 1

    # -- scrape ----------------------------------------------------------------

    def snapshot(self, live_viewers: dict[str, int]) -> RelaySnapshot:
        """A copy for a scrape, taken in the loop: numbers only (the scrape
        thread makes labels of the paths); ``live_viewers``: viewers by
        "HOST/SESSION-CREATED"."""
        from tracewire.metrics import RelaySnapshot

        return RelaySnapshot(
            streams=tuple([(rel, s.packets, s.raw_bytes, s.wire_bytes, s.discarded)
                           for rel, s in self.streams.items()]),
            sessions=tuple([(rel, max(s.declared - 1, 0)) for rel, s in self.sessions.items()]),
            live_viewers=tuple(live_viewers.items()),
            connections=self.connections, auth_failures=self.auth_failures,
            decompression_errors=self.decompression_errors, write_errors=tuple(sorted(self.write_errors.items())),
        )


def _retire(key: str, table: dict[str, _StreamCount], closed: collections.OrderedDict[str, None], cap: int) -> None:
    closed[key] = None
    while len(closed) > cap:
        old, _ = closed.popitem(last=False)
        table.pop(old, None)


def bind_metrics(config: MetricsConfig) -> MetricsServer:
    """The endpoint, bound (imports prometheus_client: called only with
    --metrics-listen).

    Raises:
        OSError: the address cannot be bound.
    """
    from tracewire.metrics_server import MetricsServer

    return MetricsServer(config)


async def serve_relay_metrics(
    endpoint: MetricsServer, server: RelayServer, *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the relay's metrics on the bound ``endpoint`` until cancelled."""
    from tracewire.metrics import ProcessRef, RelaySnapshot, SnapshotCollector, relay_families
    from tracewire.metrics_server import LoopSnapshot

    me = (ProcessRef("relayd", os.getpid()),)

    async def take() -> RelaySnapshot:
        return dataclasses.replace(server.metrics_snapshot(), processes=me)

    snapshot: LoopSnapshot[RelaySnapshot] = LoopSnapshot(take, endpoint.config.timeout)
    collector = SnapshotCollector(snapshot.get, relay_families, lambda snap: snap.processes,
                                  RelaySnapshot())
    await endpoint.serve(collector, snapshot, task_status=task_status)
