"""trio adapter for SOCK_SEQPACKET unix sockets carrying JSON messages and fds.

One datagram is one control message (see ``tracewire.control``); file
descriptors ride along with SCM_RIGHTS.  Used between sessiond and traced apps
and between sessiond and consumerd.
"""

from __future__ import annotations

import array
import socket
import struct
from typing import Any

import trio

from tracewire.control import MAX_CONTROL_MESSAGE, ControlError, close_fds, dumps, loads

__all__ = ["SeqPacket", "peer_credentials", "MAX_FDS"]

MAX_FDS = 8
_CRED = struct.Struct("3i")


def peer_credentials(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    return _CRED.unpack(raw)


class SeqPacket:
    """Send and receive whole messages (with fds) on a trio SEQPACKET socket."""

    def __init__(self, sock: trio.socket.SocketType, limit: int = MAX_CONTROL_MESSAGE) -> None:
        self.sock = sock
        self.limit = limit
        self._send_lock = trio.Lock()

    async def send(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        data = dumps(msg)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        async with self._send_lock:
            await self.sock.sendmsg([data], anc)

    async def receive(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next message and its fds, or None at end of stream.

        Raises:
            ControlError: a truncated or malformed message (its fds are closed).
        """
        data, ancdata, flags, _ = await self.sock.recvmsg(
            self.limit + 1, socket.CMSG_SPACE(MAX_FDS * 4)
        )
        fds: list[int] = []
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
                fds.extend(a)
        if not data and not fds:
            return None
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ControlError("control message truncated")
            return loads(data, self.limit), fds
        except ControlError:
            close_fds(fds)
            raise

    def close(self) -> None:
        self.sock.close()
