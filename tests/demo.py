"""`examples/demo.sh` run for real in its own process group, on free 127.0.0.1 ports."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .processes import ROOT, free_port

DEMO_SERVICES = ("applications", "ach", "notifier")


@dataclass(frozen=True, kw_only=True)
class Demo:
    process: subprocess.Popen[bytes]
    port: int
    service_ports: tuple[int, ...]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def group(self) -> list[int]:
        """Live (not zombie) processes in the demo's process group."""
        self.process.poll()  # reaps the script itself once it has exited
        return list(members_of_group(self.process.pid))

    def listening(self) -> list[int]:
        return [port for port in (self.port, *self.service_ports) if accepts(port)]


def members_of_group(pgid: int) -> Iterator[int]:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            fields = stat.read_text().rpartition(")")[2].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                yield int(stat.parent.name)


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_run(length: int) -> int:
    """The first of `length` consecutive free ports, below the ephemeral range: there, the
    neighbours of a port the kernel handed out are taken by outgoing connections at random."""
    for _ in range(200):
        first = random.randrange(20_000, 32_000)
        if all(bindable(first + i) for i in range(length)):
            return first
    raise RuntimeError("no run of free ports")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def registered(demo: Demo) -> bool:
    with contextlib.suppress(OSError, ValueError):
        for service in DEMO_SERVICES:
            if not get_json(f"{demo.url}/v1/services/{service}")["instances"]:
                return False
        return True
    return False


@contextlib.contextmanager
def running_demo(directory: Path, timeout: float = 60.0) -> Iterator[Demo]:
    """The demo with its daemon ready and its three services registered."""
    first = free_port_run(len(DEMO_SERVICES))
    env = {
        **os.environ,
        "HMS_DEMO_PORT": str(free_port()),
        "HMS_DEMO_SERVICES_PORT": str(first),
        "HMS_DEMO_DB": str(directory / "demo.db"),
        "HMS_DEMO_BIN": str(Path(sys.executable).parent),
    }
    log = directory / "demo.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", str(ROOT / "examples" / "demo.sh")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal gives `make demo`
        )
    demo = Demo(
        process=process,
        port=int(env["HMS_DEMO_PORT"]),
        service_ports=tuple(first + i for i in range(len(DEMO_SERVICES))),
        log=log,
    )
    try:
        deadline = time.monotonic() + timeout
        while not registered(demo):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the demo did not come up: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield demo
    finally:
        # Whatever the test did, nothing it started outlives it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
