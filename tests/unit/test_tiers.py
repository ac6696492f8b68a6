"""
The test tiers keep their shape: helpers live in tests/support (which bench/ and bin/ may use),
never in a test module another imports; the unit tier starts no real server or proxy process,
so it runs anywhere, fast, without root or the Debian packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
# Support modules that start real servers or processes, or talk to them: integration's.
REAL = {"proxy", "upstream", "forward", "blackhole", "processes", "wire", "client", "tlsclient",
        "metrics", "image", "tools"}


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def python_files():
    yield from (REPO / "bench").glob("*.py")
    yield from (p for p in (REPO / "bin").iterdir() if p.read_bytes().startswith(b"#!/usr/bin/env python"))
    yield from TESTS.rglob("*.py")


def test_no_module_imports_a_test_module_or_a_conftest():
    wrong = {
        f"{path.relative_to(REPO)}: {name}"
        for path in python_files()
        for name in imported(path)
        if name.startswith("tests.") and (name.rsplit(".", 1)[-1].startswith("test_") or name.endswith("conftest"))
    }
    assert not wrong, "move the helper to tests/support:\n" + "\n".join(sorted(wrong))


def test_every_tier_is_a_package_and_holds_only_tests_and_its_conftest():
    for tier in ("unit", "integration", "deploy", "slow"):
        assert (TESTS / tier / "__init__.py").exists(), tier
        others = {
            p.name for p in (TESTS / tier).glob("*.py")
            if not p.name.startswith("test_") and p.name not in ("__init__.py", "conftest.py")
        }
        assert not others, f"helpers belong in tests/support, not tests/{tier}: {sorted(others)}"


def test_the_unit_tier_uses_no_real_server_or_process():
    wrong = {
        f"{path.name}: {name}"
        for path in (TESTS / "unit").glob("test_*.py")
        for name in imported(path)
        if name.startswith("tests.support.") and name.split(".")[2] in REAL
    }
    wrong |= {
        f"{path.name}: the upstream fixture (a real TLS server)"
        for path in (TESTS / "unit").glob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and "upstream" in {a.arg for a in node.args.args}
    }
    assert not wrong, "real servers and processes are tests/integration's:\n" + "\n".join(sorted(wrong))
