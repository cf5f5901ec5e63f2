"""/metrics carries the standard process and GC families and the build info (DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import metadata

from monitor.config import Config

from .conftest import AppClient, metric_families


async def test_metrics_have_process_gc_and_build_info(daemon: AppClient) -> None:
    families = await metric_families(daemon)
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    assert families["process_open_fds"].samples[0].value > 0
    collections = {s.labels["generation"] for s in families["python_gc_collections"].samples}
    assert collections == {"0", "1", "2"}
    assert "python_info" in families
    (build,) = families["hms_build_info"].samples
    assert build.labels == {"version": metadata.version("hms-mgmt")}
    assert build.value == 1


async def test_each_app_exports_its_own_process_metrics(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    """Two apps in one process: each registry has the families once (not the global one)."""
    first, second = await start_daemon(make_config()), await start_daemon(make_config())
    for client in (first, second):
        text = await (await client.get("/metrics")).text()
        assert text.count("# TYPE process_cpu_seconds_total counter") == 1
        assert text.count("# TYPE hms_build_info gauge") == 1
