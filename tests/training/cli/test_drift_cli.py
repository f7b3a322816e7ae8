"""``python -m training drift`` on the tiny model: the table, drift.json and drift.png for a mix,
every installed fast mode measured at the swept weights and steps; bad input says what is allowed."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.conftest import write_config

FAST = """
[[adapters.fast]]
name = "tcd-sdxl"
recipe = "tcd"

[[adapters.fast]]
name = "dmd2-sdxl-4step"
recipe = "dmd2"
"""


@pytest.fixture(scope="module")
def drift_config(tmp_path_factory, tiny_model_dir):
    """A config for the tiny model with LCM, TCD and DMD2 adapters (random LoRAs), a style LoRA
    for the mix and the tiny WD tagger."""
    from diffusers import StableDiffusionXLPipeline

    from tests.engine.generation.lora_factory import make_lora
    from tests.training.tiny_tagger import make_tiny_tagger

    root = tmp_path_factory.mktemp("drift")
    tagger = make_tiny_tagger(root / "tagger")
    path = write_config(root, tiny_model_dir, FAST + f'\n[tagger]\nmodel = "{tagger.as_posix()}"\n')
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    for i, name in enumerate(["lcm-lora-sdxl", "tcd-sdxl", "dmd2-sdxl-4step", "mystyle"]):
        make_lora(pipe, root / "adapters" / f"{name}.safetensors", seed=30 + i,
                  kind="style" if name == "mystyle" else "other")
    return path


def test_drift_command_writes_its_table_json_and_chart(drift_config, tmp_path, capsys):
    from training.cli import main

    out = tmp_path / "report"
    code = main(["drift", "--config", str(drift_config), "--adapter", "mystyle:0.7", "--prompt", "1girl, solo, long hair",
                 "--seeds", "3", "--lcm-weights", "0.5,1.0", "--steps", "4,5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    data = json.loads((out / "drift.json").read_text())
    configs = {(r["mode"], r["weight"], r["steps"]) for r in data["rows"]}
    # LCM at both weights and both step counts; TCD at its default weight; DMD2 only at its 4 steps.
    assert configs == {("lcm", 0.5, 4), ("lcm", 0.5, 5), ("lcm", 1.0, 4), ("lcm", 1.0, 5),
                       ("tcd", 1.0, 4), ("tcd", 1.0, 5), ("dmd2", 1.0, 4)}
    assert data["mix"] == [{"name": "mystyle", "weight": 0.7}] and data["standard"]["steps"] == 4
    for row in data["rows"]:
        assert -1.0 <= row["ssim"] <= 1.0 and 0.0 <= row["recall"] <= 1.0 and row["images"] == 1
    assert data["standard"] and data["recommended"] in data["rows"]
    with Image.open(out / "drift.png") as chart:
        assert chart.format == "PNG"
    assert len(list((out / "images").glob("*.png"))) == 1 + 7  # standard + one per configuration
    best = data["recommended"]
    assert f"recommended: {best['mode']} ({best['adapter']}) at weight {best['weight']:g}, {best['steps']} steps" in printed
    assert "keep" in printed and str(out / "drift.json") in printed


@pytest.mark.parametrize("argv, message", [
    (["--lcm-weights", "0.3,x"], "--lcm-weights: 'x' is not a number"),
    (["--steps", "4-20"], "steps: 4-20 is outside 1-8"),
    (["--modes", "turbo"], "fast mode(s) turbo not installed for this base; installed: dmd2, dmd2-sdxl-4step"),
    (["--adapter", "nosuch"], "unknown adapter"),
])
def test_bad_drift_input_says_what_is_allowed(drift_config, tmp_path, capsys, argv, message):
    from training.cli import main

    code = main(["drift", "--config", str(drift_config), "--no-tagger", "--out", str(tmp_path / "r"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
