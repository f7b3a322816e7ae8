"""Languages beyond the user flows (issue 14) on the real bot process over the Discord double: admin
and training replies in the admin's language, gallery posts and highlights in the server's language,
and an engine failure in the requester's language."""

from __future__ import annotations

import pytest
import pytest_asyncio

from tests.bot.conftest import running_stack
from tests.bot.test_gallery_starboard import STAR, promote_to
from tests.bot.test_training_commands import answer, invoke, png, text_of, training_extra

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir, tmp_path_factory):
    """Double + engine + bot with the tiny tagger (training) and a gallery where one star promotes."""
    from tests.bot.conftest import make_adapters
    from tests.training.tiny_tagger import make_tiny_tagger

    tmp = tmp_path_factory.mktemp("languages-admin-stack")
    make_adapters(tmp / "adapters")
    tagger_dir = make_tiny_tagger(tmp / "tagger")
    async with running_stack(tmp, tiny_model_dir, extra=training_extra(tagger_dir), gallery_post="all",
                             gallery="promote_at = 1\npromote_to = 0") as s:
        yield s


def speaking(user: dict, locale: str) -> dict:
    return {**user, "locale": locale}


def field_names(msg: dict) -> set[str]:
    return {f["name"] for f in msg["embeds"][0]["fields"]}


async def test_a_japanese_admin_gets_adapter_replies_in_japanese(stack):
    d = stack.double
    admin = speaking(d.admin, "ja")
    info = await answer(d, await invoke(d, admin, "adapter info", {"name": "ink-style"}))
    assert info["embeds"][0]["title"] == "アダプター ink-style", text_of(info)
    assert {"種類", "既定の重み", "トリガー", "バージョン"} <= field_names(info), text_of(info)
    weight = await answer(d, await invoke(d, admin, "adapter set-weight", {"name": "ink-style", "weight": 0.9}))
    assert "**ink-style** の既定の重みを 0.9 にしました" in weight["content"], weight["content"]
    refused = await answer(d, await invoke(d, admin, "adapter info", {"name": "nobody"}))
    assert refused["content"].startswith("アダプター `nobody` はありません。"), refused["content"]
    # An English admin still reads English.
    english = await answer(d, await invoke(d, d.admin, "adapter info", {"name": "ink-style"}))
    assert {"Kind", "Default weight", "Triggers", "Versions"} <= field_names(english)


async def test_a_japanese_admin_follows_a_training_run_in_japanese(stack):
    """The admin's replies are in the admin's language; the run's live message in the channel, in the server's."""
    d = stack.double
    admin = speaking(d.admin, "ja")
    files = {f"image{i}": (f"p{i}.png", png((200, 40 * i, 90), 4 + 2 * i)) for i in range(1, 4)}
    before = {m["id"] for m in d.channel_messages(d.channel)}
    await d.set_guild_locale("zh-CN")
    try:
        started = await answer(d, await invoke(d, admin, "train start", {"name": "nihongo", "kind": "style",
                                                                        "trigger": "nihongo style"}, files=files),
                               timeout=120)
    finally:
        await d.set_guild_locale("en-US")
    assert "学習ラン" in started["content"] and "を開始しました" in started["content"], started["content"]
    assert "3 枚の画像にキャプションを付けて" in started["content"], started["content"]
    live = [m for m in d.channel_messages(d.channel) if m["id"] not in before and m.get("embeds")]
    assert live and live[0]["embeds"][0]["title"].startswith("训练任务 run-"), live
    labels = {c.get("label") for row in live[0]["components"] for c in row["components"]}
    assert "取消训练" in labels, labels
    status = await answer(d, await invoke(d, admin, "train status"), timeout=60)
    embed = status["embeds"][0]
    assert embed["title"].startswith("学習ラン run-"), embed["title"]
    assert {"アダプター", "状態", "進捗", "損失", "残り時間", "チェックポイント"} <= field_names(status), text_of(status)
    bad = await answer(d, await invoke(d, admin, "train status", {"run": "run-nope"}))
    assert bad["content"] == "学習ラン `run-nope` はありません（/train status を参照）。", bad["content"]


async def test_a_chinese_servers_gallery_post_and_highlight_are_in_chinese(stack):
    d = stack.double
    await promote_to(stack, d.highlight_channel["id"])
    await d.set_guild_locale("zh-CN")
    try:
        before = {m["id"] for m in d.channel_messages(d.gallery_channel)}
        # The requester reads English; the gallery is the whole server's, so it speaks the server's language.
        inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, gallery zh", "steps": 2})
        post = (await d.wait_for(lambda: [m for m in d.channel_messages(d.gallery_channel)
                                          if m["id"] not in before], timeout=90))[0]
        embed = post["embeds"][0]
        assert embed["title"] == "画廊", embed
        assert {"种子", "尺寸", "步数"} <= {f["name"] for f in embed["fields"]}, embed
        labels = {c.get("label") for row in post["components"] for c in row["components"]}
        assert {"混搭", "移除"} <= labels, labels
        result = await d.wait_for(lambda: (d.original(inter) or {}).get("embeds") and d.original(inter), timeout=60)
        assert result["embeds"][0]["title"] == "Done", "the requester's own result stays in their language"

        await d.react(d.bob, post, STAR)
        highlight = (await d.wait_for(lambda: [m for m in d.channel_messages(d.highlight_channel)
                                               if post["id"] in (m.get("content") or "")], timeout=30))[0]
        assert highlight["embeds"][0]["title"] == "画廊精选", highlight["embeds"][0]
        assert "种子" in {f["name"] for f in highlight["embeds"][0]["fields"]}
    finally:
        await d.set_guild_locale("en-US")


async def test_an_engine_failure_reaches_a_japanese_user_in_japanese(stack):
    d = stack.double
    # The adapter file disappears after the engine and the bot listed it: the engine fails the job.
    (stack.tmp / "adapters" / "hero-b.safetensors").unlink()
    inter = await d.invoke_slash(speaking(d.bob, "ja"), d.channel, "imagine",
                                 {"prompt": "1girl, hero_b", "character": "hero-b", "steps": 2})
    msg = await d.wait_for(lambda: "❌" in ((d.original(inter) or {}).get("content") or "") and d.original(inter),
                           timeout=90)
    text = msg["content"]
    assert text.startswith("❌ ジョブ `") and "は失敗しました: アダプターを使用できませんでした" in text, text
    assert "hero-b" in text, "the engine's detail (which adapter, why) is kept"
    assert str(stack.tmp) not in text, "no path of the engine's host"
