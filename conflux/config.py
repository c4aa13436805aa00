"""Configuration: one frozen, typed object loaded from TOML, overridden by the environment.

Loaded by the supervisor at start and on SIGHUP, and by the CLI commands. Every error names the
field it is about (``sources[1].page_size: ...``) so a broken file is fixed at a glance. Workers
receive the already-validated object across fork and never parse files themselves.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from conflux import plugins
from conflux.errors import ConfigError
from conflux.ipc.codec import (
    MAX_LOG_BATCH_BYTES,
    ROW_OVERHEAD_BYTES,
    batch_header_bytes,
    batch_room_bytes,
    merge_frame_overhead_bytes,
)
from conflux.redact import MASK, kafka_secret_key, redact_headers, redact_url

# The built-in pagination styles; any name registered in the conflux.paginators entry points is valid too.
PaginationStyle = str
SecretCheck = Literal["all", "log", "none"]
MIN_RING_BYTES = 1 << 16
MAX_TOPIC_CHARS = 249  # Kafka's limit; the embedded log keeps it too, so a config moves between them
# Floors for intervals where a tiny value makes the daemon hammer itself or an upstream (seconds).
MIN_POLL_INTERVAL_S = 0.1
MIN_FULL_SYNC_INTERVAL_S = 1.0
MIN_FLUSH_INTERVAL_S = 0.01
MIN_HEARTBEAT_INTERVAL_S = 0.1
SECRET_FIELD = re.compile(r"(token|secret|password|passwd|credential|api[_-]?key|authorization)$", re.IGNORECASE)
ENV_PREFIX = "CONFLUX_"


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base for config sections: immutable, keyword-only, unknown keys are errors."""


class LogConfig(_Section):
    backend: Literal["embedded", "kafka"] = "embedded"
    path: str = "var/conflux.db"
    partitions: int = 4
    # "normal" survives a crash of any Conflux process; on power loss the newest commits may be lost (pulled
    # records are fetched again, README "Durability"); "full" fsyncs every commit. Webhooks always fsync.
    synchronous: Literal["normal", "full"] = "normal"
    retention_s: float = 3600.0
    max_bytes: int = 0  # embedded: cap on the file; past it writes fail as on a full disk (0 = no cap)
    bootstrap_servers: str = ""
    group: str = "conflux"
    topic_prefix: str = ""
    replication_factor: int = 0  # 0 = min(3, number of brokers)

    def __post_init__(self) -> None:
        _require("\0" not in self.path, "path must not contain a NUL character")
        _require(self.partitions >= 1, "partitions must be >= 1")
        _require(self.retention_s >= 0, "retention_s must be >= 0")
        _require(self.replication_factor >= 0, "replication_factor must be >= 0")
        _require(self.max_bytes == 0 or self.max_bytes >= 1 << 20, "max_bytes must be 0 (no cap) or >= 1048576")
        if self.backend == "kafka":
            _require(bool(self.bootstrap_servers), "bootstrap_servers is required when backend = \"kafka\"")


class KafkaConfig(_Section):
    """librdkafka settings passed through as they are; keys ending in _env/_file name a secret's source."""

    producer: dict[str, str | int | float | bool] = {}
    consumer: dict[str, str | int | float | bool] = {}
    admin: dict[str, str | int | float | bool] = {}


class PaginationConfig(_Section):
    """Query parameter and response field names; the defaults are the demo upstream's."""

    records_path: str = "data"
    page_param: str = "page"
    size_param: str = "size"
    offset_param: str = "offset"
    limit_param: str = "limit"
    cursor_param: str = "cursor"
    next_cursor_field: str = "next_cursor"
    has_more_field: str = "has_more"
    total_field: str = "total"
    updated_since_param: str = "updated_since"
    after_key_param: str = "after_key"
    first_page: int = 1
    # next_url style: the dotted path of the next page's URL in the body ("links.next"); null or missing ends.
    next_url_path: str = ""
    # cursor style: read the next cursor from this response header instead of next_cursor_field.
    next_cursor_header: str = ""

    def __post_init__(self) -> None:
        _require(not self.records_path or not _path_problem(self.records_path),
                 f"records_path: {_path_problem(self.records_path)} (\"\" means the body itself is the list)")
        for name in ("next_cursor_field", "has_more_field", "total_field", "next_url_path"):
            value = getattr(self, name)
            _require(not value or not _path_problem(value), f"{name}: {_path_problem(value)}")
        _require(not self.next_cursor_header or HTTP_HEADER_NAME.fullmatch(self.next_cursor_header) is not None,
                 f"next_cursor_header: {self.next_cursor_header!r} is not an HTTP header name")
        for name, path in self.meta_paths().items():
            clash = _paths_clash(path, self.records_path) if self.records_path else ""
            _require(not clash, f"{name}: {path!r} {clash} records_path {self.records_path!r}")

    def meta_paths(self) -> dict[str, str]:
        """The page's paging fields that are read from the body, by our name: has_more, total, ..."""
        paths = {"has_more_field": self.has_more_field, "total_field": self.total_field,
                 "next_cursor_field": self.next_cursor_field, "next_url_path": self.next_url_path}
        return {name: path for name, path in paths.items() if path}


class AuthConfig(_Section):
    """``[sources.auth]``: ``type`` names an auth method registered in the ``conflux.auth`` entry-point group
    (the built-in bearer, header, basic and oauth2, or a plugin's), and the table's other keys are that
    method's ``Options``, validated by its Struct when the config is loaded (``_resolve_auth``)."""

    type: str
    options: Any = None


class FieldsConfig(_Section):
    """What of a record reaches the sink: ``select`` keeps only these top-level fields, ``drop`` removes
    these, ``rename`` maps old names to new ones (applied last). Key and updated are read before."""

    select: list[str] = []
    drop: list[str] = []
    rename: dict[str, str] = {}

    def __post_init__(self) -> None:
        both = sorted(set(self.select) & set(self.drop))
        _require(not both, f"{both[0]!r} is in both select and drop" if both else "")
        targets = list(self.rename.values())
        twice = sorted({name for name in targets if targets.count(name) > 1})
        _require(not twice, f"rename: two fields are renamed to {twice[0]!r}" if twice else "")
        for old, new in self.rename.items():
            _require(bool(old) and bool(new), "rename: names must not be empty")
            _require(old not in self.drop, f"rename: {old!r} is dropped, so it is never renamed")
            _require(not self.select or old in self.select, f"rename: {old!r} is not selected, so it is never renamed")
            _require(not (self.select and new in self.select and new not in self.rename),
                     f"rename: {old!r} -> {new!r} would overwrite the selected field {new!r}")


FilterValue = str | int | float | bool


class FilterConfig(_Section):
    """``{ field = "status", in = [...] }`` or ``{ field = "status", not_in = [...] }``."""

    field: str
    in_: list[FilterValue] | None = msgspec.field(default=None, name="in")
    not_in: list[FilterValue] | None = None

    def __post_init__(self) -> None:
        _require(not _path_problem(self.field), f"field: {_path_problem(self.field)}")
        _require((self.in_ is None) != (self.not_in is None), "give exactly one of in and not_in")


