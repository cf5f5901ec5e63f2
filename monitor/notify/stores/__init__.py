"""Implementations of OutboxStore (notify/abc.py)."""
