"""/adapter distill-fast end to end: the real bot process, the Discord double, the real engine (tiny model).

An admin distils a few-step adapter for the mix `ink-style:0.8` over a dataset's captions (the stock
LCM-LoRA installed, so the student starts from it); the run's channel message edits itself with the
step count, ends with the judge's numbers, the adapter is installed and `/imagine fast:` with that
mix runs it. Members and other servers are refused; bad options get a message saying what is allowed.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import pytest_asyncio

from tests.bot.conftest import make_adapters, running_stack
from tests.bot.test_bot_e2e import field, finished, png_parameters
from tests.bot.test_training_commands import answer, answers, invoke

pytestmark = pytest.mark.asyncio(loop_scope="module")

NAME = "ink-fast"
EXTRA = "\n[training]\nresolution = 64\nstatus_edit_interval_s = 1.0\n"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir, tmp_path_factory):
    from engine.benchmarks.lora_synth import make_lora
    from engine.generation.tiny import build_tiny_components

    tmp = tmp_path_factory.mktemp("distill-stack")
    make_adapters(tmp / "adapters")
    make_lora(build_tiny_components(0)["unet"], tmp / "adapters" / "lcm-lora-sdxl.safetensors", kind="other", seed=40)
    dataset = tmp / "data" / "datasets" / "ink-style"  # the style adapter's own dataset (captions only)
    dataset.mkdir(parents=True)
    (dataset / "manifest.json").write_text(json.dumps({"name": "ink-style", "images": []}), encoding="utf-8")
    (dataset / "captions.txt").write_text("ink style, 1girl, solo\nink style, landscape, sky\n", encoding="utf-8")
    async with running_stack(tmp, tiny_model_dir, extra=EXTRA) as s:
        yield s


def buttons(msg: dict) -> list[str]:
    return [c["custom_id"] for row in msg.get("components", []) for c in row.get("components", [])]


def status_message(d, run_id: str) -> dict | None:
    for msg in d.channel_messages(d.channel):
        if any(e.get("title") == f"Distillation run {run_id}" for e in msg.get("embeds") or []):
            return msg
    return None


def steps_shown(d, msg: dict) -> list[int]:
    out = []
    for call in d.calls_to("PATCH", f"/channels/{d.channel['id']}/messages/{msg['id']}"):
        progress = next((f["value"] for f in (call.json.get("embeds") or [{}])[0].get("fields", [])
                         if f["name"] == "Progress"), "")
        if m := re.search(r"step (\d+)/", progress):
            out.append(int(m.group(1)))
    return out


def distill_runs(stack) -> set[str]:
    runs = stack.tmp / "data" / "runs"
    return {p.name for p in runs.iterdir() if p.name.startswith("distill-")} if runs.is_dir() else set()


async def test_members_and_other_servers_are_refused(stack):
    d = stack.double
    before = distill_runs(stack)
    inter = await invoke(d, d.alice, "adapter distill-fast", {"name": "sneaky", "mix": "ink-style:0.8"})
    assert "admins only" in (await answer(d, inter, 15))["content"]
    inter = await d.invoke_slash(d.stranger, d.other_channel, "adapter distill-fast", {"name": "sneaky"},
                                 anywhere=True)
    assert "home server" in (await answer(d, inter, 15))["content"]
    await asyncio.sleep(1)
    assert distill_runs(stack) == before, "a refused distillation must not run"


@pytest.mark.parametrize("options, message", [
    ({"name": "no good"}, "name = no good is not allowed; allowed: letters, digits"),
    ({"name": "f", "mix": "ink-style:0.8", "student_steps": 12}, "student_steps = 12 is not allowed; allowed: 1 to 8"),
    ({"name": "f", "mix": "ink-style:0.8", "steps": 999_999}, "steps = 999999 is over this server's cap of"),
    ({"name": "f", "mix": "ink-style:9"}, "is not NAME or NAME:WEIGHT (weight -4 to 4)"),
    ({"name": "f", "mix": "ink-style:0.8", "dataset": "nope"}, "no dataset `nope`. Datasets: ink-style"),
    ({"name": "f", "mix": "hero-a"}, "no dataset is named after the mix's adapters, so give dataset:"),
    ({"name": "ink-style", "mix": "ink-style:0.8"}, "`ink-style` is already a style adapter; choose another name"),
])
async def test_bad_options_say_what_is_allowed(stack, options, message):
    d = stack.double
    inter = await invoke(d, d.admin, "adapter distill-fast", options)
    assert message in (await answer(d, inter, 15))["content"]


async def test_admin_distils_a_mix_and_fast_mode_then_uses_it(stack):
    d = stack.double
    options = {"name": NAME, "mix": "ink-style:0.8", "steps": 4, "teacher_steps": 2, "install": "always"}
    inter = await invoke(d, d.admin, "adapter distill-fast", options)
    started = (await answer(d, inter, 60))["content"]
    assert "Distillation run `distill-" in started and "Live status:" in started, started
    run_id = started.split("`")[1]
    msg = await d.wait_for(lambda: status_message(d, run_id), timeout=10)
    assert f"arcae-run:cancel:{run_id}" in buttons(msg)

    def completed():
        current = d.messages[int(msg["id"])]
        return current if "Distance to the teacher" in (current.get("content") or "") else None

    done = await d.wait_for(completed, timeout=400)
    steps = steps_shown(d, msg)
    assert steps and steps == sorted(steps) and steps[-1] == 4, steps
    text = done["content"]
    assert "Distance to the teacher at 4 steps: before " in text and "after " in text, text
    assert "ecommended" in text and f"now uses **{NAME}**" in text and "ink-style:0.8" in text, text
    assert not buttons(done), "a finished run's message has no Cancel (and no Promote) button"
    names = [a["filename"] for a in done["attachments"]]
    run_dir = stack.tmp / "data" / "runs" / run_id
    assert "loss.png" in names, names
    grids = sorted(run_dir.glob("checkpoints/step-*/grid.png"))
    if grids:  # teacher / stock / distilled grids, when the run writes them
        assert any(n.startswith("samples-step-") for n in names), names
    notice = await d.wait_for(lambda: [m for m in answers(d, inter) if "completed" in (m.get("content") or "")],
                              timeout=30)
    assert f"(**{NAME}**) completed" in notice[0]["content"]

    sidecar = json.loads((stack.tmp / "adapters" / f"{NAME}.json").read_text())
    assert sidecar["kind"] == "lcm" and (stack.tmp / "adapters" / f"{NAME}.safetensors").is_file()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"

    imagine = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl", "seed": 5,
                                                                   "style": "ink-style:0.8", "fast": "best"})
    image = await d.wait_for(lambda: finished(d, imagine), timeout=120)
    assert f"Fast adapter: {NAME} (distilled for this mix)" in png_parameters(d, image)
    assert NAME in field(image, "Adapters")
    assert f"fast (lcm, {NAME} distilled for this mix)" in field(image, "Mode"), "the reply says which adapter ran"


async def test_cancel_button_stops_a_distillation_for_an_admin_only(stack):
    d = stack.double
    options = {"name": "long-fast", "mix": "ink-style:0.8", "steps": 5000, "teacher_steps": 2, "install": "always"}
    started = (await answer(d, await invoke(d, d.admin, "adapter distill-fast", options), 60))["content"]
    run_id = started.split("`")[1]
    msg = await d.wait_for(lambda: status_message(d, run_id), timeout=10)
    refused = await d.click(d.alice, msg, f"arcae-run:cancel:{run_id}")
    assert "admins only" in (await answer(d, refused, timeout=10))["content"]
    await d.click(d.admin, msg, f"arcae-run:cancel:{run_id}")
    ended = await d.wait_for(lambda: (m := d.messages[int(msg["id"])]) and "canceled" in (m.get("content") or "")
                             and m, timeout=60)
    assert "fast mode is unchanged" in ended["content"] and not buttons(ended)
    assert not (stack.tmp / "adapters" / "long-fast.safetensors").exists()


async def test_an_admin_can_install_a_run_the_engine_did_not(stack):
    """install: never (as for a run its judge did not recommend): the message offers Install anyway."""
    d = stack.double
    options = {"name": "kept-fast", "mix": "hero-a:0.6", "dataset": "ink-style", "steps": 2, "teacher_steps": 2,
               "install": "never"}
    run_id = (await answer(d, await invoke(d, d.admin, "adapter distill-fast", options), 60))["content"].split("`")[1]
    msg = await d.wait_for(lambda: status_message(d, run_id), timeout=10)
    custom_id = f"arcae-run:promote:{run_id}"
    done = await d.wait_for(lambda: (m := d.messages[int(msg["id"])]) and custom_id in buttons(m) and m, timeout=300)
    assert "Not installed (install: never)" in done["content"]
    assert not (stack.tmp / "adapters" / "kept-fast.safetensors").exists()
    refused = await d.click(d.alice, done, custom_id)
    assert "admins only" in (await answer(d, refused, timeout=10))["content"]
    installed = await d.click(d.admin, done, custom_id)
    text = (await answer(d, installed, timeout=60))["content"]
    assert "**kept-fast** v1 is live" in text and "hero-a:0.6" in text, text
    assert json.loads((stack.tmp / "adapters" / "kept-fast.json").read_text())["kind"] == "lcm"
    final = await d.wait_for(lambda: (m := d.messages[int(msg["id"])]) and not buttons(m) and m, timeout=15)
    assert "Installed by an admin as **kept-fast**" in final["content"]
