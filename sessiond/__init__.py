"""The session daemon: the registry of tracing sessions."""

from sessiond.daemon import SessiondConfig, default_rundir, serve_sessiond

__all__ = ["SessiondConfig", "default_rundir", "serve_sessiond"]
