"""Capped, jittered exponential backoff for reconnect loops (pure: no clock, no sleep)."""

from __future__ import annotations

import random


class Backoff:
    """Delays for successive retries: ``initial_s * factor**n``, jittered, never above ``max_s``.

    Jitter only shortens: with ``jitter=0.2`` each delay is the capped exponential value
    times a uniform factor in [0.8, 1.0], so clients restarting together spread out, and
    ``max_s`` still bounds how long a recovered peer waits for us.
    """

    __slots__ = ("_attempt", "_rng", "factor", "initial_s", "jitter", "max_s")

    def __init__(
        self,
        initial_s: float = 0.1,
        max_s: float = 2.0,
        factor: float = 2.0,
        jitter: float = 0.2,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {initial_s=} {max_s=}")
        if factor < 1.0:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """How many delays were handed out since the last reset."""
        return self._attempt

    def next_delay(self) -> float:
        """The delay before the next retry, in seconds; advances the sequence."""
        # Cap the exponent so factor**n cannot overflow after very long outages.
        delay = min(self.initial_s * self.factor ** min(self._attempt, 64), self.max_s)
        self._attempt += 1
        if self.jitter:
            delay *= 1.0 - self.jitter * self._rng.random()
        return delay

    def reset(self) -> None:
        """Start again from ``initial_s`` (call after a successful connection)."""
        self._attempt = 0
