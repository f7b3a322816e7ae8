"""LoRA exports under the names other tools look for, checked key by key; reloads drop nothing.

The naming rules below are restated from the tools' own loaders (read, not imported):

- kohya sd-scripts (networks/lora.py) names a module ``<prefix>_<module path with '.' -> '_'>``,
  prefix ``lora_unet`` / ``lora_te1`` (CLIP-L) / ``lora_te2`` (CLIP-G), each with
  ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``; the CLIP module paths are those of the
  original CLIP layout, ``text_model.encoder.layers.N.…``.
- ComfyUI (comfy/lora.py) and AUTOMATIC1111 (extensions-builtin/Lora) map CLIP keys only as
  ``lora_te1_text_model_encoder_layers_{N}_{self_attn_q_proj|…|mlp_fc1|mlp_fc2}`` (te2 alike) and,
  for diffusers files, ``text_encoder.text_model.encoder.layers.{N}.{self_attn.q_proj|…}``;
  UNet keys as ``lora_unet_`` + the diffusers module path with '_' (or SGM block names).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.training.train_helpers import generate, tiny_pipeline

NAME = "arcae_export_test"
CLIP_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 configs), restated.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)


def _lora_modules(model, name: str) -> list[str]:
    """Module paths of ``model`` that carry LoRA adapter ``name``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and name in getattr(m, "lora_A", {})]


def _add_adapters(unet, encoders: dict, *, train_ff: bool = True):
    from peft import LoraConfig

    from training.learning.lora import TEXT_ENCODER_TARGETS, add_training_adapter, unet_targets

    params = add_training_adapter(unet, NAME, LoraConfig(
        r=4, lora_alpha=2, init_lora_weights="gaussian", target_modules=unet_targets(train_ff, False)))
    for component, model in encoders.items():
        te = add_training_adapter(model, NAME, LoraConfig(
            r=4, lora_alpha=2, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_TARGETS))
        params.update({f"{component}.{k}": v for k, v in te.items()})
    return params


