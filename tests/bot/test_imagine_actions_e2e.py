"""Issue 14 on the real bot process over the Discord double: previews, per-image actions, per-adapter weights,
sampler and free size. One engine (tiny model) and one bot serve the module; assertions are on what a user sees.
"""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from tests.bot.test_bot_e2e import buttons, ephemeral_reply, field, finished, job_id_of, png_parameters

pytestmark = pytest.mark.asyncio(loop_scope="module")


def attachment_image(double, attachment: dict) -> Image.Image:
    return Image.open(io.BytesIO(double.attachments[int(attachment["id"])]))


def seed_of(double, attachment: dict) -> int:
    return int(re.search(r"Seed: (\d+)", attachment_image(double, attachment).info["parameters"]).group(1))


def source_of(double, attachment: dict) -> str:
    """The source image an img2img result was made from, as its PNG's ``arcae`` chunk records it."""
    request = json.loads(attachment_image(double, attachment).text["arcae"])
    return request["source_image"] if "source_image" in request else request["params"]["source_image"]


async def test_preview_arrives_as_an_attachment_of_a_progress_edit(stack):
    d = stack.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, preview", "steps": 40, "seed": 3})
    msg = await d.wait_for(lambda: finished(d, inter), timeout=90)
    job = job_id_of(msg)
    edits = [c for c in d.calls_to("PATCH", f"/webhooks/{d.app_id}/{inter.token}/messages/")
             if c.json and "Generating" in (c.json.get("content") or "")]
    previews = [c for c in edits if c.files]
    assert previews, f"no progress edit carried a preview: {[c.json for c in edits]}"
    name, data = previews[0].files[0]
    assert name == f"preview_{job}.jpg"
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG" and max(img.size) <= 128
    gaps = [b.at - a.at for a, b in zip(edits, edits[1:])]
    assert all(g >= 0.9 for g in gaps), f"previews made edits faster than progress_edit_interval_s: {gaps}"
    # The result replaces the preview: only the PNG is left on the message.
    assert [a["filename"].endswith(".png") for a in msg["attachments"]] == [True]


async def test_a_canceled_job_drops_its_preview(stack):
    d = stack.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, long", "steps": 60, "seed": 8})
    shown = await d.wait_for(lambda: (m := d.original(inter)) and m.get("attachments") and m, timeout=60)
    assert shown["attachments"][0]["filename"].startswith("preview_")
    job = job_id_of(shown)
    await d.click(d.alice, shown, f"arcae:cancel:{job}")
    final = await d.wait_for(lambda: (m := d.original(inter)) and "canceled" in (m.get("content") or "") and m,
                             timeout=60)
    assert final["attachments"] == [], "the preview of a canceled job stays on its message"


async def batch_of_three(stack) -> dict:
    """A finished count-3 result, made once per module (so each test also runs alone)."""
    if getattr(stack, "batch", None) is None:
        d = stack.double
        inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, batch", "steps": 2, "seed": 40,
                                                                     "count": 3})
        stack.batch = await d.wait_for(lambda: finished(d, inter), timeout=60)
    return stack.batch


async def test_each_image_of_a_batch_has_its_own_actions(stack):
    msg = await batch_of_three(stack)
    job = job_id_of(msg)
    ids = buttons(msg)
    for n in (1, 2, 3):
        assert {f"arcae:up{n}:{job}", f"arcae:var{n}:{job}", f"arcae:vsub{n}:{job}"} <= set(ids), ids
    labels = [c["label"] for row in msg["components"] for c in row["components"]]
    assert {"U1", "U2", "U3", "V1", "V2", "V3", "V2 subtle"} <= set(labels), labels
    assert all(len(row["components"]) <= 5 for row in msg["components"]) and len(msg["components"]) <= 5


async def test_u2_upscales_image_2(stack):
    d = stack.double
    msg = await batch_of_three(stack)
    job = job_id_of(msg)
    up = await d.click(d.bob, msg, f"arcae:up2:{job}")
    result = await d.wait_for(lambda: (m := d.original(up)) and m.get("embeds") and m.get("attachments") and m,
                              timeout=60)
    assert field(result, "Mode").startswith("upscale of image 2")
    assert field(result, "Seed") == str(seed_of(d, msg["attachments"][1]))
    assert attachment_image(d, result["attachments"][0]).width > attachment_image(d, msg["attachments"][1]).width
    assert source_of(d, result["attachments"][0]) == f"{job}-1.png"  # the bot stores image n as <job>-<n-1>


