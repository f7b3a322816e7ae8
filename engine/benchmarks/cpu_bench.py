"""CPU benchmark on the tiny model (``python -m engine bench``): ratios measured in one run.

Machines here are noisy, so every case times both sides in the same run, alternating trials,
and reports the ratio of medians. Absolute seconds are printed for context only.

Cases: ``service`` (a job through the engine process vs the same call on the library),
``mix`` (adapter mix change with 2 vs 50 adapters loaded, and vs loading from disk), ``fast``
(LCM 4 steps vs 28 steps with CFG), ``batching`` (4 compatible jobs as one call vs four
calls), ``training`` (generation latency while a LoRA trains vs idle, through the engine),
``distill_gain`` (4-step student vs teacher distance after / before distillation; distill_bench).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.benchmarks.ratios import Ratio, alternate, write_bench_config

CASES = ("service", "mix", "fast", "batching", "training", "ack", "worker", "fusion", "distill_gain")


class _Env:
    """The tiny model, an adapters dir with an LCM-style LoRA, and a loaded Generator."""

    def __init__(self, root: Path) -> None:
        from engine.contract.config import load_config
        from engine.generation.generator import Generator
        from engine.benchmarks.lora_synth import make_lora
        from engine.generation.tiny import build_tiny_components, make_tiny_model

        self.root = root
        self.model_dir = make_tiny_model(root / "tiny-sdxl", seed=0)
        self.config_path = write_bench_config(root, self.model_dir)
        self.config = load_config(self.config_path)
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(**build_tiny_components(0))
        adapters = self.config.path(self.config.adapters.dir)
        make_lora(pipe, adapters / f"{self.config.adapters.lcm_adapter}.safetensors", kind="lcm", seed=7)
        make_lora(pipe, adapters / "style-a.safetensors", kind="style", seed=8)
        self.generator = Generator.from_config(self.config)
        self.jobs = 0

    def job_id(self) -> str:
        self.jobs += 1
        return f"bench-{self.jobs}"

    def generate(self, **params: Any) -> Any:
        from engine.contract.protocol import GenerationParams

        return self.generator.generate(GenerationParams(**params), job_id=self.job_id())


def bench_fast(env: _Env, trials: int) -> list[Ratio]:
    std = lambda: env.generate(prompt="1girl, solo", seed=1, steps=28, cfg=6.0)  # noqa: E731
    fast = lambda: env.generate(prompt="1girl, solo", seed=1, steps=4, fast=True)  # noqa: E731
    t_std, t_fast = alternate(std, fast, trials)
    return [Ratio("fast", "standard 28 steps CFG / fast LCM 4 steps (speed-up)", t_std, t_fast, t_std / t_fast, "ideal: 14x (56 vs 4 UNet evals)", id="standard_vs_fast")]


def bench_batching(env: _Env, trials: int) -> list[Ratio]:
    def four_calls() -> None:
        for i in range(4):
            env.generate(prompt="1girl, solo", seed=10 + i, steps=8)

    one_call = lambda: env.generate(prompt="1girl, solo", seed=10, steps=8, count=4)  # noqa: E731
    t4, t1 = alternate(four_calls, one_call, trials)
    # What the worker does with 4 queued compatible jobs (own prompts and seeds): generate_batch.
    from engine.contract.protocol import GenerationParams

    prompts = ["1girl, solo", "1boy, smile", "cat, outdoors", "2girls, night"]
    jobs = [GenerationParams(prompt=text, seed=20 + i, steps=8) for i, text in enumerate(prompts)]

    def four_jobs() -> None:
        for params in jobs:
            env.generator.generate(params, job_id=env.job_id())

    merged = lambda: env.generator.generate_batch([(env.job_id(), params) for params in jobs])  # noqa: E731
    t4j, t1j = alternate(four_jobs, merged, trials)
    return [
        Ratio("batching", "4 jobs as four calls / as one batched call", t4, t1, t4 / t1, ">1 means batching pays", id="batching_4_calls_vs_1"),
        Ratio("batching", "4 queued jobs (own prompts) alone / merged by generate_batch", t4j, t1j, t4j / t1j, "what [engine] max_batch_jobs does", id="batching_queued_jobs"),
    ]


def bench_mix(trials: int) -> list[Ratio]:
    from engine.benchmarks.adapters_bench import measure_mix_change

    small = measure_mix_change(2, repeats=max(3, trials))
    large = measure_mix_change(50, repeats=max(3, trials))
    return [
        Ratio("mix", "Arcae mix change, 50 loaded / 2 loaded", large["apply_mix_s"], small["apply_mix_s"], large["apply_mix_s"] / small["apply_mix_s"], "flat = 1", id="mix_change_50_vs_2"),
        Ratio("mix", "diffusers set_adapters, 50 loaded / 2 loaded", large["set_adapters_s"], small["set_adapters_s"], large["set_adapters_s"] / small["set_adapters_s"], "diffusers issue 11816", id="diffusers_set_adapters_50_vs_2"),
        Ratio("mix", "diffusers set_adapters / Arcae mix change (50 loaded)", large["set_adapters_s"], large["apply_mix_s"], large["set_adapters_s"] / large["apply_mix_s"], id="diffusers_vs_arcae_mix_change"),
        Ratio("mix", "load adapter from disk / Arcae mix change (50 loaded)", large["load_s_mean"], large["apply_mix_s"], large["load_s_mean"] / large["apply_mix_s"], "why adapters stay loaded", id="load_vs_mix_change"),
    ]


class _EngineClient:
    """The engine as the bot sees it: a supervised child process and a websocket link.

    The link's event loop runs in its own thread, as in the bot: a loop that only ran during
    submits would miss websocket heartbeats while the in-process cases run, and lose the link.
    """

    def __init__(self, env: _Env) -> None:
        import threading

        self.env = env
        self.loop = asyncio.new_event_loop()
        self.done: dict[str, asyncio.Future] = {}
        self.progress: dict[str, int] = {}  # job id -> last step reported
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-engine-link", daemon=True)
        self._thread.start()
        self.call(self._start())

    def call(self, coro: Any, timeout: float = 900) -> Any:
        """Run ``coro`` on the link's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        from bot.engine_link import EngineLink
        from bot.engine_child import EngineSupervisor

        self.supervisor = EngineSupervisor(self.env.config_path, self.env.config)
        url = await self.supervisor.start()
        self.link = EngineLink(url, self.supervisor.secret, on_event=self._on_event)
        await self.link.start()

    async def _on_event(self, event: Any) -> None:
        if event.type == "progress":
            self.progress[event.job_id] = event.step
        fut = self.done.get(getattr(event, "job_id", ""))
        if fut is not None and not fut.done() and event.type in ("completed", "failed", "canceled"):
            fut.set_result(event)

    async def _submit(self, request: Any) -> float:
        fut = asyncio.get_running_loop().create_future()
        self.done[request.job_id] = fut
        t0 = time.perf_counter()
        await self.link.submit(request)
        event = await asyncio.wait_for(fut, 600)
        if event.type != "completed":
            raise RuntimeError(f"bench job {request.job_id} {event.type}: {getattr(event, 'message', '')}")
        return time.perf_counter() - t0

    def generate(self, **params: Any) -> float:
        from engine.contract.protocol import GenerateRequest, GenerationParams

        req = GenerateRequest(job_id=self.env.job_id(), owner="bench", params=GenerationParams(**params))
        return self.call(self._submit(req))

    def submit_training(self, options: dict[str, Any]) -> asyncio.Future:
        from engine.contract.protocol import TrainRequest

        req = TrainRequest(job_id=self.env.job_id(), owner="bench-admin", options=options)

        async def submit() -> asyncio.Future:
            fut = asyncio.get_running_loop().create_future()
            self.done[req.job_id] = fut
            await self.link.submit(req)
            return fut

        return self.call(submit())

    def close(self) -> None:
        async def stop() -> None:
            await self.link.close()
            await self.supervisor.close()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def bench_service(env: _Env, client: _EngineClient, trials: int) -> list[Ratio]:
    params = dict(prompt="1girl, solo", seed=3, steps=8)
    direct = lambda: env.generate(**params)  # noqa: E731
    through = lambda: client.generate(**params)  # noqa: E731
    t_engine, t_direct = alternate(through, direct, trials)
    return [Ratio("service", "job through the engine process / library call", t_engine, t_direct, t_engine / t_direct, f"overhead {1000 * (t_engine - t_direct):.0f} ms", id="service_overhead")]


