"""Post-processing off the GPU thread: PNG files and ratings are made while the next job runs.

In-process GpuWorker on the tiny model with a real Generator. The rater stands in for the WD
tagger (tests/training/tiny_tagger needs an ONNX file; what matters here is when it runs).
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.contract import protocol as p
from tests.conftest import write_config
from tests.engine.service.test_batching import Env


class SlowRater:
    """Rates every image 'general', but only once job ``wait_for`` has started on the GPU (or
    after a long timeout): rating on the GPU thread would keep that job from ever starting first."""

    def __init__(self) -> None:
        self.wait_for: str | None = None
        self.started = threading.Event()
        self.batches: list[int] = []

    def rate_many(self, images):
        if self.wait_for is not None:
            self.started.wait(20)
        self.batches.append(len(images))
        return [("general", {"general": 0.9, "sensitive": 0.1}) for _ in images]

    def __call__(self, image):
        return self.rate_many([image])[0]


@pytest.fixture(scope="module")
def rated(tmp_path_factory, tiny_model_dir):
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from engine.service.gpu_worker import GpuWorker

    config = load_config(write_config(tmp_path_factory.mktemp("post"), tiny_model_dir))
    rater = SlowRater()
    worker = GpuWorker(Generator.from_config(config, rater=rater), config, name="post-gpu")
    env = Env(worker, config)
    env.rater = rater
    worker.start(env.emit)
    yield env
    worker.stop()


def request(job_id: str, owner: str, seed: int, **params) -> p.GenerateRequest:
    return p.GenerateRequest(job_id=job_id, owner=owner, params=p.GenerationParams(prompt="1girl", seed=seed, steps=2, **params))


def test_a_jobs_completed_arrives_while_the_next_job_already_runs(rated):
    env, rater = rated, rated.rater

    def watch(event) -> None:
        if isinstance(event, p.Started) and event.job_id == "pipe2":
            rater.started.set()

    env.on_event, rater.wait_for = watch, "pipe2"
    try:
        release = env.hold()
        env.worker.submit(request("pipe1", "ann", 1, width=64, height=64))
        env.worker.submit(request("pipe2", "bob", 2, width=64, height=72))  # another size: not batched with pipe1
        release.set()
        ends = env.wait_terminal(["pipe1", "pipe2"])
    finally:
        env.on_event, rater.wait_for = None, None
    assert all(isinstance(e, p.Completed) for e in ends.values()), ends
    order = [(type(e).__name__, e.job_id) for e in env.events if e.job_id in ("pipe1", "pipe2")]
    assert order.index(("Started", "pipe2")) < order.index(("Completed", "pipe1")), order
    assert ends["pipe1"].images[0].rating == "general"
    # Each job's own events still come in order, ending with its Completed.
    for job_id in ("pipe1", "pipe2"):
        events = env.of(job_id)
        assert [e.seq for e in events] == sorted(e.seq for e in events)
        assert isinstance(events[-1], p.Completed)


def test_the_worker_sends_the_images_the_library_writes(rated):
    from engine.generation.generator import Generator

    env = rated
    env.worker.submit(request("same1", "cid", 7, count=2))
    completed = env.wait_terminal(["same1"])["same1"]
    generator: Generator = env.worker.generator
    # The library's own call writes its files inline; same request, same seed.
    direct = env.worker.call_between_jobs(
        lambda: generator.generate(p.GenerationParams(prompt="1girl", seed=7, steps=2, count=2), job_id="same1direct")
    ).result(60)
    assert [i.seed for i in completed.images] == [7, 8]
    assert env.rater.batches[-2] == 2  # both images of the job rated as one batch
    for sent, local in zip(completed.images, direct.images):
        data = base64.b64decode(sent.data_b64)
        assert data == Path(sent.path).read_bytes()  # the event carries the file that was written
        assert hashlib.sha256(data).hexdigest() == sent.sha256
        with Image.open(io.BytesIO(data)) as a, Image.open(local.path) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert a.text["parameters"].replace("same1direct", "same1") == b.text["parameters"].replace("same1direct", "same1")
    kinds = [type(e).__name__ for e in env.of("same1")]
    assert kinds[:2] == ["Queued", "Started"] and kinds[-1] == "Completed" and set(kinds[2:-1]) <= {"Progress"}


def test_a_failed_write_fails_only_that_job_with_a_clear_message(rated, tmp_path):
    env = rated
    outputs = env.worker.generator.outputs_dir
    blocker = outputs / "wfail-0.png"
    blocker.mkdir(parents=True)  # a directory where the PNG should go: the write fails
    try:
        env.worker.submit(request("wfail", "dan", 9))
        env.worker.submit(request("wok", "eve", 10, width=72))
        ends = env.wait_terminal(["wfail", "wok"])
    finally:
        blocker.rmdir()
    assert isinstance(ends["wfail"], p.Failed) and ends["wfail"].retryable
    assert "engine log" in ends["wfail"].message
    assert isinstance(ends["wok"], p.Completed)
