"""How a distillation run is judged and shown: distances to the teacher, the stock adapter's, sample grids.

``DistillJudging`` is mixed into ``training.learning.distill.DistillRun``. Everything is measured
on the held-out ``eval_seeds`` and the first captions, from the same starting noise:

- the teacher: the base with the mix, ``teacher_steps`` DDIM steps with CFG (standard mode);
- a few-step adapter (the student, or the stock adapter loaded for a moment under its own name):
  ``student_steps`` deterministic consistency steps at fast mode's LCM timesteps, no CFG
  (``consistency.consistency_trajectory``).

The distance is the RMS difference of the final latents. Teacher and stock latents (and their
decoded images) do not change during a run: they are computed once per process and cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.learning import consistency as lcd

STUDENT = "arcae_distill"  # the adapter being trained; not "train"/"eval": those collide with nn.Module methods
STOCK = "arcae_distill_stock"  # the stock adapter's name while it is measured (never trained)
GRID_CAPTIONS = 2  # captions (columns per seed) the distance and the grid use


class DistillJudging:
    """Distances and grids of a ``DistillRun`` (see the module docstring)."""

    pipe: Any
    options: Any
    stock_file: Path | None
    _teacher_eval: Any

    # ------------------------------------------------------------------ latents
    def _eval_conds(self) -> tuple[lcd.Conditioning, lcd.Conditioning]:
        evals = list(range(min(GRID_CAPTIONS, len(self.options.captions))))
        cond = self._on_device(_stack([self._cond(i) for i in evals]))
        uncond = self._on_device(_stack([self._uncond()] * len(evals)))
        return cond, uncond

    def _teacher_latents(self) -> list[Any]:
        """The teacher's latents per eval seed (a batch over the first captions; cached)."""
        from diffusers import DDIMScheduler

        if self._teacher_eval is None:
            o = self.options
            cond, uncond = self._eval_conds()
            previous = self._previous_mix()
            try:
                self._set(student=False, train=False)
                self._teacher_eval = [lcd.sample_latents(self.pipe, DDIMScheduler.from_config(self.pipe.scheduler.config),
                                                         cond, uncond, steps=o.teacher_steps, cfg=o.teacher_cfg,
                                                         size=o.resolution, seed=s) for s in o.eval_seeds]
            finally:
                self._restore(previous)
        return self._teacher_eval

    def _fast_latents(self, adapter: str) -> list[Any]:
        """Latents per eval seed of the mix plus few-step ``adapter`` at ``student_steps``."""
        from diffusers import LCMScheduler

        o = self.options
        cond, _ = self._eval_conds()
        scheduler = LCMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(o.student_steps)  # fast mode's own timesteps (999/759/499/259 at 4)
        steps = [int(t) for t in scheduler.timesteps]
        previous = self._previous_mix()
        try:
            self._set(student=adapter, train=False)
            return [lcd.consistency_trajectory(self.pipe, cond, steps, self.alphas, self.prediction,
                                               size=o.resolution, seed=s) for s in o.eval_seeds]
        finally:
            self._restore(previous)

    def _distance_of(self, latents: list[Any]) -> float:
        teacher = self._teacher_latents()
        dists = [lcd.latent_distance(a, b) for a, b in zip(latents, teacher)]
        return sum(dists) / len(dists)

    def distance(self) -> float:
        """RMS distance, on held-out seeds, of the student's ``student_steps`` latents to the teacher's
        ``teacher_steps`` DDIM latents with CFG from the same starting noise: what distillation drives down."""
        return self._distance_of(self._fast_latents(STUDENT))

    # ------------------------------------------------------------------ the stock adapter
    def _stock_latents(self) -> list[Any] | None:
        """The stock adapter's latents (loaded under ``STOCK`` for the measurement, then removed; cached)."""
        from training.learning.lora import remove_adapter

        if self.stock_file is None:
            return None
        if getattr(self, "_stock_cache", None) is None:
            try:
                self.pipe.load_lora_weights(str(self.stock_file), adapter_name=STOCK)
                self._stock_cache = self._fast_latents(STOCK)
            finally:
                for model in (self.pipe.unet, self.pipe.text_encoder, self.pipe.text_encoder_2):
                    remove_adapter(model, STOCK)
        return self._stock_cache

    def stock_distance(self) -> float | None:
        """The stock few-step adapter's distance to the teacher at the same steps (None without one)."""
        latents = self._stock_latents()
        return None if latents is None else self._distance_of(latents)

    # ------------------------------------------------------------------ sample grids
    def write_grid(self, dest: Path) -> Path:
        """``dest``: rows teacher / stock fast mode (when there is one) / distilled student, columns the
        eval seeds x first captions, each image labelled."""
        from training.data.checkpoints import make_grid

        o = self.options
        if getattr(self, "_fixed_rows", None) is None:  # teacher and stock do not change: decode once
            rows = [("teacher", self._teacher_latents())]
            stock = self._stock_latents()
            if stock is not None:
                rows.append(("stock", stock))
            self._fixed_rows = [(label, self._decode(latents)) for label, latents in rows]
        rows = self._fixed_rows + [("distilled", self._decode(self._fast_latents(STUDENT)))]
        images, labels = [], []
        for label, per_seed in rows:
            for seed, batch in zip(o.eval_seeds, per_seed):
                for caption_index, image in enumerate(batch):
                    images.append(image)
                    labels.append(f"{label} s{seed} c{caption_index}")
        columns = len(images) // len(rows)
        make_grid(images, labels, columns=columns).save(dest)
        return dest

    def _decode(self, per_seed: list[Any]) -> list[list[Any]]:
        """PIL images of each seed's latent batch, decoded with the pipeline's VAE."""
        from engine.generation.imaging import decode_latents, to_pil

        vae = self.pipe.vae
        return [[to_pil(decode_latents(vae, latent[None].to(vae.device))[0]) for latent in batch] for batch in per_seed]


def _stack(conds: list[lcd.Conditioning]) -> lcd.Conditioning:
    import torch

    return lcd.Conditioning(torch.cat([c.embeds for c in conds]), torch.cat([c.pooled for c in conds]),
                            torch.cat([c.time_ids for c in conds]))
