"""The package builds without setuptools warnings and carries the status page's files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .processes import ROOT

NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "var", "build", "bench", "tests", "*.egg-info", "__pycache__", ".*_cache"
)


def test_the_wheel_builds_without_warnings_and_holds_templates_and_static(
    tmp_path: Path,
) -> None:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)  # a build writes beside the sources
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    # pip's own notes about the offline index are not the build's business.
    output = [
        line
        for line in (built.stdout + built.stderr).splitlines()
        if not line.startswith("WARNING: Location")
    ]
    assert not [line for line in output if "Warning" in line or "absent from the" in line]
    (wheel,) = tmp_path.glob("hms_mgmt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in (
        "monitor/page/templates/base.html",
        "monitor/page/static/page.css",
        "monitor/py.typed",
        "monitor/probing/worker.py",
    ):
        assert data in names
    assert not [name for name in names if name.startswith(("tests/", "examples/", "bench/"))]
