"""A baseline in the style of the system Conflux replaces, measured in the same run.

What the old system did per record, faithfully but without its 30-60 s timers: producer threads
fetch pages of 100 with `requests` and publish one JSON message per record onto a queue (standing in
for its Kafka topic); consumer threads decode each message, check its id against an idempotency set,
hash the payload (md5 of sorted JSON), merge it into a dict, and post batches of 100 to the sink with
`requests`. Nothing here is tuned; it is the per-record, per-message style the rewrite replaces.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import uuid

import requests
import xxhash

PAGE_SIZE = 100
FLUSH_EVERY = 100
CONSUMERS = 2
_DONE = object()


def _produce(upstream_url: str, name: str, limit: int, out: queue.Queue) -> None:
    with requests.Session() as http:
        page, sent = 1, 0
        while sent < limit:
            body = http.get(f"{upstream_url}/api/{name}", params={"page": page, "size": PAGE_SIZE}, timeout=30).json()
            for record in body["data"][: limit - sent]:
                out.put(json.dumps({"message_id": str(uuid.uuid4()), "source": name, "sync_type": "FULL",
                                    "payload": record}))
                sent += 1
            if not body["has_more"]:
                break
            page += 1


def _consume(sink_url: str, keys: dict[str, str], inbox: queue.Queue, counted: list[int], lock: threading.Lock) -> None:
    processed: set[str] = set()
    merged: dict[tuple[str, str], dict] = {}
    with requests.Session() as http:
        while True:
            message = inbox.get()
            if message is _DONE:
                break
            data = json.loads(message)
            if data["message_id"] in processed:
                continue
            processed.add(data["message_id"])
            payload = data["payload"]
            hashlib.md5(json.dumps(payload, sort_keys=True).encode()).hexdigest()  # the old content hash
            merged[(data["source"], str(payload.get(keys[data["source"]])))] = payload
            if len(merged) >= FLUSH_EVERY:
                _post(http, sink_url, merged)
                with lock:
                    counted[0] += len(merged)
                merged = {}
        if merged:
            _post(http, sink_url, merged)
            with lock:
                counted[0] += len(merged)


def _post(http: requests.Session, sink_url: str, merged: dict) -> None:
    records = []
    for (source, key), payload in merged.items():
        data = json.dumps(payload, separators=(",", ":"))
        records.append({"source": source, "key": key, "op": "upsert", "updated_at": payload["updated_at"],
                        "hash": xxhash.xxh3_64_hexdigest(data.encode()), "data": payload})
    batch_id = str(uuid.uuid4())
    http.post(f"{sink_url}/ingest", data=json.dumps({"batch_id": batch_id, "records": records},
                                                    separators=(",", ":")),
              headers={"Idempotency-Key": batch_id, "Content-Type": "application/json"}, timeout=60)


def measure_baseline(upstream_url: str, sink_url: str, collections: dict[str, str], records: int) -> dict:
    """Records per second of the old style over ``records`` records (split over the collections)."""
    inbox: queue.Queue = queue.Queue(maxsize=10_000)
    counted, lock = [0], threading.Lock()
    share = records // len(collections)
    producers = [threading.Thread(target=_produce, args=(upstream_url, name, share, inbox)) for name in collections]
    consumers = [threading.Thread(target=_consume, args=(sink_url, collections, inbox, counted, lock))
                 for _ in range(CONSUMERS)]
    started = time.perf_counter()
    for thread in producers + consumers:
        thread.start()
    for thread in producers:
        thread.join()
    for _ in consumers:
        inbox.put(_DONE)
    for thread in consumers:
        thread.join()
    elapsed_s = time.perf_counter() - started
    return {"records": counted[0], "seconds": round(elapsed_s, 3), "records_per_s": round(counted[0] / elapsed_s)}
