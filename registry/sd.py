"""Prometheus http_sd: one target group per instance, in a stable order.

Labels follow Prometheus' own service-discovery conventions (`__meta_consul_tags`
is `,a,b,` too), so relabelling rules written for Consul carry over.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .catalog import InstanceStatus

DEFAULT_METRICS_PATH = "/metrics"


def sd_groups(statuses: list[InstanceStatus]) -> list[dict[str, Any]]:
    return [_group(status) for status in statuses if status.instance.url]  # workers have none


def _group(status: InstanceStatus) -> dict[str, Any]:
    instance = status.instance
    parts = urlsplit(instance.url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    labels = {
        "__meta_hms_service": instance.service,
        "__meta_hms_instance": instance.id,
        "__meta_hms_health": status.health.value,
        "__meta_hms_tags": "," + ",".join(instance.tags) + ",",
        "__scheme__": parts.scheme,
        "__metrics_path__": instance.meta.get("metrics_path", DEFAULT_METRICS_PATH),
    }
    for key, value in sorted(instance.meta.items()):
        labels[f"__meta_hms_meta_{key}"] = value
    return {"targets": [f"{host}:{port}"], "labels": labels}
