"""A tiny SDXL teacher that really denoises: the tiny UNet trained briefly on synthetic latents.

The tiny model's random UNet hardly depends on the timestep, so it is no diffusion model and
distilling it measures nothing (engine.benchmarks.distill_bench). ``train_tiny_teacher`` fits it
(full fine-tune, v-prediction, the standard noise-prediction loss in its v form) to a small
synthetic latent distribution: per caption a smooth colour layout plus a smooth random variation,
with the caption dropped (zero conditioning, SDXL's empty negative) a fifth of the time so that
classifier-free guidance means something. Deterministic for its seed on one thread.
"""

from __future__ import annotations

from typing import Any

TEACHER_STEPS = 120  # ~90 s on one CPU thread; the UNet's output then depends on t (RMS 0.56 between t=999 and 259)


def synthetic_latents(captions: int, batch: int, side: int, generator: Any) -> tuple[Any, Any]:
    """(caption index per sample, clean latents): a caption's fixed smooth layout + a smooth variation."""
    import torch
    import torch.nn.functional as F

    layout_gen = torch.Generator("cpu").manual_seed(12345)  # the same layouts for every caller
    layouts = F.interpolate(torch.randn(captions, 4, 4, 4, generator=layout_gen), size=(side, side),
                            mode="bilinear", align_corners=False)
    index = torch.randint(0, captions, (batch,), generator=generator)
    variation = F.interpolate(torch.randn(batch, 4, 2, 2, generator=generator), size=(side, side),
                              mode="bilinear", align_corners=False)
    return index, layouts[index] * 0.8 + variation * 0.4


def train_tiny_teacher(pipe: Any, captions: tuple[str, ...], *, steps: int = 200, batch: int = 8, lr: float = 1e-3,
                       resolution: int = 64, seed: int = 0) -> list[float]:
    """Fine-tune ``pipe.unet`` in place to denoise the synthetic latents of ``captions``; return the losses."""
    import torch
    from diffusers import DDPMScheduler

    from training.learning import consistency as lcd
    from training.learning.training_math import plain_encode

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        embeds, pooled = plain_encode(pipe, list(captions))
    unet = pipe.unet
    unet.train()
    unet.requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator("cpu").manual_seed(seed)
    side = resolution // pipe.vae_scale_factor
    losses = []
    for _ in range(steps):
        index, x0 = synthetic_latents(len(captions), batch, side, gen)
        keep = (torch.rand(batch, generator=gen) >= 0.2).float()
        cond = lcd.Conditioning(embeds[index] * keep[:, None, None], pooled[index] * keep[:, None],
                                lcd.time_ids(resolution, batch, "cpu"))
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        x_t = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
        loss = torch.nn.functional.mse_loss(lcd.unet_output(unet, x_t, t, cond).float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    unet.eval()
    unet.requires_grad_(False)
    return losses


def trained_tiny_pipe(captions: tuple[str, ...], *, steps: int = TEACHER_STEPS, seed: int = 0) -> Any:
    """The tiny v-prediction SDXL pipeline with its UNet trained by ``train_tiny_teacher`` (one thread)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from engine.generation.tiny import build_tiny_components

    pipe = StableDiffusionXLPipeline(**build_tiny_components(0, "v"))
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on every machine load
    try:
        with torch.random.fork_rng(devices=[]):
            train_tiny_teacher(pipe, captions, steps=steps, seed=seed)
    finally:
        torch.set_num_threads(threads)
    return pipe
