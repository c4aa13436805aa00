"""Parent -> child sources (workers/parents.py): the parent index (what is live, since when, which
deletes a child has not cascaded yet), the parent key stamped on child records, the child keys a
parent's delete takes along (workers/keyindex.py children_of), and the walk over the parents."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from msgspec import Raw
from multidict import CIMultiDict, CIMultiDictProxy
from xxhash import xxh3_64_intdigest

from conflux.config import SourceConfig
from conflux.workers.batching import RecordSchema
from conflux.workers.keyindex import KeyIndex
from conflux.workers.paging import PageInfo, make_paginator
from conflux.workers.parents import ChildWalk, ParentChange, ParentIndex, ParentStamp, parent_changes
from conflux.workers.upstream import Response, UpstreamAnswered

T0 = "2024-05-01T10:00:00Z"


def change(key: str, updated_us: int = 10, *, deleted: bool = False, **fields) -> ParentChange:
    return ParentChange(key, None if deleted and not fields else msgspec.json.encode({"": key, **fields}),
                        updated_us, deleted)


def live(index: ParentIndex) -> list[tuple[str, dict, int]]:
    return [(p.key, p.fields, p.first_seen_us) for p in index.live("", 1000)]


def test_live_parents_come_in_key_order_with_their_fields_and_since_when(tmp_path) -> None:
    index = ParentIndex(tmp_path, "projects")
    assert not index.complete()
    assert index.record([change("b", id=2), change("a", id=1), change("c", id=3)], seen_us=100) == 3
    index.full_sync_complete(started_us=50)
    assert index.complete()
    assert live(index) == [("a", {"": "a", "id": 1}, 100), ("b", {"": "b", "id": 2}, 100),
                           ("c", {"": "c", "id": 3}, 100)]
    assert [p.key for p in index.live("a", 1)] == ["b"]
    # A changed parent keeps its first sighting; a newer version's fields replace the old ones.
    assert index.record([change("a", 20, id=11)], seen_us=200) == 0
    assert live(index)[0] == ("a", {"": "a", "id": 11}, 100)


def test_a_delete_stops_a_parent_and_a_restore_makes_it_new(tmp_path) -> None:
    index = ParentIndex(tmp_path, "projects")
    index.record([change("a", id=1), change("b", id=2)], seen_us=100)
    index.full_sync_complete(50)
    assert index.record([change("a", 20, deleted=True)], seen_us=200) == 1
    assert [key for key, *_ in live(index)] == ["b"]
    assert index.deleted_since("kids") == [("a", 20, 1)]
    index.cascaded("kids", 1)
    assert index.deleted_since("kids") == [] and index.deleted_since("other") == [("a", 20, 1)]
    # An older live version arriving late does not revive it; a newer one restores it as new.
    assert index.record([change("a", 15, id=1)], seen_us=250) == 0
    assert [key for key, *_ in live(index)] == ["b"]
    assert index.record([change("a", 30, id=1)], seen_us=300) == 1
    assert live(index)[0] == ("a", {"": "a", "id": 1}, 300)
    # Deleted again: a new delete for the children to cascade, and the stored fields are kept.
    index.record([change("a", 40, deleted=True)], seen_us=400)
    assert index.deleted_since("kids") == [("a", 40, 2)]


def test_a_parent_not_listed_by_the_last_complete_full_sync_is_not_walked(tmp_path) -> None:
    index = ParentIndex(tmp_path, "projects")
    index.record([change("a"), change("b")], seen_us=100)
    index.full_sync_complete(50)
    index.record([change("a")], seen_us=300)          # the next full sync, started at 250, lists only a
    index.full_sync_complete(250)
    assert [key for key, *_ in live(index)] == ["a"]
    assert index.deleted_since("kids") == []         # gone without a delete: nothing to cascade
    index.record([change("b")], seen_us=400)          # listed again: new, its children walked in full
    assert live(index)[1] == ("b", {"": "b"}, 400)


def test_the_index_survives_a_restart_and_remembers_each_childs_last_sync(tmp_path) -> None:
    index = ParentIndex(tmp_path, "projects")
    index.record([change("a")], seen_us=100)
    index.full_sync_complete(50)
    assert index.synced_from("kids") == 0
    index.child_synced("kids", 500)
    index.close()
    again = ParentIndex(tmp_path, "projects")
    assert again.complete() and again.synced_from("kids") == 500 and [k for k, *_ in live(again)] == ["a"]


def test_parent_changes_pair_each_valid_record_with_the_fields_its_children_use() -> None:
    source = SourceConfig(name="projects", url="http://u/api", key="id", deleted="deleted")
    schema = RecordSchema(source, extra_fields=["meta.slug", "owner"])
    body = msgspec.json.encode({"data": [
        {"id": 7, "updated_at": T0, "meta": {"slug": "acme"}, "owner": None},
        {"updated_at": T0},                                                  # no key: a dead letter
        {"id": 8, "updated_at": T0, "deleted": True}]})
    records, fields, _meta = schema.page_records(body)
    columns = schema.columns(records, fields)
    changes = parent_changes(schema, ["meta.slug", "owner"], columns, fields)
    assert [(c.key, msgspec.json.decode(c.fields), c.deleted) for c in changes] == [
        ("7", {"": 7, "meta.slug": "acme"}, False), ("8", {"": 8}, True)]


def stamp_schema(key: str | list[str] = "id") -> RecordSchema:
    return RecordSchema(SourceConfig(name="issues", url="http://u/{parent.id}", parent="projects", key=key))


def test_the_parent_key_is_added_to_records_that_lack_it() -> None:
    schema = stamp_schema()
    stamp = ParentStamp(schema, "parent_key", ["id", "updated_at"])
    records = [Raw(b'{"id": 1, "updated_at": "%s"} ' % T0.encode()), Raw(b"{ }"),
               Raw(b'{"id": 2, "parent_key": "own"}'), Raw(b"[1]")]
    stamped, fields = stamp.stamp(records, ["f1", "f2", "f3", "f4"], 7)
    assert [bytes(r) for r in stamped] == [b'{"id": 1, "updated_at": "%s","parent_key":7}' % T0.encode(),
                                           b'{"parent_key":7}', b'{"id": 2, "parent_key": "own"}', b"[1]"]
    assert fields == ["f1", "f2", "f3", "f4"]       # the identity does not read parent_key: not decoded again


def test_a_key_that_uses_the_parent_key_is_read_after_the_stamp() -> None:
    schema = stamp_schema(["parent_key", "number"])
    stamp = ParentStamp(schema, "parent_key", ["parent_key", "number", "updated_at"])
    body = msgspec.json.encode({"data": [{"number": 1, "updated_at": T0}, {"number": 2, "updated_at": T0}]})
    records, fields, _meta = schema.page_records(body)
    records, fields = stamp.stamp(records, fields, "acme")
    assert schema.columns(records, fields).keys == ["acme|1", "acme|2"]


def see(index: KeyIndex, keys: list[str], parent: str, at_us: int, *, updated_us: int = 1,
        deleted: bool = False) -> None:
    index.seen(keys, [xxh3_64_intdigest(k.encode()) for k in keys], [updated_us] * len(keys), [deleted] * len(keys),
               at_us, parent=parent)


def test_children_of_are_the_live_keys_last_listed_under_those_parents(tmp_path) -> None:
    index = KeyIndex(tmp_path, "issues")
    see(index, ["i1", "i2", "i3"], "p1", 100)
    see(index, ["i4"], "p2", 100)
    see(index, ["i3"], "p2", 200)                     # moved to another parent
    see(index, ["i2"], "p1", 300, updated_us=5, deleted=True)
    see(index, ["i1"], "", 400, updated_us=6)          # a webhook: no parent, still p1's
    children = index.children_of(["p1"])
    assert [(c.key, c.updated_us, c.parent) for c in children] == [("i1", 6, "p1")]
    assert sorted(c.key for c in index.children_of(["p1", "p2"])) == ["i1", "i3", "i4"]
    # The column is added to an index made before it existed, and carried through a reconcile's fold.
    reconcile = index.reconcile(started_us=1_000)
    reconcile.commit()
    assert sorted(c.key for c in index.children_of(["p2"])) == ["i3", "i4"]


def test_an_index_made_before_the_parent_column_gets_it(tmp_path) -> None:
    import sqlite3
    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("CREATE TABLE rows (key_hash INTEGER NOT NULL, key TEXT NOT NULL, seen_us INTEGER NOT NULL, "
               "updated_us INTEGER NOT NULL, deleted INTEGER NOT NULL, missed INTEGER NOT NULL DEFAULT 0)")
    db.execute("INSERT INTO rows VALUES (1, 'k', 1, 1, 0, 0)")
    db.commit()
    db.close()
    index = KeyIndex(tmp_path, "old")
    see(index, ["i1"], "p1", 100)
    assert [c.key for c in index.children_of(["p1"])] == ["i1"]
    assert index.reconcile(started_us=1_000).live == 2


class FakeChildPages:
    """The fetcher's side for a child walk: answers each parent's listing, 404 for a gone parent."""

    def __init__(self, listings: dict[str, list[dict]], gone: set[str]) -> None:
        self.listings, self.gone = listings, gone
        self.requests: list[tuple[str, dict, object]] = []
        self.handled: list[tuple[str, str]] = []
        self.in_flight = self.max_in_flight = 0

    async def get(self, url: str, params: dict[str, str], *, parent=None) -> Response:
        self.requests.append((url, dict(params), parent.key))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.001)
        self.in_flight -= 1
        name = url.rsplit("/", 2)[-2]
        if name in self.gone:
            raise UpstreamAnswered(f"{url} answered 404", 404)
        body = msgspec.json.encode({"data": self.listings[name], "has_more": False})
        return Response(200, CIMultiDictProxy(CIMultiDict()), body, url)

    async def handle(self, response: Response, *, parent=None) -> PageInfo:
        records = msgspec.json.decode(response.body)["data"]
        self.handled += [(parent.key, record["id"]) for record in records]
        return PageInfo(len(records), msgspec.json.decode(response.body, type=_Meta), None)


class _Meta(msgspec.Struct):
    has_more: bool = False
    total: int | None = None
    next_cursor: str | None = None
    next_url: str | None = None


def test_a_child_walk_visits_every_live_parent_once_and_skips_gone_and_fieldless_ones(tmp_path) -> None:
    index = ParentIndex(tmp_path, "projects")
    index.record([change(f"p{n}", slug=f"s{n}") for n in range(7)] + [change("bare")], seen_us=100)
    index.full_sync_complete(50)
    index.child_synced("issues", 150)
    index.record([change("p9", slug="s9")], seen_us=200)            # new since the child's last sync
    source = SourceConfig(name="issues", url="http://u/api/{parent.slug}/issues", parent="projects",
                          max_concurrency=3)
    pages = FakeChildPages({f"s{n}": [{"id": f"i{n}"}] for n in range(10)}, gone={"s3"})
    walk = ChildWalk(source, index, make_paginator(source))
    fetched = asyncio.run(walk.walk(pages, since="W"))
    assert sorted(pages.handled) == [(f"p{n}", f"i{n}") for n in (0, 1, 2, 4, 5, 6, 9)]
    assert fetched == 7 and (walk.counts["gone"], walk.counts["without_fields"]) == (1, 1)
    assert 1 < pages.max_in_flight <= 3
    # The incremental sync asks each known parent from the watermark; the new one in full.
    since = {parent: params.get("updated_since") for _url, params, parent in pages.requests}
    assert since["p9"] is None and {since[f"p{n}"] for n in range(7)} == {"W"}


def test_a_failed_parent_walk_fails_the_child_sync_and_stops_the_others(tmp_path) -> None:
    index = ParentIndex(tmp_path, "projects")
    index.record([change(f"p{n}", slug=f"s{n}") for n in range(20)], seen_us=100)
    index.full_sync_complete(50)
    source = SourceConfig(name="issues", url="http://u/api/{parent.slug}/issues", parent="projects",
                          max_concurrency=2)
    pages = FakeChildPages({}, gone=set())   # every listing raises KeyError: not a 404
    with pytest.raises(KeyError):
        asyncio.run(ChildWalk(source, index, make_paginator(source)).walk(pages, since=None))
    assert len(pages.requests) < 20
