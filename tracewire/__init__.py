"""tracewire: trace events from many Linux machines into CTF traces on one host.

``from tracewire import tracepoint`` is the tracer API; importing the package
loads nothing else (the daemons, the CLI, the CTF and wire modules are
imported on their own).  The tracer itself is loaded on first use of
``tracepoint``, so the CLI and the daemons, which import the package for its
modules, do not pay for it (its import is ~10 ms of every ``tracewire``
command's start-up, which ``stop``'s latency includes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tracewire._tracer import tracepoint

__all__ = ["tracepoint"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "tracepoint":
        from tracewire._tracer import tracepoint

        return tracepoint
    raise AttributeError(f"module 'tracewire' has no attribute {name!r}")
