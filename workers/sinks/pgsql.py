"""The PostgreSQL sink's SQL and COPY bytes: the table layout, the statement that applies a chunk, and the
COPY text encoding of a chunk's records. Pure: builds statements and bytes, talks to nobody.

Layout of a source's table (``schema.table`` with {source} replaced), as users query it:
key text primary key, updated_at timestamptz, seq bigint (the log position that breaks ties of
updated_at, as in ``workers.merge``), hash text, data jsonb, synced_at timestamptz, then deleted_at
(soft mode) and the typed columns. Hard mode keeps tombstones (key, updated_at, seq) in
``{table}_deleted``. The ledger ``conflux_batches`` records every applied chunk in the same transaction.
"""

from __future__ import annotations

from itertools import chain, compress, repeat
from typing import NamedTuple

from psycopg import sql

from conflux.config import PostgresColumn, PostgresSinkConfig
from conflux.errors import ConfigError
from conflux.workers.merge import DELETED, HASH, POSITION, RECORD, UPDATED_US

MAX_IDENTIFIER_BYTES = 63  # PostgreSQL truncates longer names silently: two tables could become one
TOMBSTONE_SUFFIX = "_deleted"
LEDGER = "conflux_batches"
STAGING = sql.SQL("pg_temp.conflux_staging")
# Staging holds the chunk as COPY sends it; ON COMMIT DELETE ROWS empties it after every transaction and a
# rollback takes its rows away, so one temporary table serves every chunk of a connection.
STAGING_DDL = sql.SQL(
    "CREATE TEMPORARY TABLE IF NOT EXISTS conflux_staging (idx integer NOT NULL, key text NOT NULL, "
    "updated_us bigint NOT NULL, seq bigint NOT NULL, hash text NOT NULL, deleted boolean NOT NULL, data text) "
    "ON COMMIT DELETE ROWS")
COPY_STAGING = sql.SQL("COPY {} (idx, updated_us, seq, hash, deleted, key, data) FROM STDIN").format(STAGING)
# The record's instant from the merger's own microseconds, so the table orders versions exactly as it does.
_STAGED = sql.SQL(
    "SELECT idx, key, timestamptz 'epoch' + updated_us * interval '1 microsecond' AS updated_at, seq, hash, "
    "deleted, data FROM {} WHERE idx >= %(lo)s AND idx < %(hi)s").format(STAGING)


class Counts(NamedTuple):
    """What applying part of a chunk did: upserts that changed a row, and deletes that took effect."""

    upserted: int = 0
    deleted: int = 0

    def plus(self, other: Counts) -> Counts:
        return Counts(self.upserted + other.upserted, self.deleted + other.deleted)


