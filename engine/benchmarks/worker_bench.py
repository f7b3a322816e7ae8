"""Worker rows of ``python -m engine bench`` (case ``worker``): the GPU thread's own costs.

- ``encode_cache_hit_50_vs_2``: a prompt-cache hit with 50 adapters loaded / with 2 (the cache
  keys on a counter, ``engine.generation.pipe_state``; it used to walk every parameter);
- ``train_switch_50_vs_2``: a training step's adapter switch after a generation, 50 loaded / 2;
- ``worker_pipeline_share``: the share of the GPU worker thread's time spent in the Generator's
  pipeline call (mix, prompts, denoising, decoding) while a queue of jobs with rating and PNG
  writing runs; the rest is event and queue overhead, since files and ratings are made on the
  post-processing pool (``engine.service.gpu_postprocess``);
- ``png_level_4_vs_6``: PNG encode time at zlib level 6 / level 4 on an anime-like 832x1216
  image, with the sizes at levels 1, 4 and 6 (why ``postprocess.PNG_COMPRESS_LEVEL`` is 4).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from engine.benchmarks.ratios import Ratio, alternate

TRAIN_ADAPTER = "arcae_bench_train"


def _loaded_pipe(n_loaded: int, root: Path) -> tuple[Any, Any]:
    """The tiny pipeline with ``n_loaded`` random LoRAs (UNet + text encoders) loaded, 2 active."""
    from diffusers import StableDiffusionXLPipeline

    from engine.benchmarks.lora_synth import make_lora
    from engine.generation.adapters import AdapterRegistry
    from engine.generation.tiny import build_tiny_components

    pipe = StableDiffusionXLPipeline(**build_tiny_components(0))
    pipe.set_progress_bar_config(disable=True)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_loaded):
        make_lora(pipe, root / f"a{i}.safetensors", seed=i, text_encoders=True, sidecar=False)
    registry = AdapterRegistry(root, pipe, write_sidecars=False)
    for i in range(n_loaded):
        registry.load(f"a{i}")
    registry.apply_mix([("a0", 0.6), ("a1", 0.8)])
    return pipe, registry


def _hit_and_switch(n_loaded: int, root: Path) -> tuple[Any, Any, Any]:
    """Callables for one prompt-cache hit and one training switch after a generation, on a
    pipeline with ``n_loaded`` adapters, and a cleanup."""
    from peft import LoraConfig

    from engine.generation.pipe_state import pipe_state
    from engine.generation.prompts import pipe_encoder
    from training.learning.lora import AdapterSwitch, add_training_adapter

    pipe, _ = _loaded_pipe(n_loaded, root)
    encoder = pipe_encoder(pipe)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    add_training_adapter(pipe.unet, TRAIN_ADAPTER, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    switch = AdapterSwitch([pipe.unet, pipe.text_encoder, pipe.text_encoder_2])
    state = pipe_state(pipe)

    def hits() -> None:
        for _ in range(50):
            encoder.encode("1girl, solo, smile", "lowres")

    def switches() -> None:
        for _ in range(10):
            state.claim_for_inference()  # what the generation's apply_mix does first
            switch.hold(TRAIN_ADAPTER, train=True, state=state)

    state.claim_for_inference()
    hits()  # the first encode fills the cache
    return hits, switches, state.claim_for_inference


def _cache_hit_and_switch(trials: int) -> tuple[float, float, float, float]:
    """Seconds per cache hit and per switch with 2 and with 50 adapters: (hit2, hit50, sw2, sw50)."""
    with tempfile.TemporaryDirectory(prefix="arcae-worker-bench-") as tmp:
        hits2, switches2, _ = _hit_and_switch(2, Path(tmp) / "two")
        hits50, switches50, _ = _hit_and_switch(50, Path(tmp) / "fifty")
        h50, h2 = alternate(hits50, hits2, trials)
        s50, s2 = alternate(switches50, switches2, trials)
    return h2 / 50, h50 / 50, s2 / 10, s50 / 10


class _Rater:
    """A stand-in for the WD tagger's CPU cost (no model download): its 448 px bicubic resize and
    a matrix product of the same order as a small ONNX head, batched like ``rate_many``."""

    def __init__(self) -> None:
        import numpy as np

        self.weights = np.random.default_rng(0).standard_normal((448 * 3, 448)).astype("float32")

    def rate_many(self, images: list[Any]) -> list[tuple[str, dict[str, float]]]:
        import numpy as np
        from PIL import Image

        batch = np.stack([np.asarray(im.convert("RGB").resize((448, 448), Image.BICUBIC), dtype="float32") for im in images])
        score = float((batch.reshape(len(images), 448, 448 * 3) @ self.weights).mean())
        return [("general", {"general": 0.5 + 0.0 * score, "sensitive": 0.5})] * len(images)

    def __call__(self, image: Any) -> tuple[str, dict[str, float]]:
        return self.rate_many([image])[0]


def _pipeline_share(env: Any, jobs: int) -> tuple[float, float, float]:
    """(seconds in the pipeline call, wall seconds of the worker thread, seconds of files + rating)."""
    from engine.contract import protocol
    from engine.contract.config import ArcaeConfig
    from engine.service.gpu_worker import GpuWorker

    class TimedWorker(GpuWorker):
        spans: list[tuple[float, float]] = []
        in_pipeline = 0.0

        def _generate(self, record: Any, request: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return super()._generate(record, request)
            finally:
                self.in_pipeline += time.perf_counter() - t0

        def _run_job(self, record: Any, *, started: bool = False) -> None:
            t0 = time.perf_counter()
            super()._run_job(record, started=started)
            self.spans.append((t0, time.perf_counter()))

    config: ArcaeConfig = env.config
    config = config.model_copy(update={"engine": config.engine.model_copy(update={"max_batch_jobs": 1})})
    generator, old_rater = env.generator, env.generator.rater
    generator.rater = _Rater()
    ends: dict[str, Any] = {}
    done = threading.Condition()

    def emit(event: Any) -> None:
        if isinstance(event, protocol.TERMINAL_EVENT_TYPES):
            with done:
                ends[event.job_id] = event
                done.notify_all()

    worker = TimedWorker(generator, config, name="bench-gpu")
    worker.start(emit)
    try:
        hold, holding = threading.Event(), threading.Event()
        worker.call_between_jobs(lambda: (holding.set(), hold.wait(60)))
        holding.wait(60)  # the queue fills before the worker looks at it
        ids = [env.job_id() for _ in range(jobs)]
        for i, job_id in enumerate(ids):
            params = protocol.GenerationParams(prompt="1girl, solo", seed=100 + i, steps=8, width=64, height=64)
            worker.submit(protocol.GenerateRequest(job_id=job_id, owner=f"user{i % 3}", params=params))
        hold.set()
        with done:
            done.wait_for(lambda: all(j in ends for j in ids), 600)
    finally:
        worker.stop()
        generator.rater = old_rater
    failed = [e for e in ends.values() if not isinstance(e, protocol.Completed)]
    if failed:
        raise RuntimeError(f"bench job {failed[0].job_id} ended {failed[0].type}: {getattr(failed[0], 'message', '')}")
    wall = worker.spans[-1][1] - worker.spans[0][0]
    post = sum(e.timings.get("save_s", 0.0) + e.timings.get("rate_s", 0.0) for e in ends.values())
    return worker.in_pipeline, wall, post


def anime_like_image(width: int = 832, height: int = 1216, seed: int = 0) -> Any:
    """A stand-in for a decoded SDXL anime image (the tiny model's outputs are noise, which says
    nothing about PNG sizes): a soft gradient, flat-shaded shapes with dark outlines, a slight blur
    and +-3 grain, as a VAE decode leaves."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    sky = (np.array([200, 220, 255]) * (1 - y) + np.array([255, 200, 220]) * y + 10 * x).clip(0, 255)
    image = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype("uint8"))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        cx, cy, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(20, 250))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color, outline=(30, 20, 30), width=3)
        else:
            points = [(cx + int(rng.integers(-r, r)), cy + int(rng.integers(-r, r))) for _ in range(5)]
            draw.polygon(points, fill=color, outline=(30, 20, 30))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.2))).astype("int16")
    pixels += rng.integers(-3, 4, pixels.shape).astype("int16")
    return Image.fromarray(pixels.clip(0, 255).astype("uint8"))


