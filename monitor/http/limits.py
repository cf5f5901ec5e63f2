"""Limits on a request's body, shared by the body reader and the error middleware."""

from __future__ import annotations

from aiohttp import web

MAX_BODY_BYTES = 1024 * 1024
# A body must arrive within this many seconds (a slow upload holds a connection and a
# buffer); the app sets it from server.read_timeout, which also bounds headers (monitor/cli.py).
READ_TIMEOUT = web.AppKey("read_timeout", float)
DEFAULT_READ_TIMEOUT = 15.0
