"""A steppable few-step distillation run: a LoRA student learns the server's mix in 4-8 steps.

``DistillRun(pipe, options, run_dir, mixer=registry)`` trains the adapter ``arcae_distill`` on
``pipe``'s UNet with the consistency objective (``training.learning.consistency``). Teacher and
student share the one copy of the base: the teacher is the base with ``options.mix`` active (set
through ``mixer.apply_mix``, the engine's ``AdapterRegistry``), the student the same plus the
student adapter. Like ``training.learning.trainer.TrainingRun`` it advances one optimizer step per
``step()``, puts the pipeline's previous mix back after each step (generations may run between
steps), checkpoints every ``save_every`` steps and resumes from the newest checkpoint; every
random draw comes from (seed, purpose, index), so a resumed run has the losses of an
uninterrupted one.

Data-free: the clean latents are the teacher's own DDIM samples of the captions (one per
caption, cached), so no training images are needed. With ``stock`` (e.g. LCM-LoRA's file) the
student starts from that adapter (``init`` "auto"); otherwise from scratch (LoRA B = 0: the student
starts as the mix alone). Either way a given stock adapter is what the run is judged against
(``training.learning.distill_judge``: distances before / stock / after, ``report.recommended``, and
the teacher / stock / distilled ``grid.png`` of each checkpoint). The result, ``adapter.safetensors``, is a diffusers LoRA of kind ``lcm`` whose header
binds it to the mix (``arcae.distilled_for``); ``install`` copies it into an adapters directory
with a sidecar.

Memory at 1024x1024 (an ESTIMATE from the model's sizes, not measured: no GPU here). The fp16
base is ~6.9 GB, shared with serving. A step runs the UNet four times on one latent (student with
gradients, teacher with CFG as a batch of two, target without gradients): activations of the
student pass ~3-4 GB with gradient checkpointing, ~12 GB without; the others are inference-sized.
A rank-64 student (LCM-LoRA's size: ~197 MB in fp16, ~100 M parameters) adds fp32 weights,
gradients and AdamW moments, ~1.6 GB. So ~12-14 GB at batch 1 with gradient checkpointing, plus
what generations need meanwhile when it trains while serving: a 24 GB card (16 GB exclusive).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

from engine.contract.distilled_mix import HEADER_KEY, SIDECAR_KEY, mix_key
from engine.contract.training_errors import TrainingDiverged, TrainingError
from training.data import checkpoints as ckpt
from training.data.distill_setup import RESUMABLE, DistillOptions, DistillReport
from training.data.run_record import atomic_dir, checkpoint_dir, list_checkpoints, read_run, update_run, write_json_atomic
from training.learning import consistency as lcd
from training.learning.distill_judge import STOCK, STUDENT, DistillJudging, _stack
from training.learning.lora import add_training_adapter, remove_adapter, save_adapter_file, unet_targets
from training.learning.run_lifecycle import RunLifecycle, check_same_options, existing_run_options
from training.learning.safe_state import load_state, save_state

log = logging.getLogger(__name__)


def _seed(seed: int, *parts: Any) -> int:
    return random.Random(f"arcae-distill-{seed}-" + "-".join(map(str, parts))).getrandbits(63)


class DistillRun(DistillJudging, RunLifecycle):
    """One distillation run on ``pipe`` (see the module docstring). Not thread-safe."""

    what = "distillation run"

    def __init__(self, pipe: Any, options: DistillOptions, run_dir: Path, *, mixer: Any = None,
                 stock: Path | None = None, resume: bool = False, base_model: str = "", job_id: str = "") -> None:
        from diffusers import DDPMScheduler

        if options.mix and mixer is None:
            raise TrainingError("distill-fast: a mix needs the adapter registry to set it (mixer)")
        self.pipe, self.options, self.run_dir, self.mixer = pipe, options, Path(run_dir), mixer
        self.base_model, self.job_id = base_model, job_id
        # The stock few-step adapter: the judge's reference whenever given, the start only with init "auto".
        self.stock_file = Path(stock) if stock is not None else None
        if self.stock_file is not None and not self.stock_file.is_file():
            raise TrainingError(f"distill-fast: the stock few-step adapter {self.stock_file} does not exist")
        self.stock = self.stock_file if options.init == "auto" else None
        self.step_index, self.status, self.last_loss = 0, "pending", None
        self._released = False
        self._check_run_dir(resume)
        self.device = pipe.unet.device
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.alphas = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.prediction = self.noise_scheduler.config.prediction_type
        self.solver = lcd.DDIMSolver(self.noise_scheduler.alphas_cumprod,
                                     self.noise_scheduler.config.num_train_timesteps, options.solver_steps)
        self._conds: dict[int, lcd.Conditioning] = {}
        self._x0: dict[tuple[int, int], Any] = {}
        self._teacher_eval: Any = None
        self.report = DistillReport()
        self._add_student()
        import torch

        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=options.lr, weight_decay=0.0)
        self._started = time.monotonic()
        if resume and list_checkpoints(self.run_dir):
            self._load_state(list_checkpoints(self.run_dir)[-1][1])
        elif resume:
            ckpt.truncate_loss(self.run_dir, 0)
        self._write_record(status="pending")

    # ------------------------------------------------------------------ setup
    def _check_run_dir(self, resume: bool) -> None:
        saved = existing_run_options(self.run_dir, resume, "run")
        if saved is not None:
            check_same_options(self.run_dir, saved, self.options.to_json(), RESUMABLE)

    def _add_student(self) -> None:
        import torch
        from peft import LoraConfig

        unet = self.pipe.unet
        if self.stock is not None:
            if not self.stock.is_file():
                raise TrainingError(f"distill-fast: the stock few-step adapter {self.stock} does not exist")
            remove_adapter(unet, STUDENT)
            self.pipe.load_lora_weights(str(self.stock), adapter_name=STUDENT)
            self.params = {n: p for n, p in unet.named_parameters() if f".{STUDENT}." in n}
            for p in self.params.values():
                p.data = p.data.to(torch.float32)
                p.requires_grad_(True)
            for model in (self.pipe.text_encoder, self.pipe.text_encoder_2):
                remove_adapter(model, STUDENT)  # a stock file's text-encoder part is not trained here
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.options.seed)
                config = LoraConfig(r=self.options.rank, lora_alpha=self.options.rank, init_lora_weights=True,
                                    target_modules=unet_targets(False, False, "locon"))
                self.params = add_training_adapter(unet, STUDENT, config)
        if not self.params:
            raise TrainingError("distill-fast: the student adapter has no UNet weights")

    # ------------------------------------------------------------------ adapters on the shared UNet
    def _student_layers(self) -> list[Any]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.pipe.unet.modules()
                if isinstance(m, BaseTunerLayer) and (STUDENT in m.scaling or STOCK in m.scaling)]

    def _set(self, student: bool | str, train: bool) -> None:
        """The teacher (mix only) or the mix plus the student (True) or another few-step adapter (its name)."""
        name = STUDENT if student is True else (student or None)
        if self.mixer is not None:
            self.mixer.apply_mix(list(self.options.mix))
        else:
            self._all_off()
        for layer in self._student_layers():
            active = [a for a in layer.active_adapters if a not in (STUDENT, STOCK)]
            layer._active_adapter = active + ([name] if name in layer.scaling else [])
            layer._disable_adapters = False
        self.pipe.unet.train(train)

    def _all_off(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for model in (self.pipe.unet, self.pipe.text_encoder, self.pipe.text_encoder_2):
            for m in model.modules():
                if isinstance(m, BaseTunerLayer):
                    m._active_adapter = []

    def _restore(self, previous: list[tuple[str, float]] | None) -> None:
        if self.mixer is not None and previous is not None:
            self.mixer.apply_mix(previous)  # also leaves the student inactive
        else:
            for layer in self._student_layers():
                layer._active_adapter = [a for a in layer.active_adapters if a not in (STUDENT, STOCK)]
        self.pipe.unet.eval()

    def _previous_mix(self) -> list[tuple[str, float]] | None:
        return list(self.mixer.active_mix) if self.mixer is not None else None

    # ------------------------------------------------------------------ data
    def _cond(self, index: int) -> lcd.Conditioning:
        """Caption ``index`` encoded with the mix's text-encoder weights (cached on CPU)."""
        import torch

        from training.learning.training_math import plain_encode

        if index not in self._conds:
            with torch.no_grad():
                embeds, pooled = plain_encode(self.pipe, [self.options.captions[index]])
            self._conds[index] = lcd.Conditioning(embeds.float().cpu(), pooled.float().cpu(),
                                                  lcd.time_ids(self.options.resolution, 1, "cpu"))
        return self._conds[index]

    def _uncond(self) -> lcd.Conditioning:
        import torch

        from training.learning.training_math import plain_encode

        if not hasattr(self, "_uncond_cache"):
            cond = self._cond(0)
            if self.options.negative_prompt:  # SDXL's empty negative is zeros (force_zeros_for_empty_prompt)
                with torch.no_grad():
                    embeds, pooled = plain_encode(self.pipe, [self.options.negative_prompt])
                embeds, pooled = embeds.float().cpu(), pooled.float().cpu()
            else:
                embeds, pooled = torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled)
            self._uncond_cache = lcd.Conditioning(embeds, pooled, cond.time_ids)
        return self._uncond_cache

    def _on_device(self, c: lcd.Conditioning) -> lcd.Conditioning:
        return lcd.Conditioning(c.embeds.to(self.device), c.pooled.to(self.device), c.time_ids.to(self.device))

    def _teacher_sample(self, index: int, variant: int) -> Any:
        """Teacher DDIM sample ``variant`` of caption ``index`` (a clean latent of its training pairs; cached)."""
        from diffusers import DDIMScheduler

        key = (index, variant)
        if key not in self._x0:
            o = self.options
            scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
            self._x0[key] = lcd.sample_latents(
                self.pipe, scheduler, self._on_device(self._cond(index)), self._on_device(self._uncond()),
                steps=o.teacher_steps, cfg=o.teacher_cfg, size=o.resolution, seed=_seed(o.seed, "x0", index, variant))[0]
        return self._x0[key]

    # ------------------------------------------------------------------ public API (as TrainingRun)
    @property
    def result(self) -> dict[str, Any]:
        """What the engine reports when the run ends."""
        return {
            "run_dir": str(self.run_dir), "status": self.status, "steps": self.step_index, "loss": self.last_loss,
            "adapter": str(self.run_dir / "adapter.safetensors"), "kind": "lcm",
            "distance_before": self.report.before, "distance_stock": self.report.stock,
            "distance_after": self.report.after, "distill_gain": self.report.gain, "recommended": self.report.recommended,
        }

    def _begin(self) -> None:
        """Before the first step: the distances the judge compares the result with (kept over a resume)."""
        if self.report.before is None and self.step_index == 0:
            self.report.before = self.distance()
        if self.report.stock is None and self.stock_file is not None:
            self.report.stock = self.stock_distance()

    def release(self) -> None:
        """Remove the student adapter from the pipeline (idempotent)."""
        if self._released:
            return
        self._released = True
        remove_adapter(self.pipe.unet, STUDENT)
        self.params = {}

    # ------------------------------------------------------------------ the step
    def _batch(self) -> list[tuple[int, int]]:
        """(caption, teacher sample variant) pairs of this step."""
        rng = random.Random(_seed(self.options.seed, "batch", self.step_index))
        o = self.options
        return [(rng.randrange(len(o.captions)), rng.randrange(o.variants)) for _ in range(o.batch_size)]

    def _optimizer_step(self) -> tuple[float, float]:
        import torch

        o = self.options
        previous = self._previous_mix()
        indices = self._batch()
        try:
            self._set(student=False, train=False)
            x0 = torch.stack([self._teacher_sample(i, v) for i, v in indices]).to(self.device)
            cond = self._on_device(_stack([self._cond(i) for i, _ in indices]))
            uncond = self._on_device(_stack([self._uncond()] * len(indices)))
            gen = torch.Generator("cpu").manual_seed(_seed(o.seed, "noise", self.step_index))
            noise = torch.randn(x0.shape, generator=gen).to(self.device)
            index = torch.randint(0, o.solver_steps, (len(indices),), generator=gen)
            t, t_prev = self.solver.timesteps[index].to(self.device), self.solver.prev_timesteps(index).to(self.device)
            x_t = self.noise_scheduler.add_noise(x0, noise, t)
            dtype = self.pipe.unet.dtype
            with torch.no_grad():  # the teacher: base + mix, guided, one DDIM step back
                x_prev = lcd.teacher_step(self.pipe.unet, x_t.to(dtype), index, self.solver, cond, uncond,
                                          o.teacher_cfg, self.alphas, self.prediction)
            self._set(student=True, train=False)
            with torch.no_grad():  # the target: the student itself one step nearer the data
                target = lcd.consistency_output(self.pipe.unet, x_prev.to(dtype), t_prev, cond, self.alphas, self.prediction)
            self._set(student=True, train=True)
            self._freeze_all_but_student()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(_seed(o.seed, "dropout", self.step_index))
                with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    pred = lcd.consistency_output(self.pipe.unet, x_t.to(dtype), t, cond, self.alphas, self.prediction)
                loss = lcd.huber(pred, target, o.huber_c)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss.item()} at step {self.step_index + 1}; try a lower lr than {o.lr}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), o.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return float(loss.item()), o.lr
        finally:
            self._restore(previous)

    def _freeze_all_but_student(self) -> None:
        """Only the student learns: the mix's LoRA weights (loaded for inference) get no gradients.

        Loading an adapter makes peft flip ``requires_grad`` on every adapter's weights: set it each step."""
        for name, p in self.pipe.unet.named_parameters():
            p.requires_grad_(f".{STUDENT}." in name)

    # ------------------------------------------------------------------ files
    def checkpoint(self) -> Path:
        """Save the student adapter and the optimizer state for the current step."""
        final = checkpoint_dir(self.run_dir, self.step_index)
        with atomic_dir(final) as tmp:
            save_adapter_file(tmp / "adapter.safetensors", self.pipe.unet, STUDENT)
            save_state({"step": self.step_index, "optimizer": self.optimizer.state_dict(),
                        "params": {k: v.detach().to("cpu").clone() for k, v in self.params.items()}}, tmp)
            self.write_grid(tmp / "grid.png")  # what the bot's status view shows (bot.training_views)
        ckpt.plot_loss(self.run_dir)
        self._write_record(checkpoints=[{"step": s, "path": str(p.relative_to(self.run_dir))}
                                        for s, p in list_checkpoints(self.run_dir)])
        return final

    def _load_state(self, folder: Path) -> None:
        import torch

        state = load_state(folder)
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value.to(self.params[name].device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_index = int(state["step"])
        ckpt.truncate_loss(self.run_dir, self.step_index)
        for step, path in list_checkpoints(self.run_dir):
            if step > self.step_index:
                shutil.rmtree(path, ignore_errors=True)
        recorded = read_run(self.run_dir).get("report", {})
        self.report.before = recorded.get("distance_before")
        self.report.stock = recorded.get("distance_stock")
        log.info("resumed %s at step %d", self.run_dir, self.step_index)

    def metadata(self) -> dict[str, str]:
        """Header values: kind lcm, the mix it is bound to, how it was made."""
        o = self.options
        return {
            "arcae.kind": "lcm", HEADER_KEY: mix_key(o.mix), "arcae.distill.teacher_cfg": str(o.teacher_cfg),
            "arcae.distill.steps": str(self.step_index), "arcae.distill.init": "stock" if self.stock else "scratch",
            "arcae.distill.student_steps": str(o.student_steps), "arcae.prediction": self.prediction,
            "ss_base_model_version": "sdxl_base_v1-0", "ss_sd_model_name": self.base_model,
            "modelspec.description": f"few-step adapter distilled for the mix {mix_key(o.mix)}",
        }

    def _finish(self) -> None:
        from training.learning.kohya_export import write_diffusers_file

        self.report.after = self.distance()
        last = checkpoint_dir(self.run_dir, self.step_index) / "adapter.safetensors"
        write_diffusers_file(last, self.run_dir / "adapter.safetensors", self.metadata())
        self._write_record(status="completed")
        self.release()

    def install(self, adapters_dir: Path) -> Path:
        """Copy the finished adapter into ``adapters_dir`` as NAME.safetensors with its sidecar."""
        if self.status != "completed":
            raise TrainingError(f"distillation run {self.run_dir.name} is {self.status}, not completed")
        return install_adapter(self.run_dir / "adapter.safetensors", Path(adapters_dir), self.options)

    def _write_record(self, **fields: Any) -> None:
        if "status" in fields:
            self.status = fields["status"]
        r = self.report
        update_run(
            self.run_dir, kind="distill-fast", options=self.options.to_json(), step=self.step_index,
            total_steps=self.options.steps, base_model=self.base_model, loss=self.last_loss,
            elapsed_s=round(time.monotonic() - self._started, 3) if hasattr(self, "_started") else 0.0,
            report={"distance_before": r.before, "distance_stock": r.stock, "distance_after": r.after,
                    "distill_gain": r.gain, "stock_ratio": r.stock_ratio, "init": "stock" if self.stock else "scratch",
                    "stock_adapter": self.stock_file.name if self.stock_file else None,
                    "recommended": r.recommended}, **fields,
        )


def install_adapter(source: Path, adapters_dir: Path, options: DistillOptions) -> Path:
    """NAME.json (kind lcm, the mix) first, then NAME.safetensors, each written atomically."""
    adapters_dir.mkdir(parents=True, exist_ok=True)
    dest = adapters_dir / f"{options.name}.safetensors"
    write_json_atomic(dest.with_suffix(".json"), {
        "kind": "lcm", SIDECAR_KEY: json.loads(mix_key(options.mix)), "default_weight": 1.0,
        "description": f"few-step adapter distilled for the mix {mix_key(options.mix)}",
    })
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(dest)
    return dest

