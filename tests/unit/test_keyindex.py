"""The on-disk key index of reconciled sources (workers/keyindex.py): folding, candidates, decisions,
and rows that arrive while a reconcile runs."""

from __future__ import annotations

from xxhash import xxh3_64_intdigest

from conflux.workers.keyindex import KeyIndex


def h(key: str) -> int:
    return xxh3_64_intdigest(key.encode())


def see(index: KeyIndex, keys: list[str], *, at_us: int, updated_us: int = 1, deleted: bool = False) -> None:
    index.seen(keys, [h(k) for k in keys], [updated_us] * len(keys), [deleted] * len(keys), at_us)


def candidate_keys(reconcile) -> list[str]:
    return sorted(c.key for batch in reconcile.candidates(batch=2) for c in batch)


def test_keys_not_seen_since_the_sync_started_are_the_candidates(tmp_path):
    index = KeyIndex(tmp_path, "crm")
    see(index, ["a", "b", "c", "d", "e"], at_us=100)
    see(index, ["a", "c", "e"], at_us=200)          # the full sync that started at 150
    see(index, ["x"], at_us=210, deleted=True)      # a soft delete is not a live key
    reconcile = index.reconcile(started_us=150)
    assert (reconcile.live, reconcile.missing) == (5, 2)
    assert candidate_keys(reconcile) == ["b", "d"]
    assert all(c.key_hash == h(c.key) for batch in reconcile.candidates() for c in batch)


def test_a_delete_sticks_until_a_newer_version_and_an_older_one_does_not_revive_the_key(tmp_path):
    index = KeyIndex(tmp_path, "crm")
    see(index, ["a", "b"], at_us=100, updated_us=10)
    reconcile = index.reconcile(started_us=150)
    reconcile.decide(deleted=[h("b")])
    reconcile.commit()
    assert candidate_keys(index.reconcile(started_us=1_000)) == ["a"]   # b is deleted: never a candidate
    see(index, ["b"], at_us=300, updated_us=20)                          # late and older than the delete at 150
    again = index.reconcile(started_us=1_000)
    assert (again.live, candidate_keys(again)) == (1, ["a"])
    again.abandon()
    see(index, ["b"], at_us=400, updated_us=500)                         # restored upstream: newer
    assert index.reconcile(started_us=1_000).live == 2


def test_missed_counts_full_syncs_in_a_row_and_a_sighting_clears_it(tmp_path):
    index = KeyIndex(tmp_path, "crm")
    see(index, ["a"], at_us=100)
    for started_us, expected in ((150, 0), (250, 1)):
        reconcile = index.reconcile(started_us=started_us)
        (batch,) = list(reconcile.candidates())
        assert [c.missed for c in batch] == [expected]
        reconcile.decide(missed=[h("a")])
        reconcile.commit()
    see(index, ["a"], at_us=300)
    reconcile = index.reconcile(started_us=260)
    assert reconcile.missing == 0
    reconcile.commit()
    (batch,) = list(index.reconcile(started_us=400).candidates())
    assert batch[0].missed == 0


def test_rows_appended_while_a_reconcile_runs_are_kept(tmp_path):
    index = KeyIndex(tmp_path, "crm")
    see(index, ["a", "b"], at_us=100)
    reconcile = index.reconcile(started_us=150)
    see(index, ["b"], at_us=160, updated_us=50)        # a webhook arrives mid-reconcile
    reconcile.decide(deleted=[h("a"), h("b")])          # b was a candidate when the fold was made
    reconcile.commit()
    after = index.reconcile(started_us=155)
    assert after.live == 0   # the delete of b (at 150) is newer than the webhook's version (50): b stays deleted
    after.abandon()
    see(index, ["b"], at_us=170, updated_us=151)
    assert index.reconcile(started_us=155).live == 1


def test_abandon_leaves_the_index_as_it_was_and_it_survives_a_reopen(tmp_path):
    index = KeyIndex(tmp_path, "crm")
    see(index, ["a", "b"], at_us=100)
    reconcile = index.reconcile(started_us=150)
    reconcile.decide(deleted=[h("a")])
    reconcile.abandon()
    index.close()
    reopened = KeyIndex(tmp_path, "crm")
    assert candidate_keys(reopened.reconcile(started_us=150)) == ["a", "b"]


def test_extreme_key_hashes_are_stored_and_walked(tmp_path):
    index = KeyIndex(tmp_path, "crm")
    index.seen(["lo", "hi", "mid"], [0, (1 << 64) - 1, 1 << 63], [1, 1, 1], [False] * 3, 10)
    hashes = sorted(c.key_hash for batch in index.reconcile(started_us=20).candidates(batch=1) for c in batch)
    assert hashes == [0, 1 << 63, (1 << 64) - 1]


def test_a_dead_lettered_record_with_a_readable_key_counts_as_listed_but_never_outranks_a_version(tmp_path):
    from msgspec import Raw

    from conflux.workers.columns import Columns

    index = KeyIndex(tmp_path, "crm")
    see(index, ["a", "b", "c"], at_us=100, updated_us=10)
    reconcile = index.reconcile(started_us=100)
    reconcile.decide(deleted=[h("c")])
    reconcile.commit()                                  # c is deleted at 100
    page = Columns(keys=[], updated=[], updated_us=[], hashes=[], key_hashes=[], records=[], deleted=[],
                   dead=[(Raw(b"{}"), "a", "bad timestamp"), (Raw(b"{}"), "", "missing key field 'id'"),
                         (Raw(b"{}"), "c", "bad timestamp")])
    index.seen_columns(page, seen_us=200)               # the full sync that started at 150 saw a (invalid)
    reconcile = index.reconcile(started_us=150)
    assert (reconcile.live, candidate_keys(reconcile)) == (2, ["b"])  # c stays deleted, a stays live