async def test_v3_varies_image_3_strong_and_subtle(stack):
    d = stack.double
    msg = await batch_of_three(stack)
    job = job_id_of(msg)
    strong = await d.click(d.bob, msg, f"arcae:var3:{job}")
    s = await d.wait_for(lambda: finished(d, strong), timeout=60)
    subtle = await d.click(d.bob, msg, f"arcae:vsub3:{job}")
    t = await d.wait_for(lambda: finished(d, subtle), timeout=60)
    assert field(s, "Mode") == "variation of image 3 · strength 0.5"
    assert field(t, "Mode") == "variation of image 3 · strength 0.25"
    assert "Denoising strength: 0.25" in png_parameters(d, t) and "Denoising strength: 0.5" in png_parameters(d, s)
    assert source_of(d, s["attachments"][0]) == source_of(d, t["attachments"][0]) == f"{job}-2.png"


async def test_a_single_image_has_worded_actions(stack):
    d = stack.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, single", "steps": 2, "seed": 9})
    msg = await d.wait_for(lambda: finished(d, inter), timeout=60)
    job = job_id_of(msg)
    assert {f"arcae:up:{job}", f"arcae:var:{job}", f"arcae:vsub:{job}"} <= set(buttons(msg))
    labels = {c["label"] for row in msg["components"] for c in row["components"]}
    assert {"Upscale", "Vary (Strong)", "Vary (Subtle)"} <= labels
    subtle = await d.click(d.bob, msg, f"arcae:vsub:{job}")
    t = await d.wait_for(lambda: finished(d, subtle), timeout=60)
    assert field(t, "Mode") == "variation of image 1 · strength 0.25"


async def test_per_adapter_weights_reach_the_png(stack):
    d = stack.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {
        "prompt": "1girl, hero_a", "style": "ink-style:0.6", "character": "hero-a:0.8, hero-b",
        "character_weight": 0.3, "steps": 2, "seed": 11})
    msg = await d.wait_for(lambda: finished(d, inter), timeout=60)
    params = png_parameters(d, msg)
    for tag in ("<lora:ink-style:0.6>", "<lora:hero-a:0.8>", "<lora:hero-b:0.3>"):
        assert tag in params, params
    hashes = re.search(r'Lora hashes: "([^"]*)"', params).group(1)
    assert {"ink-style", "hero-a", "hero-b"} == {h.split(":")[0].strip() for h in hashes.split(",")}
    adapters = field(msg, "Adapters")
    assert "ink-style:0.6" in adapters and "hero-a:0.8" in adapters and "hero-b:0.3" in adapters

    bad = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "x", "style": "ink-style:loud"})
    await d.wait_for(lambda: bad.callbacks, timeout=5)
    assert "NAME:WEIGHT" in ephemeral_reply(bad)["content"]
    bad = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "x", "character": "hero-a:9"})
    await d.wait_for(lambda: bad.callbacks, timeout=5)
    assert "must be between -4 and 4" in ephemeral_reply(bad)["content"]

    ac = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "x", "character": "hero-a:0.8, her"},
                              focused="character")
    await d.wait_for(lambda: ac.callbacks, timeout=5)
    assert [c["value"] for c in ac.callbacks[0]["data"]["choices"]] == ["hero-a:0.8, hero-b"]


async def test_sampler_and_size_reach_the_infotext(stack):
    d = stack.double
    ac = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "x", "sampler": "karras"}, focused="sampler")
    await d.wait_for(lambda: ac.callbacks, timeout=5)
    assert "DPM++ 2M Karras" in [c["value"] for c in ac.callbacks[0]["data"]["choices"]]
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {
        "prompt": "1girl, wide", "sampler": "DPM++ 2M Karras", "size": "96x64", "steps": 2, "seed": 5})
    msg = await d.wait_for(lambda: finished(d, inter), timeout=60)
    params = png_parameters(d, msg)
    assert "Sampler: DPM++ 2M" in params and "Schedule type: Karras" in params and "Size: 96x64" in params, params
    assert attachment_image(d, msg["attachments"][0]).size == (96, 64)
    for options, expected in (({"size": "100x64"}, "multiples of 8"), ({"size": "big"}, "WIDTHxHEIGHT"),
                              ({"size": "512x512"}, "between 32 and 256"),
                              ({"size": "64x64", "aspect": "1:1"}, "either aspect or size"),
                              ({"sampler": "Euler z"}, "choose one of: Euler a, Euler")):
        bad = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "x", **options})
        await d.wait_for(lambda: bad.callbacks, timeout=5)
        assert expected in ephemeral_reply(bad)["content"], (options, ephemeral_reply(bad))
