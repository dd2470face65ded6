"""What each user's sessions hold, checked against their limits.

Theory of operation
-------------------
Nothing is counted twice or kept apart from the state it describes: a
user's usage is recomputed from the registry (:class:`sessiond.model.Registry`)
whenever it is checked, so it cannot drift from what sessiond really holds.
The session owner is charged for everything their sessions hold (a root
session that traces a user's app charges root).

A session's buffer bytes (:func:`session_buffers`) are:

* ``rings``: every ring buffer it holds (``subbuf_size * num_subbuf`` of the
  channel; a snapshot session's rings of dead apps included);
* ``reserved``: one ring for each channel that holds none yet.  A channel
  costs at least one ring as soon as a traced app matches it, so
  ``enable-channel`` is refused when that ring would not fit; the first
  app's ring of the channel takes the reservation's place;
* ``spool``: a relay session's spool, what its consumerd may keep on this
  machine (for a root sessiond, on the tmpfs of ``/run``: memory) while the
  relay is away or slow: the ``--spool-size`` cap on the segments in use,
  plus, per stream, what consumerd/spool.py keeps outside it: the segment
  being written (its acknowledged records stay until it is full, and a
  recycled file's older records past them), ``keep_free`` spare segments,
  each at most a segment and a packet, and the packet written after the
  cap was last checked.  :data:`SPOOL_SEGMENT` and :data:`SPOOL_KEEP_FREE`
  are consumerd's (tests/test_limits.py checks it).

An app's registration creates a ring per matching channel of each started
session (``AppProtocol.setup``): :func:`ring_refusal` is asked first, and
a ring that would take its session owner over the ``buffers`` limit is not
created (the session's ``refused`` says so in ``status``).
"""

from __future__ import annotations

import pwd
from dataclasses import dataclass

from sessiond.limits import UserLimits, format_size
from sessiond.model import Channel, Registry, Session, UserError

__all__ = ["Buffers", "Usage", "channel_refusal", "check_channel", "check_create", "describe_limits",
           "ring_charge", "ring_refusal", "session_buffers", "spool_per_stream", "usage_of"]

SPOOL_RECORD = 64  # the spool's per-packet record header (consumerd/spool.py)
SPOOL_SEGMENT = 1024 * 1024  # consumerd's Spool(segment_size=)
SPOOL_KEEP_FREE = 2  # consumerd's Spool(keep_free=)
SPOOL_FILE_HEADER = 16


@dataclass(frozen=True, slots=True)
class Buffers:
    """One session's buffer bytes (see the module docstring)."""

    rings: int
    reserved: int
    spool: int

    @property
    def total(self) -> int:
        return self.rings + self.reserved + self.spool


@dataclass(frozen=True, slots=True)
class Usage:
    """What one user holds: sessions, channels, buffer bytes, apps."""

    sessions: int
    channels: int
    buffers: int
    apps: int

    def get(self, key: str) -> int:
        value: int = getattr(self, key)
        return value


def _spooled(sess: Session) -> bool:
    return sess.url is not None and not sess.snapshot


def ring_size(ch: Channel) -> int:
    return ch.subbuf_size * ch.num_subbuf


def spool_per_stream(ch: Channel) -> int:
    """What a relay session's spool may hold for one stream of ``ch``
    outside its cap (see the module docstring)."""
    packet = ch.subbuf_size + SPOOL_RECORD
    return (SPOOL_KEEP_FREE + 1) * (SPOOL_SEGMENT + packet + SPOOL_FILE_HEADER) + packet


def ring_charge(sess: Session, ch: Channel) -> int:
    """What one more stream of ``ch`` costs: its ring, and what its spool
    may hold outside the cap."""
    return ring_size(ch) + (spool_per_stream(ch) if _spooled(sess) else 0)


def session_buffers(sess: Session) -> Buffers:
    held = [st for st in sess.streams.values() if st.memfd >= 0]
    rings = sum(ring_size(sess.channels[st.channel]) for st in held)
    with_ring = {st.channel for st in held}
    reserved = sum(ring_size(ch) for ch in sess.channels.values() if ch.name not in with_ring)
    spool = 0
    if _spooled(sess):
        spool = sess.spool_size + sum(spool_per_stream(sess.channels[st.channel]) for st in held)
        spool += sum(spool_per_stream(ch) for ch in sess.channels.values() if ch.name not in with_ring)
    return Buffers(rings, reserved, spool)


