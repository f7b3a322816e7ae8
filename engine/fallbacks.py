"""TEMPORARY stand-in for engine.prompts while that module is being written.

The Generator imports the real ``SDXLPromptEncoder`` when it exists and falls back to this
narrow version otherwise. Delete this module once engine.prompts exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PlainEmbeddings:
    prompt_embeds: Any
    negative_prompt_embeds: Any
    pooled_prompt_embeds: Any
    negative_pooled_prompt_embeds: Any


class PlainPromptEncoder:
    """diffusers' own SDXL prompt encoding (truncates at 77 tokens, no A1111 weighting)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def encode(self, prompt: str | list[str], negative: str | list[str]) -> PlainEmbeddings:
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt, device=self.pipe.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negative,
        )
        return PlainEmbeddings(pe, npe, pooled, npooled)
