"""How services are doing, and the composition root that wires every package together.

The exports load on first use, so that `python -m monitor.probing.worker` starts a
probe worker without importing the daemon (ARCHITECTURE.md, Health checking).
"""

from __future__ import annotations

from monitor.exports import lazy_exports

TYPE_CHECKING = False  # not typing's: the probe worker imports this and stays small

if TYPE_CHECKING:
    from .app import build_app
    from .config import Config, ConfigError, load_config, parse_config

__all__ = ["Config", "ConfigError", "build_app", "load_config", "parse_config"]

_HOMES = {"build_app": ".app"} | dict.fromkeys(__all__[:2] + __all__[3:], ".config")

__getattr__ = lazy_exports(__name__, _HOMES)
