"""Small random LoRA files for the tiny SDXL model, in the formats people actually download.

Like ``engine.generation.tiny``, this serves tests, benchmarks and demos (tests import it through
``tests/engine/generation/lora_factory.py``). ``make_lora`` writes ``NAME.safetensors`` plus a ``NAME.json``
sidecar into an adapters directory. Formats:

- ``"peft"``: diffusers/peft keys (``unet.down_blocks.1...to_q.lora_A.weight``), saved through
  ``StableDiffusionXLPipeline.save_lora_weights`` with the adapter config as metadata (so an
  alpha that differs from the rank reloads with the right scale).
- ``"kohya"``: ``lora_unet_down_blocks_1_..._to_q.lora_down.weight`` + ``.alpha`` (and
  ``lora_te1_``/``lora_te2_`` for text-encoder modules), as kohya sd-scripts writes them.
- ``"kohya_sgm"``: kohya keys with the original SGM block names (``lora_unet_input_blocks_4_1_...``).

The same ``seed``, ``rank`` and targets give the same weights in every format, so a test can
check that all formats produce the same image. Weights are random (not zero-initialised) so
that an adapter visibly changes the image.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
FORMATS = ("peft", "kohya", "kohya_sgm")


def _unet_of(pipe_or_unet: Any) -> Any:
    return getattr(pipe_or_unet, "unet", pipe_or_unet)


def _base_linear_shapes(model: Any, targets: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) for the Linear layers named by ``targets``.

    Works on a model that already carries LoRA layers: the wrapped base layer is used and the
    peft sub-modules are skipped.
    """
    import torch

    targets = tuple(targets)
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name:
            continue
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear):
            shapes[name] = (base.in_features, base.out_features)
    return shapes


def random_lora_state_dict(
    model: Any, *, rank: int = 4, seed: int = 0, targets: Iterable[str] = ATTENTION_TARGETS, strength: float = 1.0
) -> dict[str, Any]:
    """Peft-style keys (``<module>.lora_A.weight`` / ``lora_B.weight``) with random weights."""
    import torch

    shapes = _base_linear_shapes(model, targets)
    if not shapes:
        raise ValueError(f"no Linear module of the model matches the targets {tuple(targets)}")
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    for name in sorted(shapes):
        fan_in, fan_out = shapes[name]
        a = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        b = torch.randn(fan_out, rank, generator=gen) * (strength / rank**0.5)
        state[f"{name}.lora_A.weight"] = a.contiguous()
        state[f"{name}.lora_B.weight"] = b.contiguous()
    return state


def _kohya_keys(prefixed: dict[str, Any], alpha: float) -> dict[str, Any]:
    """``unet.x.y.lora_A.weight`` -> ``lora_unet_x_y.lora_down.weight`` plus ``.alpha``."""
    import torch

    prefixes = {"unet.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}
    out: dict[str, Any] = {}
    for key, tensor in prefixed.items():
        component, _, rest = key.partition(".")
        module, _, kind = rest.rpartition(".lora_")
        stem = prefixes[component + "."] + module.replace(".", "_")
        out[f"{stem}.lora_down.weight" if kind.startswith("A") else f"{stem}.lora_up.weight"] = tensor
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def _to_sgm(key: str, layers_per_block: int) -> str:
    """Rename a kohya UNet key from diffusers block names to SGM (LDM) block names."""
    per = layers_per_block + 1
    inner = {"resnets": 0, "attentions": 1}
    m = re.match(r"lora_unet_down_blocks_(\d+)_(resnets|attentions)_(\d+)_(.*)", key)
    if m:
        idx = 1 + int(m[1]) * per + int(m[3])
        return f"lora_unet_input_blocks_{idx}_{inner[m[2]]}_{m[4]}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(resnets|attentions)_(\d+)_(.*)", key)
    if m:
        idx = int(m[1]) * per + int(m[3])
        return f"lora_unet_output_blocks_{idx}_{inner[m[2]]}_{m[4]}"
    m = re.match(r"lora_unet_mid_block_attentions_0_(.*)", key)
    if m:
        return f"lora_unet_middle_block_1_{m[1]}"
    return key


