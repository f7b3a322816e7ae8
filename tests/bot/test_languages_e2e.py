"""Languages (issue 14) on the real bot process over the Discord double: a user whose Discord speaks
Japanese or Chinese gets refusals, the job's status and its result buttons in that language, and the
synced commands carry their descriptions in both."""

from __future__ import annotations

import pytest

from tests.bot.test_bot_e2e import ephemeral_reply, finished

pytestmark = pytest.mark.asyncio(loop_scope="module")

LANGUAGES = ("ja", "zh-CN")


def speaking(user: dict, locale: str) -> dict:
    """The same Discord user, with the client language ``locale``."""
    return {**user, "locale": locale}


async def refusal_for(d, user: dict, options: dict) -> str:
    inter = await d.invoke_slash(user, d.channel, "imagine", {"prompt": "1girl, solo", **options})
    await d.wait_for(lambda: ephemeral_reply(inter), timeout=20)
    return ephemeral_reply(inter)["content"]


async def test_a_bad_imagine_option_is_refused_in_the_users_language(stack):
    d = stack.double
    english = await refusal_for(d, d.alice, {"sampler": "nope"})
    assert english.startswith("sampler 'nope' is not available; choose one of: Euler a"), english
    japanese = await refusal_for(d, speaking(d.alice, "ja"), {"sampler": "nope"})
    assert japanese.startswith("サンプラー 'nope' は使えません。次から選んでください: Euler a"), japanese
    chinese = await refusal_for(d, speaking(d.alice, "zh-CN"), {"sampler": "nope"})
    assert chinese.startswith("采样器 'nope' 不可用；请从以下选择：Euler a"), chinese
    # A locale without a catalog reads English.
    assert await refusal_for(d, speaking(d.alice, "fr"), {"sampler": "nope"}) == english


async def test_limit_sentences_from_the_engine_contract_are_translated_too(stack):
    d = stack.double
    english = await refusal_for(d, d.alice, {"steps": 500})
    assert english.startswith("Not started: steps must be between 1 and "), english
    japanese = await refusal_for(d, speaking(d.alice, "ja"), {"steps": 500})
    assert japanese.startswith("開始されませんでした: steps は 1 から ") and "（指定値: 500）" in japanese, japanese
    chinese = await refusal_for(d, speaking(d.alice, "zh-CN"), {"steps": 500})
    assert chinese.startswith("未开始：steps 必须在 1 到 ") and "（当前为 500）" in chinese, chinese


async def test_a_japanese_users_result_carries_japanese_buttons_and_labels(stack):
    d = stack.double
    inter = await d.invoke_slash(speaking(d.bob, "ja"), d.channel, "imagine", {"prompt": "1girl, solo", "steps": 2})
    msg = await d.wait_for(lambda: finished(d, inter), timeout=60)
    labels = [c.get("label") for row in msg["components"] for c in row["components"]]
    assert {"アップスケール", "バリエーション（強）", "再生成", "削除"} <= set(labels), labels
    embed = msg["embeds"][0]
    assert embed["title"] == "完了"
    assert {"シード", "サイズ", "ステップ"} <= {f["name"] for f in embed["fields"]}


async def test_synced_commands_carry_descriptions_in_both_languages(stack):
    d = stack.double
    imagine = d.commands["imagine"]
    assert imagine["description_localizations"] == {"ja": "プロンプトからアニメ画像を生成",
                                                     "zh-CN": "根据提示词生成动漫图像"}
    assert "name_localizations" not in imagine or not imagine["name_localizations"], "command names stay ASCII"
    prompt = next(o for o in imagine["options"] if o["name"] == "prompt")
    assert prompt["description_localizations"]["ja"] == "描きたいもの（danbooru 形式のタグが最適）"
    # Every description of every synced command and option, in both languages.
    missing = []
    for name, command in d.commands.items():
        for item in [command, *command.get("options", []), *(o for sub in command.get("options", [])
                                                             for o in sub.get("options", []) or [])]:
            # "…" is discord.py's placeholder for an option left undescribed (/train's image2..image10).
            if item.get("description") not in (None, "", "…"):
                have = item.get("description_localizations") or {}
                missing += [f"/{name} {item.get('name')} [{lang}]" for lang in LANGUAGES if not have.get(lang)]
    assert not missing, missing


async def test_queue_answers_in_the_users_language(stack):
    d = stack.double
    inter = await d.invoke_slash(speaking(d.alice, "zh-CN"), d.channel, "queue")
    await d.wait_for(lambda: ephemeral_reply(inter), timeout=20)
    text = ephemeral_reply(inter)["content"]
    assert "个任务在等待或运行" in text and "你没有等待中或运行中的任务。" in text, text
