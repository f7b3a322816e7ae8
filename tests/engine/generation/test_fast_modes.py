"""Few-step fast modes on the tiny SDXL model: each recipe's scheduler and timesteps as published,
the UNet called exactly ``steps`` times, the best installed mode by default, and request limits."""

from __future__ import annotations

import pytest

from engine.contract.errors import InvalidRequest, UnknownAdapter
from engine.contract.protocol import GenerationParams
from tests.conftest import write_config

FAST_ENTRIES = """
[[adapters.fast]]
name = "tcd-sdxl"
recipe = "tcd"

[[adapters.fast]]
name = "dmd2-sdxl-4step"
recipe = "dmd2"

[[adapters.fast]]
name = "hyper-sdxl-8steps"
recipe = "hyper-sd"
steps = 8

[[adapters.fast]]
name = "lightning-sdxl-4step"
recipe = "lightning"
"""
ADAPTERS = ["lcm-lora-sdxl", "tcd-sdxl", "dmd2-sdxl-4step", "hyper-sdxl-8steps", "lightning-sdxl-4step"]

# recipe -> (scheduler class, steps, timesteps, A1111 sampler, schedule type), as their authors publish them.
PUBLISHED = {
    # LCMScheduler over 50 original steps (latent-consistency/lcm-lora-sdxl); diffusers >= 0.27
    # spreads the 4 steps evenly (999/759/499/259), the first release skipped (999/759/519/279).
    "lcm": ("LCMScheduler", 4, [999, 759, 499, 259], "LCM", "Automatic"),
    # TCDScheduler's defaults (h1t/TCD-SDXL-LoRA: 4 steps, eta 0.3).
    "tcd": ("TCDScheduler", 4, [999, 759, 499, 259], "TCD", "Automatic"),
    # tianweiy/DMD2: LCMScheduler with timesteps=[999, 749, 499, 249], guidance 0.
    "dmd2": ("LCMScheduler", 4, [999, 749, 499, 249], "LCM", "SGM Uniform"),
    # ByteDance/Hyper-SD 8-step LoRA: DDIM with timestep_spacing="trailing".
    "hyper-sd": ("DDIMScheduler", 8, [999, 874, 749, 624, 499, 374, 249, 124], "DDIM", "SGM Uniform"),
    # ByteDance/SDXL-Lightning 4-step LoRA: Euler with timestep_spacing="trailing".
    "lightning": ("EulerDiscreteScheduler", 4, [999, 749, 499, 249], "Euler", "SGM Uniform"),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    """A Generator on the tiny model with every kind of few-step adapter installed (random LoRAs)."""
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from tests.engine.generation.lora_factory import make_lora

    root = tmp_path_factory.mktemp("fast")
    config = load_config(write_config(root, tiny_model_dir, FAST_ENTRIES))
    generator = Generator.from_config(config)
    folder = config.path(config.adapters.dir)
    for i, name in enumerate(ADAPTERS):
        make_lora(generator.pipe, folder / f"{name}.safetensors", seed=10 + i, kind="other")
    generator.registry.reload()
    return generator


class UnetCalls:
    """Counts UNet forward calls and their batch sizes (a forward hook on the real UNet).

    Also records the scheduler the pipeline ran with: the generator puts the pipeline's own
    scheduler back after every job, so it cannot be read afterwards.
    """

    def __init__(self, unet, pipe=None):
        self.batches: list[int] = []
        self.scheduler = None

        def hook(mod, args, out):
            self.batches.append(args[0].shape[0])
            if pipe is not None and self.scheduler is None:
                self.scheduler = pipe.scheduler

        self._handle = unet.register_forward_hook(hook)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


@pytest.mark.parametrize("recipe", list(PUBLISHED))
def test_recipe_sets_the_published_scheduler_and_runs_steps_unet_calls(env, recipe):
    from engine.generation.infotext import parse_infotext, read_png_metadata

    scheduler_class, steps, timesteps, sampler, schedule = PUBLISHED[recipe]
    params = GenerationParams(prompt="1girl", fast_mode=recipe, seed=5, steps=4 if recipe == "lcm" else None)
    with UnetCalls(env.pipe.unet, env.pipe) as calls:
        out = env.generate(params, job_id=f"fast-{recipe}")
    scheduler = calls.scheduler
    assert type(scheduler).__name__ == scheduler_class
    assert [int(t) for t in scheduler.timesteps] == timesteps
    assert calls.batches == [1] * steps  # no CFG: one UNet call per step
    assert out.params.fast and out.params.fast_mode == recipe and out.params.steps == steps
    fields = parse_infotext(read_png_metadata(out.images[0].path)[0])
    assert (fields["Sampler"], fields["Schedule type"], fields["Steps"]) == (sampler, schedule, str(steps))
    assert fields["Fast mode"] == recipe
    adapter = next(a for a in out.params.adapters if a.name in ADAPTERS)
    assert f"<lora:{adapter.name}:1>" in fields["Prompt"] and adapter.name in fields["Lora hashes"]


def test_tcd_runs_with_its_eta(env):
    out = env.generate(GenerationParams(prompt="1girl", fast_mode="tcd", seed=5), job_id="tcd-eta")
    assert out.params.eta == 0.3


def test_fast_without_a_mode_takes_the_best_installed(env):
    out = env.generate(GenerationParams(prompt="1girl", fast=True, seed=1), job_id="fast-best")
    assert out.params.fast_mode == "dmd2"
    assert [a.name for a in out.params.adapters] == ["dmd2-sdxl-4step"]


def test_fast_mode_by_adapter_name_with_its_own_weight(env):
    out = env.generate(
        GenerationParams(prompt="1girl", fast_mode="lightning-sdxl-4step", fast_weight=0.5, seed=1), job_id="fast-w"
    )
    assert out.params.fast_mode == "lightning"
    assert [(a.name, a.weight) for a in out.params.adapters] == [("lightning-sdxl-4step", 0.5)]


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(fast_mode="dmd2", steps=6), "steps must be between 4 and 4 in fast mode dmd2"),
        (dict(fast_mode="dmd2", cfg=4.0), "CFG must be between 0 and 1 in fast mode dmd2 (it runs without CFG)"),
        (dict(fast_mode="lcm", cfg=4.0), "CFG must be between 0 and 2 in fast mode lcm"),
        (dict(fast_mode="tcd", fast_weight=1.9), "fast weight must be between 0.1 and 1.5 for TCD-LoRA"),
        (dict(fast_mode="turbo"), "unknown fast mode 'turbo'; configured: dmd2, dmd2-sdxl-4step, hyper-sd"),
    ],
)
def test_requests_outside_a_recipe_are_refused_with_what_is_allowed(env, params, message):
    with pytest.raises(InvalidRequest) as err:
        env.resolve(GenerationParams(prompt="1girl", **params))
    assert message in str(err.value)