def _tiny_dataset(root: Path, n: int = 6) -> Path:
    from PIL import Image

    ds = root / "bench-dataset"
    ds.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (40 * i % 255, 90, 200 - 20 * i)).save(ds / f"img{i}.png")
        (ds / f"img{i}.txt").write_text("benchchar, 1girl, solo, red hair", encoding="utf-8")
    return ds


def bench_training(env: _Env, client: _EngineClient, trials: int) -> list[Ratio]:
    params = dict(prompt="1girl, solo", seed=5, steps=8)
    idle = [client.generate(**params) for _ in range(trials + 1)][1:]
    dataset = _tiny_dataset(env.root)
    # A run long enough to outlast the measurement, within the engine's [training] caps (max_steps).
    options = {"dataset": str(dataset), "kind": "character", "trigger": "benchchar", "steps": 10_000, "rank": 4,
               "resolution": 64, "save_every": 10_000, "sample_every": 10_000}
    fut = client.submit_training(options)
    train_id = next(k for k, v in client.done.items() if v is fut)
    time.sleep(1.0)
    step_before = client.progress.get(train_id, 0)
    busy = [client.generate(**params) for _ in range(trials)]
    steps_during = client.progress.get(train_id, 0) - step_before
    note = f"{steps_during} training steps ran between these jobs"
    if fut.done():
        note = f"training ended early: {fut.result().type}: {getattr(fut.result(), 'message', '')}"
    else:
        client.call(client.link.cancel(train_id))
    t_busy, t_idle = statistics.median(busy), statistics.median(idle)
    return [Ratio("training", "generation latency while a LoRA trains / idle", t_busy, t_idle, t_busy / t_idle, note, id="generation_while_training")]


