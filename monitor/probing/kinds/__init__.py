"""Probe kinds: the wire code of each probe type."""
