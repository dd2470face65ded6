"""``tracewire``: the control CLI (lttng's verbs).

Each command sends one JSON request to sessiond's ``control.sock`` in the run
directory and prints the answer.  ``create`` starts a sessiond when none
answers.  Every failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tracewire import ops
from tracewire.control import ControlError, FrameReader, encode_frame
from tracewire.peercred import peer_credentials
from tracewire.rundir import default_rundir, ensure_rundir, trusted_uid
from tracewire.version import version_option

EXIT_FAILURE = 1
EXIT_NO_DAEMON = 3
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


class CliError(click.ClickException):
    """One line on stderr, exit code 1."""

    exit_code = EXIT_FAILURE

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True)


class NoDaemon(CliError):
    exit_code = EXIT_NO_DAEMON


if TYPE_CHECKING:  # generic in click >= 8.2 only: subscript it for mypy alone
    _IntParam = click.ParamType[int, Any]
else:
    _IntParam = click.ParamType


class Size(_IntParam):
    """A byte size like ``4096``, ``256k`` or ``4M``."""

    name = "size"

    def __init__(self, power_of_two: bool = True) -> None:
        self.power_of_two = power_of_two

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removesuffix("b").removesuffix("i")
        unit = text[-1:] if text[-1:] in _UNITS and text[-1:] else ""
        num = text[: len(text) - len(unit)]
        try:
            n = int(num) * _UNITS[unit]
        except ValueError:
            self.fail(f"{value!r} is not a size (examples: 4096, 256k, 4M)", param, ctx)
        if self.power_of_two and (n < 4096 or n & (n - 1)):
            self.fail(f"{value!r}: a sub-buffer size must be a power of two of at least 4k", param, ctx)
        if n < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return n


class BlockingTimeout(_IntParam):
    """``--blocking-timeout``: milliseconds (0: never block), or ``inf``
    (``ops.BLOCK_FOREVER``)."""

    name = "ms|inf"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "inf":
            return ops.BLOCK_FOREVER
        try:
            n = int(text)
        except ValueError:
            n = -1
        if not 0 <= n <= 2**31:
            self.fail(f"{value!r} is not a timeout: give milliseconds (0 = never block) or 'inf'", param, ctx)
        return n


_TIMER_UNITS = {"us": 0.001, "ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


class Period(_IntParam):
    """A period like ``500ms``, ``30s``, ``10m`` or ``1h``, in milliseconds;
    a bare number is microseconds, as with LTTng."""

    name = "period"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(num):] or "us"
        try:
            ms = float(num) * _TIMER_UNITS[unit]
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a period (examples: 500ms, 30s, 10m, 1h)", param, ctx)
        if not 1 <= ms <= 2**40:
            self.fail(f"{value!r}: a period must be at least 1ms", param, ctx)
        return round(ms)


def _period_words(ms: int) -> str:
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _rotation_words(s: dict[str, Any]) -> str | None:
    """The session's rotation schedule and archived chunks, in one line
    (None: no schedule and nothing archived)."""
    sched = s.get("rotation") or {}
    conds = []
    if sched.get("timer_ms"):
        conds.append(f"every {_period_words(sched['timer_ms'])}")
    if sched.get("size"):
        conds.append(f"at {ops.human_size(sched['size'])}")
    n = s.get("chunks_archived", 0)
    if not conds and not n:
        return None
    words = f"rotation: {' or '.join(conds) if conds else 'by hand'}, {n} chunks archived"
    if s.get("last_archive"):
        words += f" (last: {s['last_archive']})"
    return words


def _blocking_words(ms: int) -> str:
    """A channel's blocking timeout as ``list`` shows it."""
    if ms == ops.BLOCK_FOREVER:
        return "blocking (waits for ever)"
    return f"blocking (waits up to {ms} ms)" if ms else "non-blocking"


def _tracefile_words(size: int, count: int) -> str:
    """A channel's stream file limits as ``list`` shows them."""
    if not size:
        return "one file per stream"
    return f"tracefile-size {ops.human_size(size)}, tracefile-count {count or 'unlimited'}"


