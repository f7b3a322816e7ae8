"""The GPU worker's submit-time check: as strict as before, and cheap (the engine's event loop runs it).

An in-process ``GpuWorker`` on the tiny model (not started: ``_validate`` is what ``submit`` runs
before queueing). The cost is printed as a ratio of the same run's old and new checks, not asserted.
"""

from __future__ import annotations

import random
import time

import pytest

from engine.contract import protocol
from engine.contract import samplers
from engine.contract.errors import EngineError, InvalidRequest
from engine.contract.prompt_syntax import (_collect_steps, _full_schedule, _NoSchedule, _Parser, _text_at,
                                           parse_prompt_attention, prompt_schedule)
from engine.generation import params as params_module
from tests.conftest import write_config

# What a user pastes from a prompt site: weights, de-emphasis, alternations and a prompt edit.
HEAVY = ("masterpiece, best quality, (1girl:1.1), solo, [red|blue|green] hair, [cat|fox] ears, "
         "((smile)), [detailed background], [sunset:night sky:0.6], ") * 4


def naive_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """``prompt_schedule`` as it was: the text of every step where it may change, built from the tree each time."""
    try:
        tree = _Parser(prompt).parse()
    except _NoSchedule:
        return [(steps, prompt)]
    ends: set[int] = {steps}
    _collect_steps(tree, steps, ends)
    schedule: list[tuple[int, str]] = []
    for end in sorted(ends):
        text = _text_at(tree, end)
        if schedule and schedule[-1][1] == text:
            schedule[-1] = (end, text)
        else:
            schedule.append((end, text))
    return schedule


def old_check_prompt_texts(text: str, steps: int) -> None:
    """What resolve_params did before: every step's text, each parsed."""
    for _, step_text in naive_schedule(text, steps):
        parse_prompt_attention(step_text)


def verdict(check, text: str, steps: int) -> str:
    try:
        check(text, steps)
    except InvalidRequest as exc:
        return f"refused: {exc}"
    return "ok"


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny_model_dir):
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from engine.service.gpu_worker import GpuWorker

    config = load_config(write_config(tmp_path_factory.mktemp("validate"), tiny_model_dir))
    return GpuWorker(Generator.from_config(config), config, name="validate-gpu")


def request(prompt: str, **fields) -> protocol.GenerateRequest:
    return protocol.GenerateRequest(job_id="v1", owner="u", params=protocol.GenerationParams(prompt=prompt, **fields))


def test_the_schedule_and_the_prompt_check_are_unchanged_on_random_prompts():
    rng = random.Random(7)
    alphabet = list("ab ,") * 4 + list("[]()|:\\") + ["0.5", "1.2", "1..2", "3", "BREAK "]
    for _ in range(3000):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        steps = rng.choice((1, 2, 7, 30))
        assert prompt_schedule(prompt, steps) == naive_schedule(prompt, steps) == _full_schedule(prompt, steps), prompt
        assert verdict(params_module.check_prompt_texts, prompt, steps) == verdict(old_check_prompt_texts, prompt,
                                                                                   steps), prompt


@pytest.mark.parametrize("fields, says", [
    ({"prompt": "1girl, [(cat:1..2)|dog] ears"}, "is not a number"),  # only in every other step's text
    ({"prompt": "1girl", "negative_prompt": "[lowres:(blurry:1.2.3):0.5]"}, "is not a number"),
    ({"prompt": "1girl", "steps": 61}, "steps must be between"),
    ({"prompt": "1girl", "sampler": "Euler z"}, "unknown sampler"),
    ({"prompt": "1girl", "adapters": [protocol.AdapterWeight(name="nobody")]}, "unknown adapter"),
    ({"prompt": "1girl, <lora:nobody:0.5>"}, "unknown adapter"),
])
def test_bad_input_is_still_refused_at_submit_saying_why(worker, fields, says):
    prompt = fields.pop("prompt")
    with pytest.raises(EngineError) as caught:
        worker.submit(request(prompt, **fields))
    assert says in str(caught.value), str(caught.value)


def test_validation_cost_old_and_new_in_one_run(worker, monkeypatch, capsys):
    heavy = request(HEAVY, steps=60, negative_prompt="lowres, [bad anatomy|bad hands], (worst quality:1.4)")
    plain = request("1girl, solo, long hair, smile, looking at viewer, " * 6, steps=28)

    def per_call(req, n: int = 20) -> float:
        worker._validate(req)  # warm
        start = time.perf_counter()
        for _ in range(n):
            worker._validate(req)
        return (time.perf_counter() - start) / n

    new = {name: per_call(req) for name, req in (("heavy", heavy), ("plain", plain))}
    # The same worker with the check as it was: every step's text built and parsed, the sampler
    # packages searched for on disk at every call.
    monkeypatch.setattr(params_module, "check_prompt_texts", old_check_prompt_texts)
    monkeypatch.setattr(samplers, "_installed", samplers._installed.__wrapped__)
    old = {name: per_call(req) for name, req in (("heavy", heavy), ("plain", plain))}
    with capsys.disabled():
        for name in new:
            print(f"\n_validate {name}: before {old[name] * 1e3:.2f} ms, now {new[name] * 1e3:.2f} ms, "
                  f"ratio {old[name] / new[name]:.1f}x")
