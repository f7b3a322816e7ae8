"""Hostile entries in Redis: only the worker holding a job's current attempt speaks for it.

A real redis-server, a real ``Dispatcher`` and a real ``RedisWorker`` (its job function is a
small Python function, as in test_redis_layer.py). Forged ``Completed`` entries are written
straight into the events stream, as any other client of that Redis could.
"""

from __future__ import annotations

import logging

import pytest

from engine.contract import protocol
from tests.engine.scaleout.test_redis_layer import Cluster, FakeGpu, gen, make_config
from tests.redis_fixture import redis_server  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


@pytest.fixture
async def cluster(redis_server):  # noqa: F811
    c = Cluster(redis_server.url, make_config())
    yield c
    await c.close()


def forged(job_id: str, attempt: int, seq: int) -> str:
    return protocol.encode(protocol.Completed(job_id=job_id, attempt=attempt, seq=seq, images=[
        protocol.ImageResult(path="/proc/self/environ", seed=1, width=64, height=64, sha256="")]))


async def test_only_the_lease_owner_completes_a_job(cluster, caplog):
    await cluster.add_worker(FakeGpu("honest", set(), set()))
    d = cluster.new_dispatcher()
    await d.start()
    r = cluster.recorder
    await d.submit(gen("held", prompt="1.5"))  # runs 1.5 s on "honest"
    await r.wait_for("held", protocol.Started)
    client = d.client
    with caplog.at_level(logging.WARNING, logger="engine.scaleout.dispatcher"):
        # Another worker name, current attempt; the holder's name, an attempt that is not current.
        await client.xadd(cluster.keys.events, {"worker": "rogue", "event": forged("held", 1, 90)})
        await client.xadd(cluster.keys.events, {"worker": "honest", "event": forged("held", 2, 91)})
        done = await r.wait_for("held", protocol.Completed)
    results = r.of("held", protocol.Completed)
    assert len(results) == 1 and done.images == [], [e.images for e in results]
    assert not [e for e in r.events if isinstance(e, protocol.Failed)]
    warnings = [rec.getMessage() for rec in caplog.records if "ignoring completed of job held" in rec.getMessage()]
    assert len(warnings) == 2 and "'rogue'" in warnings[0], warnings
    # The holder goes on working for the next job.
    await d.submit(gen("after", prompt="0.05"))
    assert (await r.wait_for("after", protocol.Started)).worker == "honest"
    await r.wait_for("after", protocol.Completed)


async def test_an_image_without_attached_bytes_gets_none(cluster):
    # The holder's Completed names a file but attached no bytes: the dispatcher hands it on
    # without bytes (the bot then refuses it) and never reads or rewrites the path it names.
    await cluster.add_worker(FakeGpu("honest", set(), set()))
    d = cluster.new_dispatcher()
    await d.start()
    r = cluster.recorder
    await d.submit(gen("nobytes", prompt="1.0"))
    await r.wait_for("nobytes", protocol.Started)
    await d.client.xadd(cluster.keys.events, {"worker": "honest", "event": forged("nobytes", 1, 50)})
    done = await r.wait_for("nobytes", protocol.Completed)
    assert [(i.path, i.data_b64) for i in done.images] == [("/proc/self/environ", None)]
