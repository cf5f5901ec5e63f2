"""The SDK installed alone in a fresh venv: aiohttp only, no daemon package, and it works.

One venv per test session (`pip install ./client` from PyPI takes tens of seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from .processes import ROOT, running_daemon

SERVER_ONLY = {"hms-mgmt", "pydantic", "sqlite-utils", "jinja2", "apscheduler", "orjson"}
DAEMON_PACKAGES = ("registry", "scheduler", "monitor", "workflows", "pydantic", "jinja2")

SCRIPT = """
import json, sys
import hms_mgmt
from hms_mgmt import SyncClient

with SyncClient(sys.argv[1]) as hms:
    report = hms.run("Announce", {"n": 1}, timeout=10)
    event_id = hms.publish("grant.submitted", {"n": 2})
    events = hms.subscribe("grant.submitted", last_event_id=event_id - 1)
    event = next(events)
    events.close()
    looked_up = hms.lookup("payments")
daemon_packages = sys.argv[2].split(",")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in daemon_packages)
print(json.dumps({
    "file": hms_mgmt.__file__,
    "status": report.status,
    "event": event.data,
    "lookup": looked_up,
    "heavy": heavy,
}))
"""


@pytest.fixture(scope="session")
def sdk_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with `pip install ./client` and nothing else: its python."""
    home = tmp_path_factory.mktemp("sdk-venv")
    venv.EnvBuilder(with_pip=True).create(home)
    python = home / "bin" / "python"
    # Built from a copy: setuptools writes build/ and *.egg-info/ beside the sources.
    source = shutil.copytree(ROOT / "client", home / "source", ignore=_BUILT)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_isolated_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return python


_BUILT = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")


def _isolated_env() -> dict[str, str]:
    """No PYTHONPATH (tests/conftest.py points it at the checkout), no active venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_installing_the_sdk_pulls_aiohttp_and_nothing_of_the_server(sdk_python: Path) -> None:
    listed = subprocess.run(
        [str(sdk_python), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        env=_isolated_env(),
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"hms-mgmt-client", "aiohttp"} <= installed
    assert installed.isdisjoint(SERVER_ONLY)


def test_the_installed_sdk_works_against_the_daemon(sdk_python: Path, tmp_path: Path) -> None:
    announce = {"name": "Announce", "steps": [{"name": "announce", "publish": "grant.announced"}]}
    with running_daemon(tmp_path, workflows=[announce]) as daemon:
        done = subprocess.run(
            [str(sdk_python), "-c", SCRIPT, daemon.url, ",".join(DAEMON_PACKAGES)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,  # not the checkout: only what the venv holds can be imported
            env=_isolated_env(),
        )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert Path(result["file"]).is_relative_to(sdk_python.parent.parent)
    assert result["status"] == "completed"
    assert result["event"] == {"n": 2}
    assert result["lookup"] == []
    assert result["heavy"] == []
