"""Implementations of monitor.health.abc.ResultStore, one module each."""
