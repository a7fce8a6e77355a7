"""Token bucket for delivery rate limits.

The bucket holds up to `burst` tokens and gains `rate` tokens per second; delivering a message takes one. A
spike is not dropped: the messages stay ready and are delivered as tokens come back (`next_ready` says when).
Invariant: over any interval of T seconds the bucket grants at most burst + rate * T tokens, and under
continuous demand it grants that many less at most one (whole tokens only; the fraction is carried, so there
is no drift over long runs). Time is passed in (`now`, seconds).
"""

from __future__ import annotations

from chute.errors import InvalidArgument


class TokenBucket:
    """A token bucket that starts full."""

    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate_per_s: float, burst: float | None = None) -> None:
        if isinstance(rate_per_s, bool) or not isinstance(rate_per_s, int | float) or not rate_per_s > 0:
            raise InvalidArgument(f"rate must be a positive number of messages per second, got {rate_per_s!r}")
        if burst is None:
            burst = max(1.0, float(rate_per_s))
        if isinstance(burst, bool) or not isinstance(burst, int | float) or burst < 1:
            raise InvalidArgument(f"burst must be a number >= 1, got {burst!r}")
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self.tokens = self.burst
        self.updated: float | None = None

    def _refill(self, now: float) -> None:
        if self.updated is not None and now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        if self.updated is None or now > self.updated:
            self.updated = now

    def take(self, count: int, now: float) -> int:
        """Grant up to `count` whole tokens; return how many were granted."""
        self._refill(now)
        granted = min(count, int(self.tokens + 1e-9))
        if granted > 0:
            self.tokens -= granted
        return max(0, granted)

    def give_back(self, count: int) -> None:
        """Return tokens granted but not used (a batch cut short)."""
        if count > 0:
            self.tokens = min(self.burst, self.tokens + count)

    def next_ready(self, now: float) -> float:
        """The earliest time at which at least one token is available (`now` if one is)."""
        self._refill(now)
        if self.tokens + 1e-9 >= 1:
            return now
        return now + (1 - self.tokens) / self.rate
