"""Storage: the SQLite connection, its writer thread with group commit, and its faults."""

from .database import Database, DatabaseError

__all__ = ["Database", "DatabaseError"]
