"""The one retry policy for provider operations, built from a job's ``retry`` settings.

Only :class:`providers.base.TransientProviderError` is retried (the error tree's contract);
waits are a fixed number of seconds; a retry loop given a cancel event gives up as soon as an
immediate stop sets it, and its waits wake up at once.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from backupd.config import RetryConfig
from providers.base import TransientProviderError

T = TypeVar("T")


def retrying(
    settings: RetryConfig,
    *,
    cancel: threading.Event | None = None,
    before_retry: Callable[[int, BaseException], None] | None = None,
) -> Retrying:
    """A tenacity controller for one operation.

    :param settings: attempts (the first try included) and wait_seconds between tries.
    :param cancel: when set, no further attempt is made and waits end at once; the last
        error is re-raised.
    :param before_retry: called with (attempt number that failed, its error) before each
        retry, e.g. to log it.
    """
    stop = stop_after_attempt(settings.attempts)
    if cancel is not None:
        stop = stop | (lambda _state: cancel.is_set())

    last_error: list[BaseException] = []

    def sleep(seconds: float) -> None:
        if cancel is None:
            threading.Event().wait(seconds)
        elif cancel.wait(seconds):
            raise last_error[-1]  # stopped while waiting: no further attempt

    def before_sleep(state) -> None:  # type: ignore[no-untyped-def]
        error = state.outcome.exception()
        last_error.append(error)
        if before_retry is not None:
            before_retry(state.attempt_number, error)

    return Retrying(
        stop=stop,
        wait=wait_fixed(settings.wait_seconds),
        retry=retry_if_exception_type(TransientProviderError),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


def call_with_retry(
    fn: Callable[[], T],
    settings: RetryConfig,
    *,
    cancel: threading.Event | None = None,
    before_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """Run ``fn`` under :func:`retrying`; returns its result or raises its last error."""
    return retrying(settings, cancel=cancel, before_retry=before_retry)(fn)
