"""The /imagine ``fast:`` option: which few-step mode a request asks for, and its weight."""

from __future__ import annotations

import pytest

from bot.cogs.imagine import Imagine, fast_fields
from bot.errors import InvalidOption
from engine.contract import protocol


def test_fast_option_offers_every_mode_and_a_weight():
    params = {p.name: p for p in Imagine.imagine.parameters}
    assert [c.value for c in params["fast"].choices] == ["off", "best", "dmd2", "hyper-sd", "lightning", "tcd", "lcm"]
    assert (params["fast_weight"].min_value, params["fast_weight"].max_value) == (0.1, 1.5)


@pytest.mark.parametrize(
    "choice, saved, expected",
    [
        (None, None, (False, None)),
        (None, True, (True, None)),  # the user's saved "fast" setting: the best installed mode
        ("off", True, (False, None)),
        ("best", None, (True, None)),
        ("dmd2", False, (True, "dmd2")),
    ],
)
def test_fast_choice_becomes_the_request(choice, saved, expected):
    fields = fast_fields(choice, saved, None)
    assert (fields["fast"], fields["fast_mode"]) == expected
    protocol.GenerationParams(prompt="x", **fields)  # valid on the wire


def test_fast_weight_without_fast_mode_is_refused():
    with pytest.raises(InvalidOption, match="fast_weight applies only in fast mode"):
        fast_fields("off", None, 0.5)
    assert fast_fields("tcd", None, 0.5)["fast_weight"] == 0.5
