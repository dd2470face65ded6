"""The CTF metadata reader: a parser for the TSDL dialect the writer produces.

This is not a general TSDL parser: typealiases and named structs are
skipped, and event fields must use the declarations the writer writes
(int64, double, string, uint32 length + uint8 sequence). The text is hostile
input: its size and the number of declarations are bounded, and every
failure is a :class:`CTFError` naming the file and character offset.
Packetized metadata files (as LTTng writes them) are unpacked first.
"""

from __future__ import annotations

import os
import re
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeAlias

from tracewire.ctf.declarations import MAX_FIELDS, EventDecl, Fields, FieldType
from tracewire.ctf.errors import CTFError, CTFErrorCode
from tracewire.ctf.layout import INT64_MAX, INT64_MIN, META_PKT, TSDL_MAGIC, U32

__all__ = [
    "MAX_EVENTS",
    "MAX_METADATA_SIZE",
    "MAX_STREAM_CLASSES",
    "TraceMeta",
    "parse_metadata",
    "read_metadata_file",
]

#: Reader limits (the reader's callers may lower them per call).
MAX_METADATA_SIZE = 16 * 1024 * 1024
MAX_EVENTS = 65536
MAX_STREAM_CLASSES = 65536


@dataclass(frozen=True, slots=True)
class TraceMeta:
    """What the reader needs from a trace's metadata.

    Attributes:
        uuid: Trace UUID (16 bytes) or None when the metadata has none.
        clock_offset_ns: Offset of the monotonic clock from the Epoch, in ns.
        stream_ids: Declared stream class ids.
        events: ``{stream_id: {event_id: EventDecl}}``.
        env: The ``env`` block (strings and ints).
    """

    uuid: bytes | None
    clock_offset_ns: int
    stream_ids: frozenset[int]
    events: Mapping[int, Mapping[int, EventDecl]]
    env: Mapping[str, str | int] = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        """The env block's hostname, or ``""``."""
        h = self.env.get("hostname", "")
        return h if isinstance(h, str) else str(h)


