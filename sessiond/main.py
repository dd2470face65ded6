"""``tracewire-sessiond``: the session daemon (the CLI starts one when needed)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from functools import partial
from typing import TYPE_CHECKING

import click
import trio

from sessiond import SessiondConfig, UserError, default_rundir, serve_sessiond
from sessiond.limits import LimitsFileError, LimitsPolicy
from sessiond.shutdown import exit_now, stop_sessions
from sessiond.zygote import ForkedZygote, fork_zygote
from tracewire.version import version_option

if TYPE_CHECKING:
    from tracewire.metrics_config import MetricsConfig

STARTUP_FAILURE = 3


async def _serve_until_signal(config: SessiondConfig, zygote: ForkedZygote, shutdown_timeout: float = 10.0) -> None:
    """Serves until SIGTERM/SIGINT: the first stops every started session
    (sessiond/shutdown.py) for at most ``shutdown_timeout`` s, then exits; a
    second one exits at once."""
    log = logging.getLogger("sessiond")
    async with trio.open_nursery() as nursery:
        sd = await nursery.start(partial(serve_sessiond, config, zygote=zygote))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            stopping = False
            async for signum in signals:
                name = signal.Signals(signum).name
                if stopping:
                    log.warning("%s again: exiting now", name)
                    exit_now(sd, nursery.cancel_scope)
                    return
                stopping = True
                log.info("%s: stopping the started sessions, then exiting (%s again: at once)", name, name)
                nursery.start_soon(stop_sessions, sd, shutdown_timeout, partial(exit_now, sd, nursery.cancel_scope))


def run(config: SessiondConfig, shutdown_timeout: float = 10.0) -> int:
    """Run sessiond until SIGTERM/SIGINT; returns the exit code.  The first
    signal stops the started sessions for at most ``shutdown_timeout`` s.

    The consumerd zygote is forked first, while this process is still
    single-threaded: it shares sessiond's imports, and the consumerds it forks
    share them too (sessiond/zygote.py)."""
    failure = None
    try:
        zygote = fork_zygote(config.rundir)
        trio.run(_serve_until_signal, config, zygote, shutdown_timeout)
    except* UserError as group:  # nurseries wrap what serve_sessiond raises
        failure = str(group.exceptions[0])
    except* OSError as group:
        failure = f"cannot start: {group.exceptions[0]}"
    if failure is not None:
        print(f"tracewire-sessiond: {failure}", file=sys.stderr)
        return STARTUP_FAILURE
    return 0


def _metrics_listen(ctx: click.Context, param: click.Parameter, value: str | None) -> MetricsConfig | None:
    """--metrics-listen: the metrics modules are imported only when it is given."""
    if value is None:
        return None
    from tracewire.metrics_config import parse_listen

    try:
        return parse_listen(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(context_settings={"auto_envvar_prefix": "TRACEWIRE_SESSIOND"})
@click.option("--rundir", default=None, help="Run directory (default: $TRACEWIRE_RUNDIR, "
              "$XDG_RUNTIME_DIR/tracewire, or /run/tracewire for root).")
@click.option("--stop-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0,
              show_default=True, help="How long 'tracewire stop' waits for a relay's acknowledgements "
              "before reporting what is still kept, unless the stop gives its own --timeout "
              "[env TRACEWIRE_SESSIOND_STOP_TIMEOUT].")
@click.option("--consumer-rt-priority", type=click.IntRange(0, 99), default=1, show_default=True,
              help="Real-time priority (SCHED_RR) of the consumerd of root's sessions (draining and "
              "compressing), so that a busy machine cannot delay the drain until the ring buffers "
              "overflow; 0: normal scheduling. Other users' consumerds always run at normal priority, "
              "as does every consumerd when sessiond may not grant it (not root) "
              "[env TRACEWIRE_SESSIOND_CONSUMER_RT_PRIORITY].")
@click.option("--snapshot-keep-dead", type=click.IntRange(0, 100000), default=16, show_default=True,
              metavar="N",
              help="A snapshot session keeps the ring buffers of the last N apps that exited or "
              "crashed (for 'tracewire snapshot record'); older ones are freed "
              "[env TRACEWIRE_SESSIOND_SNAPSHOT_KEEP_DEAD].")
@click.option("--limits", "limits_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              envvar="TRACEWIRE_SESSIOND_LIMITS",
              help="Per-user limits (TOML): sessions, channels, buffer bytes (rings and relay spools) and "
              "apps, in a [default] table and [user.NAME] / [group.NAME] tables, sizes as \"64M\". "
              "Without it every user but root has generous built-in limits; root is unlimited unless "
              "a [user.root] table says otherwise. Read once, at start-up "
              "[env TRACEWIRE_SESSIOND_LIMITS].")
@click.option("--load", "load_dir", type=click.Path(file_okay=False, exists=True), default=None, metavar="DIR",
              envvar="TRACEWIRE_SESSIOND_LOAD",
              help="At start-up, load every saved session (*.json, written by 'tracewire save') in DIR, "
              "for the file's owner: a user's sessiond takes only the user's files, root's takes root's and "
              "those of 'tracing' members; a file others may write is refused.  A relay session that a "
              "killed sessiond left spooled sends what its spool holds [env TRACEWIRE_SESSIOND_LOAD].")
@click.option("--metrics-listen", default=None, metavar="HOST:PORT|PORT", callback=_metrics_listen,
              help="Serve Prometheus metrics (every session's stream counters, as 'tracewire status' "
              "shows them, and the CPU and memory of sessiond and its consumerds) on "
              "http://HOST:PORT/metrics (PORT alone: on 127.0.0.1); off by default.  Anyone who "
              "reaches the address sees every user's session names: keep it on 127.0.0.1 (docs/security.md) "
              "[env TRACEWIRE_SESSIOND_METRICS_LISTEN].")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="On SIGTERM/SIGINT: seconds to stop the started sessions (apps "
              "quiesce, consumerds flush to their sinks) before exiting; a second signal exits at once "
              "[env TRACEWIRE_SESSIOND_SHUTDOWN_TIMEOUT].")
@click.option("--log-level", default="INFO", show_default=True, help="Python logging level.")
@version_option("tracewire-sessiond")
def main(rundir: str | None, stop_timeout: float, consumer_rt_priority: int, snapshot_keep_dead: int,
         limits_file: str | None, load_dir: str | None, metrics_listen: MetricsConfig | None,
         shutdown_timeout: float, log_level: str) -> None:
    """Session daemon: the registry of tracing sessions.

    It owns the ring buffers, spawns consumerd and answers the tracewire CLI
    on RUNDIR/control.sock; traced apps register on RUNDIR/apps.sock.

    SIGTERM/SIGINT: every started session is stopped as 'tracewire stop' does
    (its events written to its trace, or sent to its relay, spooled if the
    relay does not answer), within --shutdown-timeout; then sessiond exits 0
    with its consumerds.  The sessions end with sessiond.  A second signal
    exits at once.
    """
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr,
        format="%(asctime)s sessiond %(levelname)s %(name)s: %(message)s",
    )
    limits = LimitsPolicy()
    if limits_file is not None:
        try:
            limits = LimitsPolicy.load(os.path.abspath(limits_file))
        except LimitsFileError as exc:
            print(f"tracewire-sessiond: {exc}", file=sys.stderr)
            sys.exit(STARTUP_FAILURE)
    sys.exit(run(SessiondConfig(rundir=rundir or default_rundir(), stop_timeout=stop_timeout,
                                consumer_rt_priority=consumer_rt_priority,
                                snapshot_keep_dead=snapshot_keep_dead, limits=limits,
                                load_dir=os.path.abspath(load_dir) if load_dir else None,
                                metrics=metrics_listen), shutdown_timeout))
