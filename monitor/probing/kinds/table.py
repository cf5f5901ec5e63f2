"""KINDS: the probe kind of each probe type.

Not in kinds/__init__.py: the probe worker imports that package for http_wire.py
and must not import aiohttp, which the http kind needs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from monitor.probing.abc import ProbeKind
from monitor.probing.kinds.http import HttpKind
from monitor.probing.kinds.tcp import TcpKind
from monitor.probing.kinds.tls import TlsKind
from registry.model import ProbeType

# Keyed by the probe's `type`; NONE has no kind: the checker never runs it.
KINDS: Final[Mapping[ProbeType, ProbeKind]] = {
    ProbeType.HTTP: HttpKind(),
    ProbeType.TCP: TcpKind(),
    ProbeType.TLS: TlsKind(),
}
