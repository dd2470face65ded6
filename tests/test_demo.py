"""tracewire-demo's log-like payload (``--payload-kind log``): realistic
compression figures need text that is neither random nor a run of 'x'."""

from __future__ import annotations

import zstandard
from click.testing import CliRunner

from tracewire.demo import log_payloads, main


def test_log_payloads_are_exact_distinct_repeatable_and_compress_like_text() -> None:
    lines = log_payloads(256)
    assert len(lines) == 4096 and len(set(lines)) == 4096
    assert all(len(line) == 256 for line in lines)
    assert lines == log_payloads(256)  # the same for the same seed: runs compare
    raw = "".join(lines[:1000]).encode()
    ratio = len(zstandard.ZstdCompressor(level=1).compress(raw)) / len(raw)
    fill = b"x" * len(raw)
    assert 0.2 < ratio < 0.8  # text-like: far from random (1.0) and from 'xxx' (~0.0001)
    assert len(zstandard.ZstdCompressor(level=1).compress(fill)) / len(fill) < 0.01
    assert log_payloads(0) == [""] * 4096


def test_demo_runs_with_a_log_payload_and_no_session(monkeypatch) -> None:
    # No sessiond in this run directory: the tracepoints are disabled.
    monkeypatch.setenv("TRACEWIRE_RUNDIR", "/nonexistent-tracewire-rundir")
    r = CliRunner().invoke(main, ["--events", "100", "--payload-bytes", "64", "--payload-kind", "log"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("emitted 100 events in ")
