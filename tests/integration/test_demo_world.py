"""The two demo services agree with each other: what is fetched from the upstream and ingested into the
sink as it was served gives the same checksum on both sides (no Conflux in between)."""

from __future__ import annotations

from datetime import datetime

import msgspec
import requests
from xxhash import xxh3_64_hexdigest

from tests.fixtures.analytics import post_batch

PAGE_SIZE = 500


def _iso(value) -> bool:
    try:
        datetime.fromisoformat(value)
        return True
    except (TypeError, ValueError):
        return False


def test_ingesting_what_was_fetched_gives_equal_checksums(upstream_factory, analytics):
    upstream = upstream_factory(customers=1200, products=700, malformed_rate=0.01)
    for collection, key_field in (("customers", "id"), ("products", "sku")):
        page, batches = 1, 0
        while True:
            body = requests.get(f"{upstream.url}/api/{collection}", params={"page": page, "size": PAGE_SIZE},
                                timeout=10).content
            raws = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
            records = msgspec.json.decode(raws["data"], type=list[msgspec.Raw])
            batch = []
            for raw in records:
                fields = msgspec.json.decode(raw)
                if key_field not in fields or not _iso(fields.get("updated_at")):
                    continue  # malformed: not part of the upstream's checksum either
                batch.append({"source": collection, "key": str(fields[key_field]), "op": "upsert",
                              "updated_at": fields["updated_at"], "hash": xxh3_64_hexdigest(bytes(raw)),
                              "data": raw})  # byte for byte as served
            if batch:
                response = post_batch(analytics.url, f"{collection}-{page}", batch)
                assert response.status_code == 200, response.text
                batches += 1
            if not msgspec.json.decode(raws["has_more"]):
                break
            page += 1
        upstream_sum = requests.get(f"{upstream.url}/api/{collection}/checksum", timeout=10).json()
        sink_sum = requests.get(f"{analytics.url}/stats/{collection}", timeout=10).json()
        assert (sink_sum["checksum"], sink_sum["count"]) == (upstream_sum["checksum"], upstream_sum["count"])
        assert batches > 1
