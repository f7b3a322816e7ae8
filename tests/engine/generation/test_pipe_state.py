"""The prompt cache keys on a weights counter: same mix, cache hit; any change, fresh embeddings."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from engine.contract.protocol import AdapterWeight, GenerationParams
from tests.conftest import write_config

TE_STYLE = "te-style"


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tiny_model_dir):
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from tests.engine.generation.lora_factory import make_lora

    config = load_config(write_config(tmp_path_factory.mktemp("pipestate"), tiny_model_dir))
    generator = Generator.from_config(config)
    adapters = config.path(config.adapters.dir)
    make_lora(generator.pipe, adapters / f"{TE_STYLE}.safetensors", seed=4, kind="style", strength=3.0, text_encoders=True)
    generator.registry.reload()
    return generator


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_same_mix_hits_the_prompt_cache_and_a_weight_change_does_not(generator):
    registry, encoder = generator.registry, generator.encoder
    registry.apply_mix([(TE_STYLE, 0.5)])
    half = encoder.encode("1girl, solo", "lowres")
    registry.apply_mix([(TE_STYLE, 0.5)])  # the next job with the same mix
    assert encoder.encode("1girl, solo", "lowres") is half
    registry.apply_mix([(TE_STYLE, 1.0)])
    full = encoder.encode("1girl, solo", "lowres")
    assert not torch.allclose(full.prompt_embeds, half.prompt_embeds)
    registry.apply_mix([(TE_STYLE, 0.5)])
    torch.testing.assert_close(encoder.encode("1girl, solo", "lowres").prompt_embeds, half.prompt_embeds)
    registry.apply_mix([])


def test_a_changed_adapter_file_changes_the_image(generator):
    from tests.engine.generation.lora_factory import make_lora

    params = GenerationParams(prompt="1girl", steps=2, seed=3, adapters=[AdapterWeight(name=TE_STYLE, weight=1.0)])
    before = pixels(generator.generate(params, job_id="ps-before").images[0].path)
    again = pixels(generator.generate(params, job_id="ps-again").images[0].path)
    np.testing.assert_array_equal(before, again)
    path = generator.config.path(generator.config.adapters.dir) / f"{TE_STYLE}.safetensors"
    make_lora(generator.pipe, path, seed=5, kind="style", strength=3.0, text_encoders=True)  # same shapes, new weights
    assert generator.registry.reload()["changed"] == [TE_STYLE]
    after = pixels(generator.generate(params, job_id="ps-after").images[0].path)
    assert np.abs(after - before).mean() > 1.0
