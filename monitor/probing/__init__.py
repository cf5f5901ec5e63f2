"""Probing: what a probe is, how it runs (in the loop or in a worker) and how its result is judged.

The exports load on first use, so that `python -m monitor.probing.worker` starts a
probe worker without importing the daemon (ARCHITECTURE.md, Health checking).
"""

from __future__ import annotations

from monitor.exports import lazy_exports

TYPE_CHECKING = False  # not typing's: the probe worker imports this and stays small

if TYPE_CHECKING:
    from .abc import ProbeContext, ProbeKind
    from .probe import Probe, ProbeResult, resolve_probe
    from .prober import Prober

__all__ = [
    "Probe",
    "ProbeContext",
    "ProbeKind",
    "ProbeResult",
    "Prober",
    "resolve_probe",
]

_HOMES = dict.fromkeys(["Probe", "ProbeResult", "resolve_probe"], ".probe")
_HOMES |= dict.fromkeys(["ProbeContext", "ProbeKind"], ".abc")
_HOMES["Prober"] = ".prober"

__getattr__ = lazy_exports(__name__, _HOMES)
