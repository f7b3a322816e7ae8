"""The run's adapter in kohya's format, with the metadata AUTOMATIC1111, ComfyUI and Civitai read.

Keys: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (and
``lora_te1_text_model_…`` / ``lora_te2_text_model_…`` for the text encoders), made with diffusers'
``convert_state_dict_to_kohya`` from peft-style keys (NOTES). That function writes the rank as
every ``.alpha``; we write the run's alpha so the scale is right. Text-encoder keys always get
the ``text_model`` level (``engine.generation.lora_files.standard_lora_key``), also when converting a file
written before Arcae added it. Header: kohya's ``ss_*`` keys, the ``sshs_*`` hashes kohya
precomputes (A1111 trusts ``sshs_model_hash`` as the file's hash) and the ``modelspec.*`` keys of
Stability's model spec 1.0.1 as kohya writes them for SDXL LoRAs.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from engine.generation.lora_files import standard_lora_key
from training.data.run_record import write_atomic

# kohya library/sai_model_spec.py: spec version and the implementation it names for SDXL LoRAs.
MODELSPEC_VERSION = "1.0.1"
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
_LEGACY_HASH_OFFSET, _LEGACY_HASH_BYTES = 0x100000, 0x10000


def diffusers_file_to_kohya(state: dict[str, Any], alpha: float) -> dict[str, Any]:
    """A diffusers LoRA state dict (``unet.…lora_A.weight``) -> kohya keys with ``alpha``."""
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({standard_lora_key(k): v for k, v in state.items()})
    kohya = {standard_lora_key(k): v for k, v in kohya.items()}
    for key in list(kohya):
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(float(alpha))
    unknown = [k for k in kohya if not k.startswith(("lora_unet_", "lora_te1_", "lora_te2_"))]
    if unknown:
        raise ValueError(f"kohya export: unexpected keys {unknown[:3]}")
    return kohya


def precalculated_hashes(tensors: dict[str, Any], metadata: dict[str, str]) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) as kohya's train_util computes them.

    The file is serialised with only its ``ss_*`` metadata (so later edits of other keys do not
    change the hashes); the model hash is the sha256 of the bytes after the header (A1111's
    addnet hash, equal to that of the written file), the legacy hash the first 8 hex of the sha256
    of the 64 KiB at offset 1 MiB (empty input for files under 1 MiB, as there).
    """
    from safetensors.torch import save

    raw = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(raw[:8], "little")
    model_hash = hashlib.sha256(raw[8 + header_len :]).hexdigest()
    legacy = hashlib.sha256(raw[_LEGACY_HASH_OFFSET : _LEGACY_HASH_OFFSET + _LEGACY_HASH_BYTES]).hexdigest()[:8]
    return model_hash, legacy


def _save_with_hashes(tensors: dict[str, Any], dest: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    model_hash, legacy = precalculated_hashes(tensors, metadata)
    header = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
    write_atomic(Path(dest), lambda tmp: save_file(tensors, str(tmp), metadata=header))


def write_kohya_file(diffusers_file: Path, dest: Path, alpha: float, metadata: dict[str, str]) -> None:
    """Convert ``diffusers_file`` (written by ``training.learning.lora.save_adapter_file``) to ``dest``."""
    from safetensors.torch import load_file

    kohya = diffusers_file_to_kohya(load_file(str(diffusers_file)), alpha)
    _save_with_hashes(kohya, dest, metadata)


def write_diffusers_file(diffusers_file: Path, dest: Path, metadata: dict[str, str]) -> None:
    """Copy the diffusers file to ``dest`` with ``metadata`` (and its hashes) added to its header.

    The file's own header (diffusers' ``lora_adapter_metadata``: alpha and targets) is kept, so it
    reloads exactly as before; a copy without its sidecar still knows its kind and triggers.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(diffusers_file), framework="pt") as f:
        own = f.metadata() or {}
    tensors = load_file(str(diffusers_file))
    _save_with_hashes(tensors, dest, {**metadata, **own})


def kohya_tag_frequency(dataset: Any) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: {dataset folder: {tag: count}} with tags as the captions write them.

    As kohya's ``set_tag_frequency``: each caption (with the trigger Arcae puts first) is split at
    every comma, stripped and lower-cased, and nothing else: ``hikari_arc`` and
    ``hikari \\(arcaea\\)`` stay as typed, so the tags A1111 shows are ones that work in a prompt.
    """
    counts: dict[str, int] = {}
    for item in dataset.items:
        for tag in ", ".join(item.tags).split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {Path(dataset.root).name: counts}


def kohya_bucket_info(dataset: Any) -> dict[str, Any]:
    """kohya's ``ss_bucket_info``: images per bucket (repeats counted) and the mean aspect-ratio error."""
    index = {(b.width, b.height): i for i, b in enumerate(dataset.buckets)}
    buckets: dict[int, dict[str, Any]] = {}
    errors = []
    for item, repeats in zip(dataset.items, dataset.repeats):
        key = (item.bucket.width, item.bucket.height)
        entry = buckets.setdefault(index.get(key, len(index)), {"resolution": list(key), "count": 0})
        entry["count"] += repeats
        errors.append(abs(item.bucket.width / item.bucket.height - item.size[0] / item.size[1]))
    mean_error = sum(errors) / len(errors) if errors else 0.0
    return {"buckets": dict(sorted(buckets.items())), "mean_img_ar_error": mean_error}


def kohya_metadata(
    options: Any, dataset: Any, steps: int, base_model: str, dataset_hash: str, *, prediction_type: str = "epsilon"
) -> dict[str, str]:
    """``ss_*``, ``modelspec.*`` and ``arcae.*`` header values (all strings, as safetensors requires)."""
    now = int(time.time())
    meta = _training_metadata(options, dataset, steps, base_model, dataset_hash, now)
    meta.update(_modelspec_metadata(options, steps, now, prediction_type))
    meta["arcae.kind"] = options.kind
    meta["arcae.signature_tags"] = json.dumps(dataset.signature_tags())
    return meta


def _training_metadata(
    options: Any, dataset: Any, steps: int, base_model: str, dataset_hash: str, now: int
) -> dict[str, str]:
    """kohya's ``ss_*`` keys."""
    dataset_dir = Path(options.dataset).name
    return {
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
        "ss_bucket_info": json.dumps(kohya_bucket_info(dataset)),
        # SDXL conditions on the penultimate layer of both encoders; kohya's SDXL trainer has no
        # clip-skip option and records its unset value, so this matches kohya-trained SDXL files.
        "ss_clip_skip": "None",
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
        "ss_tag_frequency": json.dumps(kohya_tag_frequency(dataset)),
        "ss_dataset_dirs": json.dumps({dataset_dir: {"n_repeats": 1, "img_count": len(dataset.items)}}),
        "ss_dataset_hash": dataset_hash,
    }


def _modelspec_metadata(options: Any, steps: int, now: int, prediction_type: str) -> dict[str, str]:
    """Stability's model-spec keys, as kohya's ``sai_model_spec`` fills them for an SDXL LoRA."""
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": f"{options.trigger} ({options.kind})",
        "modelspec.resolution": f"{options.resolution}x{options.resolution}",
        "modelspec.trigger_phrase": options.trigger,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
        "modelspec.description": f"Arcae {options.kind} LoRA, rank {options.rank}, {steps} steps",
        "modelspec.tags": options.kind,
    }
    # The spec's names: "epsilon" or "v" (kohya leaves the key out for other kinds).
    spec_type = {"epsilon": "epsilon", "v_prediction": "v"}.get(prediction_type)
    if spec_type:
        meta["modelspec.prediction_type"] = spec_type
    return meta
