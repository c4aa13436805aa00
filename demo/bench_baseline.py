"""A baseline in the style of the system Conflux replaces, measured in the same run.

What the old system did per record, faithfully but without its 30-60 s timers: producer threads
fetch pages of 100 with `requests` and publish one JSON message per record to a durable log,
committing each message as it goes (as a producer waiting for acks=all on every send does);
consumer threads read one message at a time, decode it, check its id against an idempotency table,
hash the payload (md5 of sorted JSON), merge it into a dict, commit their offset for that message
(per-message commits, as the old consumer's `consumer.commit(message=msg)`), and post batches of
100 to the sink with `requests`. The log is a SQLite file in WAL mode with synchronous=NORMAL, the
same durability the embedded log gives Conflux, so the comparison is of styles, not of guarantees.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests
import xxhash

PAGE_SIZE = 100
FLUSH_EVERY = 100
CONSUMERS = 2
POLL_S = 0.005


class _Log:
    """One table of messages and one of consumer offsets; every call is its own transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self.connect() as conn:
            conn.executescript("CREATE TABLE IF NOT EXISTS messages (offset INTEGER PRIMARY KEY, body TEXT);"
                               "CREATE TABLE IF NOT EXISTS processed (message_id TEXT PRIMARY KEY);")

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn


def _produce(upstream_url: str, name: str, limit: int, log: _Log) -> None:
    conn = log.connect()
    with requests.Session() as http:
        page, sent = 1, 0
        while sent < limit:
            body = http.get(f"{upstream_url}/api/{name}", params={"page": page, "size": PAGE_SIZE}, timeout=30).json()
            for record in body["data"][: limit - sent]:
                message = json.dumps({"message_id": str(uuid.uuid4()), "source": name, "sync_type": "FULL",
                                      "payload": record})
                conn.execute("INSERT INTO messages (body) VALUES (?)", (message,))  # committed: one send, one ack
                sent += 1
            if not body["has_more"]:
                break
            page += 1
    conn.close()


class _Consumer:
    def __init__(self, index: int, sink_url: str, keys: dict[str, str], log: _Log, done: threading.Event) -> None:
        self.index, self.sink_url, self.keys, self.log, self.done = index, sink_url, keys, log, done
        self.merged: dict[tuple[str, str], dict] = {}
        self.delivered = 0

    def run(self) -> None:
        conn, offset = self.log.connect(), self.index
        with requests.Session() as http:
            while True:
                row = conn.execute("SELECT body FROM messages WHERE offset = ?", (offset + 1,)).fetchone()
                if row is None:
                    if self.done.is_set() and not conn.execute(
                            "SELECT 1 FROM messages WHERE offset > ? LIMIT 1", (offset,)).fetchone():
                        break
                    time.sleep(POLL_S)  # polling the log, as the old consumer's poll() loop did
                    continue
                self._process(conn, http, json.loads(row[0]))
                offset += CONSUMERS  # each consumer owns every CONSUMERS-th message: its "partition"
            self._flush(http)
        conn.close()

    def _process(self, conn: sqlite3.Connection, http: requests.Session, data: dict) -> None:
        if conn.execute("SELECT 1 FROM processed WHERE message_id = ?", (data["message_id"],)).fetchone():
            return
        payload = data["payload"]
        hashlib.md5(json.dumps(payload, sort_keys=True).encode()).hexdigest()  # the old content hash
        self.merged[(data["source"], str(payload.get(self.keys[data["source"]])))] = payload
        conn.execute("INSERT INTO processed (message_id) VALUES (?)", (data["message_id"],))  # commit per message
        if len(self.merged) >= FLUSH_EVERY:
            self._flush(http)

    def _flush(self, http: requests.Session) -> None:
        if self.merged:
            _post(http, self.sink_url, self.merged)
            self.delivered += len(self.merged)
            self.merged = {}


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
    with tempfile.TemporaryDirectory(prefix="conflux-baseline-") as directory:
        log = _Log(Path(directory) / "log.db")
        done = threading.Event()
        share = records // len(collections)
        producers = [threading.Thread(target=_produce, args=(upstream_url, name, share, log)) for name in collections]
        consumers = [_Consumer(i, sink_url, collections, log, done) for i in range(CONSUMERS)]
        threads = [threading.Thread(target=consumer.run) for consumer in consumers]
        started = time.perf_counter()
        for thread in producers + threads:
            thread.start()
        for thread in producers:
            thread.join()
        done.set()
        for thread in threads:
            thread.join()
        elapsed_s = time.perf_counter() - started
    delivered = sum(consumer.delivered for consumer in consumers)
    return {"records": delivered, "seconds": round(elapsed_s, 3), "records_per_s": round(delivered / elapsed_s),
            "style": "one JSON message per record in a durable log, per-message commits, threads, requests"}
