"""``[engine] compile``: torch.compile of the UNet (channels_last), warmed up once per size at start-up.

What keeps it from recompiling in production:

- The UNet is compiled in place (``unet.compile``), so module names, peft's LoRA layers and the
  adapter registry see the same modules as in eager mode.
- Parameters are graph inputs (dynamo inlines ``nn.Module``s and lifts their parameters), and
  the fused LoRA execution changes weights in place (``copy_``): a new mix or a reloaded file
  changes no guard. With ``lora_execution = "unfused"`` a mix change alters which adapter
  branches run, so each new combination compiles again (a warning at start-up says so).
- Each size and batch shape compiles once, during the warm-up (with and without CFG), and the
  recompile limit is raised so that every configured size stays compiled instead of falling
  back to eager after the default limit of 8.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

log = logging.getLogger(__name__)

MODES = ("off", "default", "max-autotune")
# Sizes x (with, without CFG) x a few batch sizes, with room to spare.
RECOMPILE_LIMIT = 64


def compile_unet(pipe: Any, mode: str, *, backend: str = "inductor") -> bool:
    """Compile ``pipe.unet`` in place for ``mode`` (``off``: nothing); return whether it compiled.

    ``backend``: production uses inductor; the CPU tests pass ``aot_eager`` (the same dynamo
    graphs, guards and recompiles, without inductor's C++ builds, which take minutes per graph
    on a small shared CPU machine).
    """
    if mode not in MODES:
        raise ValueError(f"[engine] compile must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return False
    import torch
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    pipe.unet.to(memory_format=torch.channels_last)
    options = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}
    pipe.unet.compile(backend=backend, fullgraph=False, dynamic=False, **options)
    return True


def warm_up_sizes(generation: Any) -> list[tuple[int, int]]:
    """The default size and every SDXL size preset the ``[generation]`` limits allow."""
    from engine.contract.sizes import SDXL_SIZES

    sizes = [tuple(generation.size)]
    for preset in SDXL_SIZES:
        size = (preset.width, preset.height)
        fits = max(size) <= generation.max_side and min(size) >= generation.min_side
        if fits and size[0] * size[1] <= generation.max_pixels and size not in sizes:
            sizes.append(size)
    return sizes  # type: ignore[return-value]


def warm_up(pipe: Any, sizes: Iterable[tuple[int, int]]) -> float:
    """Compile every size now, with and without CFG (one UNet step each, no decode); return seconds."""
    import torch

    from diffusers import LCMScheduler

    sizes = list(sizes)
    started = time.perf_counter()
    standard = pipe.scheduler
    # Fast modes run without CFG and (LCM, TCD, DDIM) with integer timesteps, which dynamo guards
    # on: warm that variant up with the LCM scheduler, the standard one with the pipeline's own.
    variants = ((5.0, standard), (1.0, LCMScheduler.from_config(standard.config)))
    try:
        for i, (width, height) in enumerate(sizes, 1):
            t0 = time.perf_counter()
            for cfg, scheduler in variants:
                pipe.scheduler = scheduler
                with torch.no_grad():
                    pipe(prompt="warm-up", negative_prompt="", width=width, height=height, num_inference_steps=1,
                         guidance_scale=cfg, output_type="latent", generator=torch.Generator().manual_seed(0))
            log.info("compile warm-up %d/%d: %dx%d in %.1f s", i, len(sizes), width, height, time.perf_counter() - t0)
    finally:
        pipe.scheduler = standard
    return time.perf_counter() - started


def prepare_compiled(generator: Any, *, backend: str = "inductor") -> None:
    """Compile the generator's UNet per ``[engine] compile`` and warm every size up (progress in the log)."""
    config = generator.config
    if not compile_unet(generator.pipe, config.engine.compile, backend=backend):
        return
    if generator.registry.lora_execution != "fused":
        log.warning("[engine] compile with lora_execution = 'unfused': every new LoRA mix compiles again; use 'fused'")
    lcm = config.adapters.lcm_adapter
    if lcm and lcm in {a.name for a in generator.registry.list()}:
        from engine.contract.errors import EngineError

        try:  # wrap the few-step adapter's layers now: a first load later would change the graph
            generator.registry.apply_mix([(lcm, 0.0)])
        except EngineError as exc:
            log.warning("compile warm-up without %s: %s", lcm, exc)
    sizes = warm_up_sizes(config.generation)
    log.info("compiling the UNet (%s) for %d sizes", config.engine.compile, len(sizes))
    seconds = warm_up(generator.pipe, sizes)
    generator.registry.apply_mix([])
    log.info("compile warm-up done in %.1f s", seconds)
