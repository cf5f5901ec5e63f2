"""Package exports that load on first use (PEP 562), for monitor/ and monitor/probing/.

Both packages must stay cheap to import: `python -m monitor.probing.worker` imports
them on its way to the worker and must not load the daemon (ARCHITECTURE.md, Health
checking). Standard library only, for the same reason.
"""

from __future__ import annotations

import importlib
import sys

TYPE_CHECKING = False  # typing itself is not imported (the probe worker's RSS)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: each name in `homes` is imported from its
    module (relative to `package`) when first asked for, then kept on the package, so
    later lookups are plain attribute reads."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home, package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
