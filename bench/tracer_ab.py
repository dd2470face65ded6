#!/usr/bin/env python3
"""A/B of the tracer's recording body across checkouts, in one process.

Loads ``tracewire/_tracer.py`` from each tree given as ``NAME=DIR`` (e.g. a
``git worktree`` of main and this one), attaches one tracepoint
``demo:log(seq=int, msg=str)`` of each to its own real ring buffer (4 x 256
KiB, no daemons; the "consumer" releases everything before each round), and
times the loop of ``python_tracer_ns_per_event_tracewire``
(``log(seq=i, msg='request %d %s' % (i, 'path'))``) in CPU time
(``time.process_time_ns``), rounds interleaved across the trees.  Prints,
per tree, the spread of ns per call and the per-round ratio to the first
tree.  Not a ``bench/run.py`` figure: a tool for deciding whether a change
to the generated code pays, on a machine too busy for wall-clock figures.

Usage: ``python bench/tracer_ab.py CALLS ROUNDS NAME=DIR [NAME=DIR ...]``,
e.g. ``/usr/bin/python3 bench/tracer_ab.py 20000 40 main=/tmp/base .=.``.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def _attach(name: str, tree: str, ringbuf: Any) -> tuple[Callable[..., None], Any]:
    """The emitter of ``tree``'s tracer attached to a fresh buffer, and the
    buffer's producer."""
    spec = importlib.util.spec_from_file_location(f"tracer_{name}", os.path.join(tree, "tracewire", "_tracer.py"))
    if spec is None or spec.loader is None:
        sys.exit(f"tracer_ab: no tracewire/_tracer.py under {tree}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    geometry = ringbuf.BufferSpec(256 * 1024, 4)
    fd = ringbuf.create_buffer(geometry, time.monotonic_ns())
    producer = ringbuf.Producer(fd, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), geometry)
    os.close(fd)
    tp = mod.Tracepoint(None, 0, "demo:log", [("seq", "int"), ("msg", "str")])
    tp.set_streams((mod._StreamW("s", producer),))
    return tp.emit, producer


def _round(log: Callable[..., None], producer: Any, calls: int) -> float:
    """CPU ns per call of one round."""
    producer.q[5] = producer.pos  # ringbuf.Q_CONSUMED: the consumer has read everything
    t0 = time.process_time_ns()
    for i in range(calls):
        log(seq=i, msg="request %d %s" % (i, "path"))  # noqa: UP031 -- the work python_tracer times
    return (time.process_time_ns() - t0) / calls


def main() -> None:
    if len(sys.argv) < 4 or not all("=" in a for a in sys.argv[3:]):
        sys.exit(__doc__.split("\n\n")[-1])
    calls, rounds = int(sys.argv[1]), int(sys.argv[2])
    trees = dict(a.split("=", 1) for a in sys.argv[3:])
    sys.path.insert(0, os.path.abspath(next(iter(trees.values()))))
    from tracewire import ringbuf

    sides = {name: _attach(name, tree, ringbuf) for name, tree in trees.items()}
    res: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, (log, producer) in sides.items():
            res[name].append(_round(log, producer, calls))
    first = next(iter(res))
    for name, (_log, producer) in sides.items():
        if producer.discarded:
            print(f"tracer_ab: {name}: {producer.discarded} events discarded", file=sys.stderr)
        v = res[name]
        q = statistics.quantiles(v, n=4)
        r = [x / y for x, y in zip(v, res[first])]
        rq = statistics.quantiles(r, n=4)
        print(f"{name:8s} CPU ns/call: min {min(v):6.0f} q1 {q[0]:6.0f} median {statistics.median(v):6.0f} "
              f"q3 {q[2]:6.0f} | / {first} per round: median {statistics.median(r):.3f} "
              f"(q1 {rq[0]:.3f}, q3 {rq[2]:.3f})")


if __name__ == "__main__":
    main()
