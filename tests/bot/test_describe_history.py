"""/describe, /imagine with a picture, and /history: the real bot process over the Discord double.

The bot tags uploads with the tiny WD tagger (tests/training/tiny_tagger.py: a red picture is
``hikari (arcaea)`` with ``long hair`` and ``red theme``, rated general; a blue one is ``tairitsu
(arcaea)``, rated questionable); the engine runs the tiny SDXL model. One stack serves the module.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine.benchmarks.discord_double import DiscordDouble
from tests.bot.conftest import running_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")

EPHEMERAL = 64
PER_PAGE = 3  # bot.cogs.history.PER_PAGE


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir, tmp_path_factory):
    from tests.training.tiny_tagger import make_tiny_tagger

    tmp = tmp_path_factory.mktemp("describe-stack")
    tagger_dir = make_tiny_tagger(tmp / "tagger")
    extra = f"""
[tagger]
model = "{tagger_dir.as_posix()}"

[intake]
min_side = 32

[content]
blocked_tags = ["nude", "long hair"]
"""
    async with running_stack(tmp, tiny_model_dir, extra=extra, limits={"max_queued_per_user": 10}) as s:
        yield s


# ---------------------------------------------------------------------- helpers

def picture(colour: tuple[int, int, int], *, parameters: str | None = None, size: int = 64) -> bytes:
    im = Image.new("RGB", (size, size), colour)
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


async def invoke(d: DiscordDouble, user: dict, command: str, options: dict | None = None,
                 files: dict[str, tuple[str, bytes]] | None = None, channel: dict | None = None):
    """``/command`` with attachment options (see ``DiscordDouble.invoke_slash``)."""
    return await d.invoke_slash(user, channel or d.channel, command, options, files=files)


def buttons(message: dict) -> list[dict]:
    return [c for row in message.get("components", []) for c in row.get("components", [])]


def button_ids(message: dict) -> list[str]:
    return [c["custom_id"] for c in buttons(message)]


def button(message: dict, label: str) -> str:
    return next(c["custom_id"] for c in buttons(message) if label in (c.get("label") or ""))


def answers(d: DiscordDouble, inter) -> list[dict]:
    """What the user saw: an immediate reply (callback type 4) and the follow-ups."""
    out = [cb["data"] for cb in inter.callbacks if cb["type"] == 4]
    return out + d.followups(inter)


async def answer(d: DiscordDouble, inter, timeout: float = 30) -> dict:
    msgs = await d.wait_for(lambda: [m for m in answers(d, inter) if m.get("content") or m.get("embeds")],
                            timeout=timeout)
    return msgs[0]


def text_of(msg: dict) -> str:
    parts = [msg.get("content") or ""]
    for e in msg.get("embeds") or []:
        parts += [e.get("title") or "", e.get("description") or ""]
        parts += [f"{f['name']}: {f['value']}" for f in e.get("fields", [])]
    return "\n".join(parts)


def finished(d: DiscordDouble, inter) -> dict | None:
    msg = d.original(inter)
    return msg if msg and msg.get("embeds") and any(c.startswith("arcae:reroll:") for c in button_ids(msg)) else None


def result_png(d: DiscordDouble, msg: dict) -> tuple[np.ndarray, str]:
    data = d.attachments[int(msg["attachments"][0]["id"])]
    im = Image.open(io.BytesIO(data))
    return np.asarray(im.convert("RGB"), dtype=np.int16), im.info.get("parameters", "")


def field(msg: dict, name: str) -> str:
    return next(f["value"] for f in msg["embeds"][0]["fields"] if f["name"] == name)


def job_ids(msg: dict) -> list[str]:
    """The jobs a /history page lists, top to bottom."""
    return [f["value"].strip("`") for e in msg["embeds"] for f in e["fields"] if f["name"] == "Job"]


def job_of(msg: dict) -> str:
    return next(c.split(":")[2] for c in button_ids(msg) if c.startswith("arcae:reroll:"))


async def modal_of(d: DiscordDouble, inter, timeout: float = 10) -> dict:
    await d.wait_for(lambda: inter.callbacks, timeout=timeout)
    assert inter.callbacks[0]["type"] == 9, inter.callbacks
    return inter.callbacks[0]["data"]


def modal_values(modal: dict) -> dict[str, str]:
    return {c["custom_id"]: c.get("value", "") for row in modal["components"] for c in row["components"]}


# ---------------------------------------------------------------------- /describe

async def test_describe_gives_the_tiny_taggers_tags_characters_first(stack):
    d = stack.double
    red = picture((255, 0, 0))
    inter = await invoke(d, d.alice, "describe", files={"image": ("red.png", red)}, channel=d.nsfw_channel)
    msg = await answer(d, inter)
    prompt = msg["embeds"][0]["description"].strip("`\n")
    tags = [t.strip() for t in prompt.split(",")]
    assert tags[0] == "hikari \\(arcaea\\)", tags
    assert {"1girl", "solo", "long hair", "red theme"} <= set(tags), tags
    assert tags.index("1girl") < tags.index("red theme"), "general tags by confidence"
    assert "general" in text_of(msg).lower(), "the rating is shown"
    assert any("Imagine" in (b.get("label") or "") for b in buttons(msg))

    # In a channel that is not age-restricted a blocked tag is never shown.
    sfw = await invoke(d, d.alice, "describe", files={"image": ("red.png", red)})
    tags_sfw = text_of(await answer(d, sfw))
    assert "hikari \\(arcaea\\)" in tags_sfw and "long hair" not in tags_sfw


async def test_describe_refuses_tags_of_a_questionable_picture_outside_age_restricted_channels(stack):
    d = stack.double
    blue = picture((0, 0, 255))
    inter = await invoke(d, d.alice, "describe", files={"image": ("blue.png", blue)})
    msg = await answer(d, inter)
    text = text_of(msg)
    assert "questionable" in text and "age-restricted" in text
    assert "tairitsu" not in text and "blue theme" not in text and not buttons(msg)
    nsfw = await invoke(d, d.alice, "describe", files={"image": ("blue.png", blue)}, channel=d.nsfw_channel)
    assert "tairitsu \\(arcaea\\)" in text_of(await answer(d, nsfw))


async def test_describe_imagine_button_starts_a_job_from_the_prompt(stack):
    d = stack.double
    inter = await invoke(d, d.alice, "describe", files={"image": ("red.png", picture((255, 0, 0)))},
                         channel=d.nsfw_channel)
    msg = await answer(d, inter)
    press = await d.click(d.alice, msg, button(msg, "Imagine this"))
    modal = await modal_of(d, press)
    values = modal_values(modal)
    assert values["prompt"].startswith("hikari \\(arcaea\\), 1girl")
    job = await d.submit_modal(d.alice, d.nsfw_channel, modal["custom_id"],
                               {"prompt": values["prompt"], "negative": "", "seed": "3", "steps": "2", "cfg": ""})
    result = await d.wait_for(lambda: finished(d, job), timeout=60)
    _, params = result_png(d, result)
    assert params.startswith("hikari \\(arcaea\\), 1girl") and "Seed: 3" in params


async def test_describe_offers_remix_of_a_png_with_a1111_parameters(stack):
    d = stack.double
    text = ("masterpiece, 1girl, silver hair\nNegative prompt: lowres, bad hands\n"
            "Steps: 3, Sampler: Euler a, CFG scale: 5.5, Seed: 1234, Size: 64x64")
    png = picture((200, 200, 200), parameters=text)
    inter = await invoke(d, d.alice, "describe", files={"image": ("a1111.png", png)})
    msg = await answer(d, inter)
    assert "silver hair" in text_of(msg) and "1234" in text_of(msg)
    press = await d.click(d.alice, msg, button(msg, "Remix with these parameters"))
    modal = await modal_of(d, press)
    values = modal_values(modal)
    assert values == {"prompt": "masterpiece, 1girl, silver hair", "negative": "lowres, bad hands", "seed": "1234",
                      "steps": "3", "cfg": "5.5"}
    job = await d.submit_modal(d.alice, d.channel, modal["custom_id"], values)
    result = await d.wait_for(lambda: finished(d, job), timeout=60)
    _, params = result_png(d, result)
    assert "masterpiece, 1girl, silver hair" in params and "Seed: 1234" in params and "Steps: 3" in params


# ---------------------------------------------------------------------- /imagine with a picture

async def test_imagine_from_a_picture_changes_with_strength(stack):
    d = stack.double
    source = picture((230, 40, 40))
    out = {}
    for strength in (0.3, 0.9):
        inter = await invoke(d, d.alice, "imagine", {"prompt": "1girl, solo", "seed": 5, "steps": 4,
                                                     "strength": strength}, files={"image": ("me.png", source)})
        msg = await d.wait_for(lambda: finished(d, inter), timeout=60)
        pixels, params = result_png(d, msg)
        assert f"Denoising strength: {strength:g}" in params and "Seed: 5" in params, params
        assert field(msg, "Mode") == f"image · strength {strength:g}"
        out[strength] = pixels
    assert out[0.3].shape == out[0.9].shape
    assert np.abs(out[0.3] - out[0.9]).mean() > 1.0, "two strengths gave the same image"


async def test_imagine_refuses_an_attachment_that_is_not_a_picture(stack):
    d = stack.double
    inter = await invoke(d, d.alice, "imagine", {"prompt": "1girl"}, files={"image": ("notes.txt", b"just text\n")})
    msg = await answer(d, inter)
    assert msg.get("flags", 0) & EPHEMERAL
    assert "not an image" in msg["content"] and "Allowed: a PNG, JPEG, WebP, GIF or BMP" in msg["content"]
    assert inter.original_id in d.deleted, "the public 'thinking…' message is removed"
    strength_only = await invoke(d, d.alice, "imagine", {"prompt": "1girl", "strength": 0.5})
    assert "attach one" in (await answer(d, strength_only))["content"]


# ---------------------------------------------------------------------- /history

async def test_history_pages_through_only_the_callers_jobs_of_this_server(stack):
    d = stack.double
    made = []
    for i in range(2 * PER_PAGE + 1):  # the owner makes exactly these in this module: 3 pages
        inter = await d.invoke_slash(d.owner, d.channel, "imagine", {"prompt": f"owner {i}", "steps": 2, "seed": i})
        made.append(inter)
    jobs = []
    for inter in made:
        jobs.append(job_of(await d.wait_for(lambda inter=inter: finished(d, inter), timeout=90)))
    # alice's job in another server must not show in her history here, nor the owner's.
    elsewhere = await d.invoke_slash(d.alice, d.other_channel, "imagine", {"prompt": "far away", "steps": 2},
                                     anywhere=True)
    here = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "near here", "steps": 2})
    await d.wait_for(lambda: finished(d, elsewhere) and finished(d, here), timeout=60)

    inter = await d.invoke_slash(d.owner, d.channel, "history")
    page = await d.wait_for(lambda: d.original(inter), timeout=20)
    assert page.get("flags", 0) & EPHEMERAL
    seen = []
    for n in range(3):
        ids = job_ids(page)
        assert len(ids) == (PER_PAGE if n < 2 else 1), ids
        assert f"Page {n + 1}/3" in text_of(page)
        for job in ids:
            assert {f"arcae:{a}:{job}" for a in ("reroll", "var", "up", "share")} <= set(button_ids(page))
        assert len(page["attachments"]) == len(ids), "each job's image is shown"
        seen += ids
        if n < 2:
            press = await d.click(d.owner, page, button(page, "Older"))
            await d.wait_for(lambda press=press: press.callbacks, timeout=10)
    assert seen == list(reversed(jobs)), "newest first, each job once"

    alice = await d.invoke_slash(d.alice, d.channel, "history")
    alice_text = text_of(await d.wait_for(lambda: d.original(alice), timeout=20))
    assert "near here" in alice_text and "far away" not in alice_text and "owner 0" not in alice_text


async def test_history_buttons_work_with_their_ownership_checks(stack):
    d = stack.double
    made = await d.invoke_slash(d.bob, d.channel, "imagine", {"prompt": "bob's picture", "steps": 2})
    await d.wait_for(lambda: finished(d, made), timeout=60)
    inter = await d.invoke_slash(d.bob, d.channel, "history")
    msg = await d.wait_for(lambda: d.original(inter), timeout=20)
    newest = job_ids(msg)[0]
    reroll = await d.click(d.bob, msg, f"arcae:reroll:{newest}")
    result = await d.wait_for(lambda: finished(d, reroll), timeout=60)
    _, params = result_png(d, result)
    assert "bob's picture" in params
    # Only bob sees his page; a press by anyone else arriving anyway is refused, and nothing is shared.
    share = await d.click(d.alice, msg, f"arcae:share:{newest}")
    assert "does not belong to job" in (await answer(d, share))["content"]
    assert not any(newest in str(m) for m in d.channel_messages(d.gallery_channel))
    # bob's own Share works from the page.
    mine = await d.click(d.bob, msg, f"arcae:share:{newest}")
    assert "Shared" in (await answer(d, mine))["content"]
