"""/adapter drift end to end: the real bot process, the Discord double, the real engine (tiny model).

The engine has LCM-LoRA and TCD-LoRA installed (random LoRAs) and the tiny WD tagger; an admin
measures a mix and gets the recommendation, the table, drift.png and drift.json; members are refused;
bad options get a message saying what is allowed.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio

from tests.bot.conftest import make_adapters, running_stack
from tests.bot.test_training_commands import invoke, png, training_extra

pytestmark = pytest.mark.asyncio(loop_scope="module")

EPHEMERAL = 64


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir, tmp_path_factory):
    from engine.benchmarks.lora_synth import make_lora
    from engine.generation.tiny import build_tiny_components
    from tests.training.tiny_tagger import make_tiny_tagger

    tmp = tmp_path_factory.mktemp("drift-stack")
    make_adapters(tmp / "adapters")
    unet = build_tiny_components(0)["unet"]
    for i, name in enumerate(("lcm-lora-sdxl", "tcd-sdxl")):
        make_lora(unet, tmp / "adapters" / f"{name}.safetensors", kind="other", seed=40 + i)
    tagger = make_tiny_tagger(tmp / "tagger")
    # [tagger] and tiny [training] settings as the /train tests use, plus the run report's drift.
    extra = '\n[[adapters.fast]]\nname = "tcd-sdxl"\nrecipe = "tcd"\n' + training_extra(tagger) + "drift_report = true\n"
    async with running_stack(tmp, tiny_model_dir, extra=extra) as s:
        yield s


async def _reply(d, inter, timeout: float = 120) -> dict:
    def replies():
        out = [cb["data"] for cb in inter.callbacks if cb["type"] == 4] + d.followups(inter)
        return [m for m in out if m.get("content")]

    msg = (await d.wait_for(replies, timeout=timeout))[0]
    assert msg.get("flags", 0) & EPHEMERAL, f"not ephemeral: {msg}"
    return msg


def _download(d, attachment: dict) -> bytes:
    return d.attachments[int(attachment["id"])]  # what the double's CDN serves for it


async def test_members_are_refused(stack):
    d = stack.double
    reports = stack.tmp / "data" / "runs" / "drift"
    before = set(reports.iterdir()) if reports.is_dir() else set()
    inter = await d.invoke_slash(d.alice, d.channel, "adapter drift", {"steps": "4"})
    assert "admins only" in (await _reply(d, inter, 15))["content"]
    await asyncio.sleep(1)
    assert (set(reports.iterdir()) if reports.is_dir() else set()) == before, "a refused measurement must not run"


@pytest.mark.parametrize("options, message", [
    ({"lcm_weights": "0.5,3"}, "lcm_weights: 3 is outside 0.1-1.5"),
    ({"steps": "2-12"}, "steps: 2-12 is outside 1-8"),
    ({"adapters": "ink-style:9"}, "is not NAME or NAME:WEIGHT (weight -4 to 4)"),
    ({"seeds": "one"}, "seeds: `one` must be whole numbers"),
])
async def test_bad_options_say_what_is_allowed(stack, options, message):
    d = stack.double
    inter = await d.invoke_slash(d.admin, d.channel, "adapter drift", options)
    assert message in (await _reply(d, inter, 15))["content"]


async def test_an_unknown_adapter_or_mode_is_refused_by_the_engine(stack):
    d = stack.double
    inter = await d.invoke_slash(d.admin, d.channel, "adapter drift", {"modes": "dmd2", "seeds": "1"})
    text = (await _reply(d, inter, 60))["content"]
    assert "fast mode(s) dmd2 not installed for this base; installed: lcm, lcm-lora-sdxl, tcd, tcd-sdxl" in text


async def test_admin_gets_the_table_chart_and_recommendation(stack):
    d = stack.double
    options = {"adapters": "ink-style:0.8", "prompt": "1girl, solo, long hair", "seeds": "1",
               "lcm_weights": "0.5,1", "steps": "4"}
    inter = await d.invoke_slash(d.admin, d.channel, "adapter drift", options)
    msg = await _reply(d, inter, 240)
    text = msg["content"]
    assert "Drift report" in text and "recommended:" in text, text
    assert "lcm" in text and "tcd" in text and "keep" in text
    names = {a["filename"]: a for a in msg["attachments"]}
    assert set(names) >= {"drift.png", "drift.json"}
    assert _download(d, names["drift.png"]).startswith(b"\x89PNG\r\n\x1a\n")
    report = json.loads(_download(d, names["drift.json"]))
    assert {(r["mode"], r["weight"], r["steps"]) for r in report["rows"]} == {
        ("lcm", 0.5, 4), ("lcm", 1.0, 4), ("tcd", 1.0, 4)}
    assert report["mix"] == [{"name": "ink-style", "weight": 0.8}] and report["tagger"]
    assert (stack.tmp / "data" / "runs" / "drift" / f"drift-{inter.id}" / "drift.json").is_file()


async def test_a_trained_runs_report_includes_the_drift_of_its_recommended_checkpoint(stack):
    """[training] drift_report: after scoring, the engine measures the recommended checkpoint in
    every fast mode; run.json gets the summary and /train checkpoints shows it."""
    d = stack.double
    images = {f"image{i + 1}": (f"red{i}.png", png((200 + 15 * i, 20 + 10 * i, 30), 4 + 2 * i)) for i in range(3)}
    start = await invoke(d, d.admin, "train start", {"name": "drifty", "kind": "style", "trigger": "drf",
                                                     "sample_steps": 2, "seed": 1}, files=images)
    started = await _reply(d, start, 60)
    run_id = started["content"].split("`")[1]
    run_json = stack.tmp / "data" / "runs" / run_id / "run.json"

    def drift_recorded():
        return run_json.is_file() and "drift" in json.loads(run_json.read_text())

    await d.wait_for(drift_recorded, timeout=300)
    record = json.loads(run_json.read_text())
    drift = record["drift"]
    assert drift["checkpoint"] == record["recommended_checkpoint"]
    assert drift["summary"].startswith("recommended: ")
    report = json.loads((stack.tmp / "data" / "runs" / run_id / "drift" / "drift.json").read_text())
    assert {r["mode"] for r in report["rows"]} == {"lcm", "tcd"} and report["seeds"] == [1]
    assert report["prompts"] == record["sample_prompts"][:4]
    inter = await invoke(d, d.admin, "train checkpoints", {"run": run_id})
    text = (await _reply(d, inter, 30))["content"]
    assert f"Fast modes with checkpoint {drift['checkpoint']}: recommended: " in text
