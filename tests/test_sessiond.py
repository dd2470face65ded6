"""sessiond's control socket against malformed requests: each gets a one-line
error, sessiond keeps serving, and a session then traces completely.  And the
stop barrier against a relay whose disk is full: a stop that times out says
what is still on the target, and a later stop runs the barrier again."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tracewire import ctf, wire

from conftest import TW, _alive, _children, _comm

MALFORMED: list[Any] = [
    {"cmd": "create", "name": "x", "output": "/tmp/x", "compress_level": "abc"},
    {"cmd": "create", "name": "x", "output": "/tmp/x", "spool_size": [1]},
    {"cmd": "create", "name": {"n": 1}},
    {"cmd": "enable_channel", "subbuf_size": "256k"},
    {"cmd": "enable_channel", "num_subbuf": None, "overwrite": "yes"},
    {"cmd": "status", "session": ["s"]},
    {"cmd": "list", "session": 7},
    {"cmd": "enable_event", "pattern": {"a": [1, [2, [3]]]}},
    {"cmd": "start", "session": "nope"},
    {"cmd": "__init__"},
    {"cmd": None},
    {"nested": [[[[[[[[[[{}]]]]]]]]]]},
]


def _ask(rundir: str, body: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(os.path.join(rundir, "control.sock"))
        s.sendall(struct.pack(">I", len(body)) + body)
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk = s.recv(65536)
            assert chunk, "sessiond closed the connection without answering"
            data += chunk
    return json.loads(data[4:])


def test_malformed_requests_get_one_line_errors_and_sessiond_survives(tw: TW, out_dir) -> None:
    tw.cli("create", "keep", "--output", str(out_dir))
    pid = tw.sessiond_pid()
    for req in MALFORMED:
        reply = _ask(tw.rundir, json.dumps(req).encode())
        assert reply["ok"] is False, req
        assert reply["error"] and "\n" not in reply["error"], reply
        assert "internal error" not in reply["error"], reply
    # Not JSON, or a JSON array: the connection is dropped, sessiond stays.
    for body in (b"\xff\xfe", b"[1, 2]"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(os.path.join(tw.rundir, "control.sock"))
            s.sendall(struct.pack(">I", len(body)) + body)
            assert s.recv(100) == b""
    assert tw.sessiond_pid() == pid and os.path.exists(f"/proc/{pid}")
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    tw.demo("--events", "1000")
    tw.cli("stop")
    events = [e for e in ctf.read_trace(str(out_dir)) if isinstance(e, ctf.Event)]
    assert len(events) == 1000


@pytest.mark.parametrize("field,value", [("compress_level", 0), ("spool_size", 1)])
def test_create_refuses_out_of_range_values(tw: TW, out_dir, field: str, value: int) -> None:
    tw.cli("create", "first", "--output", str(out_dir))
    reply = _ask(tw.rundir, json.dumps({"cmd": "create", "name": "x", "output": str(out_dir),
                                        field: value}).encode())
    assert reply["ok"] is False
    assert reply["error"].startswith("--")


class FullDiskRelay:
    """A relay on 127.0.0.1 (threads, blocking sockets, the real protocol
    through wire.Connection(Role.RELAY)) whose disk is full while ``full`` is
    set: it answers the next packet of every stream with Retry(NO_SPACE) and,
    as the protocol says, drops the stream's packets with another seq until
    that seq comes again.  Otherwise it keeps each packet (decoded) and its
    metadata in memory, and acks.  ``write_to`` puts what it kept on disk as
    a CTF trace.  With ``refuse`` (an Error), it answers the first packet with
