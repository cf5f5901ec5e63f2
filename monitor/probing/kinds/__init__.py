"""Probe kinds: one module per probe type behind ProbeKind (probing/abc.py); the
table of them is kinds/table.py.

Empty on purpose: the probe worker imports this package for http_wire.py and must
stay on the standard library."""
