"""/train and /adapter end to end: the real bot process, the Discord double, the real engine.

The engine runs the tiny SDXL model and trains on it (64 px, 6 steps, a checkpoint every 3);
the bot captions uploads with the tiny WD tagger. One stack serves the module; tests run in
file order and build on each other (the adapter promoted in one is rolled back in the next).
Everything is asserted on what an admin would see in Discord, plus the files that decide what
is live (the adapters folder) and the audit log in the bot's SQLite file.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sqlite3
import time
import zipfile
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image, ImageDraw

from tests.bot.conftest import Stack, running_stack
from engine.benchmarks.discord_double import DiscordDouble

pytestmark = pytest.mark.asyncio(loop_scope="module")

EPHEMERAL = 64
ADAPTER = "hikari"


def training_extra(tagger_dir: Path) -> str:
    return f"""
[tagger]
model = "{tagger_dir.as_posix()}"

[intake]
min_side = 32

[training]
steps = 6
rank = 4
resolution = 64
save_every = 3
min_save_every = 1
optimizer = "adamw"
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir, tmp_path_factory):
    """Double + engine + bot, configured with the tiny tagger and tiny training defaults."""
    from tests.training.tiny_tagger import make_tiny_tagger

    tmp = tmp_path_factory.mktemp("train-stack")
    tagger_dir = make_tiny_tagger(tmp / "tagger")
    async with running_stack(tmp, tiny_model_dir, extra=training_extra(tagger_dir)) as s:
        yield s


# ---------------------------------------------------------------------- helpers

