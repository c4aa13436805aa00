"""Deterministic demo data: what each collection looks like and how its records are generated.

The upstream process calls ``generate`` once per collection at start-up, before it listens. The same
seed gives the same bytes on any day and machine: every random stream is seeded from a string
(``"<seed>:<collection>:data"``), and initial ``updated_at`` values lie in a fixed past range.

Records are generated column by column and encoded once with msgspec; per-record Python work is what
makes a million records slow, so the loops here are comprehensions over whole columns.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import msgspec

from conflux.demo.record_layout import RecordLayout
from conflux.demo.upstream_time import PRECISION_UNIT_US, parse_iso_us

Key = int | str
# A column generator: (rng, count, columns generated so far, keys) -> one value per record.
Column = Callable[[random.Random, int, dict[str, list], list[Key]], list]

RANGE_START_US = parse_iso_us("2026-01-01T00:00:00Z")
RANGE_SPAN_US = 30 * 86_400 * 1_000_000
# Records are written in bursts (imports, batch jobs), so on average this many share one timestamp.
RECORDS_PER_BURST = 8
MISSING_KEY = "missing_key"
BAD_UPDATED_AT = "bad_updated_at"
TOO_DEEP = "too_deep"                    # a valid record nested past any recursive decoder's limit
FUTURE_UPDATED_AT = "future_updated_at"  # a valid record stamped in the year 2999
FUTURE_STAMP = "2999-01-01T00:00:00Z"
FUTURE_US = parse_iso_us(FUTURE_STAMP)
_BAD_DATES = ("not-a-date", "2026-13-45T99:00:00Z")

_encode = msgspec.json.Encoder().encode


def uniform_ints(rng: random.Random, count: int, span: int) -> list[int]:
    """``count`` ints in [0, span), from random bytes modulo ``span``: a bias of at most span / 2**32
    (span / 256 is exact for the small option lists), and up to 15 times faster than ``rng.choices``."""
    if span <= 256:
        table = bytes(i % span for i in range(256))
        return list(rng.randbytes(count).translate(table))
    return [bits % span for bits in memoryview(rng.randbytes(4 * count)).cast("I")]


def pick(options: Sequence) -> Column:
    options = tuple(options)

    def column(rng: random.Random, count: int, _cols: dict, _keys: list) -> list:
        return list(map(options.__getitem__, uniform_ints(rng, count, len(options))))
    return column


def integer(low: int, high: int) -> Column:
    return lambda rng, count, _cols, _keys: [low + n for n in uniform_ints(rng, count, high - low + 1)]


def money(low: int, high: int) -> Column:
    """Amounts with at most two decimals, e.g. 123.45."""
    span = (high - low) * 100
    return lambda rng, count, _cols, _keys: [(low * 100 + c) / 100 for c in uniform_ints(rng, count, span)]


def reference(prefix: str, high: int) -> Column:
    return lambda rng, count, _cols, _keys: [f"{prefix}-{1 + n:06d}" for n in uniform_ints(rng, count, high)]


def phrase(first: Sequence[str], second: Sequence[str]) -> Column:
    def column(rng: random.Random, count: int, _cols: dict, _keys: list) -> list:
        firsts = pick(first)(rng, count, _cols, _keys)
        return list(map("{} {}".format, firsts, pick(second)(rng, count, _cols, _keys)))
    return column


def email_from_name(rng: random.Random, count: int, cols: dict[str, list], keys: list[Key]) -> list:
    locals_ = [name.replace(" ", ".").replace("ü", "ue").lower() for name in cols["name"]]
    return [f"{local}{key}@example.com" for local, key in zip(locals_, keys, strict=True)]


FIRST_NAMES = ("Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira",
               "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Vera", "Wim")
LAST_NAMES = ("Smith", "Jansen", "Garcia", "Müller", "Rossi", "Nowak", "Dubois", "Kowalski", "Silva", "Novak",
              "Okafor", "Tanaka", "Berg", "Costa", "Visser", "Larsen", "Meyer", "Haddad", "Ivanova", "Kim")
ADJECTIVES = ("Compact", "Deluxe", "Eco", "Heavy-duty", "Mini", "Pro", "Smart", "Steel", "Travel", "Wireless")
NOUNS = ("Adapter", "Backpack", "Blender", "Cable", "Drill", "Kettle", "Lamp", "Monitor", "Router", "Speaker")
COMPANIES = ("Acme", "Globex", "Initech", "Umbrella", "Vandelay", "Stark", "Wayne", "Tyrell", "Hooli")
COMPANY_KINDS = ("Logistics", "Supplies", "Components", "Trading", "Foods", "Textiles", "Metals", "Plastics")


@dataclass(frozen=True)
class CollectionSpec:
    """The shape of one collection: key field and type, the other fields, what background changes touch."""

    name: str
    key_field: str
    key_prefix: str | None  # None: integer keys 1..N; else "<prefix>-000001"
    columns: tuple[tuple[str, Column], ...]
    mutable_field: str  # its column must not depend on other columns

    def format_key(self, index: int, width: int = 6) -> Key:
        return index if self.key_prefix is None else f"{self.key_prefix}-{index:0{width}d}"

    def keys(self, indexes: Iterable[int], width: int = 6) -> list[Key]:
        """``format_key`` of each index, a whole column at once (for speed)."""
        if self.key_prefix is None:
            return list(indexes)
        return list(map(f"{self.key_prefix}-{{:0{width}d}}".format, indexes))

    def mutation(self, rng: random.Random) -> dict[str, object]:
        """The fields of one background change: a fresh value for the mutable field."""
        column = dict(self.columns)[self.mutable_field]
        return {self.mutable_field: column(rng, 1, {}, [])[0]}


CUSTOMERS = CollectionSpec("customers", "id", None, (
    ("name", phrase(FIRST_NAMES, LAST_NAMES)),
    ("email", email_from_name),
    ("tier", pick(("bronze", "silver", "gold", "platinum"))),
), mutable_field="tier")

PRODUCTS = CollectionSpec("products", "sku", "SKU", (
    ("name", phrase(ADJECTIVES, NOUNS)),
    ("price", money(1, 500)),
    ("stock", integer(0, 1000)),
    ("warehouse", pick(("AMS-1", "BER-1", "MAD-2", "WAW-1", "DUB-3"))),
), mutable_field="stock")


def _system(name: str, prefix: str, mutable_field: str, /, **columns: Column) -> CollectionSpec:
    return CollectionSpec(name, "id", prefix, tuple(columns.items()), mutable_field)


_ORDER_STATUS = pick(("pending", "paid", "shipped", "delivered", "cancelled"))
SYSTEMS: tuple[CollectionSpec, ...] = (
    _system("orders", "ord", "status", customer_id=integer(1, 5000), status=_ORDER_STATUS,
            total=money(5, 2000), currency=pick(("EUR", "USD", "GBP"))),
    _system("shipments", "shp", "status", order_id=reference("ord", 1000),
            carrier=pick(("DHL", "UPS", "PostNL")), weight_kg=money(0, 40),
            status=pick(("label_created", "in_transit", "out_for_delivery", "delivered"))),
    _system("payments", "pay", "status", order_id=reference("ord", 1000), amount=money(5, 2000),
            method=pick(("card", "sepa", "paypal", "invoice")),
            status=pick(("authorized", "captured", "refunded", "failed"))),
    _system("analytics", "evt", "value", event=pick(("page_view", "click", "signup", "purchase")),
            session_id=reference("ses", 100_000), value=integer(0, 1000)),
    _system("crm_events", "crm", "outcome", customer_id=integer(1, 5000),
            kind=pick(("call", "email", "meeting", "note")),
            outcome=pick(("positive", "neutral", "negative"))),
    _system("erp_updates", "erp", "status", document=pick(("invoice", "purchase_order", "credit_note")),
            amount=money(10, 20_000), status=pick(("draft", "posted", "reversed"))),
    _system("warehouse", "wh", "quantity", location=pick(("A-01", "A-02", "B-01", "C-07", "D-12")),
            sku=reference("SKU", 5000), quantity=integer(0, 5000)),
    _system("supplier", "sup", "rating", name=phrase(COMPANIES, COMPANY_KINDS),
            country=pick(("NL", "DE", "FR", "PL", "US", "CN")), rating=integer(1, 5)),
    _system("marketing", "mkt", "clicks", campaign=phrase(ADJECTIVES, NOUNS),
            channel=pick(("email", "social", "search", "display")), spend=money(0, 5000),
            clicks=integer(0, 100_000)),
    _system("support_tickets", "tkt", "status", customer_id=integer(1, 5000),
            priority=pick(("low", "normal", "high", "urgent")),
            status=pick(("open", "pending", "solved", "closed")),
            subject=phrase(ADJECTIVES, NOUNS)),
)


def system_spec(number: int) -> CollectionSpec:
    """The ``number``-th extra system (1-based): the named ones first, then generic ``system_11``…"""
    if number <= len(SYSTEMS):
        return SYSTEMS[number - 1]
    return _system(f"system_{number}", f"sys{number}", "value",
                   category=pick(("alpha", "beta", "gamma", "delta")), value=integer(0, 1_000_000),
                   status=pick(("new", "active", "archived")))


def collection_plan(*, customers: int, products: int, systems: int,
                    records_per_system: int) -> list[tuple[CollectionSpec, int]]:
    """Which collections the upstream serves, with their record counts, in a stable order."""
    plan = [(CUSTOMERS, customers), (PRODUCTS, products)]
    plan += [(system_spec(n), records_per_system) for n in range(1, systems + 1)]
    return plan


@dataclass(frozen=True)
class HostileRecords:
    """Records a buggy or hostile API serves, per collection: ``deep`` records carry a member nested
    ``depth`` levels deep, ``future`` records are stamped FUTURE_STAMP. Both are listed as malformed."""

    deep: int = 0
    depth: int = 3000
    future: int = 0


NO_HOSTILE_RECORDS = HostileRecords()


@dataclass
class Generated:
    """One collection's initial records: ``items`` are (sort_us, key, json) sorted by (sort_us, key)."""

    items: list[tuple[int, Key, bytes]]
    malformed: dict[Key, str]  # key -> MISSING_KEY | BAD_UPDATED_AT | TOO_DEEP | FUTURE_UPDATED_AT
    key_width: int


