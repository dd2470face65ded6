"""Running tracewire as a service: ``--version``, the systemd units under
contrib/systemd (``systemd-analyze verify``), relayd's SIGHUP (key file
reload) and SIGTERM (drain).

The reload is tested in-process on serve_relayd (cheap); one end-to-end test
runs a real ``tracewire-relayd`` and sends it SIGHUP, then SIGTERM.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import logging
import os
import shutil
import signal
import ssl
import struct
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator
from pathlib import Path

import click
import pytest
import trio
import trustme
from click.testing import CliRunner
from test_relayd import Client, Trace, event_seqs, expected_seqs, packet_msg, send_trace

from relayd import RelaydConfig, parse_auth_keys, serve_relayd
from relayd.main import ReloadPaths, _tls_context, reload
from relayd.main import main as relayd_main
from sessiond.main import main as sessiond_main
from tracewire.cli import cli as tracewire_cli
from tracewire.wire import PROTOCOL_VERSION, Error, ErrorCode, SessionClose, StreamClose, Welcome

from conftest import BIN_DIR, TW, _alive, _children

TIMEOUT = 60.0  # generous: a loaded 2-core machine starts Python slowly
ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
SECRET_A, SECRET_B, SECRET_C = b"a" * 40, b"b" * 40, b"c" * 40


def _keys(path: Path, *lines: tuple[str, bytes, str]) -> Path:
    path.write_text("".join(f"{k} {s.decode()} {h}\n" for k, s, h in lines))
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------
# --version
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "prog"),
    [(tracewire_cli, "tracewire"), (relayd_main, "tracewire-relayd"), (sessiond_main, "tracewire-sessiond")],
)
def test_version_is_one_line_with_package_and_protocol(command: object, prog: str) -> None:
    result = CliRunner().invoke(command, ["--version"])  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"{prog} {importlib.metadata.version('tracewire')} (wire protocol {PROTOCOL_VERSION}; speaks 1, 2)\n"
    )


@pytest.mark.parametrize(("command", "prefix"),
                         [(relayd_main, "TRACEWIRE_RELAYD"), (sessiond_main, "TRACEWIRE_SESSIOND")])
def test_every_option_reads_the_variable_its_help_and_the_env_files_name(command: object, prefix: str) -> None:
    """The units' environment files set TRACEWIRE_<DAEMON>_<OPTION>: each
    option must read exactly that variable (click derives it from the
    parameter's name, which need not be the option's), and the "[env X]" of
    its help must say so."""
    import re

    for param in command.params:  # type: ignore[attr-defined]
        if not isinstance(param, click.Option) or not param.opts[0].startswith("--") or param.is_flag:
            continue
        want = prefix + "_" + param.opts[0][2:].upper().replace("-", "_")
        got = param.envvar or f"{prefix}_{param.name.upper()}"
        assert got == want, f"{param.opts[0]} reads {got}, not {want}"
        said = re.findall(r"\[env (\w+)\]", param.help or "")
        assert said in ([], [want]), f"{param.opts[0]}'s help names {said}"


# --------------------------------------------------------------------------
# systemd units
# --------------------------------------------------------------------------


def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the units.  verify checks that
    ExecStart's binary exists, so a copy points it at this venv's scripts."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    bindir = Path(sys.executable).parent
    units = sorted(UNITS.glob("*.service"))
    assert [u.name for u in units] == ["tracewire-relayd.service", "tracewire-sessiond.service"]
    copies = []
    for unit in units:
        text = unit.read_text()
        assert "/usr/bin/tracewire-" in text
        copy = tmp_path / unit.name
        copy.write_text(text.replace("/usr/bin/tracewire-", f"{bindir}/tracewire-"))
        copies.append(str(copy))
    relayd, sessiond = (_directives(u) for u in units)
    assert relayd["CapabilityBoundingSet"] == [""] and relayd["ProtectSystem"] == ["strict"]
    assert relayd["ExecReload"] == ["/bin/kill -HUP $MAINPID"] and relayd["StateDirectory"] == ["tracewire-relayd"]
    assert sessiond["CapabilityBoundingSet"] == ["CAP_SETUID CAP_SETGID CAP_CHOWN CAP_KILL CAP_SYS_NICE"]
    assert sessiond["RuntimeDirectory"] == ["tracewire"] and sessiond["KillMode"] == ["mixed"]
    for unit in (relayd, sessiond):
        assert unit["NoNewPrivileges"] == ["yes"] and unit["Restart"] == ["on-failure"]
        assert unit["SystemCallFilter"][0] == "@system-service" and unit["LimitNOFILE"]
    r = subprocess.run([analyze, "verify", *copies], capture_output=True, text=True, timeout=TIMEOUT,
                       env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    # verify exits non-zero for errors only; the units must not draw warnings either.
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "tracewire" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def _directives(unit: Path) -> dict[str, list[str]]:
    """{key: [values in order]} of a unit file (comments and sections dropped)."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


