"""The remote-expert circuit breaker: open after N failures, one trial after the cooldown."""

from __future__ import annotations

import pytest

from concilium.errors import ExpertUnavailable
from concilium.experts.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_opens_after_threshold_and_admits_one_trial_after_cooldown() -> None:
    clock = Clock()
    b = CircuitBreaker(threshold=2, cooldown_s=10, clock=clock)
    b.check("x")
    b.failure("x")
    b.check("x")  # one failure: still closed
    b.failure("x")
    with pytest.raises(ExpertUnavailable, match="cooling down") as e:
        b.check("x")
    assert e.value.retry_after_s == pytest.approx(10)
    b.check("y")  # other endpoints are unaffected
    clock.t = 11
    b.check("x")  # the half-open trial
    with pytest.raises(ExpertUnavailable):
        b.check("x")  # only one trial at a time
    b.failure("x")  # trial failed: open for another cooldown
    with pytest.raises(ExpertUnavailable):
        b.check("x")
    clock.t = 22
    b.check("x")
    b.success("x")  # trial succeeded: closed
    b.check("x")
    assert not b.is_open("x")


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold=0)
