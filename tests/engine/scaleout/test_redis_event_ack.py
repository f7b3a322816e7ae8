"""Redis mode, issue 11: the dispatcher acknowledges a worker event only after the bot stored it.

A real redis-server and a real ``RedisWorker``; the bot's side is an event handler whose
database write fails (disk full) until the test lets it succeed. An event whose commit failed
must be read again, while the bot runs and after it restarts, never acknowledged and lost.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import pytest

from engine.contract import protocol
from tests.engine.scaleout.test_redis_layer import FakeGpu, Recorder, cluster, gen  # noqa: F401  (fixture)
from tests.redis_fixture import redis_server  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


class FailingStore(Recorder):
    """The bot's event handler whose commit of a Completed event fails until ``fixed``."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0
        self.fixed = False

    async def __call__(self, event: Any) -> None:
        if isinstance(event, protocol.Completed) and not self.fixed:
            self.failures += 1
            raise sqlite3.OperationalError("database or disk is full")
        await super().__call__(event)


async def until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_an_event_whose_commit_fails_is_read_again_until_stored(cluster):  # noqa: F811
    await cluster.add_worker(FakeGpu("w1", set(), set()))
    store = cluster.recorder = FailingStore()
    d = cluster.new_dispatcher()
    await d.start()
    await d.submit(gen("disk-full", prompt="0.2"))
    await until(lambda: store.failures >= 2)  # read again after the failed commit, not acknowledged
    store.fixed = True
    await store.wait_for("disk-full", protocol.Completed)
    await asyncio.sleep(1.5)
    assert len(store.of("disk-full", protocol.Completed)) == 1, "stored exactly once"


async def test_an_event_not_stored_before_the_bot_stopped_is_delivered_after_restart(cluster):  # noqa: F811
    await cluster.add_worker(FakeGpu("w1", set(), set()))
    store = cluster.recorder = FailingStore()
    d = cluster.new_dispatcher()
    await d.start()
    await d.submit(gen("stopped-mid-write", prompt="0.2"))
    await until(lambda: store.failures >= 1)
    await d.close()  # the bot stops while its database still refuses the write

    later = cluster.recorder = Recorder()
    d2 = cluster.new_dispatcher()
    await d2.start()
    done = await later.wait_for("stopped-mid-write", protocol.Completed)
    assert done.job_id == "stopped-mid-write"