it, and closes."""

    def __init__(self, refuse: wire.Error | None = None) -> None:
        self.full = True
        self.refuse = refuse
        self.lock = threading.Lock()
        self.streams: dict[tuple[str, str], list[bytes]] = {}  # (trace path, channel) -> packets
        self.metadata: dict[str, bytearray] = {}
        self.retries = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for c in self.conns:
                c.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = wire.Connection(wire.Role.RELAY)
        keys: dict[int, tuple[str, str]] = {}
        awaiting: dict[int, int] = {}
        try:
            while data := sock.recv(1 << 16):
                conn.receive_data(data)
                while (msg := conn.next_event()) is not None:
                    for reply in self._handle(msg, keys, awaiting):
                        sock.sendall(conn.send(reply))
                    if isinstance(msg, wire.Packet) and self.refuse is not None:
                        return
        except OSError:
            pass
        finally:
            sock.close()

    def _handle(self, msg: wire.Message, keys: dict[int, tuple[str, str]],
                awaiting: dict[int, int]) -> list[wire.Message]:
        with self.lock:
            match msg:
                case wire.Hello():
                    return [wire.Welcome(wire.PROTOCOL_VERSION, None)]
                case wire.Packet() if self.refuse is not None:
                    return [self.refuse]
                case wire.Metadata():
                    held = self.metadata.setdefault(msg.trace_path, bytearray())
                    held[msg.offset:msg.offset + len(msg.data)] = msg.data
                case wire.StreamDecl():
                    keys[msg.stream_id] = (msg.trace_path, msg.channel)
                    self.streams.setdefault(keys[msg.stream_id], [])
                case wire.StreamStateRequest():
                    return [wire.StreamState(msg.stream_id, len(self.streams[keys[msg.stream_id]]))]
                case wire.Packet():
                    if awaiting.get(msg.stream_id, msg.seq) != msg.seq:
                        return []  # in flight behind a Retry: dropped
                    kept = self.streams[keys[msg.stream_id]]
                    assert msg.seq <= len(kept), f"gap: seq {msg.seq} after {len(kept)}"
                    if msg.seq == len(kept) and self.full:
                        awaiting[msg.stream_id] = msg.seq
                        self.retries += 1
                        return [wire.Retry(msg.stream_id, msg.seq, wire.RetryReason.NO_SPACE,
                                           "No space left on device")]
                    awaiting.pop(msg.stream_id, None)
                    if msg.seq == len(kept):
                        kept.append(wire.decompress_packet(msg.data, msg.codec, msg.raw_len, 1 << 26))
                    return [wire.Ack(msg.stream_id, len(kept) - 1)]
            return []

    def write_to(self, root: Path) -> None:
        with self.lock:
            for (path, channel), packets in self.streams.items():
                (root / path).mkdir(parents=True, exist_ok=True)
                (root / path / "metadata").write_bytes(bytes(self.metadata[path]))
                (root / path / f"{channel}_0").write_bytes(b"".join(packets))


def _trace_into(tw: TW, relay: FullDiskRelay, events: int) -> None:
    """A session 's' into `relay` with a 1 MiB spool, and `events` demo
    events of 200 bytes (12,000: ~2.8 MiB, more than the spool and the ring)."""
    tw.env["TRACEWIRE_HOSTNAME"] = "fullhost"
    tw.cli("create", "s", "--url", f"tw://127.0.0.1:{relay.port}", "--compress", "none", "--spool-size", "1M")
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    tw.demo("--events", str(events), "--payload-bytes", "200")


_HELD = re.compile(r"relay full, retrying \(No space left on device\): (\d+) packets \(([\d.]+ \w+)\) "
                   r"held on the target(?:, (\d+) sub-buffers unread in the ring buffers)?")


def test_stop_while_the_relay_is_full_times_out_then_a_later_stop_completes(tw: TW, out_dir) -> None:
    """The relay's disk is full: status says so and counts what the target
    holds; 'stop --timeout' fails with one line giving the same counts (the
    spool is full, so part of it is still in the ring buffers); the session
    is stopped, and a second stop runs the barrier again (not 'not started').
    Once the disk has room, a stop returns 0 and the relay has every event
    once, or counted as discarded."""
    relay = FullDiskRelay()
    try:
        events = 12_000
        _trace_into(tw, relay, events)

        deadline = time.monotonic() + 60  # the relay's Retry has to come back first
        while not (held := _HELD.search(out := tw.cli("status").stdout)):
            assert time.monotonic() < deadline, out
            time.sleep(0.1)
        (unacked,) = [int(m) for m in re.findall(r"unacked (\d+)", out)]
        assert int(held[1]) == unacked > 0 and held[3] is not None and int(held[3]) > 0, out
        assert "relay full, retrying" in out.splitlines()[-1] and "ERROR" not in out, out

        r = tw.cli("stop", "--timeout", "1", check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        (line,) = r.stderr.splitlines()
        assert "has not acknowledged everything after 1 s (relay full, retrying (No space left on device))" in line
        assert f": {unacked} packets ({held[2]}) held on the target, {held[3]} sub-buffers unread" in line, line
        assert "[stopped] (stop incomplete)" in tw.cli("list").stdout
        assert "the last stop did not complete" in tw.cli("status").stdout

        r = tw.cli("stop", "--timeout", "0.5", check=False)  # the barrier again, not "not started"
        assert r.returncode == 1 and "has not acknowledged everything after 0.5 s" in r.stderr, r.stderr

        # While a stop waits for the relay, status and list answer at once
        # (they used to wait for the stop's turn: up to its timeout).
        stop = subprocess.Popen([sys.executable, "-m", "tracewire", "stop", "--timeout", "300"], env=tw.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        tw.procs.append(stop)
        deadline = time.monotonic() + 60
        while "[stopped] (stopping: waiting for the sink)" not in tw.cli("list", timeout=20).stdout:
            assert time.monotonic() < deadline and stop.poll() is None
            time.sleep(0.1)
        out = tw.cli("status", timeout=20).stdout
        assert _HELD.search(out) and "stopping: a stop is waiting for the sink" in out, out
        relay.full = False  # room on the relay's disk again
        out, err = stop.communicate(timeout=120)
        assert stop.returncode == 0, err
        assert out.startswith("Tracing stopped for session s:"), out
        out = tw.cli("status").stdout
        assert "relay" not in out.split("\n", 1)[1].replace(f"tw://127.0.0.1:{relay.port}", ""), out
        assert re.search(r"unacked 0, producer gone$", out, re.M), out
        assert "[stopped] ->" in tw.cli("list").stdout
        r = tw.cli("stop", check=False)
        assert r.returncode == 1 and "is not started" in r.stderr
    finally:
        relay.close()
    assert relay.retries >= 3
    relay.write_to(out_dir)
    seqs, discarded = [], 0
    for item in ctf.read_trace(str(out_dir)):
        if isinstance(item, ctf.Discarded):
            discarded += item.count
        else:
            seqs.append(item.fields["seq"])
    assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)
    assert len(seqs) + discarded == events and discarded > 0


def test_destroy_after_a_timed_out_stop_says_what_is_lost(tw: TW) -> None:
    """The relay stays full: after a stop that timed out, destroy succeeds
    but warns, with the counts status gave, that what the target still held
    is lost with the session."""
    relay = FullDiskRelay()
    try:
        _trace_into(tw, relay, 12_000)
        assert tw.cli("stop", "--timeout", "1", check=False).returncode == 1
        held = _HELD.search(out := tw.cli("status").stdout)
        assert held and held[3] is not None, out
        r = tw.cli("destroy")
        assert r.stdout.strip() == "Session s destroyed", r.stdout
        assert r.stderr.strip() == (
            f"Warning: destroyed with {held[1]} packets ({held[2]}) never acknowledged by the relay and "
            f"{held[3]} sub-buffers never read from the ring buffers: they are lost"), r.stderr
    finally:
        relay.close()


def test_a_relay_refusal_counts_what_is_lost(tw: TW) -> None:
    """A relay that refuses the session for good (an Error not in
    wire.TRANSIENT_ERRORS): status keeps counting what was left
    unacknowledged and unread, as lost, and stop says so too."""
    relay = FullDiskRelay(refuse=wire.Error(wire.ErrorCode.FORBIDDEN, "fullhost may not write here"))
    try:
        _trace_into(tw, relay, 12_000)
        lost = re.compile(r"LOST: (\d+) packets \(([\d.]+ \w+)\) left unacknowledged, (\d+) sub-buffers never "
                          r"read from the ring buffers; relay refused \(FORBIDDEN\): fullhost may not write here$",
                          re.M)
        deadline = time.monotonic() + 60
        while not (found := lost.search(out := tw.cli("status").stdout)):
            assert time.monotonic() < deadline, out
            time.sleep(0.1)
        (unacked,) = [int(m) for m in re.findall(r"unacked (\d+)", out)]
        assert int(found[1]) == unacked > 0 and int(found[3]) > 0, out
        assert "ERROR: relay: relay refused (FORBIDDEN)" in out, out
        r = tw.cli("stop", "--timeout", "30", check=False)
        assert r.returncode == 1, r.stderr
        assert f"relay refused (FORBIDDEN): fullhost may not write here; {unacked} packets ({found[2]}) " \
               "left unacknowledged are lost" in r.stderr, r.stderr
        assert lost.search(tw.cli("status").stdout)  # still counted after the stop
    finally:
        relay.close()


# ---------------------------------------------------------------- the zygote



def _fds(pid: int) -> dict[int, str]:
    """fd -> what it points at (readlink of /proc/PID/fd/N)."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:  # closed meanwhile
            pass
    return out


