"""Filesystems that fail on purpose, for the relay's fault tests.

``small_tmpfs`` mounts a size-limited tmpfs (a disk that fills, grows, or is
remounted read-only); ``frozen_ext4`` mounts an ext4 image on a loop device
that the test can freeze (``fsfreeze``: every write blocks until it thaws).
Both need root (CI runs as root); elsewhere the test is skipped with the
reason.  Every mount is undone at teardown, thawed first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["FaultFS", "fill", "frozen_ext4", "small_tmpfs"]


def _need_root(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem to fill or freeze needs root (CI runs as root)")
    for tool in ("mount", "umount", *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class FaultFS:
    """A mounted filesystem a test can fill, grow, make read-only or freeze."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.frozen = False

    def resize(self, size: str) -> None:
        """tmpfs only: a new size limit (``"4m"``)."""
        _run("mount", "-o", f"remount,size={size}", str(self.path))

    def read_only(self, ro: bool) -> None:
        _run("mount", "-o", "remount,ro" if ro else "remount,rw", str(self.path))

    def freeze(self) -> None:
        _run("fsfreeze", "-f", str(self.path))
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            _run("fsfreeze", "-u", str(self.path))
            self.frozen = False


def fill(directory: Path, name: str = "filler") -> Path:
    """Writes a file until the filesystem under ``directory`` is full."""
    path = directory / name
    chunk = b"\0" * 65536
    with open(path, "ab", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError:
                break
        while True:  # the last partial page
            try:
                f.write(b"\0")
            except OSError:
                break
    return path


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[FaultFS]:
    """A tmpfs of ``size`` mounted at ``path`` (created)."""
    _need_root()
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tracewire-test", str(path))
    fs = FaultFS(path)
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextmanager
def frozen_ext4(path: Path, image: Path, size_mb: int = 64) -> Iterator[FaultFS]:
    """An ext4 image mounted (loop) at ``path``; call ``freeze()`` on it."""
    _need_root("mkfs.ext4", "fsfreeze")
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    _run("mkfs.ext4", "-q", "-F", str(image))
    path.mkdir(parents=True, exist_ok=True)
    try:
        _run("mount", "-o", "loop", str(image), str(path))
    except RuntimeError as exc:
        pytest.skip(f"cannot mount a loop device here: {exc}")
    fs = FaultFS(path)
    try:
        yield fs
    finally:
        fs.thaw()
        subprocess.run(["umount", str(path)], capture_output=True, check=False)
