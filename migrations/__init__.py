"""Alembic revisions, shipped as a package so that an installed `sle db upgrade` finds them (not a repo path)."""
