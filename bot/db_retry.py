"""Retrying a database write that failed for a passing reason (locked by another process, disk full).

An engine event is the only record of what the engine did; dropping it on a failed write
leaves a job or a training run "running" forever. Writes are idempotent (by attempt and
sequence number), so trying again is safe.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Awaitable, Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# The first retry after this many seconds, doubling up to the maximum; never given up.
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0


async def until_stored(what: str, write: Callable[[], Awaitable[T]]) -> T:
    """Run ``write`` until it does not fail with an ``sqlite3.OperationalError``; return its result."""
    delay = FIRST_DELAY_S
    while True:
        try:
            return await write()
        except sqlite3.OperationalError as exc:
            log.warning("storing %s failed (%s); retrying in %g s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
