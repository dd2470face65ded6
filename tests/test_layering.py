"""The shared core stays free of I/O frameworks (STYLE: a protocol core
without I/O): these modules never import trio, socket or click, and the
pure codecs not even time.  The daemons and the CLI wrap them.  A module
name that is a package (``ctf``) stands for every module in it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "tracewire"
NO_IO = ["wire", "live", "ctf", "control", "names", "url", "streamfile", "ringbuf", "rundir", "topology", "keyfile",
         "watch", "saved"]
NO_CLOCK = ["wire", "live", "ctf", "control", "names", "url", "streamfile", "rundir", "topology", "keyfile",
            "saved"]
# Importable without the third-party dependencies (cbor2, zstandard...).
STDLIB_ONLY = ["ctf", "live", "keyfile", "url", "watch"]


def _files(modules: list[str]) -> list[str]:
    """The source files (relative to tracewire/, without .py) of `modules`."""
    out: list[str] = []
    for module in modules:
        package = CORE / module
        if package.is_dir():
            found = sorted(p.relative_to(CORE).with_suffix("").as_posix() for p in package.glob("*.py"))
            assert found, f"package {module} has no modules"
            out += found
        else:
            assert (CORE / f"{module}.py").is_file(), f"no module tracewire/{module}.py"
            out.append(module)
    return out


def _imports(module: str, *, full: bool = False) -> set[str]:
    tree = ast.parse((CORE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            found.update(a.name if full else a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module if full else node.module.split(".")[0])
    return found


def test_packages_are_expanded() -> None:
    files = _files(["ctf"])
    assert "ctf/__init__" in files and "ctf/stream_reader" in files and "ctf/writer" in files


@pytest.mark.parametrize("module", _files(NO_IO))
def test_core_module_imports_no_io_framework(module: str) -> None:
    assert not _imports(module) & {"trio", "socket", "click", "asyncio"}, module


@pytest.mark.parametrize("module", _files(NO_CLOCK))
def test_pure_codec_reads_no_clock(module: str) -> None:
    assert "time" not in _imports(module), module


@pytest.mark.parametrize("module", _files(STDLIB_ONLY))
def test_stdlib_only_module(module: str) -> None:
    own = "tracewire." + module.split("/")[0]  # a package may import its own modules
    for name in _imports(module, full=True):
        assert (
            name.split(".")[0] in sys.stdlib_module_names or name == own or name.startswith(own + ".")
        ), f"{module} imports {name}"