class WebhookDeleteWhen(_Section):
    """``{ field = "type", in = ["customer.deleted"] }``: a webhook event whose ``field`` (a dotted path in
    the envelope) holds one of these values deletes the record(s) it carries."""

    field: str
    in_: list[FilterValue] = msgspec.field(name="in")

    def __post_init__(self) -> None:
        _require(not _path_problem(self.field), f"field: {_path_problem(self.field)}")
        _require(bool(self.in_), "in: give at least one value")


WebhookSignature = Literal["conflux", "github", "stripe", "hmac"]
HTTP_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # what an HTTP header name may hold (RFC 9110)


class SourceConfig(_Section):
    name: str
    url: str
    key: str | list[str] = "id"          # a dotted path into the record, or a list of them (a composite key)
    updated: str = "updated_at"
    pagination: PaginationStyle = "page"
    page_size: int = 500
    poll_interval_s: float = 10.0
    full_sync_interval_s: float = 3600.0
    topic: str = ""
    max_concurrency: int = 4
    rate_limit_rps: float = 0.0  # 0 = unlimited
    timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    headers: dict[str, str] = {}
    verify_tls: bool = True
    ca_file: str = ""
    webhook_secret: str = ""
    webhook_secret_env: str = ""
    webhook_max_bytes: int = 1 << 20
    pagination_options: PaginationConfig = msgspec.field(default_factory=PaginationConfig, name="pagination_fields")
    # API shapes ("Connecting your API" in the README): where the records are, how a page is asked for.
    records_path: str | None = None           # the same as pagination_fields.records_path, as a source key
    # A paginator plugin's own keys ([sources.pagination_options]), checked by its Options Struct at load.
    paginator_options: Any = msgspec.field(default=None, name="pagination_options")
    method: Literal["GET", "POST"] = "GET"
    body: dict[str, Any] = {}                 # POST: the request body; string values may hold placeholders
    body_type: Literal["json", "form"] = "json"
    updated_since_format: Literal["native", "iso8601", "epoch_s", "epoch_ms"] = "native"
    parent: str = ""                          # a child source: paged once per live record of this source
    parent_key_field: str = "parent_key"      # the field a child record gets with its parent's key ("": none)
    auth: AuthConfig | None = None
    # Origins (scheme://host:port) besides the source's own that next links and redirects may lead to;
    # they never get the source's credentials or static headers.
    allowed_origins: list[str] = []
    max_page_bytes: int = 64 << 20            # per response, after decompression
    max_pages_per_sync: int = 100_000
    max_clock_skew_s: float = 300.0           # how far in the future an updated_at may be
    updated_format: Literal["iso8601", "epoch_s", "epoch_ms", "epoch_us"] = "iso8601"
    deleted: str = ""                         # a field that marks a deleted record (true, or a timestamp)
    reconcile: bool = False                   # after a complete full sync, delete the keys it did not list
    reconcile_max_fraction: float = 0.5       # ... unless that would delete more than this share of them
    lookup_url: str = ""                      # GET this ("{key}" replaced) for a second look: 404 = deleted
    fields: FieldsConfig | None = None
    filter: FilterConfig | None = None
    sinks: list[str] = []                     # where this source's records go; [] = every sink
    # Vendor webhooks: how POST /webhook/{source} is signed, where its records are, which events delete.
    webhook_signature: WebhookSignature = "conflux"
    webhook_signature_header: str = ""        # "hmac": the header that carries the signature
    webhook_signature_prefix: str = ""        # "hmac": text before the signature, such as "sha256="
    webhook_signature_encoding: Literal["hex", "base64"] = "hex"   # "hmac": how the digest is written
    webhook_records_path: str = ""            # a dotted path to the record(s) in the body; "" = the body
    webhook_delete_when: WebhookDeleteWhen | None = None

    @property
    def key_paths(self) -> list[str]:
        return [self.key] if isinstance(self.key, str) else list(self.key)

    @property
    def shaped(self) -> bool:
        """Whether records are rewritten on the way (select, drop, rename)."""
        return self.fields is not None and bool(self.fields.select or self.fields.drop or self.fields.rename)

    def __post_init__(self) -> None:
        self._check_identity()
        self._check_shape()
        _require(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None,
                 f"name {self.name!r} may only hold letters, digits, '_', '.' and '-'")
        _require(self.url.startswith(("http://", "https://")), "url must start with http:// or https://")
        _require(1 <= self.page_size <= 100_000, "page_size must be between 1 and 100000")
        _require(self.poll_interval_s >= MIN_POLL_INTERVAL_S,
                 f"poll_interval_s must be >= {MIN_POLL_INTERVAL_S} s (got {self.poll_interval_s})")
        _require(self.full_sync_interval_s >= MIN_FULL_SYNC_INTERVAL_S,
                 f"full_sync_interval_s must be >= {MIN_FULL_SYNC_INTERVAL_S} s (got {self.full_sync_interval_s})")
        _require(self.max_concurrency >= 1, "max_concurrency must be >= 1")
        _require(self.rate_limit_rps >= 0, "rate_limit_rps must be >= 0")
        _require(self.timeout_s > 0 and self.connect_timeout_s > 0, "timeout_s and connect_timeout_s must be > 0")
        _require(self.webhook_max_bytes >= 1, "webhook_max_bytes must be >= 1")
        for index, origin in enumerate(self.allowed_origins):
            problem = _origin_problem(origin)
            _require(not problem, f"allowed_origins[{index}]: {origin!r} {problem}")
        _require(self.max_page_bytes >= 1024, "max_page_bytes must be >= 1024")
        _require(self.max_pages_per_sync >= 1, "max_pages_per_sync must be >= 1")
        _require(0 <= self.max_clock_skew_s < math.inf, "max_clock_skew_s must be a finite number >= 0")
        _require(0 < self.reconcile_max_fraction <= 1, "reconcile_max_fraction must be > 0 and <= 1")
        _require(not self.lookup_url or "{key}" in self.lookup_url, "lookup_url must hold {key}")
        _require(not self.lookup_url or self.lookup_url.startswith(("http://", "https://")),
                 "lookup_url must start with http:// or https://")
        self._check_webhook()

    def _check_webhook(self) -> None:
        """The vendor webhook keys: the generic "hmac" scheme needs its header; the others take no options."""
        if self.webhook_signature == "hmac":
            _require(bool(self.webhook_signature_header),
                     'webhook_signature_header is required with webhook_signature = "hmac"')
            _require(HTTP_TOKEN.fullmatch(self.webhook_signature_header) is not None,
                     f"webhook_signature_header {self.webhook_signature_header!r} is not an HTTP header name")
            _require(len(self.webhook_signature_prefix) <= 64 and self.webhook_signature_prefix.isascii()
                     and self.webhook_signature_prefix.isprintable(),
                     "webhook_signature_prefix must be at most 64 printable ASCII characters")
        else:
            given = [name for name in ("webhook_signature_header", "webhook_signature_prefix")
                     if getattr(self, name)] + (["webhook_signature_encoding"]
                                                if self.webhook_signature_encoding != "hex" else [])
            _require(not given, f"{', '.join(given)}: only for webhook_signature = \"hmac\" "
                                f"(this source's is {self.webhook_signature!r})")
        _require(not self.webhook_records_path or not _path_problem(self.webhook_records_path),
                 f"webhook_records_path: {_path_problem(self.webhook_records_path)}")

    def _check_identity(self) -> None:
        """The paths that find a record's key, updated instant and delete marker."""
        paths = self.key_paths
        _require(1 <= len(paths) <= 8, "key must name 1 to 8 fields")
        _require(len(set(paths)) == len(paths), "key names a field twice")
        for name, path in [*(("key", path) for path in paths), ("updated", self.updated),
                           *([("deleted", self.deleted)] if self.deleted else [])]:
            _require(not _path_problem(path), f"{name}: {_path_problem(path)}")
        _require(not (self.pagination == "watermark" and len(paths) > 1),
                 "key: the watermark (keyset) style pages by one key field (after_key), not a composite key")
        named = [*(("key", path) for path in paths), ("updated", self.updated),
                 *([("deleted", self.deleted)] if self.deleted else []),
                 *([("filter.field", self.filter.field)] if self.filter is not None else [])]
        clash = _path_clash(named)
        _require(not clash, clash)

    @property
    def effective_records_path(self) -> str:
        """Where the records are in a page: ``records_path``, else ``[sources.pagination] records_path``."""
        return self.pagination_options.records_path if self.records_path is None else self.records_path

    def parent_paths(self) -> list[str]:
        """The fields of the parent record this child source's url and body use: {parent.PATH}."""
        texts = [self.url, *_strings_in(self.body)]
        return sorted({match for text in texts for match in PARENT_PLACEHOLDER.findall(text)})

    def _check_shape(self) -> None:
        """The keys of the API shapes: records path, POST body, parent placeholders."""
        if self.records_path is not None:
            _require(not self.records_path or not _path_problem(self.records_path),
                     f"records_path: {_path_problem(self.records_path)} (\"\" means the body itself is the list)")
            given = self.pagination_options.records_path
            _require(given in ("data", self.records_path),
                     f"records_path: {self.records_path!r}, but pagination.records_path says {given!r}; give one")
        records_path = self.effective_records_path
        for name, path in self.pagination_options.meta_paths().items():
            clash = _paths_clash(path, records_path) if records_path else ""
            _require(not clash, f"pagination.{name}: {path!r} {clash} records_path {records_path!r}")
        _require(not self.body or self.method == "POST", "body: only with method = \"POST\"")
        if self.body_type == "form":
            bad = [name for name, value in self.body.items() if not _form_value(value)]
            _require(not bad, f"body.{bad[0] if bad else ''}: a form body holds text, numbers, booleans or "
                              "lists of them, not tables")
        for path in self.parent_paths():
            _require(not _path_problem(path), f"url: {{parent.{path}}}: {_path_problem(path)}")
        origin_end = self.url.find("/", self.url.find("://") + 3)
        _require("{" not in (self.url if origin_end < 0 else self.url[:origin_end]),
                 "url: placeholders may stand in the path and query, not in the scheme, host or port")
        if self.parent:
            _require(self.parent != self.name, "parent: a source cannot be its own parent")
            _require(bool(self.parent_paths()), f"url: a child source's url (or body) must use {{parent.FIELD}}, "
                                                f"a field of each record of {self.parent!r}")
            _require(not self.parent_key_field or (not _path_problem(self.parent_key_field)
                     and "." not in self.parent_key_field), "parent_key_field must be a top-level field name")
        else:
            _require(not self.parent_paths(), "url: {parent.FIELD} needs parent = \"SOURCE\"")


