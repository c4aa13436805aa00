"""The analytics sink's state and its SQLite journal (demo/analytics_store.py, demo/analytics_db.py):
last writer wins by (updated_at, seq), in memory and in the folded rows alike."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path

import msgspec
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from conflux.demo.analytics_db import Database, to_signed, to_unsigned
from conflux.demo.analytics_store import Store, StoreFailed
from conflux.demo.analytics_wire import check_batch, decode_batch, parse_instant
from conflux.demo.checksum import Checksum, record_digest

TIMES = ["2024-01-01T00:00:00Z", "2024-01-01T01:00:00+01:00", "2024-01-01T00:00:01Z", "2024-01-01T00:00:02Z"]


def record(key: str, data: bytes, updated_at: str, op: str = "upsert", source: str = "s",
           seq: int | None = None) -> dict:
    """An ingest record; ``seq`` None leaves the field out (an older producer), which means 0."""
    fields = {"source": source, "key": key, "op": op, "updated_at": updated_at,
              "hash": xxhash.xxh3_64_hexdigest(data), "data": msgspec.Raw(data)}
    return fields if seq is None else {**fields, "seq": seq}


def ingest(store: Store, batch_id: str, records: list[dict]):
    body = msgspec.json.encode({"batch_id": batch_id, "records": records})
    batch = decode_batch(body)
    changes, rejected = check_batch(batch, 0.0)
    return store.apply(batch_id, body, changes, rejected)


class Model:
    """The rules spelled out as simply as possible: last writer wins by (instant, seq), ties to the later;
    a delete is a version whose data is None (a tombstone)."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str], tuple[object, int, bytes | None]] = {}
        self.deletes_applied: Counter[str] = Counter()

    def apply(self, rec: dict) -> None:
        key = (rec["source"], rec["key"])
        version = (parse_instant(rec["updated_at"]), rec.get("seq", 0))
        if key not in self.latest or version >= self.latest[key][:2]:
            self.latest[key] = (*version, bytes(rec["data"]) if rec["op"] == "upsert" else None)
            self.deletes_applied[rec["source"]] += rec["op"] == "delete"

    def checksums(self) -> dict[str, dict]:
        """What Store.source_stats holds that survives a restart: checksum, count and tombstones."""
        sums: dict[str, Checksum] = {}
        tombstones: Counter[str] = Counter()
        for (source, key), (_, _, data) in self.latest.items():
            checksum = sums.setdefault(source, Checksum())
            if data is not None:
                checksum.add(record_digest(key, data))
            else:
                tombstones[source] += 1
        return {source: {**checksum.as_dict(), "tombstones": tombstones[source]} for source, checksum in sums.items()}

    @staticmethod
    def one(data: bytes, key: str) -> dict:
        checksum = Checksum()
        checksum.add(record_digest(key, data))
        return checksum.as_dict()

    def stats(self) -> dict[str, dict]:
        return {source: {**sums, "deletes_applied": self.deletes_applied[source]}
                for source, sums in self.checksums().items()}


def lasting(stats: dict[str, dict]) -> dict[str, dict]:
    """Per-source stats without deletes_applied, which counts since the process started."""
    return {source: {k: v for k, v in fields.items() if k != "deletes_applied"} for source, fields in stats.items()}


operations = st.lists(st.lists(st.builds(
    record,
    key=st.sampled_from(["a", "b", "c"]),
    data=st.sampled_from([b"{}", b'{"v":1}', b'{"v": 2}']),
    updated_at=st.sampled_from(TIMES),
    op=st.sampled_from(["upsert", "upsert", "delete"]),
    source=st.sampled_from(["s", "t"]),
    seq=st.sampled_from([None, 0, 1, 2]),
), max_size=6), max_size=8)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_checksums_and_fold_agree_with_a_simple_model(batches):
    store = Store(db=Database(path=":memory:"))
    model = Model()
    for n, records in enumerate(batches):
        ingest(store, f"b{n}", records)
        for rec in records:
            model.apply(rec)
    assert store.source_stats() == model.stats()
    for (source, key), (_, seq, data) in model.latest.items():
        stored = asyncio.run(store.record(source, key))  # folds the journal first
        assert stored is not None and stored[1:] == (seq, data)


