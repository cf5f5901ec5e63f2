"""How services are doing, and the composition root that wires every package together."""

from .app import build_app
from .config import Config, ConfigError, load_config, parse_config

__all__ = ["Config", "ConfigError", "build_app", "load_config", "parse_config"]
