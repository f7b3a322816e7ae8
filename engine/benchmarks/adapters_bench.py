"""Measure what a mix change costs with many adapters loaded (diffusers issue 11816).

``measure_mix_change(n_loaded)`` builds the tiny SDXL pipeline, writes ``n_loaded`` random LoRA
files (UNet + both text encoders), loads them all through ``AdapterRegistry`` and times a change
between two 2-adapter mixes, both with ``AdapterRegistry.apply_mix`` and with diffusers'
``pipe.set_adapters``. Benchmarks call it with 2 and 50 and print the ratios.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _best_of(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_mix_change(n_loaded: int, *, repeats: int = 7, text_encoders: bool = True, seed: int = 0) -> dict[str, float]:
    """Seconds for one mix change with ``n_loaded`` adapters loaded (best of ``repeats``).

    Returns ``{"n_loaded", "apply_mix_s", "set_adapters_s", "load_s_mean"}``.
    """
    from diffusers import StableDiffusionXLPipeline

    from engine.generation.adapters import AdapterRegistry
    from engine.benchmarks.lora_synth import make_lora
    from engine.generation.tiny import build_tiny_components

    if n_loaded < 2:
        raise ValueError("n_loaded must be at least 2 (the mixes use two adapters)")
    pipe = StableDiffusionXLPipeline(**build_tiny_components(seed))
    with tempfile.TemporaryDirectory() as tmp:
        adapters = Path(tmp)
        for i in range(n_loaded):
            make_lora(pipe, adapters / f"a{i}.safetensors", seed=seed + i, text_encoders=text_encoders, sidecar=False)
        registry = AdapterRegistry(adapters, pipe, write_sidecars=False)
        loads = []
        for i in range(n_loaded):
            start = time.perf_counter()
            registry.load(f"a{i}")
            loads.append(time.perf_counter() - start)
        mixes = ([("a0", 0.6), ("a1", 0.8)], [(f"a{n_loaded - 1}", 0.5), ("a0", 1.0)])
        state = {"i": 0}

        def change_registry() -> None:
            state["i"] ^= 1
            registry.apply_mix(mixes[state["i"]])

        def change_diffusers() -> None:
            state["i"] ^= 1
            names, weights = zip(*mixes[state["i"]])
            pipe.set_adapters(list(names), list(weights))

        return {
            "n_loaded": float(n_loaded),
            "apply_mix_s": _best_of(change_registry, repeats),
            "set_adapters_s": _best_of(change_diffusers, repeats),
            "load_s_mean": statistics.fmean(loads),
        }


if __name__ == "__main__":  # python -m engine.benchmarks.adapters_bench
    import logging

    logging.basicConfig(level=logging.WARNING)
    for n in (2, 50):
        r = measure_mix_change(n)
        print(
            f"{n:3d} loaded: apply_mix {r['apply_mix_s'] * 1e3:7.2f} ms   set_adapters {r['set_adapters_s'] * 1e3:7.2f} ms"
            f"   load {r['load_s_mean'] * 1e3:6.0f} ms/adapter"
        )
