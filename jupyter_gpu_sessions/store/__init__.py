"""Session records in a real database: SQLite (WAL) by default, any SQLAlchemy URL by config."""

from .sessions import SessionStore

__all__ = ["SessionStore"]
