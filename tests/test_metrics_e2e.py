"""End to end: tracewire-relayd and a target's sessiond, both with
--metrics-listen, a demo app streaming a few thousand events through the
relay; both /metrics are scraped over HTTP while the app emits and after
``stop``, parsed with prometheus_client's parser, and the byte counters are
compared with what ``tracewire status`` reports, to the packet and the byte.

Robust on a loaded machine: generous deadlines, no timing assertions.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tracewire import ops
from tracewire.cli import Client

from conftest import BIN_DIR, TW, _alive, short_tmpdir

RELAYD = os.path.join(BIN_DIR, "tracewire-relayd")
DEADLINE = 120.0

Samples = dict[str, list[tuple[dict[str, str], float]]]


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen | None = None) -> re.Match[str]:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"no {pattern!r} in {path} within {DEADLINE:.0f} s")


def scrape(port: int) -> Samples:
    """GET /metrics, parsed with prometheus_client: {sample name: [(labels, value)]}."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, body
    finally:
        conn.close()
    out: Samples = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


@pytest.fixture
def relay() -> Iterator[tuple[int, int, Path]]:
    """A tracewire-relayd with --metrics-listen: (port, metrics port, output)."""
    out = Path(short_tmpdir("twmout"))
    log = out.parent / (out.name + ".log")
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [RELAYD, "--output", str(out), "--listen", "127.0.0.1:0", "--live-listen", "off",
             "--metrics-listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        m = _wait_for(log, r"listening on 127\.0\.0\.1:(\d+), metrics on http://127\.0\.0\.1:(\d+)/metrics", proc)
        yield int(m.group(1)), int(m.group(2)), out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        shutil.rmtree(out, ignore_errors=True)
        log.unlink(missing_ok=True)


def test_scrapes_match_status_to_the_packet(tw: TW, relay: tuple[int, int, Path]) -> None:
    port, relay_metrics, _out = relay
    tw.env["TRACEWIRE_SESSIOND_METRICS_LISTEN"] = "127.0.0.1:0"
    url = f"tw://127.0.0.1:{port}"
    tw.cli("create", "m", "--url", url)
    tw.cli("enable-event", "demo:*")
    tw.cli("start")
    target_metrics = int(_wait_for(Path(tw.rundir) / "sessiond.log",
                                   r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))

    # While the app emits: both endpoints answer and parse.
    app = tw.demo_popen("--events", "4000", "--payload-bytes", "200", "--rate", "4000", "--progress-every", "500")
    assert app.stdout is not None
    app.stdout.readline()  # "emitted 500": the app is running
    during = scrape(target_metrics)
    roles = {labels["process"] for labels, _ in during["tracewire_process_resident_memory_bytes"]}
    assert {"sessiond", "consumerd"} <= roles
    assert all(v > 0 for _, v in during["tracewire_process_resident_memory_bytes"])
    assert "tracewire_relay_connections" in scrape(relay_metrics)
    assert app.wait(timeout=DEADLINE) == 0

    tw.cli("stop")
    status = Client(tw.rundir).request(ops.StatusRequest(session="m"))
    streams = status["streams"]
    assert streams and sum(s["packets"] for s in streams) > 1
    target = scrape(target_metrics)
    relayed = scrape(relay_metrics)

    def target_value(name: str, path: str) -> float:
        (value,) = [v for labels, v in target[name] if labels["session"] == "m" and labels["stream"] == path]
        return value

    def relay_value(name: str, path: str) -> float:
        rel = path.removeprefix(url + "/")
        (value,) = [v for labels, v in relayed[name]
                    if labels["session"].startswith("m-") and labels["stream"] == rel]
        return value

    for s in streams:
        assert s["unacked"] == 0
        for what in ("packets", "raw_bytes", "wire_bytes"):
            assert target_value(f"tracewire_stream_{what}_total", s["path"]) == s[what], (what, s)
            assert relay_value(f"tracewire_relay_stream_{what}_total", s["path"]) == s[what], (what, s)
        assert target_value("tracewire_stream_events_discarded_total", s["path"]) == s["discarded"]
        assert target_value("tracewire_stream_events_total", s["path"]) == s["events"] > 0
        assert target_value("tracewire_stream_unacked_packets", s["path"]) == 0
        assert target_value("tracewire_stream_spool_bytes", s["path"]) == 0
    assert [v for labels, v in target["tracewire_session_reconnects_total"] if labels["session"] == "m"] == [0]
    assert target["tracewire_metrics_unanswered_sessions"] == [({}, 0)]
    assert relayed["tracewire_relay_auth_failures_total"] == [({}, 0)]
    pid = tw.sessiond_pid()
    assert pid is not None and _alive(pid)
