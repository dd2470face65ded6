#!/usr/bin/env python3
"""tracewire benchmarks: print one JSON line per figure,
``{"name": ..., "value": ..., "unit": ...}``.

Figures (the variant is in the name):

* ``tracer_enabled_ns_per_event_forked_consumer_payload{0,256}`` -- a generated
  emitter attached to a real ring buffer (256 KiB x 4) whose sub-buffers a
  *forked consumer process* announces and releases as consumerd would (without
  writing them anywhere), so that no lock or GIL is shared with the emitter.
  Best of N.  ``..._dropped`` says how many events the buffer had to drop.
* ``tracer_enabled_ns_per_event_real_daemons_payload{0,256}`` -- the same,
  measured by tracewire-demo itself (its "emitted N events in T s" line)
  while the real sessiond/consumerd write the trace to disk.  Best of N.
* ``tracer_disabled_ns_per_call_raw`` / ``..._net`` -- a disabled emitter
  (``tracepoint()`` with no sessiond), per call, before and after subtracting
  an empty ``for`` loop over the same range.  Best of N.
* ``local_pipeline_mb_per_s_payload{0,256}`` -- real daemons in a temporary
  run directory: raw stream bytes on disk (stream files, without metadata and
  index) / time from the app's start to ``tracewire stop`` returning, for
  1,000,000 demo:tick events.  Best of N.
* ``local_pipeline_events_lost_payload{0,256}`` -- emitted - read back with
  tracewire.ctf, the worst of the N runs (``..._discarded`` is the part of it
  the trace itself reports as discarded).
* ``relay_pipeline_mb_per_s_{zstd1,none}_payload256`` -- the same workload
  streamed through a tracewire-relayd on loopback (``tracewire create --url
  tw://127.0.0.1:PORT --compress zstd --compress-level 1`` or ``--compress
  none``): raw stream bytes the relay wrote / time from the app's start to
  ``tracewire stop`` returning.  Each run has its own relay, run directory and
  sessiond, all killed after it.  Best of N.
* ``relay_events_lost_{zstd1,none}_payload256`` -- emitted - read back
  (``babeltrace2 DIR | wc -l``, or tracewire.ctf without babeltrace2), the
  worst of the N runs; ``..._discarded`` is what ``tracewire status``
  reported as discarded in that run.
* ``relay_wire_to_raw_ratio_{zstd1,none}_payload256`` and
  ``..._zstd1_payload0`` -- bytes consumerd sent on the wire (frames included)
  / raw packet bytes, from consumerd's counters (``tracewire status``), summed
  over the N runs.
* ``consumerd_cpu_s_per_gb_{zstd1,none}`` / ``relayd_cpu_s_per_gb_{zstd1,none}``
  -- utime+stime (``/proc/PID/stat``) the active consumerd (a child of
  sessiond) / the relay spent between the app's start and the end of the run,
  per GB (1e9 bytes) of raw trace, from the payload-256 runs.  Their start-up
  and session set-up are left out.  Best of N.
* ``relay_fsync_mb_per_s_{fsync,nofsync}`` (and ``..._min``, ``..._max``) --
  the relay alone, ``tracewire-relayd --fsync`` against ``--no-fsync`` (the
  default ``--fsync-interval``, 0.1 s), writing under ``--fsync-dir``
  (/var/tmp: ext4 on the VM's virtio disk /dev/vda here, a real disk; not
  tmpfs, where fdatasync costs nothing; the file system is printed on
  stderr).  The load generator is this script: one connection,
  ``wire.Connection(Role.CONSUMER)`` on a blocking socket, 4 streams (one per
  channel) of real CTF packets of 256 KiB sent round-robin, uncompressed, as
  fast as the relay takes them with at most 32 MiB unacknowledged,
  ``--fsync-mb`` (400) MB per run.  Raw bytes acknowledged / time from the first packet sent to the last
  Ack.  N rounds, interleaved (fsync, nofsync, fsync, ...), each with its own
  relay and directory (removed, then ``sync``, after it); median over the
  rounds, and the min and max.  ``relay_fsync_mb_per_s_ratio``: fsync median
  / nofsync median.
* ``relayd_fsync_cpu_s_per_gb_{fsync,nofsync}`` (``..._min``, ``..._max``) --
  utime+stime of the relay over the same transfer, per GB; median, min, max.
* ``relay_fsync_ack_latency_ms_{p50,p99}_{fsync,nofsync}`` -- time from
  sending a packet to the Ack covering it, over all packets of a run; median
  of the rounds.  It includes the time the packet waits in the socket
  buffers and the relay's batch, so it grows with the window.
* ``relay_fsync_zstd1_...``, ``relayd_fsync_zstd1_...`` -- the same with every
  packet compressed with zstd level 1 beforehand (not timed): the relay
  decompresses.

Usage: ``python bench/run.py [--repeat N] [--events N] [--only PREFIX]
[--fsync-mb MB] [--fsync-dir DIR]``.  ``--only relay_fsync`` prints every
figure of that benchmark, ``relayd_fsync_*`` included.
The daemons it starts are killed (by pid) before it exits.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

BIN_DIR = os.path.dirname(sys.executable)


def emit(name: str, value: float, unit: str, digits: int = 3) -> None:
    print(json.dumps({"name": name, "value": round(value, digits), "unit": unit}), flush=True)


# ----------------------------------------------------------------- tracer, in process


def bench_enabled_forked_consumer(payload: int, events: int, repeat: int) -> None:
    from tracewire import _tracer
    from tracewire.ringbuf import BufferSpec, ConsumerCursor, Producer, create_buffer

    best = float("inf")
    dropped = 0
    for _ in range(repeat):
        spec = BufferSpec(256 * 1024, 4)
        fd = create_buffer(spec, time.monotonic_ns())
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        stop_r, stop_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the consumer: announce and release, as consumerd does
            code = 1
            try:
                os.close(stop_w)
                cur = ConsumerCursor(fd, spec)
                done = False
                while not done:
                    ready, _, _ = select.select([efd, stop_r], [], [], 1.0)
                    done = stop_r in ready
                    try:
                        cur.announce(os.eventfd_read(efd))
                    except BlockingIOError:
                        pass
                    while (ch := cur.next_chunk()) is not None:
                        del ch
                        cur.release()
                code = 0
            finally:
                os._exit(code)
        os.close(stop_r)
        prod = Producer(fd, efd, spec)
        stream = _tracer._StreamW("bench", prod)
        tp = _tracer.Tracepoint(None, 0, "bench:tick", [("seq", "int"), ("msg", "str")])
        tp.set_streams((stream,))
        tick = tp.emit
        msg = "x" * payload
        rng = range(events)
        t0 = time.perf_counter_ns()
        for i in rng:
            tick(i, msg)
        t1 = time.perf_counter_ns()
        tp.set_streams(())
        os.close(stop_w)
        os.waitpid(pid, 0)
        if (t1 - t0) / events < best:
            best = (t1 - t0) / events
            dropped = prod.discarded
        stream.mv = None
        prod.close()
        os.close(fd)
        os.close(efd)
    emit(f"tracer_enabled_ns_per_event_forked_consumer_payload{payload}", best, "ns/event")
    emit(f"tracer_enabled_ns_per_event_forked_consumer_payload{payload}_dropped", dropped, "events")


def bench_disabled(calls: int, repeat: int) -> None:
    rundir = tempfile.mkdtemp(prefix="twb", dir="/tmp")
    os.environ["TRACEWIRE_RUNDIR"] = rundir  # empty: no sessiond, the emitter stays disabled
    try:
        from tracewire import tracepoint

        tick = tracepoint("bench:off", seq=int, msg=str)
        msg = "x"
        rng = range(calls)
        best_loop = best_call = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            for _ in rng:
                pass
            t1 = time.perf_counter_ns()
            for i in rng:
                tick(i, msg)
            t2 = time.perf_counter_ns()
            best_loop = min(best_loop, (t1 - t0) / calls)
            best_call = min(best_call, (t2 - t1) / calls)
        emit("tracer_disabled_ns_per_call_raw", best_call, "ns/call")
        emit("tracer_disabled_ns_per_call_net", best_call - best_loop, "ns/call")
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


# ----------------------------------------------------------------- real daemons


class Daemons:
    """A sessiond (started by the CLI) in a private run directory."""

    def __init__(self) -> None:
        self.rundir = tempfile.mkdtemp(prefix="twb", dir="/tmp")
        self.env = dict(os.environ, TRACEWIRE_RUNDIR=self.rundir)
        self.env["PATH"] = BIN_DIR + os.pathsep + self.env.get("PATH", "")
        self.pids: set[int] = set()

    def cli(self, *args: str, timeout: float = 300) -> str:
        r = subprocess.run([sys.executable, "-m", "tracewire", *args], env=self.env, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        self._note()
        if r.returncode != 0:
            raise RuntimeError(f"tracewire {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def demo(self, *args: str) -> str:
        r = subprocess.run([os.path.join(BIN_DIR, "tracewire-demo"), *args], env=self.env,
                           capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"tracewire-demo: {r.stderr.strip()}")
        return r.stdout

    def _note(self) -> None:
        try:
            with open(os.path.join(self.rundir, "sessiond.pid")) as f:
                self.pids.add(int(f.read()))
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self._note()
        children = []
        for pid in self.pids:
            children += _children(pid)  # consumerd, and sessiond's warm spare
        for pid in self.pids:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in self.pids):
            time.sleep(0.05)
        for pid in list(self.pids) + children:
            if _alive(pid):
                _kill(pid, signal.SIGKILL)
        shutil.rmtree(self.rundir, ignore_errors=True)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stream_bytes(out: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(out):
        if os.path.basename(dirpath) == "index":
            continue
        for fn in files:
            if fn != "metadata":
                total += os.path.getsize(os.path.join(dirpath, fn))
    return total


def _read_back(out: str) -> tuple[int, int]:
    from tracewire import ctf

    events = discarded = 0
    for item in ctf.read_trace(out):
        if isinstance(item, ctf.Discarded):
            discarded += item.count
        else:
            events += 1
    return events, discarded


def bench_pipeline(payload: int, events: int, repeat: int) -> None:
    d = Daemons()
    outroot = tempfile.mkdtemp(prefix="twbo", dir="/tmp")
    try:
        best_mbps = 0.0
        best_emit = float("inf")
        worst_lost = 0
        worst_disc = 0
        for run in range(repeat):
            out = os.path.join(outroot, f"run{run}")
            name = f"bench{run}"
            d.cli("create", name, "--output", out)
            d.cli("enable-event", "demo:*", "-s", name)
            d.cli("start", name)
            t0 = time.perf_counter()
            text = d.demo("--events", str(events), "--payload-bytes", str(payload))
            d.cli("stop", name)
            t1 = time.perf_counter()
            raw = _stream_bytes(out)
            best_mbps = max(best_mbps, raw / 1e6 / (t1 - t0))
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 6 and parts[0] == "emitted" and parts[2] == "events":
                    best_emit = min(best_emit, float(parts[4]) * 1e9 / events)
            read, discarded = _read_back(out)
            if events - read >= worst_lost:
                worst_lost, worst_disc = events - read, discarded
            d.cli("destroy", name)
            shutil.rmtree(out, ignore_errors=True)
        emit(f"tracer_enabled_ns_per_event_real_daemons_payload{payload}", best_emit, "ns/event")
        emit(f"local_pipeline_mb_per_s_payload{payload}", best_mbps, "MB/s")
        emit(f"local_pipeline_events_lost_payload{payload}", worst_lost, "events")
        emit(f"local_pipeline_events_lost_payload{payload}_discarded", worst_disc, "events")
    finally:
        d.close()
        shutil.rmtree(outroot, ignore_errors=True)


# ----------------------------------------------------------------- streaming through a relay


def _cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The children of every thread of ``pid``."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _consumerd_pid(d: Daemons) -> int:
    """The consumerd serving d's sessions: the pid sessiond last logged as
    running it (sessiond may also keep a warm spare consumerd, idle), else
    its busiest child."""
    d._note()
    kids = [p for pid in d.pids for p in _children(pid)]
    if not kids:
        raise RuntimeError(f"no consumerd child of sessiond {sorted(d.pids)}")
    try:
        with open(os.path.join(d.rundir, "sessiond.log")) as f:
            logged = re.findall(r"consumerd for uid \d+ (?:running|started) \(pid (\d+)\)", f.read())
    except OSError:
        logged = []
    for pid in reversed([int(p) for p in logged]):
        if pid in kids:
            return pid
    return max(kids, key=_cpu_s)


class Relay:
    """A tracewire-relayd on loopback writing to its own directory."""

    def __init__(self, out: str, log: str, extra: tuple[str, ...] = ()) -> None:
        self.out = out
        self.proc = None
        env = dict(os.environ)
        env["PATH"] = BIN_DIR + os.pathsep + env.get("PATH", "")
        with open(log, "wb") as logf:
            self.proc = subprocess.Popen(
                [os.path.join(BIN_DIR, "tracewire-relayd"), "--output", out, "--listen", "127.0.0.1:0",
                 "--live-listen", "127.0.0.1:0", *extra],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf, env=env)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 15
        while True:
            with open(log, errors="replace") as f:
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", f.read())
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(log, errors="replace") as f:
                    tail = f.read().strip().splitlines()[-1:]
                self.close()
                raise RuntimeError(f"tracewire-relayd did not come up: {tail}")
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        _kill(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            _kill(self.pid, signal.SIGKILL)
            self.proc.wait()


def _count_events(out: str) -> int:
    """Events in the trace(s) under ``out``: ``babeltrace2 out | wc -l`` when
    babeltrace2 is installed (faster), else tracewire.ctf."""
    bt = shutil.which("babeltrace2")
    if bt is None:
        return _read_back(out)[0]
    proc = subprocess.Popen([bt, out], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    lines = 0
    while chunk := proc.stdout.read(1 << 20):
        lines += chunk.count(b"\n")
    if proc.wait() != 0:
        raise RuntimeError(f"babeltrace2 {out} exited with {proc.returncode}")
    return lines


def relay_run(tag: str, compress: str, payload: int, events: int, count: bool) -> dict:
    """One streaming run on loopback, each with its own relay, run directory
    and sessiond (all killed after)."""
    from tracewire.cli import Client
    from tracewire.ops import StatusRequest

    work = tempfile.mkdtemp(prefix="twbr", dir="/tmp")
    relay = d = None
    try:
        relay = Relay(os.path.join(work, "relay"), os.path.join(work, "relayd.log"))
        d = Daemons()
        level = ["--compress-level", "1"] if compress == "zstd" else []
        d.cli("create", tag, "--url", f"tw://127.0.0.1:{relay.port}", "--compress", compress, *level)
        d.cli("enable-event", "demo:*", "-s", tag)
        d.cli("start", tag)
        consumerd = _consumerd_pid(d)
        c0, r0 = _cpu_s(consumerd), _cpu_s(relay.pid)
        t0 = time.perf_counter()
        d.demo("--events", str(events), "--payload-bytes", str(payload))
        d.cli("stop", tag)
        t1 = time.perf_counter()
        r1 = _cpu_s(relay.pid)
        streams = Client(d.rundir).request(StatusRequest(session=tag))["streams"]
        res = {
            "seconds": t1 - t0,
            "raw": _stream_bytes(relay.out),  # what the relay wrote
            "sent_raw": sum(s["raw_bytes"] for s in streams),  # what consumerd sent, uncompressed
            "wire": sum(s["wire_bytes"] for s in streams),
            "discarded": sum(s["discarded"] for s in streams),
            "read": _count_events(relay.out) if count else None,
            "relayd_cpu": r1 - r0,
            "relayd_cpu_before": r0,  # start-up and session set-up, left out
            "consumerd_cpu_before": c0,
        }
        if consumerd != _consumerd_pid(d):
            raise RuntimeError("consumerd was replaced during the run")
        res["consumerd_cpu"] = _cpu_s(consumerd) - c0  # just before killing it
        return res
    finally:
        if d is not None:
            d.close()
        if relay is not None:
            relay.close()
        shutil.rmtree(work, ignore_errors=True)


def bench_relay(compress: str, payload: int, events: int, repeat: int, want) -> None:
    """Best of N for throughput and CPU/GB, worst of N for losses, all of N
    summed for the wire/raw ratio."""
    v = "zstd1" if compress == "zstd" else "none"
    names = {
        "mbps": f"relay_pipeline_mb_per_s_{v}_payload{payload}",
        "lost": f"relay_events_lost_{v}_payload{payload}",
        "disc": f"relay_events_lost_{v}_payload{payload}_discarded",
        "ratio": f"relay_wire_to_raw_ratio_{v}_payload{payload}",
        "ccpu": f"consumerd_cpu_s_per_gb_{v}",
        "rcpu": f"relayd_cpu_s_per_gb_{v}",
    }
    if payload != 256:  # only the wire ratio is asked of the other payloads
        names = {"ratio": names["ratio"]}
    names = {k: n for k, n in names.items() if want(n)}
    if not names:
        return
    count = "lost" in names or "disc" in names
    runs = [relay_run(f"bench{i}", compress, payload, events, count) for i in range(repeat)]
    for r in runs:
        if r["raw"] != r["sent_raw"]:
            print(f"bench: relay wrote {r['raw']} stream bytes, consumerd sent {r['sent_raw']}",
                  file=sys.stderr)
    worst = max(runs, key=lambda r: events - r["read"]) if count else None
    values = {
        "mbps": (max(r["raw"] / 1e6 / r["seconds"] for r in runs), "MB/s"),
        "lost": (events - worst["read"] if worst else 0, "events"),
        "disc": (worst["discarded"] if worst else 0, "events"),
        "ratio": (sum(r["wire"] for r in runs) / sum(r["sent_raw"] for r in runs), "wire/raw", 4),
        "ccpu": (min(r["consumerd_cpu"] / (r["raw"] / 1e9) for r in runs), "s/GB"),
        "rcpu": (min(r["relayd_cpu"] / (r["raw"] / 1e9) for r in runs), "s/GB"),
    }
    for key, name in names.items():
        emit(name, *values[key])


# ----------------------------------------------------------------- the relay alone: --fsync against --no-fsync

FSYNC_PACKET = 256 * 1024  # bytes per packet: a realistic sub-buffer
FSYNC_STREAMS = 4  # streams on the one connection, packets sent round-robin
FSYNC_WINDOW = 32 * 1024 * 1024  # unacknowledged raw bytes allowed, as a consumer's window
FSYNC_CREATED = "20261201T000000"
FSYNC_T0 = 1 << 40  # packet n of each stream starts at FSYNC_T0 + n * 2**27 ns (see _FsyncTrace)


def _fs_type(path: str) -> str:
    """The file system holding ``path``, as ``TYPE (SOURCE on MOUNT POINT)``,
    from /proc/self/mountinfo (the longest mount point above it)."""
    real = os.path.realpath(path)
    best = ("", "?", "?")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mnt = left.split()[4]
            fstype, source = right.split()[:2]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, source)
    return f"{best[1]} ({best[2]} on {best[0]})"


class _FsyncTrace:
    """One trace whose FSYNC_STREAMS streams, one per channel as consumerd
    writes them (channel0_0, channel1_0, ...; the CTF stream class is the
    channel's position, stream_instance_id 0), all carry the same packet
    body: demo:tick events (id 0 in every stream class) with a 256-byte payload
    (the last one longer) filling the packet exactly.  Packet n of a stream
    spans [FSYNC_T0 + n * 2**27, FSYNC_T0 + (n + 1) * 2**27) ns: every
    packet then begins at a multiple of 2**27, so the events' compact
    timestamps (their low 27 bits) in the shared body are right in each.
    Only the 84-byte header is packed per packet (its packet_seq_num and
    timestamps must agree with the Packet message)."""

    def __init__(self, packet_bytes: int) -> None:
        from tracewire import ctf
        from tracewire.ctf import EventDecl, TraceInfo

        self.uuid = uuid.uuid4().bytes
        fields = (("seq", ctf.FieldType.INT), ("msg", ctf.FieldType.STR))
        self.channels = tuple(f"channel{s}" for s in range(FSYNC_STREAMS))
        info = TraceInfo(self.uuid, "bench", "fsync", FSYNC_CREATED, "bench", 4242, 1_700_000_000_000_000_000,
                         self.channels)
        self.metadata = (ctf.metadata_preamble(info) + "".join(
            ctf.metadata_event(EventDecl("demo:tick", 0, fields, stream_id=s)) for s in range(FSYNC_STREAMS)
        )).encode()
        self.trace_path = f"ust/pid/bench-4242-{FSYNC_CREATED}"
        self.content = packet_bytes - ctf.PACKET_HEADER_SIZE
        overhead = len(ctf.encode_event(0, 0, 0, [0, ""], fields))  # compact header, int64, NUL
        body = bytearray()
        i = 0
        while len(body) < self.content:
            left = self.content - len(body)
            pad = 256 if left >= 2 * (overhead + 256) else left - overhead  # the last event takes the rest
            body += ctf.encode_event(0, 10 * i, 10 * max(i - 1, 0), [i, "x" * pad], fields)
            i += 1
        assert len(body) == self.content
        self.body = bytes(body)

    def header(self, stream: int, n: int) -> tuple[bytes, int, int]:
        """Packet n of a stream: its header, timestamp_begin and timestamp_end."""
        from tracewire import ctf

        ts_begin = FSYNC_T0 + (n << 27)
        ts_end = ts_begin + (1 << 27) - 1
        return ctf.pack_packet_header(self.uuid, stream, 0, ts_begin, ts_end, self.content, n, 0), ts_begin, ts_end


class _FsyncClient:
    """A consumer on a plain blocking socket, built on wire.Connection(Role.CONSUMER)."""

    def __init__(self, port: int) -> None:
        from tracewire.wire import Connection, Role

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.settimeout(None)  # blocking; waits for the relay go through select() below
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = Connection(Role.CONSUMER)

    def send(self, msg) -> None:
        """Sends one frame (header and payload with one sendmsg when it all fits)."""
        views = [memoryview(p).cast("B") for p in self.conn.send_parts(msg)]
        while views:
            n = self.sock.sendmsg(views)
            while n:
                if n >= len(views[0]):
                    n -= len(views.pop(0))
                else:
                    views[0] = views[0][n:]
                    n = 0
            while views and not len(views[0]):
                views.pop(0)

    def receive(self, timeout: float) -> list:
        """The messages the relay sent, waiting up to ``timeout`` seconds for
        the first byte (0: only what is already there)."""
        events = []
        while (ev := self.conn.next_event()) is not None:
            events.append(ev)
        if events:
            return events
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if ready:
            self.conn.receive_data(self.sock.recv(1 << 16))
            while (ev := self.conn.next_event()) is not None:
                events.append(ev)
        return events

    def expect(self, cls: type):
        """The relay's next message, which must be a ``cls``."""
        if not (events := self.receive(30)):
            raise RuntimeError(f"no answer from the relay in 30 s (waiting for {cls.__name__})")
        if len(events) != 1 or not isinstance(events[0], cls):
            raise RuntimeError(f"relay answered {events!r}, expected {cls.__name__}")
        return events[0]

    def close(self) -> None:
        self.sock.close()


def _fsync_transfer(relay: Relay, trace: _FsyncTrace, packets: int, zstd: bool) -> dict:
    """Streams ``packets`` packets per connection round-robin over
    FSYNC_STREAMS streams, as fast as the relay acknowledges them with at
    most FSYNC_WINDOW raw bytes unacknowledged, until all are acknowledged."""
    from tracewire import wire
    from tracewire.wire import Ack, Codec, Hello, Metadata, Packet, SessionDecl, StreamDecl, StreamState, Welcome

    size = FSYNC_PACKET
    # zstd: every packet compressed before the clock starts (the consumer's
    # cost is not the relay's), only the relay's decompression is measured.
    compressed: list[bytes] = []
    if zstd:
        comp = wire.new_compressor(1)
        compressed = [comp.compress(trace.header(i % FSYNC_STREAMS, i // FSYNC_STREAMS)[0] + trace.body)
                      for i in range(packets)]
    raw = bytearray(size)  # packet i's bytes; only the header changes between packets
    raw[size - trace.content:] = trace.body
    c = _FsyncClient(relay.port)
    try:
        c.send(Hello(wire.PROTOCOL_VERSION, "bench"))
        c.expect(Welcome)
        c.send(SessionDecl(1, "fsync", FSYNC_CREATED, False))
        c.send(Metadata(1, trace.trace_path, 0, trace.metadata))
        for s in range(FSYNC_STREAMS):
            c.send(StreamDecl(s + 1, 1, trace.trace_path, trace.channels[s], 0))
        # The relay answers in order: once this is answered, every stream file exists.
        c.send(wire.StreamStateRequest(FSYNC_STREAMS))
        c.expect(StreamState)

        inflight: list[collections.deque[tuple[int, float]]] = [collections.deque() for _ in range(FSYNC_STREAMS)]
        latencies: list[float] = []  # seconds from sending a packet to the Ack covering it
        sent = acked = 0  # packets

        def handle(events: list) -> None:
            nonlocal acked
            now = time.perf_counter()
            for ev in events:
                if not isinstance(ev, Ack):  # a Retry (disk full...), an Error, the relay gone
                    raise RuntimeError(f"relay sent {ev!r} during the transfer")
                q = inflight[ev.stream_id - 1]
                while q and q[0][0] <= ev.seq:
                    latencies.append(now - q.popleft()[1])
                    acked += 1

        cpu0 = _cpu_s(relay.pid)
        t0 = time.perf_counter()
        while acked < packets:
            while sent < packets and (sent - acked + 1) * size <= FSYNC_WINDOW:
                stream, n = sent % FSYNC_STREAMS, sent // FSYNC_STREAMS
                header, ts_begin, ts_end = trace.header(stream, n)
                if zstd:
                    codec, data = Codec.ZSTD, compressed[sent]
                else:
                    raw[:len(header)] = header
                    codec, data = Codec.NONE, raw
                msg = Packet(stream + 1, n, codec, size, ts_begin, ts_end, 0, size * 8, size * 8, n, data)
                inflight[stream].append((n, time.perf_counter()))
                c.send(msg)
                sent += 1
                handle(c.receive(0))
            if acked < packets:
                events = c.receive(60)
                if not events:
                    raise RuntimeError(f"no Ack from the relay for 60 s ({acked} of {packets} packets acked)")
                handle(events)
        t1 = time.perf_counter()
        cpu1 = _cpu_s(relay.pid)
    finally:
        c.close()
    latencies.sort()
    nbytes = packets * size
    return {
        "bytes": nbytes,
        "on_disk": _stream_bytes(relay.out),
        "mbps": nbytes / 1e6 / (t1 - t0),
        "cpu": (cpu1 - cpu0) / (nbytes / 1e9),
        "p50": latencies[len(latencies) // 2] * 1e3,
        "p99": latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)] * 1e3,
    }


def fsync_run(fsync: bool, zstd: bool, packets: int, root: str) -> dict:
    """One transfer to a fresh relay (``--fsync`` or ``--no-fsync``) writing
    to a fresh directory under ``root``; the relay is killed and the
    directory removed after it."""
    work = tempfile.mkdtemp(prefix="twbf", dir=root)
    log = os.path.join(work, "relayd.log")
    relay = None
    try:
        relay = Relay(os.path.join(work, "relay"), log,
                      ("--fsync" if fsync else "--no-fsync", "--log-level", "WARNING"))
        return _fsync_transfer(relay, _FsyncTrace(FSYNC_PACKET), packets, zstd)
    except Exception:
        with open(log, errors="replace") as f:
            print("bench: relayd.log:", *f.read().strip().splitlines()[-5:], sep="\n  ", file=sys.stderr)
        raise
    finally:
        if relay is not None:
            relay.close()
        shutil.rmtree(work, ignore_errors=True)
        os.sync()  # so that nothing of this run is still being written back during the next


def bench_relay_fsync(megabytes: int, root: str, repeat: int, want, everything: bool) -> None:
    """--fsync against --no-fsync, rounds interleaved (fsync, nofsync, fsync,
    ...): median, min and max over the rounds."""
    packets = max(FSYNC_STREAMS, megabytes * 1_000_000 // FSYNC_PACKET)
    variants = [("", False), ("_zstd1", True)]
    modes = [("fsync", True), ("nofsync", False)]
    figures = {}  # name -> (variant suffix, mode, key, statistic, unit)
    for v, _ in variants:
        for m, _ in modes:
            for stat in ("", "_min", "_max"):
                figures[f"relay_fsync{v}_mb_per_s_{m}{stat}"] = (v, m, "mbps", stat, "MB/s")
            for stat in ("", "_min", "_max"):
                figures[f"relayd_fsync{v}_cpu_s_per_gb_{m}{stat}"] = (v, m, "cpu", stat, "s/GB")
            figures[f"relay_fsync{v}_ack_latency_ms_p50_{m}"] = (v, m, "p50", "", "ms")
            figures[f"relay_fsync{v}_ack_latency_ms_p99_{m}"] = (v, m, "p99", "", "ms")
        figures[f"relay_fsync{v}_mb_per_s_ratio"] = (v, "", "ratio", "", "fsync/nofsync")
    figures = {n: f for n, f in figures.items() if everything or want(n)}
    variants = [(v, z) for v, z in variants if any(f[0] == v for f in figures.values())]
    if not variants:
        return
    os.makedirs(root, exist_ok=True)
    fs = _fs_type(root)
    print(f"bench: relay_fsync writes under {root}: {fs}", file=sys.stderr)
    if fs.startswith(("tmpfs", "ramfs")):
        print("bench: warning: fdatasync costs nothing on tmpfs; use --fsync-dir on a real disk", file=sys.stderr)
    for v, zstd in variants:
        runs: dict[str, list[dict]] = {m: [] for m, _ in modes}
        for r in range(repeat):
            for m, fsync in modes:
                res = fsync_run(fsync, zstd, packets, root)
                if res["on_disk"] != res["bytes"]:
                    print(f"bench: relay wrote {res['on_disk']} stream bytes, {res['bytes']} were acked",
                          file=sys.stderr)
                print(f"bench: relay_fsync{v} round {r + 1}/{repeat} {m}: {res['mbps']:.1f} MB/s, "
                      f"relayd {res['cpu']:.2f} CPU s/GB, ack p50 {res['p50']:.1f} ms, p99 {res['p99']:.1f} ms",
                      file=sys.stderr, flush=True)
                runs[m].append(res)
        for name, (fv, m, key, stat, unit) in figures.items():
            if fv != v:
                continue
            if key == "ratio":
                value = statistics.median(r["mbps"] for r in runs["fsync"]) / \
                    statistics.median(r["mbps"] for r in runs["nofsync"])
                emit(name, value, unit, 4)
                continue
            values = [r[key] for r in runs[m]]
            emit(name, {"": statistics.median, "_min": min, "_max": max}[stat](values), unit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    ap.add_argument("--events", type=int, default=1_000_000, help="events per pipeline run")
    ap.add_argument("--tracer-events", type=int, default=300_000, help="events per in-process run")
    ap.add_argument("--only", default="", help="run only figures whose name starts with this")
    ap.add_argument("--fsync-mb", type=int, default=400,
                    help="relay_fsync: MB (10^6 bytes) of packets per run (default 400)")
    ap.add_argument("--fsync-dir", default="/var/tmp",
                    help="relay_fsync: the relay writes under this directory; a real disk, not tmpfs "
                         "(default /var/tmp)")
    a = ap.parse_args()

    def want(prefix: str) -> bool:
        return not a.only or prefix.startswith(a.only) or a.only.startswith(prefix)

    if want("tracer_disabled"):
        bench_disabled(1_000_000, max(a.repeat, 5))
    for payload in (0, 256):
        if want("tracer_enabled"):
            bench_enabled_forked_consumer(payload, a.tracer_events, a.repeat)
    for payload in (0, 256):
        if want("local_pipeline") or want("tracer_enabled_ns_per_event_real"):
            bench_pipeline(payload, a.events, a.repeat)
    for compress in ("zstd", "none"):
        bench_relay(compress, 256, a.events, a.repeat, want)
    bench_relay("zstd", 0, a.events, a.repeat, want)
    # --only relay_fsync (or a shorter prefix of it) prints all of its
    # figures, relayd_fsync_cpu_* included.
    bench_relay_fsync(a.fsync_mb, a.fsync_dir, a.repeat, want, "relay_fsync".startswith(a.only))


if __name__ == "__main__":
    main()
