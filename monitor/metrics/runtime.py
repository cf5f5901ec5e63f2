"""The runtime families every exporter has: `process_*`, `python_gc_*`, platform, build info."""

from __future__ import annotations

from importlib import metadata

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge


def register_runtime_collectors(registry: CollectorRegistry, version: str | None = None) -> None:
    """The standard process, GC and platform families and `hms_build_info{version}`, in
    the app's registry (the global REGISTRY would clash as soon as a second app is built)."""
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.GCCollector(registry=registry)
    prometheus_client.PlatformCollector(registry=registry)
    build = Gauge(
        "hms_build_info", "1, labelled with the running version.", ["version"], registry=registry
    )
    build.labels(version=version or _installed_version()).set(1)


def _installed_version() -> str:
    try:
        return metadata.version("hms-mgmt")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
