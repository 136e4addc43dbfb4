"""Alembic environment of the bank metadata schema.

pmeta runs the migrations itself (:func:`pmeta.storage.migrate.upgrade`), passing an open
connection in ``config.attributes["connection"]``. For hand use, set ``sqlalchemy.url``:

    alembic -x url=sqlite:///BANK/bank.db -c /dev/null ...   # or use pmeta.storage.migrate
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from pmeta.storage.db import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
        engine = create_engine(url)
        with engine.begin() as fresh:
            _run(fresh)
        engine.dispose()