class _SinkSection(_Section):
    """What every sink type takes: how large and how often its deliveries are, how many at once."""

    batch_size: int = 1000
    flush_interval_s: float = 1.0
    max_in_flight: int = 2
    # Per merger: records held for this sink while it is slow or down.
    max_pending_records: int = 50_000

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size must be >= 1")
        _require(self.flush_interval_s >= MIN_FLUSH_INTERVAL_S,
                 f"flush_interval_s must be >= {MIN_FLUSH_INTERVAL_S} s (got {self.flush_interval_s})")
        _require(self.max_in_flight >= 1, "max_in_flight must be >= 1")
        _require(self.max_pending_records >= self.batch_size, "max_pending_records must be >= batch_size")


# The keys every sink type takes (batch_size, flush_interval_s, max_in_flight, max_pending_records): a sink
# plugin's Options Struct subclasses it.
SinkOptions = _SinkSection


class SinkConfig(_SinkSection):
    """The HTTP sink: ``[sink]`` (named "default"), or a ``[[sinks]]`` entry with ``type = "http"``."""

    url: str = "http://127.0.0.1:8082/ingest"
    timeout_s: float = 30.0
    token: str = ""
    token_env: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.url.startswith(("http://", "https://")), "url must start with http:// or https://")
        _require(self.timeout_s > 0, "timeout_s must be > 0")


class PostgresColumn(_Section):
    """A typed column of a PostgreSQL sink's table: a field of the record (a dotted path) cast to a type."""

    field: str
    type: str = "text"
    index: bool = False               # create an index on the column (with create_tables)

    def __post_init__(self) -> None:
        _require(not _path_problem(self.field), f"field: {_path_problem(self.field)}")
        _require(re.fullmatch(r"[a-z][a-z0-9 ]*(\(\d+(,\s*\d+)?\))?(\[\])?", self.type) is not None,
                 f"type {self.type!r} is not a PostgreSQL type name (such as text, bigint, numeric(12,2), "
                 "timestamptz, boolean, jsonb)")


class PostgresSinkConfig(_SinkSection):
    """``[[sinks]] type = "postgres"``: a table per source, upserted with COPY, with a ledger of batches."""

    dsn: str = ""                     # without a password: give that through dsn_env or dsn_file
    dsn_env: str = ""
    dsn_file: str = ""
    schema: str = "public"
    table: str = "{source}"           # {source} is replaced by the source's name
    create_tables: bool = True
    delete_mode: Literal["hard", "soft"] = "hard"
    batch_size: int = 5000
    timeout_s: float = 30.0
    # source name -> column name -> {field, type}: typed columns beside `data`, for indexes and queries.
    columns: dict[str, dict[str, PostgresColumn]] = {}
    # Ledger rows older than this are deleted; a chunk replayed later is still applied once in effect,
    # because a version only replaces an older (or the same) version of its key.
    ledger_retention_s: float = 7 * 86400.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.ledger_retention_s >= 3600, "ledger_retention_s must be >= 3600 s")
        _require(sum(map(bool, (self.dsn, self.dsn_env, self.dsn_file))) == 1,
                 "give exactly one of dsn, dsn_env and dsn_file")
        _require(not dsn_password(self.dsn),
                 "dsn holds a password; give the dsn through dsn_env or dsn_file instead")
        _require(_identifier(self.schema), f"schema {self.schema!r} must be a plain identifier "
                                           "([A-Za-z_][A-Za-z0-9_]*)")
        _require(_identifier(self.table.replace("{source}", "s")),
                 f"table {self.table!r} must be a plain identifier, with {{source}} where the source's name goes")
        _require(self.timeout_s > 0, "timeout_s must be > 0")
        for source, columns in self.columns.items():
            for name in columns:
                _require(_identifier(name) and name not in POSTGRES_RESERVED_COLUMNS,
                         f"columns.{source}.{name}: a column name must be a plain identifier other than "
                         f"{', '.join(sorted(POSTGRES_RESERVED_COLUMNS))}")


POSTGRES_RESERVED_COLUMNS = frozenset({"key", "updated_at", "seq", "hash", "data", "synced_at", "deleted_at"})


