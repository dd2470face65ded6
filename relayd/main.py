"""``tracewire-relayd``: the relay daemon's command line."""

from __future__ import annotations

import gc
import ipaddress
import logging
import resource
import signal
import ssl
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click
import trio

from relayd.daemon import (
    AuthKeyError,
    Listeners,
    RelaydConfig,
    RelaydStartupError,
    RelayServer,
    parse_auth_keys,
    serve_relayd,
)
from relayd.live import LiveConfig
from tracewire import wire
from tracewire.url import format_hostport
from tracewire.version import version_option

__all__ = ["STARTUP_FAILURE", "ReloadPaths", "main", "reload", "run"]

logger = logging.getLogger(__name__)

STARTUP_FAILURE = 3
PROG = "tracewire-relayd"
FSYNC_DEFAULT = True  # see docs/reliability.md, "Durability"


@dataclass(frozen=True, slots=True)
class Address:
    """A HOST:PORT option value."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


if TYPE_CHECKING:
    from tracewire.metrics_config import MetricsConfig

if TYPE_CHECKING:  # generic in click >= 8.2 only: subscript it for mypy alone
    _AddressParam = click.ParamType[Address, Any]
    _OptionalAddressParam = click.ParamType[Address | None, Any]
else:
    _AddressParam = _OptionalAddressParam = click.ParamType


class AddressType(_AddressParam):
    """HOST:PORT, [IPv6]:PORT; PORT 0 picks a free port."""

    name = "HOST:PORT"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Address:
        if isinstance(value, Address):
            return value
        text = str(value)
        host, sep, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            self.fail(f"{text!r} is not HOST:PORT (e.g. 0.0.0.0:6342, [::]:6342)", param, ctx)
        return Address(host, int(port))


class AddressOrOffType(_OptionalAddressParam):
    """HOST:PORT as AddressType, or "off" (None: no such port)."""

    name = "HOST:PORT|off"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Address | None:
        if value is None or str(value) == "off":
            return None
        return AddressType().convert(value, param, ctx)


@dataclass(frozen=True, slots=True)
class ReloadPaths:
    """The files SIGHUP reads again (None: not configured)."""

    auth_keys: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


async def reload(server: RelayServer, paths: ReloadPaths, tls: ssl.SSLContext | None) -> None:
    """SIGHUP: reads the key file (and the TLS certificate and key) again.

    A file that cannot be read or parsed changes nothing: the keys (or the
    certificate) in force stay, and one line says why.  New keys admit new
    connections at once; a connection whose key was removed (or changed,
    or lost its host) is closed (RelayServer.set_auth_keys); the others go
    on.  A new certificate serves the handshakes that start after it.

    Args:
        server: the running relay (Listeners.server).
        paths: where the files are.
        tls: the SSLContext the relay serves with, or None.
    """
    if paths.auth_keys is not None:
        try:
            keys = await trio.to_thread.run_sync(parse_auth_keys, paths.auth_keys)
        except AuthKeyError as exc:
            logger.error("SIGHUP: keeping the %d keys in force: %s", len(server.auth_keys or {}), exc)
        else:
            closed = server.set_auth_keys(keys)
            logger.info("SIGHUP: %d keys loaded from %s%s", len(keys), paths.auth_keys,
                           f"; closed {closed} connections whose key was revoked" if closed else "")
    if tls is not None and paths.tls_cert is not None and paths.tls_key is not None:
        cert, key = paths.tls_cert, paths.tls_key
        try:
            await trio.to_thread.run_sync(_tls_context, cert, key)  # a trial: the one in use is not touched yet
            tls.load_cert_chain(cert, key)  # new handshakes get it; live TLS sessions keep theirs
        except (OSError, ssl.SSLError) as exc:
            logger.error("SIGHUP: keeping the TLS certificate in use: cannot load %s / %s: %s", cert, key, exc)
        else:
            logger.info("SIGHUP: TLS certificate reloaded from %s", cert)
    if paths.auth_keys is None and tls is None:
        logger.warning("SIGHUP: nothing to reload (no --auth-keys, no TLS)")


async def _serve(config: RelaydConfig, paths: ReloadPaths = ReloadPaths()) -> None:
    """Runs serve_relayd: SIGHUP reloads, the first SIGTERM or SIGINT
    drains, a second one ends the relay at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def relay(task_status: trio.TaskStatus[Listeners] = trio.TASK_STATUS_IGNORED) -> None:
                await serve_relayd(config, task_status=task_status)
                nursery.cancel_scope.cancel()  # drained

            listeners: Listeners = await nursery.start(relay)
            where = ", ".join(str(Address(*lst.socket.getsockname()[:2])) for lst in listeners)
            tls = " (TLS)" if config.tls is not None else ""
            live = ", ".join(str(Address(*lst.socket.getsockname()[:2])) for lst in listeners.live)
            live = f", live viewers on {live}" if live else ""
            if listeners.metrics is not None:
                live += f", metrics on http://{Address(*listeners.metrics)}/metrics"
            print(f"{PROG} listening on {where}{tls}{live}, writing to {config.output}", file=sys.stderr, flush=True)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    await reload(listeners.server, paths, config.tls)
                elif listeners.server.draining:
                    logger.warning("%s again: exiting now", name)
                    nursery.cancel_scope.cancel()
                    break
                else:
                    logger.warning("%s: draining (at most %g s; %s again to exit at once)", name,
                                   config.drain_timeout, name)
                    listeners.server.request_drain()


