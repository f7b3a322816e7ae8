"""Fused LoRA execution: images match the unfused path, and the base comes back bit-identical."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.engine.generation.lora_factory import make_lora


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    import torch
    from diffusers import StableDiffusionXLPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    p.set_progress_bar_config(disable=True)
    yield p
    torch.set_num_threads(threads)


@pytest.fixture
def registry(pipe, tmp_path):
    """A fused registry with three adapters (one also on the text encoders); all deleted afterwards."""
    from engine.generation.adapters import AdapterRegistry

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    make_lora(pipe, adapters / "lcm.safetensors", kind="lcm", seed=1, rank=8,
              target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"])
    make_lora(pipe, adapters / "style-a.safetensors", seed=2, strength=3.0)
    # (Text-encoder LoRA at 1.0: the random tiny UNet amplifies fp32 rounding of strong prompt changes.)
    make_lora(pipe, adapters / "style-b.safetensors", seed=3, text_encoders=True)
    reg = AdapterRegistry(adapters, pipe, lcm_adapter="lcm", max_active=3, lora_execution="fused")
    yield reg
    reg.restore_base()
    names = {n for names in pipe.get_list_adapters().values() for n in names}
    if names:
        pipe.delete_adapters(sorted(names))


def base_weights(pipe) -> dict[str, object]:
    """Every weight a LoRA could be fused into (the layers' base weights), copied."""
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for name, param in getattr(pipe, component).named_parameters():
            if "lora_" not in name:
                out[f"{component}.{name}"] = param.detach().clone()
    return out


def render(pipe) -> np.ndarray:
    import torch

    return pipe("a cat in a hat", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0, height=64,
                width=64, generator=torch.Generator().manual_seed(7), output_type="np").images[0]


def test_200_mix_changes_then_the_base_weights_are_exactly_the_originals(pipe, registry):
    import torch

    registry.apply_mix([("lcm", 0.0), ("style-a", 0.0), ("style-b", 0.0)])  # loaded (peft renames the layers)
    original = base_weights(pipe)
    rng = random.Random(15)
    names = ["lcm", "style-a", "style-b"]
    for _ in range(200):
        chosen = rng.sample(names, rng.randint(0, 3))
        registry.apply_mix([(n, rng.choice([-1.5, -0.3, 0.0, 0.4, 0.8, 1.0, 2.5])) for n in chosen])
    registry.apply_mix([("lcm", 1.0), ("style-b", 0.7)])
    assert registry.lora_execution == "fused"
    fused = base_weights(pipe)
    assert any(not torch.equal(fused[k], original[k]) for k in original), "nothing was fused"
    registry.restore_base()
    after = base_weights(pipe)
    changed = [k for k in original if not torch.equal(after[k], original[k])]
    assert changed == [], f"{len(changed)} base tensors drifted, e.g. {changed[:3]}"


def test_fused_images_equal_unfused_within_one_level(pipe, registry):
    registry.apply_mix([])
    base = render(pipe)
    for mix in ([("style-a", 0.8)], [("lcm", 1.0), ("style-a", 0.6), ("style-b", -0.9)], [("style-b", 1.2)]):
        registry.apply_mix(mix)
        fused = render(pipe)
        registry.restore_base()  # the same mix, run unfused by peft's LoRA layers
        unfused = render(pipe)
        assert np.abs(fused - base).mean() > 1e-3, "the mix did not change the image"
        assert np.abs(fused - unfused).max() <= 1 / 255, mix
    registry.apply_mix([])
    assert np.array_equal(render(pipe), base), "an empty mix after fusing must give the base image again"


def test_reload_of_a_changed_file_refuses_with_the_new_weights(pipe, registry):
    registry.apply_mix([("style-a", 1.0)])
    before = render(pipe)
    make_lora(pipe, registry.adapters_dir / "style-a.safetensors", seed=99, strength=3.0)
    registry.reload()
    registry.apply_mix([("style-a", 1.0)])
    fused = render(pipe)
    registry.restore_base()
    assert np.abs(fused - before).mean() > 1e-3, "the fused mix kept the old file's weights"
    assert np.abs(fused - render(pipe)).max() <= 1 / 255


def test_unknown_execution_is_refused_with_the_choices(pipe, tmp_path):
    from engine.generation.adapters import AdapterRegistry

    with pytest.raises(ValueError, match="fused, unfused"):
        AdapterRegistry(tmp_path, pipe, lora_execution="merged")
