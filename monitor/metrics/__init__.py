"""Metrics that belong to no room: exposition helpers and the runtime collectors."""