# --------------------------------------------------------------------------
# SIGHUP: the key file reloaded
# --------------------------------------------------------------------------


async def test_reload_admits_new_keys_refuses_removed_ones_and_keeps_streaming(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(TIMEOUT):
        out, keys = tmp_path / "out", tmp_path / "keys"
        _keys(keys, ("key-a", SECRET_A, "host-a"), ("key-b", SECRET_B, "*"))
        config = RelaydConfig(output=str(out), listen_host="127.0.0.1", listen_port=0,
                              auth_keys=parse_auth_keys(keys))
        t = Trace("host-a")
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_relayd, config)
            port = listeners[0].socket.getsockname()[1]
            a = await Client.connect(port)
            assert isinstance(await a.handshake("host-a", ("key-a", SECRET_A)), Welcome)
            await a.open_stream(t)
            assert await a.stream_state(1) == 0
            for n in range(3):
                await a.send(packet_msg(1, n, t.packet(n)))
            await a.wait_ack(1, 2)
            b = await Client.connect(port)
            assert isinstance(await b.handshake("host-b", ("key-b", SECRET_B)), Welcome)
            c = await Client.connect(port)  # key-c is not known yet
            assert isinstance(reply := await c.handshake("host-c", ("key-c", SECRET_C)), Error)
            assert reply.code == ErrorCode.AUTH_FAILED
            await c.aclose()

            _keys(keys, ("key-a", SECRET_A, "host-a"), ("key-c", SECRET_C, "*"))
            with caplog.at_level(logging.INFO, logger="relayd"):
                await reload(listeners.server, ReloadPaths(str(keys)), None)
            assert "SIGHUP: 2 keys loaded" in caplog.text and "closed 1 connections" in caplog.text
            # key-b was removed: its connection is closed, a new one refused.
            error = await b.expect_error()
            assert (error.code, error.text) == (ErrorCode.AUTH_FAILED,
                                                "key 'key-b' was removed from the relay's key file")
            b = await Client.connect(port)
            assert isinstance(reply := await b.handshake("host-b", ("key-b", SECRET_B)), Error)
            assert reply.code == ErrorCode.AUTH_FAILED
            await b.aclose()
            # key-c is admitted; key-a's connection went on across the reload.
            await send_trace(port, Trace("host-c"), range(2), key=("key-c", SECRET_C))
            for n in range(3, 6):
                await a.send(packet_msg(1, n, t.packet(n)))
            await a.wait_ack(1, 5)

            # A file that does not parse changes nothing, and says so once.
            keys.write_text("key-a too-short host-a\n")
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="relayd"):
                await reload(listeners.server, ReloadPaths(str(keys)), None)
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(errors) == 1 and errors[0].startswith("SIGHUP: keeping the 2 keys in force: "), errors
            await send_trace(port, Trace("host-c", session="s2"), range(1), key=("key-c", SECRET_C))
            for n in range(6, 8):
                await a.send(packet_msg(1, n, t.packet(n)))
            await a.wait_ack(1, 7)
            await a.send(StreamClose(1))
            await a.send(SessionClose(1))
            await a.bye()
            nursery.cancel_scope.cancel()
        assert event_seqs(t.trace_dir(out)) == expected_seqs(range(8))  # every seq once
        assert sorted(os.listdir(out)) == ["host-a", "host-c"]


