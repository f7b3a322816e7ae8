"""bf16 on CPU: generation, LoRA loading (fused and unfused), img2img and a training step.

A GPU runs bf16 by default; running the same paths in bf16 on CPU catches dtype mismatches
(an fp32 tensor meeting a bf16 weight) before a GPU machine ever sees them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.contract.protocol import AdapterWeight, GenerationParams
from tests.conftest import write_config
from tests.engine.generation.lora_factory import make_lora


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    import torch

    from engine.contract.config import load_config
    from engine.generation.generator import Generator

    root = tmp_path_factory.mktemp("bf16")
    path = write_config(root, tiny_model_dir)
    path.write_text(path.read_text().replace('device = "cpu"', 'device = "cpu"\ndtype = "bf16"', 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = Generator.from_config(load_config(path))
    adapters = generator.config.path(generator.config.adapters.dir)
    make_lora(generator.pipe, adapters / "inkstyle.safetensors", seed=1, kind="style", strength=2.0, text_encoders=True)
    make_lora(generator.pipe, adapters / f"{generator.config.adapters.lcm_adapter}.safetensors", seed=2, kind="lcm")
    generator.registry.reload()
    yield generator
    torch.set_num_threads(threads)


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_the_pipeline_runs_in_bf16(env):
    import torch

    assert env.pipe.unet.dtype == torch.bfloat16 and env.pipe.vae.dtype == torch.bfloat16
    assert env.pipe.text_encoder_2.dtype == torch.bfloat16


@pytest.mark.parametrize("execution", ["fused", "unfused"])
def test_generation_with_loras_in_bf16(env, execution):
    mix = [AdapterWeight(name="inkstyle", weight=0.8)]
    if execution == "unfused":
        env.registry.apply_mix([("inkstyle", 0.8)])
        env.registry.restore_base()  # what a training step leaves behind: the mix runs unfused
    plain = env.generate(GenerationParams(prompt="1girl, solo", seed=3, steps=2), job_id=f"plain-{execution}")
    styled = env.generate(GenerationParams(prompt="1girl, solo", seed=3, steps=2, adapters=mix), job_id=f"lora-{execution}")
    fast = env.generate(GenerationParams(prompt="1girl, solo", seed=3, fast=True, adapters=mix), job_id=f"fast-{execution}")
    for out in (plain, styled, fast):
        image = pixels(out.images[0].path)
        assert image.max() > 0 and not out.warnings, out.warnings
    assert np.abs(pixels(plain.images[0].path) - pixels(styled.images[0].path)).mean() > 0.5


def test_img2img_in_bf16(env):
    source = env.generate(GenerationParams(prompt="1girl", seed=5, steps=2), job_id="src").images[0].path
    variation = env.img2img(source, "variation", job_id="var")
    upscale = env.img2img(source, "upscale", job_id="up")
    assert pixels(variation.images[0].path).max() > 0
    assert (upscale.images[0].width, upscale.images[0].height) == (96, 96)


def test_a_training_step_in_bf16_on_the_served_pipeline(env, tmp_path):
    import math

    import torch

    from tests.training.tiny_tagger import make_tiny_tagger
    from tests.training.train_helpers import make_dataset, tiny_options
    from training.learning.trainer import TrainingRun

    dataset = make_dataset(tmp_path / "data", make_tiny_tagger(tmp_path / "tagger"), count=2)
    env.registry.apply_mix([("inkstyle", 1.0)])  # fused into the base; the step must see the original
    env.registry.restore_base()
    run = TrainingRun(env.pipe, tiny_options(dataset, steps=2, batch_size=1), tmp_path / "run", base_model="tiny-sdxl")
    try:
        losses = [run.step().loss for _ in range(2)]
    finally:
        run.release()
    assert all(math.isfinite(loss) for loss in losses), losses
    assert env.pipe.unet.dtype == torch.bfloat16