class KafkaSinkConfig(_SinkSection):
    """``[[sinks]] type = "kafka"``: one Kafka record per Conflux record on a compacted changelog topic."""

    bootstrap_servers: str = ""       # default: [log] bootstrap_servers; required with the embedded log
    topic: str = "{prefix}{source}.records"   # {prefix} is [log] topic_prefix, {source} the source's name
    partitions: int = 0               # for topics it creates; 0: [log] partitions
    replication_factor: int = 0       # 0: min(3, number of brokers)
    batch_size: int = 5000
    # One delivery at a time: a second one in flight (or a retried one) could put an older version of a
    # key after a newer one, and on a compacted topic the last record of a key is what remains.
    max_in_flight: int = 1
    timeout_s: float = 30.0
    # One Kafka transaction per chunk: read_committed consumers see all of a chunk or none of it.
    transactional: bool = True
    # librdkafka settings for this sink's clients (security.*, sasl.*, ...); *_env / *_file name secrets.
    producer: dict[str, str | int | float | bool] = {}

    def __post_init__(self) -> None:
        super().__post_init__()
        _require("{source}" in self.topic, "topic must hold {source}: every source gets its own changelog topic")
        _require(self.max_in_flight == 1, "max_in_flight must be 1 for a Kafka sink: with two deliveries in flight "
                                          "an older version of a key could land after a newer one")
        _require(set(re.findall(r"{[^}]*}", self.topic)) <= {"{source}", "{prefix}"},
                 f"topic {self.topic!r} may only hold the placeholders {{prefix}} and {{source}}")
        _require(self.partitions >= 0, "partitions must be >= 0")
        _require(self.replication_factor >= 0, "replication_factor must be >= 0")
        _require(self.timeout_s > 0, "timeout_s must be > 0")

    def topic_of(self, source: str, prefix: str) -> str:
        """The changelog topic of a source: ``topic`` with {prefix} ([log] topic_prefix) and {source} replaced."""
        return self.topic.replace("{prefix}", prefix).replace("{source}", source)


class SinkSpec(_Section):
    """One configured sink: its name, its type, and its type's options (validated by that type's Struct)."""

    name: str
    type: str = "http"
    options: Any = None

    def __post_init__(self) -> None:
        _require(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None,
                 f"name {self.name!r} may only hold letters, digits, '_', '.' and '-'")


# The config keys of the built-in sink types; a plugin's come from its class (`Options`), found through
# the conflux.sinks entry points.
BUILTIN_SINK_OPTIONS: dict[str, type] = {"http": SinkConfig, "postgres": PostgresSinkConfig,
                                         "kafka": KafkaSinkConfig}
SINK_ENTRY_POINTS = plugins.GROUPS["sinks"]
DEFAULT_SINK = "default"


class RetryConfig(_Section):
    """Exponential backoff with full jitter, and the circuit breaker, for upstream and sink calls."""

    base_s: float = 0.2
    max_s: float = 30.0
    max_attempts: int = 8  # per upstream request; the sink retries until it answers
    breaker_failures: int = 5
    breaker_cooldown_s: float = 15.0

    def __post_init__(self) -> None:
        _require(0 < self.base_s <= self.max_s, "base_s must be > 0 and <= max_s")
        _require(self.max_attempts >= 1, "max_attempts must be >= 1")
        _require(self.breaker_failures >= 1, "breaker_failures must be >= 1")
        _require(self.breaker_cooldown_s > 0, "breaker_cooldown_s must be > 0")


def _default_pool_size() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


