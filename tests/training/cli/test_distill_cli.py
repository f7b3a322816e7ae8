"""``python -m training distill-fast`` on the tiny model: bad input answers with what is allowed
(exit 2) before any model loads; a short run installs a kind-``lcm`` adapter bound to the mix."""

from __future__ import annotations

import json

from tests.conftest import write_config


def _setup(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    dataset = tmp_path / "captions"
    dataset.mkdir()
    (dataset / "captions.txt").write_text("1girl, solo\nlandscape, sky\n", encoding="utf-8")
    return config, dataset


def test_bad_input_says_what_is_allowed(tmp_path, tiny_model_dir, capsys):
    from training.cli import main

    config, dataset = _setup(tmp_path, tiny_model_dir)
    base = ["distill-fast", "--config", str(config), "--dataset", str(dataset)]
    assert main(base + ["--name", "fast", "--mix", "style:heavy"]) == 2
    assert "weight 'heavy' of adapter 'style' is not a number" in capsys.readouterr().err
    assert main(base + ["--name", "fast", "--student-steps", "12"]) == 2
    assert "student_steps = 12 is out of range; allowed: 1 to 8" in capsys.readouterr().err
    assert main(["distill-fast", "--config", str(config), "--name", "fast", "--mix", "style"]) == 2
    assert "--dataset DIR required" in capsys.readouterr().err
    assert main(base + ["--name", "fast", "--mix", "nosuch:0.5", "--out", str(tmp_path / "run")]) == 2
    assert "unknown adapter 'nosuch'" in capsys.readouterr().err


def test_a_short_run_installs_a_few_step_adapter_bound_to_the_mix(tmp_path, tiny_model_dir, capsys):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from engine.generation.tiny import build_tiny_components
    from tests.engine.generation.lora_factory import make_lora
    from training.cli import main

    torch.set_num_threads(1)
    config, dataset = _setup(tmp_path, tiny_model_dir)
    make_lora(StableDiffusionXLPipeline(**build_tiny_components(0)), tmp_path / "adapters" / "style.safetensors", seed=3)
    argv = ["distill-fast", "--config", str(config), "--dataset", str(dataset), "--name", "style-fast",
            "--mix", "style:0.8", "--out", str(tmp_path / "run"), "--steps", "2", "--resolution", "64",
            "--teacher-steps", "2", "--solver-steps", "4", "--rank", "4", "--save-every", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "distill_gain" in out and "started from scratch" in out
    sidecar = json.loads((tmp_path / "adapters" / "style-fast.json").read_text())
    assert sidecar["kind"] == "lcm" and sidecar["distilled_for"] == [["style", 0.8]]
    assert (tmp_path / "adapters" / "style-fast.safetensors").is_file()
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["step-000001", "step-000002"]
