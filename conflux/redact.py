"""Redaction of secret-bearing text: one set of rules for logs, /status, `conflux config check` and dead letters.

Pure functions, used in every process: the log formatters run each line through ``redact_text``,
the status builder its free-text fields, ``config.redacted`` the effective config, and the dead-letter
builders their ``origin``. Rules by form:

- URLs: the userinfo (``user:pass@``) and the value of every query parameter with a secret-looking name;
- headers: Authorization, Proxy-Authorization, Cookie, Set-Cookie and any name containing key, token,
  secret, signature, password, auth, credential or session;
- librdkafka settings: ``ssl.*.pem``, ``ssl.key.*``, ``sasl.password``, ``sasl.oauthbearer.*`` and any
  name with password or secret (a ``*_env``/``*_file`` key names where the secret is, and stays);
- free text: URLs as above, ``name: value`` and ``name=value`` pairs with secret names, PEM blocks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

MASK = "***"

# Matched anywhere in a lower-cased name: "X-Api-Key", "access_token", "client_secret", "X-Amz-Signature".
_SECRET_PARTS = ("key", "token", "secret", "passw", "signature", "auth", "credential", "session", "cookie",
                 "jwt", "private")
# Too short or too common to match inside words ("design", "zipcode"): only as a whole word of the name.
_SECRET_WORDS = frozenset({"sig", "code", "pwd", "pw", "pass", "otp", "hmac", "apikey"})
_WORD = re.compile(r"[a-z0-9]+")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_KAFKA_SECRET = re.compile(r"ssl\..*\.pem|ssl\.key\..*|sasl\.password|sasl\.oauthbearer\..*|.*(password|secret).*")

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`\\]+")
# `Authorization: Bearer abc`, `'Cookie': 'a=b; c=d'`, `"X-Api-Key"="v"`: a secret name, then its value.
_QUOTED_PAIR = re.compile(r"""(?P<q>['"])(?P<name>[\w.-]+)(?P=q)(?P<sep>\s*[:=]\s*)(?P<vq>['"])(?P<value>.*?)(?P=vq)""")
# A header line, `Name: value` at a line's or a word's start; _masked_header keeps only hyphenated
# names (X-Api-Key) and the two standard single-word ones, so "token_env: ..." in an error stays.
_HEADER_LINE = re.compile(r"(?<![^\s{,(])(?P<name>[A-Za-z0-9-]+)(?P<sep>:[ \t]*)(?P<value>[^\r\n]*)")
_HEADER_WORDS = frozenset({"authorization", "cookie"})
_ASSIGNMENT = re.compile(r"(?<![\w.-])(?P<name>[A-Za-z_][\w.-]*)(?P<sep>=)(?P<value>[^\s&;,'\"#]+)")
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|$)", re.DOTALL)
_AUTH_SCHEME = re.compile(r"(?i)^(bearer|basic|digest|token|negotiate|hmac[\w-]*)\s+")


def secret_name(name: str) -> bool:
    """Does a header, query parameter or field of this name carry a secret? ``*_env`` and ``*_file``
    name where a secret is kept (``token_env = "CRM_TOKEN"``), not the secret."""
    lowered = name.lower()
    if lowered.endswith(("_env", "_file")):
        return False
    if any(part in lowered for part in _SECRET_PARTS):
        return True
    return not _SECRET_WORDS.isdisjoint(_WORD.findall(_CAMEL.sub(r"\1_\2", name).lower()))


def kafka_secret_key(name: str) -> bool:
    """Is this librdkafka setting a secret? ``sasl.password_env`` names a variable and is not."""
    lowered = name.lower()
    if lowered.endswith(("_env", "_file")):
        return False
    return _KAFKA_SECRET.fullmatch(lowered) is not None


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: MASK if value and secret_name(name) else value for name, value in headers.items()}


def redact_url(url: str) -> str:
    """``https://u:p@host/x?api_key=k&page=2`` -> ``https://***@host/x?api_key=***&page=2``; the rest unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: still a string that may hold secrets
        return _redact_pairs(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, _redact_query(parts.query), _redact_query(parts.fragment)))


def url_secrets(url: str) -> list[str]:
    """The secret parts of a URL as they would appear in text: its userinfo and secret query values."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    userinfo = parts.netloc.rpartition("@")[0]
    # A user name alone ("conflux@") is no secret and may be a common word; a token in its place is long.
    found = [userinfo] if ":" in userinfo or len(userinfo) >= 16 else []
    if parts.password:
        found += [parts.password, unquote(parts.password)]
    for pair in re.split(r"[&;]", f"{parts.query}&{parts.fragment}"):
        name, sep, value = pair.partition("=")
        if sep and value and secret_name(unquote_plus(name)):
            found += [value, unquote_plus(value)]
    return [value for value in found if value]


def _redact_query(query: str) -> str:
    """Each ``name=value`` pair keeps its bytes unless the name is secret: no re-encoding of the rest."""
    if not query:
        return query
    pieces = []
    for pair in re.split(r"([&;])", query):
        name, sep, value = pair.partition("=")
        pieces.append(f"{name}={MASK}" if sep and value and secret_name(unquote_plus(name)) else pair)
    return "".join(pieces)


def redact_text(text: str) -> str:
    """Free text (a log line, an error message, a dead letter's origin) with every secret form masked."""
    if not text:
        return text
    if "-----BEGIN" in text:
        text = _PEM.sub(MASK, text)
    if "://" in text:
        text = _URL.sub(lambda match: redact_url(match.group(0)), text)
    return _redact_pairs(text)


def _redact_pairs(text: str) -> str:
    if "'" in text or '"' in text:
        text = _QUOTED_PAIR.sub(_masked_pair, text)
    if ":" in text:
        text = _HEADER_LINE.sub(_masked_header, text)
    if "=" in text:
        text = _ASSIGNMENT.sub(_masked_assignment, text)
    return text


def _masked_pair(match: re.Match) -> str:
    if not match["value"] or match["value"] == MASK or not secret_name(match["name"]):
        return match.group(0)
    return f"{match['q']}{match['name']}{match['q']}{match['sep']}{match['vq']}{MASK}{match['vq']}"


def _masked_header(match: re.Match) -> str:
    """``Authorization: Bearer x`` keeps its scheme (useful, and not secret) and loses the rest."""
    name, value = match["name"], match["value"].strip()
    if "-" not in name and name.lower() not in _HEADER_WORDS:
        return match.group(0)
    if not value or value.startswith(MASK) or value[0] in "'\"" or not secret_name(name):
        return match.group(0)
    scheme = _AUTH_SCHEME.match(value)
    return f"{match['name']}{match['sep']}{scheme.group(0) if scheme else ''}{MASK}"


def _masked_assignment(match: re.Match) -> str:
    if match["value"].startswith(MASK) or not secret_name(match["name"]):
        return match.group(0)
    return f"{match['name']}={MASK}"
