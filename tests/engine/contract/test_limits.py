"""The bot and the engine refuse the same bad input with the same words (one set of limits)."""

from __future__ import annotations

import pytest

from bot.errors import InvalidOption
from bot.policy import check_ranges
from engine.contract.config import parse_config
from engine.contract.errors import InvalidRequest
from engine.contract.protocol import GenerationParams
from engine.generation.params import resolve_params

CONFIG = parse_config({"generation": {"size": "64x64", "min_side": 32, "max_side": 256, "max_pixels": 65536,
                                      "max_prompt_chars": 100}})


@pytest.mark.parametrize("bad, message", [
    (dict(prompt="x" * 101), "prompt must be at most 100 characters (it has 101)"),
    (dict(prompt="   "), "prompt must contain visible text"),
    (dict(prompt="\u200b\u2060\ufeff"), "prompt must contain visible text"),
    (dict(steps=500), "steps must be between 1 and 60 (got 500)"),
    (dict(count=5), "count must be between 1 and 4 (got 5)"),
])
def test_bot_and_engine_refuse_with_the_same_message(bad, message):
    ask = {"prompt": "1girl", "steps": None, "cfg": None, "count": 1, "seed": None, **bad}
    with pytest.raises(InvalidOption) as bot_says:
        check_ranges(CONFIG, weights={}, **ask)
    # Unvalidated, as a remote caller's request is before the engine checks it.
    params = GenerationParams.model_construct(**{**GenerationParams(prompt="x").model_dump(), **ask})
    with pytest.raises(InvalidRequest) as engine_says:
        resolve_params(CONFIG.generation, params)
    assert message in str(bot_says.value)
    assert engine_says.value.message.startswith(message)
