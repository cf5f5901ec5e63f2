"""MemberStore implementations (monitor/cluster/abc.py)."""
