"""[engine] compile on the tiny model (CPU, inductor): warmed up at start, no recompile when the mix or weights change."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from engine.contract.protocol import AdapterWeight, GenerationParams
from tests.conftest import write_config
from tests.engine.generation.lora_factory import make_lora

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="inductor on CPU needs a C compiler")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_model_dir):
    import torch
    import torch._dynamo

    from engine.contract.config import load_config
    from engine.generation.generator import Generator

    root = tmp_path_factory.mktemp("compiled")
    path = write_config(root, tiny_model_dir)
    path.write_text(path.read_text().replace('device = "cpu"', 'device = "cpu"\ncompile = "default"', 1))
    config = load_config(path)
    adapters = config.path(config.adapters.dir)
    adapters.mkdir(parents=True, exist_ok=True)
    from diffusers import StableDiffusionXLPipeline

    donor = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    make_lora(donor, adapters / f"{config.adapters.lcm_adapter}.safetensors", seed=2, kind="lcm")
    make_lora(donor, adapters / "inkstyle.safetensors", seed=1, kind="style", strength=2.0)
    make_lora(donor, adapters / "other.safetensors", seed=3, kind="style", strength=2.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    generator = Generator.from_config(config)  # compiles and warms up
    yield generator, donor
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def graphs() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["stats"].values()) and counters["stats"]["unique_graphs"]


def pixels(out) -> np.ndarray:
    with Image.open(out.images[0].path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_mix_and_weight_changes_do_not_recompile(compiled):
    generator, donor = compiled
    assert generator.pipe.unet._compiled_call_impl is not None, "the UNet was not compiled"

    def run(job, **params):
        return generator.generate(GenerationParams(prompt="1girl, solo", seed=4, steps=2, **params), job_id=job)

    run("first")  # the first real job may add the generator's own call shape once
    run("first-fast", fast=True)
    before = graphs()
    a = run("a", adapters=[AdapterWeight(name="inkstyle", weight=0.8)])
    b = run("b", adapters=[AdapterWeight(name="inkstyle", weight=-0.5)])
    run("fast-mix", fast=True, adapters=[AdapterWeight(name="inkstyle", weight=0.8)])
    make_lora(donor, generator.registry.adapters_dir / "inkstyle.safetensors", seed=9, kind="style", strength=2.0)
    generator.registry.reload()  # new weights for a loaded adapter (hot-swapped, fused again in place)
    c = run("c", adapters=[AdapterWeight(name="inkstyle", weight=0.8)])
    assert graphs() == before, f"{graphs() - before} recompiles after mix/weight changes"
    assert np.abs(pixels(a) - pixels(b)).mean() > 0.5 and np.abs(pixels(a) - pixels(c)).mean() > 0.5
