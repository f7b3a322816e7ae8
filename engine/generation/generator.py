"""The Generator: one loaded SDXL pipeline that turns requests into PNG files.

``Generator.from_config(config, secrets)`` loads the base model (``engine.generation.models``), the adapter
registry and the prompt encoder once. ``generate`` and ``img2img`` then run one request each:

resolve defaults and limits (``<lora:...>`` prompt tags join the mix) -> set the adapter mix ->
build the sampler -> encode prompts (A1111 weighting, long prompts, ``[a:b:when]``/``[a|b]``
schedules) -> denoise (``output_type="latent"``; progress, cancellation and schedule switches from
the step callback) -> decode each image ourselves (fp16 NaN/black check) -> write PNGs atomically with
the A1111 infotext and the request JSON.

Not thread-safe: only the engine's GPU worker thread calls it. A count of N is one batch with
seeds seed..seed+N-1, one ``torch.Generator`` each, so image i reproduces alone with its seed.
``generate_batch`` runs several compatible jobs (same ``batch_key``) as one such batch.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any, Callable, Literal, Sequence

from engine.generation import imaging, infotext
from engine.generation.img2img import Img2ImgMixin
from engine.generation.run_items import BatchItem, OnStep, ShouldCancel, check_job_id
from engine.generation.postprocess import GenerationOutput, Rater, PendingImage, PendingOutput, finish_outputs
from engine.contract.config import ArcaeConfig, Secrets
from engine.contract.errors import EngineError, InvalidRequest, JobCanceled, OutOfMemory, UnknownAdapter
from engine.generation.models import LoadedModel, load_base_pipeline
from engine.generation.params import SIZE_PRESETS, fast_lcm_missing_message, resolve_params
from engine.generation.prompts import pipe_encoder, tokenize_chunks
from engine.contract.protocol import GenerationParams, ResolvedParams
from engine.generation.samplers import get_sampler, sampler_supports_zero_snr
from engine.generation.fast_modes import (
    RECIPES, check_weight, choose_mode, configured_modes, distilled_choice, find_distilled, sampling_for,
    wants_distilled,
)
from engine.contract.prompt_syntax import prompt_schedule

__all__ = ["GenerationOutput", "Generator", "PendingOutput", "SIZE_PRESETS"]

log = logging.getLogger(__name__)

def _offsets(items: list[BatchItem]) -> list[int]:
    """The batch row of each job's first image."""
    offsets, row = [], 0
    for item in items:
        offsets.append(row)
        row += item.resolved.count
    return offsets


def _batch_name(items: list[BatchItem]) -> str:
    return items[0].job_id if len(items) == 1 else "batch " + ", ".join(item.job_id for item in items)


