"""The shared core stays free of I/O frameworks (STYLE: a protocol core
without I/O): these modules never import trio, socket or click, and the
pure codecs not even time.  The daemons and the CLI wrap them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "tracewire"
NO_IO = ["wire", "ctf", "control", "names", "url", "streamfile", "ringbuf", "rundir", "topology"]
NO_CLOCK = ["wire", "ctf", "control", "names", "url", "streamfile", "rundir", "topology"]


def _imports(module: str) -> set[str]:
    tree = ast.parse((CORE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("module", NO_IO)
def test_core_module_imports_no_io_framework(module: str) -> None:
    assert not _imports(module) & {"trio", "socket", "click", "asyncio"}, module


@pytest.mark.parametrize("module", NO_CLOCK)
def test_pure_codec_reads_no_clock(module: str) -> None:
    assert "time" not in _imports(module), module
