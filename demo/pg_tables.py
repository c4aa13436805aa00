"""Reading a PostgreSQL sink's tables the way the demo analytics sink's /stats reads its store: the count
and checksum of the live records, comparable with the upstream's canonical checksum
(``GET /api/{c}/checksum?canonical=true``; jsonb does not keep the upstream's bytes, see demo/checksum.py).

Used by `conflux demo --sink postgres` and the tests; runs in the calling process, one short connection
per call.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from conflux.demo.checksum import Checksum, canonical_digest


def live_rows(schema: str, table: str) -> sql.Composed:
    """The live rows of a sink table in either delete mode: hard mode has no deleted rows, soft mode's
    have null data."""
    return sql.SQL("SELECT key, data::text FROM {} WHERE data IS NOT NULL").format(sql.Identifier(schema, table))


def table_checksum(dsn: str, schema: str, table: str) -> tuple[str | None, int | None]:
    """(checksum, count) of the table's live records; (None, None) while the table does not exist."""
    checksum = Checksum()
    with psycopg.connect(dsn, connect_timeout=5) as connection:
        if not _exists(connection, schema, table):
            return None, None
        with connection.cursor() as cursor:
            for key, text in cursor.execute(live_rows(schema, table)):
                checksum.add(canonical_digest(key, text))
    return checksum.hexdigest(), checksum.count


def live_count(dsn: str, schema: str, table: str) -> int:
    with psycopg.connect(dsn, connect_timeout=5) as connection:
        if not _exists(connection, schema, table):
            return 0
        statement = sql.SQL("SELECT count(*) FROM {} WHERE data IS NOT NULL").format(sql.Identifier(schema, table))
        return connection.execute(statement).fetchone()[0]


def _exists(connection: psycopg.Connection, schema: str, table: str) -> bool:
    return connection.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}"."{table}"',)).fetchone()[0]
