"""The ``--metrics-listen`` HTTP endpoint, served beside a trio daemon.

Theory of operation
-------------------
prometheus_client renders the exposition text; this module serves it without
ever blocking the daemon's event loop, and without letting scrapers (anyone
who reaches the port) cost the daemon more than a bound:

* **A thread server, bounded.**  The HTTP server (the standard library's
  ``ThreadingHTTPServer`` with prometheus_client's ``MetricsHandler``) runs in
  its own thread; each connection gets a thread, but at most
  ``max_connections`` at once: one more is closed as soon as it is accepted.
  prometheus_client's own ``start_http_server`` has no such bound and no
  socket timeout, so clients that connect and send nothing would each hold a
  thread for ever.  Here every read and write of a connection times out after
  ``request_timeout`` s.  Silent clients can at worst take the slots (scrapes
  fail while they hold them); the daemon's loop never notices.
* **Snapshots taken in the loop.**  A scrape calls the daemon's collector,
  which asks :class:`LoopSnapshot` for a snapshot: the request is handed to
  the trio loop (``TrioToken.run_sync_soon``, which never blocks the thread
  or the loop), a task in the metrics nursery takes the snapshot (an async
  function: sessiond asks each consumerd, like ``tracewire status``) under a
  ``timeout``, and the scrape thread waits for it at most that long.  Scrapes
  that arrive while a snapshot is being taken share it, so many scrapers cost
  the loop one snapshot at a time.  No timeout: the scrape gets 503.

The loop side is :class:`MetricsServer`: bound when the daemon starts (an
address in use is a start-up error), then served by a task of the daemon's
nursery that runs the server thread and shuts it down when cancelled.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import trio

from tracewire.metrics_config import MetricsConfig
from tracewire.url import format_hostport

__all__ = ["LoopSnapshot", "MetricsServer", "SnapshotUnavailable", "serve_metrics"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

METRICS_PATHS = ("/metrics", "/")


class SnapshotUnavailable(Exception):
    """The daemon's loop did not give a snapshot (timeout, or shutting down)."""


class LoopSnapshot(Generic[_T]):
    """Hands snapshot requests from scrape threads to the trio loop.

    Args:
        take: the async function, run in the loop, that returns a snapshot.
        timeout: seconds a snapshot may take.
    """

    def __init__(self, take: Callable[[], Awaitable[_T]], timeout: float) -> None:
        self._take = take
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future[_T] | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Called in the loop: snapshots run as tasks of ``nursery``."""
        self._token = trio.lowlevel.current_trio_token()
        self._nursery = nursery

    def get(self) -> _T:
        """A snapshot; called from any thread but the loop's.

        Raises:
            SnapshotUnavailable: not taken within the timeout, or the loop
                is gone or failed to take it (logged).
        """
        with self._lock:
            fut = self._pending
            if fut is None or fut.done():
                fut = self._pending = concurrent.futures.Future()
                token = self._token
                if token is None:
                    raise SnapshotUnavailable("the metrics endpoint is not attached to the daemon")
                try:
                    token.run_sync_soon(self._start, fut)
                except trio.RunFinishedError:
                    raise SnapshotUnavailable("the daemon is shutting down") from None
        try:
            return fut.result(timeout=self.timeout + 1.0)
        except concurrent.futures.TimeoutError:
            raise SnapshotUnavailable(f"no snapshot within {self.timeout:g} s") from None

    def _start(self, fut: concurrent.futures.Future[_T]) -> None:
        """In the loop (a run_sync_soon callback): start the snapshot task."""
        try:
            assert self._nursery is not None
            self._nursery.start_soon(self._run, fut)
        except RuntimeError:  # the nursery is closed: shutting down
            fut.set_exception(SnapshotUnavailable("the daemon is shutting down"))

    async def _run(self, fut: concurrent.futures.Future[_T]) -> None:
        try:
            with trio.move_on_after(self.timeout):
                fut.set_result(await self._take())
        except Exception as exc:  # a bug: the scrape fails, the daemon goes on
            logger.exception("metrics snapshot failed")
            fut.set_exception(SnapshotUnavailable(f"snapshot failed: {type(exc).__name__}"))
        finally:
            if not fut.done():
                fut.set_exception(SnapshotUnavailable(f"no snapshot within {self.timeout:g} s"))


def _handler_class(registry: Any, request_timeout: float) -> type[http.server.BaseHTTPRequestHandler]:
    from prometheus_client.exposition import MetricsHandler

    # One scrape renders at a time: rendering is Python code that holds the
    # GIL, and every thread rendering at once would leave the event loop's
    # thread a smaller share of it (a loop that waits for the GIL is stalled).
    render = threading.Lock()

    class Handler(MetricsHandler):
        timeout = request_timeout  # StreamRequestHandler: the socket's timeout
        protocol_version = "HTTP/1.0"  # one request per connection: a slot is freed at once

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in METRICS_PATHS:
                self.send_error(404, "metrics are at /metrics")
                return
            try:
                with render:
                    super().do_GET()
            except SnapshotUnavailable as exc:
                logger.warning("metrics scrape from %s failed: %s", self.client_address[0], exc)
                self.send_error(503, str(exc))

    Handler.registry = registry
    return Handler


class _BoundedServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once; nothing
    printed on stderr for a client's errors."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, config: MetricsConfig, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _type, _proto, _name, sockaddr = infos[0]
        self.address_family = family
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self.refused = 0
        super().__init__((str(sockaddr[0]), int(sockaddr[1])), handler)

    def server_bind(self) -> None:
        # http.server's server_bind resolves the host name (getfqdn): skip it.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("metrics connection from %s failed", client_address, exc_info=True)


class MetricsServer:
    """The endpoint, bound at once (so that an address in use is a start-up
    error of the daemon, reported before anything else starts) and served
    later by :meth:`serve`; connections wait in the backlog meanwhile.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, config: MetricsConfig) -> None:
        from prometheus_client import CollectorRegistry

        self.config = config
        # auto_describe=False: registering must not call collect() (it would
        # ask the loop, from the loop, for a snapshot).
        self.registry = CollectorRegistry(auto_describe=False)
        self._http = _BoundedServer(config, _handler_class(self.registry, config.request_timeout))

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Close the listening socket (done by serve() when it ends)."""
        self._http.server_close()

    async def serve(self, collector: Any, snapshot: LoopSnapshot[Any], *,
                    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve ``collector`` (a prometheus_client Collector reading
        ``snapshot``) until cancelled; task_status receives the address."""
        self.registry.register(collector)
        thread = threading.Thread(target=self._http.serve_forever, name="metrics-http", daemon=True)
        try:
            async with trio.open_nursery() as nursery:
                snapshot.attach(nursery)
                thread.start()
                logger.info("metrics on http://%s/metrics", format_hostport(*self.address))
                task_status.started(self.address)
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                if thread.is_alive():
                    await trio.to_thread.run_sync(self._http.shutdown)
                self.close()


async def serve_metrics(
    config: MetricsConfig, collector: Any, snapshot: LoopSnapshot[Any], *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind and serve at once: ``MetricsServer(config).serve(...)``.

    Raises:
        OSError: before task_status.started, if the address cannot be bound.
    """
    await MetricsServer(config).serve(collector, snapshot, task_status=task_status)