class Table:
    """One source's table in one sink: its names, the statements that create it and apply a chunk."""

    def __init__(self, options: PostgresSinkConfig, source: str) -> None:
        self.source = source
        self.schema = options.schema
        self.name = options.table.replace("{source}", source)
        self.soft = options.delete_mode == "soft"
        self.columns: dict[str, PostgresColumn] = dict(options.columns.get(source, {}))
        longest = self.name + ("" if self.soft else TOMBSTONE_SUFFIX)
        if len(longest.encode()) > MAX_IDENTIFIER_BYTES:
            raise ConfigError(f"table: {longest!r} (for source {source!r}) is longer than PostgreSQL's "
                              f"{MAX_IDENTIFIER_BYTES} bytes; choose a shorter table name")
        self.table = sql.Identifier(self.schema, self.name)
        self.tombstones = sql.Identifier(self.schema, self.name + TOMBSTONE_SUFFIX)
        self.apply = self._soft_apply() if self.soft else self._hard_apply()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    # -- creating ---------------------------------------------------------------------------------

    def ddl(self, present: set[str]) -> list[sql.Composed]:
        """Statements that create what is missing: the table, new typed columns, indexes, tombstones.
        ``present`` names the table's columns and the schema's indexes that exist already: an ALTER TABLE
        takes an exclusive lock even when it would change nothing, so only missing ones are added."""
        statements = [sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, updated_at timestamptz NOT NULL, "
            "seq bigint NOT NULL DEFAULT 0, hash text NOT NULL, data jsonb, synced_at timestamptz NOT NULL)"
        ).format(self.table)]
        extra = {"deleted_at": "timestamptz"} if self.soft else {}
        extra.update({name: column.type for name, column in self.columns.items()})
        statements += [sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
            self.table, sql.Identifier(name), sql.SQL(kind)) for name, kind in extra.items() if name not in present]
        indexed = ["updated_at", *(name for name, column in self.columns.items() if column.index)]
        statements += [sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
            sql.Identifier(index_name(self.name, name)), self.table, sql.Identifier(name))
            for name in indexed if index_name(self.name, name) not in present]
        if not self.soft:
            statements.append(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, updated_at timestamptz NOT NULL, "
                "seq bigint NOT NULL DEFAULT 0)").format(self.tombstones))
        return statements

    def present(self) -> tuple[sql.Composed, dict[str, str]]:
        """A query for the names ``ddl`` needs: the table's columns and the schema's indexes."""
        return sql.SQL(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass(%(table)s) AND attnum > 0 "
            "AND NOT attisdropped UNION ALL SELECT indexname::text FROM pg_indexes WHERE schemaname = %(schema)s"
        ), {"table": sql.Identifier(self.schema, self.name).as_string(), "schema": self.schema}

    # -- applying ---------------------------------------------------------------------------------

    def _typed(self, alias: str) -> tuple[sql.Composable, sql.Composable, sql.Composable]:
        """The typed columns' names, their values extracted from ``alias.doc``, and their SET list."""
        if not self.columns:
            return sql.SQL(""), sql.SQL(""), sql.SQL("")
        names = [sql.Identifier(name) for name in self.columns]
        values = [_extract(alias, column) for column in self.columns.values()]
        sets = [sql.SQL("{0} = excluded.{0}").format(name) for name in names]
        return (sql.SQL(", ") + sql.SQL(", ").join(names), sql.SQL(", ") + sql.SQL(", ").join(values),
                sql.SQL(", ") + sql.SQL(", ").join(sets))

    def _hard_apply(self) -> sql.Composed:
        """One statement for a range of the staged chunk: upserts unless a newer tombstone says the key is
        gone (an upsert removes an older tombstone), then deletes (the row goes, its tombstone is kept)."""
        names, values, sets = self._typed("u")
        return sql.SQL(
            "WITH s AS ({staged}), "
            "up AS (INSERT INTO {t} AS t (key, updated_at, seq, hash, data, synced_at{names}) "
            "SELECT u.key, u.updated_at, u.seq, u.hash, u.doc, now(){values} "
            "FROM (SELECT s.*, s.data::jsonb AS doc FROM s WHERE NOT s.deleted) u "
            "WHERE NOT EXISTS (SELECT 1 FROM {d} d WHERE d.key = u.key "
            "AND (d.updated_at, d.seq) > (u.updated_at, u.seq)) "
            "ORDER BY u.key "
            "ON CONFLICT (key) DO UPDATE SET updated_at = excluded.updated_at, seq = excluded.seq, "
            "hash = excluded.hash, data = excluded.data, synced_at = excluded.synced_at{sets} "
            "WHERE (excluded.updated_at, excluded.seq) >= (t.updated_at, t.seq) RETURNING t.key), "
            "revived AS (DELETE FROM {d} d USING up WHERE d.key = up.key), "
            "gone AS (DELETE FROM {t} t USING s WHERE s.deleted AND t.key = s.key "
            "AND (s.updated_at, s.seq) >= (t.updated_at, t.seq)), "
            "tomb AS (INSERT INTO {d} AS d (key, updated_at, seq) SELECT s.key, s.updated_at, s.seq FROM s "
            "WHERE s.deleted AND NOT EXISTS (SELECT 1 FROM {t} t WHERE t.key = s.key "
            "AND (t.updated_at, t.seq) > (s.updated_at, s.seq)) ORDER BY s.key "
            "ON CONFLICT (key) DO UPDATE SET updated_at = excluded.updated_at, seq = excluded.seq "
            "WHERE (excluded.updated_at, excluded.seq) >= (d.updated_at, d.seq) RETURNING d.key) "
            "SELECT (SELECT count(*) FROM up), (SELECT count(*) FROM tomb)"
        ).format(staged=_STAGED, t=self.table, d=self.tombstones, names=names, values=values, sets=sets)

    def _soft_apply(self) -> sql.Composed:
        """One upsert for a range of the staged chunk: a delete is a version whose data is null and whose
        deleted_at is set, so the row itself is the tombstone and a late, older upsert stays stale."""
        names, values, sets = self._typed("u")
        return sql.SQL(
            "WITH s AS ({staged}), "
            "up AS (INSERT INTO {t} AS t (key, updated_at, seq, hash, data, synced_at, deleted_at{names}) "
            "SELECT u.key, u.updated_at, u.seq, u.hash, u.doc, now(), "
            "CASE WHEN u.deleted THEN u.updated_at END{values} "
            "FROM (SELECT s.*, s.data::jsonb AS doc FROM s) u ORDER BY u.key "
            "ON CONFLICT (key) DO UPDATE SET updated_at = excluded.updated_at, seq = excluded.seq, "
            "hash = excluded.hash, data = excluded.data, synced_at = excluded.synced_at, "
            "deleted_at = excluded.deleted_at{sets} "
            "WHERE (excluded.updated_at, excluded.seq) >= (t.updated_at, t.seq) "
            "RETURNING t.deleted_at IS NOT NULL AS deleted) "
            "SELECT count(*) FILTER (WHERE NOT deleted), count(*) FILTER (WHERE deleted) FROM up"
        ).format(staged=_STAGED, t=self.table, names=names, values=values, sets=sets)


