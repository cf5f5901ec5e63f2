"""Body formats, one module per NotificationFormat; FORMATS maps each to its writer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from monitor.notify.abc import BodyFormat, NotificationFormat
from monitor.notify.formats import json, slack

# Keyed by str: config's `format` is a Literal of the same values (config.py sits below notify/).
FORMATS: Final[Mapping[str, BodyFormat]] = {
    NotificationFormat.JSON: json.render,
    NotificationFormat.SLACK: slack.render,
}
