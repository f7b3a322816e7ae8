"""Helpers for tests that need LoRA files for the tiny SDXL model.

``make_lora(pipe_or_unet, path, *, rank=4, seed=0, kind="style", triggers=[...], fmt="peft"|"kohya"|"kohya_sgm",
target_modules=..., text_encoders=False, ...)`` writes ``NAME.safetensors`` and its ``NAME.json`` sidecar; the
implementation lives in ``engine.benchmarks.lora_synth`` so that benchmarks can use it too.
"""

from engine.benchmarks.lora_synth import (
    ATTENTION_TARGETS,
    FORMATS,
    TEXT_ENCODER_TARGETS,
    make_lora,
    make_sd15_like_lora,
    random_lora_state_dict,
    write_sidecar,
)

__all__ = [
    "ATTENTION_TARGETS",
    "FORMATS",
    "TEXT_ENCODER_TARGETS",
    "make_lora",
    "make_sd15_like_lora",
    "random_lora_state_dict",
    "write_sidecar",
]
