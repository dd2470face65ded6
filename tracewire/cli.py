"""``tracewire``: the control CLI (lttng's verbs).

Each command sends one JSON request to sessiond's ``control.sock`` in the run
directory and prints the answer.  ``create`` starts a sessiond when none
answers.  Every failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
import socket
import subprocess
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
                [sys.executable, "-m", "sessiond", "--rundir", self.rundir],
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
@click.pass_context
def enable_event(ctx: click.Context, pattern: str, session: str | None, channel: str | None) -> None:
    """Record events whose name matches PATTERN ('demo:*', '*')."""
    r = _client(ctx).request(_make(ops.EnableEventRequest, session=session, channel=channel,
                                   pattern=pattern))
    click.echo(f"Events {r['pattern']!r} enabled in channel {r['channel']} of session {r['session']}")


@cli.command()
@click.argument("session", required=False)
@click.pass_context
def start(ctx: click.Context, session: str | None) -> None:
    """Start recording in SESSION (default: the current one)."""
    r = _client(ctx).request(ops.StartRequest(session=session))
    click.echo(f"Tracing started for session {r['session']}")


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


@cli.command("list")
@click.argument("session", required=False)
@click.pass_context
def list_(ctx: click.Context, session: str | None) -> None:
    """List sessions, or one session's channels and events."""
    r = _client(ctx).request(ops.ListRequest(session=session))
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
                for ev in ch["events"]:
                    click.echo(f"    event {ev}")


@cli.command()
@click.argument("session", required=False)
@click.pass_context
def status(ctx: click.Context, session: str | None) -> None:
    """Per stream: packets, bytes raw / on the wire, discarded, unacknowledged."""
    r = _client(ctx).request(ops.StatusRequest(session=session))
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
    streams = r["streams"]
    if not streams:
        click.echo("  no streams yet (no traced app has emitted an enabled event)")
    for line in _relay_summary(streams):
        click.echo(f"  {line}")
    for st in streams:
        ratio = st["raw_bytes"] / st["wire_bytes"] if st.get("wire_bytes") else 1.0
        line = (f"  {st['path']}: {st['packets']} packets, raw {ops.human_size(st['raw_bytes'])}, "
                f"wire {ops.human_size(st['wire_bytes'])} (x{ratio:.2f}), discarded {st['discarded']}, "
                f"unacked {st['unacked']}, producer {st['producer']}")
        if st.get("error"):
            line += f", ERROR: {st['error']}"
        elif st.get("relay"):
            line += f", {_relay_words(st['relay'], None)}"
        click.echo(line)


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