def _family(tw: TW, deadline: float, consumerds: int = 2) -> tuple[int, list[int], list[int]]:
    """sessiond, its zygotes and its consumerds (active and spare), once it
    has ``consumerds`` of them."""
    sd = tw.sessiond_pid()
    assert sd is not None
    while True:
        kids = [(c, _comm(c)) for c in _children(sd) if _alive(c)]
        zygotes = [c for c, name in kids if name == "tw-zygote"]
        consumers = [c for c, name in kids if name == "tw-consumerd"]
        if len(consumers) >= consumerds or time.monotonic() > deadline:
            return sd, zygotes, consumers
        time.sleep(0.02)


def test_a_forked_consumerd_holds_no_descriptor_of_sessiond_or_the_zygote(tw: TW, out_dir) -> None:
    """consumerds are forked (twice) from sessiond's zygote, which holds the
    socket on which sessiond asks for processes of any uid: no consumerd may
    keep it, nor any socket, lock or listening socket of sessiond.  What
    consumerd shares with sessiond is only what sessiond passed it on
    purpose (ring buffer memfds and eventfds)."""
    tw.cli("create", "s", "--output", str(out_dir))
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    sd, zygotes, consumers = _family(tw, time.monotonic() + 30)
    assert len(zygotes) == 1 and len(consumers) == 2, (zygotes, consumers)  # active + warm spare
    zygote_fds = _fds(zygotes[0])
    # The zygote: stdin/out/err and its socket to sessiond, nothing else.
    assert sorted(zygote_fds) == [0, 1, 2, *[fd for fd, t in zygote_fds.items() if fd > 2]]
    assert len([t for fd, t in zygote_fds.items() if fd > 2]) == 1
    assert all(t.startswith("socket:") for fd, t in zygote_fds.items() if fd > 2), zygote_fds
    theirs = {t for pid in (sd, zygotes[0]) for fd, t in _fds(pid).items() if t.startswith("socket:")}
    for c in consumers:
        mine = _fds(c)
        assert not {t for t in mine.values() if t.startswith("socket:")} & theirs, (mine, theirs)
        assert not [t for t in mine.values() if t.endswith(("sessiond.lock", "control.sock", "apps.sock"))], mine
        assert os.readlink(f"/proc/{c}/cwd") == "/"
    tw.demo("--events", "1000")
    tw.cli("stop")
    assert len([e for e in ctf.read_trace(str(out_dir)) if isinstance(e, ctf.Event)]) == 1000


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root sessiond may grant a real-time priority")
def test_root_sessions_consumerd_drains_at_real_time_priority(tw: TW, out_dir) -> None:
    """Root's consumerds (the active one and the warm spare) run SCHED_RR at
    --consumer-rt-priority (default 1), so that a busy machine cannot delay
    the drain until the ring buffers overflow."""
    tw.cli("create", "s", "--output", str(out_dir))
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    _sd, _zygotes, consumers = _family(tw, time.monotonic() + 30)
    assert len(consumers) == 2, consumers
    for c in consumers:
        assert os.sched_getscheduler(c) == os.SCHED_RR, c
        assert os.sched_getparam(c).sched_priority == 1, c


