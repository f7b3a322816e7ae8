"""One size table: the aspect labels /imagine offers and the engine's size presets agree."""

from __future__ import annotations

from engine.contract.config import parse_config


def test_one_size_table_for_the_bot_aspects_and_the_engine_presets():
    from bot.policy import SDXL_PRESETS, aspect_size
    from engine.contract.sizes import SDXL_SIZES
    from engine.generation.params import parse_size

    full = parse_config({"generation": {"size": "1024x1024"}})
    for preset in SDXL_SIZES:
        # The aspect /imagine offers and the preset name a request may use give the same size.
        assert aspect_size(preset.aspect, full) == parse_size(preset.name) == (preset.width, preset.height)
    assert list(SDXL_PRESETS) == ["1:1", "4:5", "2:3", "9:16", "5:4", "3:2", "16:9"]
