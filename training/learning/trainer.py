"""A steppable SDXL LoRA trainer that shares its pipeline with the engine's generations.

``TrainingRun(pipe, options, run_dir)`` adds a LoRA adapter to ``pipe``'s UNet (the base stays
frozen; one copy of it in memory) and advances one optimizer step per ``step()``. Between steps
the owner of the pipeline may generate images with any adapter mix: every step activates only
the training adapter and puts the previous state back afterwards (``training.learning.lora``), training
has its own ``DDPMScheduler``, and every random draw of a step comes from (seed, step) inside a
forked RNG. So a run's losses are the same with or without generations in between, and
generations do not see the training adapter.

The order follows diffusers' LoRA example: accelerator -> frozen base -> adapter -> data ->
loop -> checkpoints -> samples. Run files (see ``training.data.run_record``): ``run.json``,
``loss.csv``, ``loss.png``, ``checkpoints/step-NNNNNN/`` (adapter, training state, samples,
grid) and, when done, ``adapter.safetensors`` + ``adapter.kohya.safetensors``.

Randomness: batch order per (seed, epoch); captions, noise, timesteps and the VAE's latent
sample per (seed, micro-batch); the global RNG is forked and seeded per step (LoRA dropout).
So a checkpoint needs no RNG state: ``--resume`` restores the adapter, optimizer, LR scheduler,
loss scaler and step, and continues with exactly the losses of an uninterrupted run.

Memory (SDXL, estimates from the model's sizes, not measured here: no GPU on this machine).
The base in fp16 is ~6.9 GB (UNet 5.1, text encoders 1.6, VAE 0.2) and is shared with serving.
A rank-16 attention LoRA is ~23 M parameters: fp32 weights, gradients and AdamW moments add
~0.4 GB (8-bit AdamW ~0.2 GB); the default ``kohya`` preset (feed-forward and projections too)
is roughly twice that. Activations for one 1024x1024 image: ~3-4 GB with gradient
checkpointing (on by default on CUDA), ~12 GB without. Training while serving at batch 1
therefore peaks around 11-12 GB, plus what a generation needs meanwhile (~2-4 GB at
832x1216): it fits a 24 GB card; on 12-16 GB set ``[training] exclusive = true``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from training.data import checkpoints as ckpt
from engine.contract.training_errors import TrainingDiverged
from engine.generation.pipe_state import pipe_state
from training.learning.lora import (
    AdapterSwitch, add_training_adapter, remove_adapter, save_adapter_file, text_encoder_targets, unet_targets,
)
from training.data.run_record import (
    atomic_dir, checkpoint_dir, list_checkpoints, update_run,
)
from training.learning.run_lifecycle import RunLifecycle, check_same_options, existing_run_options
from training.learning.safe_state import load_state, save_state
from engine.contract.training_options import DEFAULT_TARGET_PRESET, TrainOptions
from training.data.training_set import TrainingDataset
from training.learning.training_math import TrainingMath, build_optimizer, effective_learning_rates

log = logging.getLogger(__name__)

# Options that may differ on --resume (they do not change what the saved state means).
_RESUMABLE_CHANGES = {
    "steps", "save_every", "sample_every", "sample_prompts", "sample_steps", "sample_cfg", "model", "sample_sampler",
    "keep_checkpoints", "min_free_disk_mb",
}
# What a run recorded before an option existed trained with (older run.json files lack the key).
_LEGACY_OPTIONS = {"target_preset": "attention", "prodigy_d_coef": 1.0, "prodigy_safeguard_warmup": True}


class TrainingRun(RunLifecycle):
    """One LoRA training run on ``pipe`` (a ``StableDiffusionXLPipeline``), stepped by its owner.

    Call ``step()`` until ``done``; ``cancel()`` stops it (status canceled). Terminal states
    remove the training adapter from the pipeline. Not thread-safe: call from the thread that
    owns the pipeline.
    """

    what = "training run"

    def __init__(
        self, pipe: Any, options: TrainOptions, run_dir: Path, *, resume: bool = False,
        base_model: str = "", job_id: str = "", attempt: int = 1, prompt_encoder: Any = None,
    ) -> None:
        self.pipe, self.options, self.run_dir = pipe, options, Path(run_dir)
        self.job_id, self.attempt, self.base_model = job_id, attempt, base_model or options.model
        self.step_index = 0
        self.status = "pending"
        self._released = False
        self.last_loss: float | None = None
        self._check_run_dir(resume)
        ckpt.check_free_disk(self.run_dir, options.min_free_disk_mb, "before the run starts")
        self.dataset = TrainingDataset(
            options.dataset, trigger=options.trigger, resolution=options.resolution,
            batch_size=options.batch_size, seed=options.seed,
        )
        self.keep_tokens = self.dataset.keep_tokens(options.keep_tokens)
        self.sample_prompts = options.sample_prompts or self.dataset.default_sample_prompts(options.sample_tag_sets)
        self.math = TrainingMath(pipe, options, self.dataset, self.keep_tokens, prompt_encoder)
        self._add_adapter()
        self.report: dict[str, Any] = {"target_preset": options.effective_target_preset}
        self.accelerator, self.optimizer, self.lr_scheduler = build_optimizer(
            self.math.device, pipe.unet.dtype, options, self.params, self.report
        )
        self._started = time.monotonic()
        if resume and list_checkpoints(self.run_dir):
            self._load_state(list_checkpoints(self.run_dir)[-1][1])
        elif resume:  # nothing saved yet: start over, without the old attempt's loss rows
            ckpt.truncate_loss(self.run_dir, 0)
        self._write_record(status="pending")

    # ------------------------------------------------------------------ setup
    def _check_run_dir(self, resume: bool) -> None:
        saved = existing_run_options(self.run_dir, resume, "training run")
        if saved is None:
            return
        old = {**_LEGACY_OPTIONS, **saved}
        new = self.options.model_dump(mode="json")
        # The preset is compared as trained (None = the default preset of its time).
        old["target_preset"] = old["target_preset"] or DEFAULT_TARGET_PRESET
        new["target_preset"] = self.options.effective_target_preset
        check_same_options(self.run_dir, old, new, _RESUMABLE_CHANGES)

    def _add_adapter(self) -> None:
        import torch
        from peft import LoraConfig

        opts = self.options
        name = opts.adapter_name
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)  # the adapter's initial weights depend on the seed only
            preset = opts.effective_target_preset
            config = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, init_lora_weights="gaussian",
                                target_modules=unet_targets(opts.train_ff, opts.train_conv, preset))
            self.params = add_training_adapter(self.pipe.unet, name, config)
            self.text_encoders: dict[str, Any] = {}
            if opts.train_text_encoders:
                for component in ("text_encoder", "text_encoder_2"):
                    model = getattr(self.pipe, component)
                    te_config = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, init_lora_weights="gaussian",
                                           target_modules=text_encoder_targets(preset))
                    te_params = add_training_adapter(model, name, te_config)
                    self.params.update({f"{component}.{k}": v for k, v in te_params.items()})
                    self.text_encoders[component] = model
        # Both text encoders always: an inference LoRA left active on them by a generation must
        # not reach training captions or samples.
        self._switch = AdapterSwitch([self.pipe.unet, self.pipe.text_encoder, self.pipe.text_encoder_2])
        self._state = pipe_state(self.pipe)
        self._state.bump()  # new adapter layers on the text encoders
        self._frozen = [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2) if m not in self.text_encoders.values()]

    # ------------------------------------------------------------------ public API
    @property
    def result(self) -> dict[str, Any]:
        """What the engine reports in its ``Completed`` event."""
        return {
            "run_dir": str(self.run_dir), "status": self.status, "steps": self.step_index,
            "loss": self.last_loss, "adapter": str(self.run_dir / "adapter.safetensors"),
            "checkpoints": [s for s, _ in list_checkpoints(self.run_dir)],
        }

    def release(self) -> None:
        """Remove the training adapter from the pipeline (idempotent)."""
        if self._released:
            return
        self._released = True
        state = pipe_state(self.pipe)
        if state.holder is getattr(self, "_switch", None):
            state.claim_for_inference()  # the inference state back before the adapter goes
        for model in (self.pipe.unet, *self.text_encoders.values()):
            remove_adapter(model, self.options.adapter_name)
        pipe_state(self.pipe).bump()
        self.params = {}

    # ------------------------------------------------------------------ the step
    def _optimizer_step(self) -> tuple[float, float]:
        import torch

        opts = self.options
        self._hold(train=True)
        checkpointing = self.math.gradient_checkpointing_on()
        try:
            with torch.random.fork_rng(devices=self.math.fork_devices):
                torch.manual_seed(_mix_seed(opts.seed, "step", self.step_index))  # e.g. LoRA dropout
                total = 0.0
                for k in range(opts.grad_accum):
                    micro = k if opts.fixed_batch else self.step_index * opts.grad_accum + k
                    with self.accelerator.autocast():
                        loss = self.math.micro_batch_loss(micro)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"loss became {loss.item()} at step {self.step_index + 1}; the run stopped "
                            f"(try a lower --lr than {opts.lr}, or bf16); earlier checkpoints are kept"
                        )
                    self.accelerator.backward(loss / opts.grad_accum)
                    total += loss.item() / opts.grad_accum
                self.accelerator.clip_grad_norm_(list(self.params.values()), opts.max_grad_norm)
                # The rate this step used (Prodigy scales it by its estimate d: log the product).
                lr = float(self.lr_scheduler.get_last_lr()[0]) * float(self.optimizer.param_groups[0].get("d", 1.0))
                self.optimizer.step()
                # An fp16 overflow skips the optimizer step: the schedule must not advance either.
                if not self.accelerator.optimizer_step_was_skipped:
                    self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        finally:
            self.math.gradient_checkpointing_off(checkpointing)
        if self.text_encoders:  # the adapter's text-encoder weights changed: no stale cached prompts
            self._state.bump()
        return total, lr

    def _hold(self, *, train: bool) -> None:
        """Make the training adapter the active one, switching only when something else (a
        generation) used the pipeline since the last step; flat in the number of loaded adapters.
        The inference side puts its own mix back when it next generates (``pipe_state``)."""
        switched = self._switch.hold(self.options.adapter_name, train=train, state=self._state, frozen=tuple(self._frozen))
        if switched and train:
            for param in self.params.values():  # diffusers' set_adapters may have turned them off
                param.requires_grad_(True)

    def evaluate_loss(self, micro: int = 0) -> float:
        """Loss of micro-batch ``micro`` (its own fixed noise and timesteps), without training."""
        import torch

        self._hold(train=False)
        with torch.no_grad(), self.accelerator.autocast():
            return float(self.math.micro_batch_loss(micro))

    # ------------------------------------------------------------------ files
    def checkpoint(self) -> Path:
        """Save adapter, training state, fixed-seed samples and grid for the current step."""
        final = checkpoint_dir(self.run_dir, self.step_index)
        # Room for this checkpoint (about the size of the last one) and the margin, or a clear failure
        # now: a disk that fills mid-write leaves only the temp folder, which atomic_dir removes.
        previous = list_checkpoints(self.run_dir)
        ckpt.check_free_disk(self.run_dir, self.options.min_free_disk_mb, f"before checkpoint {self.step_index}",
                             extra_bytes=ckpt.folder_bytes(previous[-1][1]) if previous else 0)
        with atomic_dir(final) as tmp:
            save_adapter_file(tmp / "adapter.safetensors", self.pipe.unet, self.options.adapter_name, self.text_encoders)
            state = {
                "step": self.step_index,
                "params": {k: v.detach().to("cpu").clone() for k, v in self.params.items()},
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
            }
            save_state(state, tmp)  # no pickle: runs_dir may be shared, its files are not trusted
            due = self.step_index % self.options.effective_sample_every == 0 or self.step_index >= self.options.steps
            if due and self.sample_prompts:
                self._write_samples(tmp / "samples")
        if self.options.keep_checkpoints:
            ckpt.prune_checkpoints(self.run_dir, self.options.keep_checkpoints)
        ckpt.plot_loss(self.run_dir)
        checkpoints = [{"step": s, "path": str(p.relative_to(self.run_dir))} for s, p in list_checkpoints(self.run_dir)]
        self._write_record(checkpoints=checkpoints)
        return final

    def _write_samples(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._hold(train=False)
        images = self.math.sample_images(self.sample_prompts)
        for i, image in enumerate(images):
            image.save(folder / f"{i:02d}.png")
        # The exact settings of these images (sample options may change on --resume).
        settings = json.dumps(self.math.sampling_settings(self.sample_prompts), indent=2)
        (folder / "settings.json").write_text(settings, encoding="utf-8")
        ckpt.make_grid(images, self.sample_prompts).save(folder.parent / "grid.png")

    def _load_state(self, folder: Path) -> None:
        import torch

        state = load_state(folder)
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value.to(self.params[name].device))
        pipe_state(self.pipe).bump()  # the adapter's weights changed
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        # Recompute this step's rate from the current schedule (--steps may have changed).
        self.lr_scheduler.last_epoch -= 1
        self.lr_scheduler.step()
        if state.get("scaler") and self.accelerator.scaler:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step_index = int(state["step"])
        ckpt.truncate_loss(self.run_dir, self.step_index)
        # Checkpoints after the one resumed from belong to a timeline that no longer exists.
        import shutil

        for step, path in list_checkpoints(self.run_dir):
            if step > self.step_index:
                shutil.rmtree(path, ignore_errors=True)
        log.info("resumed %s at step %d", self.run_dir, self.step_index)

    def _finish(self) -> None:
        from training.learning.kohya_export import kohya_metadata, write_diffusers_file, write_kohya_file

        last = checkpoint_dir(self.run_dir, self.step_index) / "adapter.safetensors"
        metadata = kohya_metadata(self.options, self.dataset, self.step_index, self.base_model, self.dataset_hash(),
                                  prediction_type=self.math.prediction_type)
        metadata.update(self.trained_metadata())
        # Both exports carry the header, so a copy without its sidecar keeps its kind and trigger.
        write_diffusers_file(last, self.run_dir / "adapter.safetensors", metadata)
        write_kohya_file(last, self.run_dir / "adapter.kohya.safetensors", self.options.alpha, metadata)
        self.status = "completed"
        self._write_record(status="completed")
        self.release()

    def trained_metadata(self) -> dict[str, str]:
        """kohya header values that say what this run actually did (not just its options)."""
        opts = self.options
        seen = self.step_index * opts.batch_size * opts.grad_accum
        images_per_epoch = sum(self.dataset.repeats)
        dirs: dict[str, dict[str, int]] = {}
        for item, reps in zip(self.dataset.items, self.dataset.repeats):
            folder = item.image_path.parent.name
            entry = dirs.setdefault(folder, {"n_repeats": reps, "img_count": 0})
            entry["img_count"] += 1
        preset = opts.effective_target_preset
        meta = {
            "ss_keep_tokens": str(self.keep_tokens),
            "ss_dataset_dirs": json.dumps(dirs),
            "ss_num_epochs": str(max(1, -(-seen // max(1, images_per_epoch)))),
            "ss_num_train_images": str(images_per_epoch),
            "arcae.target_preset": preset,
            "ss_optimizer": str(self.report.get("optimizer", {}).get("used", opts.optimizer)),
            "ss_lr_scheduler": str(self.report.get("lr_scheduler", opts.lr_scheduler)),
        }
        if preset == "locon" or opts.train_conv:
            meta["ss_network_args"] = json.dumps({"conv_dim": opts.rank, "conv_alpha": opts.alpha, "preset": preset})
        else:
            meta["ss_network_args"] = json.dumps({"preset": preset})
        return meta

    def dataset_hash(self) -> str:
        """sha256 over the dataset's image and caption bytes, in path order."""
        if not hasattr(self, "_dataset_hash"):
            h = hashlib.sha256()
            for item in self.dataset.items:
                for path in (item.image_path, item.image_path.with_suffix(".txt")):
                    if path.is_file():
                        h.update(str(path.relative_to(self.dataset.root)).encode())
                        h.update(hashlib.sha256(path.read_bytes()).digest())
            self._dataset_hash = h.hexdigest()
        return self._dataset_hash

    def _write_record(self, **fields: Any) -> None:
        if "status" in fields:
            self.status = fields["status"]
        update_run(
            self.run_dir, options=self.options.model_dump(mode="json"), step=self.step_index,
            total_steps=self.options.steps, kind=self.options.kind, trigger=self.options.trigger,
            base_model=self.base_model, signature_tags=self.dataset.signature_tags(),
            sample_prompts=self.sample_prompts, keep_tokens=self.keep_tokens, loss=self.last_loss,
            report=self._report(),
            elapsed_s=round(time.monotonic() - self._started, 3) if hasattr(self, "_started") else 0.0,
            **fields,
        )

    def _report(self) -> dict[str, Any]:
        """Preset, optimizer settings, effective learning rates now, and the exact sample settings."""
        report = dict(getattr(self, "report", {}))
        if hasattr(self, "optimizer"):
            report["effective_lr"] = effective_learning_rates(self.optimizer)
        if hasattr(self, "math"):
            report["sampling"] = self.math.sampling_settings(self.sample_prompts)
        return report


def _mix_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed derived from the run seed and a purpose, stable across processes."""
    return random.Random(f"arcae-{seed}-" + "-".join(map(str, parts))).getrandbits(63)
