"""`conflux upstream`: the demo CRM and inventory APIs that Conflux pages through.

Users run it to try Conflux; every test and benchmark runs against it. On start it generates its
data (deterministic in --seed), then prints `conflux-upstream listening on http://HOST:PORT`.
SIGTERM or SIGINT stops it (exit 0); a port it cannot listen on exits 1.

API REFERENCE

Collections: customers (key `id`, integer), products (key `sku`, "SKU-000001"), and with
--systems K: orders, shipments, payments, analytics, crm_events, erp_updates, warehouse, supplier,
marketing, support_tickets, system_11, system_12, ... (key `id`, "ord-000001"). Every record has
`updated_at` (ISO 8601 UTC, e.g. 2026-01-05T10:11:12Z). Records are always ordered by
(updated_at, key). Every style accepts `updated_since` (ISO 8601, inclusive: updated_at >= it).
--timestamp-format epoch_s|epoch_ms|epoch_us makes `updated_at` an integer of seconds, ms or us
since the epoch (and `updated_since` may then be such a number); --layout nested moves the key,
`updated_at` and `deleted` into a "meta" object ({"meta": {"id": 7, "updated_at": ...}, "name": ...});
request bodies stay flat, and "meta" in one is refused.
Page sizes (`size`, `limit`) default to 100 and may be at most 1000.

  GET /api/{c}?page=1&size=100[&updated_since=T]                       (page style)
      -> {"data": [...], "page": n, "size": s, "total": t, "has_more": b}
  GET /api/{c}/offset?offset=0&limit=100[&updated_since=T]             (offset style)
      -> {"data": [...], "offset": o, "limit": l, "total": t, "has_more": b}
  GET /api/{c}/cursor?limit=100[&cursor=C][&updated_since=T]           (cursor style)
      -> {"data": [...], "next_cursor": "C" | null}; C is opaque and encodes the keyset position
         (updated_at, key) of the last record, so it stays correct while records change
  GET /api/{c}/link?page=1&size=100[&updated_since=T]                  (link style)
      -> {"data": [...]} plus `Link: <absolute next URL>; rel="next"` unless on the last page
  GET /api/{c}/keyset?updated_since=W&limit=100[&after_key=K]          (keyset by watermark)
      -> {"data": [...], "has_more": b}; without after_key: updated_at >= W; with it:
         (updated_at, key) > (W, K). Advance W and K to the last record of each page.
  GET /api/{c}/next?limit=100[&cursor=C][&updated_since=T]             (next URL in the body)
      -> {"data": [...], "links": {"next": "?limit=100&cursor=C" | null}}: JSON:API style; the
         link is relative to the request (absolute on --next-link-origin's origin)
  GET /api/{c}/header-cursor?limit=100[&cursor=C][&updated_since=T]    (cursor in a header)
      -> [...] (the body is the bare list) and `X-Next-Cursor: C` unless on the last page
  GET /api/{c}/skip-take?skip=0&take=100[&updated_since=T]             (the example plugin's API)
      -> [...] (the bare list) and `X-Total-Count: t` (records at or after updated_since)
  GET /api/{c}/checksum -> {"collection": c, "checksum": "<16 hex>", "count": n} (live valid records:
      neither malformed nor deleted); with ?canonical=true over each record as canonical JSON (members
      sorted, no whitespace: demo/checksum.py), for a sink that stores parsed JSON (PostgreSQL's jsonb)
  GET /api/{c}/checksum?parent=P[&stamp=F] -> the checksum of the live records of c whose parent
      record in P is live (what a child source of P holds); with stamp=F, of each record with the
      parent's key added as field F when it lacks one (as Conflux forwards it)
  GET /api/{c}/{key}     -> 200 + the record (a soft-deleted one with "deleted": true); 404 when the
      key is unknown or hard-deleted
  POST /api/{c}          body: JSON object; the key is assigned if absent -> 201 + the record; naming
      a hard-deleted key creates it anew (409 for a key that is listed, soft-deleted ones included)
  PUT /api/{c}/{key}     body: JSON object merged into the record -> 200 + the record; 404 if unknown.
      A PUT of a deleted key (soft or hard) restores it: the record without "deleted", plus the body.
  DELETE /api/{c}/{key}[?style=soft|hard] -> 200 + the deleted record, "deleted": true; without
      style, as --delete-style says. 404 if unknown, 410 if deleted already (a soft-deleted record
      can still be deleted hard: it then leaves the listings), 409 for a malformed record.
      Each stamps updated_at = now (never before the newest stamp) and moves the record to the end.
      Many changes share a second, so a change can sort just before a cursor or watermark that
      sits in that same last second; that is why updated_since is inclusive: an incremental
      sync should start from its last watermark, not after it.
  GET /health -> {"status": "ok"}
  GET /stats[?timestamps=1] -> per collection: records (listed), valid (live valid records, as in
      the checksum), malformed, live (listed, not soft-deleted), deleted, soft_deleted,
      hard_deleted, requests per kind, status codes, max_in_flight; with timestamps=1 the arrival
      times (unix seconds) of the last 100000 page requests, and in throttled_at when each injected
      429 was answered. Also changes (api, background), deletes (api, background, soft, hard),
      webhook counters and auth counters.
  GET /admin/faults, POST /admin/faults -> latency_ms, latency_jitter_ms, error_rate,
      throttle_rate, retry_after_s, empty_pages (every page an empty last page, as an upstream that
      briefly lists nothing; also --empty-pages), change_rate_per_s, delete_rate_per_s, delete_style
      (settable) and malformed_rate (fixed at start)
  GET /admin/change-rate, POST /admin/change-rate {"change_rate_per_s": R}
  GET /admin/delete-rate, POST /admin/delete-rate {"delete_rate_per_s": R, "delete_style": S}
  GET /admin/malformed -> {c: [{"key": k, "reason": "missing_key" | "bad_updated_at", "record": {...}}]}

API shapes (for the shapes of "Connecting your API" in the README):
  POST /api/{c}/search[/{style}]  the page of `style` (page by default; any style above by its path
      name: offset, cursor, link, keyset, next, header-cursor, skip-take) whose parameters come in
      the body: a JSON object (members of nested objects count by their own names, null is absent)
      or a form; body values win over the query string's. /stats counts them as "search:{style}".
  GET /api/{p}/{key}/{child}[/{style}]  the children of one parent record, paged by `style` (page
      by default): orders, support_tickets and crm_events of a customer (their customer_id),
      shipments and payments of an order (order_id), warehouse rows of a product (sku). 404 for an
      unknown or hard-deleted parent (a soft-deleted one still lists its children); /stats counts
      them under the child collection as "child:{style}".
  --records-path PATH  where the records are in every body with paging fields: "data" (default),
      a dotted path such as "result.items" (nested objects; the paging fields stay at the top),
      or "" for the bare list (the paging fields are then left out).
  --updated-since-format iso8601|epoch_s|epoch_ms  what updated_since values are: ISO 8601 text
      (default), or seconds or milliseconds since the epoch (a number; 400 for anything else).

Errors are JSON {"error": "<parameter>: <problem>"}: 400 for a bad parameter, cursor or body, 404
for an unknown collection or key, 409 for a duplicate key or a change to a malformed record, and
the injected 429 (with Retry-After) and 500. Page faults apply to GET page requests of every style.

Deletes (--delete-rate R, --delete-style soft|hard|mixed, and DELETE above): R random live records
a second are deleted in the background (chosen by --seed). A delete is a version: the record gets
"deleted": true and a new updated_at. Soft: it stays in every listing, sorted as the newest change,
so an incremental sync sees it. Hard: it leaves every listing of every style and GET /api/{c}/{key}
answers 404. Mixed: each background delete is soft or hard with even odds. Deleted records never
count in the checksum, and background changes and deletes only pick live records, so a deleted
record comes back only by a PUT (or a POST of a hard-deleted key).

Webhooks (--webhook-url U --webhook-secret S): every change and delete (API or background) is
POSTed to U (a delete's body is the record with "deleted": true and its new updated_at, hard
deletes included: the webhook is their only sign besides their absence),
`{collection}` in U replaced by the collection name; the body is the record's JSON,
`X-Conflux-Timestamp: <unix seconds>` and `X-Conflux-Signature: sha256=<hex HMAC-SHA256 with S of
"<timestamp>." + the body>`. Deliveries are queued (bounded),
retried a few times and may arrive out of order; failures are counted in /stats. When changes
queue up, up to --webhook-batch of one collection go in one POST whose body is a JSON list.
Vendor styles (--webhook-style): github signs `X-Hub-Signature-256: sha256=<hex HMAC of the body>`
(plus X-GitHub-Event and a fresh X-GitHub-Delivery); stripe signs `Stripe-Signature:
t=<unix seconds>,v1=<hex HMAC of "<t>." + the body>`; hmac signs `<--webhook-hmac-header>:
<--webhook-hmac-prefix><hex or base64 (--webhook-hmac-encoding) HMAC of the body>`. Envelopes
(--webhook-envelope): stripe sends each change alone as {"id": "evt_...", "object": "event",
"type": "customer.updated" | "customer.deleted", "created": T, "data": {"object": RECORD}}; github as
{"action": "edited" | "deleted", "customer": RECORD, "sender": {...}} (the collection's singular
name: customer, product, order, ...).

Malformed records (--malformed-rate F): that fraction of each collection, chosen by the seed; half
lack the key field, half have an unparseable updated_at. They are served in pages, never count in
the checksum, cannot be changed, and are listed by GET /admin/malformed.

Credentials (--require-token T, and/or --client-secret S): every /api request must then carry one
of these, or it is answered 401 {"error": "credentials: missing|invalid|expired"} with a
WWW-Authenticate challenge (Bearer and Basic, RFC 6750 error="invalid_token" when one was sent):
  Authorization: Bearer T
  X-API-Key: T                       (the header named by --api-key-header)
  Authorization: Basic base64(U:T)   (U must equal --basic-user when that is given; any U otherwise)
  Authorization: Bearer A            (A issued by POST /oauth/token less than --token-ttl-s ago)
  POST /oauth/token  form grant_type=client_credentials&client_id=I&client_secret=S[&scope=X]
      (or the client as HTTP Basic) -> {"access_token": A, "token_type": "Bearer", "expires_in": N
      [, "scope": X]}; 401 {"error": "invalid_client"} for a wrong id or secret, 400
      {"error": "unsupported_grant_type"}, 404 without --client-secret. I is --client-id.
  GET /admin/auth, POST /admin/auth {"require_token", "client_secret", "token_ttl_s",
      "basic_user", "api_key_header", "revoke_tokens": true} -> rotate credentials, expire every
      issued token. /admin, /stats and /health never need credentials; secrets are never shown.
  /stats has "auth": token_requests, tokens_issued, token_refused, tokens_active, and requests
  accepted per credential (bearer, api_key, basic, oauth2) and rejected per reason.

Request headers (--count-header NAME, repeatable): /stats counts the values of that header on each
collection's page requests, so a client's static headers can be checked at the server. /stats also
shows max_in_flight: the most page requests of a collection the server was handling at once.

TLS (--tls-cert FILE --tls-key FILE): serve https instead of http with that certificate chain
(PEM) and key; the announced URL then starts with https://.

A hostile or buggy upstream (for tests of what Conflux refuses; all off by default):
  --next-link-origin O     link style: next links point at origin O (same path and query)
  --redirect-pages-to O    every page request is answered 302 to O + the same path and query
  --redirect-token-to O    POST /oauth/token is answered 307 (method and body kept) to O/oauth/token
  --set-cookie             every answer sets a demo_session cookie
  --loop-after-pages N     cursor style: from page N on, next_cursor points back to page 2; link
                           style: from page N on, the next link points back to page 1
  --pad-pages-mib M        M MiB of whitespace after every page body (still valid JSON)
  --gzip-pages             pages are sent gzip-compressed; with padding, a gzip bomb
  --deep-records N         N records per collection carry a member nested --deep-record-depth
                           levels deep (default 3000); listed in /admin/malformed as too_deep
  --future-records N       N records per collection are stamped 2999-01-01T00:00:00Z; listed as
                           future_updated_at (they keep their place in the order)
  --record-requests        keep every request (method, path and query, headers, body): GET
                           /admin/requests -> {"recording": b, "requests": [...]}; a second upstream
                           started with it plays "the foreign origin" and shows what reached it
GET /admin/malformed?records=0 lists keys and reasons without the records themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterator

import uvloop

from conflux.demo.datagen import HostileRecords
from conflux.demo.faults import FaultInjector, FaultSettings
from conflux.demo.record_layout import LAYOUTS, TIMESTAMP_FORMATS, RecordLayout, layout_problem
from conflux.demo.store import build_collections
from conflux.demo.upstream_app import UpstreamApp, bind, serve, url_of
from conflux.demo.upstream_auth import AuthGate, AuthSettings
from conflux.demo.upstream_hostile import HostileSettings
from conflux.demo.upstream_shapes import SINCE_FORMATS
from conflux.demo.upstream_time import PRECISION_UNIT_US
from conflux.demo.upstream_webhooks import ENVELOPES, SIGNATURE_STYLES, WebhookSender, WebhookStyle

EXIT_OK = 0
EXIT_CANNOT_LISTEN = 1
EXIT_BAD_OPTIONS = 2


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _non_negative(kind: type) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if not 0 <= value < math.inf:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _records_path(text: str) -> str:
    if text and any(not part for part in text.split(".")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a dotted path of field names (an empty name)")
    return text


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__[__doc__.index("API REFERENCE"):]
    count, number = _non_negative(int), _non_negative(float)
    serving = parser.add_argument_group("serving")
    serving.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    serving.add_argument("--port", type=count, default=8081, help="0 picks a free port (default %(default)s)")
    data = parser.add_argument_group("data")
    data.add_argument("--seed", type=int, default=1, help="seed of the data, faults and changes (default 1)")
    data.add_argument("--customers", type=count, default=5000, help="customer records (default 5000)")
    data.add_argument("--products", type=count, default=5000, help="product records (default 5000)")
    data.add_argument("--systems", type=count, default=0, help="extra collections: orders, ... (default 0)")
    data.add_argument("--records-per-system", type=count, default=1000, help="records each (default 1000)")
    data.add_argument("--timestamp-precision", choices=sorted(PRECISION_UNIT_US), default="s",
                      help="precision of updated_at (default s)")
    data.add_argument("--timestamp-format", choices=TIMESTAMP_FORMATS, default="iso8601",
                      help="updated_at as ISO 8601 text, or an integer of seconds/ms/us since the epoch "
                           "(default %(default)s)")
    data.add_argument("--layout", choices=LAYOUTS, default="flat",
                      help="flat: key and updated_at at the top level; nested: in a \"meta\" object, with "
                           "\"deleted\" (default %(default)s)")
    shapes = parser.add_argument_group("API shapes (see API shapes below)")
    shapes.add_argument("--records-path", type=_records_path, default="data", metavar="PATH",
                        help='where the records are in a body: a dotted path, or "" for the bare list (default data)')
    shapes.add_argument("--updated-since-format", choices=SINCE_FORMATS, default="iso8601",
                        help="what updated_since values are (default %(default)s)")
    changes = parser.add_argument_group("changes and webhooks")
    changes.add_argument("--change-rate", type=number, default=0.0, metavar="PER_S",
                         help="random record updates per second in the background (default 0)")
    changes.add_argument("--delete-rate", type=number, default=0.0, metavar="PER_S",
                         help="random live records deleted per second in the background (default 0)")
    changes.add_argument("--delete-style", choices=("soft", "hard", "mixed"), default="soft",
                         help="soft: listed with \"deleted\": true; hard: gone from listings; mixed: either, "
                              "at random (default %(default)s)")
    changes.add_argument("--webhook-url", help="POST every change and delete here; {collection} is replaced")
    changes.add_argument("--webhook-secret", help="HMAC-SHA256 key of X-Conflux-Signature (over timestamp and body)")
    changes.add_argument("--webhook-batch", type=int, default=100, metavar="N",
                         help="when changes queue up, send up to N of one collection in one POST as a JSON "
                              "list (default %(default)s; 1 sends every change alone)")
    changes.add_argument("--webhook-style", choices=SIGNATURE_STYLES, default="conflux",
                         help="how deliveries are signed (default %(default)s; see Webhooks below)")
    changes.add_argument("--webhook-envelope", choices=ENVELOPES, default="none",
                         help="wrap each change as a vendor's event (default %(default)s: the record itself)")
    changes.add_argument("--webhook-hmac-header", default="X-Signature", metavar="NAME",
                         help="--webhook-style hmac: the signature's header (default %(default)s)")
    changes.add_argument("--webhook-hmac-prefix", default="sha256=", metavar="TEXT",
                         help="--webhook-style hmac: text before the digest (default %(default)s)")
    changes.add_argument("--webhook-hmac-encoding", choices=("hex", "base64"), default="hex",
                         help="--webhook-style hmac: how the digest is written (default %(default)s)")
    faults = parser.add_argument_group("fault injection (page requests; see also POST /admin/faults)")
    faults.add_argument("--latency-ms", type=number, default=0.0, help="added to every page response")
    faults.add_argument("--latency-jitter-ms", type=number, default=0.0, help="plus uniform 0..N ms more")
    faults.add_argument("--error-rate", type=_fraction, default=0.0, help="fraction of pages answered 500")
    faults.add_argument("--throttle-rate", type=_fraction, default=0.0, help="fraction answered 429")
    faults.add_argument("--retry-after-s", type=count, default=1, help="Retry-After of a 429 (default 1)")
    faults.add_argument("--empty-pages", action="store_true",
                        help="every page is an empty last page, as if nothing were listed (see /admin/faults)")
    faults.add_argument("--malformed-rate", type=_fraction, default=0.0,
                        help="fraction of records generated malformed (no key / bad updated_at)")
    faults.add_argument("--count-header", action="append", default=[], metavar="NAME",
                        help="count the values of this request header in /stats (repeatable)")
    auth = parser.add_argument_group("credentials (see Credentials below)")
    auth.add_argument("--require-token", metavar="T", default="",
                      help="every /api request needs T as a bearer token, API key or basic password")
    auth.add_argument("--api-key-header", metavar="NAME", default="X-API-Key",
                      help="header that may carry T (default %(default)s)")
    auth.add_argument("--basic-user", metavar="U", default="", help="the only user accepted with basic auth")
    auth.add_argument("--client-id", metavar="I", default="conflux",
                      help="client id of POST /oauth/token (default %(default)s)")
    auth.add_argument("--client-secret", metavar="S", default="",
                      help="enables POST /oauth/token (client credentials); /api then needs credentials")
    auth.add_argument("--token-ttl-s", type=_positive, default=3600.0, metavar="SECONDS",
                      help="lifetime of issued access tokens (default 3600)")
    hostile = parser.add_argument_group("a hostile or buggy upstream (see the reference below)")
    hostile.add_argument("--next-link-origin", metavar="ORIGIN", default="", help="next links lead to ORIGIN")
    hostile.add_argument("--redirect-pages-to", metavar="ORIGIN", default="", help="302 every page to ORIGIN")
    hostile.add_argument("--redirect-token-to", metavar="ORIGIN", default="", help="307 /oauth/token to ORIGIN")
    hostile.add_argument("--set-cookie", action="store_true", help="every answer sets a cookie")
    hostile.add_argument("--loop-after-pages", type=count, default=0, metavar="N",
                         help="cursor and link styles loop back after N pages")
    hostile.add_argument("--pad-pages-mib", type=number, default=0.0, metavar="M",
                         help="M MiB of whitespace after every page")
    hostile.add_argument("--gzip-pages", action="store_true", help="send pages gzip-compressed")
    hostile.add_argument("--deep-records", type=count, default=0, metavar="N",
                         help="N records per collection nested --deep-record-depth levels deep")
    hostile.add_argument("--deep-record-depth", type=count, default=3000, metavar="LEVELS")
    hostile.add_argument("--future-records", type=count, default=0, metavar="N",
                         help="N records per collection stamped in the year 2999")
    hostile.add_argument("--record-requests", action="store_true", help="keep every request for /admin/requests")
    tls = parser.add_argument_group("tls")
    tls.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve https (with --tls-key)")
    tls.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")


def run(args: argparse.Namespace) -> int:
    """Generate the data, then serve until SIGTERM/SIGINT. Runs in the `conflux upstream` process."""
    if bool(args.webhook_url) != bool(args.webhook_secret):
        print("conflux upstream: --webhook-url and --webhook-secret go together", file=sys.stderr)
        return EXIT_BAD_OPTIONS
    problem = layout_problem(args.timestamp_precision, args.timestamp_format)
    if problem:
        print(f"conflux upstream: --timestamp-format, --timestamp-precision: {problem}", file=sys.stderr)
        return EXIT_BAD_OPTIONS
    try:
        ssl_context = _tls_context(args.tls_cert, args.tls_key)
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"conflux upstream: {exc}", file=sys.stderr)
        return EXIT_BAD_OPTIONS
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        print(f"conflux upstream: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    with _signals_recorded() as received:
        app = _build_app(args)
    if received:  # asked to stop while generating: nothing to drain
        sock.close()
        return EXIT_OK
    url = url_of(sock, args.host, scheme="https" if ssl_context else "http")
    uvloop.run(serve(app.build(), sock, announce=f"conflux-upstream listening on {url}", ssl_context=ssl_context))
    return EXIT_OK


def _tls_context(cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise ValueError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


@contextlib.contextmanager
def _signals_recorded() -> Iterator[list[int]]:
    """Record SIGTERM/SIGINT while the data is generated (before the event loop owns them)."""
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: received.append(signum))
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _build_app(args: argparse.Namespace) -> UpstreamApp:
    started = time.perf_counter()
    # The records live until exit: collecting while they are built costs ~10% of start-up for
    # nothing, and freezing them keeps later full collections from walking them again.
    gc.disable()
    collections = build_collections(seed=args.seed, precision=args.timestamp_precision,
                                    malformed_rate=args.malformed_rate, customers=args.customers,
                                    products=args.products, systems=args.systems,
                                    records_per_system=args.records_per_system,
                                    hostile=HostileRecords(deep=args.deep_records, depth=args.deep_record_depth,
                                                           future=args.future_records),
                                    layout=RecordLayout(precision=args.timestamp_precision,
                                                        timestamp_format=args.timestamp_format,
                                                        nested=args.layout == "nested"))
    gc.freeze()
    gc.enable()
    total = sum(len(collection) for collection in collections.values())
    print(f"conflux-upstream generated {total} records in {len(collections)} collections "
          f"in {time.perf_counter() - started:.2f}s", flush=True)
    faults = FaultSettings(latency_ms=args.latency_ms, latency_jitter_ms=args.latency_jitter_ms,
                           error_rate=args.error_rate, throttle_rate=args.throttle_rate,
                           retry_after_s=args.retry_after_s, empty_pages=args.empty_pages)
    webhooks = None
    if args.webhook_url:
        style = WebhookStyle(signature=args.webhook_style, envelope=args.webhook_envelope,
                             hmac_header=args.webhook_hmac_header, hmac_prefix=args.webhook_hmac_prefix,
                             hmac_encoding=args.webhook_hmac_encoding)
        webhooks = WebhookSender(url_template=args.webhook_url, secret=args.webhook_secret,
                                 max_batch=args.webhook_batch, style=style)
    auth = AuthSettings(require_token=args.require_token, api_key_header=args.api_key_header,
                        basic_user=args.basic_user, client_id=args.client_id,
                        client_secret=args.client_secret, token_ttl_s=args.token_ttl_s)
    return UpstreamApp(collections=collections, faults=FaultInjector(faults, seed=args.seed),
                       seed=args.seed, change_rate_per_s=args.change_rate,
                       malformed_rate=args.malformed_rate, webhooks=webhooks, auth=AuthGate(auth),
                       count_headers=tuple(args.count_header), hostile=_hostile_settings(args),
                       delete_rate_per_s=args.delete_rate, delete_style=args.delete_style,
                       records_path=tuple(args.records_path.split(".")) if args.records_path else (),
                       since_format=args.updated_since_format)


def _hostile_settings(args: argparse.Namespace) -> HostileSettings:
    return HostileSettings(next_link_origin=args.next_link_origin.rstrip("/"),
                           redirect_pages_to=args.redirect_pages_to.rstrip("/"),
                           redirect_token_to=args.redirect_token_to.rstrip("/"), set_cookie=args.set_cookie,
                           loop_after_pages=args.loop_after_pages, pad_pages_mib=args.pad_pages_mib,
                           gzip_pages=args.gzip_pages, record_requests=args.record_requests)