def generate(spec: CollectionSpec, count: int, *, seed: int, precision: str,
             malformed_rate: float = 0.0, hostile: HostileRecords = NO_HOSTILE_RECORDS,
             layout: RecordLayout | None = None) -> Generated:
    """Generate ``count`` records of ``spec``; deterministic in (seed, spec, count, precision, layout).
    ``layout`` (flat, ISO 8601 by default) says where the key and updated_at go and what updated_at is."""
    layout = layout or RecordLayout(precision=precision)
    rng = random.Random(f"{seed}:{spec.name}:data")
    width = max(6, len(str(count)))
    burst_of, burst_us = _bursts(rng, count, precision)
    # Rows are built directly in (updated_at, key) order: permuting a million finished records
    # afterwards is slow, because every access to them is a cache miss.
    order = sorted(range(count), key=burst_of.__getitem__)  # stable: ties stay in key order
    keys = spec.keys(map((1).__add__, order), width)
    sorted_bursts = sorted(burst_of)
    stamps = [layout.stamp(us) for us in burst_us]
    columns: dict[str, list] = {}
    for name, column in spec.columns:
        columns[name] = column(rng, count, columns, keys)
    # A gc-free Struct per record is about twice as fast to build and encode as a dict.
    rows = layout.rows(spec.key_field, columns, keys, list(map(stamps.__getitem__, sorted_bursts)))
    encoded = list(map(_encode, rows))
    malformed = _malform(spec, keys, encoded, random.Random(f"{seed}:{spec.name}:malformed"), malformed_rate,
                         layout)
    if hostile != NO_HOSTILE_RECORDS:
        _make_hostile(spec, keys, encoded, random.Random(f"{seed}:{spec.name}:hostile"), hostile, malformed,
                      layout)
    sort_us = map(burst_us.__getitem__, sorted_bursts)
    items = list(zip(sort_us, keys, encoded, strict=True))
    return Generated(items=items, malformed=malformed, key_width=width)


