"""trio adapter for SOCK_SEQPACKET unix sockets carrying JSON messages and fds.

One datagram is one control message (see ``tracewire.control``); file
descriptors ride along with SCM_RIGHTS.  Used between sessiond and traced apps
and between sessiond and consumerd.
"""

from __future__ import annotations

import array
import socket
from typing import Any

import trio

from tracewire.control import MAX_CONTROL_MESSAGE, ControlError, close_fds, dumps, loads

__all__ = ["SeqPacket", "DescriptorsTruncated", "MAX_FDS", "received_fds"]

MAX_FDS = 8


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message of ``recvmsg`` carried (a
    trailing partial int ignored): the caller owns them."""
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
            fds.extend(a)
    return fds


class DescriptorsTruncated(ControlError):
    """A whole message whose descriptors did not all arrive (``MSG_CTRUNC``):
    the receiver is out of descriptors, or the sender passed more than
    ``MAX_FDS``.  The message itself decoded; those descriptors that did
    arrive are closed.  A receiver that answers requests answers this one with
    an error rather than leave its sender waiting.

    Attributes:
        message: the decoded message (its ``seq`` says what to answer).
    """

    def __init__(self, message: dict[str, Any]) -> None:
        super().__init__("the message's descriptors were cut off (SCM_RIGHTS truncated)")
        self.message = message




class SeqPacket:
    """Send and receive whole messages (with fds) on a trio SEQPACKET socket."""

    def __init__(self, sock: trio.socket.SocketType, limit: int = MAX_CONTROL_MESSAGE) -> None:
        self.sock = sock
        self.limit = limit
        self._send_lock = trio.Lock()

    async def send(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send ``msg`` as one datagram, with ``fds`` beside it (SCM_RIGHTS).

        Raises:
            OSError: the socket failed (the peer is gone).
        """
        data = dumps(msg)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        async with self._send_lock:
            await self.sock.sendmsg([data], anc)

    async def receive(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next message and its fds, or None at end of stream.

        Raises:
            DescriptorsTruncated: the message is whole but its descriptors
                were cut off (its fds are closed); ``.message`` is the message.
            ControlError: a truncated or malformed message (its fds are closed).
        """
        data, ancdata, flags, _ = await self.sock.recvmsg(
            self.limit + 1, socket.CMSG_SPACE(MAX_FDS * 4)
        )
        fds = received_fds(ancdata)
        if not data and not fds:
            return None
        try:
            if flags & socket.MSG_TRUNC:
                raise ControlError("control message truncated")
            msg = loads(data, self.limit)
            if flags & socket.MSG_CTRUNC:
                raise DescriptorsTruncated(msg)
            return msg, fds
        except ControlError:
            close_fds(fds)
            raise

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
