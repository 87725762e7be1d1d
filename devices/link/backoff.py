"""Capped, jittered exponential backoff: the one retry schedule of every reconnect and retry
loop (links, historian, owner probe, journal commit retry). Pure: no clock, no sleep; the
random source is injected, so a sequence is reproducible."""

from __future__ import annotations

import random
from typing import Protocol


class RandomSource(Protocol):
    """What `Backoff` needs of a random generator (`random.Random` is one)."""

    def random(self) -> float:
        """A float in [0, 1)."""
        ...


class Backoff:
    """Delays for successive retries: ``initial_s * factor**n``, jittered, never above ``max_s``.

    Jitter only shortens: with ``jitter=0.2`` each delay is the capped exponential value
    times ``1 - 0.2 * u`` for ``u`` drawn from ``rng`` (so within (0.8, 1.0]), so clients
    restarting together spread out, and ``max_s`` still bounds how long a recovered peer
    waits for us. ``jitter=0`` draws nothing.

    Two ways back to ``initial_s``: `reset` (after any success), or `session_ended` (for a
    connection: only one that stayed up ``reset_after_s`` resets; a peer that accepts and
    drops us at once is retried with ever longer delays, as a failed connect is).
    """

    __slots__ = ("_attempt", "_rng", "factor", "initial_s", "jitter", "max_s", "reset_after_s")

    def __init__(
        self,
        initial_s: float = 0.1,
        max_s: float = 2.0,
        factor: float = 2.0,
        jitter: float = 0.2,
        *,
        reset_after_s: float = 0.0,
        rng: RandomSource | None = None,
    ) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {initial_s=} {max_s=}")
        if not factor >= 1.0:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if not reset_after_s >= 0.0:
            raise ValueError(f"reset_after_s must be >= 0, got {reset_after_s}")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self.reset_after_s = reset_after_s
        self._rng = rng  # without one, a `random.Random` at the first jittered delay
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
            rng = self._rng
            if rng is None:
                rng = self._rng = random.Random()
            delay *= 1.0 - self.jitter * rng.random()
        return delay

    def reset(self) -> None:
        """Start again from ``initial_s`` (call after a success)."""
        self._attempt = 0

    def session_ended(self, up_s: float) -> bool:
        """A session that was up for ``up_s`` ended: reset if it lasted ``reset_after_s``.
        Returns whether it reset."""
        if up_s >= self.reset_after_s:
            self._attempt = 0
            return True
        return False
