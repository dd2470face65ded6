"""sessiond's ``--metrics-listen``: its consumerds' counters for Prometheus.

Theory of operation
-------------------
Imported only when ``SessiondConfig.metrics`` is set (it imports
prometheus_client through :mod:`tracewire.metrics`).  A scrape asks the loop
for a snapshot (:mod:`tracewire.metrics_server`); :func:`take_snapshot`,
a task of sessiond's loop, sends the StatusOp that ``tracewire status`` sends
for every session of every consumerd that runs, all at once, so the figures
are the ones ``status`` shows.  It never starts a consumerd (a session whose
owner has none has nothing to count), and one that does not answer within the
scrape's timeout leaves its sessions out (``tracewire_metrics_unanswered_sessions``)
without holding up the others.  The processes whose CPU and memory are
exposed are sessiond, its zygote and every consumerd (labelled with the uid
it works for); they are read from /proc in the scrape thread.

Who can read: everyone who reaches the address sees every user's session and
stream names; the default address is 127.0.0.1 (docs/security.md).
"""

from __future__ import annotations

import os
from functools import partial
from typing import TYPE_CHECKING

import trio

from sessiond.model import UserError
from tracewire.consumer_ops import StatusOp, StreamsReply
from tracewire.metrics import (
    ProcessRef,
    SnapshotCollector,
    TargetSnapshot,
    TargetStream,
    target_families,
)
from tracewire.metrics_config import MetricsConfig
from tracewire.metrics_server import LoopSnapshot, MetricsServer

if TYPE_CHECKING:
    from sessiond.consumers import ConsumerPool
    from sessiond.model import Registry
    from sessiond.zygote import Zygote

__all__ = ["bind_metrics", "serve_sessiond_metrics", "take_snapshot"]


async def take_snapshot(registry: Registry, consumers: ConsumerPool, zygote: Zygote | None,
                        timeout: float) -> TargetSnapshot:
    """Every session's stream counters, from the consumerds that run now."""
    streams: list[TargetStream] = []
    unanswered = 0

    async def one(uid: int, name: str) -> None:
        nonlocal unanswered
        handle = consumers.handles.get(uid)
        reply = None
        if handle is not None and handle.ready.is_set():
            try:
                reply = await handle.call(StatusOp(session=name), timeout=timeout)
            except (UserError, trio.TooSlowError):  # counted below, not raised
                reply = None
        if isinstance(reply, StreamsReply):
            streams.extend(TargetStream(name, uid, s) for s in reply.streams)
        elif handle is not None:
            unanswered += 1

    async with trio.open_nursery() as nursery:
        for sess in list(registry.sessions.values()):
            nursery.start_soon(one, sess.owner_uid, sess.name)
    procs = [ProcessRef("sessiond", os.getpid())]
    if zygote is not None and zygote.pid is not None:
        procs.append(ProcessRef("zygote", zygote.pid))
    for uid, handle in sorted(consumers.handles.items()):
        if handle.pid is not None:
            procs.append(ProcessRef("consumerd", handle.pid, str(uid)))
    streams.sort(key=lambda t: (t.session, t.stats.path))
    return TargetSnapshot(streams=tuple(streams), processes=tuple(procs), unanswered=unanswered)


def bind_metrics(config: MetricsConfig) -> MetricsServer:
    """The endpoint, bound (before sessiond starts anything else).

    Raises:
        UserError: the address cannot be bound (one line).
    """
    try:
        return MetricsServer(config)
    except OSError as exc:
        raise UserError(f"cannot serve metrics on {config}: {exc.strerror or exc}") from None


async def serve_sessiond_metrics(
    server: MetricsServer, registry: Registry, consumers: ConsumerPool, zygote: Zygote | None, *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve sessiond's metrics on the bound ``server`` until cancelled."""
    config = server.config
    # The consumerd calls get a little less than the scrape's wait, so that
    # one slow consumerd is reported unanswered rather than failing the scrape.
    snapshot: LoopSnapshot[TargetSnapshot] = LoopSnapshot(
        partial(take_snapshot, registry, consumers, zygote, config.timeout * 0.8), config.timeout)
    collector = SnapshotCollector(snapshot.get, target_families, lambda snap: snap.processes,
                                  TargetSnapshot())
    await server.serve(collector, snapshot, task_status=task_status)
