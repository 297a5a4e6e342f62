"""Alembic environment: `sle db upgrade` runs this with the URL it was given."""

from __future__ import annotations

from typing import cast

from alembic import context
from sqlalchemy import create_engine

from sle_events.schema import compare_type, target_metadata

config = context.config


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    engine = create_engine(cast(str, url))  # always set by sle_events.schema.alembic_config
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata(), render_as_batch=True, compare_type=compare_type
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata(), literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