def test_configured_but_missing_adapter_says_where_to_get_it(tmp_path, env):
    from engine.contract.config import load_config
    from engine.generation.generator import Generator

    config = load_config(write_config(tmp_path, env.config.model.source, FAST_ENTRIES))
    from engine.generation.adapters import AdapterRegistry

    empty = AdapterRegistry(config.path(config.adapters.dir), env.pipe)
    with pytest.raises(UnknownAdapter) as err:
        Generator(config, env.model, empty).resolve(GenerationParams(prompt="x", fast_mode="dmd2"))
    assert "'dmd2-sdxl-4step', which is not installed" in str(err.value) and "tianweiy/DMD2" in str(err.value)


@pytest.mark.parametrize("recipe, adapter, scheduler", [
    ("hyper-sd", "hyper-sdxl-8steps", "DDIMScheduler"),
    ("tcd", "tcd-sdxl", "TCDScheduler"),  # its sampler "TCD" is no standard-mode sampler
])
def test_variation_of_a_fast_image_keeps_its_mode_and_weight(env, recipe, adapter, scheduler):
    first = env.generate(GenerationParams(prompt="1girl", fast_mode=recipe, fast_weight=0.8, seed=2), job_id="fast-src")
    img2img = env._img2img()
    with UnetCalls(img2img.unet, img2img) as calls:
        out = env.img2img(first.images[0].path, "variation", job_id="fast-var")
    assert out.params.fast_mode == recipe
    assert [(a.name, a.weight) for a in out.params.adapters] == [(adapter, 0.8)]
    assert type(calls.scheduler).__name__ == scheduler


def test_cli_generate_with_a_fast_mode(env):
    import subprocess
    import sys

    from engine.generation.infotext import parse_infotext, read_png_metadata
    from tests.conftest import REPO

    config = env.config.base_dir / "config.toml"
    base = [sys.executable, "-m", "engine", "generate", "1girl", "--config", str(config), "--seed", "3"]
    done = subprocess.run(base + ["--fast-mode", "lightning", "--fast-weight", "0.7"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fields = parse_infotext(read_png_metadata(done.stdout.strip().splitlines()[-1])[0])
    assert (fields["Fast mode"], fields["Sampler"], fields["Schedule type"]) == ("lightning", "Euler", "SGM Uniform")
    assert "<lora:lightning-sdxl-4step:0.7>" in fields["Prompt"]
    refused = subprocess.run(base + ["--fast-mode", "dmd2", "--steps", "8"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "steps must be between 4 and 4 in fast mode dmd2" in refused.stderr