def _png_levels(trials: int) -> dict[int, tuple[float, int]]:
    """{zlib level: (median encode seconds, bytes)} for levels 1, 4 and 6 (alternating trials)."""
    from engine.generation import infotext

    picture = anime_like_image()
    times: dict[int, list[float]] = {1: [], 4: [], 6: []}
    sizes: dict[int, int] = {}
    for _ in range(trials):
        for level in times:
            t0 = time.perf_counter()
            sizes[level] = len(infotext.encode_png(picture, "x", {"v": 1}, compress_level=level))
            times[level].append(time.perf_counter() - t0)
    return {level: (statistics.median(t), sizes[level]) for level, t in times.items()}


def bench_worker(env: Any, trials: int) -> list[Ratio]:
    """The worker case's rows (see the module docstring); ``env`` is cpu_bench's tiny-model env."""
    import torch

    threads = f"torch threads {torch.get_num_threads()}"
    hit2, hit50, switch2, switch50 = _cache_hit_and_switch(trials)
    in_pipe, wall, post = _pipeline_share(env, jobs=max(6, 2 * trials))
    png = _png_levels(trials)
    (t1, b1), (t4, b4), (t6, b6) = png[1], png[4], png[6]
    sizes = f"sizes: level 1 {b1 / b6 - 1:+.1%}, level 4 {b4 / b6 - 1:+.1%} vs 6; level 1 is {t6 / t1:.1f}x faster than 6"
    return [
        Ratio("worker", "prompt cache hit, 50 adapters loaded / 2 loaded", hit50, hit2, hit50 / hit2,
              f"bound <= 1.3; {threads}", id="encode_cache_hit_50_vs_2"),
        Ratio("worker", "training switch after a generation, 50 loaded / 2", switch50, switch2, switch50 / switch2,
              f"bound <= 1.5; {threads}", id="train_switch_50_vs_2"),
        Ratio("worker", "GPU thread: time in the pipeline call / all its time", in_pipe, wall, in_pipe / wall,
              f"bound >= 0.9; files + rating took {post:.2f} s on the pool meanwhile (on this thread the share "
              f"would be about {in_pipe / (wall + post):.2f}); {threads}", id="worker_pipeline_share"),
        Ratio("worker", "PNG encode 832x1216, zlib level 6 / level 4 (the one used)", t6, t4, t6 / t4,
              f"{sizes}; {threads}", id="png_level_4_vs_6"),
    ]
