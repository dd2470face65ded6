"""Where one tracewire instance keeps its sockets: ``TRACEWIRE_RUNDIR``.

Stdlib only: the tracer imports it inside traced apps.
"""

from __future__ import annotations

import os

__all__ = ["default_rundir"]


def default_rundir() -> str:
    """``$TRACEWIRE_RUNDIR``, else ``/run/tracewire`` for root, else
    ``$XDG_RUNTIME_DIR/tracewire`` (``/tmp/tracewire-UID/tracewire`` without it)."""
    rd = os.environ.get("TRACEWIRE_RUNDIR")
    if rd:
        return rd
    if os.geteuid() == 0:
        return "/run/tracewire"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg or f"/tmp/tracewire-{os.geteuid()}", "tracewire")
