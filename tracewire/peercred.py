"""Who is at the other end of a connected unix socket (SO_PEERCRED).

Stdlib only, no I/O framework: the tracer (inside traced apps), the CLI and
sessiond's trio adapter (``tracewire.seqpacket``) all read credentials here.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

__all__ = ["peer_credentials"]

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected unix socket, as the kernel
    recorded them at ``connect()``/``listen()``: never what the peer claims.

    Args:
        sock: a connected AF_UNIX socket (stdlib or trio).

    Raises:
        OSError: the credentials cannot be read.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid
