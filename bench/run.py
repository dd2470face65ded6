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

Usage: ``python bench/run.py [--repeat N] [--events N] [--only PREFIX]``.
The daemons it starts are killed (by pid) before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

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

    def __init__(self, out: str, log: str) -> None:
        self.out = out
        self.proc = None
        env = dict(os.environ)
        env["PATH"] = BIN_DIR + os.pathsep + env.get("PATH", "")
        with open(log, "wb") as logf:
            self.proc = subprocess.Popen(
                [os.path.join(BIN_DIR, "tracewire-relayd"), "--output", out, "--listen", "127.0.0.1:0",
                 "--live-listen", "127.0.0.1:0"],
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    ap.add_argument("--events", type=int, default=1_000_000, help="events per pipeline run")
    ap.add_argument("--tracer-events", type=int, default=300_000, help="events per in-process run")
    ap.add_argument("--only", default="", help="run only figures whose name starts with this")
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


if __name__ == "__main__":
    main()
