"""The numbers of one training step: cached latents, caption embeddings, noise, loss; the optimizer.

Split from ``training.learning.trainer`` (which owns the run's life cycle and files). Every random draw
here takes an explicit generator seeded from (seed, micro-batch), never the global RNG, so a
step's loss does not depend on what ran before it.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from training.data.buckets import fit_to_bucket
from engine.contract.training_errors import OptimizerUnavailable
from engine.contract.training_options import TrainOptions
from training.data.training_set import TrainingDataset, augment_caption, load_image_rgb

log = logging.getLogger(__name__)
V_PRED_CFG_RESCALE = 0.7


def _seed(seed: int, *parts: Any) -> int:
    return random.Random(f"arcae-{seed}-" + "-".join(map(str, parts))).getrandbits(63)


class TrainingMath:
    """Loss computation on a shared pipeline: latents cached on first use, own DDPM scheduler."""

    def __init__(self, pipe: Any, options: TrainOptions, dataset: TrainingDataset, keep_tokens: int, prompt_encoder: Any = None) -> None:
        from diffusers import DDPMScheduler

        self.pipe, self.options, self.dataset, self.keep_tokens = pipe, options, dataset, keep_tokens
        self.device = pipe.unet.device
        self.fork_devices = [self.device] if self.device.type == "cuda" else []
        # Inference leaves the pipeline's scheduler mid-schedule: training owns its own.
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        check_supported_schedule(self.noise_scheduler)
        # Samples are built from the model's own scheduler config, whatever a generation left.
        self.sample_scheduler_config = dict(pipe.scheduler.config)
        self._latents: dict[int, Any] = {}  # item index -> (latent [4,h,w] fp32 on CPU, time_ids)
        if prompt_encoder is not None and hasattr(prompt_encoder, "encode_for_training"):
            shared = prompt_encoder  # the engine's SDXLPromptEncoder
            self.prompt_encoder = lambda captions: shared.encode_for_training(
                captions, train_text_encoders=options.train_text_encoders
            )
        else:
            self.prompt_encoder = prompt_encoder or _make_prompt_encoder(pipe, options.train_text_encoders)

    # ------------------------------------------------------------------ latents
    def latent(self, index: int) -> tuple[Any, tuple[int, ...]]:
        """The cached VAE latent (already scaled) and SDXL time ids of dataset item ``index``."""
        if index not in self._latents:
            self._latents[index] = self._encode(index)
        return self._latents[index]

    def _encode(self, index: int) -> tuple[Any, tuple[int, ...]]:
        import numpy as np
        import torch

        item = self.dataset.items[index]
        fitted = fit_to_bucket(load_image_rgb(item.image_path), item.bucket)
        pixels = torch.from_numpy(np.asarray(fitted.image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        vae = self.pipe.vae
        dtype = vae.dtype
        # fp16 VAEs overflow to NaN on some images: encode in fp32 (fp16 -> fp32 -> fp16 is lossless).
        if dtype != torch.float32:
            vae.to(torch.float32)
        try:
            with torch.no_grad():
                dist = vae.encode(pixels.to(self.device, torch.float32)).latent_dist
                gen = torch.Generator("cpu").manual_seed(_seed(self.options.seed, "latent", index))
                noise = torch.randn(dist.mean.shape, generator=gen, dtype=torch.float32).to(self.device)
                latent = dist.mean + dist.std * noise
        finally:
            if dtype != torch.float32:
                vae.to(dtype)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latent = (latent - shift) * vae.config.scaling_factor
        return latent[0].to("cpu"), fitted.time_ids

    # ------------------------------------------------------------------ captions
    def captions(self, indices: list[int], micro: int) -> list[str]:
        opts = self.options
        out = []
        for pos, idx in enumerate(indices):
            rng = random.Random(_seed(opts.seed, "caption", micro, pos))
            out.append(augment_caption(
                self.dataset.items[idx].tags, keep_tokens=self.keep_tokens, shuffle=opts.shuffle_tags,
                tag_dropout=opts.tag_dropout, caption_dropout=opts.caption_dropout, rng=rng,
            ))
        return out

    def encode_captions(self, captions: list[str]) -> tuple[Any, Any]:
        import torch

        if self.options.train_text_encoders:
            return self.prompt_encoder(captions)
        with torch.no_grad():
            return self.prompt_encoder(captions)

    # ------------------------------------------------------------------ loss
    def micro_batch_loss(self, micro: int) -> Any:
        """Mean (min-SNR weighted) noise-prediction loss of micro-batch ``micro``."""
        import torch
        import torch.nn.functional as F

        opts = self.options
        unet = self.pipe.unet
        indices = self.dataset.micro_batch(micro)
        cached = [self.latent(i) for i in indices]
        latents = torch.stack([c[0] for c in cached]).to(self.device)
        time_ids = torch.tensor([c[1] for c in cached], dtype=torch.float32, device=self.device)
        gen = torch.Generator("cpu").manual_seed(_seed(opts.seed, "noise", micro))
        noise = torch.randn(latents.shape, generator=gen)
        if opts.noise_offset:
            noise = noise + opts.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=gen).to(self.device)
        noise = noise.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prompt_embeds, pooled = self.encode_captions(self.captions(indices, micro))
        pred = unet(
            noisy.to(unet.dtype), timesteps, encoder_hidden_states=prompt_embeds.to(unet.dtype),
            added_cond_kwargs={"text_embeds": pooled.to(unet.dtype), "time_ids": time_ids.to(unet.dtype)},
            return_dict=False,
        )[0]
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        if opts.min_snr_gamma > 0:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timesteps)
            weight = torch.clamp(snr, max=opts.min_snr_gamma)
            weight = weight / (snr + 1) if self.prediction_type == "v_prediction" else weight / snr
            loss = loss * weight
        return loss.mean()

    # ------------------------------------------------------------------ memory
    def gradient_checkpointing_on(self) -> bool:
        """Enable gradient checkpointing for this step when configured (default: on CUDA)."""
        wanted = self.options.gradient_checkpointing
        wanted = self.device.type == "cuda" if wanted is None else wanted
        unet = self.pipe.unet
        if wanted and not unet.is_gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            return True
        return False

    def gradient_checkpointing_off(self, turned_on: bool) -> None:
        if turned_on:
            self.pipe.unet.disable_gradient_checkpointing()

    # ------------------------------------------------------------------ samples
    def sampling_settings(self, prompts: list[str]) -> dict[str, Any]:
        """The exact settings every checkpoint's samples use (recorded in run.json)."""
        opts = self.options
        return {
            "prompts": list(prompts), "negative_prompt": opts.sample_negative, "sampler": opts.sample_sampler,
            "steps": opts.sample_steps, "cfg": opts.sample_cfg, "width": opts.resolution, "height": opts.resolution,
            "seeds": [opts.seed + i for i in range(len(prompts))],
            "prompt_encoder": "engine.generation.prompts (A1111 weighting, 75-token chunks), as /imagine",
        }

    def sample_images(self, prompts: list[str]) -> list[Any]:
        """Fixed-seed images for ``prompts`` with whatever adapters are active (the caller's choice).

        The same path as /imagine (``engine.generation.generator``): engine.generation.prompts' encoder, a fresh
        scheduler for ``sample_sampler`` from the model's config, our own VAE decode. The
        pipeline's scheduler is put back afterwards.
        """
        import torch

        from engine.generation import imaging
        from engine.generation.prompts import pipe_encoder
        from engine.generation.samplers import make_scheduler

        opts = self.options
        pipe = self.pipe
        encoder = pipe_encoder(pipe)
        pipe.set_progress_bar_config(disable=True)
        previous = pipe.scheduler
        images = []
        try:
            for i, prompt in enumerate(prompts):
                pipe.scheduler = make_scheduler(opts.sample_sampler, self.sample_scheduler_config)
                gen = torch.Generator("cpu").manual_seed(opts.seed + i)  # same seeds at every checkpoint
                with torch.no_grad():
                    emb = encoder.encode(prompt, opts.sample_negative)
                    latents = pipe(
                        **emb.as_kwargs(), num_inference_steps=opts.sample_steps, guidance_scale=opts.sample_cfg,
                        # v-prediction bases need CFG rescale (the engine's default 0.7) or samples wash out.
                        guidance_rescale=V_PRED_CFG_RESCALE if self.prediction_type == "v_prediction" else 0.0,
                        width=opts.resolution, height=opts.resolution, generator=[gen], output_type="latent",
                    ).images
                    decoded, _ = imaging.decode_latents(pipe.vae, latents[:1].to(pipe.vae.device))
                images.append(imaging.to_pil(decoded))
        finally:
            pipe.scheduler = previous
        return images


