"""Probe workers: the network part of probes runs in processes beside the daemon's loop.

A real daemon process probes real targets; its worker is found, killed and
replaced as an operator (or the OOM killer) would; nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestServer

from monitor.probing.abc import ProbeContext
from monitor.probing.frames import FrameReader, encode
from monitor.probing.kinds.http import HttpKind
from monitor.probing.probe import resolve_probe
from monitor.probing.prober import Prober, Slots
from monitor.probing.workers import ProbeWorkers
from registry import ProbeSpec

from .conftest import until
from .processes import ROOT, DaemonProcess, running_daemon
from .test_probe_budget import refused_url
from .test_probes import tls_target  # noqa: F401 (a fixture)

FAST = {"type": "http", "interval": "100ms", "down_interval": "100ms", "timeout": "1s"}
FAST_CHANGE = {"failure_threshold": 1, "success_threshold": 1}


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def workers(daemon: DaemonProcess) -> list[int]:
    """The daemon's probe workers now; a child gone between the listing and the read of
    its command line (a worker just killed and reaped) is not one of them."""
    assert daemon.process is not None
    found = []
    for pid in children(daemon.process.pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if b"monitor.probing.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def get(daemon: DaemonProcess, path: str) -> Any:
    with urllib.request.urlopen(daemon.url + path, timeout=5) as resp:
        return json.loads(resp.read())


def register(daemon: DaemonProcess, instance: str, url: str, **probe: Any) -> None:
    request = urllib.request.Request(
        f"{daemon.url}/v1/services/payments/instances/{instance}",
        data=json.dumps({"url": url, "probe": probe}).encode(),
        headers={"Content-Type": "application/json"},
        method="PUT",
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 201


def health(daemon: DaemonProcess, instance: str) -> dict[str, Any]:
    body = get(daemon, "/v1/health?service=payments")
    found: dict[str, Any] = next(i for i in body["instances"] if i["instance"] == instance)
    return found


def probes_of(daemon: DaemonProcess, instance: str, result: str = "") -> float:
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("hms_probe_total{")
        and f'instance="{instance}"' in line
        and f'result="{result}' in line
    )


async def eventually(check: Any, timeout: float = 15.0) -> None:
    async def holds() -> bool:
        return bool(await asyncio.to_thread(check))

    await until(holds, timeout)


async def test_probes_run_in_a_worker_and_a_killed_worker_is_replaced(
    tmp_path: Path, target: TestServer
) -> None:
    defaults = {"probe": {**FAST, **FAST_CHANGE}}
    with running_daemon(tmp_path, defaults=defaults) as daemon:
        [worker] = workers(daemon)
        register(daemon, "up", str(target.make_url("/ok")))
        register(daemon, "down", refused_url())
        register(daemon, "tcp", str(target.make_url("/")), type="tcp")
        await eventually(lambda: health(daemon, "up")["state"] == "passing")
        await eventually(lambda: health(daemon, "tcp")["state"] == "passing")
        await eventually(lambda: health(daemon, "down")["state"] == "critical")
        assert health(daemon, "up")["last_probe"]["status"] == 200
        assert health(daemon, "down")["last_probe"]["error"] == "connect: Connection refused"

        os.kill(worker, signal.SIGKILL)
        await eventually(lambda: workers(daemon) not in ([], [worker]))
        before = probes_of(daemon, "up")
        await eventually(lambda: probes_of(daemon, "up") >= before + 5)
        assert health(daemon, "up")["state"] == "passing"
        assert "probe worker 0 exited" in daemon.log.read_text()
        [replacement] = workers(daemon)
    assert not Path(f"/proc/{replacement}").exists(), "the daemon left its worker running"


async def test_a_stalled_worker_is_killed_and_replaced(tmp_path: Path, target: TestServer) -> None:
    defaults = {"probe": {**FAST, **FAST_CHANGE}}
    with running_daemon(tmp_path, defaults=defaults) as daemon:
        register(daemon, "up", str(target.make_url("/ok")))
        await eventually(lambda: health(daemon, "up")["state"] == "passing")
        [worker] = workers(daemon)
        failed = probes_of(daemon, "up", "failure")
        os.kill(worker, signal.SIGSTOP)  # alive, answering nothing: probes go through it
        # Its probe's timeout (1s) and the grace (5s) pass: killed, replaced, probing again.
        await eventually(lambda: workers(daemon) not in ([], [worker]), timeout=20)
        assert "did not answer a probe within 6s; killing it" in daemon.log.read_text()
        assert probes_of(daemon, "up", "failure") > failed  # the probe it held failed
        await eventually(lambda: health(daemon, "up")["state"] == "passing")
    assert not Path(f"/proc/{worker}").exists()


async def test_without_workers_the_loop_probes(tmp_path: Path, target: TestServer) -> None:
    server = {"probe_budget": {"workers": 0}}
    defaults = {"probe": {**FAST, **FAST_CHANGE}}
    with running_daemon(tmp_path, server=server, defaults=defaults) as daemon:
        register(daemon, "up", str(target.make_url("/ok")))
        await eventually(lambda: health(daemon, "up")["state"] == "passing")
        assert workers(daemon) == []


def test_frames_survive_any_split() -> None:
    items = [(1, "127.0.0.1", 80, False, True, b"GET / HTTP/1.1\r\n\r\n", 65536, 2.0)] * 3
    stream = encode(items[:1]) + encode(items[1:])
    for cut in range(len(stream) + 1):
        got: list[Any] = []
        reader = FrameReader(got.append)
        reader.feed(stream[:cut])
        reader.feed(stream[cut:])
        assert got == items


def test_a_worker_does_not_load_the_daemon() -> None:
    """What keeps a worker a few MB: no pydantic, aiohttp, storage or daemon modules, and
    no asyncio or ssl until a TLS probe needs it."""
    code = (
        "import sys, monitor.probing.worker\n"
        "LEAN = {'monitor.probing', 'monitor.probing.worker', 'monitor.probing.kinds', "
        "'monitor.probing.kinds.http_wire', 'monitor.probing.frames', 'monitor.exports'}\n"
        "heavy = {'pydantic', 'aiohttp', 'sqlite_utils', 'registry', 'workflows', 'jinja2', "
        "'asyncio', 'ssl', 'uvloop'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or "
        "m.startswith('monitor.') and m not in LEAN))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


async def test_a_worker_sends_the_body_back_only_when_asked(target: TestServer) -> None:
    """Most probes check the status alone: their answers cross the pipe without the body
    (it is still read, so response times do not change); a [BODY] condition gets it."""
    url = str(target.make_url("/ok"))
    plain = resolve_probe([ProbeSpec()])
    reading = resolve_probe([ProbeSpec(conditions=["[BODY].status == UP"])])
    assert not plain.reads_body and reading.reads_body
    context = ProbeContext()
    pool = ProbeWorkers(1)
    await pool.start()
    try:
        jobs = [HttpKind().job(url, probe, context) for probe in (plain, reading, plain)]
        assert all(job is not None and job.port == urlsplit(url).port for job in jobs)
        answers = await asyncio.gather(*(pool.run(job) for job in jobs if job is not None))
    finally:
        await pool.close()
    assert [answer.status for answer in answers] == [200, 200, 200]
    assert [bool(answer.body) for answer in answers] == [False, True, False]
    assert json.loads(answers[1].body)["status"] == "UP"


async def test_a_worker_checks_certificates_as_the_loop_does(
    tls_target: tuple[TestServer, Path],  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TLS contexts are made in the worker on its first TLS probe: verified by default,
    not with `tls_verify: false`, trusting SSL_CERT_FILE, the expiry measured."""
    server, ca = tls_target
    url = str(server.make_url("/ok"))
    prober = Prober(workers=1)
    await prober.start()
    try:
        untrusted = await prober.run(url, resolve_probe([ProbeSpec()]))
        unverified = await prober.run(url, resolve_probe([ProbeSpec(tls_verify=False)]))
    finally:
        await prober.close()
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # read by the worker when it starts
    prober = Prober(workers=1)
    await prober.start()
    try:
        trusted = await prober.run(url, resolve_probe([ProbeSpec()]))
    finally:
        await prober.close()
    assert untrusted.error is not None and untrusted.error.startswith("certificate:")
    assert unverified.status == 200 and unverified.error is None
    assert trusted.status == 200 and trusted.certificate_expires_in is not None
    assert 86400 < trusted.certificate_expires_in <= 2 * 86400


