"""The /imagine options of issue 14 without Discord: weighted adapter lists, their autocomplete past Discord's
25 choices, the per-image button layout, the step-preview checks and the stored variation strength."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from bot.cogs.imagine import check_sampler, chosen_size, list_autocomplete, split_weighted
from bot.db import Database
from bot.errors import InvalidOption
from bot.results import MAX_PREVIEW_BYTES, ResultRejected, accept_preview
from bot.views import result_view
from engine.contract import protocol
from engine.contract.config import parse_config

CONFIG = parse_config({"generation": {"min_side": 32, "max_side": 256, "max_pixels": 40000}})


def test_weighted_adapter_lists_parse_and_refuse_with_what_is_allowed():
    assert split_weighted("hikari:0.8, tairitsu , kou: -1", "style") == [
        ("hikari", 0.8), ("tairitsu", None), ("kou", -1.0)]
    with pytest.raises(InvalidOption, match="NAME:WEIGHT"):
        split_weighted("hikari:strong", "style")
    with pytest.raises(InvalidOption, match="between -4 and 4"):
        split_weighted("hikari:5", "style")
    with pytest.raises(InvalidOption, match="listed twice"):
        split_weighted("hikari:0.5, hikari:0.7", "style")


def test_autocomplete_reaches_every_adapter_past_25_and_keeps_weights():
    names = [f"style-{i:02d}" for i in range(60)]
    first = list_autocomplete("", names)
    assert len(first) == 25, "Discord shows at most 25 choices"
    # Adapter 57 is not among the first 25, yet typing a part of its name reaches it.
    assert [c.value for c in list_autocomplete("57", names)] == ["style-57"]
    assert [c.value for c in list_autocomplete("style-03:0.8, style-5", names)][:2] == [
        "style-03:0.8, style-50", "style-03:0.8, style-51"]
    assert "style-05, style-05" not in [c.value for c in list_autocomplete("style-05, style-0", names)]
    assert [c.value for c in list_autocomplete("style-57:0.6", names)] == ["style-57:0.6"], "a typed weight stays"


def _rows(view) -> list[list[str]]:
    """The action rows as discord.py sends them to Discord."""
    return [[c["custom_id"] for c in row["components"]] for row in view.to_components()]


@pytest.mark.parametrize("count", range(1, 9))
def test_result_buttons_fit_discord_for_every_batch_size(count):
    job = "a" * 64  # the longest job id a custom id may carry
    rows = _rows(result_view(job, share=True, count=count))
    assert len(rows) <= 5 and all(len(r) <= 5 for r in rows), rows
    ids = [cid for r in rows for cid in r]
    assert all(len(cid) <= 100 for cid in ids) and len(ids) == len(set(ids))
    if count == 1:
        assert {f"arcae:up:{job}", f"arcae:var:{job}", f"arcae:vsub:{job}"} <= set(ids)
    else:
        assert {f"arcae:up{n}:{job}" for n in range(1, count + 1)} <= set(ids)
        assert {f"arcae:var{n}:{job}" for n in range(1, count + 1)} <= set(ids)
    if count <= 5:
        assert any("vsub" in cid for cid in ids), "a subtle variation is offered while the rows hold it"


def _jpeg(size=(64, 64), fmt="JPEG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_previews_are_checked_before_they_are_shown():
    assert accept_preview(_jpeg())[:2] == b"\xff\xd8"
    for bad, why in ((_jpeg(fmt="PNG"), "JPEG only"), ("not base64!!", "base64"),
                     (_jpeg()[:200], "not a complete"), (_jpeg((1024, 1024)), "pixels"),
                     ("A" * (MAX_PREVIEW_BYTES * 2), "preview over")):
        with pytest.raises(ResultRejected, match=why):
            accept_preview(bad)


def test_size_and_sampler_options_say_what_is_allowed():
    assert chosen_size(None, "96x64", None, CONFIG) == (96, 64)
    assert chosen_size(None, " 96 × 64 ", "2:3", CONFIG) == (96, 64), "an explicit size beats the saved aspect"
    assert chosen_size(None, None, None, CONFIG) == (None, None)
    for size, why in (("100x64", "multiples of 8"), ("512x64", "between 32 and 256"), ("256x256", "at most 40000"),
                      ("wide", "WIDTHxHEIGHT")):
        with pytest.raises(InvalidOption, match=why):
            chosen_size(None, size, None, CONFIG)
    assert check_sampler("dpm++ 2m karras") == "DPM++ 2M Karras"
    with pytest.raises(InvalidOption, match="choose one of: Euler a"):
        check_sampler("LCM")  # fast mode's own sampler is not a user choice


async def test_a_jobs_variation_strength_is_stored(tmp_path):
    db = await Database.open(tmp_path / "arcae.sqlite3")
    try:
        await db.insert_job(job_id="v1", user_id=1, guild_id=2, channel_id=3, kind="variation",
                            params=protocol.GenerationParams(prompt="1girl"), nsfw_channel=False,
                            source_image="j-0.png", strength=0.25)
        assert (await db.get_job("v1")).strength == 0.25
    finally:
        await db.close()