async def test_reload_serves_the_new_tls_certificate_and_keeps_it_on_a_bad_pair(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(TIMEOUT):
        old_ca, new_ca = trustme.CA(), trustme.CA()
        cert, key = tmp_path / "relay.pem", tmp_path / "relay.key"
        leaf = old_ca.issue_cert("localhost")
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        tls = _tls_context(str(cert), str(key))
        trusts = {}
        for name, ca in (("old", old_ca), ("new", new_ca)):
            trusts[name] = ssl.create_default_context()
            ca.configure_trust(trusts[name])
        paths = ReloadPaths(None, str(cert), str(key))
        out = tmp_path / "out"
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_relayd, RelaydConfig(
                output=str(out), listen_host="127.0.0.1", listen_port=0, tls=tls))
            port = listeners[0].socket.getsockname()[1]
            await send_trace(port, Trace("host-a"), range(1), tls=trusts["old"])
            leaf = new_ca.issue_cert("localhost")
            leaf.cert_chain_pems[0].write_to_path(str(cert))
            leaf.private_key_pem.write_to_path(str(key))
            await reload(listeners.server, paths, tls)
            await send_trace(port, Trace("host-b"), range(1), tls=trusts["new"])
            # A certificate that does not match its key is refused; the new one stays.
            old_ca.issue_cert("localhost").cert_chain_pems[0].write_to_path(str(cert))
            caplog.clear()
            await reload(listeners.server, paths, tls)
            assert "SIGHUP: keeping the TLS certificate in use" in caplog.text
            await send_trace(port, Trace("host-c"), range(1), tls=trusts["new"])
            c = await Client.connect(port, trusts["old"])  # the old CA no longer vouches for the relay
            try:
                assert isinstance(c.stream, trio.SSLStream)
                with pytest.raises(trio.BrokenResourceError):
                    await c.stream.do_handshake()
            finally:
                await c.aclose()
            nursery.cancel_scope.cancel()
        assert sorted(os.listdir(out)) == ["host-a", "host-b", "host-c"]


# --------------------------------------------------------------------------
# The real daemon: SIGHUP, then SIGTERM drains
# --------------------------------------------------------------------------


