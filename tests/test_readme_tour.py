"""The README's curl commands work as written, in order, against fresh daemons.

Every ```sh block of README.md with a curl command is run with bash (`set -euo pipefail`,
so each command must exit 0, and `curl -fsS` fails on anything but 2xx), with the
daemon's port rewritten to a free one. Blocks marked `# not run by the test` are set-up or
never end; blocks marked `# with make demo running` run against examples/demo.sh.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from .demo import get_json, running_demo
from .processes import ROOT, DaemonProcess, free_port

README = ROOT / "README.md"
NOT_RUN = "# not run by the test"
WITH_DEMO = "# with make demo running"
DAEMON = re.compile(r"\b(?:localhost|127\.0\.0\.1):9797\b")
INSTANCE = "127.0.0.1:8001"  # the tour's web server, started in its set-up block
# Any non-2xx fails its command even if the README forgot -f; -x traces each command to
# stderr, so the last one traced is the one that failed.
PRELUDE = 'set -euo pipefail\ncurl() { command curl --fail "$@"; }\nset -x\n'


def sh_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def tour_blocks(with_demo: bool) -> list[str]:
    blocks = [
        block
        for block in sh_blocks(README.read_text(encoding="utf-8"))
        if re.search(r"^\s*(?:\w+=\$\()?curl ", block, flags=re.MULTILINE) and NOT_RUN not in block
    ]
    return [block for block in blocks if (WITH_DEMO in block) == with_demo]


def run_block(block: str, daemon_port: int, instance_port: int = 0) -> None:
    script = DAEMON.sub(f"127.0.0.1:{daemon_port}", block)
    script = script.replace(INSTANCE, f"127.0.0.1:{instance_port}")
    done = subprocess.run(
        ["bash", "-c", PRELUDE + script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


@contextlib.contextmanager
def web_server(directory: Path) -> Iterator[int]:
    """`python3 -m http.server`, as the tour's set-up starts it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        server.terminate()
        server.wait(10)


def shipped_config(directory: Path, port: int) -> Path:
    """config.yaml as shipped, on a free port, its database under `directory`."""
    text = (ROOT / "config.yaml").read_text(encoding="utf-8")
    path = directory / "config.yaml"
    path.write_text(DAEMON.sub(f"127.0.0.1:{port}", text), encoding="utf-8")
    return path


def health_of(url: str, service: str) -> list[str]:
    body = get_json(f"{url}/v1/health?service={service}")
    return [entry["state"] for entry in body["instances"]]


def test_the_tour_works_as_written_on_the_shipped_config(tmp_path: Path) -> None:
    blocks = tour_blocks(with_demo=False)
    assert len(blocks) >= 4  # registration, reads, health, SLOs
    port = free_port()
    daemon = DaemonProcess(shipped_config(tmp_path, port), port, tmp_path / "daemon.log")
    daemon.start()
    try:
        with web_server(tmp_path) as instance_port:
            for block in blocks:
                run_block(block, port, instance_port)
                if "-X PUT" in block:
                    # The registered instance passes its default probe (GET of its URL).
                    deadline = time.monotonic() + 60
                    while health_of(daemon.url, "payments") != ["passing"]:
                        assert time.monotonic() < deadline, health_of(daemon.url, "payments")
                        time.sleep(0.2)
    finally:
        daemon.stop()


def test_the_workflow_tour_works_as_written_with_the_demo(tmp_path: Path) -> None:
    blocks = tour_blocks(with_demo=True)
    assert len(blocks) >= 2  # the workflow tour, and the code-first one (definitions, signals)
    with running_demo(tmp_path) as demo:
        for block in blocks:
            run_block(block, demo.port)


def python_example() -> str:
    """The self-registration example of the README (hms_mgmt.registration_ctx)."""
    section = README.read_text(encoding="utf-8").split("### From Python", 1)[1]
    (code,) = re.findall(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)[:1]
    return code


def test_the_python_example_registers_an_instance_that_passes_and_leaves(tmp_path: Path) -> None:
    port, instance_port = free_port(), free_port()
    daemon = DaemonProcess(shipped_config(tmp_path, port), port, tmp_path / "daemon.log")
    daemon.start()
    script = DAEMON.sub(f"127.0.0.1:{port}", python_example())
    script = script.replace("8001", str(instance_port))
    try:
        with (tmp_path / "example.log").open("wb") as log:
            example = subprocess.Popen(
                [sys.executable, "-c", script], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 60
            while health_of(daemon.url, "payments") != ["passing"]:
                assert example.poll() is None, (tmp_path / "example.log").read_text()
                assert time.monotonic() < deadline, health_of(daemon.url, "payments")
                time.sleep(0.2)
        finally:
            example.terminate()  # run_app stops on SIGTERM: a clean shutdown deregisters
            example.wait(15)
        assert health_of(daemon.url, "payments") == []
    finally:
        daemon.stop()


def test_commands_the_tests_run_stay_on_this_machine() -> None:
    """No address in a block the tests run, nor in the examples, leaves the loopback."""
    texts = [b for b in sh_blocks(README.read_text(encoding="utf-8")) if NOT_RUN not in b]
    texts += [p.read_text(encoding="utf-8") for p in (ROOT / "examples").iterdir() if p.is_file()]
    for text in texts:
        for url in re.findall(r"https?://[^\s\"'/]+", text):
            host = urllib.parse.urlsplit(url).hostname or ""
            if host != "localhost":
                assert ipaddress.ip_address(host).is_loopback, url
