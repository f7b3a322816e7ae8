"""[engine] compile on the tiny model (CPU): warmed up at start, no recompile when the mix or weights change.

Recompiles are decided by dynamo's guards, the same for every backend; the test compiles with
dynamo's ``eager`` backend because inductor's C++ builds of the tiny UNet (and even aot_eager's
tracing) took over 5 minutes per graph on this 2-core shared machine (gcc is present; the
production backend is inductor).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.contract.protocol import AdapterWeight, GenerationParams
from tests.conftest import write_config
from tests.engine.generation.lora_factory import make_lora


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_model_dir):
    import torch
    import torch._dynamo

    from engine.contract.config import load_config
    from engine.generation.generator import Generator

    root = tmp_path_factory.mktemp("compiled")
    path = write_config(root, tiny_model_dir)
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
    generator = Generator.from_config(config)
    from engine.generation.compiled import prepare_compiled

    # What from_config does for [engine] compile = "default", with the test's backend.
    engine = generator.config.engine.model_copy(update={"compile": "default"})
    generator.config = generator.config.model_copy(update={"engine": engine})
    prepare_compiled(generator, backend="eager")
    yield generator, donor
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def pixels(out) -> np.ndarray:
    with Image.open(out.images[0].path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_mix_and_weight_changes_do_not_recompile(compiled):
    generator, donor = compiled
    assert generator.pipe.unet._compiled_call_impl is not None, "the UNet was not compiled"

    def run(job, **params):
        return generator.generate(GenerationParams(prompt="1girl, solo", seed=4, steps=2, **params), job_id=job)

    # Each prompt length (75-token chunks; the tiny byte-level tokenizer makes this prompt 4) compiles
    # once: the warm-up's one-chunk prompt does not cover it.
    run("first")
    run("first-fast", fast=True)  # (and the LCM scheduler's integer timesteps)
    both = [AdapterWeight(name="inkstyle", weight=0.3), AdapterWeight(name="other", weight=0.3)]
    run("load", adapters=both)  # a first load adds modules to the LoRA layers: one compile
    run("load-fast", fast=True, adapters=both)
    before = graphs()
    run("other", adapters=[AdapterWeight(name="other", weight=1.5)])
    a = run("a", adapters=[AdapterWeight(name="inkstyle", weight=0.8)])
    b = run("b", adapters=[AdapterWeight(name="inkstyle", weight=-0.5)])
    run("fast-mix", fast=True, adapters=[AdapterWeight(name="inkstyle", weight=0.8)])
    make_lora(donor, generator.registry.adapters_dir / "inkstyle.safetensors", seed=9, kind="style", strength=2.0)
    generator.registry.reload()  # new weights for a loaded adapter (hot-swapped, fused again in place)
    c = run("c", adapters=[AdapterWeight(name="inkstyle", weight=0.8)])
    assert graphs() == before, f"{graphs() - before} recompiles after mix/weight changes"
    assert np.abs(pixels(a) - pixels(b)).mean() > 0.5 and np.abs(pixels(a) - pixels(c)).mean() > 0.5