def test_a_dead_zygote_is_replaced_and_consumerd_still_restarts(tw: TW, out_dir) -> None:
    """The zygote SIGKILLed: sessiond reaps it and starts another (by exec)
    at once.  Then the active consumerd SIGKILLed: the warm spare takes
    over, the new zygote forks the next spare, and the session traces
    completely."""
    tw.cli("create", "s", "--output", str(out_dir))
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    tw.demo("--events", "500")
    _, zygotes, consumers = _family(tw, time.monotonic() + 30)
    assert len(zygotes) == 1 and len(consumers) == 2, (zygotes, consumers)
    os.kill(zygotes[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, new_zygotes, _ = _family(tw, deadline)
        if new_zygotes and zygotes[0] not in new_zygotes:
            break
        time.sleep(0.05)
    assert len(new_zygotes) == 1 and zygotes[0] not in new_zygotes, (new_zygotes, _log(tw)[-2000:])
    assert not os.path.exists(f"/proc/{zygotes[0]}")  # reaped, not left a zombie
    active = int(re.findall(r"consumerd for uid \d+ running \(pid (\d+)\)", _log(tw))[-1])
    os.kill(active, signal.SIGKILL)
    while time.monotonic() < deadline:
        _, _, new_consumers = _family(tw, deadline)
        if len(new_consumers) == 2 and active not in new_consumers:
            break
        time.sleep(0.05)
    assert len(new_consumers) == 2 and active not in new_consumers, (new_consumers, _log(tw)[-2000:])
    assert not os.path.exists(f"/proc/{active}")
    tw.demo("--events", "500")
    tw.cli("stop")
    assert len([e for e in ctf.read_trace(str(out_dir)) if isinstance(e, ctf.Event)]) == 1000


def _log(tw: TW) -> str:
    with open(os.path.join(tw.rundir, "sessiond.log"), errors="replace") as f:
        return f.read()


def _zygote_request(sock: socket.socket, msg: bytes, fds: list[int]) -> dict[str, Any]:
    sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else [])
    return json.loads(sock.recv(65536))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_the_zygote_refuses_bad_requests_and_reports_credentials_it_cannot_take() -> None:
    """A zygote (started by exec, as sessiond does after one dies) without
    the capabilities to change uid or groups: a request without exactly one
    descriptor or with malformed credentials gets an error and forks
    nothing; one for uid 1 forks a child that cannot take it, which says so
    and exits before running any consumerd code; the zygote goes on serving."""
    from sessiond.zygote import EXEC_ZYGOTE

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(30)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    no_setid = "-setuid,-setgid"
    proc = subprocess.Popen(["setpriv", "--bounding-set", no_setid, "--inh-caps", no_setid, "--",
                             sys.executable, "-c", EXEC_ZYGOTE, str(theirs.fileno()), "/tmp"],
                            pass_fds=(theirs.fileno(),), env=env, cwd="/", stdin=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    theirs.close()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        assert "error" in _zygote_request(ours, b'{"credentials": null}', [])
        assert "error" in _zygote_request(ours, b'{"credentials": null}', [b.fileno(), b.fileno()])
        for bad in (b'{"credentials": {"uid": -1, "gid": 0, "groups": []}}', b'{"credentials": [0]}',
                    b'{"credentials": {"uid": 0, "gid": 0, "groups": ["root"]}}', b"\xff", b"[]",
                    b'{"credentials": null, "rt_priority": 100}', b'{"credentials": null, "rt_priority": true}'):
            reply = _zygote_request(ours, bad, [b.fileno()])
            assert set(reply) == {"error"}, (bad, reply)  # nothing forked
        reply = _zygote_request(ours, b'{"credentials": {"uid": 1, "gid": 1, "groups": []}}', [b.fileno()])
        assert reply["pid"] > 0 and reply["error"].startswith("cannot take uid 1"), reply
        b.close()
        assert a.recv(100) == b""  # the child has gone, without a word on the control socket
        # Still serving: a consumerd with the zygote's own credentials answers on its socket.
        c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        reply = _zygote_request(ours, b'{"credentials": null, "rt_priority": 1}', [d.fileno()])
        d.close()
        assert set(reply) == {"pid"} and _comm(reply["pid"]) == "tw-consumerd", reply
        if os.geteuid() == 0:  # root may grant a real-time priority, and the zygote did
            assert os.sched_getscheduler(reply["pid"]) == os.SCHED_RR
            assert os.sched_getparam(reply["pid"]).sched_priority == 1
        c.close()  # consumerd exits when its control socket closes
    finally:
        a.close()
        ours.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0
