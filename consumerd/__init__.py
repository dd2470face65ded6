"""The consumer daemon: ring buffers → CTF packets → local disk or a relay."""

from __future__ import annotations

import logging
import sys
from functools import partial

import trio

from consumerd.daemon import ConsumerdConfig, serve_consumerd

__all__ = ["ConsumerdConfig", "run_consumerd", "serve_consumerd"]


def run_consumerd(control_fd: int, log_level: str = "INFO") -> int:
    """Serve sessiond on the inherited socket ``control_fd`` until sessiond
    closes it; the exit status.  ``tracewire-consumerd`` runs this, and so
    does a consumerd forked by sessiond's zygote (which imports no CLI code)."""
    logging.basicConfig(level=log_level.upper(), format="consumerd %(levelname)s %(message)s", stream=sys.stderr,
                        force=True)
    try:
        trio.run(partial(serve_consumerd, ConsumerdConfig(control_fd)))
    except OSError as exc:
        print(f"tracewire-consumerd: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    return 0
