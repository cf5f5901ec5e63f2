"""/healthz, /readyz, /metrics and /openapi.json."""

from __future__ import annotations

import gzip

from aiohttp import web

from monitor import build_app
from monitor.app import openapi_document
from monitor.http.routes.workflows import ROUTER_PATH

from .conftest import AppClient, metric_families
from .test_registry import register


async def test_healthz_and_readyz(daemon: AppClient) -> None:
    assert (await daemon.get("/healthz")).status == 200
    ready = await daemon.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"store": True, "registry": True, "scheduler": True}


async def test_metrics_use_the_exposition_format(daemon: AppClient) -> None:
    await register(daemon)
    resp = await daemon.get("/metrics")
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    text = await resp.text()
    assert "# TYPE hms_registry_index gauge" in text
    instances = {
        (s.labels["service"], s.labels["health"]): s.value
        for s in (await metric_families(daemon))["hms_registry_instances"].samples
    }
    assert instances[("payments", "unknown")] == 1
    assert instances[("payments", "passing")] == 0


async def test_metrics_are_gzipped_when_asked(daemon: AppClient) -> None:
    resp = await daemon.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert b"hms_registry_index" in gzip.decompress(await resp.read())


async def test_two_apps_have_their_own_metrics(make_config, start_daemon) -> None:  # type: ignore[no-untyped-def]
    first = await start_daemon(make_config())
    await register(first)
    build_app(make_config())  # a second app in the same process: no duplicate collector error
    assert "hms_registry_index" in await (await first.get("/metrics")).text()


async def test_openapi_covers_every_route(daemon: AppClient) -> None:
    document = await (await daemon.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    documented = {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    served = set()
    for route in daemon.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        # The request router's one resource serves each workflow `route`, documented per route.
        if route.method not in ("HEAD", "*") and path and path != ROUTER_PATH:
            served.add((path, route.method))
    assert served == documented


def test_openapi_document_is_plain_json() -> None:
    import json

    json.dumps(openapi_document())
    assert isinstance(web.Application, type)
