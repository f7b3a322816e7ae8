"""LoRA formats people download for SDXL: which load, which are refused by name, key by key.

Key layouts are built for the full-size SDXL architecture (UNet, CLIP-L, CLIP-G on the meta
device), restating the module choice of kohya sd-scripts (networks/lora.py) and LyCORIS:

- LoRA: every Linear inside a Transformer2DModel (proj_in/out, attn1/attn2 to_q/k/v/out.0,
  ff.net.0.proj, ff.net.2) and, in the text encoders, CLIPAttention and CLIPMLP Linears
  (q/k/v/out_proj, fc1, fc2); ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_`` + the module path
  with ``_``, CLIP paths with their ``text_model`` level; ``.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``.
- LoCon adds the Conv2d and Linear children of ResnetBlock2D, Downsample2D and Upsample2D
  (conv1, conv2, conv_shortcut, time_emb_proj, downsamplers.0.conv, upsamplers.0.conv).
- LyCORIS LoHa: ``hada_w1_a/_b``, ``hada_w2_a/_b``; LoKr: ``lokr_w1``, ``lokr_w2``; LoCon with
  Tucker: ``lora_mid``; DoRA (kohya): a LoRA plus ``dora_scale``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.generation.lora_files import REFUSED_FORMATS, HashCache, detect_format, scan_entry, standard_lora_key
from tests.training.learning.test_lora_export import CLIP_G, CLIP_L, SDXL_UNET

LORA_BLOCKS = ("Transformer2DModel",)
LOCON_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_BLOCKS = ("CLIPAttention", "CLIPMLP")
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def target_modules(models: dict, *, conv: bool) -> dict[str, tuple[str, torch.nn.Module]]:
    """kohya stem -> (component.module path, module) for the modules a LoRA (or LoCon) trains."""
    out = {}
    for component, model in models.items():
        blocks = TE_BLOCKS if component != "unet" else LORA_BLOCKS + (LOCON_BLOCKS if conv else ())
        for name, block in model.named_modules():
            if type(block).__name__ not in blocks:
                continue
            for child_name, child in block.named_modules():
                if child_name and isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    path = f"{name}.{child_name}"
                    stem = standard_lora_key(PREFIXES[component] + path.replace(".", "_"))
                    out[stem] = (f"{component}.{path}", child)
    return out


def _dims(module) -> tuple[int, int, tuple[int, ...]]:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features, ()
    return module.in_channels, module.out_channels, tuple(module.kernel_size)


def layout(fmt: str, modules: dict, rank: int = 1) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a ``fmt`` file over ``modules`` (kohya stems)."""
    keys: dict[str, tuple[int, ...]] = {}
    for stem, (_, module) in modules.items():
        fan_in, fan_out, kernel = _dims(module)
        ones = (1,) * len(kernel)
        keys[f"{stem}.alpha"] = ()
        if fmt == "loha":
            for w in ("w1", "w2"):
                keys[f"{stem}.hada_{w}_a"] = (fan_out, rank)
                keys[f"{stem}.hada_{w}_b"] = (rank, fan_in * int(np.prod(kernel or (1,))))
        elif fmt == "lokr":  # w1 (x) (w2_a @ w2_b): the low-rank form LyCORIS writes for big layers
            keys[f"{stem}.lokr_w1"] = (1, 1)
            keys[f"{stem}.lokr_w2_a"] = (fan_out, rank)
            keys[f"{stem}.lokr_w2_b"] = (rank, fan_in, *kernel)
        elif fmt == "locon-tucker" and kernel and kernel != (1, 1):
            keys[f"{stem}.lora_down.weight"] = (rank, fan_in, 1, 1)
            keys[f"{stem}.lora_mid.weight"] = (rank, rank, *kernel)
            keys[f"{stem}.lora_up.weight"] = (fan_out, rank, 1, 1)
        else:
            keys[f"{stem}.lora_down.weight"] = (rank, fan_in, *kernel)
            keys[f"{stem}.lora_up.weight"] = (fan_out, rank, *ones)
            if fmt == "dora":
                keys[f"{stem}.dora_scale"] = (1, fan_in, *ones)
    return keys


def write(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0, scale: float = 0.0) -> Path:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {
        k: torch.tensor(1.0) if k.endswith(".alpha") else (torch.randn(s, generator=gen) * scale).to(torch.float16)
        for k, s in shapes.items()
    }
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def full_size():
    """Full-size SDXL UNet, CLIP-L and CLIP-G on the meta device (no memory, real module names)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
        }


def _diffusers_modules(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """What diffusers makes of a file: peft keys per component (its own converters), module -> shapes."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    state, _ = StableDiffusionXLPipeline.lora_state_dict(str(path))
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for component in PREFIXES:
        part = {k[len(component) + 1:]: v for k, v in state.items() if k.startswith(component + ".")}
        if not part:
            continue
        peft = convert_unet_state_dict_to_peft(part) if component == "unet" else convert_state_dict_to_peft(part)
        for key, value in peft.items():
            module, _, ab = key.rpartition(".lora_")
            out.setdefault(f"{component}.{module}", {})[ab[0]] = tuple(value.shape)
    return out


def _find(models: dict, module_path: str):
    component, _, path = module_path.partition(".")
    named = dict(models[component].named_modules())
    # transformers 5.x CLIPTextModel has no text_model level; the files name it (see lora_files).
    return named.get(path) or named.get(path.removeprefix("text_model."))


