"""The PostgreSQL sink's pure parts (workers/sinks/pgsql.py): COPY text encoding of a chunk, the records
refused before PostgreSQL sees them, and the table layout's statements."""

from __future__ import annotations

import msgspec
import pytest

from conflux.config import PostgresColumn, PostgresSinkConfig
from conflux.errors import ConfigError
from conflux.ipc.messages import Position
from conflux.workers.sinks.base import NULL_HASH
from conflux.workers.sinks.pgsql import Table, copy_text


def value(record: bytes, *, updated_us: int = 1_700_000_000_000_001, offset: int = 42, deleted: bool = False,
          content_hash: str = "00000000000000ab") -> tuple:
    return (updated_us, content_hash, msgspec.Raw(record), "2023-11-14T22:13:20.000001Z",
            Position("conflux.c", 1, offset), deleted)


def fields(payload: bytes) -> list[list[bytes]]:
    assert payload.endswith(b"\n")
    return [line.split(b"\t") for line in payload[:-1].split(b"\n")]


def test_rows_carry_index_key_instant_offset_hash_op_and_data():
    staged = copy_text(["a", "b"], [value(b'{"x":1}'), value(b'{"id":"b"}', deleted=True, offset=43)], NULL_HASH)
    assert staged.refused == {}
    assert fields(staged.payload) == [  # COPY_STAGING's order: idx, updated_us, seq, hash, deleted, key, data
        [b"0", b"1700000000000001", b"42", b"00000000000000ab", b"f", b"a", b'{"x":1}'],
        [b"1", b"1700000000000001", b"43", NULL_HASH.encode(), b"t", b"b", b"\\N"],  # a delete: no data
    ]


def test_backslash_tab_newline_and_carriage_return_are_escaped_in_keys_and_records():
    record = b'{\n\t"s": "a\\\\b \\"q\\""\r\n}'
    staged = copy_text(["k\te\ny\\\r"], [value(record)], NULL_HASH)
    [row] = fields(staged.payload)
    assert row[5] == b"k\\te\\ny\\\\\\r"
    assert row[6] == b'{\\n\\t"s": "a\\\\\\\\b \\\\"q\\\\""\\r\\n}'
    assert staged.payload.count(b"\n") == 1  # the only newline ends the row


def test_a_key_with_nul_is_refused_and_the_others_keep_their_index():
    staged = copy_text(["a", "b\x00c", "d"], [value(b"{}"), value(b"{}"), value(b'{"d":1}')], NULL_HASH)
    assert set(staged.refused) == {1} and "NUL" in staged.refused[1]
    assert [(row[0], row[5]) for row in fields(staged.payload)] == [(b"0", b"a"), (b"2", b"d")]
    assert fields(staged.payload)[1][6] == b'{"d":1}'


def test_a_key_with_a_lone_surrogate_is_refused():
    staged = copy_text(["ok", "bad\ud800"], [value(b"{}"), value(b"{}")], NULL_HASH)
    assert set(staged.refused) == {1} and "UTF-8" in staged.refused[1]
    assert [row[5] for row in fields(staged.payload)] == [b"ok"]


def test_a_record_that_is_not_utf8_or_holds_nul_is_refused():
    staged = copy_text(["a", "b", "c", "d"],
                       [value(b'{"s":"\xff"}'), value(b'{"s":"\xc3'), value(b'{"s":"\x00"}'), value(b'{"ok":1}')],
                       NULL_HASH)
    assert set(staged.refused) == {0, 1, 2}
    assert "not valid UTF-8" in staged.refused[0] and "not valid UTF-8" in staged.refused[1]
    assert "NUL" in staged.refused[2]
    assert [row[5] for row in fields(staged.payload)] == [b"d"]


def test_a_split_multibyte_sequence_across_records_is_still_found():
    """Two halves of one character in two records would look valid if the records were simply joined."""
    staged = copy_text(["a", "b"], [value(b'"\xc3'), value(b'\xa9"')], NULL_HASH)
    assert set(staged.refused) == {0, 1}


def test_deletes_are_never_checked_for_their_record():
    staged = copy_text(["a"], [value(b"\xff\x00", deleted=True)], NULL_HASH)
    assert staged.refused == {}


def test_a_table_name_postgresql_would_truncate_is_a_config_error():
    options = PostgresSinkConfig(dsn="host=x", table="{source}")
    Table(options, "s" * 55)  # 55 + len("_deleted") = 63
    with pytest.raises(ConfigError, match="longer than PostgreSQL's 63 bytes"):
        Table(options, "s" * 56)
    Table(PostgresSinkConfig(dsn="host=x", delete_mode="soft"), "s" * 63)  # soft mode has no tombstone table


def test_layout_statements_follow_the_mode_and_the_typed_columns():
    columns = {"c": {"amount": PostgresColumn(field="order.amount", type="numeric(12,2)", index=True),
                     "meta": PostgresColumn(field="meta", type="jsonb")}}
    hard = Table(PostgresSinkConfig(dsn="host=x", schema="wh", table="t_{source}", columns=columns), "c")
    ddl = [statement.as_string() for statement in hard.ddl(set())]
    assert 'CREATE TABLE IF NOT EXISTS "wh"."t_c_deleted"' in ddl[-1]
    assert 'ALTER TABLE "wh"."t_c" ADD COLUMN IF NOT EXISTS "amount" numeric(12,2)' in ddl
    assert 'CREATE INDEX IF NOT EXISTS "t_c_amount_idx" ON "wh"."t_c" ("amount")' in ddl
    apply = hard.apply.as_string()
    assert """("u".doc #>> '{"order","amount"}'::text[])::numeric(12,2)""" in apply
    assert """("u".doc #> '{"meta"}'::text[])::jsonb""" in apply  # json stays json
    assert "WHERE (excluded.updated_at, excluded.seq) >= (t.updated_at, t.seq)" in apply
    soft = Table(PostgresSinkConfig(dsn="host=x", delete_mode="soft"), "c")
    soft_ddl = [statement.as_string() for statement in soft.ddl(set())]
    assert 'ALTER TABLE "public"."c" ADD COLUMN IF NOT EXISTS "deleted_at" timestamptz' in soft_ddl
    assert not any("_deleted" in statement for statement in soft_ddl)
    assert "deleted_at = excluded.deleted_at" in soft.apply.as_string()


def test_columns_and_indexes_already_there_are_not_altered_again():
    """ALTER TABLE takes an exclusive lock even with IF NOT EXISTS: a restart must not queue behind readers."""
    columns = {"c": {"amount": PostgresColumn(field="amount", type="numeric", index=True)}}
    table = Table(PostgresSinkConfig(dsn="host=x", delete_mode="soft", columns=columns), "c")
    ddl = [statement.as_string() for statement in table.ddl({"deleted_at", "amount", "c_amount_idx",
                                                             "c_updated_at_idx"})]
    assert not any(statement.startswith(("ALTER", "CREATE INDEX")) for statement in ddl)
    assert ddl == ['CREATE TABLE IF NOT EXISTS "public"."c" (key text PRIMARY KEY, updated_at timestamptz NOT NULL, '
                   'seq bigint NOT NULL DEFAULT 0, hash text NOT NULL, data jsonb, synced_at timestamptz NOT NULL)']
