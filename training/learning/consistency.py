"""The maths of latent consistency distillation (LCD) for a LoRA student on an SDXL UNet.

Method as in the LCM paper and diffusers' LCD-LoRA research example (read, not copied): take a
clean latent x0, noise it to a timestep t of a DDIM skipping-step schedule (``DDIMSolver``), let
the frozen teacher (the base with the server's adapter mix, with CFG) take one DDIM step from t
to the previous schedule point; the student (the same UNet with the mix plus the LoRA being
trained) must map x_t and that x_prev to the same consistency output ``c_skip * x + c_out * x0``
(``boundary_scalings``). The target is the student itself at x_prev without gradients (the
LoRA variant has no EMA copy). The teacher's CFG is baked into the targets, so the student runs
without CFG: that is the "guidance-embedded" part for a LoRA, which cannot take a w embedding.

Everything here works on latents only; no VAE. ``sample_latents`` runs the plain diffusers
pipeline (``output_type="latent"``) with a DDIM (teacher) or LCM (student) scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


class DDIMSolver:
    """The DDIM skipping-step schedule: ``n`` points on the training timesteps, and one step back."""

    def __init__(self, alphas_cumprod: Any, num_train_timesteps: int = 1000, n: int = 50) -> None:
        import torch

        self.step_ratio = num_train_timesteps // n
        self.timesteps = (torch.arange(1, n + 1) * self.step_ratio).round().long() - 1
        alphas = alphas_cumprod.to(torch.float32).cpu()
        self.alpha = alphas[self.timesteps]
        self.alpha_prev = torch.cat([alphas[:1], alphas[self.timesteps[:-1]]])

    def prev_timesteps(self, index: Any) -> Any:
        """The schedule point before ``timesteps[index]`` (0 for the first)."""
        return (self.timesteps[index] - self.step_ratio).clamp(min=0)

    def step(self, x0: Any, eps: Any, index: Any) -> Any:
        """Deterministic DDIM (eta 0) from ``timesteps[index]`` to the previous point."""
        a_prev = _per_sample(self.alpha_prev[index], x0)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def _per_sample(values: Any, like: Any) -> Any:
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


def boundary_scalings(timesteps: Any, like: Any) -> tuple[Any, Any]:
    """(c_skip, c_out): the consistency function equals its input at t = 0 (LCM's parametrisation)."""
    t = _per_sample(timesteps.to(like.device).float() * TIMESTEP_SCALING, like)
    c_skip = SIGMA_DATA**2 / (t**2 + SIGMA_DATA**2)
    c_out = t / (t**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def x0_and_eps(output: Any, timesteps: Any, sample: Any, alphas_cumprod: Any, prediction_type: str) -> tuple[Any, Any]:
    """The clean latent and the noise a UNet output implies (epsilon or v-prediction)."""
    a = _per_sample(alphas_cumprod.to(sample.device)[timesteps.to(sample.device)], sample)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * output, alpha * output + sigma * sample
    raise ValueError(f"prediction type {prediction_type!r} is not supported; allowed: epsilon, v_prediction")


@dataclass
class Conditioning:
    """SDXL UNet conditioning for a batch: text states, pooled embedding, size ids."""

    embeds: Any
    pooled: Any
    time_ids: Any

    def repeat(self, other: "Conditioning") -> "Conditioning":
        import torch

        return Conditioning(torch.cat([self.embeds, other.embeds]), torch.cat([self.pooled, other.pooled]),
                            torch.cat([self.time_ids, other.time_ids]))


def unet_output(unet: Any, sample: Any, timesteps: Any, cond: Conditioning) -> Any:
    """One UNet evaluation (the raw prediction)."""
    added = {"text_embeds": cond.pooled.to(sample.dtype), "time_ids": cond.time_ids.to(sample.dtype)}
    return unet(sample, timesteps, encoder_hidden_states=cond.embeds.to(sample.dtype), added_cond_kwargs=added).sample


def consistency_output(unet: Any, sample: Any, timesteps: Any, cond: Conditioning, alphas: Any, prediction: str) -> Any:
    """``c_skip * x + c_out * x0_pred``: the student's (or target's) consistency function."""
    out = unet_output(unet, sample, timesteps, cond).float()
    x0, _ = x0_and_eps(out, timesteps, sample.float(), alphas, prediction)
    c_skip, c_out = boundary_scalings(timesteps, x0)
    return c_skip * sample.float() + c_out * x0


def teacher_step(unet: Any, sample: Any, index: Any, solver: DDIMSolver, cond: Conditioning, uncond: Conditioning,
                 cfg: float, alphas: Any, prediction: str) -> Any:
    """x_prev: one DDIM step of the guided teacher from ``solver.timesteps[index]``."""
    import torch

    index = index.cpu()  # the schedule lives on the CPU
    t = solver.timesteps[index].to(sample.device)
    both = unet_output(unet, torch.cat([sample, sample]), torch.cat([t, t]), cond.repeat(uncond)).float()
    x0, eps = x0_and_eps(both, torch.cat([t, t]), torch.cat([sample, sample]).float(), alphas, prediction)
    x0_c, x0_u = x0.chunk(2)
    eps_c, eps_u = eps.chunk(2)
    # Classifier-free guidance on both the clean-latent and noise estimates (as LCD does).
    return solver.step(x0_u + cfg * (x0_c - x0_u), eps_u + cfg * (eps_c - eps_u), index)


def huber(pred: Any, target: Any, c: float) -> Any:
    """Pseudo-Huber loss (LCM's choice); plain mean squared error at c = 0."""
    diff2 = (pred.float() - target.float()) ** 2
    if c <= 0:
        return diff2.mean()
    return ((diff2 + c**2).sqrt() - c).mean()


def time_ids(size: int, batch: int, device: Any) -> Any:
    """SDXL size conditioning for square ``size`` images, no crop."""
    import torch

    return torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32, device=device)


def sample_latents(pipe: Any, scheduler: Any, cond: Conditioning, uncond: Conditioning | None, *, steps: int,
                   cfg: float, size: int, seed: int) -> Any:
    """Final latents of the plain diffusers pipeline with ``scheduler`` (the pipeline's own restored)."""
    saved = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        noise = initial_noise(pipe, cond.embeds.shape[0], size, seed)
        kwargs: dict[str, Any] = {}
        if cfg > 1.0 and uncond is not None:
            kwargs = {"negative_prompt_embeds": uncond.embeds, "negative_pooled_prompt_embeds": uncond.pooled}
        out = pipe(
            prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled, num_inference_steps=steps,
            guidance_scale=cfg, height=size, width=size, latents=noise.to(pipe.unet.device, pipe.unet.dtype),
            output_type="latent", **kwargs,
        )
        return out.images.float().cpu()
    finally:
        pipe.scheduler = saved


def latent_distance(a: Any, b: Any) -> float:
    """Root mean square difference of two latent batches."""
    return float(((a.float() - b.float()) ** 2).mean().sqrt())


def initial_noise(pipe: Any, batch: int, size: int, seed: int) -> Any:
    """The starting noise ``sample_latents`` uses for ``seed`` (CPU generator, fp32)."""
    import torch

    gen = torch.Generator("cpu").manual_seed(seed)
    side = size // pipe.vae_scale_factor
    return torch.randn((batch, pipe.unet.config.in_channels, side, side), generator=gen)


def consistency_trajectory(pipe: Any, cond: Conditioning, timesteps: list[int], alphas: Any, prediction: str,
                           *, size: int, seed: int) -> Any:
    """The student's few-step latents along the teacher's trajectory (deterministic).

    LCM's own sampler re-noises each estimate with fresh noise, so even a perfect student lands on
    another sample than the teacher's from the same seed; here each step re-noises with the noise
    the estimate implies (DDIM with the consistency output, TCD at gamma 0), so the latents can be
    compared with the teacher's from the same starting noise.
    """
    import torch

    unet = pipe.unet
    x = initial_noise(pipe, cond.embeds.shape[0], size, seed).to(unet.device, unet.dtype)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
            x0 = consistency_output(unet, x, tt, cond, alphas, prediction)
            if i + 1 == len(timesteps):
                return x0.float().cpu()
            a_t = _per_sample(alphas[tt], x0)
            eps = (x.float() - a_t.sqrt() * x0) / (1 - a_t).clamp(min=1e-8).sqrt()
            a_next = _per_sample(alphas[torch.full_like(tt, int(timesteps[i + 1]))], x0)
            x = (a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps).to(unet.dtype)
    return x.float().cpu()
