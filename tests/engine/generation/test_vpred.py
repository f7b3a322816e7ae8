"""v-prediction bases on the tiny model made with ``make-tiny-model --prediction v``: detected and
served with v settings everywhere (samplers, CFG rescale, img2img, training), recorded in the
infotext, and epsilon-distilled few-step adapters refused with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.contract.errors import InvalidRequest
from engine.contract.protocol import GenerationParams
from tests.conftest import REPO, write_config

LCM = "lcm-lora-sdxl"


@pytest.fixture(scope="module")
def vpred_dir(tmp_path_factory) -> Path:
    """A v-prediction tiny model written by the command line a user runs."""
    dest = tmp_path_factory.mktemp("vpred") / "tiny-vpred"
    done = subprocess.run(
        [sys.executable, "-m", "engine", "make-tiny-model", str(dest), "--prediction", "v"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return dest


@pytest.fixture(scope="module")
def env(tmp_path_factory, vpred_dir):
    """A Generator on the v-prediction tiny model with a (random, epsilon) LCM-LoRA installed."""
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from tests.engine.generation.lora_factory import make_lora

    root = tmp_path_factory.mktemp("vpred-gen")
    config = load_config(write_config(root, vpred_dir))
    generator = Generator.from_config(config)
    make_lora(generator.pipe, config.path(config.adapters.dir) / f"{LCM}.safetensors", seed=2, kind="lcm")
    generator.registry.reload()
    return generator


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_vpred_model_is_detected_and_every_sampler_gets_v_settings(env):
    from engine.generation.infotext import parse_infotext, read_png_metadata

    assert env.model.prediction == "v_prediction"
    for sampler in ("Euler a", "DPM++ 2M Karras", "DDIM", "UniPC"):
        used = []  # the scheduler the pipeline ran with (the generator restores its own afterwards)
        handle = env.pipe.unet.register_forward_hook(lambda *_: used.append(env.pipe.scheduler))
        try:
            out = env.generate(GenerationParams(prompt="1girl", sampler=sampler, steps=2, cfg=5.0, seed=1), job_id="v")
        finally:
            handle.remove()
        config = used[0].config
        assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
            "v_prediction", True, "trailing"), sampler
        assert out.params.cfg_rescale == 0.7
    fields = parse_infotext(read_png_metadata(out.images[0].path)[0])
    assert fields["Noise Schedule"] == "Zero Terminal SNR"
    assert fields["CFG Rescale phi"] == "0.7"


def test_cfg_rescale_changes_the_image_and_is_configurable(env, tmp_path):
    from engine.contract.config import load_config
    from engine.generation.generator import Generator

    params = GenerationParams(prompt="1girl", steps=2, cfg=7.0, seed=4)
    rescaled = env.generate(params, job_id="rescaled")
    text = write_config(tmp_path, env.config.model.source).read_text()
    (tmp_path / "config.toml").write_text(text.replace('name = "tiny-sdxl"', 'name = "tiny-sdxl"\ncfg_rescale = 0.0'))
    plain_config = load_config(tmp_path / "config.toml")
    assert plain_config.model.cfg_rescale == 0.0
    plain = Generator(plain_config, env.model, env.registry).generate(params, job_id="plain")
    assert plain.params.cfg_rescale == 0.0
    assert not np.array_equal(pixels(rescaled.images[0].path), pixels(plain.images[0].path))


def test_variation_runs_with_v_settings(env):
    from engine.generation.infotext import parse_infotext, read_png_metadata

    first = env.generate(GenerationParams(prompt="1girl", steps=2, cfg=5.0, seed=2), job_id="v-src")
    out = env.img2img(first.images[0].path, "variation", job_id="v-var")
    assert env._img2img().scheduler.config.prediction_type == "v_prediction"
    fields = parse_infotext(read_png_metadata(out.images[0].path)[0])
    assert fields["Noise Schedule"] == "Zero Terminal SNR" and fields["Denoising strength"]


def test_epsilon_fast_adapter_on_vpred_base_is_refused(env):
    with pytest.raises(InvalidRequest) as err:
        env.resolve(GenerationParams(prompt="1girl", fast=True))
    message = str(err.value)
    assert "distilled from an epsilon-prediction SDXL model" in message and "v-prediction base" in message
    assert 'prediction = "v"' in message


def test_fast_adapter_declared_for_v_runs_on_vpred_base(env, tmp_path):
    from engine.contract.config import load_config
    from engine.generation.generator import Generator

    extra = '\n[[adapters.fast]]\nname = "lcm-lora-sdxl"\nrecipe = "lcm"\nprediction = "v"\n'
    text = write_config(tmp_path, env.config.model.source).read_text().replace('dir = "adapters"', 'dir = "adapters"' + extra)
    (tmp_path / "config.toml").write_text(text)
    config = load_config(tmp_path / "config.toml")
    out = Generator(config, env.model, env.registry).generate(GenerationParams(prompt="1girl", fast=True, steps=2), job_id="vf")
    assert out.params.fast_mode == "lcm"
    assert env.pipe.scheduler.config.prediction_type == "v_prediction"


def test_config_prediction_v_turns_an_epsilon_folder_into_v(tmp_path, tiny_model_dir):
    from engine.generation.models import load_base_pipeline

    from engine.contract.config import load_config

    text = write_config(tmp_path, tiny_model_dir).read_text().replace('name = "tiny-sdxl"', 'name = "tiny-sdxl"\nprediction = "v"')
    (tmp_path / "config.toml").write_text(text)
    model = load_base_pipeline(load_config(tmp_path / "config.toml"))
    assert model.prediction == "v_prediction"
    assert model.pipe.scheduler.config.rescale_betas_zero_snr is True


def test_single_file_checkpoint_with_v_pred_key_is_v(tmp_path):
    import torch
    from safetensors.torch import save_file

    from engine.generation.models import detect_prediction

    eps_scheduler = type("S", (), {"config": {"prediction_type": "epsilon"}})
    pipe = type("P", (), {"scheduler": eps_scheduler})
    v_file, eps_file = tmp_path / "noob-vpred.safetensors", tmp_path / "animagine.safetensors"
    save_file({"v_pred": torch.zeros(0), "model.diffusion_model.x": torch.zeros(2)}, str(v_file))
    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(eps_file))
    assert detect_prediction(pipe, [v_file]) == "v_prediction"
    assert detect_prediction(pipe, [eps_file]) == "epsilon"


def test_vpred_lora_trains_one_step_with_v_target_and_reloads(env, tmp_path):
    import json

    from safetensors import safe_open

    from tests.training.train_helpers import make_dataset, tiny_options
    from tests.training.tiny_tagger import make_tiny_tagger
    from training.learning.trainer import TrainingRun

    dataset = make_dataset(tmp_path, make_tiny_tagger(tmp_path / "tagger"))
    run = TrainingRun(env.pipe, tiny_options(dataset, steps=1, lr=0.05), tmp_path / "run", base_model="tiny-vpred")
    assert run.math.prediction_type == "v_prediction"
    assert float(run.math.noise_scheduler.alphas_cumprod[-1]) == 0.0  # zero terminal SNR
    result = run.step()
    assert run.status == "completed" and np.isfinite(result.loss)
    adapter = tmp_path / "run" / "adapter.safetensors"
    with safe_open(str(adapter), framework="pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"
    target = env.config.path(env.config.adapters.dir) / "vpred-char.safetensors"
    target.write_bytes(adapter.read_bytes())
    env.registry.reload()
    params = dict(prompt="hkr, 1girl", steps=2, cfg=5.0, seed=3)
    with_lora = env.generate(GenerationParams(**params, adapters=[{"name": "vpred-char", "weight": 1.0}]), job_id="vl")
    without = env.generate(GenerationParams(**params), job_id="vn")
    assert "vpred-char" in env.registry.loaded
    assert not np.array_equal(pixels(with_lora.images[0].path), pixels(without.images[0].path))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "completed"


def test_heun_on_a_vpred_base_warns_that_it_lacks_zero_snr(env):
    out = env.generate(GenerationParams(prompt="1girl", sampler="Heun", steps=2, cfg=5.0, seed=1), job_id="heun")
    assert any("Heun has no zero-terminal-SNR schedule" in w for w in out.warnings)
    euler = env.generate(GenerationParams(prompt="1girl", sampler="Euler", steps=2, cfg=5.0, seed=1), job_id="euler")
    assert not euler.warnings
