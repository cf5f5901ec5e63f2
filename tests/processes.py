"""Real daemons as subprocesses on free 127.0.0.1 ports, for crash and client tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def cli(command: str, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`hms-mgmt <command> --config <config> ...` as a user runs it, from the checkout."""
    return subprocess.run(
        [sys.executable, "-m", "monitor", command, "--config", str(config), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(directory: Path, port: int, **sections: Any) -> Path:
    data: dict[str, Any] = {
        # Shedding off unless a test turns it on (test_overload, test_shedding): these tests
        # assert every answer of a burst, and a noisy CI machine may lag the loop for real.
        "server": {"listen": f"127.0.0.1:{port}", "overload_lag": "0s"},
        "storage": {"path": str(directory / "hms.db")},
        "defaults": {"probe": {"type": "none"}},  # these tests are about the registry
    }
    server = {**data["server"], **sections.pop("server", {})}
    data.update(sections, server=server)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class DaemonProcess:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "monitor", "serve", "--config", str(self.config)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/readyz", timeout=1) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.05)
        self.kill()  # never leave a daemon behind, whatever port it found
        raise RuntimeError(f"daemon not ready in {timeout}s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut of the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


@contextlib.contextmanager
def running_daemon(directory: Path, **sections: Any) -> Iterator[DaemonProcess]:
    port = free_port()
    config = write_config(directory, port, **sections)
    daemon = DaemonProcess(config, port, directory / "daemon.log")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def env_without_ci() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CI"}


@contextlib.contextmanager
def running_server(argv: list[str], log_path: Path) -> Iterator[None]:
    """A server process for the `with` block, its output in `log_path`; stopped after."""
    with log_path.open("wb") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        server.terminate()
        server.wait(10)


@contextlib.contextmanager
def running_prometheus(binary: str, directory: Path, config: dict[str, Any]) -> Iterator[str]:
    """A real Prometheus on a free 127.0.0.1 port with `config`; yields its base URL."""
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [
        binary,
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    url = f"http://127.0.0.1:{port}"
    with running_server(argv, directory / "prometheus.log"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # before /-/ready its API answers 503 in text
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url + "/-/ready", timeout=1) as resp,
            ):
                if resp.status == 200:
                    break
            time.sleep(0.1)
        yield url
