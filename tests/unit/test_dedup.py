"""Deduplicator (workers/dedup.py): message ids already processed, and content already delivered."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from conflux.workers.dedup import Deduplicator

FUZZ = settings(max_examples=80, derandomize=True, deadline=None)


def test_nothing_delivered_means_everything_is_fresh() -> None:
    dedup = Deduplicator()
    assert dedup.fresh_indices([1, 2, 3], ["a", "b", "c"]) is None
    assert dedup.keys_known == 0 and not dedup.seen_message("m1")


def test_content_already_delivered_for_a_key_is_skipped_and_changed_content_is_not() -> None:
    dedup = Deduplicator()
    dedup.remember("m1", [1, 2], ["a", "b"])
    assert dedup.seen_message("m1") and not dedup.seen_message("m2")
    assert dedup.fresh_indices([1, 2, 3], ["a", "B", "c"]) == [1, 2]
    assert dedup.fresh_indices([1, 2], ["a", "b"]) == []
    assert dedup.fresh_indices([3, 4], ["a", "b"]) is None  # all fresh: None, not a list of everything
    dedup.remember("m2", [2], ["B"])
    assert dedup.fresh_indices([2, 2], ["b", "B"]) == [0]  # only the last delivered content counts
    assert dedup.keys_known == 2


def test_message_ids_are_forgotten_oldest_first_past_the_bound() -> None:
    dedup = Deduplicator(max_message_ids=3)
    for index in range(5):
        dedup.remember(f"m{index}", [], [])
    assert [dedup.seen_message(f"m{index}") for index in range(5)] == [False, False, True, True, True]


def test_an_empty_batch_is_all_fresh() -> None:
    dedup = Deduplicator()
    dedup.remember("m", [1], ["a"])
    assert dedup.fresh_indices([], []) is None


@FUZZ
@given(steps=st.lists(st.tuples(st.booleans(), st.lists(st.tuples(st.integers(0, 5), st.sampled_from("abc")),
                                                         max_size=6)), max_size=20))
def test_fresh_indices_match_a_plain_model(steps: list) -> None:
    """A record is skipped exactly when its content equals the last content delivered for its key."""
    dedup, delivered = Deduplicator(), {}
    for index, (deliver, records) in enumerate(steps):
        key_hashes, hashes = [k for k, _ in records], [h for _, h in records]
        expected = [i for i, (k, h) in enumerate(records) if delivered.get(k) != h]
        fresh = dedup.fresh_indices(key_hashes, hashes)
        assert (list(range(len(records))) if fresh is None else fresh) == expected
        if deliver:
            dedup.remember(f"m{index}", key_hashes, hashes)
            delivered.update(records)
    assert dedup.keys_known == len(delivered)


def test_sources_do_not_hide_each_other():
    """Two systems holding the same key with byte-identical content are two records, not one."""
    dedup = Deduplicator()
    dedup.remember("m1", [1], ["a"], "crm")
    assert dedup.fresh_indices([1], ["a"], "crm") == []
    assert dedup.fresh_indices([1], ["a"], "erp") is None
