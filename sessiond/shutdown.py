"""What tracewire-sessiond does on SIGTERM/SIGINT before it exits.

Theory of operation
-------------------
sessiond's state (sessions, enable sets, ring buffers) lives in its memory
and in the ring buffers it shares with apps and consumerds; it ends with the
process.  Exiting at once (cancelling everything: each consumerd is SIGKILLed
through its pidfd) would lose what the rings hold and what a consumerd has
not written yet: the events of every sub-buffer still open, the packets a
relay has not acknowledged.  So the first signal runs :func:`stop_sessions`
first, under one deadline (``--shutdown-timeout``):

1. It takes the registry's lock, as every control command does, and keeps it
   until sessiond exits: no ``start``, ``create`` or ``rotate`` begins after
   it.  (``status`` and ``list`` need no lock and go on answering.)
2. Every started session is stopped as ``tracewire stop`` would: its apps
   quiesce (close their sub-buffers), then its consumerd flushes every
   stream to the sink -- the trace files for a local session, the relay for
   a network one.  Each session gets an equal share of what is left of the
   deadline, so that one unreachable relay cannot starve the others.  A
   relay session whose relay does not acknowledge in time keeps those
   packets in its spool (RUNDIR/spool, kept by the systemd unit across
   restarts); a local session's files end on a packet boundary either way.
3. Then the caller cancels sessiond: consumerds are killed (they hold
   nothing unwritten any more), the zygote is closed, the sockets and the
   pid file are removed.  Apps see their connection end: they drop their
   buffers, trace nothing, and register again with the next sessiond.

A second signal cancels at once, whatever is left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from sessiond.model import SessionState, UserError
from sessiond.server import Sessiond

__all__ = ["exit_now", "stop_sessions"]

logger = logging.getLogger(__name__)


def exit_now(sd: Sessiond, scope: trio.CancelScope) -> None:
    """Cancels sessiond (``scope``), its consumerds told first that nothing
    will be asked of them any more (ConsumerPool.close)."""
    sd.consumers.close()
    scope.cancel()


async def stop_sessions(sd: Sessiond, timeout: float, then: Callable[[], None]) -> list[str]:
    """Stops every started session (quiesce apps, flush to the sink), within
    ``timeout`` seconds in all, then calls ``then()`` with the registry's
    lock still held (the caller cancels sessiond there: no command starts
    in between).

    Args:
        sd: the running sessiond.
        timeout: seconds for the whole shutdown, waiting for the lock (a
            command in progress) included.
        then: called last, whatever happened.

    Returns:
        The names of the sessions whose stop did not complete (logged).
    """
    incomplete: list[str] = []
    deadline = trio.current_time() + timeout
    try:
        with trio.move_on_at(deadline) as waited:
            # Held until sessiond exits: never released (see the module doc).
            await sd.registry.lock.acquire()
        if waited.cancelled_caught:
            logger.warning("shutting down: a command still runs after %g s: sessions not stopped", timeout)
            return [s.name for s in sd.registry.sessions.values() if s.state is SessionState.STARTED]
        started = [s for s in sd.registry.sessions.values() if s.state is SessionState.STARTED]
        if started:
            logger.info("shutting down: stopping %d started sessions (at most %g s)", len(started), timeout)
        for i, sess in enumerate(started):
            share = (deadline - trio.current_time()) / (len(started) - i)
            if share <= 0:
                incomplete.append(sess.name)
                continue
            with trio.move_on_after(share) as cut:
                try:
                    await sd.commands.stop(sess, timeout=share)
                except (UserError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                    logger.warning("shutting down: session %s (uid %d) not flushed: %s",
                                   sess.name, sess.owner_uid, exc)
                    incomplete.append(sess.name)
                    continue
            if cut.cancelled_caught:
                logger.warning("shutting down: session %s (uid %d) not flushed within %.1f s",
                               sess.name, sess.owner_uid, share)
                incomplete.append(sess.name)
            else:
                logger.info("shutting down: session %s (uid %d) stopped and flushed", sess.name, sess.owner_uid)
        return incomplete
    finally:
        then()
