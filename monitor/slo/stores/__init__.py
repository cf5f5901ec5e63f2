"""Implementations of SloMinuteStore (slo/abc.py)."""
