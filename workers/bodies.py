"""Reading upstream response bodies with a size cap, and the origin rule for where requests may go.

Used in fetcher processes by the upstream client (pages) and the OAuth2 client (token answers). The
session decompresses (gzip, deflate) as the body streams in, in bounded steps (aiohttp >= 3.13.3), so
counting the chunks it yields caps the decompressed size: a gzip bomb stops at the cap instead of
filling memory.
"""

from __future__ import annotations

from typing import NamedTuple

import aiohttp
from yarl import URL

from conflux.errors import UpstreamError

CHUNK_BYTES = 1 << 16


class ResponseTooLarge(UpstreamError):
    """A response body went past its cap; retrying would download the same thing again."""


class OriginRefused(UpstreamError):
    """A next link or redirect leads to an origin the source does not allow."""


async def read_capped(response: aiohttp.ClientResponse, max_bytes: int, *, what: str,
                      truncate: bool = False) -> bytes:
    """The (decompressed) body, read in chunks. Past ``max_bytes``: the first ``max_bytes`` with
    ``truncate``, else ResponseTooLarge naming ``what``."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            if truncate:
                chunks.append(chunk[:len(chunk) - (size - max_bytes)])
                break
            raise ResponseTooLarge(f"{what} is larger than {max_bytes} bytes (max_page_bytes; counted after "
                                   "decompression); refusing to read the rest")
        chunks.append(chunk)
    return b"".join(chunks)


class Origin(NamedTuple):
    """RFC 6454: two URLs are same-origin when scheme, host and port are all equal."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def origin_of(url: URL) -> Origin:
    """The origin of ``url`` as aiohttp will connect to it (yarl parses both), so what is checked is
    what is dialled; ValueError for a URL that is not absolute http(s)."""
    if url.scheme not in ("http", "https") or not url.host or url.port is None:
        raise ValueError(f"not an absolute http(s) URL: {url.scheme}://{url.host or ''}")
    return Origin(url.scheme, url.host.lower(), url.port)


def shown(url: URL) -> str:
    """A URL for an error message: origin and path, without a query that may carry a secret."""
    return str(url.with_query(None).with_fragment(None).with_user(None).with_password(None))
