"""tracewire: trace events from many Linux machines into CTF traces on one host.

``from tracewire import tracepoint`` is the tracer API; importing the package
loads nothing else (the daemons, the CLI, the CTF and wire modules are
imported on their own).
"""

from __future__ import annotations

from tracewire._tracer import tracepoint

__all__ = ["tracepoint"]
__version__ = "0.1.0"