def check_supported_schedule(noise_scheduler: Any) -> None:
    """Refuse prediction types / noise schedules this trainer would train wrongly."""
    from engine.contract.training_errors import TrainingError

    prediction = noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise TrainingError(
            f"the model's scheduler predicts {prediction!r}; training supports 'epsilon' and 'v_prediction' only"
        )
    if prediction == "epsilon" and float(noise_scheduler.alphas_cumprod[-1]) == 0.0:
        raise TrainingError(
            "the model's scheduler has zero terminal SNR (rescale_betas_zero_snr) with epsilon prediction: "
            "the noise target is undefined at the last timestep; train a v-prediction model, or a scheduler "
            "without rescale_betas_zero_snr"
        )


def _make_prompt_encoder(pipe: Any, train_text_encoders: bool) -> Any:
    """``captions -> (prompt_embeds, pooled)``: engine.generation.prompts' weighted encoder (the same
    A1111-style weighting and 75-token chunks as inference) when present."""
    try:
        from engine.generation.prompts import SDXLPromptEncoder

        encoder = SDXLPromptEncoder(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2)
        if hasattr(encoder, "encode_for_training"):
            return lambda captions: encoder.encode_for_training(captions, train_text_encoders=train_text_encoders)
    except ImportError:
        pass
    log.info("engine.generation.prompts is not available: captions are encoded without weights")
    return lambda captions: plain_encode(pipe, captions)


