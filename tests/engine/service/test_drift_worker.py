"""A DriftRequest on the engine's GPU worker: the measurement runs as steps in the training slot,
``Completed`` carries the table, recommendation and chart; for a training run's checkpoint the run's
run.json gets the summary and the checkpoint leaves the adapter list afterwards."""

from __future__ import annotations

import base64

import pytest

from engine.contract import protocol
from tests.conftest import write_config
from tests.engine.service.worker_events import final_event, start_recording


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny_model_dir):
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from engine.service.drift_hook import drift_factory
    from engine.service.gpu_worker import GpuWorker
    from tests.engine.generation.lora_factory import make_lora
    from tests.training.tiny_tagger import make_tiny_tagger

    root = tmp_path_factory.mktemp("drift-worker")
    tagger = make_tiny_tagger(root / "tagger")
    config = load_config(write_config(root, tiny_model_dir, f'\n[tagger]\nmodel = "{tagger.as_posix()}"\n'))
    generator = Generator.from_config(config)
    make_lora(generator.pipe, root / "adapters" / "lcm-lora-sdxl.safetensors", seed=7, kind="other")
    generator.registry.reload()
    gpu = GpuWorker(generator, config, name="drift-gpu")
    gpu.drift_factory = drift_factory(config, generator)
    start_recording(gpu)
    gpu.root = root
    yield gpu
    gpu.stop()


def _final(gpu, job_id: str, timeout: float = 120):
    return final_event(gpu, job_id, timeout=timeout)


def test_drift_request_completes_with_table_and_chart(worker):
    options = protocol.DriftOptions(prompts=["1girl, solo"], seeds=[2], lcm_weights=[0.25, 1.0], steps=[4])
    worker.submit(protocol.DriftRequest(job_id="drift-a", owner="admin", options=options))
    event = _final(worker, "drift-a")
    assert isinstance(event, protocol.Completed), event
    result = event.result
    assert [(r["mode"], r["weight"]) for r in result["report"]["rows"]] == [("lcm", 0.25), ("lcm", 1.0)]
    assert base64.b64decode(result["chart_png_b64"]).startswith(b"\x89PNG")
    assert "keep" in result["table"] and result["summary"].startswith("recommended: lcm")
    progress = [e.step for e in worker.events if e.job_id == "drift-a" and isinstance(e, protocol.Progress)]
    assert progress and progress[-1] == 4  # standard + 2 fast images + the report


def test_a_training_runs_checkpoint_gets_its_drift_in_run_json(worker):
    from tests.engine.generation.lora_factory import make_lora
    from training.data.run_record import checkpoint_dir, read_run, update_run
    from training.learning.drift import CHECKPOINT_ADAPTER

    run_dir = worker.root / "data" / "runs" / "run-7"
    make_lora(worker.generator.pipe, checkpoint_dir(run_dir, 4) / "adapter.safetensors", seed=4, sidecar=False)
    update_run(run_dir, status="completed", recommended_checkpoint=4, sample_prompts=["1girl, smile"])
    options = protocol.DriftOptions(checkpoint_run="run-7", seeds=[1], lcm_weights=[1.0], steps=[4])
    worker.submit(protocol.DriftRequest(job_id="run-7-drift", owner="admin", options=options))
    event = _final(worker, "run-7-drift")
    assert isinstance(event, protocol.Completed), event
    drift = read_run(run_dir)["drift"]
    assert drift["checkpoint"] == 4 and drift["summary"].startswith("recommended: lcm")
    assert event.result["report"]["prompts"] == ["1girl, smile"]  # the run's own sample prompts
    assert CHECKPOINT_ADAPTER not in {a.name for a in worker.list_adapters()}


def test_a_missing_checkpoint_fails_with_a_clear_message(worker):
    options = protocol.DriftOptions(checkpoint_run="no-such-run")
    worker.submit(protocol.DriftRequest(job_id="drift-missing", owner="admin", options=options))
    event = _final(worker, "drift-missing")
    assert isinstance(event, protocol.Failed) and "no training run in" in event.message
