"""The control port under clients without credentials that hold connections open: raw sockets against a
real daemon. Partial headers are cut off at the header deadline, connections beyond the cap are answered
503, stalled uploads are cut off at the body deadline, and however many stall, the control process's
memory stays bounded by the webhook buffer."""

from __future__ import annotations

import socket
import threading
import time

import psutil
import requests

from tests.fixtures.daemon import source, wait_converged
from tests.support import wait_until

SECRET = "whsec-limits-1"
COUNTS = {"customers": 50, "products": 20}
MIB = 1 << 20


def start(upstream_factory, analytics, daemon_factory, **control):
    upstream = upstream_factory(**COUNTS)
    daemon = daemon_factory(sources=[source(name, upstream.url, webhook_secret=SECRET, poll_interval_s=3600)
                                     for name in COUNTS],
                            sink_url=analytics.url, control=control)
    wait_converged(upstream.url, analytics.url, {name: name for name in COUNTS}, timeout_s=60)
    return daemon


class Peer:
    """A raw client connection that remembers everything the server sent."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.received = b""

    def send(self, data: bytes) -> bool:
        """True if it all went; False if the server closed first (a refused upload may be cut off)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def closed_by_server(self) -> bytes | None:
        """What the server sent, once it has closed the connection (None while it is open)."""
        self.sock.setblocking(False)
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
        except BlockingIOError:
            return None
        except ConnectionResetError:
            pass
        finally:
            self.sock.setblocking(True)
        return self.received or b"<closed>"

    def close(self) -> None:
        self.sock.close()


def upload_headers(name: str, length: int, *, signed: bool = True) -> bytes:
    """A webhook's headers whose signature looks right and is fresh; the body is whatever follows."""
    lines = [f"POST /webhook/{name} HTTP/1.1", "Host: conflux", "Content-Type: application/json",
             f"Content-Length: {length}"]
    if signed:
        lines += [f"X-Conflux-Timestamp: {int(time.time())}", "X-Conflux-Signature: sha256=" + "ab" * 32]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def refused(url: str, reason: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f'conflux_control_refused_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_partial_headers_and_stalled_bodies_are_cut_off_at_their_deadlines(upstream_factory, analytics,
                                                                            daemon_factory):
    daemon = start(upstream_factory, analytics, daemon_factory, header_timeout_s=1.0, body_timeout_s=1.5)
    partial = [Peer(daemon.url) for _ in range(40)]
    for peer in partial:
        peer.send(b"GET /status HTTP/1.1\r\nHost: conflux\r\n")  # never the blank line that ends headers
    dripping = Peer(daemon.url)
    stop_dripping = threading.Event()

    def drip() -> None:  # a byte every 0.2 s: data keeps flowing, the headers never end
        for byte in b"GET /status HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
            if stop_dripping.wait(0.2) or not dripping.send(bytes([byte])):
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    stalled = Peer(daemon.url)
    stalled.send(upload_headers("customers", 4000) + b'{"id": 1, "name": "')  # and then nothing
    try:
        wait_until(lambda: all(peer.closed_by_server() is not None for peer in partial), timeout_s=10,
                   message="every connection with partial headers closed")
        wait_until(lambda: dripping.closed_by_server() is not None, timeout_s=10,
                   message="the dripping connection closed while it was still sending")
        assert dripper.is_alive()  # cut off by the deadline, not by running out of bytes to send
        answer = wait_until(stalled.closed_by_server, timeout_s=20, message="the stalled upload ended")
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    finally:
        stop_dripping.set()
        for peer in [*partial, dripping, stalled]:
            peer.close()
    assert requests.get(f"{daemon.url}/health", timeout=10).status_code == 200
    assert refused(daemon.url, "header_timeout") >= 41 and refused(daemon.url, "body_timeout") == 1
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_connections_beyond_the_cap_are_answered_503_and_served_again_once_others_close(
        upstream_factory, analytics, daemon_factory):
    daemon = start(upstream_factory, analytics, daemon_factory, max_connections=20, header_timeout_s=60.0)
    idle = [Peer(daemon.url) for _ in range(20)]
    try:
        extra = Peer(daemon.url)  # accepted after the twenty: the kernel queue is first in, first out
        answer = wait_until(extra.closed_by_server, timeout_s=10, message="the 21st connection answered")
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too many connections" in answer, answer
        assert all(peer.closed_by_server() is None for peer in idle)  # the twenty are still served
        for peer in idle[:5]:
            peer.close()
        wait_until(lambda: requests.get(f"{daemon.url}/health", timeout=10).status_code == 200, timeout_s=10,
                   message="/health once connections were freed")
        assert refused(daemon.url, "connection_limit") >= 1
    finally:
        for peer in idle:
            peer.close()
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_stalled_uploads_keep_the_control_process_memory_bounded(upstream_factory, analytics, daemon_factory):
    daemon = start(upstream_factory, analytics, daemon_factory, webhook_buffer_bytes=4 * MIB, body_timeout_s=120.0,
                   max_connections=400)
    control = psutil.Process(daemon.worker_pid("control"))
    baseline = control.memory_info().rss
    uploads = [Peer(daemon.url) for _ in range(100)]
    unsigned = [Peer(daemon.url) for _ in range(50)]
    try:
        for peer in uploads:  # signed-looking, 1 MiB announced, one byte short: each waits for its last byte
            peer.send(upload_headers("products", MIB))
        for peer in unsigned:  # no signature at all: refused before a byte of the body is read
            peer.send(upload_headers("products", MIB, signed=False))
        padding = b"x" * (MIB - 1)
        sent_mib = sum(peer.send(padding) for peer in uploads)
        answers = [wait_until(peer.closed_by_server, timeout_s=30, message="an unsigned upload refused")
                   for peer in unsigned]
        assert all(answer.startswith(b"HTTP/1.1 401 ") for answer in answers), answers[0][:200]
        grown_mib = (control.memory_info().rss - baseline) / MIB
        # Before the buffer existed every stalled upload was held whole: about 100 MiB here. Now: the 4 MiB
        # buffer, up to ~128 KiB of unread body per connection in aiohttp, and the allocator's slack.
        assert grown_mib < 48, f"the control process grew {grown_mib:.0f} MiB with {sent_mib} MiB in stalled uploads"
        assert refused(daemon.url, "buffer_full") >= 90  # only four fit the 4 MiB buffer at once
    finally:
        for peer in uploads + unsigned:
            peer.close()
    assert daemon.stop() == 0, daemon.log()[-3000:]