def _bursts(rng: random.Random, count: int, precision: str) -> tuple[list[int], list[int]]:
    """Each record's burst index, and each burst's time: distinct, ascending, in the fixed past range."""
    unit_us = PRECISION_UNIT_US[precision]
    span_units = RANGE_SPAN_US // unit_us
    burst_count = min(span_units, max(1, count // RECORDS_PER_BURST))
    offsets = sorted(rng.sample(range(span_units), burst_count))
    burst_us = [RANGE_START_US + offset * unit_us for offset in offsets]
    return uniform_ints(rng, count, burst_count), burst_us


def _malform(spec: CollectionSpec, keys: list[Key], encoded: list[bytes], rng: random.Random,
             rate: float, layout: RecordLayout) -> dict[Key, str]:
    """Corrupt ``rate`` of the records in place: alternately drop the key, or garble ``updated_at``."""
    chosen = sorted(rng.sample(range(len(keys)), round(rate * len(keys))))
    malformed: dict[Key, str] = {}
    for position, index in enumerate(chosen):
        record = layout.read(encoded[index], spec.key_field)
        if position % 2 == 0:
            del record[spec.key_field]
            malformed[keys[index]] = MISSING_KEY
        else:
            record["updated_at"] = _BAD_DATES[(position // 2) % 2]
            malformed[keys[index]] = BAD_UPDATED_AT
        encoded[index] = layout.write(record, spec.key_field)
    return malformed


def _make_hostile(spec: CollectionSpec, keys: list[Key], encoded: list[bytes], rng: random.Random,
                  hostile: HostileRecords, malformed: dict[Key, str], layout: RecordLayout) -> None:
    """Turn records not malformed yet into ``hostile``'s deep and future ones, in place."""
    candidates = [index for index, key in enumerate(keys) if key not in malformed]
    chosen = rng.sample(candidates, min(len(candidates), hostile.deep + hostile.future))
    nested = b"[" * hostile.depth + b"]" * hostile.depth
    for position, index in enumerate(sorted(chosen)):
        if position < hostile.deep:
            encoded[index] = encoded[index][:-1] + b',"nested":' + nested + b"}"
            malformed[keys[index]] = TOO_DEEP
        else:
            record = layout.read(encoded[index], spec.key_field)
            record["updated_at"] = layout.stamp(FUTURE_US) if layout.epoch_unit_us else FUTURE_STAMP
            encoded[index] = layout.write(record, spec.key_field)
            malformed[keys[index]] = FUTURE_UPDATED_AT
