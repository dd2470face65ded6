"""``tracewire-demo``: a traced demo app and load generator.

Emits ``demo:tick(seq, msg)`` with seq 0..N-1 and a payload string of
``--payload-bytes`` bytes, at full speed or at ``--rate`` events per second.
It exits once its buffers are handed over to the consumer.
"""

from __future__ import annotations

import sys
import time

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--events", "-n", type=click.IntRange(0), default=1000, show_default=True,
              help="Number of demo:tick events to emit.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Events per second (default: as fast as possible).")
@click.option("--payload-bytes", type=click.IntRange(0, 60000), default=0, show_default=True,
              help="Length of the msg string in each event.")
@click.option("--progress-every", type=click.IntRange(0), default=0, show_default=True,
              help="Print 'emitted K' on stdout after every K-th event (0: only at the end).")
def main(events: int, rate: float | None, payload_bytes: int, progress_every: int) -> None:
    """Emit EVENTS demo:tick events (seq 0..N-1) through the tracer."""
    from tracewire import tracepoint

    tick = tracepoint("demo:tick", seq=int, msg=str)
    msg = "x" * payload_bytes
    out = sys.stdout
    t0 = time.monotonic()
    if rate is None and not progress_every:
        for seq in range(events):
            tick(seq=seq, msg=msg)
    else:
        batch = max(1, min(1000, int(rate / 100) if rate else progress_every))
        if progress_every:
            batch = min(batch, progress_every)
        seq = 0
        while seq < events:
            end = min(events, seq + batch)
            for s in range(seq, end):
                tick(seq=s, msg=msg)
            seq = end
            if progress_every and (seq % progress_every == 0 or seq == events):
                out.write(f"emitted {seq}\n")
                out.flush()
            if rate:
                delay = t0 + seq / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    elapsed = time.monotonic() - t0
    out.write(f"emitted {events} events in {elapsed:.3f} s\n")
    out.flush()


if __name__ == "__main__":
    main()
