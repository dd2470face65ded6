"""The consumer daemon: ring buffers → CTF packets → local disk or a relay."""

from consumerd.daemon import ConsumerdConfig, serve_consumerd

__all__ = ["ConsumerdConfig", "serve_consumerd"]