def run(config: RelaydConfig, paths: ReloadPaths = ReloadPaths()) -> int:
    """Runs the relay until it is drained (the first SIGTERM/SIGINT) or
    stopped (a second one); SIGHUP reloads the files in `paths`.

    Args:
        config: the relay configuration.
        paths: the key file and TLS files SIGHUP reads again.

    Returns:
        0 after a clean shutdown, STARTUP_FAILURE (3) if the relay could not
        start (the reason is printed as one line on stderr).
    """
    failure: RelaydStartupError | None = None
    # Everything imported so far lives as long as the process: out of the
    # collector's sight, a full collection no longer walks it (walking trio
    # and the rest was 10-13 % of the relay's CPU samples at full speed;
    # docs/design.md, "Where the relay's CPU goes").
    gc.collect()
    gc.freeze()
    try:
        trio.run(_serve, config, paths)
    except* RelaydStartupError as group:
        failure = group.exceptions[0]  # type: ignore[assignment]
    if failure is not None:
        print(f"{PROG}: {failure}", file=sys.stderr)
        return STARTUP_FAILURE
    return 0


def _raise_fd_limit() -> None:
    """Raises the soft RLIMIT_NOFILE to the hard one: every stream costs the
    relay two file descriptors, and running out of them would drop whichever
    connection opens a file next."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open file limit from %d: %s", soft, exc)


def _metrics_config(value: str | None) -> MetricsConfig | None:
    """--metrics-listen's configuration; the metrics modules (and
    prometheus_client) are imported only when it is on.

    Raises:
        click.BadParameter: not HOST:PORT, PORT or off.
    """
    if value is None or value == "off":
        return None
    from tracewire.metrics_config import parse_listen

    try:
        return parse_listen(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--metrics-listen") from None


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for --tls-cert/--tls-key (TLS 1.2 or later)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


@click.command(context_settings={"auto_envvar_prefix": "TRACEWIRE_RELAYD"})
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Directory the traces are written under.")
@click.option("--listen", type=AddressType(), default="0.0.0.0:6342", show_default=True,
              help="Address consumers connect to.")
@click.option("--live-listen", type=AddressOrOffType(), default="127.0.0.1:6344", show_default=True,
              help="Address for live viewers (babeltrace2 -i lttng-live, tracewire view --follow), or 'off'. "
                   "The live protocol has no authentication: see docs/security.md before binding another "
                   "address.")
@click.option("--live-allow", "live_allow", multiple=True, metavar="NETWORK",
              help="Accept live viewers only from this network (e.g. 192.0.2.0/24, 2001:db8::/32, 10.1.2.3); "
                   "repeatable. Default: anyone who reaches --live-listen.")
@click.option("--live-max-viewers", type=click.IntRange(min=1), default=256, show_default=True,
              help="Live viewer connections at once; more are closed at once.")
@click.option("--live-idle-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True, help="Drop a live viewer that sends no request for this many seconds.")
@click.option("--live-send-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Drop a live viewer that does not take a reply within this many seconds.")
@click.option("--live-orphan-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="End a live session for its viewers once its target has had no "
                                      "connection to the relay for this many seconds without closing it "
                                      "(the target died, or its network did).")
@click.option("--live-max-request", type=click.IntRange(min=64, max=1024 * 1024), default=4096,
              show_default=True, help="Bytes of a live viewer's requests buffered unanswered at most.")
@click.option("--auth-keys", type=click.Path(dir_okay=False), default=None,
              help="Key file: one 'KEY_ID SECRET HOST...' per line; without it anyone may write.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
              help="Serve TLS with this certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="Private key of --tls-cert (PEM).")
@click.option("--handshake-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds a consumer has to complete the handshake (and a live viewer to send CONNECT).")
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Drop a connection silent for this many seconds.")
@click.option("--max-frame", type=click.IntRange(min=4096), default=wire.DEFAULT_MAX_PAYLOAD_SIZE,
              show_default=True, help="Largest frame payload (a compressed packet) in bytes.")
@click.option("--max-packet", type=click.IntRange(min=4096), default=64 * 1024 * 1024, show_default=True,
              help="Largest packet once decompressed, in bytes (checked before decompressing).")
@click.option("--max-streams", type=click.IntRange(min=1), default=wire.DEFAULT_MAX_STREAMS,
              show_default=True, help="Open streams per connection.")
@click.option("--max-sessions", type=click.IntRange(min=1), default=wire.DEFAULT_MAX_SESSIONS,
              show_default=True, help="Open sessions per connection.")
@click.option("--max-metadata", type=click.IntRange(min=4096), default=wire.DEFAULT_MAX_METADATA_SIZE,
              show_default=True, help="Largest metadata file of one trace, in bytes.")
@click.option("--fsync/--no-fsync", default=FSYNC_DEFAULT, show_default=True,
              help="Acknowledge a packet only once it and its index entry are on stable storage (fdatasync), "
                   "so a power cut at this host cannot lose what a target has freed. See docs/reliability.md.")
@click.option("--fsync-interval", type=click.FloatRange(min=0.001, max=10.0), default=0.1, show_default=True,
              help="With --fsync: seconds written packets wait, at most, for the fdatasync that covers them.  "
                   "A disk that syncs faster is synced sooner: twice its last sync's time after the first "
                   "packet, at least 1 ms.")
@click.option("--metrics-listen", default="off", show_default=True, metavar="HOST:PORT|PORT|off",
              callback=lambda ctx, param, value: _metrics_config(value),
              help="Serve Prometheus metrics (per host/session/stream packets and bytes written, reconnects, "
                   "live viewers, auth failures, decompression and write errors, CPU and memory) on "
                   "http://HOST:PORT/metrics (PORT alone: on 127.0.0.1), or 'off'.  Session and host names "
                   "are visible to anyone who reaches it: see docs/security.md before binding another "
                   "address than 127.0.0.1.")
@click.option("--drain-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="On SIGTERM/SIGINT: seconds the relay waits for its connections to write, acknowledge and "
                   "close what they received before it cuts them (a second signal exits at once).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="INFO", show_default=True, help="Logging level.")
@version_option(PROG)
def main(
    output: str,
    listen: Address,
    live_listen: Address | None,
    live_allow: tuple[str, ...],
    live_max_viewers: int,
    live_idle_timeout: float,
    live_send_timeout: float,
    live_orphan_timeout: float,
    live_max_request: int,
    auth_keys: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    handshake_timeout: float,
    idle_timeout: float,
    max_frame: int,
    max_packet: int,
    max_streams: int,
    max_sessions: int,
    max_metadata: int,
    fsync: bool,
    fsync_interval: float,
    metrics_listen: MetricsConfig | None,
    drain_timeout: float,
    log_level: str,
) -> None:
    """Relay daemon: receives traces from consumer daemons and writes CTF traces
    under OUTPUT/<hostname>/<session>-<created>/.

    \b
    Signals:
      SIGHUP   read --auth-keys (and --tls-cert/--tls-key) again; a file that
               does not parse keeps the old ones; connections whose key was
               removed are closed, the others go on.
      SIGTERM  drain: stop accepting, write and acknowledge what was
      SIGINT   received, close every connection, exit 0; a second one exits
               at once.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s relayd %(levelname)s %(message)s",
                        stream=sys.stderr)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    try:
        keys = parse_auth_keys(auth_keys) if auth_keys is not None else None
        tls = _tls_context(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    except AuthKeyError as exc:
        click.echo(f"{PROG}: {exc}", err=True)
        sys.exit(STARTUP_FAILURE)
    except (OSError, ssl.SSLError) as exc:
        click.echo(f"{PROG}: cannot load TLS certificate/key: {exc}", err=True)
        sys.exit(STARTUP_FAILURE)
    try:
        allow = tuple(ipaddress.ip_network(n, strict=False) for n in live_allow)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--live-allow") from None
    _raise_fd_limit()
    config = RelaydConfig(
        output=output,
        listen_host=listen.host,
        listen_port=listen.port,
        auth_keys=keys,
        handshake_timeout=handshake_timeout,
        idle_timeout=idle_timeout,
        max_payload_size=max_frame,
        max_raw_packet=max_packet,
        max_streams=max_streams,
        max_sessions=max_sessions,
        max_metadata_size=max_metadata,
        tls=tls,
        fsync=fsync,
        fsync_interval=fsync_interval,
        drain_timeout=drain_timeout,
        live=None if live_listen is None else LiveConfig(
            listen_host=live_listen.host, listen_port=live_listen.port, max_viewers=live_max_viewers,
            idle_timeout=live_idle_timeout, connect_timeout=handshake_timeout, send_timeout=live_send_timeout,
            max_request=live_max_request,
            orphan_timeout=live_orphan_timeout, allow=allow),
        metrics=metrics_listen,
    )
    sys.exit(run(config, ReloadPaths(auth_keys, tls_cert, tls_key)))