@pytest.mark.parametrize("fmt, conv", [("lora", False), ("locon", True)])
def test_full_size_lora_and_locon_with_text_encoders_load_every_key(fmt, conv, full_size, tmp_path):
    modules = target_modules(full_size, conv=conv)
    counts = {c: sum(p.startswith(c + ".") for p, _ in modules.values()) for c in PREFIXES}
    # 70 transformer blocks x 10 Linears + proj_in/proj_out of 11 Transformer2DModels; LoCon adds
    # the 66 convs and time projections of the resnets and samplers; CLIP 6 Linears per layer.
    assert counts == {"unet": 788 if conv else 722, "text_encoder": 6 * 12, "text_encoder_2": 6 * 32}
    path = write(tmp_path / f"{fmt}.safetensors", layout("lora", modules))
    entry = scan_entry(path, default_weight=1.0, lcm_adapter="", hashes=HashCache(), write_sidecars=False)
    assert entry.problem is None and entry.format == "kohya"

    converted = _diffusers_modules(path)
    expected = {p for p, _ in modules.values()}
    # Every module of the file reaches a module of SDXL, with fitting shapes: nothing dropped.
    assert {_standard(m) for m in converted} == {_standard(m) for m in expected}, sorted(
        {_standard(m) for m in converted} ^ {_standard(m) for m in expected})[:6]
    for module_path, shapes in converted.items():
        module = _find(full_size, module_path)
        assert module is not None, module_path
        fan_in, fan_out, kernel = _dims(module)
        assert shapes["A"][1] == fan_in and shapes["B"][0] == fan_out, module_path
        assert tuple(shapes["A"][2:]) == kernel, module_path
    if conv:
        assert any(m.endswith("resnets.0.conv1") for m in converted)
        assert any(m.endswith("downsamplers.0.conv") for m in converted)


def _standard(module_path: str) -> str:
    component, _, path = module_path.partition(".")
    if component == "text_encoder" and not path.startswith("text_model."):
        path = "text_model." + path
    return f"{component}.{path}"


@pytest.mark.parametrize("fmt", ["loha", "lokr", "dora", "locon-tucker"])
def test_full_size_refused_formats_are_named_key_by_key(fmt, full_size, tmp_path):
    modules = target_modules(full_size, conv=True)
    shapes = layout(fmt, modules)
    # Each module's keys alone already say what the file is: no part of it passes as a plain LoRA.
    for stem, (_, module) in modules.items():
        group = [k for k in shapes if k.startswith(stem + ".")]
        tucker_plain = fmt == "locon-tucker" and not any(".lora_mid." in k for k in group)
        assert detect_format(group) == ("kohya" if tucker_plain else fmt), group
    path = write(tmp_path / f"{fmt}.safetensors", shapes)
    entry = scan_entry(path, default_weight=1.0, lcm_adapter="", hashes=HashCache(), write_sidecars=False)
    assert entry.format == fmt
    assert entry.problem and REFUSED_FORMATS[fmt][1] in entry.problem and "LoRA or LoCon version" in entry.problem


# ------------------------------------------------------------------ on the tiny model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> np.ndarray:
    gen = torch.Generator("cpu").manual_seed(3)
    return pipe(prompt="1girl", num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                generator=gen, output_type="np").images


def _layers(pipe, name: str) -> dict[str, int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {c: sum(isinstance(m, BaseTunerLayer) and name in m.scaling for m in getattr(pipe, c).modules())
            for c in PREFIXES}


def test_tiny_locon_with_text_encoders_loads_in_arcae_like_diffusers(tiny, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from engine.generation.adapters import AdapterRegistry

    models = {c: getattr(tiny, c) for c in PREFIXES}
    modules = target_modules(models, conv=True)
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    write(adapters / "locon_te.safetensors", layout("lora", modules, rank=2), seed=4, scale=0.3)
    expected = {c: sum(p.startswith(c + ".") for p, _ in modules.values()) for c in PREFIXES}
    assert all(expected.values())

    base = _image(tiny)
    registry = AdapterRegistry(adapters, tiny, write_sidecars=False)
    registry.apply_mix([("locon_te", 1.0)])
    assert _layers(tiny, "locon_te") == expected  # conv layers and both text encoders: nothing dropped
    ours = _image(tiny)
    registry.apply_mix([])
    np.testing.assert_array_equal(_image(tiny), base)
    assert np.abs(ours - base).max() > 1e-3

    plain = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(adapters / "locon_te.safetensors"), adapter_name="x")
    np.testing.assert_allclose(_image(plain), ours, atol=1e-5)


@pytest.mark.parametrize("fmt", ["loha", "lokr", "dora"])
def test_tiny_refused_format_leaves_the_pipeline_unchanged(fmt, tiny, tmp_path):
    from engine.generation.adapters import AdapterRegistry
    from engine.contract.errors import IncompatibleAdapter

    models = {c: getattr(tiny, c) for c in PREFIXES}
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    write(adapters / f"site_{fmt}.safetensors", layout(fmt, target_modules(models, conv=False)), scale=0.1)
    registry = AdapterRegistry(adapters, tiny, write_sidecars=False)
    assert registry.get(f"site_{fmt}").format == fmt
    with pytest.raises(IncompatibleAdapter, match=REFUSED_FORMATS[fmt][1].split(" (")[0]):
        registry.apply_mix([(f"site_{fmt}", 1.0)])
    assert _layers(tiny, f"site_{fmt}") == {c: 0 for c in PREFIXES}
