"""The one error type of the CTF package, with a machine-readable code."""

from __future__ import annotations

import enum

__all__ = ["CTFError", "CTFErrorCode"]


class CTFErrorCode(enum.Enum):
    """Machine-readable reason carried by :class:`CTFError`."""

    TRUNCATED = "truncated"
    BAD_MAGIC = "bad-magic"
    BAD_UUID = "bad-uuid"
    BAD_SIZE = "bad-size"
    BAD_STREAM = "bad-stream"
    BAD_TIMESTAMP = "bad-timestamp"
    BAD_EVENT = "bad-event"
    UNKNOWN_EVENT = "unknown-event"
    BAD_METADATA = "bad-metadata"
    BAD_INDEX = "bad-index"
    LIMIT = "limit-exceeded"
    IO = "io"


class CTFError(ValueError):
    """A trace, metadata text or index could not be decoded.

    Attributes:
        code: A :class:`CTFErrorCode` saying what kind of problem it is.
        path: The file being read (``None`` for in-memory text).
        offset: The byte offset (in the stream/index file) or character
            offset (in metadata text) where the problem was found, if known.
        reason: The message without the file/offset prefix.
    """

    def __init__(
        self,
        reason: str,
        *,
        code: CTFErrorCode,
        path: str | None = None,
        offset: int | None = None,
    ) -> None:
        where = []
        if path is not None:
            where.append(f"file {path!r}")
        if offset is not None:
            where.append(f"offset {offset}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)
        self.code = code
        self.path = path
        self.offset = offset
        self.reason = reason

    def at(self, path: str | None, base: int) -> CTFError:
        """Return the same error located in a file.

        Args:
            path: The file the error was found in.
            base: Where, in that file, the buffer this error's offset is
                relative to starts.

        Returns:
            A new CTFError with the same reason and code, ``path`` set and
            the offset moved by ``base`` (``base`` itself when unknown).
        """
        return CTFError(self.reason, code=self.code, path=path, offset=base + (self.offset or 0))