def plain_encode(pipe: Any, captions: list[str]) -> tuple[Any, Any]:
    """SDXL text conditioning without prompt weighting: penultimate states of both encoders."""
    import torch

    hidden, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # encoder 2's projected pooled output
    return torch.cat(hidden, dim=-1), pooled


def build_optimizer(
    device: Any, model_dtype: Any, options: TrainOptions, params: dict[str, Any], report: dict[str, Any] | None = None,
) -> tuple[Any, Any, Any]:
    """Accelerator (precision), optimizer and LR scheduler for the adapter's ``params``.

    ``report`` (if given) receives what was actually built: optimizer and its settings, the
    scheduler used, notes on fallbacks, the precision (the run report in run.json).
    """
    import torch
    from diffusers.optimization import get_scheduler

    report = report if report is not None else {}
    precision = options.mixed_precision
    if device.type != "cuda":
        precision = "no"
    elif precision == "auto":
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(model_dtype, "bf16")
    accelerator = _accelerator(precision, cpu=device.type != "cuda")
    unet_params = [p for n, p in params.items() if not n.startswith("text_encoder")]
    te_params = [p for n, p in params.items() if n.startswith("text_encoder")]
    groups = [{"params": unet_params, "lr": options.lr}]
    if te_params:
        groups.append({"params": te_params, "lr": options.text_encoder_lr or options.lr})
    optimizer = _make_optimizer(options, groups, device, report)
    scheduler_name = options.lr_scheduler
    notes = report.setdefault("notes", [])
    if scheduler_name == "constant" and options.warmup > 0:
        # diffusers' "constant" ignores warm-up steps: kohya users expect a warm-up to happen.
        scheduler_name = "constant_with_warmup"
        notes.append(f"lr scheduler constant with {options.warmup} warm-up steps: used constant_with_warmup")
        log.warning(notes[-1])
    lr_scheduler = get_scheduler(
        scheduler_name, optimizer=optimizer, num_warmup_steps=options.warmup, num_training_steps=options.steps
    )
    report.update(lr_scheduler=scheduler_name, warmup=options.warmup, mixed_precision=precision)
    optimizer = accelerator.prepare_optimizer(optimizer)  # fp16 loss scaling when needed
    return accelerator, optimizer, lr_scheduler


def effective_learning_rates(optimizer: Any) -> dict[str, float]:
    """The step size each parameter group gets now: lr, times Prodigy's estimate ``d`` when present."""
    names = ("unet", "text_encoders")
    rates = {}
    for name, group in zip(names, optimizer.param_groups):
        rates[name] = float(group["lr"]) * float(group.get("d", 1.0))
    return rates


def _accelerator(precision: str, *, cpu: bool) -> Any:
    """An ``Accelerator``; accelerate keeps one process-wide state, which a later run in the same
    engine process may need with another precision: that state is reset (single process only)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(mixed_precision=precision, cpu=cpu)
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        log.info("resetting accelerate's state for mixed precision %s", precision)
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=precision, cpu=cpu)


def _make_optimizer(options: TrainOptions, groups: list[dict], device: Any, report: dict[str, Any]) -> Any:
    import torch

    name = options.optimizer
    settings: dict[str, Any] = {"weight_decay": 1e-2}
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb

            if device.type != "cuda":
                raise ImportError("8-bit AdamW needs CUDA")
            optimizer = bnb.optim.AdamW8bit(groups, **settings)
            report["optimizer"] = {"requested": name, "used": "adamw8bit", "lr": options.lr, **settings}
            return optimizer
        except ImportError as exc:
            note = (f"optimizer adamw8bit unavailable ({exc}; install the train8bit extra on a CUDA machine): "
                    "fell back to adamw (32-bit)")
            report.setdefault("notes", []).append(note)
            log.warning(note)
            name = "adamw"
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise OptimizerUnavailable(
                "--optimizer prodigy needs the prodigyopt package (pip install prodigyopt); use adamw or adamw8bit"
            ) from None
        settings.update(d_coef=options.prodigy_d_coef, safeguard_warmup=options.prodigy_safeguard_warmup,
                        use_bias_correction=True)
        if options.lr < 0.1:
            report.setdefault("notes", []).append(
                f"prodigy with lr {options.lr}: Prodigy expects lr around 1.0 (it scales the step itself)"
            )
        report["optimizer"] = {"requested": options.optimizer, "used": "prodigy", "lr": options.lr, **settings}
        return Prodigy(groups, **settings)
    report["optimizer"] = {"requested": options.optimizer, "used": "adamw", "lr": options.lr, **settings}
    return torch.optim.AdamW(groups, **settings)
