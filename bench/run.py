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
* ``tracer_enabled_ns_per_event_overwrite_payload{0,256}`` -- the same
  emitter into an overwrite ring (256 KiB x 4, ``BufferSpec(..., True)``)
  that nothing consumes: it laps the ring for ever.
  ``tracer_overwrite_to_discard_ratio_payload{0,256}`` (``..._min``,
  ``..._max``): overwrite / forked-consumer discard, rounds interleaved,
  median over ``--repeat`` rounds (issue 12's target: no more than 1).
* ``snapshot_record_ms`` (``..._min``, ``..._max``) -- ``tracewire snapshot
  record`` (the CLI, start to exit, its own start-up included) of a snapshot
  session with one 32 MiB flight recorder (``--subbuf-size 1M --num-subbuf
  32``, overwrite) while tracewire-demo writes 256-byte events into it at
  full speed, output on /dev/shm; 5 records per round once the ring is full,
  ``--repeat`` rounds, each with its own sessiond; median, min, max.
  ``snapshot_record_mib``: what one record wrote (median);
  ``snapshot_record_torn_subbufs``: sub-buffers the app overwrote while they
  were copied (left out), summed over every record.
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
* ``daemon_pss_mb_idle_{sessiond,zygote,consumerd,spare,total}`` (and
  ``..._min``, ``..._max``) -- /proc/PID/smaps_rollup Pss of each target
  daemon, and of all of them, with a local session started and idle (1 s
  after ``start``, every daemon up): sessiond, the consumerd zygote (the
  child named ``tw-zygote``), the active consumerd (named in sessiond.log),
  the warm spare.  Own sessiond per round (on /dev/shm), ``--repeat``
  rounds, median, min, max.
* ``relay_fsync_mb_per_s_{fsync,nofsync}`` (and ``..._min``, ``..._max``) --
  the relay alone, ``tracewire-relayd --fsync`` against ``--no-fsync`` (the
  default ``--fsync-interval``, 0.1 s at most), writing under ``--fsync-dir``
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
* ``blocking_{events_lost,mb_per_s,app_s,consumerd_cpu_s_per_gb}_<side>``
  (and ``..._min``, ``..._max``) -- issue 11's lossless check: ``--events``
  demo:tick events (256-byte payload) at full speed into a tiny ring
  (``enable-channel c --subbuf-size 4k --num-subbuf 2``) streamed through a
  tracewire-relayd on loopback (zstd level 1), with ``--blocking-timeout
  inf`` (side ``inf``: the app waits for room) and without (``discard``, the
  default, for comparison); sides ``inf_default_ring`` and
  ``discard_default_ring``: the same with the default ring, 4 x 256 KiB.  ``events_lost``: emitted - ``babeltrace2``
  lines (0 expected for ``inf``); ``mb_per_s``: raw bytes the relay wrote /
  time from the app's start to ``tracewire stop`` returning; ``app_s``: the
  app's own "emitted N events in T s" (how much the waits slowed it);
  ``consumerd_cpu_s_per_gb``: utime+stime of the active consumerd over the
  run, per GB of raw trace.  Each run has its own relay, run directory and
  sessiond; rounds interleaved (the four sides, then again), ``--repeat``
  rounds; median, min, max.

* ``fanin_*`` -- one tracewire-relayd (its defaults: ``--fsync``) on loopback
  and ``--fanin-targets`` (64) targets, each its own run directory with its
  own sessiond and consumerd (``--compress none``), all streaming a
  tracewire-demo run at once (``--fanin-events`` (10,000) demo:tick events,
  256-byte payload, 2,000 events/s, ``TRACEWIRE_REGISTER_TIMEOUT=120``);
  then every trace is read back with tracewire.ctf.  One run, on tmpfs
  (/dev/shm).  ``fanin_traces_complete``: traces holding every seq
  0..N-1 exactly once (of 64); ``fanin_events_discarded``: what the traces
  report as discarded; ``fanin_connections``: connections the relay
  welcomed (64 unless a consumer reconnected); ``fanin_relayd_rss_idle_mib``
  / ``..._peak_mib``: the relay's RSS (smaps_rollup) once listening, and
  its peak over the run sampled every 0.25 s, in MiB;
  ``fanin_relayd_rss_mib_per_connection``: (peak - idle) / connections;
  ``fanin_relayd_cpu_s_per_gb``: the relay's utime+stime from just before
  the apps start to every ``stop`` having returned, per GB of stream files
  written; ``fanin_seconds``: that time.  Measured 2026-12-02 (load average
  3-8 from other jobs, two rounds): 64 of 64 complete, 0 discarded, 31 MiB
  idle, 49-59 MiB peak, 0.28-0.44 MiB per connection (main: 0.15-0.16),
  6.1-6.7 s/GB (main: 6.6-7.1), 11-12 s of streaming after 26-29 s of
  setting up the 64 targets.
* ``vs_lttng_<figure>_<side>`` (and ``..._min``, ``..._max``) -- side by side
  with LTTng 2.13 (Debian's lttng-tools, liblttng-ust): the same workload
  (``--events`` demo:tick events, int64 seq and a 256-byte string) streamed
  through each tool's relay on loopback, every output, run directory and
  spool on tmpfs (/dev/shm).  Sides: ``lttng`` (LTTng's default channel:
  discard mode, per-user buffers, 4 x 512 KiB per CPU), ``lttng_blocking``
  (``enable-channel -u --blocking-timeout=inf``, the app run with
  LTTNG_UST_ALLOW_BLOCKING=1), ``tracewire_none`` and ``tracewire_zstd1``
  (relay_run(), ``--compress none`` / zstd level 1).  The LTTng app is
  bench/lttng_app/app.c (a C app, compiled with gcc at bench time), the
  tracewire app tracewire-demo (Python).  Rounds interleaved (lttng,
  tracewire_none, lttng_blocking, tracewire_zstd1, then again), each with its
  own daemons, ``--repeat`` rounds; median, min, max over the rounds.
  ``vs_lttng_<figure>_ratio_{none,zstd1}``: tracewire median / LTTng default
  median (not emitted when LTTng's is 0).  Figures:
  ``zstd_own_cpu_s_per_gb`` and ``consumerd_cpu_beyond_zstd_s_per_gb``
  (tracewire_zstd1 only: the CPU zstd alone takes, in the bench process, to
  compress the packets the relay wrote, one at a time at level 1 as
  consumerd does, and consumerd's CPU minus that; their ``_ratio_zstd1`` is
  against LTTng's consumer: issue 11 asks consumerd's CPU with zstd to be at
  most zstd's own plus twice LTTng's consumer, i.e. the ratio of the second
  at most 2), ``consumerd_cpu_s_per_gb`` (utime+stime of the 64-bit UST lttng-consumerd
  and its children from ``lttng start`` to after ``lttng destroy``, or of
  tracewire's active consumerd as in ``consumerd_cpu_s_per_gb_*``, per GB of
  raw trace the relay wrote), ``relayd_cpu_s_per_gb`` (the relay from just
  before the app to ``stop`` returning), ``daemons_pss_mb`` /
  ``daemons_rss_mb`` (peak over the run, sampled every 0.25 s, of the summed
  /proc/PID/smaps_rollup Pss / Rss of the session daemon and every process
  under it: its consumer daemons, LTTng's run-as helpers, tracewire's warm
  spare consumerd), ``events_lost`` (emitted - ``babeltrace2`` lines),
  ``events_lost_discarded`` (the sum of babeltrace2's "Tracer discarded N
  events" warnings), ``stop_s`` (``lttng stop`` / ``tracewire stop``, which
  both wait until the relay has everything), ``mb_per_s`` (raw bytes / time
  from the app's start to ``stop`` returning).  LTTng's daemons, CLI and app
  run as ``nobody`` with a private LTTNG_HOME when the bench runs as root (a
  root lttng-sessiond would use /var/run/lttng); as root the script installs
  lttng-tools, liblttng-ust-dev, python3-lttngust, gcc, libc6-dev and
  babeltrace2 with apt-get if missing; otherwise these figures are skipped
  with one line on stderr.
* ``python_tracer_ns_per_event_{lttng,tracewire}`` -- CPU ns per call (the
  process's CPU time over the timed loop, ``time.process_time_ns``: on this
  shared 2-core VM wall time could not tell a 25 % change apart), with a
  session enabling the event (a local trace on tmpfs): LTTng's Python agent
  (python3-lttngust under Debian's /usr/bin/python3, ``lttng enable-event
  --python bench``) for ``logger.info('request %d %s', i, 'path')``, against
  a tracewire tracepoint doing the same work (``log(seq=i, msg='request %d
  %s' % (i, 'path'))``) under the same /usr/bin/python3, the tree on
  PYTHONPATH.  ``..._ratio``: tracewire / LTTng.  ``..._tracewire_venv``: the
  tracewire loop under the venv's interpreter; ``..._logging_no_handler``:
  the same ``logger.info`` with no handler at all (what ``logging`` itself
  costs).  ``--python-calls`` (200,000) timed calls per round after 1,000
  untimed, ``--repeat`` rounds interleaved, median.

* ``logging_bridge_ns_per_record``, ``lttng_python_agent_ns_per_record``,
  ``logging_nullhandler_ns_per_record`` -- CPU ns per
  ``logger.info('request %d %s', i, 'path')`` under Debian's /usr/bin/python3,
  from one run, rounds interleaved: through ``tracewire.logging.install()``
  with a session enabling ``python:bench``, through LTTng's Python agent
  (``lttng enable-event --python bench``), into a ``logging.NullHandler``
  (the root logger at NOTSET in all three).
  ``logging_bridge_disabled_ns_per_record``: the bridge with a sessiond whose
  session does not enable the event; ``logging_bridge_ratio``: bridge / agent.
  Medians; the spread (min-max) of each is printed on stderr.

Usage: ``python bench/run.py [--repeat N] [--events N] [--only PREFIX]
[--fsync-mb MB] [--fsync-dir DIR] [--fanin-targets N] [--fanin-events N]
[--python-calls N]``.  ``--only
relay_fsync`` prints every figure of that benchmark, ``relayd_fsync_*``
included; ``--only vs_lttng`` every ``vs_lttng_*`` and ``python_tracer_*``
figure; ``--only blocking`` every ``blocking_*`` figure.  The daemons it starts are killed (by pid) before it exits.
"""

from __future__ import annotations

import argparse
import collections
import functools
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


def bench_enabled_forked_consumer(payload: int, events: int, repeat: int) -> float:
    """The discard-mode figure; returns it."""
    return _bench_enabled(payload, events, repeat, overwrite=False)


def _bench_enabled(payload: int, events: int, repeat: int, overwrite: bool) -> float:
    from tracewire import _tracer
    from tracewire.ringbuf import BufferSpec, ConsumerCursor, Producer, create_buffer

    best = float("inf")
    dropped = 0
    for _ in range(repeat):
        spec = BufferSpec(256 * 1024, 4, overwrite)
        fd = create_buffer(spec, time.monotonic_ns())
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        stop_r, stop_w = os.pipe()
        pid = os.fork() if not overwrite else -1  # an overwrite ring has no consumer
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
        if pid > 0:
            os.waitpid(pid, 0)
        else:
            os.close(stop_r)
        if (t1 - t0) / events < best:
            best = (t1 - t0) / events
            dropped = prod.discarded
        stream.mv = None
        prod.close()
        os.close(fd)
        os.close(efd)
    kind = "overwrite" if overwrite else "forked_consumer"
    emit(f"tracer_enabled_ns_per_event_{kind}_payload{payload}", best, "ns/event")
    emit(f"tracer_enabled_ns_per_event_{kind}_payload{payload}_dropped", dropped, "events")
    return best


def bench_overwrite_tracer(payload: int, events: int, repeat: int) -> None:
    """The tracer into an overwrite ring (nothing consumes it: it laps) and
    into a discard ring drained by a forked consumer, rounds interleaved."""
    ratios = []
    for _ in range(repeat):
        discard = _bench_enabled(payload, events, 1, overwrite=False)
        over = _bench_enabled(payload, events, 1, overwrite=True)
        ratios.append(over / discard)
    ratios.sort()
    emit(f"tracer_overwrite_to_discard_ratio_payload{payload}", ratios[len(ratios) // 2], "ratio")
    emit(f"tracer_overwrite_to_discard_ratio_payload{payload}_min", ratios[0], "ratio")
    emit(f"tracer_overwrite_to_discard_ratio_payload{payload}_max", ratios[-1], "ratio")


def _snapshot_mib(text: str) -> float:
    """The MiB a ``snapshot record`` says it wrote."""
    m = re.search(r"packets, ([\d.]+) (B|KiB|MiB|GiB)", text)
    if m is None:
        raise RuntimeError(f"snapshot record said: {text.strip()}")
    return float(m.group(1)) * {"B": 2**-20, "KiB": 2**-10, "MiB": 1, "GiB": 1024}[m.group(2)]


def bench_snapshot(repeat: int, records: int = 5) -> None:
    """``snapshot record`` of a 32 MiB flight recorder (one stream: 32 x 1 MiB,
    overwrite) while tracewire-demo writes into it at full speed: the time
    the CLI takes, start to exit (CLI start-up included), and what it wrote."""
    times: list[float] = []
    sizes: list[float] = []
    torn = 0
    for run in range(repeat):
        d = Daemons()
        out = tempfile.mkdtemp(prefix="twbs", dir="/dev/shm")
        app = None
        try:
            name = f"snap{run}"
            d.cli("create", name, "--snapshot", "--output", out)
            d.cli("enable-channel", "big", "-s", name, "--subbuf-size", "1M", "--num-subbuf", "32")
            d.cli("enable-event", "demo:*", "-s", name, "-c", "big")
            d.cli("start", name)
            app = subprocess.Popen([os.path.join(BIN_DIR, "tracewire-demo"), "--events", str(10**10),
                                    "--payload-bytes", "256"], env=d.env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            # Fill the ring once (32 MiB at the tracer's speed takes well under 10 s).
            # Until the app has registered ("no ring buffer yet") and written
            # ("no event in the ring buffers"), a snapshot has nothing to take
            # and says so.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    text = d.cli("snapshot", "record", "-s", name)
                except RuntimeError as exc:
                    if "no ring buffer yet" not in str(exc) and "no event in the ring buffers" not in str(exc):
                        raise
                    continue
                if _snapshot_mib(text) >= 31:
                    break
            for _ in range(records):
                t0 = time.perf_counter()
                text = d.cli("snapshot", "record", "-s", name)
                times.append((time.perf_counter() - t0) * 1000)
                sizes.append(_snapshot_mib(text))
                m = re.search(r"(\d+) sub-buffers overwritten while copied", text)
                torn += int(m.group(1)) if m else 0
                shutil.rmtree(out, ignore_errors=True)
                os.makedirs(out, exist_ok=True)
        finally:
            if app is not None:
                _terminate(app, app.pid)
            d.close()
            shutil.rmtree(out, ignore_errors=True)
    times.sort()
    emit("snapshot_record_ms", times[len(times) // 2], "ms")
    emit("snapshot_record_ms_min", times[0], "ms")
    emit("snapshot_record_ms_max", times[-1], "ms")
    emit("snapshot_record_mib", sorted(sizes)[len(sizes) // 2], "MiB")
    emit("snapshot_record_torn_subbufs", torn, "sub-buffers")


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

    def __init__(self, root: str = "/tmp") -> None:
        self.rundir = tempfile.mkdtemp(prefix="twb", dir=root)
        self.env = dict(os.environ, TRACEWIRE_RUNDIR=self.rundir)
        self.env["PATH"] = BIN_DIR + os.pathsep + self.env.get("PATH", "")
        self.pids: set[int] = set()

    def cli(self, *args: str, timeout: float = 300) -> str:
        # The console script, as users type it (``-m`` would add runpy's imports).
        r = subprocess.run([os.path.join(BIN_DIR, "tracewire"), *args], env=self.env, capture_output=True,
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


def _terminate(proc: subprocess.Popen, pid: int) -> None:
    """SIGTERM to ``pid`` (``proc``'s process, or the one it runs as), SIGKILL
    if ``proc`` has not exited 5 s later; ``proc`` is reaped."""
    if proc.poll() is None:
        _kill(pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            _kill(pid, signal.SIGKILL)
    proc.wait()


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


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def bench_daemon_memory(repeat: int, root: str = "/dev/shm") -> None:
    """daemon_pss_mb_idle_*: each target daemon's PSS once a local session has
    started and is idle (median, min, max of ``repeat`` rounds, each with its
    own sessiond)."""
    roles = ("sessiond", "zygote", "consumerd", "spare", "total")
    got: dict[str, list[float]] = {r: [] for r in roles}
    for _ in range(repeat):
        d = Daemons(root)
        out = tempfile.mkdtemp(prefix="twbm", dir=root)
        try:
            d.cli("create", "m", "--output", out)
            d.cli("enable-event", "demo:*", "-s", "m")
            d.cli("start", "m")
            active = _consumerd_pid(d)
            (sessiond,) = d.pids
            deadline = time.monotonic() + 30
            while len(_children(sessiond)) < 3 and time.monotonic() < deadline:  # zygote, consumerd, spare
                time.sleep(0.05)
            time.sleep(1.0)  # settled: start-up done, nothing to read
            kids = _children(sessiond)
            pss = {"sessiond": _memory_mb(sessiond)[0],
                   "zygote": sum(_memory_mb(p)[0] for p in kids if _comm(p) == "tw-zygote"),
                   "consumerd": _memory_mb(active)[0],
                   "spare": sum(_memory_mb(p)[0] for p in kids if p != active and _comm(p) != "tw-zygote")}
            pss["total"] = sum(_memory_mb(p)[0] for p in _tree(sessiond))
            for r in roles:
                got[r].append(pss[r])
        finally:
            d.close()
            shutil.rmtree(out, ignore_errors=True)
    for r in roles:
        emit(f"daemon_pss_mb_idle_{r}", statistics.median(got[r]), "MB")
        emit(f"daemon_pss_mb_idle_{r}_min", min(got[r]), "MB")
        emit(f"daemon_pss_mb_idle_{r}_max", max(got[r]), "MB")


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


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out = [pid]
    for child in _children(pid):
        out += _tree(child)
    return out


def _memory_mb(pid: int) -> tuple[float, float]:
    """PSS and RSS of a process in MB (10^6 bytes), from /proc/PID/smaps_rollup
    (0, 0 once it is gone)."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return pss * 1024 / 1e6, rss * 1024 / 1e6


class _MemPeak:
    """The peak of the summed PSS and RSS of the processes ``pids()`` names,
    sampled every ``interval`` seconds by a thread until ``finish()``."""

    def __init__(self, pids, interval: float = 0.25) -> None:
        import threading

        self.pids = pids
        self.pss = self.rss = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self.sample()
        self.thread.start()

    def sample(self) -> None:
        pss = rss = 0.0
        for pid in self.pids():
            p, r = _memory_mb(pid)
            pss += p
            rss += r
        self.pss, self.rss = max(self.pss, pss), max(self.rss, rss)

    def _run(self, interval: float) -> None:
        while not self.done.wait(interval):
            self.sample()

    def finish(self) -> tuple[float, float]:
        if not self.done.is_set():
            self.done.set()
            self.thread.join()
            self.sample()
        return self.pss, self.rss


def _emitted(text: str) -> float | None:
    """The seconds of the app's "emitted N events in T s" line."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[0] == "emitted" and parts[2] == "events":
            return float(parts[4])
    return None


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
                m = re.search(r"listening on 127\.0\.0\.1:(\d+).*live viewers on 127\.0\.0\.1:(\d+)", f.read())
            if m:
                self.port = int(m.group(1))
                self.live_port = int(m.group(2))
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(log, errors="replace") as f:
                    tail = f.read().strip().splitlines()[-1:]
                self.close()
                raise RuntimeError(f"tracewire-relayd did not come up: {tail}")
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, self.pid)


def _bt_count(out: str) -> tuple[int, int]:
    """Events in the trace(s) under ``out`` and the events the trace reports
    as discarded: ``babeltrace2 out`` (its lines on stdout; its "Tracer
    discarded N events" warnings on stderr), else tracewire.ctf."""
    bt = shutil.which("babeltrace2")
    if bt is None:
        return _read_back(out)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([bt, out], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        lines = 0
        while chunk := proc.stdout.read(1 << 20):
            lines += chunk.count(b"\n")
        if proc.wait() != 0:
            raise RuntimeError(f"babeltrace2 {out} exited with {proc.returncode}")
        err.seek(0)
        discarded = sum(int(n) for n in re.findall(rb"Tracer discarded (\d+) events?\b", err.read()))
    return lines, discarded


def _tear_down(mem, daemons, relay, work: str) -> None:
    """The end of a pipeline run, whatever happened: stop sampling memory,
    kill the daemons and the relay (each may be None), remove the run's
    directory."""
    if mem is not None:
        mem.finish()
    if daemons is not None:
        daemons.close()
    if relay is not None:
        relay.close()
    shutil.rmtree(work, ignore_errors=True)


def _zstd_own_cpu(out: str, level: int = 1) -> float:
    """CPU seconds zstd alone takes to compress the packets a relay wrote
    (each packet on its own, as consumerd compresses them, with the same
    settings), in this process: the floor of a compressing consumer's CPU."""
    import zstandard

    from tracewire import ctf

    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
    packets: list[bytes] = []
    for dirpath, _dirs, files in os.walk(out):
        if os.path.basename(dirpath) != "index":
            continue
        for fn in files:
            stream = os.path.join(os.path.dirname(dirpath), fn[:-len(".idx")])
            with open(os.path.join(dirpath, fn), "rb") as f:
                entries = ctf.read_index(f.read())
            with open(stream, "rb") as f:
                data = f.read()
            packets += [data[e.offset:e.offset + e.packet_size // 8] for e in entries]
    t0 = time.process_time()
    for pkt in packets:
        cctx.compress(pkt)
    return time.process_time() - t0


def relay_run(tag: str, compress: str, payload: int, events: int, count: bool, root: str = "/tmp",
              memory: bool = False, channel: tuple[str, ...] | None = None) -> dict:
    """One streaming run on loopback, each with its own relay, run directory
    and sessiond (all killed after), under ``root``.  ``memory``: also the
    peak PSS and RSS of sessiond and its children (consumerd, the warm spare)
    over the run, sampled every 0.25 s.  ``channel``: the events go to a
    channel ``c`` made with these enable-channel options (None: the default
    channel)."""
    from tracewire.cli import Client
    from tracewire.ops import StatusRequest

    work = tempfile.mkdtemp(prefix="twbr", dir=root)
    relay = d = None
    mem = None
    try:
        relay = Relay(os.path.join(work, "relay"), os.path.join(work, "relayd.log"))
        d = Daemons(root)
        level = ["--compress-level", "1"] if compress == "zstd" else []
        d.cli("create", tag, "--url", f"tw://127.0.0.1:{relay.port}", "--compress", compress, *level)
        if channel is not None:
            d.cli("enable-channel", "c", "-s", tag, *channel)
        d.cli("enable-event", "demo:*", "-s", tag, *(("-c", "c") if channel is not None else ()))
        d.cli("start", tag)
        consumerd = _consumerd_pid(d)
        if memory:
            daemons = d
            mem = _MemPeak(lambda: [p for pid in daemons.pids for p in _tree(pid)])
        c0, r0 = _cpu_s(consumerd), _cpu_s(relay.pid)
        t0 = time.perf_counter()
        text = d.demo("--events", str(events), "--payload-bytes", str(payload))
        ts = time.perf_counter()
        d.cli("stop", tag)
        t1 = time.perf_counter()
        r1 = _cpu_s(relay.pid)
        pss, rss = mem.finish() if mem is not None else (0.0, 0.0)
        streams = Client(d.rundir).request(StatusRequest(session=tag))["streams"]
        read, bt_discarded = _bt_count(relay.out) if count else (None, None)
        res = {
            "seconds": t1 - t0,
            "stop_s": t1 - ts,
            "app": _emitted(text),
            "pss_mb": pss,
            "rss_mb": rss,
            "raw": _stream_bytes(relay.out),  # what the relay wrote
            "sent_raw": sum(s["raw_bytes"] for s in streams),  # what consumerd sent, uncompressed
            "wire": sum(s["wire_bytes"] for s in streams),
            "discarded": sum(s["discarded"] for s in streams),
            "read": read,
            "bt_discarded": bt_discarded,  # what babeltrace2 says the trace reports as discarded
            "relayd_cpu": r1 - r0,
            "relayd_cpu_before": r0,  # start-up and session set-up, left out
            "consumerd_cpu_before": c0,
        }
        if consumerd != _consumerd_pid(d):
            raise RuntimeError("consumerd was replaced during the run")
        res["consumerd_cpu"] = _cpu_s(consumerd) - c0  # just before killing it
        if compress == "zstd":
            res["zstd_own_cpu"] = _zstd_own_cpu(relay.out)
        return res
    finally:
        _tear_down(mem, d, relay, work)


LIVE_RATE = 1000  # events/s: the issue's load
LIVE_SECONDS = 10


def _live_viewer_lines(argv: list[str], lines: list[tuple[int, bytes]]) -> subprocess.Popen:
    """Starts babeltrace2 on a pseudo-terminal (so it prints line by line) and
    a thread appending (arrival time_ns, line) to ``lines``."""
    import pty
    import threading
    import tty

    master, slave = pty.openpty()
    tty.setraw(slave)
    proc = subprocess.Popen(argv, stdout=slave, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    os.close(slave)

    def read() -> None:
        tail = b""
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            now = time.time_ns()
            *done, tail = (tail + chunk).split(b"\n")
            lines.extend((now, x) for x in done)
        os.close(master)

    threading.Thread(target=read, daemon=True).start()
    return proc


def live_run(root: str = "/tmp", extra: tuple[str, ...] = ()) -> list[float]:
    """One live session on loopback (its own relay, with its default flags
    plus ``extra``, and sessiond) at LIVE_RATE events/s for LIVE_SECONDS,
    followed by babeltrace2 -i lttng-live from before the app starts;
    returns, per event, the milliseconds from its timestamp to the moment
    babeltrace2's line reached us."""
    bt = shutil.which("babeltrace2")
    if bt is None:
        raise RuntimeError("babeltrace2 is not installed")
    work = tempfile.mkdtemp(prefix="twbl", dir=root)
    relay = d = None
    proc = None
    try:
        relay = Relay(os.path.join(work, "relay"), os.path.join(work, "relayd.log"), extra)
        d = Daemons(root)
        d.env["TRACEWIRE_HOSTNAME"] = "bench"
        d.cli("create", "lv", "--live", "--url", f"tw://127.0.0.1:{relay.port}")
        d.cli("enable-event", "demo:*", "-s", "lv")
        d.cli("start", "lv")
        d.demo("--events", "1")  # the session and a stream exist on the relay: attachable
        lines: list[tuple[int, bytes]] = []
        proc = _live_viewer_lines(
            [bt, "-i", "lttng-live", f"net://127.0.0.1:{relay.live_port}/host/bench/lv", "--clock-seconds"], lines)
        deadline = time.monotonic() + 60
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)  # the first event printed: the viewer follows
        d.demo("--events", str(LIVE_RATE * LIVE_SECONDS), "--rate", str(LIVE_RATE))
        d.cli("destroy", "lv")
        proc.wait(timeout=120)
        stamp = re.compile(rb"^\[(\d+)\.(\d{9})\]")
        lat = []
        for arrived, line in lines[1:]:  # the first event waited for the viewer
            m = stamp.match(line)
            if m:
                lat.append((arrived - (int(m[1]) * 1_000_000_000 + int(m[2]))) / 1e6)
        if len(lat) != LIVE_RATE * LIVE_SECONDS:
            raise RuntimeError(f"babeltrace2 printed {len(lat)} of {LIVE_RATE * LIVE_SECONDS} events")
        return lat
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        _tear_down(None, d, relay, work)


def bench_live(repeat: int) -> None:
    """live_latency_ms_p50/p95: event timestamp -> babeltrace2 -i lttng-live
    printing it, default live timer, 1,000 events/s, the relay with its
    defaults (--fsync); _no_fsync: with --no-fsync.  The median over the
    runs of each run's percentile (the runs on stderr); rounds interleaved."""
    runs: dict[str, list[list[float]]] = {"": [], "_no_fsync": []}
    for _ in range(repeat):
        for suffix, extra in (("", ()), ("_no_fsync", ("--no-fsync",))):
            runs[suffix].append(sorted(live_run(extra=extra)))
    for suffix, lats in runs.items():
        for q in (50, 95):
            vals = [lat[min(len(lat) - 1, len(lat) * q // 100)] for lat in lats]
            name = f"live_latency_ms_p{q}{suffix}"
            emit(name, statistics.median(vals), "ms", 1)
            print(f"# {name}: runs {', '.join(f'{v:.1f}' for v in vals)}", file=sys.stderr)


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


# ----------------------------------------------------------------- blocking channels (--blocking-timeout)

BLOCKING_RING = ("--subbuf-size", "4k", "--num-subbuf", "2")  # the tiny ring of issue 11's Done-means check


def blocking_run(tag: str, blocking: str | None, ring: tuple[str, ...], payload: int, events: int,
                 root: str = "/tmp") -> dict:
    """One ``relay_run`` (zstd level 1) into a channel of geometry ``ring``
    (enable-channel options), with ``--blocking-timeout BLOCKING`` (None:
    the default, discard mode)."""
    extra = ("--blocking-timeout", blocking) if blocking is not None else ()
    r = relay_run(tag, "zstd", payload, events, True, root, channel=(*ring, *extra))
    return {"mbps": r["raw"] / 1e6 / r["seconds"], "lost": events - r["read"], "app": r["app"],
            "ccpu": r["consumerd_cpu"] / (r["raw"] / 1e9) if r["raw"] else 0.0}


def bench_blocking(events: int, repeat: int, want, payload: int = 256) -> None:
    """``blocking_*``: the tiny ring with ``--blocking-timeout inf`` against
    the same ring in discard mode, and the default ring (4 x 256 KiB) both
    ways, rounds interleaved; median, min, max."""
    default_ring = ("--subbuf-size", "256k", "--num-subbuf", "4")
    sides = {"inf": ("inf", BLOCKING_RING), "discard": (None, BLOCKING_RING),
             "inf_default_ring": ("inf", default_ring), "discard_default_ring": (None, default_ring)}
    if not any(want(f"blocking_{figure}_{side}") for figure in ("events_lost", "mb_per_s") for side in sides):
        return
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(repeat):
        for side, (value, ring) in sides.items():
            runs[side].append(blocking_run(f"blk{i}{side.replace('_', '')}", value, ring, payload, events))
    for side, rs in runs.items():
        for key, figure, unit in (("lost", "events_lost", "events"), ("mbps", "mb_per_s", "MB/s"),
                                  ("app", "app_s", "s"), ("ccpu", "consumerd_cpu_s_per_gb", "s/GB")):
            name = f"blocking_{figure}_{side}"
            values = [r[key] for r in rs if r[key] is not None]
            if not want(name) or not values:
                continue
            emit(name, statistics.median(values), unit)
            emit(f"{name}_min", min(values), unit)
            emit(f"{name}_max", max(values), unit)


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


# ----------------------------------------------------------------- many targets into one relay

FANIN_TARGETS = 64
FANIN_EVENTS = 10_000  # demo:tick events per target
FANIN_RATE = 2_000  # events per second per target: every buffer drains long before it fills
FANIN_SETUP_WORKERS = 8  # targets set up (sessiond started, session created) at once


def _fanin_complete(out: str, tag: str, events: int) -> tuple[bool, int]:
    """Whether the trace(s) of session ``tag`` under the relay's ``out`` hold
    every demo:tick seq 0..events-1 exactly once (read with tracewire.ctf),
    and how many events the trace reports as discarded."""
    import glob

    from tracewire import ctf

    dirs = glob.glob(os.path.join(out, "*", f"{tag}-*"))
    seen = bytearray(events)
    extra = discarded = 0
    for d in dirs:
        for item in ctf.read_trace(d):
            if isinstance(item, ctf.Discarded):
                discarded += item.count
            elif item.name == "demo:tick":
                seq = item.fields.get("seq")
                if isinstance(seq, int) and 0 <= seq < events and not seen[seq]:
                    seen[seq] = 1
                else:
                    extra += 1
    ok = len(dirs) == 1 and extra == 0 and all(seen)
    if not ok:
        missing = [i for i in range(events) if not seen[i]]
        print(f"bench: fanin: {tag}: {len(dirs)} trace dir(s), {extra} duplicate/foreign events, {len(missing)} "
              f"seqs missing (first {missing[:3]}, last {missing[-3:]})", file=sys.stderr)
    return ok, discarded


def bench_fanin(targets: int, events: int, want, root: str = "/dev/shm") -> None:
    """One tracewire-relayd (its defaults: --fsync) on loopback, ``targets``
    targets each with its own run directory (sessiond, consumerd) streaming
    a tracewire-demo run at once (``--compress none``); then every trace is
    read back.  One run, everything on tmpfs."""
    from concurrent.futures import ThreadPoolExecutor

    from tracewire import ops
    from tracewire.cli import Client

    names = ("fanin_traces_complete", "fanin_events_discarded", "fanin_connections", "fanin_relayd_rss_idle_mib",
             "fanin_relayd_rss_peak_mib", "fanin_relayd_rss_mib_per_connection", "fanin_relayd_cpu_s_per_gb",
             "fanin_seconds")
    if not any(want(n) for n in names):
        return
    work = tempfile.mkdtemp(prefix="twfan", dir=root)
    log = os.path.join(work, "relayd.log")
    relay = mem = None
    targets_d: list[Daemons] = []
    mib = 1e6 / 2**20  # _MemPeak counts MB
    try:
        relay = Relay(os.path.join(work, "relay"), log)
        idle = _memory_mb(relay.pid)[1] * mib
        url = f"tw://127.0.0.1:{relay.port}"
        targets_d = [Daemons(root) for _ in range(targets)]

        def set_up(i: int) -> None:
            # What `tracewire create/enable-event/start` do, without a CLI process each.
            c, tag = Client(targets_d[i].rundir), f"fan{i}"
            c.ensure_daemon()
            c.request(ops.CreateRequest(tag, url=url, compress=ops.Compression.NONE))
            c.request(ops.EnableEventRequest("demo:*", session=tag))
            c.request(ops.StartRequest(session=tag))
            targets_d[i]._note()

        t_setup = time.perf_counter()
        with ThreadPoolExecutor(FANIN_SETUP_WORKERS) as pool:
            list(pool.map(set_up, range(targets)))
        print(f"bench: fanin: {targets} targets set up in {time.perf_counter() - t_setup:.1f} s", file=sys.stderr)
        relay_pid = relay.pid
        mem = _MemPeak(lambda: [relay_pid])
        r0 = _cpu_s(relay.pid)
        t0 = time.perf_counter()
        # 64 apps registering at once can take longer than the tracer's
        # default 3 s wait, and what an app emits before it is registered is
        # not traced (not even counted as discarded).
        apps = [subprocess.Popen([os.path.join(BIN_DIR, "tracewire-demo"), "--events", str(events), "--rate",
                                  str(FANIN_RATE), "--payload-bytes", "256"], env=app_env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for app_env in (dict(d.env, TRACEWIRE_REGISTER_TIMEOUT="120") for d in targets_d)]
        errors = [p.communicate(timeout=600)[1] for p in apps]
        failed = [e for p, e in zip(apps, errors) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} tracewire-demo runs failed: {failed[0].decode(errors='replace')[-300:]}")

        def stop(i: int) -> None:
            Client(targets_d[i].rundir).request(ops.StopRequest(session=f"fan{i}"), timeout=300)

        with ThreadPoolExecutor(FANIN_SETUP_WORKERS) as pool:
            list(pool.map(stop, range(targets)))
        t1 = time.perf_counter()
        r1 = _cpu_s(relay.pid)
        peak = mem.finish()[1] * mib
        raw = _stream_bytes(relay.out)
        results = [_fanin_complete(relay.out, f"fan{i}", events) for i in range(targets)]
        with open(log, errors="replace") as f:
            text = f.read()
        connections = text.count(": welcome (")
        for line in [ln for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln][1:6]:
            print(f"bench: fanin: relayd.log: {line}", file=sys.stderr)  # the first is the no-auth notice
        values = {
            "fanin_traces_complete": (sum(ok for ok, _ in results), f"of {targets}"),
            "fanin_events_discarded": (sum(n for _, n in results), "events"),
            "fanin_connections": (connections, "connections"),
            "fanin_relayd_rss_idle_mib": (idle, "MiB"),
            "fanin_relayd_rss_peak_mib": (peak, "MiB"),
            "fanin_relayd_rss_mib_per_connection": ((peak - idle) / max(connections, 1), "MiB"),
            "fanin_relayd_cpu_s_per_gb": ((r1 - r0) / (raw / 1e9), "s/GB"),
            "fanin_seconds": (t1 - t0, "s"),
        }
        for name in names:
            if want(name):
                emit(name, *values[name])
    except Exception:
        with open(log, errors="replace") as f:
            print("bench: relayd.log:", *f.read().strip().splitlines()[-5:], sep="\n  ", file=sys.stderr)
        raise
    finally:
        if mem is not None:
            mem.finish()
        with ThreadPoolExecutor(FANIN_SETUP_WORKERS) as pool:
            list(pool.map(Daemons.close, targets_d))
        if relay is not None:
            relay.close()
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------- side by side with LTTng

LTTNG_DEBS = ("lttng-tools", "liblttng-ust-dev", "python3-lttngust", "gcc", "libc6-dev", "babeltrace2")
LTTNG_BINS = ("lttng", "lttng-sessiond", "lttng-relayd", "gcc", "babeltrace2")
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LTTNG_APP_DIR = os.path.join(REPO_DIR, "bench", "lttng_app")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: the only one python3-lttngust is installed for
VS_ROOT = "/dev/shm"  # every output, run directory and spool of the side-by-side runs: tmpfs
VS_PREFIX = "vs_lttng_"


@functools.cache
def lttng_setup() -> bool:
    """LTTng 2.13 from Debian and a C compiler: installs what is missing
    (apt-get, as root); False, with one line on stderr, when it cannot."""
    missing = [p for p in LTTNG_DEBS if shutil.which("dpkg") and subprocess.run(
        ["dpkg", "-s", p], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0]
    if missing and os.geteuid() == 0:
        print(f"bench: installing {' '.join(missing)}", file=sys.stderr, flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        r = subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, text=True, timeout=600)
        if r.returncode == 0:
            r = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env,
                               capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["?"])[-1]
            print(f"bench: vs_lttng skipped: apt-get install {' '.join(missing)} failed: {tail}", file=sys.stderr)
            return False
    elif missing:
        print(f"bench: vs_lttng skipped: not root, cannot install {' '.join(missing)}", file=sys.stderr)
        return False
    absent = [b for b in LTTNG_BINS if shutil.which(b) is None]
    if absent:
        print(f"bench: vs_lttng skipped: {', '.join(absent)} not found", file=sys.stderr)
        return False
    return True


def _lttng_user() -> dict:
    """subprocess arguments running LTTng's daemons, CLI and apps as an
    unprivileged user (nobody) when the bench runs as root: a root
    lttng-sessiond always uses /var/run/lttng, while a user's lives in
    $LTTNG_HOME/.lttng, which is private to the run."""
    if os.geteuid() != 0:
        return {}
    import pwd

    pw = pwd.getpwnam("nobody")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _private_dir(root: str, prefix: str, as_user: dict) -> str:
    """A fresh directory under ``root`` owned by the user LTTng runs as."""
    path = tempfile.mkdtemp(prefix=prefix, dir=root)
    if as_user:
        os.chown(path, as_user["user"], as_user["group"])
    return path


def _free_ports(n: int) -> list[int]:
    """n TCP ports free on 127.0.0.1 right now (bound to port 0 together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LttngDaemons:
    """A private lttng-sessiond (no kernel tracing) with LTTNG_HOME a fresh
    directory under ``root``, run in the foreground as our child; ready once
    ``lttng list`` answers (``--sig-parent`` cannot tell us: as nobody it may
    not signal a root parent).  Its consumerd are its children."""

    def __init__(self, root: str, agent_port: int | None = None) -> None:
        self.as_user = _lttng_user()
        self.home = _private_dir(root, "twbl", self.as_user)
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.home, "LTTNG_HOME": self.home,
                    "LANG": "C.UTF-8"}
        self.log = os.path.join(self.home, "sessiond.log")
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        try:
            self._start(agent_port)
        except BaseException:
            self.close()
            raise

    def _start(self, agent_port: int | None) -> None:
        extra = [f"--agent-tcp-port={agent_port}"] if agent_port else []
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(["lttng-sessiond", "--no-kernel", *extra],
                                         env=self.env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         **self.as_user)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 20
        while subprocess.run(["lttng", "list"], env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, timeout=30, **self.as_user).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(self.log, errors="replace") as f:
                    tail = f.read().strip().splitlines()[-1:]
                raise RuntimeError(f"lttng-sessiond did not come up: {tail}")
            time.sleep(0.05)
        try:
            with open(os.path.join(self.home, ".lttng", "lttng-sessiond.pid")) as f:
                pid = int(f.read())
        except (OSError, ValueError) as e:
            raise RuntimeError(f"lttng-sessiond's pid file: {e}") from None
        if pid != self.pid:
            raise RuntimeError(f"lttng-sessiond.pid names {pid}, not our lttng-sessiond {self.pid}")

    def lttng(self, *args: str, timeout: float = 300) -> str:
        r = subprocess.run(["lttng", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, **self.as_user)
        if r.returncode != 0:
            raise RuntimeError(f"lttng {' '.join(args)}: {(r.stderr or r.stdout).strip()}")
        return r.stdout

    def run(self, argv: list[str], env: dict | None = None, timeout: float = 600) -> str:
        """Runs an app as LTTng's user, in this sessiond's LTTNG_HOME."""
        r = subprocess.run(argv, env=dict(self.env, **(env or {})), capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, **self.as_user)
        if r.returncode != 0:
            raise RuntimeError(f"{argv[0]}: exit {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def consumerd_pid(self) -> int:
        """The 64-bit UST lttng-consumerd (a child of sessiond)."""
        for pid in _children(self.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"ustconsumerd64" in f.read():
                        return pid
            except OSError:
                pass
        raise RuntimeError(f"no 64-bit UST lttng-consumerd under lttng-sessiond {self.pid}")

    def close(self) -> None:
        """SIGTERM to sessiond (it ends its consumerd), SIGKILL to whatever
        of its tree is left after 5 s, then the directory goes."""
        if self.proc is not None:
            tree = _tree(self.pid)
            _kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for pid in tree:
                if _alive(pid):
                    _kill(pid, signal.SIGKILL)
            self.proc.wait()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(_alive(p) for p in tree):
                time.sleep(0.02)
            self.proc = None
        shutil.rmtree(self.home, ignore_errors=True)


class LttngRelay:
    """An lttng-relayd on loopback (control, data and live ports free ones)
    writing under ``out``, as our child."""

    def __init__(self, out: str, log: str, as_user: dict) -> None:
        self.out = out
        self.proc: subprocess.Popen | None = None
        for _attempt in range(3):  # a port taken between _free_ports() and the bind: again
            self.ctrl, self.data, live = _free_ports(3)
            with open(log, "wb") as logf:
                self.proc = subprocess.Popen(
                    ["lttng-relayd", "-o", out, "-C", f"tcp://127.0.0.1:{self.ctrl}",
                     "-D", f"tcp://127.0.0.1:{self.data}", "-L", f"tcp://127.0.0.1:{live}"],
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.path.dirname(out),
                         "LTTNG_HOME": os.path.dirname(out)},
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, **as_user)
            self.pid = self.proc.pid
            try:
                if self._wait_listening(15):
                    return
            except BaseException:
                self.close()
                raise
            self.close()
        with open(log, errors="replace") as f:
            tail = f.read().strip().splitlines()[-1:]
        raise RuntimeError(f"lttng-relayd did not come up: {tail}")

    def _wait_listening(self, timeout: float) -> bool:
        """Whether the relay accepts connections on its control and data ports within ``timeout`` s."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if all(self._listening(p) for p in (self.ctrl, self.data)):
                return True
            time.sleep(0.02)
        return False

    @staticmethod
    def _listening(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, self.pid)
            self.proc = None


def _build_lttng_app(workdir: str) -> str:
    """bench/lttng_app/app.c compiled (gcc -O2) into ``workdir``."""
    app = os.path.join(workdir, "tw-bench-lttng-app")
    r = subprocess.run(["gcc", "-O2", "-Wall", "-I", LTTNG_APP_DIR, "-o", app,
                        os.path.join(LTTNG_APP_DIR, "app.c"), "-llttng-ust", "-ldl"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"gcc bench/lttng_app/app.c: {r.stderr.strip()}")
    os.chmod(app, 0o755)
    return app


def lttng_run(app: str, blocking: bool, payload: int, events: int, root: str) -> dict:
    """One LTTng run, the counterpart of relay_run(): its own relayd and
    sessiond, ``lttng create --set-url=net://...``, the default channel
    (discard mode, per-user buffers) or a blocking one, the C app, ``lttng
    stop`` (timed), ``lttng destroy``; everything killed after."""
    as_user = _lttng_user()
    work = _private_dir(root, "twbL", as_user)
    relay = d = mem = None
    try:
        relay = LttngRelay(os.path.join(work, "relay"), os.path.join(work, "relayd.log"), as_user)
        d = LttngDaemons(root)
        d.lttng("create", "s", f"--set-url=net://127.0.0.1:{relay.ctrl}:{relay.data}")
        if blocking:
            d.lttng("enable-channel", "-u", "--blocking-timeout=inf", "blk")
            d.lttng("enable-event", "-u", "demo:tick", "-c", "blk")
        else:
            d.lttng("enable-event", "-u", "demo:tick")
        d.lttng("start")
        consumerd = d.consumerd_pid()
        sessiond = d.pid
        mem = _MemPeak(lambda: _tree(sessiond))
        c0 = sum(_cpu_s(p) for p in _tree(consumerd))
        r0 = _cpu_s(relay.pid)
        t0 = time.perf_counter()
        text = d.run([app, "--events", str(events), "--payload-bytes", str(payload)],
                     {"LTTNG_UST_ALLOW_BLOCKING": "1"} if blocking else None)
        ts = time.perf_counter()
        d.lttng("stop", "s")
        t1 = time.perf_counter()
        r1 = _cpu_s(relay.pid)
        pss, rss = mem.finish()
        d.lttng("destroy", "s")
        c1 = sum(_cpu_s(p) for p in _tree(consumerd))
        read, discarded = _bt_count(relay.out)
        return {
            "seconds": t1 - t0,
            "stop_s": t1 - ts,
            "app": _emitted(text),
            "raw": _stream_bytes(relay.out),
            "read": read,
            "bt_discarded": discarded,
            "consumerd_cpu": c1 - c0,
            "relayd_cpu": r1 - r0,
            "pss_mb": pss,
            "rss_mb": rss,
        }
    finally:
        _tear_down(mem, d, relay, work)


# name -> (what a run gives, unit); per GB is of the raw trace the relay wrote
VS_FIGURES = {
    "consumerd_cpu_s_per_gb": (lambda r: r["consumerd_cpu"] / (r["raw"] / 1e9), "s/GB"),
    # Compressing sides only: zstd's own CPU for the same packets, and what
    # consumerd spends beyond it (issue 11's budget for a compressing consumer).
    "zstd_own_cpu_s_per_gb": (lambda r: r.get("zstd_own_cpu", 0.0) / (r["raw"] / 1e9), "s/GB"),
    "consumerd_cpu_beyond_zstd_s_per_gb": (
        lambda r: (r["consumerd_cpu"] - r.get("zstd_own_cpu", 0.0)) / (r["raw"] / 1e9), "s/GB"),
    "relayd_cpu_s_per_gb": (lambda r: r["relayd_cpu"] / (r["raw"] / 1e9), "s/GB"),
    "daemons_pss_mb": (lambda r: r["pss_mb"], "MB"),
    "daemons_rss_mb": (lambda r: r["rss_mb"], "MB"),
    "events_lost": (lambda r: r["lost"], "events"),
    "events_lost_discarded": (lambda r: r["bt_discarded"], "events"),
    "stop_s": (lambda r: r["stop_s"], "s"),
    "mb_per_s": (lambda r: r["raw"] / 1e6 / r["seconds"], "MB/s"),
}

VS_ZSTD_FIGURES = ("zstd_own_cpu_s_per_gb", "consumerd_cpu_beyond_zstd_s_per_gb")


def _remove_new_wait_shm(before: set[str]) -> None:
    """Removes the /dev/shm/lttng-ust-wait-* files our LTTng apps created
    (liblttng-ust leaves them behind); those that were there before stay."""
    try:
        now = {n for n in os.listdir("/dev/shm") if n.startswith("lttng-ust-wait-")}
    except OSError:
        return
    for name in now - before:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass


def _lttng_wait_shm() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("lttng-ust-wait-")}
    except OSError:
        return set()


def bench_vs_lttng(events: int, repeat: int, want, payload: int = 256, root: str = VS_ROOT) -> None:
    """tracewire (--compress none, zstd 1) against LTTng (default channel,
    blocking channel), each through its own relay on loopback, rounds
    interleaved: LTTng, tracewire none, LTTng blocking, tracewire zstd1, ...
    Median, min and max over the rounds; ratios tracewire / LTTng default."""
    sides = {"lttng": None, "tracewire_none": "none", "lttng_blocking": None, "tracewire_zstd1": "zstd"}
    names: dict[str, tuple] = {}
    for fig in VS_FIGURES:
        zstd_only = fig in VS_ZSTD_FIGURES  # measured on the compressing side only
        for side in sides:
            if zstd_only and side != "tracewire_zstd1":
                continue
            for stat in ("", "_min", "_max"):
                names[f"{VS_PREFIX}{fig}_{side}{stat}"] = (fig, side, stat)
        for v in ("none", "zstd1"):
            if zstd_only and v != "zstd1":
                continue
            names[f"{VS_PREFIX}{fig}_ratio_{v}"] = (fig, f"tracewire_{v}", "ratio")
    names = {n: f for n, f in names.items() if want(n)}
    if not names or not lttng_setup():
        return
    build = tempfile.mkdtemp(prefix="twbc", dir=root)
    os.chmod(build, 0o755)
    shm_before = _lttng_wait_shm()
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    try:
        app = _build_lttng_app(build)
        for r in range(repeat):
            for side, compress in sides.items():
                if compress is None:
                    res = lttng_run(app, side == "lttng_blocking", payload, events, root)
                else:
                    res = relay_run(f"vs{r}", compress, payload, events, True, root=root, memory=True)
                res["lost"] = events - res["read"]
                runs[side].append(res)
                app_s = f"{res['app']:.3f} s" if res["app"] is not None else "?"
                status = f", tracewire status: {res['discarded']}" if compress is not None else ""
                print(f"bench: vs_lttng round {r + 1}/{repeat} {side}: {res['raw'] / 1e6:.0f} MB raw in "
                      f"{res['seconds']:.2f} s (app {app_s}, stop {res['stop_s']:.2f} s), lost {res['lost']} "
                      f"(babeltrace2: {res['bt_discarded']} discarded{status}), consumerd {res['consumerd_cpu']:.2f} "
                      f"CPU s, relayd {res['relayd_cpu']:.2f} CPU s, PSS {res['pss_mb']:.1f} MB, "
                      f"RSS {res['rss_mb']:.1f} MB", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(build, ignore_errors=True)
        _remove_new_wait_shm(shm_before)
    for name, (fig, side, stat) in names.items():
        get, unit = VS_FIGURES[fig]
        if stat == "ratio":
            lttng = statistics.median(get(x) for x in runs["lttng"])
            ours = statistics.median(get(x) for x in runs[side])
            if lttng == 0:
                print(f"bench: {name}: LTTng's median is 0, no ratio", file=sys.stderr)
                continue
            emit(name, ours / lttng, "tracewire/lttng", 4)
        else:
            values = [get(x) for x in runs[side]]
            emit(name, {"": statistics.median, "_min": min, "_max": max}[stat](values), unit)


# The timed loops, run as separate processes: the LTTng agent under Debian's
# /usr/bin/python3 (python3-lttngust), tracewire under this venv's python.
_PY_LOGGING = r"""
import logging, sys, time
n = int(sys.argv[1])
if sys.argv[2] == "lttng":
    import lttngust  # registers with the session daemon (LTTNG_HOME), blocks up to 5 s for it
    deadline = time.monotonic() + 10
    while not logging.getLogger().handlers:  # the agent adds its handler once a session enables an event
        if time.monotonic() > deadline:
            sys.exit("lttngust: no handler on the root logger after 10 s: no session enables the event")
        time.sleep(0.01)
else:
    logging.getLogger().setLevel(logging.NOTSET)  # as lttngust sets it: every record is made, none handled
logger = logging.getLogger("bench")
for i in range(1000):
    logger.info("request %d %s", i, "path")
t0 = time.process_time_ns()
for i in range(n):
    logger.info("request %d %s", i, "path")
t1 = time.process_time_ns()
print((t1 - t0) / n)
"""

_PY_TRACEWIRE = r"""
import sys, time
from tracewire import tracepoint
n = int(sys.argv[1])
log = tracepoint("demo:log", seq=int, msg=str)  # waits (bounded) for sessiond to enable it
for i in range(1000):
    log(seq=i, msg="request %d %s" % (i, "path"))
t0 = time.process_time_ns()
for i in range(n):
    log(seq=i, msg="request %d %s" % (i, "path"))
t1 = time.process_time_ns()
print((t1 - t0) / n)
"""


def _lttng_python_session(root: str) -> tuple[LttngDaemons, str]:
    """A private LTTng sessiond with session ``p`` started, its Python agent
    enabled for the logger ``bench``; and the trace's directory."""
    ld = LttngDaemons(root, agent_port=_free_ports(1)[0])
    try:
        ltrace = os.path.join(ld.home, "trace")
        ld.lttng("create", "p", f"--output={ltrace}")
        ld.lttng("enable-event", "--python", "bench")
        ld.lttng("start", "p")
    except BaseException:
        ld.close()
        raise
    return ld, ltrace


def _tracewire_session(root: str, out: str, *enable: str) -> tuple[Daemons, str]:
    """A private tracewire sessiond with session ``p`` writing under
    ``out``, started with ``enable-event *enable``; and the trace's
    directory."""
    tw = Daemons(root)
    try:
        twtrace = os.path.join(out, "trace")
        tw.cli("create", "p", "--output", twtrace)
        tw.cli("enable-event", *enable, "-s", "p")
        tw.cli("start", "p")
    except BaseException:
        tw.close()
        raise
    return tw, twtrace


def bench_python_tracer(calls: int, repeat: int, want, everything: bool, root: str = VS_ROOT) -> None:
    """ns per ``logger.info('request %d %s', i, 'path')`` through LTTng's
    Python agent against ns per tracewire tracepoint call doing the same
    (seq and the formatted message), each with a session enabling the event
    and writing to a local trace on tmpfs; rounds interleaved, median."""
    names = {f"python_tracer_ns_per_event_{k}": k
             for k in ("tracewire", "lttng", "ratio", "tracewire_venv", "logging_no_handler")}
    names = {n: k for n, k in names.items() if everything or want(n)}
    if not names or not lttng_setup():
        return
    if not os.path.exists(SYSTEM_PYTHON):
        print(f"bench: python_tracer skipped: no {SYSTEM_PYTHON}", file=sys.stderr)
        return
    shm_before = _lttng_wait_shm()
    ld = tw = None
    out = tempfile.mkdtemp(prefix="twbp", dir=root)
    results: dict[str, list[float]] = {"lttng": [], "tracewire": [], "tracewire_venv": [], "logging_no_handler": []}
    try:
        ld, ltrace = _lttng_python_session(root)
        tw, twtrace = _tracewire_session(root, out, "demo:*")
        # Round 0 warms up and is not counted: LTTng's daemons have just
        # started and are still settling, and on 2 cores every side pays for
        # it (10-40 % dearer in a first round; ours alone shows no such round).
        for r in range(repeat + 1):
            if r == 1:
                results = {k: [] for k in results}
            ns = float(ld.run([SYSTEM_PYTHON, "-c", _PY_LOGGING, str(calls), "lttng"]))
            results["lttng"].append(ns)
            for key, python in (("tracewire", SYSTEM_PYTHON), ("tracewire_venv", sys.executable)):
                # The tracer needs only the standard library: Debian's python runs it from the tree.
                env = dict(tw.env, PYTHONPATH=REPO_DIR) if python == SYSTEM_PYTHON else tw.env
                proc = subprocess.run([python, "-c", _PY_TRACEWIRE, str(calls)], env=env, capture_output=True,
                                      text=True, timeout=600, stdin=subprocess.DEVNULL)
                if proc.returncode != 0:
                    raise RuntimeError(f"tracewire python loop ({python}): {proc.stderr.strip()}")
                results[key].append(float(proc.stdout))
            proc = subprocess.run([SYSTEM_PYTHON, "-c", _PY_LOGGING, str(calls), "none"], capture_output=True,
                                  text=True, timeout=600, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise RuntimeError(f"logging loop: {proc.stderr.strip()}")
            results["logging_no_handler"].append(float(proc.stdout))
            label = f"{r}/{repeat}" + (" (warm-up, not counted)" if r == 0 else "")
            print(f"bench: python_tracer round {label}: lttng {results['lttng'][-1]:.0f}, tracewire "
                  f"{results['tracewire'][-1]:.0f} (venv: {results['tracewire_venv'][-1]:.0f}), logging without "
                  f"handler {results['logging_no_handler'][-1]:.0f} ns/call", file=sys.stderr, flush=True)
        ld.lttng("stop", "p")
        tw.cli("stop", "p")
        expected = (calls + 1000) * (repeat + 1)
        for side, trace in (("lttng", ltrace), ("tracewire", twtrace)):
            read, discarded = _bt_count(trace)
            want_n = expected * (2 if side == "tracewire" else 1)  # Debian's python and the venv's
            print(f"bench: python_tracer {side}: {read} events in the trace, {discarded} reported discarded, "
                  f"{want_n} emitted", file=sys.stderr)
            if read + discarded != want_n:
                print(f"bench: python_tracer {side}: the trace does not account for every call", file=sys.stderr)
    finally:
        if ld is not None:
            ld.close()
        if tw is not None:
            tw.close()
        shutil.rmtree(out, ignore_errors=True)
        _remove_new_wait_shm(shm_before)
    med = {k: statistics.median(v) for k, v in results.items()}
    med["ratio"] = med["tracewire"] / med["lttng"]
    for name, k in names.items():
        if k == "ratio":
            emit(name, med[k], "tracewire/lttng", 4)
        else:
            emit(name, med[k], "ns/event")


_PY_LOGGING_BRIDGE = r"""
import logging, sys, time
n, mode = int(sys.argv[1]), sys.argv[2]
logging.getLogger().setLevel(logging.NOTSET)  # as lttngust sets it: every record reaches the handlers
if mode == "nullhandler":
    logging.getLogger().addHandler(logging.NullHandler())
else:  # "bridge" (a session enables python:bench) or "bridge_off" (none does)
    import tracewire.logging
    tracewire.logging.install()
logger = logging.getLogger("bench")
for i in range(1000):  # the first records declare the log event: sessiond enables it (or not)
    logger.info("request %d %s", i, "path")
t0 = time.process_time_ns()
for i in range(n):
    logger.info("request %d %s", i, "path")
t1 = time.process_time_ns()
print((t1 - t0) / n)
"""


def bench_logging_bridge(calls: int, repeat: int, want, everything: bool, root: str = VS_ROOT) -> None:
    """CPU ns per ``logger.info('request %d %s', i, 'path')`` under Debian's
    /usr/bin/python3, one loop per process, rounds interleaved: through
    ``tracewire.logging.install()`` with a session enabling ``python:bench``
    (``logging_bridge``), through LTTng's Python agent with ``lttng
    enable-event --python bench`` (``lttng_python_agent``), into a
    ``logging.NullHandler`` (``logging_nullhandler``), and through the bridge
    with no session enabling the event (``logging_bridge_disabled``).  Median
    printed; the spread (min-max) goes to stderr."""
    figures = {"logging_bridge_ns_per_record": "bridge", "lttng_python_agent_ns_per_record": "lttng",
               "logging_nullhandler_ns_per_record": "nullhandler",
               "logging_bridge_disabled_ns_per_record": "bridge_off",
               "logging_bridge_ratio": "ratio"}
    figures = {n: k for n, k in figures.items() if everything or want(n)}
    if not figures or not lttng_setup():
        return
    if not os.path.exists(SYSTEM_PYTHON):
        print(f"bench: logging_bridge skipped: no {SYSTEM_PYTHON}", file=sys.stderr)
        return
    shm_before = _lttng_wait_shm()
    ld = tw = tw_off = None
    out = tempfile.mkdtemp(prefix="twbl", dir=root)
    results: dict[str, list[float]] = {"bridge": [], "lttng": [], "nullhandler": [], "bridge_off": []}
    try:
        ld, ltrace = _lttng_python_session(root)
        tw, twtrace = _tracewire_session(root, out, "--python", "bench")
        tw_off = Daemons(root)  # a sessiond with a session that does not enable python:bench
        tw_off.cli("create", "q", "--output", os.path.join(out, "off"))
        tw_off.cli("enable-event", "demo:*", "-s", "q")
        tw_off.cli("start", "q")

        def loop(mode: str, env: dict) -> float:
            proc = subprocess.run([SYSTEM_PYTHON, "-c", _PY_LOGGING_BRIDGE, str(calls), mode],
                                  env=dict(env, PYTHONPATH=REPO_DIR), capture_output=True, text=True,
                                  timeout=600, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise RuntimeError(f"logging loop ({mode}): {proc.stderr.strip()}")
            return float(proc.stdout)

        for r in range(repeat + 1):  # round 0 warms up, not counted (see bench_python_tracer)
            if r == 1:
                results = {k: [] for k in results}
            results["lttng"].append(float(ld.run([SYSTEM_PYTHON, "-c", _PY_LOGGING, str(calls), "lttng"])))
            results["bridge"].append(loop("bridge", tw.env))
            results["nullhandler"].append(loop("nullhandler", dict(os.environ)))
            results["bridge_off"].append(loop("bridge_off", tw_off.env))
            label = f"{r}/{repeat}" + (" (warm-up, not counted)" if r == 0 else "")
            print(f"bench: logging_bridge round {label}: bridge {results['bridge'][-1]:.0f}, LTTng agent "
                  f"{results['lttng'][-1]:.0f}, NullHandler {results['nullhandler'][-1]:.0f}, bridge with no "
                  f"session enabling it {results['bridge_off'][-1]:.0f} CPU ns/record", file=sys.stderr, flush=True)
        ld.lttng("stop", "p")
        tw.cli("stop", "p")
        expected = (calls + 1000) * (repeat + 1)
        for side, trace in (("lttng", ltrace), ("tracewire", twtrace)):
            read, discarded = _bt_count(trace)
            print(f"bench: logging_bridge {side}: {read} events in the trace, {discarded} reported discarded, "
                  f"{expected} emitted", file=sys.stderr)
            if read + discarded != expected:
                print(f"bench: logging_bridge {side}: the trace does not account for every record", file=sys.stderr)
    finally:
        for d in (ld, tw, tw_off):
            if d is not None:
                d.close()
        shutil.rmtree(out, ignore_errors=True)
        _remove_new_wait_shm(shm_before)
    med = {k: statistics.median(v) for k, v in results.items()}
    med["ratio"] = med["bridge"] / med["lttng"]
    for k, v in results.items():
        print(f"bench: logging_bridge {k}: median {med[k]:.0f} ({min(v):.0f}-{max(v):.0f}) CPU ns/record over "
              f"{len(v)} rounds", file=sys.stderr)
    for name, k in figures.items():
        if k == "ratio":
            emit(name, med[k], "bridge/lttng", 4)
        else:
            emit(name, med[k], "ns/record")


def _installed_bytecode() -> None:
    """Run every tracewire process as an installed package runs: compiled to
    bytecode once (``pip install`` does it), not recompiled at each start.
    Without this, a shell with PYTHONDONTWRITEBYTECODE set makes every CLI
    call and daemon start compile the sources again, which the ``stop`` and
    start-up figures would include."""
    import compileall

    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False
    for pkg in ("tracewire", "sessiond", "consumerd", "relayd"):
        compileall.compile_dir(os.path.join(REPO_DIR, pkg), quiet=1)


# ----------------------------------------------------------------- metrics (--metrics-listen)


def _scrape(port: int) -> int:
    """One GET /metrics; returns the body's size."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"/metrics answered {resp.status}")
        return len(body)
    finally:
        conn.close()


def _log_port(path: str, pattern: str, deadline: float) -> int:
    while True:
        with open(path, errors="replace") as f:
            m = re.search(pattern, f.read())
        if m:
            return int(m.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {pattern!r} in {path}")
        time.sleep(0.05)


def bench_metrics(repeat: int, scrapes: int = 200, apps: int = 4) -> None:
    """metrics_scrape_cpu_ms_*: the CPU (utime+stime) one scrape of /metrics
    costs the target (sessiond and its consumerd) and the relay, with one
    session of ``apps`` streams through a loopback relay; best of N."""
    target: list[float] = []
    relay_ms: list[float] = []
    for _ in range(repeat):
        work = tempfile.mkdtemp(prefix="twbm", dir="/tmp")
        d = Daemons()
        d.env["TRACEWIRE_SESSIOND_METRICS_LISTEN"] = "127.0.0.1:0"
        relay = None
        try:
            relay = Relay(os.path.join(work, "out"), os.path.join(work, "relay.log"),
                          ("--metrics-listen", "127.0.0.1:0"))
            rmet = _log_port(os.path.join(work, "relay.log"), r"metrics on http://127\.0\.0\.1:(\d+)",
                             time.monotonic() + 30)
            d.cli("create", "m", "--url", f"tw://127.0.0.1:{relay.port}")
            d.cli("enable-event", "demo:*")
            d.cli("start")
            procs = [subprocess.Popen([os.path.join(BIN_DIR, "tracewire-demo"), "--events", "2000"], env=d.env,
                                      stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL) for _ in range(apps)]
            for p in procs:
                p.wait(timeout=600)
            d.cli("stop")
            smet = _log_port(os.path.join(d.rundir, "sessiond.log"), r"metrics on http://127\.0\.0\.1:(\d+)",
                             time.monotonic() + 30)
            sessiond = max(d.pids)
            for port, pids, out in ((smet, _tree(sessiond), target), (rmet, [relay.pid], relay_ms)):
                _scrape(port)
                before = sum(_cpu_s(p) for p in pids)
                for _ in range(scrapes):
                    _scrape(port)
                out.append((sum(_cpu_s(p) for p in pids) - before) / scrapes * 1000)
        finally:
            d.close()
            if relay is not None:
                relay.close()
            shutil.rmtree(work, ignore_errors=True)
    emit("metrics_scrape_cpu_ms_target", min(target), "ms")
    emit("metrics_scrape_cpu_ms_relay", min(relay_ms), "ms")


def _metrics_lag_run(streams: int, scrapers: int, seconds: float) -> tuple[float, float, int]:
    """One in-process run: a metrics endpoint over a RelayCounters of
    ``streams`` streams, ``scrapers`` threads scraping it without pause; a
    trio task measures how late its 1 ms sleeps wake.  Returns (p50, p99 of
    the lateness in ms, scrapes served)."""
    import http.client
    import threading

    import trio

    from relayd.metrics import RelayCounters
    from tracewire.metrics import RelaySnapshot, SnapshotCollector, relay_families
    from tracewire.metrics_config import MetricsConfig
    from tracewire.metrics_server import LoopSnapshot, serve_metrics

    counters = RelayCounters()
    for i in range(streams):
        rel = f"host{i % 10}/s{i % 50}-20260101T000000/ust/uid/0/64-bit/channel0_{i}"
        counters.session_opened(rel.rsplit("/", 5)[0])
        counters.stream_opened(rel)
        counters.written(rel, 262144, 60000, 0)

    def scrape_loop(port: int, stop: threading.Event, served: list[int]) -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/metrics")
            conn.getresponse().read()
            conn.close()
            served.append(1)

    async def main() -> tuple[float, float, int]:
        async def take() -> RelaySnapshot:
            return counters.snapshot({})

        late: list[float] = []
        served: list[int] = []
        async with trio.open_nursery() as nursery:
            snap = LoopSnapshot(take, 10.0)
            collector = SnapshotCollector(snap.get, relay_families, lambda s: s.processes, RelaySnapshot())
            _host, port = await nursery.start(functools.partial(
                serve_metrics, MetricsConfig("127.0.0.1", 0), collector, snap))
            stop = threading.Event()
            threads = [threading.Thread(target=scrape_loop, args=(port, stop, served)) for _ in range(scrapers)]
            for t in threads:
                t.start()
            end = trio.current_time() + seconds
            while trio.current_time() < end:
                t0 = time.perf_counter()
                await trio.sleep(0.001)
                late.append((time.perf_counter() - t0 - 0.001) * 1000)
            stop.set()
            for t in threads:
                await trio.to_thread.run_sync(t.join)
            nursery.cancel_scope.cancel()
        late.sort()
        return statistics.median(late), late[int(len(late) * 0.99)], len(served)

    return trio.run(main)


def bench_metrics_lag(repeat: int, streams: int = 5000, scrapers: int = 4) -> None:
    """metrics_loop_lag_ms_{p50,p99}: how late the daemon's trio loop wakes
    (a 1 ms sleep) while ``scrapers`` threads scrape a relay endpoint of
    ``streams`` streams without pause (GIL contention); best of N."""
    idle = [_metrics_lag_run(streams, 0, 3.0) for _ in range(repeat)]
    runs = [_metrics_lag_run(streams, scrapers, 3.0) for _ in range(repeat)]
    emit("metrics_loop_lag_ms_p50", min(r[0] for r in runs), "ms")
    emit("metrics_loop_lag_ms_p99", min(r[1] for r in runs), "ms")
    emit("metrics_loop_lag_ms_p99_unscraped", min(r[1] for r in idle), "ms")


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
    ap.add_argument("--fanin-targets", type=int, default=FANIN_TARGETS,
                    help=f"fanin: targets streaming into one relay at once (default {FANIN_TARGETS})")
    ap.add_argument("--fanin-events", type=int, default=FANIN_EVENTS,
                    help=f"fanin: demo:tick events per target (default {FANIN_EVENTS:,})")
    ap.add_argument("--python-calls", type=int, default=200_000,
                    help="python_tracer: timed calls per round (default 200,000)")
    a = ap.parse_args()
    _installed_bytecode()

    def want(prefix: str) -> bool:
        return not a.only or prefix.startswith(a.only) or a.only.startswith(prefix)

    if want("tracer_disabled"):
        bench_disabled(1_000_000, max(a.repeat, 5))
    for payload in (0, 256):
        if want("tracer_enabled"):
            bench_enabled_forked_consumer(payload, a.tracer_events, a.repeat)
        if want("tracer_overwrite"):
            bench_overwrite_tracer(payload, a.tracer_events, a.repeat)
    if want("snapshot_record"):
        bench_snapshot(a.repeat)
    for payload in (0, 256):
        if want("local_pipeline") or want("tracer_enabled_ns_per_event_real"):
            bench_pipeline(payload, a.events, a.repeat)
    if want("daemon_pss_mb_idle"):
        bench_daemon_memory(a.repeat)
    for compress in ("zstd", "none"):
        bench_relay(compress, 256, a.events, a.repeat, want)
    bench_relay("zstd", 0, a.events, a.repeat, want)
    bench_blocking(a.events, a.repeat, want)
    if want("live_latency"):
        bench_live(a.repeat)
    # --only relay_fsync (or a shorter prefix of it) prints all of its
    # figures, relayd_fsync_cpu_* included.
    bench_relay_fsync(a.fsync_mb, a.fsync_dir, a.repeat, want, "relay_fsync".startswith(a.only))
    bench_fanin(a.fanin_targets, a.fanin_events, want)
    # --only vs_lttng (or a prefix of it) also runs the python_tracer_* figures.
    bench_vs_lttng(a.events, a.repeat, want)
    bench_python_tracer(a.python_calls, a.repeat, want, VS_PREFIX.startswith(a.only))
    # --only logging (or a prefix of it) prints every logging_bridge figure.
    bench_logging_bridge(a.python_calls, a.repeat, want,
                         "logging_bridge".startswith(a.only) or a.only.startswith("logging_bridge"))
    if want("metrics_scrape"):
        bench_metrics(a.repeat)
    if want("metrics_loop_lag"):
        bench_metrics_lag(a.repeat)


if __name__ == "__main__":
    main()
