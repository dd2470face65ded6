"""``tracewire-demo``: a traced demo app and load generator.

Emits ``demo:tick(seq, msg)`` with seq 0..N-1 and a payload string of
``--payload-bytes`` bytes, at full speed or at ``--rate`` events per second.
``--payload-kind log`` makes the payload log-like text (timestamps, numbers,
paths, words: what a compressor meets in real traces) instead of a run of
``x``, which flatters it.  It exits once its buffers are handed over to the
consumer.
"""

from __future__ import annotations

import random
import sys
import time

import click

_WORDS = ("request", "served", "user", "session", "cache", "miss", "hit", "timeout", "retry", "connect",
          "read", "write", "flush", "queue", "worker", "started", "done", "error", "warning", "ok",
          "GET", "POST", "bytes", "in", "from", "to", "id", "status", "latency", "db", "query")
_PATHS = ("/api/v1/users", "/api/v1/orders", "/static/app.js", "/var/lib/app/data.db", "/etc/app/conf.d",
          "/healthz", "/metrics", "/home/build/src/module.py", "/tmp/upload", "/srv/www/index.html")


def log_payloads(size: int, count: int = 4096, seed: int = 1) -> list[str]:
    """``count`` distinct log-like lines of exactly ``size`` characters,
    the same for a given seed (so runs compare): a level, a path, words and
    varied numbers.  Made once, before tracing: emitting costs the same as
    with a fixed payload."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = [rng.choice(("INFO", "DEBUG", "WARN", "ERROR")), f"{rng.randrange(24):02d}:"
                 f"{rng.randrange(60):02d}:{rng.randrange(60):02d}.{rng.randrange(1000):03d}",
                 rng.choice(_PATHS)]
        n = 0
        while n < size:
            parts.append(rng.choice(_WORDS) if rng.random() < 0.6 else str(rng.randrange(10 ** rng.randrange(1, 9))))
            n = sum(len(p) + 1 for p in parts)
        out.append(" ".join(parts)[:size].ljust(size))
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--events", "-n", type=click.IntRange(0), default=1000, show_default=True,
              help="Number of demo:tick events to emit.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Events per second (default: as fast as possible).")
@click.option("--payload-bytes", type=click.IntRange(0, 60000), default=0, show_default=True,
              help="Length of the msg string in each event.")
@click.option("--payload-kind", type=click.Choice(["fill", "log"]), default="fill", show_default=True,
              help="fill: the payload is 'xxx...'; log: log-like text (numbers, paths, words), for realistic "
                   "compression figures.")
@click.option("--progress-every", type=click.IntRange(0), default=0, show_default=True,
              help="Print 'emitted K' on stdout after every K-th event (0: only at the end).")
def main(events: int, rate: float | None, payload_bytes: int, payload_kind: str, progress_every: int) -> None:
    """Emit EVENTS demo:tick events (seq 0..N-1) through the tracer."""
    from tracewire import tracepoint

    tick = tracepoint("demo:tick", seq=int, msg=str)
    msg = "x" * payload_bytes
    msgs = log_payloads(payload_bytes) if payload_kind == "log" else [msg]
    mask = len(msgs) - 1  # a power of two: msgs[seq & mask]
    out = sys.stdout
    t0 = time.monotonic()
    if rate is None and not progress_every and payload_kind == "fill":
        for seq in range(events):
            tick(seq=seq, msg=msg)
    elif rate is None and not progress_every:
        for seq in range(events):
            tick(seq=seq, msg=msgs[seq & mask])
    else:
        batch = max(1, min(1000, int(rate / 100) if rate else progress_every))
        if progress_every:
            batch = min(batch, progress_every)
        seq = 0
        while seq < events:
            end = min(events, seq + batch)
            for s in range(seq, end):
                tick(seq=s, msg=msgs[s & mask])
            seq = end
            if progress_every and (seq % progress_every == 0 or seq == events):
                out.write(f"emitted {seq}\n")
                out.flush()
            if rate and seq < events:  # no wait after the last event
                delay = t0 + seq / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    elapsed = time.monotonic() - t0
    out.write(f"emitted {events} events in {elapsed:.3f} s\n")
    out.flush()


if __name__ == "__main__":
    main()
