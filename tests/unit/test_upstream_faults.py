"""Fault injection (demo/faults.py), webhook signatures and background-change pacing of the upstream."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import Counter

import pytest

from conflux.demo import datagen
from conflux.demo.faults import Fault, FaultInjector, FaultSettings
from conflux.demo.store import Collection
from conflux.demo.upstream_changes import ChangeGenerator
from conflux.demo.upstream_webhooks import signature
from conflux.workers.control_security import signature_matches


def draws(injector: FaultInjector, count: int) -> list[Fault | None]:
    return [injector.draw() for _ in range(count)]


def test_the_same_seed_draws_the_same_faults():
    settings = FaultSettings(error_rate=0.3, throttle_rate=0.2)
    assert draws(FaultInjector(settings, seed=4), 200) == draws(FaultInjector(settings, seed=4), 200)
    assert draws(FaultInjector(settings, seed=4), 200) != draws(FaultInjector(settings, seed=5), 200)


def test_each_rate_is_a_fraction_of_all_requests():
    counts = Counter(draws(FaultInjector(FaultSettings(error_rate=0.3, throttle_rate=0.2), seed=1), 10_000))
    assert 2700 < counts[Fault.ERROR] < 3300
    assert 1700 < counts[Fault.THROTTLE] < 2300
    assert set(draws(FaultInjector(FaultSettings(), seed=1), 100)) == {None}


def test_latency_with_jitter_stays_in_its_window():
    injector = FaultInjector(FaultSettings(latency_ms=100, latency_jitter_ms=50), seed=1)
    delays = [injector.delay_s() for _ in range(200)]
    assert all(0.1 <= delay <= 0.15 for delay in delays) and len(set(delays)) > 100
    assert FaultInjector(FaultSettings(), seed=1).delay_s() == 0


@pytest.mark.parametrize(("changes", "field"), [
    ({"error_rate": 1.5}, "error_rate"), ({"throttle_rate": -0.1}, "throttle_rate"),
    ({"latency_ms": "slow"}, "latency_ms"), ({"retry_after_s": 0.5}, "retry_after_s"), ({"nope": 1}, "nope"),
])
def test_settings_reject_bad_values_by_name(changes, field):
    with pytest.raises(ValueError, match=field):
        FaultSettings().updated(changes)


def test_settings_update_keeps_other_fields():
    settings = FaultSettings(latency_ms=5).updated({"error_rate": 0.5, "latency_jitter_ms": 1})
    assert settings == FaultSettings(latency_ms=5, error_rate=0.5, latency_jitter_ms=1)


def test_signature_is_hmac_sha256_of_the_timestamp_a_dot_and_the_exact_body():
    body = b'{"id":1,"updated_at":"2026-01-01T00:00:00Z"}'
    expected = "sha256=" + hmac.new(b"k", b"1767225600." + body, hashlib.sha256).hexdigest()
    assert signature(b"k", body, "1767225600") == expected
    # The daemon's verifier accepts exactly what the demo sender signs.
    assert signature_matches("k", "1767225600", body, expected)
    assert not signature_matches("k", "1767225601", body, expected)


def test_background_changes_keep_the_rate_and_touch_only_valid_records():
    spec = datagen.CUSTOMERS
    collection = Collection(spec, datagen.generate(spec, 300, seed=1, precision="s", malformed_rate=0.2),
                            precision="s")
    malformed = {key for key, _reason, _data in collection.malformed()}
    changed: list[object] = []

    def apply(target: Collection, key: object, fields: dict) -> None:
        assert target is collection and set(fields) == {"tier"}
        changed.append(key)

    async def run_for(duration_s: float) -> float:
        generator = ChangeGenerator(collections=[collection], apply=apply, rate_per_s=200, seed=1)
        started = time.monotonic()
        task = asyncio.create_task(generator.run())
        await asyncio.sleep(duration_s)  # the measurement window, not synchronisation
        task.cancel()
        return time.monotonic() - started

    elapsed_s = asyncio.run(run_for(0.5))
    expected = 200 * elapsed_s
    assert 0.8 * expected - 5 <= len(changed) <= expected + 1
    assert not set(changed) & malformed
