"""Generation end to end on the tiny SDXL model (CPU): images, seeds, LoRA mixes, fast mode,
cancellation, variations/upscales, the fp16 VAE fallback, request limits and the CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.contract.errors import InvalidRequest, JobCanceled, UnknownAdapter
from engine.contract.protocol import AdapterWeight, GenerationParams
from tests.conftest import REPO, write_config

STYLE = "inkstyle"
LCM = "lcm-lora-sdxl"


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    """One Generator on the tiny model with a style LoRA and a (random) LCM-LoRA installed."""
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from tests.engine.generation.lora_factory import make_lora

    root = tmp_path_factory.mktemp("gen")
    config = load_config(write_config(root, tiny_model_dir))
    generator = Generator.from_config(config)
    adapters = config.path(config.adapters.dir)
    make_lora(generator.pipe, adapters / f"{STYLE}.safetensors", seed=1, kind="style", strength=2.0)
    make_lora(generator.pipe, adapters / f"{LCM}.safetensors", seed=2, kind="lcm")
    generator.registry.reload()
    return generator


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def run(generator, job_id: str, **params):
    params.setdefault("steps", 2)
    return generator.generate(GenerationParams(prompt=params.pop("prompt", "1girl, solo"), **params), job_id=job_id)


class UnetCalls:
    """Counts UNet forward calls and their batch sizes (a forward hook on the real UNet)."""

    def __init__(self, unet):
        self.batches: list[int] = []
        self._handle = unet.register_forward_hook(lambda mod, args, out: self.batches.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def test_generate_writes_png_with_full_infotext(env):
    from engine.generation.infotext import addnet_hash, parse_infotext, parse_lora_hashes, read_png_metadata

    steps_seen = []
    out = env.generate(
        GenerationParams(
            prompt="1girl, solo", negative_prompt="lowres, bad hands", seed=123, steps=3, cfg=5.5,
            sampler="DPM++ 2M Karras", adapters=[AdapterWeight(name=STYLE, weight=0.7)],
        ),
        job_id="full",
        on_step=lambda step, total, preview: steps_seen.append((step, total, preview)),
    )
    [image] = out.images
    path = Path(image.path)
    assert path.name == "full-0.png" and path.parent == env.outputs_dir
    assert image.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (image.seed, image.width, image.height) == (123, 64, 64)
    assert [s[:2] for s in steps_seen] == [(1, 3), (2, 3), (3, 3)]
    assert all(isinstance(s[2], Image.Image) and max(s[2].size) <= 256 for s in steps_seen)

    text, request = read_png_metadata(path)
    fields = parse_infotext(text)
    assert fields["Prompt"] == f"1girl, solo <lora:{STYLE}:0.7>"
    assert fields["Negative prompt"] == "lowres, bad hands"
    assert fields["Steps"] == "3"
    assert (fields["Sampler"], fields["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert fields["CFG scale"] == "5.5"
    assert fields["Seed"] == "123"
    assert (fields["Size-1"], fields["Size-2"]) == ("64", "64")
    assert fields["Model hash"] == env.model.model_hash and len(env.model.model_hash) == 10
    assert fields["Model"] == "tiny-sdxl"
    lora_file = env.config.path(env.config.adapters.dir) / f"{STYLE}.safetensors"
    assert parse_lora_hashes(fields["Lora hashes"]) == {STYLE: addnet_hash(lora_file)[:12]}
    assert fields["Version"].startswith("arcae-")
    assert request["params"] == out.params.model_dump(mode="json")
    assert request["model_hash"] == env.model.model_hash


def test_same_seed_same_pixels_other_seed_differs(env):
    a = run(env, "seed-a", seed=7).images[0]
    b = run(env, "seed-b", seed=7).images[0]
    c = run(env, "seed-c", seed=8).images[0]
    assert np.array_equal(pixels(a.path), pixels(b.path))
    assert not np.array_equal(pixels(a.path), pixels(c.path))


def test_random_seed_is_reported_and_reproduces(env):
    out = run(env, "rand")
    again = run(env, "rand-again", seed=out.params.seed)
    assert out.images[0].seed == out.params.seed
    assert np.array_equal(pixels(out.images[0].path), pixels(again.images[0].path))


def test_batch_image_reproduces_alone(env):
    batch = run(env, "batch", seed=40, count=2)
    single = run(env, "single", seed=41)
    assert [i.seed for i in batch.images] == [40, 41]
    assert [Path(i.path).name for i in batch.images] == ["batch-0.png", "batch-1.png"]
    diff = np.abs(pixels(batch.images[1].path) - pixels(single.images[0].path))
    assert diff.max() <= 1  # batch-of-2 matmuls may round differently from batch-of-1 by one level
    assert not np.array_equal(pixels(batch.images[0].path), pixels(batch.images[1].path))


def test_fast_mode_runs_unet_steps_times_without_cfg_and_warns(env):
    with UnetCalls(env.pipe.unet) as calls:
        out = run(env, "fast", fast=True, steps=4, negative_prompt="blurry", seed=3)
    assert calls.batches == [1, 1, 1, 1]
    assert out.params.sampler == "LCM" and out.params.cfg == 1.0
    assert (LCM, env.config.generation.fast_lcm_weight) in [(a.name, a.weight) for a in out.params.adapters]
    assert any("negative prompt has no effect in fast mode" in w for w in out.warnings)


def test_standard_mode_runs_cfg_as_batch_of_two(env):
    with UnetCalls(env.pipe.unet) as calls:
        out = run(env, "cfg", steps=2, cfg=5.0, seed=3)
    assert calls.batches == [2, 2]
    assert out.warnings == []


def test_lora_weight_zero_is_base_and_weight_one_changes(env):
    base = pixels(run(env, "lora-base", seed=11).images[0].path)
    zero = pixels(run(env, "lora-0", seed=11, adapters=[AdapterWeight(name=STYLE, weight=0.0)]).images[0].path)
    one = pixels(run(env, "lora-1", seed=11, adapters=[AdapterWeight(name=STYLE, weight=1.0)]).images[0].path)
    assert np.array_equal(base, zero)
    assert np.abs(base - one).mean() > 1.0


def test_long_prompts_and_weighting_reach_the_image(env):
    # The tiny tokenizer is byte-level: one character is one token.
    long_prompt = ", ".join(f"tag{i:02d}" for i in range(20))  # 118 tokens
    truncated = long_prompt[:75]  # what a 77-token encoder (BOS + 75 + EOS) would see
    full = pixels(run(env, "long", prompt=long_prompt, seed=5).images[0].path)
    cut = pixels(run(env, "cut", prompt=truncated, seed=5).images[0].path)
    assert not np.array_equal(full, cut)
    plain = pixels(run(env, "plain", prompt="1girl, solo", seed=5).images[0].path)
    weighted = pixels(run(env, "weighted", prompt="(1girl:1.5), solo", seed=5).images[0].path)
    assert not np.array_equal(plain, weighted)


def test_a_step_callback_gets_a_preview_only_when_it_wants_one(env, monkeypatch):
    from engine.generation import imaging

    built: list[int] = []
    real = imaging.latent_preview
    monkeypatch.setattr(imaging, "latent_preview", lambda latents: built.append(1) or real(latents))
    seen: list = []

    def on_step(step, total, preview):
        seen.append((step, preview))

    on_step.wants_preview = lambda step, total: step == 2
    env.generate(GenerationParams(prompt="1girl", steps=3, seed=5), job_id="want-preview", on_step=on_step)
    assert [s for s, _ in seen] == [1, 2, 3] and len(built) == 1
    assert seen[0][1] is None and isinstance(seen[1][1], Image.Image) and seen[2][1] is None


def test_cancel_stops_before_last_step_without_decode_or_file(env):
    seen: list[int] = []
    decodes: list[int] = []
    handle = env.pipe.vae.decoder.register_forward_hook(lambda *a: decodes.append(1))
    try:
        with pytest.raises(JobCanceled):
            env.generate(
                GenerationParams(prompt="1girl", steps=4, seed=1),
                job_id="cancel",
                on_step=lambda step, total, preview: seen.append(step),
                should_cancel=lambda: len(seen) >= 2,
            )
    finally:
        handle.remove()
    assert seen == [1, 2] and decodes == []
    assert not any(p.name.startswith("cancel") or ".cancel" in p.name for p in env.outputs_dir.iterdir())
    assert run(env, "after-cancel", seed=1).images  # the pipeline stays usable


def test_variation_and_upscale_share_the_loaded_model(env):
    source = run(env, "src", seed=21, adapters=[AdapterWeight(name=STYLE, weight=0.5)], negative_prompt="x")
    src_path = Path(source.images[0].path)
    # a client that echoes the source's seed back still gets a new seed for a variation
    echo = GenerationParams(prompt="1girl, solo", seed=21)
    variation = env.img2img(src_path.name, "variation", echo, job_id="var")
    upscale = env.img2img(src_path, "upscale", job_id="up")
    pipe2 = env._img2img()
    assert pipe2.unet is env.pipe.unet and pipe2.vae is env.pipe.vae and pipe2.text_encoder_2 is env.pipe.text_encoder_2
    assert env._img2img() is pipe2  # built once
    status = env.describe()
    assert (status["model"], status["device"], status["dtype"]) == ("tiny-sdxl", "cpu", "float32")
    assert STYLE in status["loaded_adapters"]

    v = variation.params
    assert (v.mode, v.strength, v.prompt, v.negative_prompt) == ("variation", 0.5, "1girl, solo", "x")
    assert [(a.name, a.weight) for a in v.adapters] == [(STYLE, 0.5)]
    assert v.seed != 21 and (variation.images[0].width, variation.images[0].height) == (64, 64)
    assert not np.array_equal(pixels(variation.images[0].path), pixels(src_path))

    u = upscale.params
    assert (u.mode, u.strength, u.seed, u.source_image) == ("upscale", 0.35, 21, src_path.name)
    assert (upscale.images[0].width, upscale.images[0].height) == (96, 96)  # 64 * 1.5
    with pytest.raises(InvalidRequest, match="not found"):
        env.img2img("nope.png", "variation", job_id="bad")


def test_fp16_vae_nan_falls_back_to_fp32(env):
    import copy

    import torch

    from engine.generation.imaging import decode_latents, is_broken_decode

    assert is_broken_decode(torch.full((1, 3, 8, 8), float("nan")))
    assert is_broken_decode(torch.full((1, 3, 8, 8), -1.0))
    assert not is_broken_decode(torch.rand(1, 3, 8, 8) * 2 - 1)
    vae16 = copy.deepcopy(env.pipe.vae).to(torch.float16)  # CPU fp16 conv works for the tiny VAE
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 1e4  # overflows fp16
    with torch.no_grad():
        raw = vae16.decode((latents / vae16.config.scaling_factor).half()).sample
    assert is_broken_decode(raw)
    image, fell_back = decode_latents(vae16, latents)
    assert fell_back and bool(torch.isfinite(image).all()) and vae16.dtype == torch.float16


def test_an_fp16_vae_fallback_is_per_image_not_for_the_rest_of_the_process(env):
    """One overflowing image decodes in fp32; the next normal image decodes in fp16 again."""
    import copy

    import numpy as np
    import torch

    from engine.generation.imaging import decode_latents, to_pil

    vae16 = copy.deepcopy(env.pipe.vae).to(torch.float16)
    normal = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    in_fp16 = np.asarray(to_pil(decode_latents(vae16, normal)[0]))
    in_fp32 = np.asarray(to_pil(decode_latents(vae16, normal, force_fp32=True)[0]))
    assert not np.array_equal(in_fp16, in_fp32), "the test needs fp16 and fp32 decodes to differ"
    saved, env.pipe.vae = env.pipe.vae, vae16
    try:
        warnings: list[str] = []
        env._decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 1e4, warnings)
        assert warnings and "fp32" in warnings[0]
        later: list[str] = []
        picture = env._decode(normal, later)[0]
    finally:
        env.pipe.vae = saved
    assert later == [] and np.array_equal(np.asarray(picture), in_fp16)


@pytest.mark.cuda
def test_fp16_generation_on_cuda_is_never_black(tiny_model_dir, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: fp16 inference is only used on CUDA")
    from engine.contract.config import load_config
    from engine.generation.generator import Generator

    config = load_config(write_config(tmp_path, tiny_model_dir))
    config = config.model_copy(update={"engine": config.engine.model_copy(update={"device": "cuda", "dtype": "fp16"})})
    generator = Generator.from_config(config)
    assert generator.pipe.unet.dtype == torch.float16
    out = generator.generate(GenerationParams(prompt="1girl", steps=2, seed=1), job_id="cuda")
    assert pixels(out.images[0].path).max() > 0


def test_limits_say_what_is_allowed(env):
    from engine.generation.generator import Generator

    cases = [
        (dict(steps=500), "steps must be between 1 and 60"),
        (dict(cfg=25.0), "CFG must be between 0 and 20"),
        (dict(width=60, height=64), "multiples of 8"),
        (dict(width=512, height=64), "between 32 and 256"),
        (dict(count=5), "count must be between 1 and 4"),
        (dict(sampler="Euler z"), "allowed: Euler a, Euler, DPM++ 2M"),
        (dict(fast=True, steps=12), "steps must be between 1 and 8 in fast mode"),
        (dict(prompt="x" * 2001), "at most 2000"),
    ]
    for values, message in cases:
        values.setdefault("prompt", "1girl")
        with pytest.raises(InvalidRequest, match=message.replace("+", r"\+")):
            env.resolve(GenerationParams(**values))
    with pytest.raises(UnknownAdapter, match=f"known adapters: .*{STYLE}"):
        env.resolve(GenerationParams(prompt="x", adapters=[AdapterWeight(name="nope")]))
    many = [AdapterWeight(name=STYLE)] * 2
    with pytest.raises(InvalidRequest, match="more than once"):
        env.resolve(GenerationParams(prompt="x", adapters=many))
    no_lcm = env.config.model_copy(
        update={"adapters": env.config.adapters.model_copy(update={"lcm_adapter": "missing-lcm"})}
    )
    with pytest.raises(UnknownAdapter, match="hf download latent-consistency/lcm-lora-sdxl"):
        Generator(no_lcm, env.model, env.registry).resolve(GenerationParams(prompt="x", fast=True))


def test_defaults_quality_tags_and_explicit_values(env):
    from engine.generation.generator import Generator

    gen_cfg = env.config.generation.model_copy(update={"add_quality_tags": True})
    generator = Generator(env.config.model_copy(update={"generation": gen_cfg}), env.model, env.registry)
    r = generator.resolve(GenerationParams(prompt="1girl"))
    assert r.prompt == f"{gen_cfg.quality_tags}, 1girl"
    assert (r.negative_prompt, r.steps, r.cfg, r.sampler, r.width) == (gen_cfg.negative_prompt, 4, 6.0, "Euler a", 64)
    mine = generator.resolve(GenerationParams(prompt="1girl", negative_prompt="", steps=3, add_quality_tags=False))
    assert (mine.prompt, mine.negative_prompt, mine.steps) == ("1girl", "", 3)
    safe = generator.resolve(GenerationParams(prompt="1girl", negative_prompt="bad"), extra_negative="nsfw")
    assert safe.negative_prompt == "bad, nsfw"


def test_rater_fills_the_rating(env):
    from engine.generation.generator import Generator

    seen = []

    def rater(image):
        seen.append(image.size)
        return "sensitive", {"general": 0.2, "sensitive": 0.7}

    out = Generator(env.config, env.model, env.registry, rater=rater).generate(
        GenerationParams(prompt="1girl", steps=1, seed=2), job_id="rated"
    )
    assert seen == [(64, 64)]
    assert (out.images[0].rating, out.images[0].rating_scores) == ("sensitive", {"general": 0.2, "sensitive": 0.7})


def test_size_presets_and_samplers():
    import diffusers

    from engine.generation.params import SIZE_PRESETS, parse_size
    from engine.generation.samplers import available_samplers, make_scheduler, sampler_from_infotext
    from engine.generation.tiny import build_tiny_components

    assert parse_size("portrait") == (832, 1216) and parse_size("1216x832") == (1216, 832)
    assert set(SIZE_PRESETS.values()) >= {(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (1152, 896), (768, 1344), (1344, 768)}
    with pytest.raises(InvalidRequest, match="square \\(1024x1024\\)"):
        parse_size("big")
    base = build_tiny_components().get("scheduler").config
    for name, spec in available_samplers().items():
        scheduler = make_scheduler(name, base)
        assert isinstance(scheduler, getattr(diffusers, spec.scheduler_class))
        assert scheduler.config.get("use_karras_sigmas", False) == (spec.schedule_type == "Karras")
    assert sampler_from_infotext("DPM++ 2M", "Karras") == "DPM++ 2M Karras"
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC", "Heun", "LCM"} <= set(available_samplers())


def test_cli_bad_inputs_exit_2_with_one_line(env, tiny_model_dir, tmp_path, capsys):
    from engine.cli import main

    config = str(write_config(tmp_path, tiny_model_dir))
    adapters_dir = str(env.config.path(env.config.adapters.dir))
    cases = [
        (["--adapter", "nope", "--adapters-dir", adapters_dir], f"unknown adapter 'nope'; known adapters: {STYLE}"),
        (["--size", "65x64"], "multiples of 8"),
        (["--size", "huge"], "use WIDTHxHEIGHT"),
        (["--steps", "999"], "steps must be between 1 and 60"),
        (["--cfg", "21"], "CFG must be between 0 and 20"),
        (["--model", str(tmp_path / "missing-model")], "not found"),
        (["--fast"], "hf download latent-consistency/lcm-lora-sdxl"),
    ]
    for extra, message in cases:
        assert main(["generate", "1girl", "--config", config, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (extra, err)


def test_cli_generate_prints_paths_in_a_subprocess(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir)
    out_dir = tmp_path / "cli-out"
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "1girl, solo", "--config", str(config), "--steps", "2",
         "--count", "2", "--seed", "5", "--out", str(out_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.strip().splitlines()
    assert len(paths) == 2 and all(Path(p).is_file() and Path(p).parent == out_dir for p in paths)
    assert "sampling" in proc.stderr  # the progress bar
