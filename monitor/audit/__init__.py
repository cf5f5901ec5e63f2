"""The audit trail: who changed what, when (DESIGN §3 Audit). See trail.py."""
