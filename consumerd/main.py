"""``tracewire-consumerd``: spawned by sessiond, not by hand."""

from __future__ import annotations

import logging
import sys
from functools import partial

import click
import trio

from consumerd.daemon import ConsumerdConfig, serve_consumerd


def run(config: ConsumerdConfig) -> int:
    """Serve sessiond until it closes the control socket; the exit status."""
    trio.run(partial(serve_consumerd, config))
    return 0


@click.command(context_settings={"auto_envvar_prefix": "TRACEWIRE_CONSUMERD"})
@click.option("--control-fd", type=int, required=True, help="SEQPACKET socket to sessiond (inherited).")
@click.option("--log-level", default="INFO", show_default=True, help="Python logging level.")
def main(control_fd: int, log_level: str) -> None:
    """Consumer daemon: reads full sub-buffers and writes CTF packets.

    sessiond spawns it with the --control-fd it passes down; it is not meant to
    be started by hand.
    """
    logging.basicConfig(level=log_level.upper(), format="consumerd %(levelname)s %(message)s", stream=sys.stderr)
    try:
        sys.exit(run(ConsumerdConfig(control_fd)))
    except OSError as exc:
        click.echo(f"tracewire-consumerd: {exc}", err=True)
        sys.exit(3)
    except KeyboardInterrupt:
        sys.exit(130)