async def test_probes_beyond_the_slots_wait_for_a_worker_without_a_task_each(
    target: TestServer,
) -> None:
    """With every slot taken (a saturated worker, a wave of timeouts) a probe still goes
    to a worker, queued as a callback until a slot is given back: it never falls back to
    a task and a future of its own on the daemon's loop, which is what saturation costs."""
    url = str(target.make_url("/ok"))
    prober = Prober(concurrency=2, workers=1)
    await prober.start()
    results: list[int | None] = []

    async def ready() -> bool:
        return prober._workers is not None and prober._workers.ready

    async def all_answered() -> bool:
        return len(results) == 40

    try:
        await until(ready, 10)
        probe = resolve_probe([ProbeSpec()])
        tasks = len(asyncio.all_tasks())
        accepted = [prober.send(url, probe, lambda r: results.append(r.status)) for _ in range(40)]
        assert accepted == [True] * 40
        assert len(prober._slots) == 38  # two in flight, the rest waiting their turn
        assert len(asyncio.all_tasks()) == tasks
        await until(all_answered, 15)
    finally:
        await prober.close()
    assert results == [200] * 40
    assert len(prober._slots) == 0 and prober._slots.try_take() and prober._slots.try_take()
    assert not prober._slots.try_take()  # each slot given back once


