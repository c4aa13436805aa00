"""How a source's page requests go out: GET with query parameters, or POST with a body built from the
source's ``body`` table, and a child source's url with its parent's fields filled in.

Runs in fetcher processes, for every page request. A paginator names each request's parameters as the
API does (``page``, ``size``, ``cursor``, ...: the source's ``[sources.pagination]`` names, or a plugin's
own); here each is also known by its role, the placeholder a body uses: ``{updated_since}``, ``{cursor}``,
``{page}``, ``{offset}``, ``{limit}`` and ``{after_key}``, or ``{NAME}`` by its own name. With
``method = "POST"`` a parameter that a placeholder of the body stands for goes into the body only; the
others stay in the query string. A body value that is exactly one placeholder takes the value's type
(page, offset and limit are numbers, so is updated_since in an epoch format, a parent's field keeps its
JSON type); within longer text it is text. A member whose placeholder has no value in this request (the
cursor of the first page, updated_since in a full sync) is left out of the body.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode

import msgspec

from conflux.config import SourceConfig

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*|parent\.[^{}]+)\}")
NUMERIC_ROLES = frozenset({"page", "offset", "limit"})
CONTENT_TYPES = {"json": "application/json", "form": "application/x-www-form-urlencoded"}
_MISSING = object()
_encode = msgspec.json.encode


class Outgoing(NamedTuple):
    """One request as it is sent: method, query parameters, and body with its content type."""

    method: str = "GET"
    params: dict[str, str] | None = None
    body: bytes | None = None
    content_type: str = ""


class PageRequests:
    """A source's request template, built once per source in the fetcher."""

    def __init__(self, source: SourceConfig) -> None:
        fields = source.pagination_options
        self.method = source.method
        self.body = source.body
        self.body_type = source.body_type
        # A parameter's role by its name; limit has two names (size for page numbers, limit otherwise).
        self.roles = {fields.updated_since_param: "updated_since", fields.cursor_param: "cursor",
                      fields.page_param: "page", fields.size_param: "limit", fields.offset_param: "offset",
                      fields.limit_param: "limit", fields.after_key_param: "after_key"}
        self.in_body = {match for text in _strings(self.body) for match in PLACEHOLDER.findall(text)}
        epoch = source.updated_since_format.startswith("epoch") or (
            source.updated_since_format == "native" and source.updated_format.startswith("epoch"))
        self.numeric = NUMERIC_ROLES | ({"updated_since"} if epoch else set())

    def outgoing(self, params: dict[str, str], parent: dict[str, Any] | None = None) -> Outgoing:
        """The request for a page asked for with ``params``; ``parent``: the fields of a child's parent."""
        if self.method == "GET":
            return Outgoing("GET", params)
        values: dict[str, Any] = {f"parent.{path}": value for path, value in (parent or {}).items()}
        query: dict[str, str] = {}
        for name, value in params.items():
            role = self.roles.get(name)
            values[name] = value
            if role is not None:
                values[role] = int(value) if role in self.numeric and _integer(value) else value
            if name not in self.in_body and role not in self.in_body:
                query[name] = value
        body = _render(self.body, values)
        if self.body_type == "form":
            encoded = urlencode([(key, _form_text(item)) for key, value in body.items()
                                 for item in (value if isinstance(value, list) else [value])]).encode()
        else:
            encoded = _encode(body)
        return Outgoing("POST", query, encoded, CONTENT_TYPES[self.body_type])


def render_url(template: str, parent: dict[str, Any]) -> str | None:
    """A child's url with each {parent.PATH} replaced by that field of the parent record (URL-quoted);
    None when the parent record lacks one (or it is null, an object or a list)."""
    missing = False

    def fill(match: re.Match) -> str:
        nonlocal missing
        value = parent.get(match.group(1)[len("parent."):]) if match.group(1).startswith("parent.") else _MISSING
        if value is _MISSING:
            return match.group(0)
        if value is None or isinstance(value, dict | list):
            missing = True
            return ""
        return quote(_form_text(value), safe="")

    url = PLACEHOLDER.sub(fill, template)
    return None if missing else url


def _render(value: Any, values: dict[str, Any]) -> Any:
    """``value`` (a body table, list or string) with its placeholders filled; _MISSING when a placeholder
    of it has no value (its member is then left out)."""
    if isinstance(value, dict):
        rendered = {key: _render(item, values) for key, item in value.items()}
        return {key: item for key, item in rendered.items() if item is not _MISSING}
    if isinstance(value, list):
        return [item for item in (_render(item, values) for item in value) if item is not _MISSING]
    if not isinstance(value, str):
        return value
    whole = PLACEHOLDER.fullmatch(value)
    if whole is not None and _known(whole.group(1), values):
        return values.get(whole.group(1), _MISSING)
    missing = False

    def fill(match: re.Match) -> str:
        nonlocal missing
        name = match.group(1)
        if not _known(name, values):
            return match.group(0)   # not a placeholder of ours: literal text, such as a query language's braces
        if name not in values:
            missing = True
            return ""
        return _form_text(values[name])

    text = PLACEHOLDER.sub(fill, value)
    return _MISSING if missing else text


def _known(name: str, values: dict[str, Any]) -> bool:
    """Whether ``{name}`` is a placeholder: a role, a parent field, or a parameter of this request."""
    return name in ROLES or name.startswith("parent.") or name in values


ROLES = frozenset({"updated_since", "cursor", "page", "offset", "limit", "after_key"})


def _integer(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _form_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return []
