"""A DistillRequest on the engine's GPU worker: the run steps in the training slot, ``Completed`` carries
the judge's numbers, the adapter is installed (and live) only as the request's ``install`` says, and
bad requests fail with a message saying what is wrong."""

from __future__ import annotations


import pytest

from engine.contract import protocol
from tests.conftest import write_config
from tests.engine.service.worker_events import final_event, start_recording, wait_for


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny_model_dir):
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from engine.service.distill_hook import distill_factory
    from engine.service.gpu_worker import GpuWorker
    from tests.engine.generation.lora_factory import make_lora

    root = tmp_path_factory.mktemp("distill-worker")
    config = load_config(write_config(root, tiny_model_dir, "\n[training]\nresolution = 64\n"))
    generator = Generator.from_config(config)
    make_lora(generator.pipe, root / "adapters" / "ink.safetensors", seed=3, kind="style")
    generator.registry.reload()
    gpu = GpuWorker(generator, config, name="distill-gpu")
    gpu.distill_factory = distill_factory(config, generator)
    start_recording(gpu)
    gpu.root = root
    yield gpu
    gpu.stop()


def _wait(gpu, test, timeout: float = 180):
    return wait_for(gpu, test, timeout)


def _final(gpu, job_id: str, attempt: int = 1):
    return final_event(gpu, job_id, attempt)


def _request(job_id: str, attempt: int = 1, **options) -> protocol.DistillRequest:
    settings = {"name": "ink-fast", "mix": [{"name": "ink", "weight": 0.8}], "captions": ["1girl, solo", "a sky"],
                "steps": 2, "teacher_steps": 2, **options}
    return protocol.DistillRequest(job_id=job_id, owner="admin", attempt=attempt, options=settings)


def test_install_always_makes_the_adapter_live_for_its_mix(worker):
    worker.submit(_request("distill-a", install="always"))
    event = _final(worker, "distill-a")
    assert isinstance(event, protocol.Completed), event
    r = event.result
    assert r["status"] == "completed" and r["steps"] == 2 and r["installed"] == "ink-fast"
    assert r["distance_before"] > 0 and r["distance_after"] > 0 and isinstance(r["recommended"], bool)
    assert r["mix"] == [["ink", 0.8]]
    live = {a.name: a for a in worker.list_adapters()}
    assert live["ink-fast"].kind == "lcm", "installed and reloaded without a restart"
    progress = [e for e in worker.events if e.job_id == "distill-a" and isinstance(e, protocol.Progress)]
    assert progress and progress[-1].step == 2 and progress[-1].loss is not None


def test_install_never_leaves_the_adapters_alone(worker):
    worker.submit(_request("distill-b", name="kept-fast", install="never"))
    event = _final(worker, "distill-b")
    assert isinstance(event, protocol.Completed) and event.result["installed"] is None
    assert not (worker.root / "adapters" / "kept-fast.safetensors").exists()
    assert (worker.root / "data" / "runs" / "distill-b" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("options, message", [
    ({"mix": [{"name": "nosuch", "weight": 1.0}]}, "nosuch"),
    ({"captions": [], "dataset": "missing"}, "no dataset 'missing' on the engine"),
    ({"captions": []}, "give a dataset (or captions)"),
])
def test_bad_requests_fail_saying_why(worker, options, message):
    job_id = f"distill-bad-{abs(hash(message)) % 10_000}"
    worker.submit(_request(job_id, **options))
    event = _final(worker, job_id)
    assert isinstance(event, protocol.Failed) and message in event.message, event


def test_a_stopped_run_resumes_from_its_newest_checkpoint(worker):
    """What a restarted engine does with the bot's resubmission (attempt 2) of a run it lost."""
    request = dict(name="resumed-fast", steps=6, save_every=1, install="never")
    worker.submit(_request("distill-c", **request))
    _wait(worker, lambda ev: [e for e in ev if e.job_id == "distill-c" and isinstance(e, protocol.Progress)
                              and e.step >= 2])
    worker.cancel("distill-c")
    assert isinstance(_final(worker, "distill-c"), protocol.Canceled)
    job = worker.distill_factory(_request("distill-c", attempt=2, **request))  # the worker is idle now
    try:
        assert job.run.step_index >= 2, "attempt 2 starts again from step 0 instead of the newest checkpoint"
        assert not job.done and job.attempt == 2
    finally:
        job.release()
