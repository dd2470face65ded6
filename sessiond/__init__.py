"""The session daemon: the registry of tracing sessions.

Where things are: ``model.py`` (sessions, channels, streams, traces, apps),
``consumers.py`` (consumerd supervision: spawn, warm spare, replay),
``apps.py`` (the app protocol: registration, buffer hand-out, asking apps and
waiting), ``commands.py`` (what each CLI command does: ``stop`` is
``Commands.stop``), ``server.py`` (the sockets and ``serve_sessiond``),
``saved.py`` (save, load, ``--load DIR``) and ``resume.py`` (the journal
that lets a new sessiond send a killed one's relay spool).
"""

from sessiond.model import SessiondConfig, UserError
from sessiond.server import serve_sessiond
from tracewire.rundir import default_rundir

__all__ = ["SessiondConfig", "UserError", "default_rundir", "serve_sessiond"]
