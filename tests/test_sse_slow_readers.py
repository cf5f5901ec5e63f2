"""SSE subscribers that never read cost the daemon bounded memory (a real daemon process)."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from .processes import DaemonProcess, running_daemon

READERS = 200
EVENTS = 300
EVENT_BYTES = 200 * 1024
MAX_GROWTH = 50 * 1024 * 1024
MAX_KEPT = 16 * 1024 * 1024  # after the readers left (measured 7 MiB; 21 MiB without trim)


def rss(pid: int) -> int:
    """The process's resident set, in bytes, as the kernel counts it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def publish(daemon: DaemonProcess, topic: str, data: dict[str, str]) -> None:
    request = urllib.request.Request(
        f"{daemon.url}/v1/events/{topic}",
        data=json.dumps(data).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 202


def stalled_reader(port: int, stack: ExitStack) -> socket.socket:
    """A subscriber that sends its request and then never reads a byte."""
    sock = stack.enter_context(socket.socket())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # stalls after a few KiB
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /v1/events?topics=load.* HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def cut_off(sock: socket.socket) -> bool:
    """True when the daemon ended this connection: reading what is left ends in EOF or reset."""
    sock.settimeout(10)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_readers_that_never_read_do_not_grow_the_daemons_memory(tmp_path: Path) -> None:
    blob = "x" * EVENT_BYTES
    with running_daemon(tmp_path) as daemon, ExitStack() as readers:
        assert daemon.process is not None
        pid = daemon.process.pid
        for _ in range(3):  # warm up: first requests allocate caches that stay
            publish(daemon, "load.warm", {"blob": blob})
        before = rss(pid)
        sockets = [stalled_reader(daemon.port, readers) for _ in range(READERS)]
        time.sleep(0.5)  # all subscribed
        peak = before
        for n in range(EVENTS):
            publish(daemon, "load.big", {"n": str(n), "blob": blob})
            if n % 10 == 0:
                peak = max(peak, rss(pid))
        peak = max(peak, rss(pid))
        assert all(cut_off(sock) for sock in sockets)
        readers.close()
        time.sleep(1.5)  # the trim follows the last cut-off by a second
        after = rss(pid)
        print(
            f"\nRSS before {before / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, "
            f"after {after / 2**20:.1f} MiB ({READERS} readers, {EVENTS} x "
            f"{EVENT_BYTES // 1024} KiB events)"
        )
        assert peak - before < MAX_GROWTH
        assert after - before < MAX_KEPT
