"""`make demo` starts the grant story and one Ctrl-C stops all of it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .demo import Demo, get_json, running_demo


def wait_until_gone(demo: Demo, bound: float) -> list[int]:
    deadline = time.monotonic() + bound
    while (left := demo.group()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_one_ctrl_c_stops_every_process_and_port_of_the_demo(tmp_path: Path) -> None:
    with running_demo(tmp_path) as demo:
        # The loop is running: grant applications have started processes.
        deadline = time.monotonic() + 20
        while not get_json(f"{demo.url}/v1/processes?workflow=GrantPayment")["processes"]:
            assert time.monotonic() < deadline, demo.log.read_text()[-3000:]
            time.sleep(0.2)
        assert len(demo.group()) >= 5  # the script, the daemon, three services

        os.killpg(demo.process.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C

        # Services get 10 s to deregister, the daemon 10 s to stop: 30 s is a generous bound.
        left = wait_until_gone(demo, 30)
        assert left == [], f"still running: {left}\n{demo.log.read_text()[-3000:]}"
        assert demo.listening() == []
        assert demo.process.returncode is not None
