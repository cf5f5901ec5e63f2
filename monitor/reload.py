"""Config hot reload: SIGHUP or a changed file; invalid configs are refused, the old one runs on."""

from __future__ import annotations

from .config import Config


class LiveConfig:
    """The config in force. Readers call `current` each time; a reload swaps it whole."""

    def __init__(self, config: Config) -> None:
        self.current = config
