"""/imagine fast: through the real bot and engine: the chosen few-step mode runs with its weight."""

from __future__ import annotations

import pytest
import pytest_asyncio

from tests.bot.conftest import make_adapters, running_stack
from tests.bot.test_bot_e2e import finished, png_parameters, field

pytestmark = pytest.mark.asyncio(loop_scope="module")

DMD2 = "dmd2-sdxl-4step"
EXTRA = f'\n[[adapters.fast]]\nname = "{DMD2}"\nrecipe = "dmd2"\n'


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir, tmp_path_factory):
    from engine.benchmarks.lora_synth import make_lora
    from engine.generation.tiny import build_tiny_components

    tmp = tmp_path_factory.mktemp("fast-stack")
    make_adapters(tmp / "adapters")
    make_lora(build_tiny_components(0)["unet"], tmp / "adapters" / f"{DMD2}.safetensors", kind="other", seed=9)
    async with running_stack(tmp, tiny_model_dir, extra=EXTRA) as s:
        yield s


async def test_imagine_fast_dmd2_with_weight(stack):
    d = stack.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl", "seed": 3, "fast": "dmd2",
                                                                 "fast_weight": 0.8})
    msg = await d.wait_for(lambda: finished(d, inter), timeout=60)
    params = png_parameters(d, msg)
    assert "Fast mode: dmd2" in params and f"<lora:{DMD2}:0.8>" in params and "Steps: 4" in params
    assert "Sampler: LCM, Schedule type: SGM Uniform" in params
    assert "fast (dmd2)" in field(msg, "Mode")


async def test_imagine_fast_mode_not_installed_is_refused_clearly(stack):
    d = stack.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl", "fast": "tcd"})
    text = await d.wait_for(lambda: _any_text(d, inter, "unknown fast mode"), timeout=30)
    assert "'tcd'" in text and "dmd2" in text


def _any_text(double, interaction, needle: str) -> str | None:
    """Any text the user saw for this interaction (reply, edit or follow-up) that contains ``needle``."""
    candidates = [cb.get("data", {}) for cb in interaction.callbacks]
    original = double.original(interaction)
    if original:
        candidates.append(original)
    candidates.extend(double.followups(interaction))
    for data in candidates:
        texts = [data.get("content") or ""] + [e.get("description") or "" for e in data.get("embeds") or []]
        for text in texts:
            if needle in text:
                return text
    return None


async def test_fast_mode_cfg_per_request_within_the_recipes_bounds(stack):
    d = stack.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl", "seed": 4, "fast": "dmd2",
                                                                 "cfg": 0.5, "fast_weight": 0.6})
    msg = await d.wait_for(lambda: finished(d, inter), timeout=60)
    params = png_parameters(d, msg)
    assert "CFG scale: 0.5" in params and f"<lora:{DMD2}:0.6>" in params, params
    refused = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl", "fast": "dmd2", "cfg": 3.0})
    text = await d.wait_for(lambda: _any_text(d, refused, "CFG must be between"), timeout=30)
    assert "between 0 and 1 in fast mode dmd2" in text, text