def run_cpu_bench(*, trials: int = 5, only: list[str] | None = None, out: Path | None = None) -> list[Ratio]:
    """Run the selected cases, print one line per ratio, and return them."""
    import logging
    import os

    # Two processes (this one and the engine) share the cores: OpenMP threads that spin while
    # idle would steal the other's CPU and turn the service ratio into noise.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.manual_seed(0)
    logging.getLogger("engine.generation.adapters").setLevel(logging.WARNING)  # 50 "loaded adapter" lines
    selected = [c for c in CASES if not only or c in only]
    unknown = [c for c in (only or []) if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case {unknown[0]!r}; cases: {', '.join(CASES)}")
    results: list[Ratio] = []
    print(f"Arcae CPU benchmark (tiny model, median of {trials} trials, ratios measured in this run)", flush=True)
    with tempfile.TemporaryDirectory(prefix="arcae-bench-") as tmp:
        env = _Env(Path(tmp)) if set(selected) - {"mix", "ack", "distill_gain"} else None
        client = _EngineClient(env) if env is not None and {"service", "training"} & set(selected) else None
        try:
            for case in selected:
                if case == "mix":
                    new = bench_mix(trials)
                elif case == "fast":
                    new = bench_fast(env, trials)
                elif case == "batching":
                    new = bench_batching(env, trials)
                elif case == "service":
                    new = bench_service(env, client, trials)
                elif case == "distill_gain":
                    from engine.benchmarks.distill_bench import bench_distill

                    new = bench_distill(trials)
                elif case == "worker":
                    from engine.benchmarks.worker_bench import bench_worker

                    new = bench_worker(env, trials)
                elif case == "fusion":  # issue 15's rows (fused LoRA, scheduler, SQLite indexes)
                    from engine.benchmarks.fusion_bench import bench_fusion

                    new = bench_fusion(env, trials)
                elif case == "ack":
                    from engine.benchmarks.bot_bench import bench_ack

                    new = bench_ack(trials)
                else:
                    new = bench_training(env, client, trials)
                for r in new:
                    print(r.line(), flush=True)
                results.extend(new)
        finally:
            if client is not None:
                client.close()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([asdict(r) for r in results], indent=2), encoding="utf-8")
    return results