class Client:
    """A synchronous client for sessiond's control socket."""

    def __init__(self, rundir: str) -> None:
        self.rundir = rundir
        self.path = os.path.join(rundir, "control.sock")

    def request(self, req: ops.Request, timeout: float | None = 60.0) -> dict[str, Any]:
        """Send one request and return sessiond's answer.

        Raises:
            NoDaemon: no sessiond answers in this run directory.
            CliError: the request failed (the error is sessiond's one line).
        """
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise CliError(f"cannot create a socket: {exc}") from None
        with sock:
            sock.settimeout(5)
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise NoDaemon(
                    f"no tracewire-sessiond is running in {self.rundir} "
                    "(start one with 'tracewire create NAME' or 'tracewire-sessiond')"
                ) from None
            except PermissionError:
                raise CliError(f"permission denied on {self.path}") from None
            except OSError as exc:
                raise NoDaemon(f"cannot reach sessiond at {self.path}: {exc}") from None
            _check_peer(sock, self.path)
            sock.settimeout(timeout)
            try:
                sock.sendall(encode_frame(ops.encode(req)))
                reader = FrameReader()
                while (reply := reader.next()) is None:
                    data = sock.recv(65536)
                    if not data:
                        raise CliError("sessiond closed the connection without answering")
                    reader.feed(data)
            except TimeoutError:
                raise CliError(f"sessiond did not answer within {timeout:.0f} s") from None
            except ControlError as exc:
                raise CliError(f"bad answer from sessiond: {exc}") from None
            except OSError as exc:
                raise CliError(f"lost the connection to sessiond: {exc}") from None
        if not reply.get("ok"):
            raise CliError(str(reply.get("error", "request failed")))
        return reply

    def ensure_daemon(self) -> None:
        """Start a sessiond for this run directory unless one answers."""
        import subprocess  # only here: ~3 ms of every other command's start-up

        try:
            self.request(ops.PingRequest(), timeout=5)
            return
        except NoDaemon:
            pass
        try:
            ensure_rundir(self.rundir, error=CliError)
            log = open(os.path.join(self.rundir, "sessiond.log"), "ab")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise CliError(f"cannot use run directory {self.rundir}: {exc.strerror}") from None
        with log:
            proc = subprocess.Popen(
                # -P: not the working directory first on sys.path, as -m
                # would put it (root in /tmp would run anyone's 'sessiond').
                [sys.executable, "-P", "-m", "sessiond", "--rundir", self.rundir],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env=dict(os.environ, TRACEWIRE_RUNDIR=self.rundir),
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise CliError(f"tracewire-sessiond exited at start ({self._last_log_line()})")
            try:
                self.request(ops.PingRequest(), timeout=5)
                return
            except NoDaemon:
                time.sleep(0.05)
        raise CliError(f"tracewire-sessiond did not come up within 15 s ({self._last_log_line()})")

    def _last_log_line(self) -> str:
        try:
            with open(os.path.join(self.rundir, "sessiond.log"), "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            return lines[-1] if lines else "no log"
        except OSError:
            return "no log"


def _check_peer(sock: socket.socket, path: str) -> None:
    """Talk only to a sessiond run by this user or by root: anyone else
    listening at ``path`` planted it (SO_PEERCRED)."""
    _pid, uid, _gid = peer_credentials(sock)
    if not trusted_uid(uid):
        raise CliError(f"refusing the sessiond at {path}: it runs as uid {uid}, not as you or root")


def _check_output_dir(path: str) -> None:
    """Refuse, now and in one line, an output the trace could not be written to."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise CliError(f"cannot write traces under {path}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise CliError(f"cannot write traces under {path}: {p} is not writable")


_R = TypeVar("_R", bound=ops.Request)


def _make(cls: type[_R], **fields: Any) -> _R:
    """A request, or one line saying which value is wrong."""
    try:
        return cls(**fields)
    except ops.MessageError as exc:
        raise CliError(str(exc)) from None


def _client(ctx: click.Context) -> Client:
    return ctx.find_object(Client)  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--rundir", envvar="TRACEWIRE_RUNDIR", default=None, metavar="DIR",
              help="sessiond's run directory [env TRACEWIRE_RUNDIR; default "
                   "$XDG_RUNTIME_DIR/tracewire, or /run/tracewire for root].")
@version_option("tracewire")
@click.pass_context
def cli(ctx: click.Context, rundir: str | None) -> None:
    """Control tracing sessions: create, enable events, start, stop, view.

    \b
      tracewire create s1 --output /tmp/traces
      tracewire enable-event 'demo:*'
      tracewire start
      tracewire-demo --events 1000
      tracewire stop
      tracewire view /tmp/traces
    """
    ctx.obj = Client(rundir or default_rundir())


@cli.command()
@click.argument("name")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Local trace directory.")
@click.option("--url", "-U", help="Relay URL, tw://HOST[:PORT] or tws://HOST[:PORT].")
@click.option("--snapshot", is_flag=True,
              help="Flight-recorder session: channels overwrite their oldest data by default and "
                   "nothing is written while tracing; 'tracewire snapshot record' writes what the "
                   "buffers hold (also the buffers of apps that exited or crashed).")
@click.option("--live", "live_timer_us", is_flag=False, flag_value=ops.DEFAULT_LIVE_TIMER_US, default=0,
              type=click.IntRange(0, ops.MAX_LIVE_TIMER_US), metavar="[US]",
              help="Live session (needs --url): the relay serves it to live viewers (babeltrace2 -i "
                   "lttng-live, 'tracewire view --follow') while it runs; every stream hands over what it "
                   f"holds at least every US microseconds [default US: {ops.DEFAULT_LIVE_TIMER_US}].")
@click.option("--compress", type=click.Choice(["zstd", "none"]), default="zstd", show_default=True,
              help="Packet compression on the wire.")
@click.option("--compress-level", type=click.IntRange(1, 22), default=ops.DEFAULT_COMPRESS_LEVEL,
              show_default=True,
              help="zstd level.")
@click.option("--auth-key-file", envvar="TRACEWIRE_AUTH_KEY_FILE", type=click.Path(dir_okay=False),
              help="File holding 'KEY_ID SECRET' for the relay [env TRACEWIRE_AUTH_KEY_FILE].")
@click.option("--spool-size", type=Size(power_of_two=False), default=ops.DEFAULT_SPOOL_SIZE,
              show_default=f"{ops.DEFAULT_SPOOL_SIZE // 1024**2}M",
              help="Relay sessions: packets not yet acknowledged are kept in a spool of at most "
                   "this size (in RUNDIR/spool); past it the ring buffers discard, and count.")
@click.option("--tls-ca", envvar="TRACEWIRE_TLS_CA", type=click.Path(dir_okay=False, exists=True),
              help="CA certificate(s) to verify a tws:// relay with (default: the system's) "
                   "[env TRACEWIRE_TLS_CA].")
@click.pass_context
def create(ctx: click.Context, name: str, output: str | None, url: str | None, snapshot: bool,
           live_timer_us: int, compress: str, compress_level: int, auth_key_file: str | None,
           spool_size: int, tls_ca: str | None) -> None:
    """Create session NAME and make it the current one.

    Without --output or --url the trace goes under ~/tracewire-traces.
    """
    if output and url:
        raise click.UsageError("give --output or --url, not both")
    if 0 < live_timer_us < ops.MIN_LIVE_TIMER_US:
        raise click.BadParameter(f"at least {ops.MIN_LIVE_TIMER_US} microseconds", param_hint="--live")
    if live_timer_us and not url:
        raise click.UsageError("--live needs --url: live viewers attach to the relay")
    if live_timer_us and snapshot:
        raise click.UsageError("give --live or --snapshot, not both")
    if not url and not output:
        output = os.path.join(os.path.expanduser("~"), "tracewire-traces")
    if output:
        _check_output_dir(output)
    c = _client(ctx)
    c.ensure_daemon()
    r = c.request(_make(
        ops.CreateRequest, name=name, output=os.path.abspath(output) if output else None, url=url,
        compress=ops.Compression(compress), compress_level=compress_level, spool_size=spool_size,
        auth_key_file=os.path.abspath(auth_key_file) if auth_key_file else None,
        tls_ca=os.path.abspath(tls_ca) if tls_ca else None, snapshot=snapshot,
        live_timer_us=live_timer_us,
    ))
    what = "snapshots go" if snapshot else "traces go"
    click.echo(f"Session {r['session']} created; {what} to {r['sink']}")


@cli.command("enable-channel")
@click.argument("name")
@click.option("-s", "--session", help="Session (default: the current one).")
@click.option("--subbuf-size", type=Size(), default=ops.DEFAULT_SUBBUF_SIZE,
              show_default=f"{ops.DEFAULT_SUBBUF_SIZE // 1024}k", help="Sub-buffer size.")
@click.option("--num-subbuf", type=click.IntRange(2, 1024), default=ops.DEFAULT_NUM_SUBBUF, show_default=True,
              help="Number of sub-buffers per stream.")
@click.option("--overwrite", is_flag=True,
              help="When the ring is full, overwrite its oldest sub-buffer (the app never waits nor "
                   "drops): a flight recorder, read by 'snapshot record'. The default in snapshot "
                   "sessions, refused in others.")
@click.option("--discard", is_flag=True,
              help="When the ring is full, drop new events and count them (the default, except in "
                   "snapshot sessions).")
@click.option("--switch-timer", type=click.IntRange(0), default=0, show_default=True, metavar="MS",
              help="Hand over partly filled sub-buffers every MS milliseconds (0: off).")
@click.option("--blocking-timeout", type=BlockingTimeout(), default="0", show_default=True, metavar="MS|inf",
              help="When a ring buffer is full, the app's tracepoint call waits up to MS "
                   "milliseconds ('inf': for ever) for the consumer to make room, instead of "
                   "dropping the event at once. Lossless while the consumer keeps up on "
                   "average, but the app is slowed down (or stopped, with 'inf') whenever it "
                   "does not. 0: never wait; full buffers discard, and count.")
@click.option("--tracefile-size", type=Size(power_of_two=False), default=0, show_default=True, metavar="SIZE",
              help="Cut each stream into files of at most SIZE bytes (<channel>_<n>_<k>, each with its "
                   "index; a file is larger only when one packet alone is). At least the sub-buffer "
                   "size. 0: one file per stream.")
@click.option("--tracefile-count", type=click.IntRange(0), default=0, show_default=True, metavar="COUNT",
              help="With --tracefile-size: keep only the newest COUNT files of each stream, removing "
                   "the oldest (its packets are then lost, and babeltrace2 reports the gap). 0: keep all.")
@click.pass_context
def enable_channel(ctx: click.Context, name: str, session: str | None, subbuf_size: int,
                   num_subbuf: int, overwrite: bool, discard: bool, switch_timer: int,
                   blocking_timeout: int, tracefile_size: int, tracefile_count: int) -> None:
    """Create channel NAME (a set of ring buffers) in a session."""
    r = _client(ctx).request(_make(
        ops.EnableChannelRequest, session=session, channel=name, subbuf_size=subbuf_size,
        num_subbuf=num_subbuf, overwrite=overwrite, discard=discard, switch_timer_ms=switch_timer,
        blocking_timeout_ms=blocking_timeout, tracefile_size=tracefile_size, tracefile_count=tracefile_count,
    ))
    click.echo(f"Channel {r['channel']} enabled in session {r['session']}")


@cli.command("enable-event")
@click.argument("pattern")
@click.option("-s", "--session", help="Session (default: the current one).")
@click.option("-c", "--channel", help=f"Channel (default: {ops.DEFAULT_CHANNEL}, created when needed).")
@click.option("--python", "python", is_flag=True,
              help="PATTERN names Python loggers (tracewire.logging): 'app.db' means the events "
                   "'python:app.db', '*' every logger.")
@click.option("--loglevel", metavar="LEVEL", default=None,
              help="Only log events at LEVEL or more severe (DEBUG, INFO, WARNING, ERROR, CRITICAL "
                   "or a number).")
@click.option("--loglevel-only", metavar="LEVEL", default=None,
              help="Only log events at exactly LEVEL.")
@click.pass_context
def enable_event(ctx: click.Context, pattern: str, session: str | None, channel: str | None, python: bool,
                 loglevel: str | None, loglevel_only: str | None) -> None:
    """Record events whose name matches PATTERN ('demo:*', '*').

    Python logging records (tracewire.logging) are the events
    'python:LOGGER'; --loglevel and --loglevel-only keep only some of their
    levels, and the app itself drops the others:

    \b
      tracewire enable-event --python app.db --loglevel WARNING
      tracewire enable-event 'python:*' --loglevel-only ERROR
    """
    if loglevel is not None and loglevel_only is not None:
        raise click.UsageError("give --loglevel or --loglevel-only, not both")
    level_text = loglevel if loglevel is not None else loglevel_only
    level = None if level_text is None else _parse_loglevel(level_text)
    if python:  # a logger's name as its events spell it (tracewire.logging.event_name), wildcards kept
        import re

        pattern = "python:" + re.sub(r"[^A-Za-z0-9_.:*?\[\]!-]", "_", pattern)
    r = _client(ctx).request(_make(ops.EnableEventRequest, session=session, channel=channel,
                                   pattern=pattern, loglevel=level, loglevel_only=loglevel_only is not None))
    where = "" if level is None else f" at {_loglevel_words(dict(level=level, only=loglevel_only is not None))[2:-1]}"
    click.echo(f"Events {r['pattern']!r}{where} enabled in channel {r['channel']} of session {r['session']}")
    if r.get("warning"):
        click.echo(f"Warning: {r['warning']}", err=True)


def _parse_loglevel(text: str) -> int:
    """A ``logging`` level from its name (any case) or number.

    Raises:
        click.BadParameter: neither.
    """
    from tracewire.logging import level_number

    level = level_number(text)
    if level is None:
        raise click.BadParameter(f"{text!r} is not a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL "
                                 "or a number from 0 to 2147483647)", param_hint="'--loglevel'")
    return level


def _loglevel_words(rule: dict[str, Any] | None) -> str:
    """`` (loglevel >= WARNING (30))``, as ``list`` shows a rule; empty without one."""
    if not rule:
        return ""
    import logging

    level = int(rule["level"])
    name = logging.getLevelName(level)
    named = f"{name} ({level})" if not name.startswith("Level ") else str(level)
    return f" (loglevel {'==' if rule.get('only') else '>='} {named})"


@cli.command()
@click.argument("session", required=False)
@click.pass_context
def start(ctx: click.Context, session: str | None) -> None:
    """Start recording in SESSION (default: the current one)."""
    r = _client(ctx).request(ops.StartRequest(session=session))
    click.echo(f"Tracing started for session {r['session']}")
    if r.get("warning"):
        click.echo(f"Warning: {r['warning']}", err=True)


def _stop_summary(r: dict[str, Any]) -> None:
    streams = r.get("streams", [])
    packets = sum(s.get("packets", 0) for s in streams)
    raw = sum(s.get("raw_bytes", 0) for s in streams)
    discarded = sum(s.get("discarded", 0) for s in streams)
    msg = f"Tracing stopped for session {r['session']}: {packets} packets, {ops.human_size(raw)}"
    if r.get("snapshot"):
        msg = (f"Tracing stopped for session {r['session']}; its ring buffers are kept for "
               f"'tracewire snapshot record'")
    elif discarded:
        msg += f", {discarded} events DISCARDED (buffers full)"
    click.echo(msg)
    if r.get("warning"):
        click.echo(f"Warning: {r['warning']}", err=True)


@cli.command()
@click.argument("session", required=False)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Give up waiting for the sink after SECONDS (default: tracewire-sessiond's "
                   "--stop-timeout, 120 s).")
@click.pass_context
def stop(ctx: click.Context, session: str | None, timeout: float | None) -> None:
    """Stop SESSION (default: the current one); returns once every event
    emitted before it is in the sink (for a relay: acknowledged by it).

    When the relay does not acknowledge everything within the timeout (it is
    unreachable, or its disk is full), the command fails with one line
    saying how many packets are still held on this machine.  The session
    stays stopped and those packets are still sent once the relay takes them;
    run 'tracewire stop' again to wait for them: it succeeds once everything
    is acknowledged.
    """
    req = _make(ops.StopRequest, session=session, timeout=timeout)
    _stop_summary(_client(ctx).request(req, timeout=None))


@cli.command()
@click.argument("session", required=False)
@click.pass_context
def destroy(ctx: click.Context, session: str | None) -> None:
    """Destroy SESSION (stopping it first when needed).  A session that was
    rotated has its last trace chunk archived too, as the others."""
    r = _client(ctx).request(ops.DestroyRequest(session=session), timeout=None)
    if "streams" in r:
        _stop_summary(r)  # prints the warning too
    elif r.get("warning"):
        click.echo(f"Warning: {r['warning']}", err=True)
    if r.get("archive"):
        click.echo(f"Session {r['session']}: last trace chunk archived at {r['archive']}")
    click.echo(f"Session {r['session']} destroyed")


def _print_json(reply: dict[str, Any]) -> None:
    """sessiond's answer as one JSON document (without its ``ok``)."""
    click.echo(json.dumps({k: v for k, v in reply.items() if k != "ok"}, indent=2, sort_keys=True))


@cli.command("list")
@click.argument("session", required=False)
@click.option("--apps", "-u", is_flag=True,
              help="List the registered (traced) apps instead: pid, process name, user, and the "
                   "tracepoints each has declared with their fields, to write enable-event patterns "
                   "from (like 'lttng list -u').  A user sees their own apps; root sees all.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (keys: see README).")
@click.pass_context
def list_(ctx: click.Context, session: str | None, apps: bool, as_json: bool) -> None:
    """List sessions, or one session's channels and events; or, with
    --apps, what can be traced.

    \b
      tracewire list                 # sessions
      tracewire list s1              # one session's channels and events
      tracewire list --apps          # apps and their tracepoints
      tracewire list --apps --json   # the same, for scripts
    """
    if apps:
        if session:
            raise click.UsageError("--apps lists apps, not a session: give SESSION or --apps")
        _list_apps(_client(ctx), as_json)
        return
    r = _client(ctx).request(ops.ListRequest(session=session))
    if as_json:
        _print_json(r)
        return
    sessions = r["sessions"]
    if not sessions:
        click.echo("No sessions.")
        return
    for s in sessions:
        mark = " (current)" if s["name"] == r.get("current") else ""
        pending = (" (stopping: waiting for the sink)" if s.get("stopping")
                   else " (stop incomplete)" if s.get("stop_pending") else "")
        live = f" (live, timer {s['live_timer_us']} us)" if s.get("live_timer_us") else ""
        click.echo(f"{s['name']}{mark} [{s['state']}]{pending} -> {s['sink']}{live}")
        if (rot := _rotation_words(s)) is not None:
            click.echo(f"  {rot}")
        if session or len(sessions) == 1:
            for ch in s["channels"]:
                click.echo(f"  channel {ch['name']}: {ch['mode']}, {ch['num_subbuf']} x "
                           f"{ops.human_size(ch['subbuf_size'])}, switch timer "
                           f"{ch['switch_timer_ms'] or 'off'}{' ms' if ch['switch_timer_ms'] else ''}, "
                           f"{_tracefile_words(ch.get('tracefile_size', 0), ch.get('tracefile_count', 0))}, "
                           f"{_blocking_words(ch.get('blocking_timeout_ms', 0))}")
                levels = ch.get("event_loglevels") or {}
                for ev in ch["events"]:
                    click.echo(f"    event {ev}{_loglevel_words(levels.get(ev))}")


def _user_name(uid: int) -> str:
    """``uid``'s login name, or the number when it has none."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def _printable(text: Any) -> str:
    """An app's own words (its process name), with nothing a terminal acts on."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def _list_apps(client: Client, as_json: bool) -> None:
    r = client.request(ops.ListAppsRequest())
    apps = r.get("apps", [])
    names: dict[int, str] = {}
    for app in apps:
        app["user"] = names.setdefault(app["uid"], _user_name(app["uid"]))
    if as_json:
        _print_json(r)
        return
    if not apps:
        click.echo("No registered apps (a traced app registers when it starts, with a sessiond running).")
    for app in apps:
        click.echo(f"{_printable(app['procname'])} (pid {app['pid']}, user {_printable(app['user'])}, "
                   f"uid {app['uid']}), registered {app['registered']}:")
        if not app["tracepoints"] and not app["tracepoints_omitted"]:
            click.echo("  no tracepoints declared yet")
        for tp in app["tracepoints"]:
            fields = ", ".join(f"{f['name']}: {f['type']}" for f in tp["fields"])
            click.echo(f"  {tp['name']} ({fields})")
        if app["tracepoints_omitted"]:
            click.echo(f"  ... and {app['tracepoints_omitted']} more tracepoints, left out to keep the "
                       "answer small (the app declares too much)")
    if r.get("apps_omitted"):
        click.echo(f"... and {r['apps_omitted']} more apps, left out to keep the answer small")


@cli.command()
@click.argument("session", required=False)
@click.option("--watch", "-w", is_flag=True,
              help="Refresh until Ctrl-C (or until the session is destroyed): per stream, events/s, "
                   "bytes/s raw and on the wire (kB, MB: 10^3, 10^6 bytes), discarded events/s, the backlog "
                   "(packets not acknowledged by the relay, sub-buffers unread in the ring) and the "
                   "producer; and the session's totals.  On a terminal the table is redrawn in "
                   "place; otherwise one block of lines per refresh, each with its UTC time.")
@click.option("--interval", "-i", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              metavar="SECONDS", help="--watch: seconds between refreshes.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document (keys: see README); with --watch, one JSON object "
                   "per line per refresh, with the rates.")
@click.pass_context
def status(ctx: click.Context, session: str | None, watch: bool, interval: float, as_json: bool) -> None:
    """Per stream: events, packets, bytes raw / on the wire, discarded,
    unacknowledged.

    \b
      tracewire status                  # the current session, once
      tracewire status s1 --watch       # live rates, until Ctrl-C
      tracewire status --watch --json   # one JSON line per second
    """
    if watch:
        _watch(_client(ctx), session, interval, as_json)
        return
    if ctx.get_parameter_source("interval") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--interval is for --watch")
    r = _client(ctx).request(ops.StatusRequest(session=session))
    if as_json:
        _print_json(r)
        return
    s = r["session"]
    click.echo(f"{s['name']} [{s['state']}] -> {s['sink']}")
    if (rot := _rotation_words(s)) is not None:
        click.echo(f"  {rot}")
    if s.get("error"):
        click.echo(f"  ERROR: {s['error']}")
    if s.get("stopping"):
        click.echo("  stopping: a stop is waiting for the sink to take the rest")
    elif s.get("stop_pending"):
        click.echo("  the last stop did not complete: 'tracewire stop' waits for the rest again")
    if s.get("snapshot"):
        line = (f"  flight recorder: {s['rings']} ring buffers held ({ops.human_size(s['ring_bytes'])}), "
                f"{s['snapshots']} snapshots recorded")
        if s.get("dead_rings"):
            line += (f"; {s['dead_rings']} of them of apps that are gone, kept for 'snapshot record' "
                     f"(the last {s['keep_dead']} dead apps' are kept)")
        click.echo(line)
    for line in _buffer_lines(s, r.get("limits")):
        click.echo(f"  {line}")
    streams = r["streams"]
    if not streams:
        click.echo("  no streams yet (no traced app has emitted an enabled event)")
    for line in _relay_summary(streams):
        click.echo(f"  {line}")
    for st in streams:
        ratio = st["raw_bytes"] / st["wire_bytes"] if st.get("wire_bytes") else 1.0
        line = (f"  {st['path']}: {st.get('events', 0)} events, {st['packets']} packets, "
                f"raw {ops.human_size(st['raw_bytes'])}, "
                f"wire {ops.human_size(st['wire_bytes'])} (x{ratio:.2f}), discarded {st['discarded']}, "
                f"unacked {st['unacked']}, producer {st['producer']}")
        if st.get("error"):
            line += f", ERROR: {st['error']}"
        elif st.get("relay"):
            line += f", {_relay_words(st['relay'], None)}"
        click.echo(line)


def _watch(client: Client, session: str | None, interval: float, as_json: bool) -> None:
    """``status --watch``: see tracewire.watch.  Ctrl-C ends it with exit 0;
    the session being destroyed, with one line (exit 0)."""
    import shutil

    from tracewire import watch

    name = session
    seen = False  # a session that never answered was not destroyed: its error is the error
    tty = not as_json and sys.stdout.isatty()

    def ask() -> dict[str, Any]:
        nonlocal name, seen
        try:
            r = client.request(ops.StatusRequest(session=name))
        except CliError as exc:
            # sessiond's words for a session that is not there (Registry.session_for).
            if seen and str(exc.message).startswith("no session named"):
                raise watch.SessionGone(name) from None
            raise
        name, seen = r["session"]["name"], True  # follow this session, even if the current one changes
        return r

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def size() -> tuple[int, int]:
        cols, rows = shutil.get_terminal_size()
        return cols, rows

    if tty:
        write(watch.HIDE_CURSOR + "\x1b[2J")
    try:
        watch.watch(ask, write, interval, "json" if as_json else "table" if tty else "lines", size)
    except watch.SessionGone as gone:
        if tty:
            write(watch.HOME_CLEAR)
        click.echo(f"Session {gone} was destroyed; nothing more to watch.")
    except KeyboardInterrupt:
        pass  # Ctrl-C: the way to end a watch
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (| head): nothing to say
    finally:
        if tty:
            write(watch.SHOW_CURSOR)


def _buffer_lines(s: dict[str, Any], limits: dict[str, Any] | None) -> list[str]:
    """The memory the session's buffers take, its owner's total against their
    limits, and the ring buffers not created (over the buffers limit)."""
    out = []
    b = s.get("buffers")
    if isinstance(b, dict):
        line = (f"buffers: {ops.human_size(b['total'])} (rings {ops.human_size(b['rings'])}, reserved for "
                f"channels without a ring yet {ops.human_size(b['reserved'])}")
        if b.get("spool"):
            line += f", spool up to {ops.human_size(b['spool'])}"
        out.append(line + ")")
    if isinstance(limits, dict):
        def of(key: str, size: bool = False) -> str:
            used, limit = limits[key]["used"], limits[key]["limit"]
            text = ops.human_size if size else str
            return f"{text(used)} (no limit)" if limit is None else f"{text(used)} of {text(limit)}"
        buffers = of("buffers", True)
        if limits["buffers"]["limit"] is not None:
            buffers += f" ({limits['buffers']['source']})"
        out.append(f"user {limits['user']}: buffers {buffers}, sessions {of('sessions')}, "
                   f"channels {of('channels')}, apps {of('apps')}")
    if s.get("refused_total"):
        out.append(f"NOT TRACED: {s['refused_total']} ring buffers were not created (over the buffers limit); "
                   "those apps' events of those channels are not recorded. The last ones:")
    for refused in s.get("refused_streams", []):
        out.append(f"  {refused['why']}")
    return out


def _relay_words(state: str, why: str | None) -> str:
    """A stream's relay state as words (a state this CLI does not know: as sent)."""
    try:
        return ops.RelayState(state).describe(why)
    except ValueError:
        return f"relay {state} ({why})" if why else f"relay {state}"


def _relay_summary(streams: list[dict[str, Any]]) -> list[str]:
    """One line per relay state the session's streams are in, with what it
    keeps on this machine: held (sent once the relay takes it) or, when the
    session failed for good, lost."""
    groups: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for st in streams:
        if st.get("relay"):
            groups.setdefault((st["relay"], st.get("relay_why")), []).append(st)
    lines = []
    for (state, why), members in groups.items():
        packets = sum(st.get("unacked", 0) for st in members)
        size = ops.human_size(sum(st.get("unacked_bytes", 0) for st in members))
        unread = sum(st.get("ring_unread", 0) for st in members)
        if state == ops.RelayState.REFUSED.value:
            line = f"LOST: {packets} packets ({size}) left unacknowledged"
            if unread:
                line += f", {unread} sub-buffers never read from the ring buffers"
            line += f"; {why}"
        else:
            line = f"{_relay_words(state, why)}: {packets} packets ({size}) held on the target"
            if unread:
                line += f", {unread} sub-buffers unread in the ring buffers"
        lines.append(line)
    return lines


@cli.group()
def snapshot() -> None:
    """Flight-recorder snapshots: write what the ring buffers hold now.

    \b
      tracewire create fr --snapshot --output /var/traces
      tracewire enable-channel big --subbuf-size 256k --num-subbuf 8
      tracewire enable-event 'app:*' -c big && tracewire start
      ...
      tracewire snapshot record
      babeltrace2 /var/traces/fr-*/snapshot-1-*
    """


@snapshot.command("record")
@click.option("-s", "--session", help="Session (default: the current one).")
@click.option("--name", "-n", help="Name of the snapshot directory: NAME-YYYYmmdd-HHMMSS-SEQ "
                                   "(default: snapshot-1).")
@click.option("--max-size", "-m", type=Size(power_of_two=False), default="0",
              help="Keep at most SIZE bytes (the newest), shared equally by the streams (0: all).")
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Write below this directory instead of the session's output.")
@click.option("--url", "-U", help="Send to this relay (tw:// or tws://) instead of the session's output.")
@click.pass_context
def snapshot_record(ctx: click.Context, session: str | None, name: str | None, max_size: int,
                    output: str | None, url: str | None) -> None:
    """Write the session's ring buffers, as they are now, as a trace of its own.

    Whole packets only: a sub-buffer that an app overwrites while it is
    copied is left out and counted. Older packets the rings no longer hold
    are reported as lost by babeltrace2.
    """
    if output and url:
        raise click.UsageError("give --output or --url, not both")
    if output:
        _check_output_dir(output)
    r = _client(ctx).request(_make(
        ops.SnapshotRecordRequest, session=session, name=name, max_size=max_size,
        output=os.path.abspath(output) if output else None, url=url,
    ))
    click.echo(f"Snapshot of session {r['session']} written to {r['path']}")
    click.echo(f"  {r['streams']} streams, {r['packets']} packets, {ops.human_size(r['bytes'])}")
    notes = []
    if r["overwritten"]:
        notes.append(f"{r['overwritten']} older sub-buffers already overwritten in the rings")
    if r["events_discarded"]:
        notes.append(f"{r['events_discarded']} events discarded by full rings")
    if r["torn"]:
        notes.append(f"{r['torn']} sub-buffers overwritten while copied, left out")
    if r["skipped"]:
        notes.append(f"{r['skipped']} older sub-buffers left out for --max-size")
    if r["broken"]:
        notes.append(f"{r['broken']} streams with corrupt ring control words (see the consumerd log)")
    for note in notes:
        click.echo(f"  {note}")


@cli.command()
@click.argument("session", required=False)
@click.option("-s", "--session", "session_opt", metavar="SESSION", help="Session (default: the current one).")
@click.pass_context
def rotate(ctx: click.Context, session: str | None, session_opt: str | None) -> None:
    """Archive the current trace chunk of SESSION (default: the current one)
    and go on tracing into the next chunk.

    Every event emitted before the command is in the archived chunk or an
    earlier one, every later event in a later one; none is in two.  The
    chunk is a complete trace of its own, moved to
    SESSION_DIR/archives/BEGIN-END-INDEX/ (through a relay: once the relay
    has all of it, below its output directory).  Prints its path.  A
    stopped session can be rotated once (its last chunk).
    """
    if session and session_opt and session != session_opt:
        raise CliError(f"two sessions given: {session!r} and {session_opt!r}")
    r = _client(ctx).request(ops.RotateRequest(session=session or session_opt), timeout=None)
    click.echo(f"Session {r['session']}: trace chunk {r['chunk']} archived at {r['path']}")


@cli.command("enable-rotation")
@click.option("-s", "--session", help="Session (default: the current one).")
@click.option("--timer", type=Period(), default=None, metavar="PERIOD",
              help="Rotate every PERIOD: 500ms, 30s, 10m, 1h (a bare number: microseconds).")
@click.option("--size", type=Size(power_of_two=False), default=None, metavar="SIZE",
              help="Rotate once the current chunk holds SIZE bytes: 4k, 256M, 1G.")
@click.pass_context
def enable_rotation(ctx: click.Context, session: str | None, timer: int | None, size: int | None) -> None:
    """Rotate SESSION automatically, every --timer PERIOD and/or whenever
    its current chunk reaches --size SIZE (checked about twice a second).
    A condition not given is left as it was."""
    if not timer and not size:
        raise click.UsageError("give --timer PERIOD or --size SIZE (or both)")
    req = _make(ops.EnableRotationRequest, session=session, timer_ms=timer or 0, size=size or 0)
    r = _client(ctx).request(req)
    click.echo(f"Session {r['session']}: {_rotation_words({'rotation': r['rotation']})}")


@cli.command("disable-rotation")
@click.option("-s", "--session", help="Session (default: the current one).")
@click.pass_context
def disable_rotation(ctx: click.Context, session: str | None) -> None:
    """Remove SESSION's rotation schedule (rotate by hand still works)."""
    r = _client(ctx).request(ops.DisableRotationRequest(session=session))
    click.echo(f"Session {r['session']}: automatic rotation disabled")


def _saved_dir() -> str:
    """Where ``save`` writes and ``load`` looks by default (LTTng's
    ``$LTTNG_HOME/.lttng/sessions``)."""
    home = os.environ.get("TRACEWIRE_HOME") or os.path.expanduser("~")
    return os.path.join(home, ".tracewire", "sessions")


def _write_saved(path: str, text: str, force: bool, owner: int | None = None) -> None:
    """Write a saved session to ``path`` (0600, whole or not at all).
    Root saving another user's session gives the file to that user:
    ``tracewire-sessiond --load`` makes a file's session for its owner."""
    if os.path.lexists(path) and not force:
        raise CliError(f"{path} exists (give --force to overwrite it)")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if owner and os.geteuid() == 0:
                os.fchown(f.fileno(), owner, -1)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CliError(f"cannot write {path}: {exc.strerror}") from None


@cli.command()
@click.argument("session", required=False)
@click.option("--all", "-a", "all_", is_flag=True, help="Save every session you may see (the default "
              "without SESSION; root: every user's).")
@click.option("--output", "-o", metavar="PATH",
              help="The file to write (one session), or a directory to write NAME.json in "
                   "[default: $TRACEWIRE_HOME/.tracewire/sessions, TRACEWIRE_HOME defaulting to $HOME].")
@click.option("--force", "-f", is_flag=True, help="Overwrite a file that exists.")
@click.pass_context
def save(ctx: click.Context, session: str | None, all_: bool, output: str | None, force: bool) -> None:
    """Save the definition of SESSION (without SESSION: of every session)
    to a file that 'tracewire load' and 'tracewire-sessiond --load DIR'
    read: its sink (the auth key by its file's path, never the secret),
    mode, channels with their options, enabled events, rotation schedule and
    whether it is started.  No trace data is saved.

    A sessiond killed with a relay session's packets still spooled resumes
    sending them when the session is loaded again (see docs/reliability.md).
    """
    if session and all_:
        raise click.UsageError("give SESSION or --all, not both")
    r = _client(ctx).request(ops.SaveRequest(session=session))
    saved = r["sessions"]
    target_dir = output if output is None or os.path.isdir(output) or len(saved) > 1 else None
    if output is None:
        target_dir = _saved_dir()
    if target_dir is not None:
        try:
            os.makedirs(target_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CliError(f"cannot create {target_dir}: {exc.strerror}") from None
    for s in saved:
        path = os.path.join(target_dir, f"{s['name']}.json") if target_dir is not None else str(output)
        owner = s.get("owner_uid")
        _write_saved(path, s["text"], force, owner if isinstance(owner, int) else None)
        mine = not owner or owner == os.geteuid()
        click.echo(f"Session {s['name']} saved to {path}" + ("" if mine else f" (owned by uid {owner}, whose "
                                                                            "session it is)"))


@cli.command()
@click.argument("path", required=False)
@click.option("--force", "-f", is_flag=True, help="Destroy a session of the same name first.")
@click.pass_context
def load(ctx: click.Context, path: str | None, force: bool) -> None:
    """Create the session(s) saved in PATH: a file written by 'tracewire
    save', or a directory (every *.json in it) [default: the directory
    'save' writes to].  A session saved started is started again.
    """
    from tracewire import saved as fmt

    path = path or _saved_dir()
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".json"))
        if not files:
            raise CliError(f"no saved session (*.json) in {path}")
    else:
        files = [path]
    texts = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = fh.read(fmt.MAX_FILE + 1)
            fmt.parse(data)
        except OSError as exc:
            raise CliError(f"cannot read {f}: {exc.strerror}") from None
        except fmt.SavedSessionError as exc:
            raise CliError(f"{f}: {exc}") from None
        texts.append((f, data.decode()))
    c = _client(ctx)
    c.ensure_daemon()
    for f, text in texts:
        r = c.request(ops.LoadRequest(text=text, force=force), timeout=None)
        words = f"Session {r['session']} loaded from {f} ({r['state']})"
        if r.get("resumed"):
            words += f"; resuming {r['resumed']['streams']} spooled streams"
        click.echo(words)
        if r.get("warning"):
            click.echo(f"Warning: {r['warning']}", err=True)


@cli.command()
@click.argument("path")
@click.option("--limit", "-n", type=click.IntRange(0), default=None, help="Print at most N events.")
@click.option("--follow", "-f", is_flag=True,
              help="PATH is a live session, net://RELAY[:6344]/host/HOST/SESSION: print its events as the "
                   "relay gets them, until the session is destroyed.")
def view(path: str, limit: int | None, follow: bool) -> None:
    """Print the events of the trace(s) under PATH, one per line.

    With --follow, PATH is a live session on a relay's live port.
    """
    from tracewire import ctf

    if follow:
        _follow(path, limit)
        return
    if not os.path.exists(path):
        raise click.BadParameter(f"{path!r} does not exist", param_hint="PATH")

    if os.path.isdir(path) and not any("metadata" in files for _, _, files in os.walk(path)):
        raise CliError(f"no CTF trace under {path} (no 'metadata' file found)")
    n = 0
    prev = None
    try:
        for item in ctf.read_trace(path):
            if limit is not None and n >= limit:
                break
            click.echo(ctf.format_event(item, prev))
            if isinstance(item, ctf.Event):
                prev = item
            n += 1
    except ctf.CTFError as exc:
        raise CliError(str(exc)) from None
    except BrokenPipeError:
        sys.stderr.close()
        return


class _Enough(Exception):
    """--limit reached."""


def _follow(url: str, limit: int | None) -> None:
    from tracewire import ctf
    from tracewire.follow import FollowError, follow, parse_live_url

    prev: list[ctf.Event | ctf.Discarded] = []
    n = 0

    def emit(item: ctf.Event | ctf.Discarded) -> None:
        nonlocal n
        if limit is not None and n >= limit:
            raise _Enough
        click.echo(ctf.format_event(item, prev[-1] if prev else None))
        if isinstance(item, ctf.Event):
            prev[:] = [item]
        n += 1

    try:
        follow(parse_live_url(url), emit)
    except _Enough:
        return
    except FollowError as exc:
        raise CliError(str(exc)) from None
    except BrokenPipeError:
        sys.stderr.close()


def main() -> None:
    """Entry point: every failure is one line on stderr and a non-zero exit."""
    try:
        code = cli.main(prog_name="tracewire", standalone_mode=False)
    except click.UsageError as exc:  # bad option, missing argument, bad value
        hint = f" (see 'tracewire {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else \
            " (see 'tracewire --help')"
        click.echo(f"Error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
