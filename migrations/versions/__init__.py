"""Alembic revisions (Alembic loads them by file; this file only makes them package data of the wheel)."""