@settings(max_examples=40, deadline=None)
@given(operations, operations, st.booleans())
def test_a_restart_between_batches_keeps_every_rule(before, after, fold_first):
    """The same model across a stop and start of the sink, with the journal folded first or replayed
    on start: tombstones keep older upserts out, newer upserts recreate keys, counts survive."""
    model = Model()

    def run(store: Store, prefix: str, batches: list[list[dict]]) -> None:
        try:
            for n, records in enumerate(batches):
                ingest(store, f"{prefix}{n}", records)
                for rec in records:
                    model.apply(rec)
            if fold_first:
                asyncio.run(store.fold_all())
            assert lasting(store.source_stats()) == model.checksums()
        finally:
            store.close()  # also stops its checkpointer thread before the directory goes

    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory) / "sink.db")
        run(Store(db=Database(path=path)), "a", before)
        run(Store(db=Database(path=path)), "b", after)  # the journal, folded or not, replays on start
        store = Store(db=Database(path=path))
        try:
            assert lasting(store.source_stats()) == model.checksums()
            for (source, key), (_, seq, data) in model.latest.items():
                assert asyncio.run(store.record(source, key))[1:] == (seq, data)
        finally:
            store.close()


@pytest.mark.parametrize("fold_first", [False, True], ids=["journaled", "folded"])
def test_tombstones_keep_older_upserts_out_and_newer_ones_in_across_restarts(tmp_path, fold_first):
    path = str(tmp_path / "sink.db")
    store = Store(db=Database(path=path))
    ingest(store, "b1", [record("a", b'{"v":1}', TIMES[0]), record("b", b'{"b":1}', TIMES[0])])
    deletes = ingest(store, "b2", [record("a", b"null", TIMES[2], op="delete"),
                                   record("ghost", b"null", TIMES[2], op="delete"),  # never held: no error
                                   record("a", b"null", TIMES[2], op="delete")])  # repeated: idempotent
    assert (deletes.applied, deletes.ignored_stale, deletes.rejected) == (3, 0, [])
    assert store.source_stats()["s"] == {**Model.one(b'{"b":1}', "b"), "tombstones": 2, "deletes_applied": 3}
    if fold_first:
        asyncio.run(store.fold_all())
    # No close: as after kill -9.
    store = Store(db=Database(path=path))
    assert store.source_stats()["s"] == {**Model.one(b'{"b":1}', "b"), "tombstones": 2, "deletes_applied": 0}
    late = ingest(store, "b3", [record("a", b'{"v":0}', TIMES[1]), record("ghost", b'{"g":0}', TIMES[0])])
    assert (late.applied, late.ignored_stale) == (0, 2)
    assert asyncio.run(store.record("s", "a")) == (TIMES[2], 0, None)
    assert ingest(store, "b4", [record("a", b'{"v":2}', TIMES[3])]).applied == 1  # a restore upstream
    assert store.source_stats()["s"]["tombstones"] == 1
    store.close()
    store = Store(db=Database(path=path))
    assert asyncio.run(store.record("s", "a")) == (TIMES[3], 0, b'{"v":2}')
    expected = Checksum()
    for key, data in (("a", b'{"v":2}'), ("b", b'{"b":1}')):
        expected.add(record_digest(key, data))
    assert store.source_stats()["s"] == {**expected.as_dict(), "tombstones": 1, "deletes_applied": 0}
    store.close()


def test_outcomes_count_applied_and_stale():
    store = Store(db=Database(path=":memory:"))
    first = ingest(store, "b1", [record("a", b"{}", TIMES[2])])
    second = ingest(store, "b2", [record("a", b'{"v":1}', TIMES[0]), record("b", b"{}", TIMES[0])])
    assert (first.applied, first.ignored_stale) == (1, 0)
    assert (second.applied, second.ignored_stale) == (1, 1)
    assert store.batch_ids == {"b1", "b2"}
    again = store.previous_outcome("b2")
    assert (again.applied, again.ignored_stale, again.rejected) == (1, 1, [])
    assert store.previous_outcome("nope") is None