class _Lines:
    """Reads a process's stderr; `until` waits for a line holding a text."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.text = ""

    async def until(self, needle: str) -> str:
        while True:
            for line in self.text.splitlines():
                if needle in line:
                    self.text = self.text[self.text.index(line) + len(line):]
                    return line
            data = await self.stream.receive_some(65536)
            assert data, f"relayd's stderr ended before {needle!r}"
            self.text += data.decode()


async def _unsent(stream: trio.SocketStream) -> None:
    """Waits until the kernel has delivered everything sent on `stream`
    (SIOCOUTQ, bytes not yet acknowledged by the peer's TCP, is 0)."""
    while True:
        buf = fcntl.ioctl(stream.socket.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        if struct.unpack("i", buf)[0] == 0:
            return
        await trio.sleep(0.01)


async def test_relayd_reloads_on_sighup_and_drains_on_sigterm(tmp_path: Path) -> None:
    out, keys = tmp_path / "out", tmp_path / "keys"
    _keys(keys, ("key-a", SECRET_A, "host-a"))
    # fsync mode with a long interval: the packets sent before SIGTERM wait
    # in the relay, written and acknowledged by nothing but the drain.
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relayd", "--output", str(out), "--listen", "127.0.0.1:0", "--live-listen", "off",
         "--auth-keys", str(keys), "--fsync", "--fsync-interval", "10", "--log-level", "info"],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        with trio.fail_after(TIMEOUT):
            assert proc.stderr is not None
            lines = _Lines(proc.stderr)
            port = int((await lines.until("listening on 127.0.0.1:")).split("127.0.0.1:")[1].split(",")[0])
            t = Trace("host-a")
            a = await Client.connect(port)
            assert isinstance(await a.handshake("host-a", ("key-a", SECRET_A)), Welcome)
            await a.open_stream(t)
            assert await a.stream_state(1) == 0
            for n in range(3):
                await a.send(packet_msg(1, n, t.packet(n)))
            assert await a.stream_state(1) == 3  # a declaration settles: synced and acknowledged first
            assert a.acks[1] == 2

            _keys(keys, ("key-a", SECRET_A, "host-a"), ("key-c", SECRET_C, "*"))
            proc.send_signal(signal.SIGHUP)
            await lines.until("SIGHUP: 2 keys loaded")
            c = await Client.connect(port)
            assert isinstance(await c.handshake("host-c", ("key-c", SECRET_C)), Welcome)
            await c.aclose()

            for n in range(3, 10):  # not acknowledged before the sync interval...
                await a.send(packet_msg(1, n, t.packet(n)))
            assert isinstance(a.stream, trio.SocketStream)
            await _unsent(a.stream)  # ...but in the relay's hands
            proc.send_signal(signal.SIGTERM)
            error = await a.recv_data()  # the acks first
            assert isinstance(error, Error) and error.code == ErrorCode.RETRY, error
            assert a.acks[1] == 9
            await a.aclose()
            assert await proc.wait() == 0
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            rest = lines.text + b"".join([d async for d in _chunks(proc.stderr)]).decode()
            assert "Traceback" not in rest
        assert event_seqs(t.trace_dir(out)) == expected_seqs(range(10))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _chunks(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    while data := await stream.receive_some(65536):
        yield data


# --------------------------------------------------------------------------
# sessiond: SIGTERM stops the started sessions first
# --------------------------------------------------------------------------


def test_sessiond_sigterm_flushes_started_sessions_and_exits_0(tw: TW, out_dir: Path) -> None:
    """An app has emitted 20 events into a sub-buffer still open when
    sessiond gets SIGTERM: they reach the trace (the session is stopped as
    'tracewire stop' does), sessiond and its consumerd exit (0), the app
    goes on untraced."""
    from test_local_e2e import Progress, read_back, setup_session

    log = open(os.path.join(tw.rundir, "test-sessiond.log"), "w+")  # noqa: SIM115 (closed below)
    sessiond = subprocess.Popen([os.path.join(BIN_DIR, "tracewire-sessiond"), "--rundir", tw.rundir],
                                env=tw.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + TIMEOUT
        while tw.sessiond_pid() != sessiond.pid:  # written once it listens
            assert sessiond.poll() is None and time.monotonic() < deadline, "sessiond did not start"
            time.sleep(0.02)
        setup_session(tw, out_dir)
        consumerd = _children(sessiond.pid)
        app = tw.demo_popen("--events", "100000", "--rate", "20", "--progress-every", "20")
        Progress(app).wait_for(20)
        sessiond.send_signal(signal.SIGTERM)
        assert sessiond.wait(TIMEOUT) == 0
        seqs, discarded = read_back(out_dir)
        assert discarded == 0 and len(seqs) >= 20 and seqs == list(range(len(seqs))), seqs
        log.seek(0)
        text = log.read()
        assert f"session s1 (uid {os.geteuid()}) stopped and flushed" in text, text
        assert "Traceback" not in text, text
        assert app.poll() is None  # the app goes on, untraced
        assert consumerd and not any(_alive(pid) for pid in consumerd)
    finally:
        if sessiond.poll() is None:
            sessiond.kill()
            sessiond.wait()
        log.close()
