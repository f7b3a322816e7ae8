"""The wire protocol: every message survives JSON and back unchanged; bad input is refused."""

from __future__ import annotations

import json
import typing

import pytest

from engine.contract import protocol as p

PARAMS = p.GenerationParams(
    prompt="1girl, (silver hair:1.2), [smile]",
    negative_prompt="lowres",
    seed=42,
    steps=20,
    cfg=5.5,
    width=832,
    height=1216,
    count=2,
    sampler="Euler a",
    adapters=[p.AdapterWeight(name="style-x", weight=0.8), p.AdapterWeight(name="char.v2")],
    fast=True,
    add_quality_tags=False,
)
RESOLVED = p.ResolvedParams(
    prompt="1girl", negative_prompt="lowres", seed=7, steps=20, cfg=5.0, width=64, height=64, count=1,
    sampler="Euler a", adapters=[p.AdapterWeight(name="style-x", weight=1.0)], fast=False,
    mode="upscale", strength=0.35, source_image="job-0.png",
)
IMAGE = p.ImageResult(
    path="/data/outputs/job-0.png", seed=7, width=64, height=64, sha256="ab" * 32,
    rating="general", rating_scores={"general": 0.9, "sensitive": 0.1},
)
ADAPTER = p.AdapterInfo(
    name="style-x", kind="style", triggers=["xstyle"], default_weight=0.7, description="ink",
    base_model="sdxl", format="peft", sha256="cd" * 32, preview="style-x.png",
)

REQUESTS = [
    p.Hello(nonce="ab" * 32, client="test", rid="hello"),
    p.HelloProof(proof="cd" * 32, rid="hello"),
    p.GenerateRequest(job_id="job-1", owner="user:1", priority="batch", attempt=2, params=PARAMS, rid="r1"),
    p.Img2ImgRequest(job_id="job_2", owner="u", mode="variation", source="job-1-0.png", strength=0.5, params=PARAMS),
    p.CancelRequest(job_id="job-1", rid="r2"),
    p.ListAdaptersRequest(rid="r3"),
    p.ReloadAdaptersRequest(),
    p.StatusRequest(rid="r4"),
    p.TrainRequest(job_id="train-1", owner="admin", options={"steps": 10, "rank": 4, "trigger": "x"}),
    p.DriftRequest(job_id="drift-1", owner="admin", options={"adapters": [{"name": "ink", "weight": 0.8}],
                                                             "lcm_weights": [0.5, 1.0], "steps": [4, 6],
                                                             "checkpoint_run": "run-1"}),
    p.DistillRequest(job_id="distill-1", owner="admin", attempt=2,
                     options={"name": "ink-fast", "mix": [{"name": "ink", "weight": 0.8}], "dataset": "ink",
                              "steps": 4, "teacher_cfg": 6.0, "student_steps": 4, "install": "always"}),
]
EVENTS = [
    p.Challenge(nonce="12" * 32, proof="ef" * 32, rid="hello"),
    p.HelloOk(engine="arcae-engine tiny", rid="hello"),
    p.Queued(job_id="job-1", attempt=2, seq=0, position=3, rid="r1"),
    p.Started(job_id="job-1", attempt=2, seq=1, worker="gpu-worker"),
    p.Progress(job_id="job-1", attempt=2, seq=2, step=5, total=20, preview_jpeg_b64="/9j/4AAQ", loss=0.12),
    p.Completed(
        job_id="job-1", attempt=2, seq=3, images=[IMAGE], params=RESOLVED, timings={"total_s": 1.5},
        warnings=["w"], result={"run_dir": "runs/x"},
    ),
    p.Failed(job_id="job-1", seq=4, error="out_of_memory", message="too big", retryable=True),
    p.Canceled(job_id="job-1", seq=5),
    p.AdapterList(adapters=[ADAPTER], rid="r3"),
    p.EngineStatus(
        model="tiny", device="cpu", dtype="float32", vram_used_mb=1.5, vram_total_mb=80.0, queue_length=2,
        running_job="job-1", loaded_adapters=["style-x"], worker="w", training_run="train-1", rid="r4",
    ),
    p.Ack(request="cancel", detail="job-1", rid="r2"),
    p.ErrorResponse(code="unknown_adapter", message="known: a, b", job_id="job-1", rid="r5"),
]


def _union_members(alias: object) -> set[type]:
    union = typing.get_args(alias)[0]
    return set(typing.get_args(union))


def test_samples_cover_every_message_type():
    assert {type(m) for m in REQUESTS} == _union_members(p.Request)
    assert {type(m) for m in EVENTS} == _union_members(p.Event)


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: m.type)
def test_request_round_trip(message):
    wire = p.encode(message)
    assert json.loads(wire)["type"] == message.type
    assert p.decode_request(wire) == message
    assert p.decode_request(json.loads(wire)) == message


@pytest.mark.parametrize("message", EVENTS, ids=lambda m: m.type)
def test_event_round_trip(message):
    wire = p.encode(message)
    assert p.decode_event(wire) == message
    assert p.decode_event(wire.encode("utf-8")) == message


@pytest.mark.parametrize(
    "wire, fragment",
    [
        ("{not json", "invalid"),
        ('{"type": "launch_missiles"}', "launch_missiles"),
        ('{"type": "generate", "job_id": "j", "owner": "u", "params": {"prompt": "x", "count": 1000}}', "params.count"),
        ('{"type": "generate", "job_id": "j", "owner": "u", "params": {"prompt": 5}}', "params.prompt"),
        ('{"type": "generate", "job_id": "../etc", "owner": "u", "params": {"prompt": "x"}}', "job_id"),
        (
            '{"type": "generate", "job_id": "j", "owner": "u", "params": {"prompt": "x", '
            '"adapters": [{"name": "../../secret"}]}}',
            "adapters.0.name",
        ),
        ('{"type": "img2img", "job_id": "j", "owner": "u", "mode": "variation", "source": "/etc/passwd", '
         '"params": {"prompt": "x"}}', "source"),
        ('{"type": "status", "surprise": 1}', "surprise"),
        # Training options are typed on the wire: unknown names and out-of-range values stop at the door.
        ('{"type": "train", "job_id": "t", "owner": "u", "options": {"seconds": 3}}', "options.seconds"),
        ('{"type": "train", "job_id": "t", "owner": "u", "options": {"rank": 0}}', "options.rank"),
        ('[1, 2, 3]', "invalid"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(wire, fragment):
    with pytest.raises(p.ProtocolError) as info:
        p.decode_request(wire)
    assert fragment in info.value.message


def test_pickle_is_not_a_wire_format():
    import pickle

    with pytest.raises(p.ProtocolError):
        p.decode_request(pickle.dumps(p.StatusRequest()))


@pytest.mark.parametrize("options", [
    {"name": "../escape"}, {"name": "ok", "dataset": "/etc/passwd"}, {"name": "ok", "student_steps": 9},
    {"name": "ok", "resolution": 100}, {"name": "ok", "install": "sometimes"}, {"name": "ok", "teacher_cfg": 0.5},
])
def test_a_distill_request_is_bounded(options):
    """A dataset is a name the engine knows, never a path; every number has bounds."""
    with pytest.raises(p.ProtocolError):
        p.decode_request({"type": "distill", "job_id": "d-1", "owner": "admin", "options": options})