@pytest.fixture(scope="module")
def full_size():
    """Full-size SDXL UNet, CLIP-L and CLIP-G on the meta device, with Arcae's training adapter."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        encoders = {
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
        }
        _add_adapters(unet, encoders)
    return unet, encoders


def test_full_size_sdxl_export_uses_the_names_every_tool_reads(full_size):
    from training.learning.kohya_export import diffusers_file_to_kohya
    from training.learning.lora import adapter_file_tensors

    unet, encoders = full_size
    tensors = adapter_file_tensors(unet, NAME, encoders, to_cpu=False)

    unet_modules = _lora_modules(unet, NAME)
    assert len(unet_modules) == 70 * (8 + 2)  # 70 transformer blocks: 2 attentions x 4 + feed-forward 2
    expected_modules = {f"unet.{m}" for m in unet_modules}
    layers = {"text_encoder": 12, "text_encoder_2": 32}
    for component, n in layers.items():
        expected_modules |= {f"{component}.text_model.encoder.layers.{b}.{p}" for b in range(n) for p in CLIP_PROJECTIONS}
    expected = {f"{m}.lora_{ab}.weight" for m in expected_modules for ab in "AB"}
    got = set(tensors)
    assert got - expected == set(), sorted(got - expected)[:5]
    assert expected - got == set(), sorted(expected - got)[:5]
    assert len(got) == 2 * (700 + 48 + 128)

    kohya = diffusers_file_to_kohya(tensors, alpha=2.0)
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    expected_kohya = set()
    for module in expected_modules:
        component, _, path = module.partition(".")
        stem = prefixes[component] + "_" + path.replace(".", "_")
        expected_kohya |= {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"}
    assert set(kohya) == expected_kohya, sorted(set(kohya) ^ expected_kohya)[:5]
    assert len(kohya) == 3 * 876

    # ComfyUI's and A1111's CLIP key patterns: every text-encoder key matches one, per encoder size.
    clip_key = re.compile(r"^lora_te([12])_text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc[12])\.")
    te_keys = [k for k in kohya if k.startswith("lora_te")]
    assert len(te_keys) == 3 * (48 + 128)
    for key in te_keys:
        m = clip_key.match(key)
        assert m, key
        assert int(m[2]) < (12 if m[1] == "1" else 32), key
    assert all(float(kohya[k].numel()) == 1 for k in kohya if k.endswith(".alpha"))


def _source_pipeline():
    """A tiny pipeline with a random (non-zero) training-style adapter on the UNet and both encoders."""
    import torch

    pipe = tiny_pipeline()
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    params = _add_adapters(pipe.unet, encoders, train_ff=False)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key, p in sorted(params.items()):
            if ".lora_B." in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return pipe, encoders


def _image_with_adapter(pipe, encoders):
    from training.learning.lora import AdapterSwitch

    switch = AdapterSwitch([pipe.unet, *encoders.values()])
    switch.activate(NAME, train=False)
    try:
        return generate(pipe)
    finally:
        switch.restore()


def _layer_counts(pipe, name: str) -> dict[str, int]:
    return {c: len(_lora_modules(getattr(pipe, c), name)) for c in ("unet", "text_encoder", "text_encoder_2")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(folder with adapter.safetensors + adapter.kohya.safetensors, image with the adapter, layer counts)."""
    from training.learning.kohya_export import write_kohya_file
    from training.learning.lora import save_adapter_file

    folder = tmp_path_factory.mktemp("export")
    pipe, encoders = _source_pipeline()
    save_adapter_file(folder / "adapter.safetensors", pipe.unet, NAME, encoders)
    write_kohya_file(folder / "adapter.safetensors", folder / "adapter.kohya.safetensors", 2.0, {"ss_network_alpha": "2.0"})
    counts = _layer_counts(pipe, NAME)
    assert counts["text_encoder"] == 3 * 4 and counts["text_encoder_2"] == 3 * 4
    return folder, _image_with_adapter(pipe, encoders), counts


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_tiny_text_encoder_export_reloads_in_diffusers_and_arcae_with_nothing_dropped(exported, tmp_path):
    from engine.generation.adapters import AdapterRegistry

    folder, expected_image, counts = exported
    peft_keys = _keys(folder / "adapter.safetensors")
    kohya_keys = _keys(folder / "adapter.kohya.safetensors")
    assert sum(k.startswith("text_encoder.text_model.encoder.layers.") for k in peft_keys) == 2 * 12
    assert sum(k.startswith("lora_te1_text_model_encoder_layers_") for k in kohya_keys) == 3 * 12
    assert not any(k.startswith(("text_encoder.encoder.", "lora_te1_encoder_")) for k in peft_keys + kohya_keys)

    for weight_name in ("adapter.safetensors", "adapter.kohya.safetensors"):
        plain = tiny_pipeline()  # plain diffusers
        plain.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="x")
        assert _layer_counts(plain, "x") == counts, weight_name
        np.testing.assert_allclose(generate(plain), expected_image, atol=1e-5)

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    shutil.copy(folder / "adapter.safetensors", adapters / "mine.safetensors")
    shutil.copy(folder / "adapter.kohya.safetensors", adapters / "mine_kohya.safetensors")
    for name in ("mine", "mine_kohya"):
        pipe = tiny_pipeline()
        registry = AdapterRegistry(adapters, pipe, write_sidecars=False)
        registry.apply_mix([(name, 1.0)])
        assert _layer_counts(pipe, name) == counts, name
        np.testing.assert_allclose(generate(pipe), expected_image, atol=1e-5)


def _rewrite_keys(src: Path, dest: Path, rename) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    save_file(tensors, str(dest), metadata=meta)


def test_older_arcae_files_without_text_model_still_load_and_convert(exported, tmp_path):
    """Files written before the names were fixed (no ``text_model`` level for CLIP-L) still work."""
    from engine.generation.adapters import AdapterRegistry
    from training.learning.kohya_export import write_kohya_file

    folder, expected_image, counts = exported
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    _rewrite_keys(folder / "adapter.safetensors", adapters / "old.safetensors",
                  lambda k: k.replace("text_encoder.text_model.", "text_encoder.", 1))
    _rewrite_keys(folder / "adapter.kohya.safetensors", adapters / "old_kohya.safetensors",
                  lambda k: k.replace("lora_te1_text_model_", "lora_te1_", 1))
    assert any(k.startswith("text_encoder.encoder.layers.") for k in _keys(adapters / "old.safetensors"))
    for name in ("old", "old_kohya"):
        pipe = tiny_pipeline()
        AdapterRegistry(adapters, pipe, write_sidecars=False).apply_mix([(name, 1.0)])
        assert _layer_counts(pipe, name) == counts, name
        np.testing.assert_allclose(generate(pipe), expected_image, atol=1e-5)

    # Converting an old checkpoint to kohya's format writes the standard names.
    write_kohya_file(adapters / "old.safetensors", tmp_path / "converted.safetensors", 2.0, {})
    converted = _keys(tmp_path / "converted.safetensors")
    assert sum(k.startswith("lora_te1_text_model_encoder_layers_") for k in converted) == 3 * 12
    assert sorted(converted) == sorted(_keys(folder / "adapter.kohya.safetensors"))