def _save_peft(path: Path, unet_sd: dict, te_sds: dict[str, dict], rank: int, alpha: float, targets: dict) -> None:
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    def meta(t: Iterable[str]) -> dict:
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(t)).to_dict()

    kwargs: dict[str, Any] = {"unet_lora_layers": unet_sd, "unet_lora_adapter_metadata": meta(targets["unet"])}
    if "text_encoder" in te_sds:
        kwargs["text_encoder_lora_layers"] = te_sds["text_encoder"]
        kwargs["text_encoder_lora_adapter_metadata"] = meta(targets["te"])
    if "text_encoder_2" in te_sds:
        kwargs["text_encoder_2_lora_layers"] = te_sds["text_encoder_2"]
        kwargs["text_encoder_2_lora_adapter_metadata"] = meta(targets["te"])
    StableDiffusionXLPipeline.save_lora_weights(
        str(path.parent), weight_name=path.name, safe_serialization=True, **kwargs
    )


def make_lora(
    pipe_or_unet: Any,
    path: str | Path,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    kind: str | None = "style",
    triggers: Iterable[str] = (),
    fmt: str = "peft",
    target_modules: Iterable[str] = ATTENTION_TARGETS,
    text_encoders: bool = False,
    strength: float = 1.0,
    default_weight: float | None = None,
    description: str = "",
    base_model: str = "tiny-sdxl",
    metadata: Mapping[str, str] | None = None,
    sidecar: bool = True,
) -> Path:
    """Write a random LoRA for ``pipe_or_unet`` (a pipeline or a bare UNet) to ``path``.

    ``text_encoders=True`` (needs a pipeline) adds LoRA layers on both CLIP encoders'
    attention projections. ``metadata`` goes into the safetensors header (kohya ``ss_*`` or
    ``modelspec.*`` keys, for example). With ``sidecar`` a ``NAME.json`` is written next to the
    file (kind, triggers, default weight, description, base model; no sha256: the registry fills
    it in). Returns the path of the ``.safetensors`` file.
    """
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, not {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    alpha = float(rank if alpha is None else alpha)
    unet = _unet_of(pipe_or_unet)
    unet_sd = random_lora_state_dict(unet, rank=rank, seed=seed, targets=target_modules, strength=strength)
    te_sds: dict[str, dict] = {}
    if text_encoders:
        for i, component in enumerate(("text_encoder", "text_encoder_2")):
            model = getattr(pipe_or_unet, component)
            te_sds[component] = random_lora_state_dict(
                model, rank=rank, seed=seed + 1000 + i, targets=TEXT_ENCODER_TARGETS, strength=strength
            )
    if fmt == "peft":
        _save_peft(path, unet_sd, te_sds, rank, alpha, {"unet": target_modules, "te": TEXT_ENCODER_TARGETS})
        if metadata:
            _add_header_metadata(path, dict(metadata))
    else:
        prefixed = {f"unet.{k}": v for k, v in unet_sd.items()}
        for component, sd in te_sds.items():
            prefixed.update({f"{component}.{k}": v for k, v in sd.items()})
        kohya = _kohya_keys(prefixed, alpha)
        if fmt == "kohya_sgm":
            layers = unet.config.layers_per_block
            kohya = {_to_sgm(k, layers): v for k, v in kohya.items()}
        header = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), **dict(metadata or {})}
        save_file(kohya, str(path), metadata=header)
    if sidecar:
        write_sidecar(
            path,
            kind=kind,
            triggers=list(triggers),
            default_weight=default_weight,
            description=description,
            base_model=base_model,
        )
    return path


def _add_header_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with extra header metadata (tensors unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    meta.update(extra)
    save_file(tensors, str(path), metadata=meta)


def write_sidecar(path: str | Path, **fields: Any) -> Path:
    """Write ``NAME.json`` next to ``NAME.safetensors`` with the given non-None fields."""
    path = Path(path)
    data = {k: v for k, v in fields.items() if v is not None}
    side = path.with_suffix(".json")
    side.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return side


def make_sd15_like_lora(path: str | Path, *, rank: int = 4, seed: int = 0, sidecar: bool = True) -> Path:
    """A LoRA for a tiny SD 1.5-shaped UNet (cross-attention 48 wide, attention in the first
    down block): its keys partly exist in the tiny SDXL UNet but with the wrong shapes."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    return make_lora(unet, path, rank=rank, seed=seed, fmt="kohya", kind="style", sidecar=sidecar, base_model="sd15")
