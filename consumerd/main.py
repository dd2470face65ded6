"""``tracewire-consumerd``: spawned by sessiond, not by hand."""

from __future__ import annotations

import sys

import click

from consumerd import run_consumerd


@click.command(context_settings={"auto_envvar_prefix": "TRACEWIRE_CONSUMERD"})
@click.option("--control-fd", type=int, required=True, help="SEQPACKET socket to sessiond (inherited).")
@click.option("--log-level", default="INFO", show_default=True, help="Python logging level.")
def main(control_fd: int, log_level: str) -> None:
    """Consumer daemon: reads full sub-buffers and writes CTF packets.

    sessiond forks it from its zygote with the control socket it passes down
    (this command is the same daemon on an inherited --control-fd); it is not
    meant to be started by hand.
    """
    sys.exit(run_consumerd(control_fd, log_level))
