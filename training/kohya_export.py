"""The run's adapter in kohya's format, with the metadata AUTOMATIC1111 and ComfyUI read.

Keys: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (and
``lora_te1_`` / ``lora_te2_`` for text encoders), made with diffusers'
``convert_state_dict_to_kohya`` from peft-style keys (NOTES). That function writes the rank as
every ``.alpha``; we write the run's alpha so the scale is right. Header: kohya's ``ss_*`` keys
and the ``modelspec.*`` keys of the Stability model-spec.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from training.run_record import write_atomic

_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}


def diffusers_file_to_kohya(state: dict[str, Any], alpha: float) -> dict[str, Any]:
    """A diffusers LoRA state dict (``unet.…lora_A.weight``) -> kohya keys with ``alpha``."""
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({k: v for k, v in state.items()})
    for key in list(kohya):
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(float(alpha))
    unknown = [k for k in kohya if not k.startswith(("lora_unet_", "lora_te1_", "lora_te2_"))]
    if unknown:
        raise ValueError(f"kohya export: unexpected keys {unknown[:3]}")
    return kohya


def write_kohya_file(diffusers_file: Path, dest: Path, alpha: float, metadata: dict[str, str]) -> None:
    """Convert ``diffusers_file`` (written by ``training.lora.save_adapter_file``) to ``dest``."""
    from safetensors.torch import load_file, save_file

    kohya = diffusers_file_to_kohya(load_file(str(diffusers_file)), alpha)
    write_atomic(Path(dest), lambda tmp: save_file(kohya, str(tmp), metadata=metadata))


def kohya_metadata(options: Any, dataset: Any, steps: int, base_model: str, dataset_hash: str) -> dict[str, str]:
    """``ss_*`` and ``modelspec.*`` header values (all strings, as safetensors requires)."""
    dataset_dir = Path(options.dataset).name
    frequency = {dataset_dir: dataset.tag_frequency()}
    now = int(time.time())
    title = f"{options.trigger} ({options.kind})"
    meta = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": base_model or "",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(options.rank),
        "ss_network_alpha": str(options.alpha),
        "ss_network_args": json.dumps({"conv_dim": options.rank, "conv_alpha": options.alpha} if options.train_conv else {}),
        "ss_training_started_at": str(now),
        "ss_output_name": options.trigger,
        "ss_steps": str(steps),
        "ss_max_train_steps": str(options.steps),
        "ss_learning_rate": str(options.lr),
        "ss_text_encoder_lr": str(options.text_encoder_lr or options.lr) if options.train_text_encoders else "0",
        "ss_unet_lr": str(options.lr),
        "ss_lr_scheduler": options.lr_scheduler,
        "ss_lr_warmup_steps": str(options.warmup),
        "ss_optimizer": options.optimizer,
        "ss_batch_size_per_device": str(options.batch_size),
        "ss_gradient_accumulation_steps": str(options.grad_accum),
        "ss_resolution": f"({options.resolution}, {options.resolution})",
        "ss_enable_bucket": "True",
        "ss_min_snr_gamma": str(options.min_snr_gamma),
        "ss_noise_offset": str(options.noise_offset),
        "ss_caption_dropout_rate": str(options.caption_dropout),
        "ss_caption_tag_dropout_rate": str(options.tag_dropout),
        "ss_shuffle_caption": str(options.shuffle_tags),
        "ss_keep_tokens": str(options.keep_tokens if options.keep_tokens is not None else 1),
        "ss_seed": str(options.seed),
        "ss_num_train_images": str(len(dataset.items)),
        "ss_mixed_precision": options.mixed_precision,
        "ss_network_train_unet_only": str(not options.train_text_encoders),
        "ss_tag_frequency": json.dumps(frequency),
        "ss_dataset_dirs": json.dumps({dataset_dir: {"n_repeats": 1, "img_count": len(dataset.items)}}),
        "ss_dataset_hash": dataset_hash,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{options.resolution}x{options.resolution}",
        "modelspec.trigger_phrase": options.trigger,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
        "modelspec.description": f"Arcae {options.kind} LoRA, rank {options.rank}, {steps} steps",
        "modelspec.tags": options.kind,
        "arcae.kind": options.kind,
        "arcae.signature_tags": json.dumps(dataset.signature_tags()),
    }
    return meta
