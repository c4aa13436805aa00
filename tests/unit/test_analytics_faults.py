"""The analytics sink's fault settings, outage windows and seeded draws (demo/analytics_faults.py)."""

from __future__ import annotations

import pytest

from conflux.demo import analytics_faults
from conflux.demo.analytics_faults import (
    Faults,
    FaultSettings,
    FaultSpecError,
    OutageWindow,
    decode_outage_request,
    parse_outage_spec,
    patched_settings,
    settings_from_flags,
)


def test_outage_specs():
    assert parse_outage_spec("") == []
    assert parse_outage_spec("10:20") == [OutageWindow(10.0, 20.0)]
    assert parse_outage_spec("0:1.5, 60:5") == [OutageWindow(0.0, 1.5), OutageWindow(60.0, 5.0)]


@pytest.mark.parametrize("spec", ["10", "a:b", "10:0", "-1:5", "10:20:30", "10:-2", "nan:5", "5:inf", ":"])
def test_bad_outage_specs_name_the_flag(spec):
    with pytest.raises(FaultSpecError, match="--outage-s"):
        parse_outage_spec(spec)


def test_flags_are_validated_with_the_flag_named():
    assert settings_from_flags(error_rate=0.5, latency_ms=20).latency_ms == 20.0
    with pytest.raises(FaultSpecError, match="--apply-then-fail-rate"):
        settings_from_flags(apply_then_fail_rate=1.5)
    with pytest.raises(FaultSpecError, match="--latency-ms"):
        settings_from_flags(latency_ms=-1)


def test_answer_faults_are_validated_with_the_flag_named():
    assert settings_from_flags(fail_status=401, redirect_to="/login", html_200=True).fail_status == 401
    for status in (-1, 99, 199, 600):
        with pytest.raises(FaultSpecError, match="--fail-status"):
            settings_from_flags(fail_status=status)


def test_forced_answers_take_precedence_in_order_and_are_counted():
    faults = Faults(settings=FaultSettings(), windows=[], seed=0)
    assert faults.forced_answer() is None
    faults.settings = FaultSettings(redirect_to="/login", html_200=True, fail_status=401)
    assert faults.forced_answer() == "redirect"
    faults.settings = patched_settings(faults.settings, b'{"redirect_to": ""}')
    assert faults.forced_answer() == "html_200"
    faults.settings = patched_settings(faults.settings, b'{"html_200": false}')
    assert faults.forced_answer() == "fail_status"
    assert (faults.counts["redirect"], faults.counts["html_200"], faults.counts["fail_status"]) == (1, 1, 1)


def test_patches_merge_into_the_current_settings():
    current = FaultSettings(error_rate=0.5, latency_ms=10)
    assert patched_settings(current, b'{"latency_ms": 0}') == FaultSettings(error_rate=0.5, latency_ms=0)


@pytest.mark.parametrize("body", [b"nope", b"[]", b'{"error_rate": 2}', b'{"typo_rate": 0.1}', b'{"fail_status": 42}',
                                  b'{"error_rate": "high"}', b'{"\xff": 1}', b'{"a": %s}' % (b"[" * 99999)])
def test_bad_patches_are_refused(body):
    with pytest.raises(FaultSpecError):
        patched_settings(FaultSettings(), body)


def test_outage_requests():
    assert decode_outage_request(b'{"seconds": 2.5}').seconds == 2.5
    for body in (b"{}", b'{"seconds": -1}', b'{"seconds": 1, "extra": 2}'):
        with pytest.raises(FaultSpecError):
            decode_outage_request(body)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(analytics_faults.time, "monotonic", fake)
    return fake


def test_outage_windows_are_relative_to_start(clock):
    faults = Faults(settings=FaultSettings(), windows=parse_outage_spec("10:20,25:10"), seed=0)
    expected = {0: 0.0, 9.9: 0.0, 10: 20.0, 15: 15.0, 29: 6.0, 34.5: 0.5, 35: 0.0}
    for elapsed_s, remaining_s in expected.items():
        clock.now = 1000.0 + elapsed_s
        assert faults.outage_remaining_s() == pytest.approx(remaining_s)


def test_an_admin_outage_starts_now_and_zero_ends_it(clock):
    faults = Faults(settings=FaultSettings(), windows=[], seed=0)
    faults.start_outage(5)
    clock.now += 2
    assert faults.outage_remaining_s() == pytest.approx(3.0)
    faults.start_outage(0)
    assert faults.outage_remaining_s() == 0.0


def test_draws_are_reproducible_with_a_seed_and_counted():
    def draws(seed: int) -> list[bool]:
        faults = Faults(settings=FaultSettings(error_rate=0.5), windows=[], seed=seed)
        return [faults.draw_error() for _ in range(50)]

    assert draws(3) == draws(3) != draws(4)
    faults = Faults(settings=FaultSettings(error_rate=1.0, apply_then_fail_rate=0.0), windows=[], seed=0)
    assert faults.draw_error() and not faults.draw_apply_then_fail()
    assert faults.counts["error_rate"] == 1 and faults.counts["apply_then_fail"] == 0
