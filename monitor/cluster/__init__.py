"""Replicas on one PostgreSQL: membership, the leader lease, probe shards (DESIGN §8)."""
