"""The Python SDK (client/, import name hms_mgmt) against a real daemon process."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from .processes import ROOT

DAEMON_PACKAGES = {"registry", "scheduler", "monitor", "workflows"}


def imported_roots(package: Path) -> set[str]:
    """The top-level names every module under `package` imports (relative imports aside)."""
    roots: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
    return roots


def test_the_sdk_and_the_daemon_never_import_each_other() -> None:
    assert imported_roots(ROOT / "client" / "hms_mgmt").isdisjoint(DAEMON_PACKAGES)
    for package in DAEMON_PACKAGES:
        assert "hms_mgmt" not in imported_roots(ROOT / package), package


def test_the_sdk_is_versioned_with_the_daemon() -> None:
    import hms_mgmt

    daemon = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    sdk = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text(encoding="utf-8"))
    assert sdk["project"]["version"] == daemon["project"]["version"] == hms_mgmt.__version__
    assert sdk["project"]["dependencies"] == ["aiohttp>=3.11,<4"]
