"""The PostgreSQL sink's config keys: what `conflux config check` takes and refuses, naming the field."""

from __future__ import annotations

from conflux.config import PostgresColumn
from tests.unit.test_config import error, load

SOURCE = '[[sources]]\nname = "{name}"\nurl = "http://upstream/api/x"\n'
SINK = '[[sinks]]\nname = "warehouse"\ntype = "postgres"\ndsn = "postgresql://conflux@db:5432/dw"\n'


def test_every_documented_key_loads():
    config = load(SOURCE.format(name="products") + SINK + (
        'schema = "dw"\ntable = "raw_{source}"\ncreate_tables = false\ndelete_mode = "soft"\nbatch_size = 2000\n'
        'flush_interval_s = 0.5\nmax_in_flight = 3\nmax_pending_records = 20000\ntimeout_s = 10\n'
        'ledger_retention_s = 86400\n'
        '[sinks.columns.products]\nprice = { field = "price", type = "numeric(12,2)" }\n'
        'stock = { field = "stock.count", type = "integer", index = true }\n'))
    [spec] = config.sinks
    options = spec.options
    assert (spec.type, options.schema, options.table, options.create_tables, options.delete_mode) == (
        "postgres", "dw", "raw_{source}", False, "soft")
    assert (options.batch_size, options.max_in_flight, options.timeout_s, options.ledger_retention_s) == (
        2000, 3, 10.0, 86400.0)
    assert options.columns == {"products": {"price": PostgresColumn(field="price", type="numeric(12,2)"),
                                            "stock": PostgresColumn(field="stock.count", type="integer", index=True)}}


def test_a_table_name_postgresql_would_truncate_names_the_sink_and_the_source():
    long_name = "s" * 56  # + "_deleted" is 64 bytes
    message = error(SOURCE.format(name=long_name) + SINK)
    assert message.startswith("sinks[0] (warehouse).table:") and long_name in message and "63 bytes" in message
    load(SOURCE.format(name=long_name) + SINK + 'delete_mode = "soft"\n')  # no tombstone table in soft mode


def test_a_source_routed_elsewhere_is_not_checked_against_this_sink():
    other = '[[sinks]]\nname = "events"\ntype = "http"\nurl = "http://sink/ingest"\n'
    load(SOURCE.format(name="s" * 60) + 'sinks = ["events"]\n' + SINK + other)


def test_bad_values_are_refused_naming_the_field():
    assert "ledger_retention_s must be >= 3600" in error(SOURCE.format(name="a") + SINK + "ledger_retention_s = 60\n")
    assert "dsn holds a password" in error(SOURCE.format(name="a") + SINK.replace("conflux@", "conflux:pw@"))
    assert "columns.a.key" in error(SOURCE.format(name="a") + SINK + '[sinks.columns.a]\nkey = { field = "k" }\n')
    assert "not a PostgreSQL type name" in error(
        SOURCE.format(name="a") + SINK + '[sinks.columns.a]\nn = { field = "n", type = "int; drop table x" }\n')
