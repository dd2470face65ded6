"""The one-line ``--version`` text every tracewire program prints.

It names the installed package's version (importlib.metadata: what pip
installed, not a constant that could drift from pyproject.toml) and the wire
protocol versions this build speaks, so that an operator comparing a target
and a relay sees at once whether they can talk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

__all__ = ["DISTRIBUTION", "package_version", "version_line", "version_option"]

_F = TypeVar("_F", bound=Callable[..., object])

DISTRIBUTION = "tracewire"


def package_version() -> str:
    """The installed tracewire distribution's version, or "unknown" when the
    package runs from a source tree that was never installed."""
    import importlib.metadata  # only when asked: the daemons' memory does not pay for it

    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def version_line(prog: str) -> str:
    """``PROG VERSION (wire protocol P; speaks 1, 2)``, one line.

    Args:
        prog: the program's name, e.g. "tracewire-relayd".

    Returns:
        The line, without a newline.
    """
    from tracewire.wire import PROTOCOL_VERSION, SUPPORTED_VERSIONS  # its codecs load only when asked

    speaks = ", ".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
    return f"{prog} {package_version()} (wire protocol {PROTOCOL_VERSION}; speaks {speaks})"


def version_option(prog: str) -> Callable[[_F], _F]:
    """A click ``--version`` flag printing :func:`version_line` and exiting 0.

    Args:
        prog: the program's name, as printed.
    """

    def show(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if not value or ctx.resilient_parsing:
            return
        click.echo(version_line(prog))
        ctx.exit(0)

    return click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=show,
                        help="Print the version (package and wire protocol) and exit.")
