"""The GPU suite's production rows: Arcae's own ``Generator`` end to end, as the engine runs it.

Each row is one job through ``Generator.generate`` (prompt encoding with A1111 weighting, the
LoRA mix, sampling, VAE decode, PNG with infotext written and fsynced) on the random-weight
SDXL pipeline of ``engine.benchmarks.gpu_bench``, with two LoRAs (rank 32, attention) and, in
fast mode, the LCM-LoRA (rank 64, all targets): LCM 4 steps at 1024x1024, LCM 6 steps at
832x1216, 28 steps with CFG at 1024x1024. Three executions, labelled as production runs them:
``unfused`` (``[engine] lora_execution = "unfused"``), ``fused`` (the default) and ``compiled``
(fused plus ``[engine] compile``, after its start-up warm-up). Rating is off: the WD tagger's
model is a download the bench machine cannot make (the note says so).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable

LCM = "lcm-lora-sdxl"
STYLES = ("bench-style", "bench-character")


def _cases(tiny: bool) -> list[tuple[str, dict[str, Any], tuple[int, int]]]:
    square, portrait = ((64, 64), (64, 96)) if tiny else ((1024, 1024), (832, 1216))
    return [
        ("LCM 4", dict(fast=True, steps=4), square),
        ("LCM 6", dict(fast=True, steps=6), portrait),
        # (4 steps on the tiny model: the smoke test checks the path, not the count.)
        (f"{4 if tiny else 28} steps CFG", dict(steps=4 if tiny else 28, cfg=6.0), square),
    ]


def _config(root: Path, tiny: bool, device: str) -> Any:
    from engine.contract.config import parse_config

    generation: dict[str, Any] = {"add_quality_tags": False, "fast_steps": 4, "max_steps": 60}
    if tiny:
        generation.update(size="64x64", min_side=32, max_side=256, max_pixels=65536)
    data = {
        "engine": {"device": device, "rate_outputs": False, "previews": False},
        "model": {"source": str(root / "unused"), "name": "random-sdxl"},
        "adapters": {"dir": "adapters"},
        "generation": generation,
        "storage": {"outputs_dir": "outputs", "database": "data/arcae.sqlite3"},
    }
    return parse_config(data, base_dir=root, source="bench")


def _write_loras(pipe: Any, adapters: Path, tiny: bool, lcm_targets: list[str]) -> None:
    from engine.benchmarks.lora_synth import ATTENTION_TARGETS, make_lora

    small, big = (4, 8) if tiny else (32, 64)
    make_lora(pipe, adapters / f"{LCM}.safetensors", kind="lcm", rank=big, seed=3, target_modules=lcm_targets)
    for seed, name in enumerate(STYLES):
        make_lora(pipe, adapters / f"{name}.safetensors", kind="style", rank=small, seed=seed,
                  target_modules=ATTENTION_TARGETS)


def bench_generator(pipe: Any, record: Callable[..., None], timer: Any, dt: str, *, tiny: bool, lcm_targets: list[str],
                    compile_mode: str = "default", compile_backend: str = "inductor") -> None:
    """Record one row per case and execution through ``record(name, dtype, batch, result, **kw)``.

    ``lcm_targets``: the modules the LCM-style LoRA adapts (``gpu_bench.LCM_TARGETS``).
    """
    from engine.contract.protocol import AdapterWeight, GenerationParams
    from engine.generation.adapters import AdapterRegistry
    from engine.generation.compiled import compile_unet, warm_up
    from engine.generation.generator import Generator
    from engine.generation.models import LoadedModel

    device = pipe.device.type
    with tempfile.TemporaryDirectory(prefix="arcae-genbench-") as tmp:
        root = Path(tmp)
        config = _config(root, tiny, device)
        adapters = config.path(config.adapters.dir)
        adapters.mkdir(parents=True)
        _write_loras(pipe, adapters, tiny, lcm_targets)
        model = LoadedModel(pipe=pipe, device=device, dtype=pipe.unet.dtype, name="random-sdxl", model_hash="0" * 10,
                            source="bench")
        registry = AdapterRegistry(adapters, pipe, lcm_adapter=LCM, max_active=4, lora_execution="unfused")
        generator = Generator(config, model, registry)
        mix = [AdapterWeight(name=STYLES[0], weight=0.8), AdapterWeight(name=STYLES[1], weight=0.7)]
        jobs = iter(range(10**9))
        try:
            executions = ("unfused", "fused") + (("compiled",) if compile_mode != "off" else ())
            for execution in executions:
                note = "PNG on, rating off (no tagger model offline)"
                registry.set_lora_execution("unfused" if execution == "unfused" else "fused")
                if execution == "compiled":
                    registry.apply_mix([(LCM, 0.0)])  # the LCM layers exist before compiling, as at start-up
                    compile_unet(pipe, compile_mode, backend=compile_backend)
                    note += f"; compile {compile_mode} ({compile_backend}), warm-up {warm_up(pipe, {s for _, _, s in _cases(tiny)}):.0f}s"
                for label, params, (width, height) in _cases(tiny):
                    request = GenerationParams(prompt="1girl, solo, (masterpiece:1.2), night city", seed=1,
                                               width=width, height=height, adapters=mix, **params)
                    run = lambda: generator.generate(request, job_id=f"bench-{next(jobs)}")  # noqa: E731
                    evals = params["steps"] * (1 if params.get("fast") else 2)
                    loras = "2 LoRAs + LCM" if params.get("fast") else "2 LoRAs"
                    record(f"Arcae {label} {width}x{height} {loras}, {execution}", dt, 1, timer.run(run),
                           evals=evals, decodes=1, size=round(math.sqrt(width * height)), note=note)
        finally:
            registry.restore_base()
            pipe.unet._compiled_call_impl = None  # back to eager for whatever runs next
            names = [n for n in (LCM, *STYLES) if n in registry.loaded]
            if names:
                pipe.delete_adapters(names)
