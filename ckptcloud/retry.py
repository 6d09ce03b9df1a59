"""Retries with exponential backoff and full jitter, bounded in attempts and in time.

The pipeline wraps every store request in :meth:`Retry.call`: each part, the single put, begin, complete, abort
and each download range (which resumes where it stopped). Only transient failures are retried
(:class:`~ckptcloud.errors.TransientError` from the adapters, and builtin ``ConnectionError``/``TimeoutError``);
missing buckets, denied access and bad arguments fail at once. The clients ckptcloud builds have the SDKs' own
retries off, so one attempt is one request; a client you pass keeps its own retries, which run inside each attempt.

A ``cancel`` event shared with the pipeline stops a retry at once: once it is set no attempt starts and a backoff
wait ends (``concurrent.futures.CancelledError``), so one part failing for good, or Ctrl-C, does not wait out the
other requests' retries. Jitter comes from a private generator: retries never consume the user's seeded
``random`` stream.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger("ckptcloud")


def is_transient(err: BaseException) -> bool:
    """Worth retrying: connection problems and timeouts (adapters map 5xx/throttling to ``TransientError``)."""
    return isinstance(err, (ConnectionError, TimeoutError))


@dataclass(frozen=True)
class Retry:
    """How one request is retried.

    Args:
        max_attempts: attempts per request, the first included (1 disables retries).
        initial_backoff: upper bound of the first wait in seconds; it doubles per attempt (full jitter).
        max_backoff: cap of one wait in seconds.
        deadline: do not start another attempt once this many seconds have passed since the first one. A running
            attempt is bounded by the SDK's timeouts (on the clients it builds, ckptcloud sets 10 s to connect and
            20 s per read for metadata requests, 120 s for data), so one request can end up to one attempt's
            length past the deadline.

    Example:
        >>> calls = []
        >>> def flaky():
        ...     calls.append(1)
        ...     if len(calls) < 3:
        ...         raise ConnectionResetError("reset by peer")
        ...     return "ok"
        >>> Retry(max_attempts=5, initial_backoff=0.001).call(flaky, "demo"), len(calls)
        ('ok', 3)
    """

    max_attempts: int = 6
    initial_backoff: float = 0.25
    max_backoff: float = 8.0
    deadline: float = 300.0
    _jitter: random.Random = field(default_factory=random.Random, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"Argument `max_attempts` should be an int >= 1, but given {self.max_attempts!r}")
        for name in ("initial_backoff", "max_backoff", "deadline"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"Argument `{name}` should be a number >= 0, but given {value!r}")

    def call(self, fn: Callable[[], T], what: str, cancel: threading.Event | None = None) -> T:
        """``fn()``, retried on transient failures; the last failure propagates, annotated with the attempt count.

        Args:
            fn: the request.
            what: what it does, for log lines and notes.
            cancel: when set, no further attempt starts and a backoff wait ends at once, raising
                ``concurrent.futures.CancelledError`` (chained to the last failure, if any). A running attempt is
                not interrupted.
        """
        start = time.monotonic()
        attempt = 1
        while True:
            if cancel is not None and cancel.is_set():
                raise CancelledError(f"{what} was cancelled")
            try:
                return fn()
            except BaseException as err:
                if not is_transient(err):
                    raise
                delay = self._jitter.uniform(0, min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1)))
                elapsed = time.monotonic() - start
                if attempt >= self.max_attempts or elapsed + delay > self.deadline:
                    if hasattr(err, "add_note"):  # Python 3.11+
                        err.add_note(f"ckptcloud: {what} gave up after {attempt} attempt(s) in {elapsed:.1f} s")
                    raise
                logger.warning("%s failed (attempt %d of %d), retrying in %.2f s: %s",
                               what, attempt, self.max_attempts, delay, err)  # fmt: skip
                if cancel is None:
                    time.sleep(delay)
                elif cancel.wait(delay):
                    raise CancelledError(f"{what} was cancelled after {attempt} attempt(s)") from err
                attempt += 1


NO_RETRY = Retry(max_attempts=1)