def test_a_queue_of_probes_handed_back_at_once_is_drained_without_recursion() -> None:
    """A queued probe whose worker is gone answers None at once and gives its slot back
    inside `give`: thousands so queued are handed the slot in turn, not one call deeper
    each (a RecursionError would strand the rest, each instance `busy` for good)."""
    slots = Slots(1)
    assert slots.try_take()
    order: list[int] = []

    def holder(n: int) -> Callable[[], None]:
        def run() -> None:
            order.append(n)
            slots.give()  # its worker was gone: answered at once

        return run

    for n in range(5000):
        slots.queue(holder(n))
    slots.give()
    assert order == list(range(5000))
    assert len(slots) == 0 and slots.try_take() and not slots.try_take()


@pytest.mark.parametrize("ending", ["killed", "stalled"])
async def test_probes_waiting_for_a_slot_when_their_worker_ends_still_run(
    target: TestServer, ending: str
) -> None:
    """Two hung probes hold both slots and four wait for one (queued callbacks); the only
    worker then dies (SIGKILL) or stalls (SIGSTOP: killed once its probes are overdue).
    The hung two fail with the worker; each waiting one, handed a slot as the dying
    worker gives them back, is run by the loop (no worker is left to take it): never sent
    to the dying worker and stranded there, its instance `busy` for good, nor failed
    unsent. A probe sent once the worker is back goes to it."""
    prober = Prober(concurrency=2, workers=1)
    await prober.start()
    workers_ = prober._workers
    assert workers_ is not None
    probe = resolve_probe([ProbeSpec(timeout="1s")])
    results: dict[str, tuple[int | None, str | None]] = {}
    pid: int | None = None

    def send(name: str, path: str) -> None:
        def done(result: Any) -> None:
            results[name] = (result.status, result.error)

        assert prober.send(str(target.make_url(path)), probe, done)

    async def ready() -> bool:
        return workers_.ready

    async def answered(*names: str) -> bool:
        return all(name in results for name in names)

    try:
        await until(ready, 10)
        send("hang0", "/hang")
        send("hang1", "/hang")
        for n in range(4):
            send(f"ok{n}", "/ok")
        await asyncio.sleep(0.3)
        pipe = workers_._pipes[0]
        assert pipe is not None and pipe.transport is not None
        pid = pipe.transport.get_pid()
        os.kill(pid, signal.SIGKILL if ending == "killed" else signal.SIGSTOP)
        # Stalled: killed when its probe (1 s) and the grace (5 s) are overdue.
        await until(lambda: answered("hang0", "hang1", "ok0", "ok1", "ok2", "ok3"), 20)
        assert [results[f"ok{n}"] for n in range(4)] == [(200, None)] * 4
        assert {results["hang0"][1], results["hang1"][1]} == {"probe worker ended before answering"}
        assert len(prober._slots) == 0 and pipe.pending == {}
        await until(ready, 15)  # restarted
        send("after", "/ok")
        await until(lambda: answered("after"), 10)
        assert results["after"] == (200, None)
    finally:
        await prober.close()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
