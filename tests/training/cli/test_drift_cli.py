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


def test_a_runs_recommended_checkpoint_gets_its_drift_in_the_run_report(drift_config, tmp_path, capsys):
    """``--checkpoint RUN_DIR``: the recommended checkpoint joins the mix; RUN_DIR/drift holds the
    report and run.json its summary."""
    from diffusers import StableDiffusionXLPipeline

    from tests.engine.generation.lora_factory import make_lora
    from training.cli import main
    from training.data.run_record import checkpoint_dir, read_run, update_run

    run_dir = tmp_path / "run-1"
    pipe = StableDiffusionXLPipeline.from_pretrained(_model_dir(drift_config))
    for step in (3, 6):
        make_lora(pipe, checkpoint_dir(run_dir, step) / "adapter.safetensors", seed=step, sidecar=False)
    update_run(run_dir, status="completed", recommended_checkpoint=3, kind="style", trigger="mystyle")
    code = main(["drift", "--config", str(drift_config), "--checkpoint", str(run_dir), "--modes", "lcm",
                 "--prompt", "1girl", "--seeds", "1", "--lcm-weights", "1.0", "--steps", "4"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((run_dir / "drift" / "drift.json").read_text())
    assert report["mix"] == [{"name": "arcae-drift-checkpoint", "weight": 1.0}]
    recorded = read_run(run_dir)["drift"]
    assert recorded["checkpoint"] == 3 and recorded["recommended"] == report["recommended"]
    assert recorded["summary"].startswith("recommended: lcm")
    code = main(["drift", "--config", str(drift_config), "--checkpoint", f"{run_dir}:9", "--no-tagger"])
    assert code == 2 and "has no checkpoint at step 9; checkpoints: [3, 6]" in capsys.readouterr().err


def _model_dir(config_path):
    import tomllib

    return tomllib.loads(config_path.read_text())["model"]["source"]


def test_a_measured_checkpoint_leaves_the_adapter_list_when_done_or_canceled(drift_config, tmp_path):
    """On the engine the Generator is shared: the checkpoint must not stay loaded or listed."""
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from tests.engine.generation.lora_factory import make_lora
    from training.data.run_record import checkpoint_dir, update_run
    from training.learning.drift import CHECKPOINT_ADAPTER, checkpoint_run

    generator = Generator.from_config(load_config(drift_config))
    run_dir = tmp_path / "run-2"
    make_lora(generator.pipe, checkpoint_dir(run_dir, 2) / "adapter.safetensors", seed=2, sidecar=False)
    update_run(run_dir, status="completed", recommended_checkpoint=2)
    names = lambda: {a.name for a in generator.registry.list()}  # noqa: E731
    settings = dict(prompts=["1girl"], seeds=[1], modes=["tcd"], steps=[4])
    run = checkpoint_run(generator, run_dir, **settings)
    assert CHECKPOINT_ADAPTER in names()
    run.step()
    assert CHECKPOINT_ADAPTER in generator.registry.loaded
    run.cancel()
    assert CHECKPOINT_ADAPTER not in names() and CHECKPOINT_ADAPTER not in generator.registry.loaded
    run = checkpoint_run(generator, run_dir, **settings)
    run.run_all()
    assert CHECKPOINT_ADAPTER not in names() and run.report.rows[0].mode == "tcd"