# --------------------------------------------------------------------------
# Tokens and statements
# --------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>/\*.*?\*/|//[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<number>-?(?:0[xX][0-9a-fA-F]+|\d+))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>:=|\.\.\.|[{}\[\]();=:<>,.+-])
    """,
    re.VERBOSE | re.DOTALL,
)

_UNESCAPE: Mapping[str, str] = MappingProxyType({"n": "\n", "t": "\t", "r": "\r", "0": "\0"})

_Tok: TypeAlias = tuple[str, str, int]  # (kind, text, char offset)
_Attrs: TypeAlias = dict[str, str | int]


def _bad(reason: str, offset: int | None, code: CTFErrorCode = CTFErrorCode.BAD_METADATA) -> CTFError:
    """A metadata error at a character offset."""
    return CTFError(reason, code=code, offset=offset)


def _tokenize(text: str) -> list[_Tok]:
    """Split TSDL text into tokens, dropping whitespace and comments.

    Raises:
        CTFError: A character no token starts with.
    """
    toks: list[_Tok] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise _bad(f"unexpected character {text[pos]!r} in metadata", pos)
        kind = m.lastgroup
        assert kind is not None
        if kind not in ("ws", "comment"):
            toks.append((kind, m.group(), pos))
        pos = m.end()
    return toks


def _unquote(s: str) -> str:
    """The value of a TSDL string literal (quotes included in ``s``)."""
    out = []
    i = 1
    end = len(s) - 1
    while i < end:
        ch = s[i]
        if ch == "\\" and i + 1 < end:
            nxt = s[i + 1]
            out.append(_UNESCAPE.get(nxt, nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _split_statements(toks: list[_Tok], start: int, stop: int) -> list[list[_Tok]]:
    """Split ``toks[start:stop]`` at top-level ``;`` (brace/bracket aware).

    Raises:
        CTFError: Unbalanced brackets, or a statement without its ``;``.
    """
    stmts: list[list[_Tok]] = []
    depth = 0
    cur: list[_Tok] = []
    for i in range(start, stop):
        tok = toks[i]
        t = tok[1]
        if tok[0] == "punct":
            if t in ("{", "[", "("):
                depth += 1
            elif t in ("}", "]", ")"):
                depth -= 1
                if depth < 0:
                    raise _bad(f"unbalanced {t!r}", tok[2])
            elif t == ";" and depth == 0:
                if cur:
                    stmts.append(cur)
                cur = []
                continue
        cur.append(tok)
    if depth != 0 or cur:
        off = cur[0][2] if cur else (toks[stop - 1][2] if stop > start else 0)
        raise _bad("metadata ends inside a declaration (missing '}' or ';')", off)
    return stmts


def _block_body(stmt: list[_Tok], what: str) -> list[list[_Tok]]:
    """For ``kw { ... }`` return the statements inside the braces.

    Raises:
        CTFError: ``stmt`` is not a block.
    """
    if len(stmt) < 3 or stmt[1][1] != "{" or stmt[-1][1] != "}":
        raise _bad(f"malformed {what} block", stmt[0][2])
    return _split_statements(stmt, 2, len(stmt) - 1)


def _scalar(stmt: list[_Tok], what: str) -> tuple[str, str | int]:
    """``key = value`` → (key, value) with value an int or an unquoted string.

    Raises:
        CTFError: Not an assignment, or a number too long.
    """
    if len(stmt) < 3 or stmt[1][1] not in ("=", ":="):
        raise _bad(f"malformed assignment in {what}", stmt[0][2])
    key = stmt[0][1]
    kind, text, off = stmt[2]
    if len(stmt) != 3:
        return key, " ".join(t[1] for t in stmt[2:])
    if kind == "number":
        if len(text) > 40:
            raise _bad(f"number too long in {what}", off)
        digits = text.lstrip("-")
        value = int(digits[2:], 16) if digits[:2] in ("0x", "0X") else int(digits, 10)
        return key, -value if text.startswith("-") else value
    if kind == "string":
        return key, _unquote(text)
    return key, text


def _attrs(stmt: list[_Tok], start: int, what: str) -> tuple[_Attrs, int]:
    """Parse ``{ k = v; ... }`` at ``stmt[start]``; return (attrs, index after '}').

    Raises:
        CTFError: No ``{`` there, no matching ``}``, or a bad assignment.
    """
    if start >= len(stmt) or stmt[start][1] != "{":
        raise _bad(f"expected '{{' in {what}", stmt[min(start, len(stmt) - 1)][2])
    depth = 0
    for j in range(start, len(stmt)):
        if stmt[j][1] == "{":
            depth += 1
        elif stmt[j][1] == "}":
            depth -= 1
            if depth == 0:
                break
    else:
        raise _bad(f"unterminated '{{' in {what}", stmt[start][2])
    attrs = dict(_scalar(s, what) for s in _split_statements(stmt, start + 1, j))
    return attrs, j + 1


# --------------------------------------------------------------------------
# Event fields
# --------------------------------------------------------------------------


def _field_decl(stmt: list[_Tok], ev: str) -> tuple[str, str, _Attrs, str | None]:
    """One field declaration → (kind, name, attrs, sequence-length-name).

    Raises:
        CTFError: A type or declarator outside the writer's dialect.
    """
    head = stmt[0][1]
    if head in ("integer", "floating_point"):
        attrs, i = _attrs(stmt, 1, f"event {ev}")
    elif head == "string":
        attrs, i = ({}, 1)
        if len(stmt) > 1 and stmt[1][1] == "{":
            attrs, i = _attrs(stmt, 1, f"event {ev}")
    else:
        raise _bad(
            f"event {ev}: unsupported field type {head!r} (this reader knows only tracewire's dialect)",
            stmt[0][2],
        )
    rest = stmt[i:]
    if not rest or rest[0][0] != "ident":
        raise _bad(f"event {ev}: field name expected", stmt[-1][2])
    name = rest[0][1]
    seq = None
    if len(rest) == 4 and rest[1][1] == "[" and rest[2][0] == "ident" and rest[3][1] == "]":
        seq = rest[2][1]
    elif len(rest) != 1:
        raise _bad(f"event {ev}: unsupported declarator for field {name!r}", rest[1][2])
    return head, name, attrs, seq


def _is_int(attrs: Mapping[str, str | int], size: int, signed: bool) -> bool:
    """Whether ``attrs`` declare an integer of ``size`` bits and this signedness."""
    sgn = attrs.get("signed", 0)
    is_signed = sgn in (1, "true", "TRUE")
    return attrs.get("size") == size and is_signed == signed


def _event_fields(body: list[list[_Tok]], ev: str, offset: int) -> Fields:
    """The fields of event ``ev`` from the statements of its ``fields`` struct.

    Raises:
        CTFError: Too many fields, or a declaration the writer does not write.
    """
    decls = [_field_decl(s, ev) for s in body]
    if len(decls) > 2 * MAX_FIELDS:
        raise _bad(f"event {ev}: too many fields", offset, CTFErrorCode.LIMIT)
    out: list[tuple[str, FieldType]] = []
    i = 0
    while i < len(decls):
        kind, name, attrs, seq = decls[i]
        off = body[i][0][2]
        if not name.startswith("_"):
            raise _bad(f"event {ev}: field {name!r} lacks the '_' prefix", off)
        pyname = name[1:]
        if kind == "integer" and seq is None and _is_int(attrs, 64, True):
            out.append((pyname, FieldType.INT))
        elif kind == "floating_point" and attrs.get("exp_dig") == 11 and attrs.get("mant_dig") == 53:
            out.append((pyname, FieldType.FLOAT))
        elif kind == "string" and seq is None:
            out.append((pyname, FieldType.STR))
        elif (
            kind == "integer" and seq is None and _is_int(attrs, 32, False)
            and name.startswith("__") and name.endswith("_length") and i + 1 < len(decls)
        ):
            k2, n2, a2, s2 = decls[i + 1]
            if not (k2 == "integer" and _is_int(a2, 8, False) and s2 == name and name == f"_{n2}_length"):
                raise _bad(f"event {ev}: length field {name!r} is not followed by its uint8 sequence", off)
            out.append((n2[1:], FieldType.BYTES))
            i += 1
        else:
            raise _bad(f"event {ev}: unsupported declaration of field {name!r} ({kind} {dict(attrs)})", off)
        i += 1
    return tuple(out)


# --------------------------------------------------------------------------
# Top-level blocks
# --------------------------------------------------------------------------


@dataclass(slots=True)
class _MetaBuilder:
    """What the top-level blocks of one metadata text have said so far."""

    max_events: int
    uuid: bytes | None = None
    offset_ns: int = 0
    env: _Attrs = field(default_factory=dict)
    stream_ids: set[int] = field(default_factory=set)
    events: dict[int, dict[int, EventDecl]] = field(default_factory=dict)
    n_events: int = 0
    seen_trace: bool = False
    seen_clock: bool = False

    def statement(self, stmt: list[_Tok]) -> None:
        """Take one top-level statement into account.

        Raises:
            CTFError: The statement is malformed, unsupported or contradicts
                an earlier one.
        """
        kw = stmt[0][1]
        off = stmt[0][2]
        if kw in ("typealias", "struct", "typedef", "enum", "variant"):
            return
        if kw not in ("trace", "env", "clock", "stream", "event"):
            raise _bad(f"unexpected top-level statement starting with {kw!r}", off)
        body = _block_body(stmt, kw)
        if kw == "event":
            self.event(body, off)
            return
        attrs: _Attrs = {}
        for s in body:
            if kw in ("trace", "stream") and s[0][1] in ("packet", "event"):
                continue  # packet.header / event.header / packet.context
            k, v = _scalar(s, kw)
            attrs[k] = v
        if kw == "trace":
            self.trace(attrs, off)
        elif kw == "env":
            self.env.update(attrs)
        elif kw == "clock":
            self.clock(attrs, off)
        else:
            self.stream(attrs, off)

    def event(self, body: list[list[_Tok]], off: int) -> None:
        """An ``event`` block.

        Raises:
            CTFError: Too many events, a bad declaration, an undeclared
                stream class or a duplicate id.
        """
        self.n_events += 1
        if self.n_events > self.max_events:
            raise _bad(f"more than {self.max_events} event declarations", off, CTFErrorCode.LIMIT)
        ev: dict[str, Any] = {}  # Any: checked by EventDecl below
        fields: Fields = ()
        for s in body:
            if s[0][1] == "fields":
                if len(s) < 4 or s[1][1] != ":=" or s[2][1] != "struct" or s[3][1] != "{" or s[-1][1] != "}":
                    raise _bad("event fields must be ':= struct { ... }'", s[0][2])
                fields = _event_fields(_split_statements(s, 4, len(s) - 1), str(ev.get("name", "?")), s[0][2])
            else:
                k, v = _scalar(s, "event")
                ev[k] = v
        try:
            decl = EventDecl(
                name=ev["name"], id=ev["id"], fields=fields,
                stream_id=ev.get("stream_id", 0), loglevel=ev.get("loglevel", 13),
            )
        except KeyError as exc:
            raise _bad(f"event block without {exc.args[0]}", off) from None
        except (TypeError, ValueError) as exc:
            raise _bad(f"invalid event declaration: {exc}", off) from exc
        if decl.stream_id not in self.stream_ids:
            raise _bad(f"event {decl.name} refers to undeclared stream class {decl.stream_id}", off)
        per_stream = self.events.setdefault(decl.stream_id, {})
        if decl.id in per_stream:
            raise _bad(f"duplicate event id {decl.id} in stream class {decl.stream_id}", off)
        per_stream[decl.id] = decl

    def trace(self, attrs: _Attrs, off: int) -> None:
        """The ``trace`` block.

        Raises:
            CTFError: A second one, not CTF 1.8 little-endian, or a bad uuid.
        """
        if self.seen_trace:
            raise _bad("more than one trace block", off)
        self.seen_trace = True
        if (attrs.get("major"), attrs.get("minor")) != (1, 8):
            raise _bad(f"unsupported CTF version {attrs.get('major')}.{attrs.get('minor')}", off)
        if attrs.get("byte_order") != "le":
            raise _bad(f"unsupported byte_order {attrs.get('byte_order')!r}; expected le", off)
        if "uuid" in attrs:
            try:
                self.uuid = uuidlib.UUID(str(attrs["uuid"])).bytes
            except ValueError:
                raise _bad(f"bad trace uuid {attrs['uuid']!r}", off) from None

    def clock(self, attrs: _Attrs, off: int) -> None:
        """A ``clock`` block (only the monotonic clock matters).

        Raises:
            CTFError: A second monotonic clock, another frequency than 1 GHz,
                or a bad offset.
        """
        if attrs.get("name") != "monotonic":
            return
        if self.seen_clock:
            raise _bad("more than one monotonic clock", off)
        self.seen_clock = True
        if attrs.get("freq", 1_000_000_000) != 1_000_000_000:
            raise _bad(f"unsupported clock frequency {attrs.get('freq')!r}", off)
        o_s, o = attrs.get("offset_s", 0), attrs.get("offset", 0)
        if not isinstance(o_s, int) or not isinstance(o, int):
            raise _bad("clock offsets must be integers", off)
        self.offset_ns = o_s * 1_000_000_000 + o
        if not INT64_MIN <= self.offset_ns <= INT64_MAX:
            raise _bad("clock offset out of range", off)

    def stream(self, attrs: _Attrs, off: int) -> None:
        """A ``stream`` block.

        Raises:
            CTFError: A bad or duplicate id, or too many stream classes.
        """
        sid = attrs.get("id", 0)
        if not isinstance(sid, int) or not 0 <= sid < 1 << 32:
            raise _bad(f"bad stream id {sid!r}", off)
        if sid in self.stream_ids:
            raise _bad(f"duplicate stream id {sid}", off)
        if len(self.stream_ids) >= MAX_STREAM_CLASSES:
            raise _bad("too many stream classes", off, CTFErrorCode.LIMIT)
        self.stream_ids.add(sid)

    def result(self) -> TraceMeta:
        """The parsed metadata.

        Raises:
            CTFError: There was no trace block.
        """
        if not self.seen_trace:
            raise _bad("metadata has no trace block", None)
        return TraceMeta(
            uuid=self.uuid,
            clock_offset_ns=self.offset_ns,
            stream_ids=frozenset(self.stream_ids),
            events=MappingProxyType({k: MappingProxyType(v) for k, v in self.events.items()}),
            env=MappingProxyType(self.env),
        )


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def parse_metadata(
    text: str,
    *,
    path: str | None = None,
    max_size: int = MAX_METADATA_SIZE,
    max_events: int = MAX_EVENTS,
) -> TraceMeta:
    """Parse metadata text written by the writer's ``metadata_preamble`` + ``metadata_event``.

    This is not a general TSDL parser: typealiases and named structs are
    skipped, and event fields must use the declarations the writer writes
    (int64, double, string, uint32 length + uint8 sequence).

    Args:
        text: The whole metadata text.
        path: File name for error messages.
        max_size: Refuse texts longer than this many characters.
        max_events: Refuse more event declarations than this.

    Returns:
        The parsed metadata.

    Raises:
        CTFError: The text is too large, is not CTF 1.8, has a syntax error,
            declares something unsupported (byte order, clock frequency,
            field type) or duplicate/undeclared ids.
    """
    try:
        return _parse_metadata(text, max_size=max_size, max_events=max_events)
    except CTFError as exc:
        if path is None:
            raise
        raise CTFError(exc.reason, code=exc.code, path=path, offset=exc.offset) from None


def _parse_metadata(text: str, *, max_size: int, max_events: int) -> TraceMeta:
    """:func:`parse_metadata` without the file name in errors.

    Raises:
        CTFError: See :func:`parse_metadata`.
    """
    if not isinstance(text, str):
        raise _bad(f"metadata must be text, got {type(text).__name__}", None)
    if len(text) > max_size:
        raise _bad(f"metadata of {len(text)} characters exceeds the limit of {max_size}", None, CTFErrorCode.LIMIT)
    if not text.startswith("/* CTF 1.8"):
        raise _bad("metadata does not begin with '/* CTF 1.8'", 0)
    toks = _tokenize(text)
    builder = _MetaBuilder(max_events)
    for stmt in _split_statements(toks, 0, len(toks)):
        builder.statement(stmt)
    return builder.result()


def read_metadata_file(path: str | os.PathLike[str], *, max_size: int = MAX_METADATA_SIZE) -> TraceMeta:
    """Read and parse a metadata file, plain text or packetized.

    Args:
        path: The ``metadata`` file.
        max_size: Refuse files larger than this many bytes.

    Returns:
        The parsed metadata.

    Raises:
        CTFError: The file cannot be read, is too large, is not valid UTF-8,
            has a broken metadata packet, or fails :func:`parse_metadata`.
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(max_size + 1)
    except OSError as exc:
        raise CTFError(f"cannot read metadata: {exc}", code=CTFErrorCode.IO, path=p) from exc
    if len(raw) > max_size:
        raise CTFError(f"metadata larger than {max_size} bytes", code=CTFErrorCode.LIMIT, path=p)
    if len(raw) >= 4 and U32.unpack_from(raw, 0)[0] == TSDL_MAGIC:
        raw = _depacketize_metadata(raw, p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CTFError(f"metadata is not UTF-8: {exc.reason}", code=CTFErrorCode.BAD_METADATA,
                       path=p, offset=exc.start) from None
    return parse_metadata(text, path=p, max_size=max_size)


def _depacketize_metadata(raw: bytes, path: str) -> bytes:
    """The TSDL text carried by packetized metadata (LTTng's on-disk form).

    Raises:
        CTFError: A metadata packet is truncated, has a bad magic, version or size.
    """
    out = bytearray()
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < META_PKT.size:
            raise CTFError("truncated metadata packet header", code=CTFErrorCode.TRUNCATED, path=path, offset=pos)
        magic, _u, _ck, content, size, _c, _e, _cs, major, minor = META_PKT.unpack_from(raw, pos)
        if magic != TSDL_MAGIC:
            raise CTFError(f"bad metadata packet magic {magic:#010x}", code=CTFErrorCode.BAD_MAGIC,
                           path=path, offset=pos)
        if (major, minor) != (1, 8) or content % 8 or size % 8 or content > size or content < META_PKT.size * 8:
            raise CTFError(
                f"bad metadata packet (version {major}.{minor}, content_size {content}, packet_size {size})",
                code=CTFErrorCode.BAD_SIZE, path=path, offset=pos,
            )
        if size // 8 > len(raw) - pos:
            raise CTFError("metadata packet runs past the end of the file", code=CTFErrorCode.TRUNCATED,
                           path=path, offset=pos)
        out += raw[pos + META_PKT.size:pos + content // 8]
        pos += size // 8
    return bytes(out)