class WorkersConfig(_Section):
    fetchers: int = 1
    consumers: int = msgspec.field(default_factory=_default_pool_size)
    mergers: int = msgspec.field(default_factory=_default_pool_size)
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 30.0
    restart_backoff_max_s: float = 30.0
    # A slot that crashes this often within the window goes FATAL instead of respawning.
    max_restarts: int = 5
    restart_window_s: float = 60.0
    ring_bytes: int = 8 << 20
    # A log message unacknowledged this long is reported (status, metrics, log); it stays in flight.
    ack_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _require(self.ack_timeout_s > 0, "ack_timeout_s must be > 0")
        for role in ("fetchers", "consumers", "mergers"):
            _require(1 <= getattr(self, role) <= 64, f"{role} must be between 1 and 64")
        _require(self.heartbeat_interval_s >= MIN_HEARTBEAT_INTERVAL_S,
                 f"heartbeat_interval_s must be >= {MIN_HEARTBEAT_INTERVAL_S} s (got {self.heartbeat_interval_s})")
        _require(self.heartbeat_timeout_s > 2 * self.heartbeat_interval_s,
                 "heartbeat_timeout_s must be more than twice heartbeat_interval_s")
        _require(self.ring_bytes >= MIN_RING_BYTES, f"ring_bytes must be >= {MIN_RING_BYTES}")
        # A ring is a whole number of 8-byte words; so is each ack ring, a sixteenth of it past 1 MiB.
        _require(self.ring_bytes % 8 == 0 and (self.ring_bytes // 16 <= MIN_RING_BYTES or self.ring_bytes % 128 == 0),
                 f"ring_bytes must be a multiple of 8, and of 128 above {16 * MIN_RING_BYTES} (got {self.ring_bytes})")


class ControlConfig(_Section):
    listen: str = "127.0.0.1:9108"
    token: str = ""
    token_env: str = ""
    # A listen address other hosts can reach needs a token, unless the operator vouches for the network.
    allow_unauthenticated: bool = False
    metrics_require_token: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # How far X-Conflux-Timestamp (or Stripe-Signature's t) may be from the control process's clock, either way.
    webhook_tolerance_s: float = 300.0
    # Request line and headers must arrive within this (after connecting, or after the previous answer).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 256
    # Webhook bodies being read at once, all connections together: caps the memory stalled uploads take.
    webhook_buffer_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        _require(bool(sep) and bool(host) and port.isascii() and port.isdigit() and int(port) < 65536,
                 f"listen must be HOST:PORT, got {self.listen!r}")
        _require(self.allow_unauthenticated or bool(self.token or self.token_env) or _is_loopback(host),
                 f"listen {self.listen!r} is reachable from other hosts and no token is set: set token or "
                 "token_env, or allow_unauthenticated = true if every host on that network may sync and read status")
        _require(bool(self.tls_cert_file) == bool(self.tls_key_file), "tls_cert_file and tls_key_file go together")
        _require(1 <= self.webhook_tolerance_s <= 86_400, "webhook_tolerance_s must be between 1 and 86400")
        _require(self.header_timeout_s > 0 and self.body_timeout_s > 0,
                 "header_timeout_s and body_timeout_s must be > 0")
        _require(not self.metrics_require_token or bool(self.token or self.token_env),
                 "metrics_require_token needs token or token_env")
        _require(1 <= self.max_connections <= 65_536, "max_connections must be between 1 and 65536")
        _require(self.webhook_buffer_bytes >= 1 << 16, "webhook_buffer_bytes must be >= 65536")


def _is_loopback(host: str) -> bool:
    """Only an address literal or "localhost" is known to be loopback; any other name may resolve anywhere."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DaemonConfig(_Section):
    state_dir: str = "var"
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _require("\0" not in self.state_dir, "state_dir must not contain a NUL character")
        _require(self.shutdown_timeout_s > 0, "shutdown_timeout_s must be > 0")


class Config(_Section):
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    sources: list[SourceConfig] = []
    sink: SinkConfig = msgspec.field(default_factory=SinkConfig)
    # Every sink, [sink] first as "default" when it is given (or when no [[sinks]] is): filled by load_config.
    sinks: list[SinkSpec] = []
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)
    control: ControlConfig = msgspec.field(default_factory=ControlConfig)
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)

    def __post_init__(self) -> None:
        names = [source.name for source in self.sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        _require(not duplicates, f"sources: duplicate source names {duplicates}")
        _check_topics(self)
        _check_parents(self)
        _check_webhook_sizes(self)
        _check_webhook_buffer(self)

    def source(self, name: str) -> SourceConfig:
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(name)

    def root_of(self, name: str) -> str:
        """The source at the top of ``name``'s parent chain (itself when it has no parent): a family of
        sources is synced by one fetcher, which holds the parents' index (workers.parents)."""
        source = self.source(name)
        while source.parent:
            source = self.source(source.parent)
        return source.name

    def children_of(self, name: str) -> list[SourceConfig]:
        return [source for source in self.sources if source.parent == name]

    def topic_of(self, source: SourceConfig) -> str:
        return source.topic or f"{self.log.topic_prefix}{source.name}"

    def sink_names_of(self, source: SourceConfig) -> list[str]:
        """The sinks a source delivers to: its `sinks`, or every sink."""
        return list(source.sinks) or [spec.name for spec in self.sinks]

    def sink_spec(self, name: str) -> SinkSpec:
        for spec in self.sinks:
            if spec.name == name:
                return spec
        raise KeyError(name)


def _check_parents(config: Config) -> None:
    """A child's parent is another source of this config, and following parents never comes back round."""
    names = {source.name: source for source in config.sources}
    for index, source in enumerate(config.sources):
        _require(not source.parent or source.parent in names,
                 f"sources[{index}] ({source.name}).parent: no source named {source.parent!r}")
    for index, source in enumerate(config.sources):
        chain = [source.name]
        while names[chain[-1]].parent:
            chain.append(names[chain[-1]].parent)
            _require(chain[-1] not in chain[:-1], f"sources[{index}] ({source.name}).parent: the parents go round "
                                                  f"in a circle ({' -> '.join(chain)})")


def _check_webhook_buffer(config: Config) -> None:
    """Every source's largest webhook must fit the control process's buffer, or it could never be read."""
    for index, source in enumerate(config.sources):
        _require(source.webhook_max_bytes <= config.control.webhook_buffer_bytes,
                 f"control.webhook_buffer_bytes ({config.control.webhook_buffer_bytes}) must be >= "
                 f"sources[{index}] ({source.name}).webhook_max_bytes ({source.webhook_max_bytes})")


def _identifier(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None and len(name) <= 63


def dsn_password(dsn: str) -> bool:
    """Whether a libpq connection string (URL or key=value form) holds a password."""
    if "://" in dsn:
        userinfo = dsn.split("://", 1)[1].split("@", 1)
        return (len(userinfo) == 2 and ":" in userinfo[0]) or "password=" in dsn.split("?", 1)[-1]
    return re.search(r"(^|\s)password\s*=", dsn) is not None


def _path_problem(path: str) -> str:
    """Why a dotted path into a record is unusable, or ""."""
    if not path or any(not part for part in path.split(".")):
        return f"{path!r} is not a dotted path of field names (an empty name)"
    return ""


HTTP_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # RFC 9110 token
PARENT_PLACEHOLDER = re.compile(r"\{parent\.([^{}]*)\}")


def _paths_clash(path: str, other: str) -> str:
    """Why two dotted paths cannot both be read from one body ("" if they can)."""
    mine, theirs = path.split("."), other.split(".")
    if mine == theirs:
        return "is the same path as"
    shorter = min(len(mine), len(theirs))
    return "runs through the value of" if mine[:shorter] == theirs[:shorter] else ""


def _strings_in(value: Any) -> list[str]:
    """Every string in a TOML value (tables and lists walked)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings_in(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings_in(item)]
    return []


def _form_value(value: Any) -> bool:
    scalar = (str, int, float, bool)
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def _path_clash(named: list[tuple[str, str]]) -> str:
    """Why two of a source's paths cannot both be read (one runs inside the other's value), or "". The
    same path twice is fine: one field may be, say, the key and the filter's field."""
    for name, path in named:
        for other_name, other in named:
            if other.startswith(path + "."):
                return (f"{other_name}: {other!r} runs inside {name} {path!r}: one field cannot be both a "
                        "value and an object holding others")
    return ""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _origin_problem(text: str) -> str:
    """'' for an origin written as scheme://host[:port]; otherwise what is wrong with it."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        return f"is not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be http(s)://host[:port]"
    if "\\" in text or "@" in parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be only scheme://host[:port], without user, path or query"
    return "" if port is None or port > 0 else "has port 0"


def _check_topics(config: Config) -> None:
    """One source per topic: a consumer knows a message's source by its topic, and a second writer would
    interleave another source's records (or dead letters, or checkpoints) with its own."""
    prefix = config.log.topic_prefix
    # The log's own topics: a source's DLQ is "<topic>.dlq" (log/base.py dlq_topic), plus the Kafka backend's two.
    reserved = {f"{prefix}conflux.checkpoints", f"{prefix}conflux.sources"}
    owners: dict[str, int] = {}
    for index, source in enumerate(config.sources):
        topic, where = config.topic_of(source), f"sources[{index}].topic"
        _require(len(topic) <= MAX_TOPIC_CHARS, f"{where}: topic {topic!r} is longer than {MAX_TOPIC_CHARS} characters")
        _require(topic not in reserved and not topic.endswith(".dlq"),
                 f"{where}: topic {topic!r} is reserved for the log's own use (checkpoints, sources, *.dlq)")
        if config.log.backend == "kafka":
            _require(re.fullmatch(r"[A-Za-z0-9._-]+", topic) is not None,
                     f"{where}: Kafka topic {topic!r} may only hold letters, digits, '.', '_' and '-'")
        other = owners.setdefault(topic, index)
        _require(other == index, f"{where}: topic {topic!r} is also the topic of sources[{other}] "
                                 f"({config.sources[other].name}); each source needs a topic of its own")


def _check_webhook_sizes(config: Config) -> None:
    """A webhook body may be one record of webhook_max_bytes, and the log batch that carries it to a merger
    must fit one ring frame (half of ring_bytes); larger bodies of many records are split, one record is not."""
    ring_bytes = config.workers.ring_bytes
    for index, source in enumerate(config.sources):
        if not (source.webhook_secret or source.webhook_secret_env):
            continue  # webhooks are refused without a secret, so no such body ever arrives
        topic = config.topic_of(source)
        overhead = batch_header_bytes(source.name, "webhook") + ROW_OVERHEAD_BYTES
        need, room = 3 * source.webhook_max_bytes + overhead, batch_room_bytes(ring_bytes, topic)
        if need <= min(room, MAX_LOG_BATCH_BYTES):
            continue
        if need > MAX_LOG_BATCH_BYTES:
            raise ValueError(
                f"sources[{index}].webhook_max_bytes: {source.webhook_max_bytes} is too large: a webhook record may "
                f"be that large, and its log batch takes up to 3 x webhook_max_bytes + {overhead} = {need} bytes, "
                f"more than the largest log message ({MAX_LOG_BATCH_BYTES}); lower webhook_max_bytes to at most "
                f"{(MAX_LOG_BATCH_BYTES - overhead) // 3}")
        ring_needed = -(-2 * (need + merge_frame_overhead_bytes(topic) + 8) // 1024) * 1024
        raise ValueError(
            f"sources[{index}].webhook_max_bytes: {source.webhook_max_bytes} does not fit a ring frame: a webhook "
            f"record may be that large, and its log batch takes up to 3 x webhook_max_bytes + {overhead} = {need} "
            f"bytes, more than the {room} a frame of [workers] ring_bytes = {ring_bytes} carries (half the ring, "
            f"less framing); lower webhook_max_bytes to {(room - overhead) // 3} or raise ring_bytes to {ring_needed}")


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None, *, environ: dict[str, str] | None = None,
                secrets: SecretCheck = "all") -> Config:
    """Read ``path`` (TOML; None = defaults), apply CONFLUX_* overrides, validate, resolve paths.

    ``secrets`` says which secret sources must exist now: "all" (run, reload, config check), "log" (only
    those the log's clients read: commands that open the log but call no upstream or sink, such as
    `conflux dlq`), or "none" (commands that read their one secret themselves, such as `conflux status`)."""
    environ = dict(os.environ) if environ is None else environ
    raw = _read_toml(Path(path)) if path is not None else {}
    raw = _rename_pagination_tables(raw)
    raw = _flatten_kafka_tables(raw)
    _apply_env_overrides(raw, environ)
    sink_given = "sink" in raw
    raw = _sink_entries(raw)
    raw = _auth_tables(raw)
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_mention_env_source(_describe_validation_error(str(exc)), environ)) from None
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    config = _resolve_sinks(config, sink_given=sink_given)
    config = _resolve_auth(config)
    config = _resolve_paginators(config)
    config = _resolve_paths(config, base_dir)
    if secrets == "all":
        _check_secret_sources(config, environ)
    elif secrets == "log" and config.log.backend == "kafka":
        _check_kafka_secrets(config.kafka, environ)
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 at byte {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _rename_pagination_tables(raw: dict[str, Any]) -> dict[str, Any]:
    """`[sources.pagination]` (a table) shares its name with the `pagination` style (a string)."""
    for source in raw.get("sources", []) if isinstance(raw.get("sources"), list) else []:
        if isinstance(source, dict) and isinstance(source.get("pagination"), dict):
            table = source.pop("pagination")
            if "style" in table:
                source["pagination"] = table.pop("style")
            source["pagination_fields"] = table
    return raw


def _sink_entries(raw: dict[str, Any]) -> dict[str, Any]:
    """`[[sinks]]` tables are flat (name, type, then the type's own keys); each becomes a SinkSpec with the
    type's keys under `options`, validated by the type once it is known (``_resolve_sinks``)."""
    entries = raw.get("sinks")
    if isinstance(entries, list):
        raw["sinks"] = [_sink_entry(entry) if isinstance(entry, dict) else entry for entry in entries]
    return raw


def _sink_entry(entry: dict[str, Any]) -> dict[str, Any]:
    options = {key: value for key, value in entry.items() if key not in ("name", "type")}
    if isinstance(options.get("producer"), dict):   # librdkafka's dotted names, as in [kafka.*]
        options["producer"] = _dotted(options["producer"])
    return {**{key: entry[key] for key in ("name", "type") if key in entry}, "options": options}


def _auth_tables(raw: dict[str, Any]) -> dict[str, Any]:
    """`[sources.auth]` is flat (type, then the method's own keys); the method's keys go under `options`,
    validated by the method's Struct once the type is known (``_resolve_auth``)."""
    for source in raw.get("sources", []) if isinstance(raw.get("sources"), list) else []:
        table = source.get("auth") if isinstance(source, dict) else None
        if isinstance(table, dict):
            source["auth"] = {**({"type": table["type"]} if "type" in table else {}),
                              "options": {key: value for key, value in table.items() if key != "type"}}
    return raw


def _resolve_auth(config: Config) -> Config:
    """Every source's auth options, typed by its method's ``Options`` (a ``conflux.auth`` plugin; the
    built-in methods are registered there too)."""
    sources = []
    for index, source in enumerate(config.sources):
        if source.auth is not None:
            method = plugins.load("auth", source.auth.type, f"sources[{index}].auth.type")
            options = plugins.options(method, source.auth.options or {}, f"sources[{index}].auth")
            source = msgspec.structs.replace(source, auth=msgspec.structs.replace(source.auth, options=options))
        sources.append(source)
    return msgspec.structs.replace(config, sources=sources)


def _resolve_sinks(config: Config, *, sink_given: bool) -> Config:
    """Every sink with its typed options: [sink] as "default" (when given, or when there is no
    [[sinks]]), then the [[sinks]] entries; and every source's routes checked against them."""
    specs = [SinkSpec(name=DEFAULT_SINK, type="http", options=config.sink)] if sink_given or not config.sinks else []
    for index, spec in enumerate(config.sinks):
        options_type = sink_options_type(spec.type, f"sinks[{index}].type")
        try:
            options = msgspec.convert(spec.options or {}, options_type, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(_within(f"sinks[{index}]", _describe_validation_error(str(exc)))) from None
        specs.append(msgspec.structs.replace(spec, options=options))
    names = [spec.name for spec in specs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"sinks: the name {twice[0]!r} is used twice (\"{DEFAULT_SINK}\" is [sink]'s)")
    for index, source in enumerate(config.sources):
        unknown = [name for name in source.sinks if name not in names]
        if unknown:
            raise ConfigError(f"sources[{index}] ({source.name}).sinks: no sink named {unknown[0]!r} "
                              f"(the sinks are {', '.join(names)})")
    for spec in specs:
        if spec.type == "kafka" and not (spec.options.bootstrap_servers or config.log.bootstrap_servers):
            raise ConfigError(f"{sink_where(specs, spec)}.bootstrap_servers: required with the embedded log")
        if spec.type == "kafka":
            _check_changelog_topics(config, spec, sink_where(specs, spec))
    _check_postgres_tables(config, specs)
    return msgspec.structs.replace(config, sinks=specs)


def _check_changelog_topics(config: Config, spec: SinkSpec, where: str) -> None:
    """A Kafka sink's topics must be valid Kafka names and, on the log's own cluster, not the log's topics:
    the consumers would read changelog records as batches."""
    options = spec.options
    same_cluster = config.log.backend == "kafka" and options.bootstrap_servers in ("", config.log.bootstrap_servers)
    prefix = config.log.topic_prefix
    log_topics = {f"{prefix}conflux.checkpoints", f"{prefix}conflux.sources"}
    for source in config.sources:
        log_topics.update((config.topic_of(source), config.topic_of(source) + ".dlq"))
    for source in config.sources:
        if spec.name not in config.sink_names_of(source):
            continue
        topic = options.topic_of(source.name, prefix)
        if len(topic) > MAX_TOPIC_CHARS or re.fullmatch(r"[A-Za-z0-9._-]+", topic) is None:
            raise ConfigError(f"{where}.topic: {topic!r} (for source {source.name}) is not a Kafka topic name: "
                              f"at most {MAX_TOPIC_CHARS} letters, digits, '.', '_' and '-'")
        if same_cluster and topic in log_topics:
            raise ConfigError(f"{where}.topic: {topic!r} (for source {source.name}) is one of the log's own topics")


def _check_postgres_tables(config: Config, specs: list[SinkSpec]) -> None:
    """PostgreSQL truncates names past 63 bytes silently, so two sources' tables could become one."""
    for spec in specs:
        if spec.type != "postgres":
            continue
        suffix = "" if spec.options.delete_mode == "soft" else "_deleted"
        for source in config.sources:
            table = spec.options.table.replace("{source}", source.name) + suffix
            if spec.name in (source.sinks or [s.name for s in specs]) and len(table.encode()) > 63:
                raise ConfigError(f"{sink_where(specs, spec)}.table: {table!r} (for source {source.name!r}) is "
                                  "longer than PostgreSQL's 63 bytes; choose a shorter table name")


def _resolve_paginators(config: Config) -> Config:
    """Each source's ``pagination`` is a registered paginator (conflux.paginators: the built-in styles and
    plugins alike), its ``pagination_options`` are validated by the paginator's Options Struct, and the
    paginator's own ``check`` passes; errors name the field."""
    sources = []
    for index, source in enumerate(config.sources):
        where = f"sources[{index}] ({source.name})"
        paginator = plugins.load("paginators", source.pagination, f"{where}.pagination")
        options = plugins.options(paginator, source.paginator_options or {}, f"{where}.pagination_options")
        resolved = msgspec.structs.replace(source, paginator_options=options)
        try:
            getattr(paginator, "check", lambda _source, _options: None)(resolved, options)
        except ValueError as exc:
            raise ConfigError(_within(where, str(exc))) from None
        sources.append(resolved)
    return msgspec.structs.replace(config, sources=sources)


def sink_where(specs: list[SinkSpec], spec: SinkSpec) -> str:
    """How an error names a sink: "sink" for [sink], "sinks[i] (name)" for the i-th [[sinks]] table."""
    if spec.name == DEFAULT_SINK and spec.type == "http":
        return "sink"
    index = [other.name for other in specs if other.name != DEFAULT_SINK].index(spec.name)
    return f"sinks[{index}] ({spec.name})"


def sink_options_type(kind: str, where: str = "type") -> type:
    """The Struct of a sink type's config keys: a built-in's, or a plugin's (its class's ``Options``)."""
    if kind in BUILTIN_SINK_OPTIONS:
        return BUILTIN_SINK_OPTIONS[kind]
    return getattr(plugins.load("sinks", kind, where), "Options", None) or plugins.NoOptions


def _within(prefix: str, message: str) -> str:
    """'dsn: ...' -> 'sinks[0].dsn: ...'; a message without a field name -> 'sinks[0]: ...'."""
    field, sep, rest = message.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z0-9_.\[\]-]+", field):
        return f"{prefix}.{field}: {rest}"
    return f"{prefix}: {message}"


def _flatten_kafka_tables(raw: dict[str, Any]) -> dict[str, Any]:
    """`sasl.mechanism = "PLAIN"` under [kafka.producer] is TOML for a nested table; librdkafka wants
    the dotted name, so `{"sasl": {"mechanism": ...}}` becomes `{"sasl.mechanism": ...}`."""
    kafka = raw.get("kafka")
    if isinstance(kafka, dict):
        for role, table in kafka.items():
            if isinstance(table, dict):
                kafka[role] = _dotted(table)
    return raw


def _dotted(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _apply_env_overrides(raw: dict[str, Any], environ: dict[str, str]) -> None:
    """CONFLUX_<SECTION>_<KEY>=value, and CONFLUX_SOURCES_<NAME>_<KEY>=value for one source."""
    sections = {name for name in Config.__struct_fields__ if name != "sources"}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section in sections and key:
            raw.setdefault(section, {})
            if isinstance(raw[section], dict):
                raw[section][key] = _parse_env_value(value)
        elif section == "sources" and key:
            _override_source(raw, key, value)


def _mention_env_source(message: str, environ: dict[str, str]) -> str:
    """'sink.bearer: unknown key' -> '... (set by environment variable CONFLUX_SINK_BEARER)', because a
    secret given a CONFLUX_ name is read as an override and the file alone would not explain the error."""
    field = message.split(":", 1)[0]
    if "[" in field:
        return message
    variable = ENV_PREFIX + field.replace(".", "_").upper()
    return f"{message} (set by environment variable {variable})" if variable in environ else message


def _override_source(raw: dict[str, Any], rest: str, value: str) -> None:
    sources = raw.get("sources")
    if not isinstance(sources, list):
        return  # the validation that follows names the problem with `sources`
    matches = [(len(env_name), source) for source in sources if isinstance(source, dict)
               for env_name in [str(source.get("name", "")).lower().replace("-", "_").replace(".", "_")]
               if rest.startswith(env_name + "_")]
    if matches:  # the longest name wins: CONFLUX_SOURCES_CRM_EU_X is for `crm_eu`, not `crm`
        length, source = max(matches, key=lambda match: match[0])
        source[rest[length + 1:]] = _parse_env_value(value)


def _parse_env_value(value: str) -> Any:
    """Arrays, inline tables and quoted strings are TOML; anything else stays the string it is, and
    the lax conversion turns it into the field's type ("4" -> 4, "true" -> True), so a string field
    keeps a value such as CONFLUX_CONTROL_TOKEN=12345."""
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value
    return parsed if isinstance(parsed, str | list | dict) else value.strip()


def _describe_validation_error(message: str) -> str:
    """'Expected `int`, got `str` - at `$.sources[0].page_size`' -> 'sources[0].page_size: ...'."""
    match = re.search(r"^(.*) - at `\$\.?(.*)`$", message)
    text, where = match.groups() if match else (message, "")  # errors at the top level have no `at`
    where = re.sub(r"\.pagination_fields\b", ".pagination", where)  # the table's name in the file
    field = re.match(r"Object (contains unknown|missing required) field `(.+)`", text)
    if field:
        name = f"{where}.{field.group(2)}" if where else field.group(2)
        return f"{name}: {'unknown key' if field.group(1) == 'contains unknown' else 'missing required key'}"
    return f"{where}: {text}" if where else text


def _check_secret_sources(config: Config, environ: dict[str, str]) -> None:
    """A secret named by an env var or a file must exist now, not on the first request at 3 a.m."""
    for index, source in enumerate(config.sources):
        where = f"sources[{index}] ({source.name})"
        if source.webhook_secret_env:
            _require_env(environ, source.webhook_secret_env, f"{where}.webhook_secret_env")
        if source.auth is not None:
            _check_auth(source.auth, environ, f"{where}.auth")
        if source.ca_file and not Path(source.ca_file).is_file():
            raise ConfigError(f"{where}.ca_file: file {source.ca_file!r} does not exist")
    for spec in config.sinks:
        _check_sink_secrets(spec, environ, sink_where(config.sinks, spec))
    if config.control.token_env:
        _require_env(environ, config.control.token_env, "control.token_env")
    if config.log.backend == "kafka":
        _check_kafka_secrets(config.kafka, environ)
    _check_control_files(config.control)


def _check_control_files(control: ControlConfig) -> None:
    """The TLS files must be readable now; whether they hold a matching pair is checked when the port is bound."""
    for field in ("tls_cert_file", "tls_key_file"):
        name = getattr(control, field)
        if name and (problem := _secret_file_problem(name)):
            raise ConfigError(f"control.{field}: {problem}")


def _check_sink_secrets(spec: SinkSpec, environ: dict[str, str], where: str) -> None:
    """The built-in types' secret sources; a plugin checks its own when it starts."""
    options = spec.options
    for field in ("token_env", "dsn_env"):
        if getattr(options, field, ""):
            _require_env(environ, getattr(options, field), f"{where}.{field}")
    if getattr(options, "dsn_file", "") and (problem := _secret_file_problem(options.dsn_file)):
        raise ConfigError(f"{where}.dsn_file: {problem}")
    for key, value in getattr(options, "producer", {}).items():
        if key.endswith("_env"):
            _require_env(environ, str(value), f"{where}.producer.{key}")
        elif key.endswith("_file") and (problem := _secret_file_problem(str(value))):
            raise ConfigError(f"{where}.producer.{key}: {problem}")


def _check_kafka_secrets(kafka: KafkaConfig, environ: dict[str, str]) -> None:
    for role in ("producer", "consumer", "admin"):
        for key, value in getattr(kafka, role).items():
            if key.endswith("_env"):
                _require_env(environ, str(value), f"kafka.{role}.{key}")
            elif key.endswith("_file") and (problem := _secret_file_problem(str(value))):
                raise ConfigError(f"kafka.{role}.{key}: {problem}")


def _check_auth(auth: AuthConfig, environ: dict[str, str], where: str) -> None:
    """Whatever the method, an option ending in _env names a variable that must be set, and one ending in
    _file a file that must be readable and not empty (which of them a method needs, its Options say)."""
    for field, value in secret_sources(auth.options):
        if field.endswith("_env"):
            _require_env(environ, value, f"{where}.{field}")
        elif problem := _secret_file_problem(value):
            raise ConfigError(f"{where}.{field}: {problem}")


def secret_sources(options: Any) -> list[tuple[str, str]]:
    """(field, value) of every non-empty ``*_env`` and ``*_file`` string option of a plugin's options."""
    fields = getattr(options, "__struct_fields__", ())
    return [(field, value) for field in fields if field.endswith(("_env", "_file"))
            for value in [getattr(options, field)] if isinstance(value, str) and value]


def _secret_file_problem(name: str) -> str:
    try:
        text = Path(name).read_text(errors="replace")
    except FileNotFoundError:
        return f"file {name!r} does not exist"
    except OSError as exc:
        return f"cannot read file {name!r}: {exc.strerror}"
    except ValueError:  # a NUL in the name
        return f"{name!r} is not a valid file name"
    return "" if text.strip() else f"file {name!r} is empty"


def _require_env(environ: dict[str, str], name: str, where: str) -> None:
    if not environ.get(name):
        raise ConfigError(f"{where}: environment variable {name} is not set")


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    """Relative paths in the file are relative to the file, not to wherever the daemon was started."""
    state_dir = _absolute(config.daemon.state_dir, base_dir)
    log_path = config.log.path if config.log.path == ":memory:" else _absolute(config.log.path, base_dir)
    return msgspec.structs.replace(
        config,
        daemon=msgspec.structs.replace(config.daemon, state_dir=state_dir),
        log=msgspec.structs.replace(config.log, path=log_path),
        sources=[_resolve_source_paths(source, base_dir) for source in config.sources],
        control=msgspec.structs.replace(config.control, **{
            name: _absolute(getattr(config.control, name), base_dir)
            for name in ("tls_cert_file", "tls_key_file") if getattr(config.control, name)}),
    )


def _resolve_source_paths(source: SourceConfig, base_dir: Path) -> SourceConfig:
    """ca_file and the auth *_file secrets, like every other path, are relative to the config file."""
    def resolved(value: str) -> str:
        return _absolute(value, base_dir) if value else value

    auth = source.auth
    if auth is not None:
        files = {field: resolved(value) for field, value in secret_sources(auth.options) if field.endswith("_file")}
        if files:
            auth = msgspec.structs.replace(auth, options=msgspec.structs.replace(auth.options, **files))
    return msgspec.structs.replace(source, ca_file=resolved(source.ca_file), auth=auth)


def _absolute(value: str, base_dir: Path) -> str:
    """Pure string work (no filesystem call), so a bad path is reported by whoever opens it."""
    return os.path.normpath(os.path.join(base_dir, value))


# ---------------------------------------------------------------------------------------------
# Presenting


def redacted(config: Config) -> dict[str, Any]:
    """The effective config as plain data, secrets shown as '***', in the shape the file is written in.
    The rules (field names, headers, URLs, librdkafka keys) are conflux.redact's, shared with the logs."""
    data = _redact(msgspec.to_builtins(config))
    _present_sinks(data, config)
    for role in ("producer", "consumer", "admin"):
        data["kafka"][role] = _mask_kafka_secrets(data["kafka"][role])
    for source in data["sources"]:
        source["headers"] = redact_headers(source["headers"])
        source["pagination"] = {"style": source["pagination"], **source.pop("pagination_fields")}
        for table in ("auth", "fields", "filter", "webhook_delete_when", "records_path", "pagination_options", "body"):
            if source.get(table) in (None, {}):
                source.pop(table, None)
        if isinstance(source.get("auth"), dict):  # written flat, as in the file: type, then the method's keys
            source["auth"] = {"type": source["auth"]["type"], **(source["auth"]["options"] or {})}
        if isinstance(source.get("filter"), dict):  # `in` / `not_in`: only the one that is set
            source["filter"] = {name: value for name, value in source["filter"].items() if value is not None}
    return data


def _present_sinks(data: dict[str, Any], config: Config) -> None:
    """[[sinks]] flat as in the file (name, type, then the type's keys), a Kafka sink's librdkafka
    secrets masked; [sink] only if it was given."""
    data["sinks"] = [{"name": spec["name"], "type": spec["type"], **spec["options"]}
                     for spec in data["sinks"] if spec["name"] != DEFAULT_SINK]
    for spec in data["sinks"]:
        if isinstance(spec.get("producer"), dict):
            spec["producer"] = _mask_kafka_secrets(spec["producer"])
    if not data["sinks"]:
        del data["sinks"]
    if not any(spec.name == DEFAULT_SINK for spec in config.sinks):
        del data["sink"]  # only [[sinks]]: printing [sink] would add the default sink when read back


def _mask_kafka_secrets(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: MASK if value != "" and kafka_secret_key(key) else value for key, value in settings.items()}


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(item, key) for item in value]
    if value and isinstance(value, str) and SECRET_FIELD.search(key.replace(".", "_")):
        return MASK
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for `conflux config check` output (tables, arrays of tables, scalars)."""
    lines: list[str] = []
    _write_table(lines, [], data)
    return "\n".join(lines).strip() + "\n"


def _write_table(lines: list[str], path: list[str], table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not _is_table(v) and not _is_table_array(v)}
    for key, value in scalars.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        if _is_table(value):
            lines.extend(["", f"[{'.'.join(_toml_key(p) for p in [*path, key])}]"])
            _write_table(lines, [*path, key], value)
        elif _is_table_array(value):
            for item in value:
                lines.extend(["", f"[[{'.'.join(_toml_key(p) for p in [*path, key])}]]"])
                _write_table(lines, [*path, key], item)


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    """JSON string escapes are TOML's, except that TOML also forbids a raw DEL (U+007F)."""
    return msgspec.json.encode(text).decode().replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return '""'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return _toml_string(value)
