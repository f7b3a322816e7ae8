"""Fast mode picks a few-step adapter distilled for the request's own adapter mix, says so and
records it; another mix keeps the stock few-step adapter (tiny SDXL model, real registry)."""

from __future__ import annotations

import json

import pytest

from engine.contract.errors import UnknownAdapter
from engine.contract.protocol import AdapterWeight, GenerationParams
from tests.conftest import write_config


def _bind(folder, name: str, mix: list) -> None:
    sidecar = folder / f"{name}.json"
    data = json.loads(sidecar.read_text(encoding="utf-8"))
    data.update({"kind": "lcm", "distilled_for": mix})
    sidecar.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from tests.engine.generation.lora_factory import make_lora

    root = tmp_path_factory.mktemp("fast-distilled")
    config = load_config(write_config(root, tiny_model_dir))
    generator = Generator.from_config(config)
    folder = config.path(config.adapters.dir)
    make_lora(generator.pipe, folder / "style.safetensors", seed=1, kind="style")
    make_lora(generator.pipe, folder / "lcm-lora-sdxl.safetensors", seed=2, kind="lcm")
    make_lora(generator.pipe, folder / "style-fast.safetensors", seed=3, kind="lcm")
    _bind(folder, "style-fast", [["style", 0.8]])
    generator.registry.reload()
    return generator


def _fields(out):
    from engine.generation.infotext import parse_infotext, read_png_metadata

    return parse_infotext(read_png_metadata(out.images[0].path)[0])


def test_fast_runs_the_adapter_distilled_for_the_requests_mix_and_says_so(env):
    params = GenerationParams(prompt="1girl", fast=True, seed=3, adapters=[AdapterWeight(name="style", weight=0.8)])
    out = env.generate(params, job_id="distilled-match")
    assert [a.name for a in out.params.adapters] == ["style", "style-fast"]
    assert out.params.fast_mode == "lcm" and out.params.steps == 4 and out.params.cfg == 1.0
    assert any("style-fast" in w and "distilled for this adapter mix" in w for w in out.warnings)
    fields = _fields(out)
    assert fields["Fast adapter"] == "style-fast (distilled for this mix)"
    assert "style-fast" in fields["Lora hashes"]


def test_a_lora_tag_in_the_prompt_counts_as_the_mix(env):
    out = env.generate(GenerationParams(prompt="<lora:style:0.8> 1girl", fast_mode="lcm", seed=4), job_id="distilled-tag")
    assert "style-fast" in [a.name for a in out.params.adapters]


def test_another_mix_keeps_the_stock_few_step_adapter(env):
    params = GenerationParams(prompt="1girl", fast=True, seed=3, adapters=[AdapterWeight(name="style", weight=0.5)])
    out = env.generate(params, job_id="distilled-other")
    assert [a.name for a in out.params.adapters] == ["style", "lcm-lora-sdxl"]
    assert not any("distilled" in w for w in out.warnings)
    assert "Fast adapter" not in _fields(out)
    base = env.generate(GenerationParams(prompt="1girl", fast=True, seed=3), job_id="distilled-none")
    assert [a.name for a in base.params.adapters] == ["lcm-lora-sdxl"]


def test_without_a_stock_adapter_only_the_matching_mix_runs_fast(env, tmp_path, tiny_model_dir):
    import shutil

    from engine.contract.config import load_config
    from engine.generation.generator import Generator

    config = load_config(write_config(tmp_path, tiny_model_dir))
    folder = config.path(config.adapters.dir)
    folder.mkdir(parents=True, exist_ok=True)
    source = env.config.path(env.config.adapters.dir)
    for name in ("style", "style-fast"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(source / f"{name}{suffix}", folder / f"{name}{suffix}")
    generator = Generator.from_config(config)
    out = generator.resolve(GenerationParams(prompt="1girl", fast=True, adapters=[AdapterWeight(name="style", weight=0.8)]))
    assert [a.name for a in out.adapters] == ["style", "style-fast"]
    with pytest.raises(UnknownAdapter, match="LCM-LoRA"):
        generator.resolve(GenerationParams(prompt="1girl", fast=True, adapters=[AdapterWeight(name="style", weight=1.0)]))