def usage_of(reg: Registry, uid: int) -> Usage:
    mine = [s for s in reg.sessions.values() if s.owner_uid == uid]
    return Usage(sessions=len(mine), channels=sum(len(s.channels) for s in mine),
                 buffers=sum(session_buffers(s).total for s in mine), apps=reg.apps_of_uid[uid])


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _limits(reg: Registry, uid: int, gid: int | None) -> UserLimits:
    return reg.config.limits.for_user(uid, gid)


def _over_buffers(verb: str, uid: int, lim: UserLimits, would: int) -> str | None:
    limit = lim.limits.buffers
    if limit is None or would <= limit:
        return None
    return (f"{verb} refused: user {_user_name(uid)}'s sessions would hold {format_size(would)} of buffers, "
            f"over their limit of {format_size(limit)} ({lim.source('buffers')})")


def _over_count(verb: str, uid: int, lim: UserLimits, key: str, would: int, what: str) -> str | None:
    limit = lim.limits.get(key)
    if limit is None or would <= limit:
        return None
    return (f"{verb} refused: user {_user_name(uid)} would have {would} {what}, over their limit of {limit} "
            f"({lim.source(key)})")


def check_create(reg: Registry, uid: int, gid: int, spool: int) -> None:
    """``create`` of a session whose spool holds ``spool`` bytes (0: none).

    Raises:
        UserError: over the user's sessions or buffers limit (one line).
    """
    lim, use = _limits(reg, uid, gid), usage_of(reg, uid)
    why = (_over_count("create", uid, lim, "sessions", use.sessions + 1, "sessions")
           or _over_buffers("create", uid, lim, use.buffers + spool))
    if why:
        raise UserError(why)


def channel_refusal(reg: Registry, sess: Session, verb: str, new: Channel | None, old: Channel | None) -> str | None:
    """Why adding channel ``new`` to ``sess`` (or changing ``old`` into
    ``new``) is refused, or None.  A new channel reserves one ring."""
    uid = sess.owner_uid
    lim, use = _limits(reg, uid, sess.owner_gid), usage_of(reg, uid)
    if old is None:
        why = _over_count(verb, uid, lim, "channels", use.channels + 1, "channels")
        if why:
            return why
    delta = (ring_charge(sess, new) if new else 0) - (ring_charge(sess, old) if old else 0)
    if delta <= 0:
        return None
    return _over_buffers(verb, uid, lim, use.buffers + delta)


def check_channel(reg: Registry, sess: Session, verb: str, new: Channel, old: Channel | None = None) -> None:
    """Raises UserError with :func:`channel_refusal`'s line."""
    why = channel_refusal(reg, sess, verb, new, old)
    if why:
        raise UserError(why)


def ring_refusal(reg: Registry, sess: Session, ch: Channel) -> str | None:
    """Why a new ring of ``ch`` for an app may not be created, or None.  The
    channel's first ring takes its reservation's place (costs nothing new)."""
    if not any(st.channel == ch.name and st.memfd >= 0 for st in sess.streams.values()):
        return None
    uid = sess.owner_uid
    lim = _limits(reg, uid, sess.owner_gid)
    limit = lim.limits.buffers
    if limit is None:
        return None
    would = usage_of(reg, uid).buffers + ring_charge(sess, ch)
    if would <= limit:
        return None
    return (f"user {_user_name(uid)}'s sessions would hold {format_size(would)} of buffers, "
            f"over their limit of {format_size(limit)} ({lim.source('buffers')})")


def describe_limits(reg: Registry, uid: int, gid: int | None) -> dict[str, object]:
    """The user's usage against their limits, for ``status`` (None: unlimited)."""
    lim, use = _limits(reg, uid, gid), usage_of(reg, uid)
    out: dict[str, object] = {"user": _user_name(uid), "uid": uid}
    for key in ("sessions", "channels", "buffers", "apps"):
        out[key] = {"used": use.get(key), "limit": lim.limits.get(key), "source": lim.source(key)}
    return out