def test_reopening_the_db_restores_state_including_an_unfolded_journal(tmp_path):
    path = str(tmp_path / "sink.db")
    store = Store(db=Database(path=path))
    ingest(store, "b1", [record("a", b'{"v":1}', TIMES[0]), record("b", b"{}", TIMES[0])])
    asyncio.run(store.fold_all())
    ingest(store, "b2", [record("a", b"{}", TIMES[2], op="delete"), record("c", b'{"c":3}', TIMES[1])])
    expected = store.source_stats()
    # No close and no fold: as after kill -9, batch b2 exists only in the journal.
    reopened = Store(db=Database(path=path))
    assert lasting(reopened.source_stats()) == lasting(expected)
    assert reopened.batch_ids == {"b1", "b2"}
    assert asyncio.run(reopened.record("s", "a")) == (TIMES[2], 0, None)
    # The tombstone's instant came back too: an older upsert stays dead.
    assert ingest(reopened, "b3", [record("a", b"{}", TIMES[1])]).ignored_stale == 1
    reopened.close()


def test_equal_instants_are_ordered_by_seq_in_memory_and_after_a_restart(tmp_path):
    path = str(tmp_path / "sink.db")
    store = Store(db=Database(path=path))
    assert ingest(store, "b1", [record("k", b'{"v":2}', TIMES[0], seq=9)]).applied == 1
    # The same instant, an earlier observation arriving late: stale, whichever way the instant is spelled.
    assert ingest(store, "b2", [record("k", b'{"v":1}', TIMES[1], seq=4)]).ignored_stale == 1
    assert ingest(store, "b3", [record("k", b'{"v":1}', TIMES[0])]).ignored_stale == 1  # no seq: 0
    assert ingest(store, "b4", [record("k", b'{"v":2}', TIMES[0], seq=9)]).applied == 1  # the same version
    asyncio.run(store.fold_all())
    ingest(store, "b5", [record("k", b'{"v":1}', TIMES[0], seq=5)])  # stale, and folded after b4
    asyncio.run(store.fold_all())
    assert asyncio.run(store.record("s", "k")) == (TIMES[0], 9, b'{"v":2}')
    reopened = Store(db=Database(path=path))
    assert ingest(reopened, "b6", [record("k", b'{"v":3}', TIMES[0], seq=8)]).ignored_stale == 1
    assert ingest(reopened, "b7", [record("k", b'{"v":3}', TIMES[0], seq=10)]).applied == 1
    assert asyncio.run(reopened.record("s", "k")) == (TIMES[0], 10, b'{"v":3}')
    reopened.close()


def test_a_db_from_before_seq_opens_with_seq_0_for_every_record(tmp_path):
    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as old:
        old.executescript("""
            CREATE TABLE records (source TEXT NOT NULL, key TEXT NOT NULL, updated_at TEXT NOT NULL,
                updated_us INTEGER NOT NULL, digest INTEGER, data BLOB, PRIMARY KEY (source, key));
            INSERT INTO records VALUES ('s', 'k', '2024-01-01T00:00:00Z', 1704067200000000, 5, X'7B7D');
        """)
    store = Store(db=Database(path=path))
    assert asyncio.run(store.record("s", "k")) == ("2024-01-01T00:00:00Z", 0, b"{}")
    assert ingest(store, "b1", [record("k", b'{"v":1}', TIMES[0], seq=1)]).applied == 1
    asyncio.run(store.fold_all())
    assert asyncio.run(store.record("s", "k")) == (TIMES[0], 1, b'{"v":1}')
    store.close()


def test_a_failed_write_raises_store_failed():
    store = Store(db=Database(path=":memory:"))
    ingest(store, "b1", [])
    with pytest.raises(StoreFailed) as failure:
        ingest(store, "b1", [])  # the batch id is unique in SQLite: the insert fails
    assert isinstance(failure.value.__cause__, sqlite3.IntegrityError)


def test_digests_round_trip_through_signed_sqlite_integers():
    for digest in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        assert -(2**63) <= to_signed(digest) < 2**63
        assert to_unsigned(to_signed(digest)) == digest
