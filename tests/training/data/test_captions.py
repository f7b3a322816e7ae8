"""Caption recipes: known tagger outputs give exactly the expected captions."""

from __future__ import annotations

import pytest
from PIL import Image

from engine.contract.config import TaggerConfig
from training.data.captions import (
    CaptionError,
    CaptionRecipe,
    build_caption,
    caption_from_override,
    escape_tag,
    normalize_tag,
)
from training.data.tagger import TagResult, WDTagger
from tests.training.tiny_tagger import make_tiny_tagger

RESULT = TagResult(
    rating="sensitive",
    ratings={"general": 0.2, "sensitive": 0.7, "questionable": 0.05, "explicit": 0.01},
    general=[
        ("solo", 0.91),
        ("1girl", 0.97),
        ("long hair", 0.80),
        ("simple background", 0.75),
        ("^_^", 0.60),
        ("(o)_(o)", 0.55),
        ("white background", 0.50),
        ("hat", 0.45),
        ("smile", 0.40),
    ],
    character=[("hikari (arcaea)", 0.95), ("tairitsu (arcaea)", 0.88)],
)


def test_character_recipe_trigger_weighted_characters_then_general_by_confidence():
    recipe = CaptionRecipe(kind="character", trigger="hkr", character_tag_weight=1.2, always_drop=("white_background",))
    cap = build_caption(RESULT, recipe)
    assert cap.text == (
        "hkr, (hikari \\(arcaea\\):1.2), (tairitsu \\(arcaea\\):1.2), 1girl, solo, long hair, "
        "simple background, ^_^, \\(o\\)_\\(o\\), hat, smile"
    )
    assert cap.keep_tokens == 3  # trigger + two character tags stay in front when shuffling
    assert cap.source == "tagger"
    assert "sensitive" not in cap.text  # the rating is metadata, never a caption tag


def test_character_recipe_unweighted_and_limited():
    recipe = CaptionRecipe(kind="character", trigger="hkr", character_tag_weight=1.0, max_tags=3)
    cap = build_caption(RESULT, recipe)
    assert cap.text == "hkr, hikari \\(arcaea\\), tairitsu \\(arcaea\\), 1girl, solo, long hair"
    assert cap.keep_tokens == 3


def test_style_recipe_trigger_then_at_most_n_general_tags():
    cap = build_caption(RESULT, CaptionRecipe(kind="style", trigger="arcstyle", max_tags=4))
    assert cap.text == "arcstyle, 1girl, solo, long hair, simple background"
    assert cap.keep_tokens == 1
    default = build_caption(RESULT, CaptionRecipe(kind="style", trigger="arcstyle"))
    assert len(default.tags) == 1 + 8  # default N = 8
    assert "hikari" not in default.text  # a style adapter does not learn who is drawn
    assert build_caption(RESULT, CaptionRecipe(kind="style", max_tags=2)).keep_tokens == 0


def test_blacklist_matches_loosely_and_duplicates_go():
    result = TagResult(
        rating="general",
        ratings={},
        general=[("hat", 0.9), ("Long_Hair", 0.8), ("long hair", 0.7), ("hkr", 0.6), ("smile", 0.5)],
        character=[("hikari (arcaea)", 0.9)],
    )
    recipe = CaptionRecipe(
        kind="character", trigger="hkr", character_tag_weight=1.0, blacklist=("HAT", "hikari_\\(arcaea\\)")
    )
    cap = build_caption(result, recipe)
    assert cap.text == "hkr, Long_Hair, smile"  # first spelling wins; "long hair" and "hkr" were duplicates
    assert cap.keep_tokens == 1


def test_override_replaces_the_tagger_and_keeps_the_trigger_first():
    recipe = CaptionRecipe(kind="character", trigger="hkr", always_drop=("smile",))
    cap = caption_from_override("1girl, my_own_tag\nsmile, 1girl, hkr\n", recipe)
    assert cap.text == "hkr, 1girl, my_own_tag, smile"  # as written, de-duplicated, trigger moved first
    assert cap.keep_tokens == 1 and cap.source == "override"
    assert caption_from_override("a, b", CaptionRecipe(kind="style")).text == "a, b"


def test_escaping_and_normalizing():
    assert escape_tag("hikari (arcaea)") == "hikari \\(arcaea\\)"
    assert normalize_tag("(hikari \\(arcaea\\):1.2)") == "hikari (arcaea)"
    assert normalize_tag("Long_Hair") == "long hair"
    assert normalize_tag("^_^") == "^_^"


def test_recipe_from_config_and_bad_settings():
    cfg = TaggerConfig(style_max_tags=5, character_max_tags=30, character_tag_weight=1.3, always_drop=["smile"])
    assert CaptionRecipe.from_config(cfg, "style").tag_limit == 5
    character = CaptionRecipe.from_config(cfg, "character", trigger="x", max_tags=7)
    assert character.tag_limit == 7 and character.character_tag_weight == 1.3 and character.is_dropped("Smile")
    with pytest.raises(CaptionError, match="comma"):
        CaptionRecipe(trigger="a, b")
    with pytest.raises(CaptionError, match="character, style"):
        CaptionRecipe(kind="lora")


def test_tiny_tagger_end_to_end_captions_both_recipes_and_mcut(tmp_path):
    d = make_tiny_tagger(tmp_path / "wd")
    red, blue = Image.new("RGB", (48, 48), (255, 0, 0)), Image.new("RGB", (48, 48), (0, 0, 255))
    character = CaptionRecipe(kind="character", trigger="hkr", character_tag_weight=1.2, always_drop=("simple background",))
    style = CaptionRecipe(kind="style", trigger="arcstyle", max_tags=3)
    plain, mcut = WDTagger.load(d), WDTagger.load(d, mcut=True)
    red_plain, blue_plain = plain.predict([red, blue])
    assert build_caption(red_plain, character).text == (
        "hkr, (hikari \\(arcaea\\):1.2), 1girl, red theme, solo, long hair, open mouth"
    )
    assert build_caption(blue_plain, style).text == "arcstyle, 1girl, blue theme, ^_^"
    (red_mcut,) = mcut.predict([red])
    assert build_caption(red_mcut, character).text == "hkr, (hikari \\(arcaea\\):1.2), 1girl, red theme, solo, long hair"
