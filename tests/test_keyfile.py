"""One key-file parser (tracewire.keyfile) for both sides.

The target (consumerd.net.read_key_file, ``--auth-key-file``) and the relay
(relayd.parse_auth_keys, ``--auth-keys``) used to parse key files with two
parsers that disagreed: a ``#`` inside a secret, a bad key id or host, a
duplicate or malformed line after the first key, a non-UTF-8 or huge file, a
FIFO.  Each case below is a file both sides now read the same way: both take
the same (key id, secret), or both refuse it at the same line.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from consumerd.net import SinkError, read_key_file
from relayd import AuthKeyError, parse_auth_keys
from tracewire import keyfile, names
from tracewire.keyfile import KeyFileError, KeyFileErrorCode, Side

SECRET = "s" * 32
OTHER = "t" * 40


def _write(tmp_path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "keys"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    path.chmod(mode)
    return path


def _target(path: Path) -> tuple[str, bytes] | str:
    """What the target makes of the file: its key, or the error text."""
    try:
        return read_key_file(str(path))
    except SinkError as exc:
        return str(exc)


def _relay(path: Path) -> dict[str, tuple[bytes, tuple[str, ...]]] | str:
    """What the relay makes of the file: its keys, or the error text."""
    try:
        return parse_auth_keys(path)
    except AuthKeyError as exc:
        return str(exc)


# --------------------------------------------------------------------------
# Files both sides accept, with the same secret
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key_id", "secret"),
    [
        # A '#' inside a word is part of it: the target used to cut the
        # secret there (and then refuse it as short, or authenticate with
        # another secret than the relay's).
        (f"k1 {SECRET}#x *\n", "k1", SECRET + "#x"),
        (f"k1 {SECRET[:-1]}#{OTHER} *\n", "k1", SECRET[:-1] + "#" + OTHER),
        # A word starting with '#' starts a comment, anywhere on the line.
        (f"# keys\n\nk1 {SECRET} host-a host-b  # two hosts\n", "k1", SECRET),
        (f"k1 {SECRET} h #comment with words\n", "k1", SECRET),
        # Whitespace: tabs, CRLF, leading blanks, trailing blanks.
        (f"\t k1\t{SECRET}\th \r\n", "k1", SECRET),
        (f"\r\n  \n# c\r\nk1  {SECRET}  *  \r\n", "k1", SECRET),
        # Non-ASCII secrets are their UTF-8 bytes on both sides.
        ("k1 " + "é" * 32 + " *\n", "k1", "é" * 32),
    ],
)
def test_both_sides_take_the_same_key(tmp_path: Path, text: str, key_id: str, secret: str) -> None:
    path = _write(tmp_path, text)
    relay = _relay(path)
    assert isinstance(relay, dict), relay
    assert relay[key_id][0] == secret.encode()
    assert _target(path) == (key_id, secret.encode())


def test_target_uses_the_first_key_of_a_relay_file(tmp_path: Path) -> None:
    path = _write(tmp_path, f"k1 {SECRET} h1\nk2 {OTHER} h2\n")
    assert _relay(path) == {"k1": (SECRET.encode(), ("h1",)), "k2": (OTHER.encode(), ("h2",))}
    assert _target(path) == ("k1", SECRET.encode())


def test_target_needs_no_host(tmp_path: Path) -> None:
    """The one rule that differs by side: a relay key says where it may write."""
    path = _write(tmp_path, f"k1 {SECRET}\n")
    assert _target(path) == ("k1", SECRET.encode())
    assert _relay(path) == f"{path}:1: expected 'KEY_ID SECRET HOST...', got 2 field(s)"


# --------------------------------------------------------------------------
# Files both sides refuse, at the same line
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "match"),
    [
        # The target used to accept these (it read the first key and
        # stopped, and checked neither key ids nor hosts).
        (f"a/b {SECRET} *\n", ":1: ", "key id 'a/b' must not contain '/'"),
        (f".hidden {SECRET} *\n", ":1: ", "key id '.hidden' must not start with '.'"),
        (f"k1 {SECRET} ../h\n", ":1: ", "host '../h' must not contain '/'"),
        (f"k1 {SECRET} h\nk1 {OTHER} h\n", ":2: ", "key id 'k1' appears twice"),
        (f"k1 {SECRET} h\nstray\n", ":2: ", "expected 'KEY_ID SECRET"),
        (f"k1 {SECRET} h\nk2 short h\n", ":2: ", "secret of key 'k2' is shorter than 32 characters"),
        # A byte order mark is not whitespace: it is part of the key id.
        (f"\ufeffk1 {SECRET} *\n", ":1: ", "key id '\\ufeffk1' must be printable"),
        # Both sides already refused these.
        (f"k1 {SECRET[:-1]} *\n", ":1: ", "shorter than 32"),
        ("# nothing\n\n", "", "holds no key"),
        ("", "", "holds no key"),
    ],
)
def test_both_sides_refuse_the_same_line(tmp_path: Path, text: str, where: str, match: str) -> None:
    path = _write(tmp_path, text)
    target, relay = _target(path), _relay(path)
    assert isinstance(target, str) and isinstance(relay, str), (target, relay)
    assert match in target and match in relay, (target, relay)
    assert f"{path}{where}" in target and f"{path}{where}" in relay


def test_both_sides_refuse_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    # The target used to let UnicodeDecodeError escape (not a SinkError).
    path = _write(tmp_path, b"k1 " + b"\xff" * 32 + b" *\n")
    target, relay = _target(path), _relay(path)
    assert isinstance(target, str) and "is not UTF-8 text" in target
    assert isinstance(relay, str) and "is not UTF-8 text" in relay


def test_both_sides_refuse_a_huge_file(tmp_path: Path) -> None:
    # The target used to read the first 64 KiB and ignore the rest (a line
    # could be cut there); the relay read any size.
    path = _write(tmp_path, "#" * keyfile.MAX_KEY_FILE_SIZE + f"\nk1 {SECRET} *\n")
    target, relay = _target(path), _relay(path)
    assert isinstance(target, str) and "is larger than" in target
    assert isinstance(relay, str) and "is larger than" in relay


def test_both_sides_refuse_what_is_not_a_regular_file(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    for path in (directory, fifo):
        results: list[object] = []

        def read(path: Path = path, results: list[object] = results) -> None:
            results.extend([_target(path), _relay(path)])

        # Reading a FIFO used to block both sides until a writer came.
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), f"reading {path} blocks"
        assert all(isinstance(r, str) and "not a regular file" in r for r in results), results


def test_both_sides_refuse_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing"
    target, relay = _target(path), _relay(path)
    assert isinstance(target, str) and "cannot read key file" in target and "No such file" in target
    assert isinstance(relay, str) and "cannot read auth key file" in relay and "No such file" in relay


# --------------------------------------------------------------------------
# Permissions: checked on both sides; refused by the relay, warned by the target
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_permissions(tmp_path: Path, mode: int, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, f"k1 {SECRET} *\n", mode)
    relay = _relay(path)
    assert isinstance(relay, str) and "accessible by group or others" in relay and "chmod 600" in relay
    with caplog.at_level(logging.WARNING, logger="consumerd.net"):
        assert _target(path) == ("k1", SECRET.encode())
    assert f"key file {path} is accessible by group or others (mode {mode:04o})" in caplog.text


def test_private_file_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, f"k1 {SECRET} *\n", 0o600)
    with caplog.at_level(logging.WARNING, logger="consumerd.net"):
        assert _target(path) == ("k1", SECRET.encode())
    assert "accessible" not in caplog.text


# --------------------------------------------------------------------------
# The module itself
# --------------------------------------------------------------------------


def test_parse_keys_codes() -> None:
    cases = [
        ("k1\n", KeyFileErrorCode.BAD_LINE, 1),
        (f"k/1 {SECRET} *\n", KeyFileErrorCode.BAD_NAME, 1),
        ("\nk1 short *\n", KeyFileErrorCode.SHORT_SECRET, 2),
        (f"k1 {SECRET} *\nk1 {SECRET} *\n", KeyFileErrorCode.DUPLICATE_KEY, 2),
        ("#\n", KeyFileErrorCode.NO_KEY, None),
    ]
    for text, code, line in cases:
        with pytest.raises(KeyFileError) as ei:
            keyfile.parse_keys(text, Side.RELAY, path="f", check_name=names.validate_name)
        assert ei.value.code is code and ei.value.line == line and ei.value.path == "f"


def test_read_key_file_result(tmp_path: Path) -> None:
    path = _write(tmp_path, f"k1 {SECRET} a b\n# c\nk2 {OTHER}\n", 0o640)
    parsed = keyfile.read_key_file(path, Side.TARGET, check_name=names.validate_name)
    assert parsed.path == str(path) and parsed.mode == 0o640 and parsed.side is Side.TARGET
    assert [(k.key_id, k.secret, k.hosts, k.line) for k in parsed.keys] == [
        ("k1", SECRET.encode(), ("a", "b"), 1), ("k2", OTHER.encode(), (), 3),
    ]
    assert parsed.permission_problem() is not None
    assert SECRET not in repr(parsed)  # secrets stay out of logs and tracebacks


def test_read_key_file_codes(tmp_path: Path) -> None:
    path = _write(tmp_path, f"k1 {SECRET} *\n", 0o644)
    with pytest.raises(KeyFileError) as ei:
        keyfile.read_key_file(path, Side.RELAY, check_name=names.validate_name)
    assert ei.value.code is KeyFileErrorCode.LOOSE_PERMISSIONS
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as ei:
        keyfile.read_key_file(path, Side.RELAY, check_name=names.validate_name, max_size=10)
    assert ei.value.code is KeyFileErrorCode.TOO_LARGE
    with pytest.raises(KeyFileError) as ei:
        keyfile.read_key_file(tmp_path / "none", Side.RELAY, check_name=names.validate_name)
    assert ei.value.code is KeyFileErrorCode.UNREADABLE
    assert isinstance(ei.value, ValueError)
