"""Test support: a live viewer subprocess (babeltrace2 -i lttng-live, or
`tracewire view --follow`) whose output is read through a pseudo-terminal,
so that it is line-buffered, with the wall-clock time each line arrived;
and ``Viewer``, a viewer in the test's own trio loop, one request at a time.

A reader thread collects the lines; nothing here sleeps for a fixed time: the
waits poll a condition up to a generous deadline.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import threading
import time
import tty
from collections.abc import Callable

import trio

from tracewire.live import ReplyDecoder, Request, encode_request

# babeltrace2 --clock-seconds: "[1764690992.123456789] ..."
_TS = re.compile(r"^\[(\d+)\.(\d{9})\]")


class LiveViewer:
    """A viewer process writing to a pty; ``lines`` holds (arrival time_ns, text)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, stderr_path: str | None = None) -> None:
        master, slave = pty.openpty()
        tty.setraw(slave)  # no "\r\n", no echo
        try:
            with open(stderr_path or os.devnull, "wb") as err:
                self.proc = subprocess.Popen(argv, stdout=slave, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                             start_new_session=True)
        finally:
            os.close(slave)
        self._master = master
        self.lines: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        tail = b""
        while True:
            try:
                chunk = os.read(self._master, 1 << 16)
            except OSError:  # EIO: every writer closed the pty
                break
            if not chunk:
                break
            now = time.time_ns()
            data = tail + chunk
            *done, tail = data.split(b"\n")
            with self._lock:
                self.lines.extend((now, line.decode(errors="replace")) for line in done)
        if tail:
            with self._lock:
                self.lines.append((time.time_ns(), tail.decode(errors="replace")))
        os.close(self._master)

    def count(self, pred: Callable[[str], bool] = lambda _: True) -> int:
        with self._lock:
            return sum(1 for _, line in self.lines if pred(line))

    def wait_for(self, pred: Callable[[str], bool], n: int = 1, timeout: float = 60.0) -> bool:
        """Waits until ``n`` lines match ``pred`` (False at the deadline or
        when the viewer exits first with fewer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(pred) >= n:
                return True
            if self.proc.poll() is not None:
                self._thread.join(timeout=5)
                return self.count(pred) >= n
            time.sleep(0.02)
        return False

    def wait(self, timeout: float = 60.0) -> int:
        """Waits for the viewer to exit; returns its exit status."""
        rc = self.proc.wait(timeout=timeout)
        self._thread.join(timeout=10)
        return rc

    def text_lines(self) -> list[str]:
        with self._lock:
            return [line for _, line in self.lines]

    def latencies_ms(self, since_ns: int = 0) -> list[float]:
        """Per event line (babeltrace2 --clock-seconds format) of an event
        stamped at or after ``since_ns``: arrival time minus the event's
        timestamp, in milliseconds."""
        out = []
        with self._lock:
            for arrived, line in self.lines:
                m = _TS.match(line)
                if m:
                    ts = int(m[1]) * 1_000_000_000 + int(m[2])
                    if ts >= since_ns:
                        out.append((arrived - ts) / 1e6)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._thread.join(timeout=10)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


class Viewer:
    """A live viewer connection in a test's trio loop: one request, its reply."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.dec = ReplyDecoder()

    async def ask(self, req: Request):
        self.dec.expect(req.command)
        await self.stream.send_all(encode_request(req))
        while (r := self.dec.next_event()) is None:
            self.dec.receive_data(await self.stream.receive_some(1 << 16))
        return r