def png(colour: tuple[int, int, int], stripe: int) -> bytes:
    """A 64 px image of one colour with a stripe pattern (so no two images have the same pixels)."""
    im = Image.new("RGB", (64, 64), colour)
    draw = ImageDraw.Draw(im)
    for x in range(0, 64, stripe):
        draw.rectangle([x, 0, x + stripe // 2 - 1, 63], fill=tuple(c // 2 for c in colour))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


async def invoke(d: DiscordDouble, user: dict, command: str, options: dict | None = None,
                 files: dict[str, tuple[str, bytes]] | None = None, channel: dict | None = None):
    """``/group sub`` with attachment options (see ``DiscordDouble.invoke_slash``)."""
    return await d.invoke_slash(user, channel or d.channel, command, options, files=files)


def answers(d: DiscordDouble, inter) -> list[dict]:
    """What the user saw: an immediate reply (callback type 4) and the follow-ups."""
    out = [cb["data"] for cb in inter.callbacks if cb["type"] == 4]
    return out + d.followups(inter)


async def answer(d: DiscordDouble, inter, timeout: float = 30) -> dict:
    """The first reply with content or an embed; it must be ephemeral (only the admin sees it)."""
    msgs = await d.wait_for(lambda: [m for m in answers(d, inter) if m.get("content") or m.get("embeds")],
                            timeout=timeout)
    assert msgs[0].get("flags", 0) & EPHEMERAL, f"not ephemeral: {msgs[0]}"
    return msgs[0]


def text_of(msg: dict) -> str:
    parts = [msg.get("content") or ""]
    for e in msg.get("embeds") or []:
        parts += [e.get("title") or "", e.get("description") or ""]
        parts += [f"{f['name']}: {f['value']}" for f in e.get("fields", [])]
    return "\n".join(parts)


def field(msg: dict, name: str) -> str:
    return next(f["value"] for f in msg["embeds"][0]["fields"] if f["name"] == name)


def finished(d: DiscordDouble, inter) -> dict | None:
    msg = d.original(inter)
    custom = [c["custom_id"] for row in (msg or {}).get("components", []) for c in row.get("components", [])]
    return msg if msg and msg.get("embeds") and any(c.startswith("arcae:reroll:") for c in custom) else None


def live_sha(stack: Stack) -> str | None:
    path = stack.tmp / "adapters" / f"{ADAPTER}.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def audit_actions(stack: Stack) -> list[tuple[str, str, int]]:
    with sqlite3.connect(stack.tmp / "data" / "arcae.sqlite3") as conn:
        return conn.execute("SELECT action, target, user_id FROM audit_log ORDER BY id").fetchall()


async def adapters_listed(d: DiscordDouble) -> str:
    inter = await d.invoke_slash(d.alice, d.channel, "adapters")
    return text_of(await answer(d, inter))


# ---------------------------------------------------------------------- tests

async def test_members_are_refused_every_admin_command(stack):
    d = stack.double
    for group in ("train", "adapter"):
        assert str(d.commands[group]["default_member_permissions"]) == str(0x20), f"/{group} not hidden"
    cases = [("train status", {}), ("train cancel", {}), ("train checkpoints", {}),
             ("train captions", {"dataset": ADAPTER}), ("adapter info", {"name": ADAPTER}),
             ("adapter promote", {}), ("adapter rollback", {"name": ADAPTER}),
             ("adapter set-weight", {"name": ADAPTER, "weight": 0.5})]
    for command, options in cases:
        inter = await invoke(d, d.alice, command, options)
        assert "admins only" in (await answer(d, inter, timeout=10))["content"], command
    inter = await invoke(d, d.alice, "train start", {"name": ADAPTER, "kind": "character", "trigger": "hk"},
                         files={"image1": ("a.png", png((220, 30, 30), 8))})
    assert "admins only" in (await answer(d, inter, timeout=10))["content"]
    assert not (stack.tmp / "data" / "datasets" / ADAPTER).exists(), "a refused start must not import anything"


async def test_bad_input_gets_a_clear_message(stack):
    d = stack.double
    base = {"name": ADAPTER, "kind": "character", "trigger": "hk"}
    image = {"image1": ("a.png", png((220, 30, 30), 8))}
    inter = await invoke(d, d.admin, "train start", {**base, "rank": 0}, files=image)
    assert "rank must be at least 1 (got 0)" in (await answer(d, inter))["content"]
    inter = await invoke(d, d.admin, "train start", base)
    text = (await answer(d, inter))["content"]
    assert "no images" in text and ".zip" in text
    inter = await invoke(d, d.admin, "train start", base, files={**image, "image2": ("notes.pdf", b"%PDF-1.4 ...")})
    text = (await answer(d, inter))["content"]
    assert "notes.pdf is not an image" in text and "PNG, JPEG" in text
    inter = await invoke(d, d.admin, "train start", {**base, "name": "../evil"}, files=image)
    assert "invalid adapter name" in (await answer(d, inter))["content"]
    # A file named .png that is not an image: refused by content, nothing imported, no run.
    inter = await invoke(d, d.admin, "train start", base, files={"image1": ("fake.png", b"not really a png")})
    text = (await answer(d, inter))["content"]
    assert "No images imported" in text and "fake.png" in text and "not an image" in text
    assert not (stack.tmp / "data" / "datasets" / ADAPTER).exists()


async def test_admin_trains_from_attachments_while_images_keep_coming(stack):
    d = stack.double
    images = {f"image{i + 1}": (f"red{i}.png", png((200 + 15 * i, 20 + 10 * i, 30), 4 + 2 * i)) for i in range(3)}
    images["image4"] = ("red0.txt", b"hk, 1girl, solo, red theme, my own caption")
    start = await invoke(d, d.admin, "train start",
                         {"name": ADAPTER, "kind": "character", "trigger": "hk", "sample_steps": 2, "seed": 1},
                         files=images)
    started = await answer(d, start, timeout=60)
    assert "Training run" in started["content"] and "3 image(s) captioned" in started["content"], started
    run_id = started["content"].split("`")[1]
    # A user's image, asked for while the run trains, arrives before the run ends.
    imagine = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, solo", "steps": 2, "seed": 5})
    done: dict[str, float] = {}

    def notices() -> list[dict]:
        return [m for m in d.followups(start) if "completed" in (m.get("content") or "")]

    def record() -> bool:
        failed = [m["content"] for m in d.followups(start) if "failed" in (m.get("content") or "")]
        assert not failed, failed
        for key, seen in (("image", lambda: finished(d, imagine)), ("training", notices)):
            if key not in done and seen():
                done[key] = time.monotonic()
        return len(done) == 2

    await d.wait_for(record, timeout=180)
    assert done["image"] < done["training"], "the image waited for the whole training run"
    assert finished(d, imagine)["attachments"]
    notice = notices()
    assert f"`{run_id}`" in notice[0]["content"] and "recommended checkpoint: step" in notice[0]["content"]
    stack.recommended = int(notice[0]["content"].split("recommended checkpoint: step ")[1].split(".")[0])

    complete = await d.invoke_slash(d.admin, d.channel, "train status", {"run": "run-"}, focused="run")
    choices = await d.wait_for(lambda: [c for c in complete.callbacks if c["type"] == 8], timeout=10)
    assert run_id in [c["value"] for c in choices[0]["data"]["choices"]]
    status = await invoke(d, d.admin, "train status")
    msg = await answer(d, status)
    assert field(msg, "Status") == "completed" and "step 6/6 (100%)" in field(msg, "Progress")
    assert field(msg, "Loss") != "—" and field(msg, "Checkpoints") == "3, 6"
    names = [a["filename"] for a in msg["attachments"]]
    assert "loss.png" in names and "samples-step-6.png" in names

    table = await invoke(d, d.admin, "train checkpoints", {"run": run_id})
    msg = await answer(d, table)
    assert "recall" in msg["content"] and "collapse" in msg["content"] and "Recommended: step" in msg["content"]
    assert sorted(a["filename"] for a in msg["attachments"]) == ["step-000003-grid.png", "step-000006-grid.png"]
    caption = (stack.tmp / "data" / "datasets" / ADAPTER / "red0.txt").read_text(encoding="utf-8")
    assert "my own caption" in caption, "an uploaded .txt caption is kept"
    stack.run_id = run_id


async def test_captions_are_shown_and_edited_by_upload(stack):
    d = stack.double
    inter = await invoke(d, d.admin, "train captions", {"dataset": ADAPTER})
    msg = await answer(d, inter)
    assert "red1.png" in msg["content"] and "tag_frequency.png" in [a["filename"] for a in msg["attachments"]]
    inter = await invoke(d, d.admin, "train captions", {"dataset": ADAPTER, "image": "red1"})
    msg = await answer(d, inter)
    assert "1girl 0.9" in msg["content"] and msg["attachments"][0]["filename"] == "red1.png"
    inter = await invoke(d, d.admin, "train captions", {"dataset": ADAPTER},
                         files={"file1": ("red1.txt", b"hk, 1girl, edited by hand"),
                                "file2": ("nobody.txt", b"hk")})
    text = (await answer(d, inter))["content"]
    assert "Updated 1 caption" in text and "nobody.txt" in text and "no image nobody.png" in text
    assert (stack.tmp / "data" / "datasets" / ADAPTER / "red1.txt").read_text().strip() == "hk, 1girl, edited by hand"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("more/red8.png", png((250, 60, 60), 6))
        zf.writestr("more/red8.txt", "hk, 1girl, from the zip")
        zf.writestr("more/red9.png", png((240, 80, 40), 10))
    inter = await invoke(d, d.admin, "train add-images", {"dataset": ADAPTER},
                         files={"image1": ("more.zip", archive.getvalue()),
                                "image2": ("again.png", png((200, 20, 30), 4))})  # same pixels as red0.png
    text = (await answer(d, inter, timeout=60))["content"]
    assert "Added 2 image(s)" in text and "(now 5)" in text and "again.png" in text and "duplicate" in text
    assert (stack.tmp / "data" / "datasets" / ADAPTER / "red8.txt").read_text().strip() == "hk, 1girl, from the zip"
    assert (stack.tmp / "data" / "datasets" / ADAPTER / "red1.txt").read_text().strip() == "hk, 1girl, edited by hand"


async def test_promote_goes_live_without_a_restart_and_imagine_uses_it(stack):
    d = stack.double
    assert ADAPTER not in await adapters_listed(d)
    inter = await invoke(d, d.admin, "adapter promote", {"weight": 0.8})
    text = (await answer(d, inter, timeout=60))["content"]
    assert f"**{ADAPTER}** v1 is live" in text and stack.run_id in text
    listed = await adapters_listed(d)
    assert ADAPTER in listed and "triggers: hk" in listed and "weight: 0.8" in listed
    imagine = await d.invoke_slash(d.alice, d.channel, "imagine",
                                   {"prompt": "1girl", "character": ADAPTER, "steps": 2, "seed": 5})
    msg = await d.wait_for(lambda: finished(d, imagine), timeout=60)
    params = Image.open(io.BytesIO(d.attachments[int(msg["attachments"][0]["id"])])).info.get("parameters", "")
    assert ADAPTER in params and "hk" in params, params
    stack.live_v1 = live_sha(stack)
    complete = await d.invoke_slash(d.admin, d.channel, "adapter info", {"name": "hik"}, focused="name")
    choices = await d.wait_for(lambda: [c for c in complete.callbacks if c["type"] == 8], timeout=10)
    assert [c["value"] for c in choices[0]["data"]["choices"]] == [ADAPTER]
    info = await answer(d, await invoke(d, d.admin, "adapter info", {"name": ADAPTER}))
    assert field(info, "Kind") == "character" and field(info, "Triggers") == "hk"
    assert field(info, "Default weight") == "0.8" and stack.run_id in field(info, "Versions")


async def test_cancel_leaves_the_live_adapter_untouched(stack):
    d = stack.double
    before = live_sha(stack)
    start = await invoke(d, d.admin, "train start", {"name": ADAPTER, "kind": "character", "trigger": "hk",
                                                     "steps": 500, "save_every": 500})
    assert "Training again on dataset" in (await answer(d, start, timeout=60))["content"]

    async def running() -> bool:
        inter = await invoke(d, d.admin, "train status")
        return "running" in text_of(await answer(d, inter))

    deadline = time.monotonic() + 60
    while not await running():
        assert time.monotonic() < deadline, "the second run never started"
    cancel = await invoke(d, d.admin, "train cancel")
    assert "Live adapters are unchanged" in (await answer(d, cancel))["content"]
    deadline = time.monotonic() + 30
    while True:
        msg = await answer(d, await invoke(d, d.admin, "train status"))
        if field(msg, "Status") == "canceled":
            break
        assert time.monotonic() < deadline, text_of(msg)
    assert live_sha(stack) == before, "a canceled run changed the live adapter"
    info = await answer(d, await invoke(d, d.admin, "adapter info", {"name": ADAPTER}))
    assert "v1 (live)" in field(info, "Versions") and "v2" not in field(info, "Versions")
    inter = await invoke(d, d.admin, "train cancel")
    assert "No training run is being trained now" in (await answer(d, inter))["content"]


async def test_a_failed_run_says_why_and_changes_nothing_live(stack):
    d = stack.double
    before = live_sha(stack)
    datasets = stack.tmp / "data" / "datasets"
    shutil.copytree(datasets / ADAPTER, datasets / "broken")
    for caption in (datasets / "broken").glob("*.txt"):
        caption.write_text("", encoding="utf-8")  # as if every caption had been emptied on disk
    start = await invoke(d, d.admin, "train start", {"name": "broken", "kind": "style", "trigger": "br"})
    assert "Training again on dataset `broken`" in (await answer(d, start, timeout=60))["content"]
    notice = await d.wait_for(lambda: [m["content"] for m in d.followups(start) if "failed" in m["content"]],
                              timeout=60)
    assert "every caption" in notice[0] and "empty" in notice[0] and "Live adapters are unchanged" in notice[0]
    msg = await answer(d, await invoke(d, d.admin, "train status"))
    assert field(msg, "Status") == "failed" and "every caption" in field(msg, "Error")
    assert live_sha(stack) == before and not (stack.tmp / "adapters" / "broken.safetensors").exists()


async def test_a_run_survives_a_bot_restart(stack):
    d = stack.double
    start = await invoke(d, d.admin, "train start", {"name": ADAPTER, "kind": "character", "trigger": "hk",
                                                     "steps": 8, "save_every": 4, "sample_steps": 1})
    run_id = (await answer(d, start, timeout=60))["content"].split("`")[1]
    await stack.restart_bot()
    # The interaction that started the run is gone with the old process: the notice comes in the channel.
    mention = f"<@{d.admin['id']}>"
    notice = await d.wait_for(lambda: [m["content"] for m in d.channel_messages(d.channel)
                                       if mention in (m.get("content") or "") and run_id in m["content"]], timeout=120)
    assert "completed" in notice[0], notice
    msg = await answer(d, await invoke(d, d.admin, "train status", {"run": run_id}))
    assert field(msg, "Status") == "completed" and "step 8/8" in field(msg, "Progress")
    assert field(msg, "Checkpoints") == "4, 8"


async def test_set_weight_rollback_and_delete(stack):
    d = stack.double
    other = 6 if stack.recommended == 3 else 3
    inter = await invoke(d, d.admin, "train checkpoints", {"run": stack.run_id, "choose": other})
    msg = await answer(d, inter)
    assert f"Chose checkpoint step {other}" in msg["content"] and f"chosen: step {other}" in msg["content"]
    inter = await invoke(d, d.admin, "train checkpoints", {"run": stack.run_id, "choose": 99})
    assert "no checkpoint at step 99" in (await answer(d, inter))["content"]
    inter = await invoke(d, d.admin, "adapter promote", {"run": stack.run_id})
    text = (await answer(d, inter, timeout=60))["content"]
    assert "v2 is live" in text and f"checkpoint step {other}" in text
    chosen = stack.tmp / "data" / "runs" / stack.run_id / "checkpoints" / f"step-{other:06d}" / "adapter.safetensors"
    assert live_sha(stack) == hashlib.sha256(chosen.read_bytes()).hexdigest() != stack.live_v1
    inter = await invoke(d, d.admin, "adapter set-weight", {"name": ADAPTER, "weight": 0.6})
    assert "default weight 0.6" in (await answer(d, inter))["content"]
    assert "weight: 0.6" in await adapters_listed(d)

    inter = await invoke(d, d.admin, "adapter rollback", {"name": ADAPTER})
    assert "back at v1" in (await answer(d, inter))["content"]
    assert live_sha(stack) == stack.live_v1
    inter = await invoke(d, d.admin, "adapter delete", {"name": ADAPTER})
    assert "no longer live" in (await answer(d, inter))["content"]
    assert ADAPTER not in await adapters_listed(d) and live_sha(stack) is None
    imagine = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl", "character": ADAPTER})
    # Refused by the bot (when it knows other adapters) or by the engine (the job's message says so).
    refused = await d.wait_for(lambda: [text_of(m) for m in [*answers(d, imagine), d.original(imagine) or {}]
                                        if "unknown" in text_of(m).lower()], timeout=30)
    assert ADAPTER in refused[0], refused
    inter = await invoke(d, d.admin, "adapter rollback", {"name": ADAPTER})
    assert "back at v1" in (await answer(d, inter))["content"]
    assert ADAPTER in await adapters_listed(d)

    actions = [a for a, _, _ in audit_actions(stack)]
    for action in ("train.start", "train.captions", "train.add_images", "train.cancel", "adapter.promote",
                   "adapter.set_weight", "adapter.rollback", "adapter.delete"):
        assert action in actions, (action, actions)
    assert all(uid == int(d.admin["id"]) for _, _, uid in audit_actions(stack))


async def test_the_run_record_applies_engine_events_once(tmp_path):
    """Late, repeated or other-attempt events change nothing; a finished run stays finished."""
    from bot.db import Database
    from bot.training_store import TrainingStore

    db = await Database.open(tmp_path / "bot.sqlite3")
    try:
        store = TrainingStore(db)
        await store.insert(run_id="r1", adapter_name="a", kind="style", trigger="t", dataset="a", run_dir="",
                           options={"steps": 6}, created_by=1, channel_id=None, guild_id=None)
        assert await store.record_progress("r1", 1, 5, 3, 6, 0.5)
        assert not await store.record_progress("r1", 1, 4, 2, 6, 0.9), "an older event"
        assert not await store.record_progress("r1", 2, 9, 4, 6, 0.1), "another attempt's event"
        row = await store.get("r1")
        assert (row.status, row.progress_step, row.loss) == ("running", 3, 0.5)
        assert await store.finish("r1", "canceled")
        assert not await store.finish("r1", "completed") and not await store.record_progress("r1", 1, 6, 4, 6, 0.2)
        assert (await store.get("r1")).status == "canceled"
    finally:
        await db.close()


def test_the_bot_side_of_training_never_imports_torch():
    """The bot process must stay light: its training modules and their training/ helpers are torch-free."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import bot.cogs.training, bot.cogs.adapter_admin, bot.training_flow, bot.training_views\n"
            "import training.data.intake, training.data.dataset_folder, training.data.lifecycle, training.data.checkpoints, training.data.tagger\n"
            "import engine.contract.training_options, training.data.run_record, training.data.dataset_add, training.data.upload_checks\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
