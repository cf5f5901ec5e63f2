"""Notifications: the outbox, delivery with retries, and the body formats."""