class Generator(Img2ImgMixin):
    """Text-to-image, variations and upscales on one loaded pipeline (see the module docstring)."""

    def __init__(self, config: ArcaeConfig, model: LoadedModel, registry: Any, *, rater: Rater | None = None) -> None:
        self.config = config
        self.model = model
        self.pipe = model.pipe
        self.registry = registry
        self.rater = rater
        self.outputs_dir = config.path(config.storage.outputs_dir)
        self.encoder = pipe_encoder(self.pipe)  # SDXLPromptEncoder: A1111 weighting, 75-token chunks
        self._img2img_pipe: Any = None
        # Samplers are built from the model's own scheduler config, never from the previous
        # job's scheduler (whose options, e.g. Karras sigmas, would leak into the next sampler).
        self._scheduler_config = dict(self.pipe.scheduler.config)

    @classmethod
    def from_config(cls, config: ArcaeConfig, secrets: Secrets | None = None, *, rater: Rater | None = None) -> "Generator":
        """Load the base model and scan the adapter directory."""
        model = load_base_pipeline(config, secrets)
        from engine.generation.adapters import AdapterRegistry

        registry = AdapterRegistry(
            config.path(config.adapters.dir),
            model.pipe,
            lcm_adapter=config.adapters.lcm_adapter,
            default_weight=config.adapters.default_weight,
            max_active=config.adapters.max_active,
            lora_execution=config.engine.lora_execution,
        )  # scans the directory
        configured_modes(config.adapters, config.generation)  # a bad [adapters] fast entry stops start-up
        generator = cls(config, model, registry, rater=rater)
        if config.engine.compile != "off":
            from engine.generation.compiled import prepare_compiled

            prepare_compiled(generator)
        return generator

    # ------------------------------------------------------------------ requests

    def resolve(
        self,
        params: GenerationParams,
        mode: Literal["txt2img", "variation", "upscale"] = "txt2img",
        *,
        extra_negative: str = "",
        strength: float | None = None,
        source_image: str | None = None,
    ) -> ResolvedParams:
        """Defaults and limits applied (``InvalidRequest``/``UnknownAdapter`` say what is allowed)."""
        return self._resolve(params, mode, extra_negative=extra_negative, strength=strength, source_image=source_image)[0]

    def _resolve(self, params: GenerationParams, mode: Any, **kwargs: Any) -> tuple[ResolvedParams, list[str]]:
        fast_adapter, fast_mode, missing = None, None, None
        if params.fast or params.fast_mode:
            adapters = self.config.adapters
            try:
                fast_mode = choose_mode(
                    configured_modes(adapters, self.config.generation), params.fast_mode,
                    installed=lambda name: name in {a.name for a in self.registry.list()},
                    base_prediction=self.model.prediction,
                    missing_hint=fast_lcm_missing_message(adapters.lcm_adapter, str(self.config.path(adapters.dir))),
                )
            except UnknownAdapter as exc:
                # A mix's own distilled adapter (looked for below) runs without any stock one installed.
                if not (wants_distilled(params.fast_mode) and self._distilled_entries()):
                    raise
                missing, fast_mode = exc, distilled_choice("", self.model.prediction)  # its adapter comes below
            if missing is None:
                fast_adapter = (fast_mode.adapter, check_weight(fast_mode, params.fast_weight))
        resolved, warnings = self._resolve_with(params, mode, fast_adapter, fast_mode, **kwargs)
        if fast_mode is not None and wants_distilled(params.fast_mode):
            own = [a for a in resolved.adapters if a.name != fast_mode.adapter]
            entry = find_distilled(self._distilled_entries(), own)
            if entry is not None:
                fast_mode = distilled_choice(entry.name, self.model.prediction)
                fast_adapter = (entry.name, check_weight(fast_mode, params.fast_weight))
                resolved, warnings = self._resolve_with(params, mode, fast_adapter, fast_mode, **kwargs)
                resolved = resolved.model_copy(update={"fast_distilled": entry.name})  # the reply says so
                warnings.append(f"fast mode uses {entry.name}, the few-step adapter distilled for this adapter mix")
            elif missing is not None:
                raise missing
        return resolved, warnings

    def _distilled_entries(self) -> list[Any]:
        """Installed few-step adapters that were distilled for a mix."""
        entries = [self.registry.entry(a.name) for a in self.registry.list() if a.kind == "lcm"]
        return [e for e in entries if getattr(e, "distilled_for", None) is not None]

    def _distilled_in(self, resolved: ResolvedParams) -> str | None:
        """The distilled few-step adapter a fast request ran with (for the infotext), if any."""
        if not resolved.fast_mode:
            return None
        distilled = {e.name for e in self._distilled_entries()}
        return next((a.name for a in resolved.adapters if a.name in distilled), None)

    def _resolve_with(self, params: GenerationParams, mode: Any, fast_adapter: Any, fast_mode: Any,
                      **kwargs: Any) -> tuple[ResolvedParams, list[str]]:
        v_pred = self.model.prediction == "v_prediction"
        resolved, warnings = resolve_params(
            self.config.generation,
            params,
            mode=mode,
            max_active=self.config.adapters.max_active,
            default_weight=lambda name: self.registry.get(name).default_weight,
            fast_adapter=fast_adapter,
            fast_mode=fast_mode,
            cfg_rescale=self.config.model.cfg_rescale if v_pred else 0.0,
            **kwargs,
        )
        if v_pred and not fast_mode and not sampler_supports_zero_snr(resolved.sampler):
            warnings.append(f"{resolved.sampler} has no zero-terminal-SNR schedule: this v-prediction model may look washed out")
        return resolved, warnings

    def generate(
        self,
        params: GenerationParams,
        *,
        job_id: str,
        on_step: OnStep | None = None,
        should_cancel: ShouldCancel | None = None,
        extra_negative: str = "",
        deferred: bool = False,
    ) -> Any:
        """Text-to-image. Raises ``JobCanceled`` (nothing decoded or written) or ``OutOfMemory``.

        ``deferred``: return a one-item list of ``PendingOutput`` (decoded, not written) for
        ``finish`` to complete on another thread, instead of the ``GenerationOutput``.
        """
        check_job_id(job_id)
        resolved, warnings = self._resolve(params, "txt2img", extra_negative=extra_negative)
        item = BatchItem(job_id, resolved, warnings, on_step)
        return self._outputs(self._run(self.pipe, [item], should_cancel=should_cancel), deferred, single=True)

    def finish(self, pending: Sequence[PendingOutput]) -> list[GenerationOutput]:
        """Write, hash and rate deferred outputs (any thread; touches nothing of the pipeline)."""
        return finish_outputs(pending, self.rater)

    def _outputs(self, pending: list[PendingOutput], deferred: bool, *, single: bool = False) -> Any:
        if deferred:
            return pending
        outputs = self.finish(pending)
        return outputs[0] if single else outputs

    def generate_batch(
        self,
        jobs: Sequence[tuple[str, GenerationParams]],
        *,
        on_steps: Sequence[OnStep | None] | None = None,
        should_cancel: ShouldCancel | None = None,
        deferred: bool = False,
    ) -> list[Any]:
        """Several text-to-image jobs as ONE pipeline call; one output per job, in order.

        The jobs must share ``batch_key`` (else ``InvalidRequest``). Every image is what its job
        alone would produce (same seeds, one ``torch.Generator`` per image; batched matmuls may
        round differently by one 8-bit level, as a count of N does). ``on_steps[j]`` gets job
        j's progress and previews. ``should_cancel`` stops the whole call (``JobCanceled``).
        """
        if not jobs:
            raise InvalidRequest("a batch needs at least one job")
        steps = list(on_steps) if on_steps is not None else [None] * len(jobs)
        if len(steps) != len(jobs):
            raise InvalidRequest(f"{len(jobs)} jobs but {len(steps)} progress callbacks")
        items = []
        for (job_id, params), on_step in zip(jobs, steps):
            check_job_id(job_id)
            resolved, warnings = self._resolve(params, "txt2img")
            items.append(BatchItem(job_id, resolved, warnings, on_step))
        if len({item.job_id for item in items}) != len(items):
            raise InvalidRequest("each job of a batch needs its own job id")
        if len({self._batch_key(item.resolved) for item in items}) > 1:
            raise InvalidRequest(
                "jobs in one batch must share size, steps, CFG, sampler, fast mode, adapter mix and prompt length"
            )
        return self._outputs(self._run(self.pipe, items, should_cancel=should_cancel), deferred)

    def batch_key(self, params: GenerationParams) -> tuple:
        """What text-to-image jobs must share to run as one pipeline call (``generate_batch``).

        Size, steps, CFG, sampler, fast mode, the adapter mix with its weights, and the number
        of 75-token chunks: the prompt encoder pads a batch to its longest prompt, which would
        change a shorter prompt's image. Raises like ``resolve``.
        """
        return self._batch_key(self._resolve(params, "txt2img")[0])

    def _batch_key(self, resolved: ResolvedParams) -> tuple:
        texts = {t for p in (resolved.prompt, resolved.negative_prompt) for _, t in prompt_schedule(p, resolved.steps)}
        chunks = max(len(tokenize_chunks(tokenizer, text)) for tokenizer in self.encoder.tokenizers for text in texts)
        mix = tuple((a.name, float(a.weight or 0.0)) for a in resolved.adapters)
        r = resolved
        return (r.width, r.height, r.steps, r.cfg, r.sampler, r.fast, r.fast_mode, r.eta, mix, chunks)

    def describe(self) -> dict[str, Any]:
        """Model, device, dtype, adapters and VRAM use, for status requests."""
        import torch

        info: dict[str, Any] = {
            "model": self.model.name,
            "model_hash": self.model.model_hash,
            "device": self.model.device,
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "loaded_adapters": list(getattr(self.registry, "loaded", [])),
            "vram_used_mb": None,
            "vram_total_mb": None,
            "rates_outputs": self.rater is not None,
        }
        if self.model.device == "cuda" and torch.cuda.is_available():
            info["vram_used_mb"] = torch.cuda.memory_allocated() / 2**20
            info["vram_total_mb"] = torch.cuda.get_device_properties(0).total_memory / 2**20
        return info

    # ------------------------------------------------------------------ internals

    def _run(
        self, pipe: Any, items: list[BatchItem], *, should_cancel: ShouldCancel | None, image: Any = None
    ) -> list[PendingOutput]:
        import torch

        previous = pipe.scheduler
        try:
            return self._run_inner(pipe, items, should_cancel, image)
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            first = items[0].resolved
            total = sum(item.resolved.count for item in items)
            raise OutOfMemory(
                f"out of GPU memory at {first.width}x{first.height} x{total}; "
                "try a smaller size or fewer images"
            ) from None
        finally:
            # The next user of the shared pipeline (a training run's samples, its noise schedule)
            # must not inherit this job's sampler, e.g. LCM from fast mode.
            pipe.scheduler = previous

    def _run_inner(
        self, pipe: Any, items: list[BatchItem], should_cancel: ShouldCancel | None, image: Any
    ) -> list[PendingOutput]:
        """One pipeline call for every image of ``items`` (which share everything but prompts,
        seeds and counts): row r of the batch is image i of its job, seeded ``seed + i``."""
        import torch

        t0 = time.perf_counter()
        shared: dict[str, float] = {}
        first = items[0].resolved
        if should_cancel is not None and should_cancel():
            raise JobCanceled(f"job {_batch_name(items)} canceled before it started")
        self.registry.apply_mix([(a.name, float(a.weight or 0.0)) for a in first.adapters])
        pipe.scheduler, sampling = sampling_for(first, self._scheduler_config)
        t1 = time.perf_counter()
        shared["adapters_s"] = t1 - t0
        with torch.no_grad():
            scheduled = self.encoder.encode_scheduled(
                [i.resolved.prompt for i in items], [i.resolved.negative_prompt for i in items], first.steps
            )
        # One embedding row per image (what num_images_per_prompt would repeat for one job).
        rows = [j for j, item in enumerate(items) for _ in range(item.resolved.count)]
        embeds = scheduled.pipeline_kwargs(0, rows)
        t2 = time.perf_counter()
        shared["encode_s"] = t2 - t1
        generators = [
            torch.Generator(device="cpu").manual_seed(item.resolved.seed + i)
            for item in items for i in range(item.resolved.count)
        ]
        kwargs: dict[str, Any] = dict(
            **embeds,
            num_inference_steps=first.steps,
            guidance_scale=first.cfg,
            width=first.width,
            height=first.height,
            num_images_per_prompt=1,
            generator=generators,
            output_type="latent",
            callback_on_step_end=self._step_callback(items, should_cancel, scheduled, rows),
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "add_text_embeds"],
            **sampling,
        )
        if image is not None:
            kwargs.update(image=image, strength=first.strength)
        latents = pipe(**kwargs).images
        t3 = time.perf_counter()
        shared["denoise_s"] = t3 - t2
        if not bool(torch.isfinite(latents).all()):
            raise EngineError(
                "the model produced invalid values (NaN) while sampling; try another seed or sampler, "
                "or set [engine] dtype = 'bf16'"
            )
        if len(items) > 1:
            shared["batch_jobs"] = float(len(items))
        return [self._finish(item, latents[off : off + item.resolved.count], shared, t3 - t0)
                for item, off in zip(items, _offsets(items))]

    def _finish(self, item: BatchItem, latents: Any, shared: dict[str, float], elapsed: float) -> PendingOutput:
        """Decode one job's images (GPU); its timings are the shared call's plus its own. The
        files are written by ``finish`` (``engine.generation.postprocess``)."""
        t0 = time.perf_counter()
        timings = dict(shared)
        pixels = self._decode(latents, item.warnings)
        images = [self._pending_image(array, item.resolved, i, item.job_id) for i, array in enumerate(pixels)]
        timings["decode_s"] = time.perf_counter() - t0
        timings["total_s"] = elapsed + time.perf_counter() - t0
        return PendingOutput(images=images, params=item.resolved, timings=timings, warnings=item.warnings)

    def _step_callback(
        self, items: list[BatchItem], should_cancel: ShouldCancel | None, scheduled: Any, rows: list[int]
    ) -> Callable:
        previews = self.config.engine.previews
        offsets = _offsets(items)

        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # Raising here stops sampling at once: no VAE decode, no file (unlike pipe._interrupt).
            if should_cancel is not None and should_cancel():
                raise JobCanceled(f"job {_batch_name(items)} canceled at step {step + 1}")
            total = pipe.num_timesteps
            for item, off in zip(items, offsets):
                if item.on_step is None:
                    continue
                # A preview copies latents off the GPU (a sync per step): only when one is wanted.
                preview = None
                if previews and _wants_preview(item.on_step, step + 1, total):
                    preview = imaging.latent_preview(tensors["latents"][off : off + 1])  # the job's first image
                item.on_step(step + 1, total, preview)
            # Prompt editing/alternation: the next step's conditioning, only where it changes.
            if not scheduled.changes_at(step + 1):
                return {}
            return scheduled.callback_outputs(step + 1, rows, pipe.do_classifier_free_guidance, tensors)

        return callback

    def _decode(self, latents: Any, warnings: list[str]) -> list[Any]:
        vae = self.pipe.vae
        pictures = []
        for i in range(latents.shape[0]):
            # The fp32 fallback is per image: one overflowing image must not slow every later one.
            decoded, fell_back = imaging.decode_latents(vae, latents[i : i + 1].to(vae.device))
            if fell_back:
                log.warning(
                    "the VAE produced a NaN/black image in %s; that image was decoded again in fp32. Use "
                    "[engine] dtype = 'bf16' or [model] vae = 'madebyollin/sdxl-vae-fp16-fix' to avoid it", vae.dtype
                )
                warnings.append("the fp16 VAE produced a black image; it was decoded again in fp32")
            pictures.append(imaging.to_array(decoded))
        return pictures

    def _pending_image(self, pixels: Any, resolved: ResolvedParams, index: int, job_id: str) -> PendingImage:
        """The image's file path, A1111 infotext and request JSON (cheap; the PNG is written later)."""
        seed = resolved.seed + index
        mix = [(a.name, float(a.weight or 0.0)) for a in resolved.adapters]
        hashes = self.registry.lora_hashes([n for n, _ in mix]) if mix else {}
        spec = RECIPES[resolved.fast_mode] if resolved.fast_mode else get_sampler(resolved.sampler)
        fields = infotext.generation_fields(
            steps=resolved.steps,
            sampler=spec.infotext_sampler,
            schedule_type=spec.schedule_type,
            cfg=resolved.cfg,
            seed=seed,
            width=resolved.width,
            height=resolved.height,
            model_hash=self.model.model_hash,
            model_name=self.model.name,
            lora_hashes=hashes,
            denoising_strength=resolved.strength,
            hires_upscale=self.config.generation.upscale_factor if resolved.mode == "upscale" else None,
            cfg_rescale=resolved.cfg_rescale,
            zero_terminal_snr=bool(self._scheduler_config.get("rescale_betas_zero_snr")),
            fast_mode=resolved.fast_mode,
            fast_adapter=self._distilled_in(resolved),
        )
        prompt_line = " ".join(p for p in (resolved.prompt, infotext.lora_prompt_tags(mix)) if p)
        text = infotext.build_infotext(prompt_line, resolved.negative_prompt, fields)
        request = {
            "version": infotext.arcae_version(),
            "model": self.model.name,
            "model_hash": self.model.model_hash,
            "params": resolved.model_copy(update={"seed": seed, "count": 1}).model_dump(mode="json"),
            "batch": {"seed": resolved.seed, "count": resolved.count, "index": index},
        }
        path = self.outputs_dir / f"{job_id}-{index}.png"
        return PendingImage(path=path, seed=seed, pixels=pixels, infotext=text, request=request)


def _wants_preview(on_step: OnStep, step: int, total: int) -> bool:
    """Whether ``on_step`` would use a preview at this step (its optional ``wants_preview(step, total)``)."""
    wants = getattr(on_step, "wants_preview", None)
    return wants is None or bool(wants(step, total))
