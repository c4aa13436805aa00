"""Vendor webhook envelopes: where a body keeps its record(s), and whether the event deletes them.

Runs in the control process for every accepted webhook, before the records take the same path as a
fetched page (``RecordSchema.body_records``, columns, dead letters). ``webhook_records_path`` (a dotted
path, "data.object" for Stripe) leads to one record or a list of them; "" means the body itself.
``webhook_delete_when`` reads one field of the envelope ("type" for Stripe, "action" for GitHub) and
turns the event into a delete of the record(s) it carries: each keeps its own key and updated fields,
so a delete is a version ordered like any other.

Members are read level by level as raw bytes (msgspec, in C); only a body nested past msgspec's
recursion limit is walked by ``jsonscan`` instead, so a deep record still reaches the dead-letter queue
with its reason rather than failing the webhook.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Raw

from conflux.config import SourceConfig
from conflux.errors import PageFormatError
from conflux.workers import jsonscan
from conflux.workers.shaping import RecordFilter, split_path

_members = msgspec.json.Decoder(dict[str, Raw])
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)
MISSING = object()


class WebhookEnvelope:
    """One source's envelope rules, built once."""

    def __init__(self, source: SourceConfig) -> None:
        self.records_path = split_path(source.webhook_records_path) if source.webhook_records_path else ()
        when = source.webhook_delete_when
        self.delete_field = split_path(when.field) if when is not None else ()
        self.delete_values = RecordFilter(when.in_, keep_listed=True) if when is not None else None

    @property
    def plain(self) -> bool:
        """The body is the record(s) and no event deletes: nothing to open."""
        return not self.records_path and self.delete_values is None

    def open(self, body: bytes) -> tuple[bytes, bool]:
        """(the JSON of the record or list of records, whether the event deletes them); PageFormatError
        when there is no record or list at the records path."""
        if self.plain:
            return body, False
        if not self.records_path and body.lstrip()[:1] == b"[":
            return body, False  # a list of records is no event: nothing to read a delete field from
        try:
            records, event = _member(body, self.records_path), _member(body, self.delete_field)
        except RecursionError:
            records, event = self._scanned(body)
        return self._records(records), self._deletes(event)

    def _records(self, found: Any) -> bytes:
        where = ".".join(self.records_path)
        if found is MISSING:
            raise PageFormatError(f"the body has no record at webhook_records_path {where!r}")
        records = bytes(found)
        if records.lstrip()[:1] not in (b"{", b"["):
            raise PageFormatError(f"webhook_records_path {where!r} holds {records[:40]!r}, not a record (a JSON "
                                  "object) or a list of records")
        return records

    def _deletes(self, found: Any) -> bool:
        if self.delete_values is None or found is MISSING:
            return False
        try:
            value = msgspec.json.decode(bytes(found))
        except (*_DECODE_ERRORS, RecursionError):
            return False  # an object or list is never one of the listed values
        return self.delete_values.passes(value)

    def _scanned(self, body: bytes) -> tuple[Any, Any]:
        """Both members found by jsonscan, for a body too deep for msgspec."""
        depth = max(len(self.records_path), len(self.delete_field))
        try:
            root = jsonscan.parse(body, depth)
        except ValueError as exc:
            raise PageFormatError(f"body is not JSON: {exc}") from None
        return _scanned_member(body, root, self.records_path), _scanned_member(body, root, self.delete_field)


def _member(body: bytes, path: tuple[str, ...]) -> Any:
    """The raw bytes at ``path`` (the body itself for ()); MISSING when an object on the way is not there
    or not an object, or the value is null. PageFormatError if the body is not JSON."""
    value: Any = Raw(body)
    for name in path:
        if bytes(value).lstrip()[:1] != b"{":
            return MISSING
        try:
            value = _members.decode(value).get(name, MISSING)
        except _DECODE_ERRORS as exc:
            raise PageFormatError(f"body is not JSON: {exc}") from None
        if value is MISSING:
            return MISSING
    return MISSING if bytes(value).strip() == b"null" else value


def _scanned_member(body: bytes, root: jsonscan.Node, path: tuple[str, ...]) -> Any:
    node: jsonscan.Node | None = root
    for name in path:
        node = node.member(name) if node is not None and node.kind == b"{" else None
    if node is None or body[node.start:node.end].strip() == b"null":
        return MISSING
    return Raw(body[node.start:node.end])
