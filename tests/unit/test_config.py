"""Configuration loading (daemon/config.py): every kind of error names its field, environment
overrides, the [sources.pagination] table, secrets that must exist, the redacted TOML round trip,
and hypothesis fuzzing: whatever the file or environment holds, the loader raises only ConfigError."""

from __future__ import annotations

import datetime as dt
import math
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conflux.config import Config, load_config, redacted, to_toml
from conflux.errors import ConfigError

FUZZ = settings(max_examples=75, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SOURCE = '[[sources]]\nname = "crm"\nurl = "http://upstream/api/customers"\n'


def load(text: str | bytes, environ: dict[str, str] | None = None, directory: Path | None = None) -> Config:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(directory or scratch) / "conflux.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return load_config(path, environ=environ or {})


def error(text: str | bytes, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(text, environ)
    return str(caught.value)


# -- defaults and the documented example --------------------------------------------------------


def test_an_empty_file_is_all_defaults_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    config = load("", directory=tmp_path)
    assert config.sources == [] and config.log.backend == "embedded" and config.log.partitions == 4
    assert config.log.path == str(tmp_path / "var" / "conflux.db")
    assert config.daemon.state_dir == str(tmp_path / "var")
    assert load('[log]\npath = ":memory:"').log.path == ":memory:"


def test_the_readme_example_loads() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example_toml = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    config = load(example_toml)
    [source] = config.sources
    assert (source.name, source.pagination, source.page_size, config.sink.batch_size) == ("customers", "page",
                                                                                          500, 1000)


def test_a_missing_file_and_a_file_that_is_not_toml() -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("/nonexistent/conflux.toml", environ={})
    assert "not valid TOML" in error("[log\n")


def test_a_file_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    """Regression: a directory or non-UTF-8 bytes raised IsADirectoryError / UnicodeDecodeError."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, environ={})
    assert "UTF-8" in error(b'[log]\npath = "\xff"\n')


# -- errors name the field ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "field"), [
    ("colour = 1", "colour: unknown key"),
    ("[log]\ncolour = 1", "log.colour: unknown key"),
    ("[workers]\nfetcherz = 1", "workers.fetcherz: unknown key"),
    ("[kafka]\nbroker = 1", "kafka.broker: unknown key"),
    (SOURCE + "colour = 1", "sources[0].colour: unknown key"),
    (SOURCE + "[sources.pagination]\ncolour = 1", "sources[0].pagination.colour: unknown key"),
    (SOURCE + '[sources.auth]\ntype = "bearer"\ntoken_env = "T"\ncolour = 1', "sources[0].auth.colour: unknown key"),
    ("[log]\npartitions = \"four\"", "log.partitions: Expected `int`, got `str`"),
    ("[sink]\nbatch_size = 1.5", "sink.batch_size: Expected `int`, got `float`"),
    ("log = 5", "log: Expected `object`, got `int`"),
    ("sources = 5", "sources: Expected `array`, got `int`"),
    (SOURCE + "page_size = []", "sources[0].page_size: Expected `int`, got `array`"),
    ("[log]\nbackend = \"cassandra\"", "log.backend: Invalid enum value 'cassandra'"),
    (SOURCE + 'pagination = "scroll"', "sources[0] (crm).pagination: unknown pagination style 'scroll' (known: "),
    ("[[sources]]\nname = \"crm\"", "sources[0].url: missing"),
])
def test_wrong_keys_and_types_name_the_field(text: str, field: str) -> None:
    assert error(text).startswith(field)


@pytest.mark.parametrize(("text", "section", "words"), [
    ("[log]\npartitions = 0", "log", "partitions must be >= 1"),
    ('[log]\nbackend = "kafka"', "log", "bootstrap_servers is required"),
    (SOURCE + "page_size = 0", "sources[0]", "page_size must be between 1 and 100000"),
    (SOURCE.replace("http://", "ftp://"), "sources[0]", "url must start with http:// or https://"),
    (SOURCE.replace('"crm"', '"c r m"'), "sources[0]", "name 'c r m' may only hold"),
    (SOURCE + "poll_interval_s = nan", "sources[0]", "poll_interval_s must be >= 0.1 s"),
    ("[sink]\nbatch_size = 100\nmax_pending_records = 10", "sink", "max_pending_records must be >= batch_size"),
    ("[workers]\nack_timeout_s = 0", "workers", "ack_timeout_s must be > 0"),
    ("[retry]\nbase_s = 5\nmax_s = 1", "retry", "base_s must be > 0 and <= max_s"),
    ("[workers]\nconsumers = 65", "workers", "consumers must be between 1 and 64"),
    ("[workers]\nheartbeat_timeout_s = 1", "workers", "heartbeat_timeout_s must be more than twice"),
    ('[control]\nlisten = "9108"', "control", "listen must be HOST:PORT"),
    ('[control]\nlisten = "h:70000"', "control", "listen must be HOST:PORT"),
    ('[control]\nlisten = "h:\u00b2"', "control", "listen must be HOST:PORT"),
    ("[daemon]\nshutdown_timeout_s = -1", "daemon", "shutdown_timeout_s must be > 0"),
    (SOURCE + SOURCE, "sources", "duplicate source names ['crm']"),
    ('[daemon]\nstate_dir = "a\\u0000b"', "daemon", "state_dir"),
    ('[log]\npath = "a\\u0000b"', "log", "path"),
    (SOURCE + 'allowed_origins = ["https://cdn.example/files"]', "sources[0]",
     "allowed_origins[0]: 'https://cdn.example/files' must be only scheme://host[:port]"),
    (SOURCE + 'allowed_origins = ["http://ok:81", "ftp://cdn"]', "sources[0]", "allowed_origins[1]: 'ftp://cdn'"),
    (SOURCE + 'allowed_origins = ["https://user@cdn.example"]', "sources[0]", "allowed_origins[0]"),
    (SOURCE + 'allowed_origins = ["https://cdn.example:99999"]', "sources[0]", "allowed_origins[0]"),
    (SOURCE + "max_page_bytes = 10", "sources[0]", "max_page_bytes must be >= 1024"),
    (SOURCE + "max_pages_per_sync = 0", "sources[0]", "max_pages_per_sync must be >= 1"),
    (SOURCE + "max_clock_skew_s = -1", "sources[0]", "max_clock_skew_s must be a finite number >= 0"),
    (SOURCE + "max_clock_skew_s = inf", "sources[0]", "max_clock_skew_s must be a finite number >= 0"),
])
def test_bad_values_name_the_section_and_the_field(text: str, section: str, words: str) -> None:
    message = error(text)
    assert message.startswith(f"{section}: ") and words in message


def test_the_readme_shows_the_hostile_upstream_limits_with_their_defaults() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Where credentials go", 1)[1]
    [source] = load(section.split("```toml\n", 1)[1].split("```", 1)[0]).sources
    [default] = load(SOURCE).sources
    assert (source.allowed_origins, source.max_page_bytes, source.max_pages_per_sync, source.max_clock_skew_s) == (
        default.allowed_origins, default.max_page_bytes, default.max_pages_per_sync, default.max_clock_skew_s)


def test_the_hostile_upstream_limits_have_defaults_and_take_values() -> None:
    [source] = load(SOURCE).sources
    assert (source.allowed_origins, source.max_page_bytes, source.max_pages_per_sync, source.max_clock_skew_s) == (
        [], 64 << 20, 100_000, 300.0)
    [source] = load(SOURCE + 'allowed_origins = ["https://cdn.example:8443", "http://127.0.0.1:9/"]\n'
                             "max_page_bytes = 2048\nmax_pages_per_sync = 3\nmax_clock_skew_s = 0").sources
    assert source.allowed_origins == ["https://cdn.example:8443", "http://127.0.0.1:9/"]
    assert (source.max_page_bytes, source.max_pages_per_sync, source.max_clock_skew_s) == (2048, 3, 0.0)


# -- [sources.pagination] --------------------------------------------------------------------------


def test_the_pagination_table_renames_fields_and_may_carry_the_style() -> None:
    config = load(SOURCE + '[sources.pagination]\nstyle = "cursor"\nrecords_path = "result.items"\nfirst_page = 0\n')
    source = config.sources[0]
    assert source.pagination == "cursor"
    assert (source.pagination_options.records_path, source.pagination_options.first_page) == ("result.items", 0)
    assert source.pagination_options.cursor_param == "cursor"  # the rest keeps the demo's names
    plain = load(SOURCE + 'pagination = "link"\n').sources[0]
    assert plain.pagination == "link" and plain.pagination_options.records_path == "data"
    assert error(SOURCE + '[sources.pagination]\nstyle = "pages"').startswith(
        "sources[0] (crm).pagination: unknown pagination style 'pages'")


# -- API shapes ------------------------------------------------------------------------------------


def test_the_api_shape_keys_load_with_their_defaults() -> None:
    [plain] = load(SOURCE).sources
    assert (plain.method, plain.body, plain.body_type, plain.updated_since_format, plain.parent) == (
        "GET", {}, "json", "native", "")
    assert plain.effective_records_path == "data" and plain.parent_key_field == "parent_key"
    text = (SOURCE + 'records_path = "result.items"\nmethod = "POST"\n'
            'updated_since_format = "epoch_ms"\n[sources.pagination]\nstyle = "next_url"\n'
            'next_url_path = "links.next.href"\n'
            '[sources.body]\nquery = "status:open"\npage = { cursor = "{cursor}", size = "{limit}" }\n')
    [source] = load(text).sources
    assert source.effective_records_path == "result.items" and source.pagination == "next_url"
    assert source.body == {"query": "status:open", "page": {"cursor": "{cursor}", "size": "{limit}"}}
    assert source.pagination_options.next_url_path == "links.next.href"


def test_a_child_source_names_its_parent_and_uses_its_fields() -> None:
    text = (SOURCE + '[[sources]]\nname = "issues"\nurl = "http://upstream/api/projects/{parent.id}/issues"\n'
            'parent = "crm"\nkey = ["parent_key", "number"]\n')
    config = load(text)
    child = config.source("issues")
    assert child.parent_paths() == ["id"] and config.children_of("crm") == [child]
    assert (config.root_of("issues"), config.root_of("crm")) == ("crm", "crm")


@pytest.mark.parametrize(("text", "message"), [
    (SOURCE + 'pagination = "next_url"', "sources[0] (crm).pagination.next_url_path: required"),
    (SOURCE + '[sources.pagination]\nstyle = "cursor"\nrecords_path = ""',
     "sources[0] (crm).pagination.next_cursor_header: the body is the list"),
    (SOURCE + '[sources.pagination]\nnext_cursor_header = "X Next"', "next_cursor_header: 'X Next' is not an HTTP"),
    (SOURCE + '[sources.pagination]\nrecords_path = "a..b"', "records_path: 'a..b' is not a dotted path"),
    (SOURCE + 'records_path = "a."', "records_path: 'a.' is not a dotted path"),
    (SOURCE + 'records_path = "items"\n[sources.pagination]\nrecords_path = "rows"',
     "records_path: 'items', but pagination.records_path says 'rows'"),
    (SOURCE + '[sources.pagination]\nrecords_path = "data"\nhas_more_field = "data.more"',
     "has_more_field: 'data.more' runs through the value of records_path 'data'"),
    (SOURCE + 'records_path = "result"\n[sources.pagination]\nnext_url_path = "result.next"',
     "pagination.next_url_path: 'result.next' runs through the value of records_path 'result'"),
    (SOURCE + '[sources.body]\nq = "x"', 'body: only with method = "POST"'),
    (SOURCE + 'method = "PUT"', "sources[0].method: Invalid enum value 'PUT'"),
    (SOURCE + 'method = "POST"\nbody_type = "form"\n[sources.body]\nfilter = { a = 1 }',
     "body.filter: a form body holds text, numbers, booleans or lists of them"),
    (SOURCE + 'updated_since_format = "rfc2822"', "sources[0].updated_since_format: Invalid enum value"),
    (SOURCE.replace("customers", "{parent.id}/x"), 'url: {parent.FIELD} needs parent = "SOURCE"'),
    (SOURCE.replace("customers", "{parent.id}") + 'parent = "nobody"', "sources[0] (crm).parent: no source named"),
    (SOURCE + 'parent = "crm"', "parent: a source cannot be its own parent"),
    (SOURCE + 'parent = "other"\n' + SOURCE.replace('"crm"', '"other"'),
     "url: a child source's url (or body) must use {parent.FIELD}"),
    (SOURCE.replace("customers", "{parent.id}") + 'parent = "b"\n'
     + SOURCE.replace('"crm"', '"b"').replace("customers", "{parent.id}") + 'parent = "crm"\n',
     "sources[0] (crm).parent: the parents go round in a circle (crm -> b -> crm)"),
    (SOURCE.replace("http://upstream", "http://{parent.host}") + 'parent = "p"\n'
     + SOURCE.replace('"crm"', '"p"'), "url: placeholders may stand in the path and query"),
    (SOURCE + '[sources.pagination_options]\nskip = 1', "sources[0] (crm).pagination_options.skip: unknown key"),
])
def test_api_shape_mistakes_name_the_field(text: str, message: str) -> None:
    assert message in error(text)


def test_every_example_of_connecting_your_api_in_the_readme_loads() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Connecting your API", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```toml\n")[1:]]
    assert len(blocks) == 5
    for block in blocks:
        config = load(block if "[[sources]]" in block else SOURCE + block)
        assert config.sources


def test_the_api_shape_keys_survive_the_redacted_round_trip() -> None:
    text = (SOURCE + 'method = "POST"\nrecords_path = ""\nupdated_since_format = "epoch_s"\n'
            '[sources.pagination]\nstyle = "cursor"\nnext_cursor_header = "X-Next"\n'
            '[sources.body]\nq = ["a", "{cursor}"]\n'
            '[[sources]]\nname = "kids"\nurl = "http://upstream/api/{parent.id}/kids"\nparent = "crm"\n')
    config = load(text)
    again = load(to_toml(redacted(config)))
    assert again.sources == config.sources


# -- environment overrides ---------------------------------------------------------------------


def test_section_overrides_parse_as_the_field_type() -> None:
    config = load("[workers]\nconsumers = 2", {
        "CONFLUX_WORKERS_CONSUMERS": "4", "CONFLUX_SINK_FLUSH_INTERVAL_S": "0.25", "CONFLUX_LOG_BACKEND": "embedded",
        "CONFLUX_DAEMON_LOG_FORMAT": "json", "CONFLUX_TEST_KAFKA": "ignored:9092", "OTHER": "x"})
    assert (config.workers.consumers, config.sink.flush_interval_s, config.daemon.log_format) == (4, 0.25, "json")


def test_string_fields_keep_override_values_that_look_like_numbers_or_booleans() -> None:
    """Regression: override values were parsed as TOML first, so CONFLUX_CONTROL_TOKEN=12345 became
    the integer 12345 and the config was refused ('Expected `str`, got `int`')."""
    config = load(SOURCE, {"CONFLUX_CONTROL_TOKEN": "12345", "CONFLUX_SINK_TOKEN": "true",
                           "CONFLUX_LOG_GROUP": "2024-01-01", "CONFLUX_SOURCES_CRM_KEY": "1.5"})
    assert (config.control.token, config.sink.token, config.log.group) == ("12345", "true", "2024-01-01")
    assert config.sources[0].key == "1.5"


def test_override_values_may_be_toml_arrays_and_tables() -> None:
    config = load(SOURCE, {"CONFLUX_SOURCES_CRM_HEADERS": '{ X-Tenant = "acme" }',
                           "CONFLUX_KAFKA_PRODUCER": '{ "linger.ms" = 5 }', "CONFLUX_SOURCES_CRM_VERIFY_TLS": "false"})
    assert config.sources[0].headers == {"X-Tenant": "acme"} and config.kafka.producer == {"linger.ms": 5}
    assert config.sources[0].verify_tls is False


def test_bad_override_values_and_keys_name_the_field() -> None:
    assert error("", {"CONFLUX_WORKERS_CONSUMERS": "many"}).startswith("workers.consumers: Expected `int`")
    assert error("", {"CONFLUX_LOG_COLOUR": "red"}).startswith("log.colour: unknown key")
    assert error(SOURCE, {"CONFLUX_SOURCES_CRM_PAGE_SIZE": "0"}).startswith("sources[0]: page_size must be")
    assert error(SOURCE, {"CONFLUX_SOURCES_CRM_COLOUR": "red"}).startswith("sources[0].colour: unknown key")


def test_source_overrides_find_their_source_by_name() -> None:
    text = (SOURCE + SOURCE.replace('"crm"', '"crm-eu"').replace("customers", "eu")
            + SOURCE.replace('"crm"', '"Shop.Items"').replace("customers", "items"))
    config = load(text, {"CONFLUX_SOURCES_CRM_EU_PAGE_SIZE": "10", "CONFLUX_SOURCES_CRM_PAGE_SIZE": "20",
                         "CONFLUX_SOURCES_SHOP_ITEMS_PAGINATION": "cursor"})
    assert [(s.name, s.page_size, s.pagination) for s in config.sources] == [
        ("crm", 20, "page"), ("crm-eu", 10, "page"), ("Shop.Items", 500, "cursor")]


def test_a_source_name_that_prefixes_another_does_not_steal_its_overrides() -> None:
    """Regression: with sources `crm` and `crm_eu`, CONFLUX_SOURCES_CRM_EU_PAGE_SIZE went to `crm`
    as the unknown key `eu_page_size` when `crm` came first."""
    text = SOURCE + SOURCE.replace('"crm"', '"crm_eu"').replace("customers", "eu")
    config = load(text, {"CONFLUX_SOURCES_CRM_EU_PAGE_SIZE": "10"})
    assert [s.page_size for s in config.sources] == [500, 10]


def test_the_style_override_wins_over_the_pagination_table() -> None:
    text = SOURCE + '[sources.pagination]\nstyle = "cursor"\nrecords_path = "items"\n'
    source = load(text, {"CONFLUX_SOURCES_CRM_PAGINATION": "watermark"}).sources[0]
    assert source.pagination == "watermark" and source.pagination_options.records_path == "items"


@pytest.mark.parametrize("sources", ["sources = 5", "sources = [1, 2]", '[sources]\nname = "crm"', 'sources = "crm"'])
def test_source_overrides_with_a_malformed_sources_key_are_config_errors(sources: str) -> None:
    """Regression: the override walked `sources` assuming a list of tables (TypeError, AttributeError)."""
    assert error(sources, {"CONFLUX_SOURCES_CRM_PAGE_SIZE": "3"}).startswith("sources")


# -- secrets -------------------------------------------------------------------------------------------


def test_a_missing_secret_variable_names_the_source_and_the_variable() -> None:
    message = error(SOURCE + 'webhook_secret_env = "CRM_HOOK_SECRET"')
    assert message == "sources[0] (crm).webhook_secret_env: environment variable CRM_HOOK_SECRET is not set"
    auth = SOURCE + '[sources.auth]\ntype = "bearer"\ntoken_env = "CRM_TOKEN"\n'
    assert error(auth) == "sources[0] (crm).auth.token_env: environment variable CRM_TOKEN is not set"
    assert load(auth, {"CRM_TOKEN": "t"}).sources[0].auth.options.token_env == "CRM_TOKEN"
    assert error('[sink]\ntoken_env = "SINK_T"') == "sink.token_env: environment variable SINK_T is not set"
    assert "environment variable CTL_T is not set" in error('[control]\ntoken_env = "CTL_T"')


@pytest.mark.parametrize(("auth", "words"), [
    ('type = "bearer"', "type 'bearer' needs token_env or token_file"),
    ('type = "basic"\npassword_env = "P"', "auth.username: required for type 'basic'"),
    ('type = "header"\nvalue_env = "P"', "auth.header: required for type 'header'"),
    ('type = "oauth2"\nclient_secret_env = "P"', "type 'oauth2' needs token_url and client_id"),
    ('type = "bearer"\ntoken_file = "/nonexistent/token"', "auth.token_file: file '/nonexistent/token' does not"),
    ('type = "kerberos"', "sources[0].auth.type: unknown auth type 'kerberos' (known: basic, bearer, header, oauth2"),
])
def test_auth_errors_name_the_source_and_field(auth: str, words: str) -> None:
    assert words in error(SOURCE + "[sources.auth]\n" + auth, {"P": "secret"})


def test_a_nul_in_a_secret_file_name_is_a_config_error() -> None:
    """Path methods raise ValueError, not OSError, for a name with a NUL in it."""
    assert "auth.token_file" in error(SOURCE + '[sources.auth]\ntype = "bearer"\ntoken_file = "a\\u0000b"\n')


# -- redacted and to_toml ----------------------------------------------------------------------------


FULL = (SOURCE + 'webhook_secret = "hook-secret"\nheaders = { X-Api-Key = "k-123", Accept = "json" }\n'
        '[sources.pagination]\nstyle = "watermark"\n'
        + '[sources.auth]\ntype = "basic"\nusername = "u"\npassword_env = "PW"\n'
        + '[[sources]]\nname = "erp"\nurl = "https://erp/api"\n'
        + '[sink]\ntoken = "sink-secret"\n[kafka.producer]\n"sasl.password" = "kafka-secret"\n"linger.ms" = 5\n'
        + '[control]\ntoken_env = "CTL"\n')
ENV = {"PW": "pw", "CTL": "ctl"}


def test_redacted_hides_secrets_and_is_written_in_the_file_shape() -> None:
    data = redacted(load(FULL, ENV))
    text = to_toml(data)
    for secret in ("hook-secret", "k-123", "sink-secret", "kafka-secret"):
        assert secret not in text
    assert data["sources"][0]["pagination"]["style"] == "watermark" and "pagination_fields" not in data["sources"][0]
    assert data["sources"][0]["auth"]["password_env"] == "PW"  # the variable's name is not the secret
    assert "auth" not in data["sources"][1]
    assert data["control"]["token_env"] == "CTL" and data["sources"][0]["headers"]["Accept"] == "json"


def test_redacted_toml_round_trips_through_tomllib_and_load_config() -> None:
    data = redacted(load(FULL, ENV))
    assert tomllib.loads(to_toml(data)) == data
    assert redacted(load(to_toml(data), ENV)) == data


scalar = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False),
                   st.text(max_size=12))


@FUZZ
@given(data=st.dictionaries(st.text(min_size=1, max_size=8), st.one_of(
    scalar, st.lists(scalar, max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=8), scalar, max_size=3),
    st.lists(st.dictionaries(st.text(min_size=1, max_size=5), scalar, min_size=1, max_size=3), min_size=1,
             max_size=2)), max_size=5))
@example(data={"a": "del \x7f char", "b\x7f": 1})
def test_to_toml_writes_what_tomllib_reads_back(data: dict[str, Any]) -> None:
    """Regression: JSON escaping leaves U+007F (DEL) raw, which TOML strings and keys forbid."""
    assert _same(tomllib.loads(to_toml(data)), data)


def _same(read: Any, written: Any) -> bool:
    if isinstance(written, float) and math.isnan(written):
        return isinstance(read, float) and math.isnan(read)
    if isinstance(written, dict):
        return read.keys() == written.keys() and all(_same(read[k], v) for k, v in written.items())
    if isinstance(written, list):
        return len(read) == len(written) and all(_same(r, w) for r, w in zip(read, written))
    return read == written and type(read) is type(written)


# -- fuzzing the loader --------------------------------------------------------------------------------


SECTIONS = {name: list(msgspec.structs.fields(Config)[i].type.__struct_fields__)
            for i, name in enumerate(Config.__struct_fields__) if name not in ("sources", "sinks")}
SOURCE_KEYS = ["name", "url", "key", "updated", "pagination", "page_size", "poll_interval_s", "max_concurrency",
               "headers", "auth", "webhook_secret_env", "timeout_s", "rate_limit_rps", "colour"]
toml_value = st.recursive(
    st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=10),
              st.sampled_from(["embedded", "kafka", "page", "cursor", "http://u/x", "h:1", "", "crm", "1", "0"]),
              st.datetimes(), st.dates(), st.times()),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3),
    max_leaves=6)


def section_st(keys: list[str]) -> st.SearchStrategy[dict]:
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(min_size=1, max_size=6)), toml_value,
                           max_size=5)


config_doc = st.fixed_dictionaries({}, optional={
    **{name: st.one_of(section_st(keys), toml_value) for name, keys in SECTIONS.items()},
    "sources": st.one_of(st.lists(section_st(SOURCE_KEYS).map(lambda s: {"name": "crm", "url": "http://u", **s}),
                                  max_size=3), toml_value),
    "extra": toml_value,
})
env_st = st.dictionaries(
    st.one_of(st.sampled_from([f"CONFLUX_{s.upper()}_{k.upper()}" for s, keys in SECTIONS.items() for k in keys]),
              st.sampled_from(["CONFLUX_SOURCES_CRM_PAGE_SIZE", "CONFLUX_SOURCES_CRM_URL", "CONFLUX_SOURCES_X",
                               "CONFLUX_SOURCES_", "CONFLUX_", "CONFLUX_LOG_"])),
    st.text(max_size=12), max_size=3)


def toml_text(value: Any) -> str:
    """A TOML document for ``value`` (inline tables and arrays, so any nesting is expressible)."""
    return "".join(f"{_key(k)} = {_inline(v)}\n" for k, v in value.items())


def _key(key: str) -> str:
    return msgspec.json.encode(key).decode().replace("\x7f", "\\u007f")


def _inline(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                else repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_inline(v)}" for k, v in value.items()) + "}"
    return _key(value)


def loads_or_config_error(text: str | bytes, environ: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "conflux.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        try:
            config = load_config(path, environ=environ)
        except ConfigError as exc:
            assert str(exc)
            return
    assert isinstance(config, Config)
    to_toml(redacted(config))


@FUZZ
@given(doc=config_doc, environ=env_st)
def test_structured_nonsense_only_ever_raises_config_error(doc: dict, environ: dict[str, str]) -> None:
    loads_or_config_error(toml_text(doc), environ)


@FUZZ
@given(text=st.one_of(st.binary(max_size=120), st.text(max_size=120)), environ=env_st)
@example(text=b"\xff", environ={})
@example(text="sources = 3", environ={"CONFLUX_SOURCES_A_B": "1"})
def test_arbitrary_bytes_only_ever_raise_config_error(text: str | bytes, environ: dict[str, str]) -> None:
    loads_or_config_error(text, environ)


def test_an_explicit_environ_replaces_the_process_environment(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv("CONFLUX_WORKERS_FETCHERS", "7")
    path = tmp_path / "conflux.toml"
    path.write_text("")
    assert load_config(path, environ={}).workers.fetchers == 1
    assert load_config(path).workers.fetchers == 7


def test_secret_files_and_ca_files_are_relative_to_the_config_file(tmp_path, monkeypatch):
    from conflux.config import load_config

    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "crm").write_text("token\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    config_path = tmp_path / "conflux.toml"
    config_path.write_text('[[sources]]\nname = "crm"\nurl = "https://127.0.0.1:1/api"\nca_file = "ca.pem"\n'
                           '[sources.auth]\ntype = "bearer"\ntoken_file = "secrets/crm"\n')
    monkeypatch.chdir("/")
    config = load_config(config_path, environ={})
    assert config.sources[0].ca_file == str(tmp_path / "ca.pem")
    assert config.sources[0].auth.options.token_file == str(tmp_path / "secrets" / "crm")


def test_an_unknown_key_set_by_the_environment_names_the_variable(tmp_path):
    from conflux.config import load_config
    from conflux.errors import ConfigError

    expected = r"sink\.bearer: unknown key \(set by environment variable CONFLUX_SINK_BEARER\)"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, environ={"CONFLUX_SINK_BEARER": "s3cret"})


# -- cross-field validation ------------------------------------------------------------------------------


ERP = '[[sources]]\nname = "erp"\nurl = "http://upstream/api/erp"\n'


def test_two_sources_never_write_one_topic() -> None:
    """A consumer knows a message's source by its topic: a second writer's records would be mistaken."""
    config = load('[log]\ntopic_prefix = "p."\n' + SOURCE + ERP + 'topic = "crm"\n')
    assert [config.topic_of(source) for source in config.sources] == ["p.crm", "crm"]
    assert error(SOURCE + ERP + 'topic = "crm"\n') == ("sources[1].topic: topic 'crm' is also the topic of "
                                                       "sources[0] (crm); each source needs a topic of its own")
    both_orders = SOURCE + 'topic = "orders"\n' + ERP + 'topic = "orders"\n'
    assert "sources[1].topic: topic 'orders' is also" in error(both_orders)
    assert "sources[1].topic: topic 'p.crm' is also" in error('[log]\ntopic_prefix = "p."\n' + SOURCE + ERP
                                                              + 'topic = "p.crm"\n')


@pytest.mark.parametrize(("text", "words"), [
    (SOURCE + ERP + 'topic = "crm.dlq"\n', "sources[1].topic: topic 'crm.dlq' is reserved"),
    (SOURCE + 'topic = "conflux.checkpoints"\n', "sources[0].topic: topic 'conflux.checkpoints' is reserved"),
    (SOURCE + f'topic = "{"t" * 250}"\n', "sources[0].topic: topic 'tttt"),
    ('[log]\nbackend = "kafka"\nbootstrap_servers = "k:9092"\n' + SOURCE + 'topic = "a b"\n',
     "sources[0].topic: Kafka topic 'a b' may only hold"),
])
def test_topics_the_log_uses_itself_or_cannot_hold_are_refused(text: str, words: str) -> None:
    assert words in error(text)


def test_intervals_have_floors_and_ring_sizes_fit_the_ring_layout() -> None:
    """A tiny interval is a denial of service on ourselves (or the upstream); a ring of a size the ring
    code refuses (its ack ring is a sixteenth of it) would stop the daemon at start, not at config check."""
    for text, words in [
        (SOURCE + "poll_interval_s = 0.001", "sources[0]: poll_interval_s must be >= 0.1 s (got 0.001)"),
        (SOURCE + "full_sync_interval_s = 0.5", "sources[0]: full_sync_interval_s must be >= 1.0 s (got 0.5)"),
        ("[sink]\nflush_interval_s = 0.001", "sink: flush_interval_s must be >= 0.01 s (got 0.001)"),
        ("[workers]\nheartbeat_interval_s = 0.01", "workers: heartbeat_interval_s must be >= 0.1 s (got 0.01)"),
        ("[workers]\nring_bytes = 65537", "workers: ring_bytes must be a multiple of 8"),
        ("[workers]\nring_bytes = 1050000", "workers: ring_bytes must be a multiple of 8, and of 128 above 1048576"),
    ]:
        assert error(text).startswith(words), text
    config = load(SOURCE + "poll_interval_s = 0.1\nfull_sync_interval_s = 1\n[sink]\nflush_interval_s = 0.01\n"
                  "[workers]\nheartbeat_interval_s = 0.1\nheartbeat_timeout_s = 1\nring_bytes = 1048576\n")
    assert config.sources[0].poll_interval_s == 0.1 and config.workers.ring_bytes == 1 << 20  # the floors pass


HOOKED = SOURCE + 'webhook_secret = "s"\n'


def test_a_webhook_limit_that_cannot_fit_a_ring_frame_is_refused_with_the_rule() -> None:
    message = error(HOOKED + "[workers]\nring_bytes = 65536\n")  # the default webhook_max_bytes is 1 MiB
    assert message.startswith("sources[0].webhook_max_bytes: 1048576 does not fit a ring frame")
    assert "3 x webhook_max_bytes" in message and "ring_bytes = 65536" in message
    lower, higher = re.search(r"lower webhook_max_bytes to (\d+) or raise ring_bytes to (\d+)", message).groups()
    # Both remedies the message offers are accepted, and one byte more is not.
    assert load(HOOKED + f"webhook_max_bytes = {lower}\n[workers]\nring_bytes = 65536\n")
    assert "does not fit" in error(HOOKED + f"webhook_max_bytes = {int(lower) + 1}\n[workers]\nring_bytes = 65536\n")
    assert load(HOOKED + f"[workers]\nring_bytes = {higher}\n")


def test_a_webhook_limit_beyond_the_largest_log_message_is_refused_whatever_the_ring() -> None:
    message = error(HOOKED + "webhook_max_bytes = 3000000\n[workers]\nring_bytes = 67108864\n")
    assert message.startswith("sources[0].webhook_max_bytes: 3000000 is too large")
    most = int(re.search(r"lower webhook_max_bytes to at most (\d+)", message).group(1))
    assert load(HOOKED + f"webhook_max_bytes = {most}\n[workers]\nring_bytes = 67108864\n")


def test_the_webhook_rule_applies_only_to_sources_that_take_webhooks() -> None:
    assert load(SOURCE + "[workers]\nring_bytes = 65536\n").workers.ring_bytes == 65536
    assert load(HOOKED).sources[0].webhook_max_bytes == 1 << 20  # the defaults fit each other
    from_env = SOURCE + 'webhook_secret_env = "H"\n[workers]\nring_bytes = 65536\n'
    assert "webhook_max_bytes" in error(from_env, {"H": "x"})


# -- config check shows no secret in any form --------------------------------------------------------


SECRET_FORMS = (
    '[[sources]]\nname = "crm"\nurl = "https://bob:pw-userinfo@crm.example/api?api_key=k-query&page_size=5"\n'
    'headers = { Cookie = "sid=c-cookie", X-Signature-Key = "k-signature", X-Session-Token = "k-session",'
    ' Accept = "json" }\n'
    '[sources.auth]\ntype = "oauth2"\ntoken_url = "https://idp.example/token?client_secret=c-tokenurl"\n'
    'client_id = "conflux"\nclient_secret_env = "CS"\n'
    '[sink]\nurl = "https://ingest:pw-sink@sink.example/ingest?token=t-sink"\n'
    '[kafka.producer]\n"ssl.key.pem" = "-----BEGIN PRIVATE KEY-----\\nk-pem\\n-----END PRIVATE KEY-----"\n'
    '"ssl.key.password" = "k-keypass"\n"sasl.oauthbearer.client.secret" = "k-oauthbearer"\n'
    '"sasl.password_env" = "KAFKA_PW"\n"linger.ms" = 5\n'
)


def test_config_check_hides_every_secret_form() -> None:
    data = redacted(load(SECRET_FORMS, {"CS": "x"}))
    text = to_toml(data)
    for secret in ("pw-userinfo", "k-query", "c-cookie", "k-signature", "k-session", "c-tokenurl", "pw-sink",
                   "t-sink", "k-pem", "k-keypass", "k-oauthbearer"):
        assert secret not in text, secret
    source = data["sources"][0]
    assert source["url"] == "https://***@crm.example/api?api_key=***&page_size=5"
    assert source["headers"] == {"Cookie": "***", "X-Signature-Key": "***", "X-Session-Token": "***", "Accept": "json"}
    assert data["sink"]["url"] == "https://***@sink.example/ingest?token=***"
    producer = data["kafka"]["producer"]
    assert producer["sasl.password_env"] == "KAFKA_PW" and producer["linger.ms"] == 5  # not secrets
    assert producer["ssl.key.pem"] == producer["ssl.key.password"] == "***"


# -- shaping and deletes: impossible combinations name the field --------------------------------------


@pytest.mark.parametrize(("extra", "words"), [
    ('[sources.fields]\nselect = ["a", "b"]\ndrop = ["b"]\n', "sources[0].fields: 'b' is in both select and drop"),
    ('[sources.fields]\nrename = {a = "x", b = "x"}\n', "sources[0].fields: rename: two fields are renamed to 'x'"),
    ('[sources.fields]\nselect = ["a", "x"]\nrename = {a = "x"}\n',
     "sources[0].fields: rename: 'a' -> 'x' would overwrite the selected field 'x'"),
    ('[sources.fields]\nselect = ["a"]\nrename = {b = "x"}\n',
     "sources[0].fields: rename: 'b' is not selected, so it is never renamed"),
    ('[sources.fields]\ndrop = ["a"]\nrename = {a = "x"}\n', "sources[0].fields: rename: 'a' is dropped"),
    ('filter = { field = "status", in = ["a"], not_in = ["b"] }\n',
     "sources[0].filter: give exactly one of in and not_in"),
    ('filter = { field = "status" }\n', "sources[0].filter: give exactly one of in and not_in"),
    ('filter = { field = "a..b", in = ["x"] }\n', "sources[0].filter: field: 'a..b' is not a dotted path"),
    ('key = "attributes..sku"\n', "sources[0]: key: 'attributes..sku' is not a dotted path"),
    ('deleted = ".gone"\n', "sources[0]: deleted: '.gone' is not a dotted path"),
    ('key = ["region", "id"]\npagination = "watermark"\n', "sources[0]: key: the watermark (keyset) style pages"),
    ('updated_format = "epoch_ns"\n', "sources[0].updated_format: Invalid enum value 'epoch_ns'"),
    ("reconcile_max_fraction = 0\n", "sources[0]: reconcile_max_fraction must be > 0 and <= 1"),
    ('lookup_url = "http://upstream/api/c"\n', "sources[0]: lookup_url must hold {key}"),
    # Regression: accepted, then every fetcher and the control process crashed building the source's decoder.
    ('key = "meta.id"\nupdated = "meta.id.at"\n', "sources[0]: updated: 'meta.id.at' runs inside key 'meta.id'"),
    ('key = "meta"\nupdated = "meta.updated"\n', "sources[0]: updated: 'meta.updated' runs inside key 'meta'"),
    ('deleted = "updated_at.flag"\n', "sources[0]: deleted: 'updated_at.flag' runs inside updated 'updated_at'"),
    ('key = "a"\nfilter = { field = "a.b", in = ["x"] }\n', "sources[0]: filter.field: 'a.b' runs inside key 'a'"),
])
def test_impossible_shaping_combinations_are_config_errors_naming_the_field(extra: str, words: str) -> None:
    assert words in error(SOURCE + extra)


def test_paths_may_share_objects_and_one_field_may_serve_twice() -> None:
    from conflux.workers.shaping import SourceShape

    config = load(SOURCE + 'key = ["meta.id", "region"]\nupdated = "meta.updated"\ndeleted = "meta.gone"\n'
                           'filter = { field = "region", in = ["eu"] }\n')
    SourceShape(config.sources[0])  # builds its decoder: the config check promised it can
