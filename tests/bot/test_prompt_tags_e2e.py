"""``<lora:NAME:WEIGHT>`` in /imagine: the real bot and engine over the Discord double.

A user pastes an A1111/Civitai prompt with LoRA tags; the bot checks the names before queueing,
the engine applies the adapters, and the PNG's infotext records them (prompt tags and hashes).
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from engine.generation.infotext import addnet_hash, parse_infotext, parse_lora_hashes
from tests.bot.test_bot_e2e import ephemeral_reply, field, finished

pytestmark = pytest.mark.asyncio(loop_scope="module")


def png_bytes(double, message: dict) -> bytes:
    return double.attachments[int(message["attachments"][0]["id"])]


async def test_imagine_with_lora_tags_applies_them_and_records_hashes(stack):
    d = stack.double
    # An age-restricted channel: no safety negative is added, so the pasted negative is the same.
    inter = await d.invoke_slash(d.alice, d.nsfw_channel, "imagine", {
        "prompt": "1girl, smile, <lora:ink-style:0.6> <lora:hero-a:0.8>", "steps": 2, "seed": 5})
    msg = await d.wait_for(lambda: finished(d, inter), timeout=60)
    info = parse_infotext(Image.open(io.BytesIO(png_bytes(d, msg))).info["parameters"])
    assert "<lora:ink-style:0.6>" in info["Prompt"] and "<lora:hero-a:0.8>" in info["Prompt"]
    assert info["Prompt"].count("<lora:ink-style") == 1  # the tag left the text; the mix wrote it once
    adapters = stack.tmp / "adapters"
    assert parse_lora_hashes(info["Lora hashes"]) == {
        "ink-style": addnet_hash(adapters / "ink-style.safetensors")[:12],
        "hero-a": addnet_hash(adapters / "hero-a.safetensors")[:12],
    }
    shown = field(msg, "Adapters")
    assert "ink-style:0.6" in shown and "hero-a:0.8" in shown

    # Pasting that prompt line back gives the same image (same mix, same seed).
    again = await d.invoke_slash(d.alice, d.nsfw_channel, "imagine", {
        "prompt": info["Prompt"], "negative": info["Negative prompt"], "steps": 2, "seed": 5})
    msg2 = await d.wait_for(lambda: finished(d, again), timeout=60)
    assert png_pixels(png_bytes(d, msg2)) == png_pixels(png_bytes(d, msg))


def png_pixels(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


async def test_unknown_lora_tag_is_refused_before_queueing_with_close_names(stack):
    d = stack.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl <lora:ink-styel:1>", "steps": 2})
    await d.wait_for(lambda: inter.callbacks, timeout=5)
    text = ephemeral_reply(inter)["content"]
    assert "ink-styel" in text and "did you mean ink-style" in text
    bad = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl <lora:ink-style:0.5:1>", "steps": 2})
    await d.wait_for(lambda: bad.callbacks, timeout=5)
    assert "give one weight" in ephemeral_reply(bad)["content"]


async def test_malformed_weight_is_refused_before_queueing(stack):
    d = stack.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, (smile:1.2.3), sky", "steps": 2})
    await d.wait_for(lambda: inter.callbacks, timeout=5)
    text = ephemeral_reply(inter)["content"]
    assert "'1.2.3'" in text and "is not a number" in text and "(text:1.2)" in text
