"""Shared pieces of the trainer tests: a tiny captioned dataset and tiny training options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TRIGGER = "hkr"


def paint(rgb: tuple[int, int, int], seed: int, size: int = 256) -> Any:
    """A noisy image of mean colour ``rgb`` with a seed-dependent pattern (so images differ)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.array(rgb, dtype=np.float32)
    noise = rng.normal(0, 25, (size // 16, size // 16, 3)).repeat(16, 0).repeat(16, 1)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"))


def make_dataset(root: Path, tagger_dir: Path, *, count: int = 4, name: str = "hkr") -> Path:
    """A real dataset folder: images tagged by the tiny WD tagger through ``training.data.dataset_folder``."""
    from training.data.captions import CaptionRecipe
    from training.data.dataset_folder import import_dataset
    from training.data.tagger import WDTagger

    source = root / f"{name}-upload"
    source.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # Mostly red (the tiny tagger's "hikari" character), one portrait-shaped image.
        image = paint((210, 40 + 10 * i, 50), seed=i)
        if i == count - 1:
            image = image.resize((256, 384))
        image.save(source / f"img{i}.png")
    tagger = WDTagger.load(tagger_dir)
    result = import_dataset(
        source, name=name, datasets_dir=root / "datasets", tagger=tagger,
        recipe=CaptionRecipe(kind="character", trigger=TRIGGER),
    )
    return result.path


def tiny_options(dataset: Path, **overrides: Any) -> Any:
    """Options sized for the tiny model on CPU: 64 px, rank 4, 2-step samples."""
    from engine.contract.training_options import parse_options

    values: dict[str, Any] = dict(
        dataset=dataset, kind="character", trigger=TRIGGER, steps=4, rank=4, alpha=4.0, lr=1e-3,
        resolution=64, batch_size=2, optimizer="adamw", lr_scheduler="constant", save_every=1000,
        sample_steps=2, sample_cfg=2.0, sample_tag_sets=2, seed=7,
    )
    values.update(overrides)
    return parse_options(values)


def tiny_pipeline(seed: int = 0) -> Any:
    """A fresh in-memory tiny SDXL pipeline (same weights for the same seed)."""
    from diffusers import StableDiffusionXLPipeline

    from engine.generation.tiny import build_tiny_components

    pipe = StableDiffusionXLPipeline(**build_tiny_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, prompt: str = "hkr, 1girl", seed: int = 3) -> Any:
    """A 64 px, 2-step image as a float array (exact comparisons)."""
    import torch

    out = pipe(prompt=prompt, num_inference_steps=2, guidance_scale=2.0, width=64, height=64,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return out.images[0]