def _extract(alias: str, column: PostgresColumn) -> sql.Composed:
    """``(u.doc #>> '{a,b}')::numeric``: the field as text cast to the column's type (json kept as json)."""
    path = sql.Literal("{" + ",".join(_path_element(part) for part in column.field.split(".")) + "}")
    operator = sql.SQL("#>" if column.type in ("json", "jsonb") else "#>>")
    return sql.SQL("({}.doc {} {}::text[])::{}").format(sql.Identifier(alias), operator, path, sql.SQL(column.type))


def _path_element(name: str) -> str:
    """One element of a text[] literal, quoted so that commas, braces and quotes in a field name survive."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def index_name(table: str, column: str) -> str:
    """Index names share the schema's namespace with tables; truncated like PostgreSQL would, but visibly."""
    return f"{table}_{column}_idx".encode()[:MAX_IDENTIFIER_BYTES].decode(errors="ignore")


# -- the ledger ---------------------------------------------------------------------------------------


def ledger_ddl(schema: str) -> list[sql.Composed]:
    ledger = sql.Identifier(schema, LEDGER)
    return [
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (sink text NOT NULL, batch_id text NOT NULL, "
                "applied_at timestamptz NOT NULL DEFAULT now(), rejected jsonb, PRIMARY KEY (sink, batch_id))"
                ).format(ledger),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (applied_at)").format(
            sql.Identifier(f"{LEDGER}_applied_at_idx"), ledger),
    ]


def ledger_statements(schema: str) -> dict[str, sql.Composed]:
    ledger = sql.Identifier(schema, LEDGER)
    return {
        "claim": sql.SQL("INSERT INTO {} (sink, batch_id) VALUES (%s, %s) ON CONFLICT DO NOTHING").format(ledger),
        "previous": sql.SQL("SELECT rejected FROM {} WHERE sink = %s AND batch_id = %s").format(ledger),
        "refused": sql.SQL("UPDATE {} SET rejected = %s WHERE sink = %s AND batch_id = %s").format(ledger),
        "prune": sql.SQL("DELETE FROM {} WHERE sink = %s AND applied_at < now() - %s * interval '1 second'"
                         ).format(ledger),
    }


# -- COPY text ----------------------------------------------------------------------------------------


class Staged(NamedTuple):
    """A chunk as COPY text for the staging table, and the records refused before PostgreSQL saw them."""

    payload: bytes
    refused: dict[int, str]


def copy_text(keys: list[str], values: list[tuple], null_hash: str) -> Staged:
    """The chunk's records as COPY text rows in COPY_STAGING's column order.

    Escaping (backslash, tab, newline, carriage return) runs once over all keys and once over all records
    joined by NUL, which neither a key nor a JSON text may hold; one that does is refused here, because
    PostgreSQL text cannot store it and COPY would fail the whole chunk. The ASCII columns of a row are one
    f-string, and the rows are joined in one call: no bytes formatting per field.
    """
    refused: dict[int, str] = {}
    key_fields = _escaped(_utf8_keys(keys, refused), refused, "key")
    records = [b"" if value[DELETED] else value[RECORD] for value in values]
    data_fields = _escaped(records, refused, "record")
    _check_utf8(records, refused)
    for index, value in enumerate(values):
        if value[DELETED]:
            data_fields[index] = b"\\N"  # NULL: a delete has no data
    heads = "\x00".join([
        f"{index}\t{value[UPDATED_US]}\t{value[POSITION].offset}\t{null_hash}\tt\t" if value[DELETED] else
        f"{index}\t{value[UPDATED_US]}\t{value[POSITION].offset}\t{value[HASH]}\tf\t"
        for index, value in enumerate(values)]).encode().split(b"\x00")
    rows = zip(heads, key_fields, repeat(b"\t"), data_fields, repeat(b"\n"))
    if refused:
        rows = compress(rows, [index not in refused for index in range(len(values))])
    return Staged(b"".join(chain.from_iterable(rows)), refused)


def _utf8_keys(keys: list[str], refused: dict[int, str]) -> list[bytes]:
    """Every key as UTF-8 (one encode for all in the usual case); a NUL inside a key is left for
    ``_escaped`` to find, a lone surrogate (from a "\\ud800" escape) is refused here."""
    try:
        encoded = "\x00".join(keys).encode().split(b"\x00")
        if len(encoded) == len(keys):
            return encoded
    except UnicodeEncodeError:
        pass
    encoded = []
    for index, key in enumerate(keys):
        try:
            encoded.append(key.encode())
        except UnicodeEncodeError:
            refused[index] = "the key is not valid UTF-8 (a lone surrogate), which PostgreSQL text cannot store"
            encoded.append(b"")
    return encoded


def _escaped(fields: list, refused: dict[int, str], what: str) -> list[bytes]:
    """COPY text escaping of every field at once; a field holding NUL is refused (and left empty)."""
    escaped = _escape(b"\x00".join(fields)).split(b"\x00")
    if len(escaped) == len(fields):
        return escaped
    out = []
    for index, field in enumerate(map(bytes, fields)):
        if b"\x00" in field:
            refused[index] = f"the {what} holds a NUL character (U+0000), which PostgreSQL text cannot store"
            out.append(b"")
        else:
            out.append(_escape(field))
    return out


def _escape(text: bytes) -> bytes:
    return text.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def _check_utf8(records: list, refused: dict[int, str]) -> None:
    """COPY refuses the whole chunk for one record that is not UTF-8; find it first (one pass in C)."""
    try:
        b"\x00".join(records).decode()  # NUL between records: a sequence cut at one end stays invalid
        return
    except UnicodeDecodeError:
        pass
    for index, record in enumerate(records):
        try:
            bytes(record).decode()
        except UnicodeDecodeError as exc:
            refused.setdefault(index, f"the record is not valid UTF-8 ({exc.reason} at byte {exc.start})")
