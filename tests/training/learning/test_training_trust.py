"""Training results a kohya user would trust: samples independent of serving traffic, optimiser
defaults, warm-up, target presets, metadata of what training did, scaling, refused schedules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_config
from tests.training.train_helpers import TRIGGER, generate, make_dataset, tiny_options, tiny_pipeline

LCM = "lcm-lora-sdxl"
ESCAPED = r"hkr, hikari \(arcaea\), 1girl"
# Over 75 CLIP tokens: diffusers' own encoding would cut it, /imagine's chunks it.
LONG = "hkr, " + ", ".join(f"tag{i} word{i}" for i in range(40))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from tests.training.tiny_tagger import make_tiny_tagger

    root = tmp_path_factory.mktemp("trust-data")
    return make_dataset(root, make_tiny_tagger(root / "tagger"))


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tiny_model_dir):
    """The engine's Generator on the tiny model with an LCM-LoRA installed (fast mode works)."""
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from tests.engine.generation.lora_factory import make_lora

    root = tmp_path_factory.mktemp("trust-gen")
    config = load_config(write_config(root, tiny_model_dir))
    gen = Generator.from_config(config)
    make_lora(gen.pipe, config.path(config.adapters.dir) / f"{LCM}.safetensors", seed=2, kind="lcm")
    gen.registry.reload()
    return gen


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def samples_of(checkpoint: Path) -> list[np.ndarray]:
    return [pixels(p) for p in sorted((checkpoint / "samples").glob("*.png"))] + [pixels(checkpoint / "grid.png")]


# ---------------------------------------------------------------------- 1. samples and scores
def test_samples_and_scores_do_not_depend_on_a_fast_generation_before(dataset, generator, tmp_path):
    from engine.contract.protocol import GenerationParams
    from training.data.checkpoints import score_run
    from training.learning.trainer import TrainingRun

    options = tiny_options(dataset, steps=5, sample_every=1, sample_prompts=[TRIGGER, ESCAPED])
    run = TrainingRun(generator.pipe, options, tmp_path / "run")
    try:
        run.step()
        quiet = samples_of(run.checkpoint())
        quiet_scores = score_run(tmp_path / "run", None)
        generator.generate(GenerationParams(prompt="1girl", fast=True, steps=2, seed=5), job_id="fast1")
        after_fast = samples_of(run.checkpoint())
        after_scores = score_run(tmp_path / "run", None)
    finally:
        run.release()
    assert len(quiet) == 3
    for a, b in zip(quiet, after_fast):
        np.testing.assert_array_equal(a, b)
    assert quiet_scores == after_scores
    # The fast job's sampler did not stay on the shared pipeline for the next user.
    assert type(generator.pipe.scheduler).__name__ != "LCMScheduler"


def test_a_text_encoder_lora_left_active_by_a_generation_reaches_neither_loss_nor_samples(dataset, generator, tmp_path):
    from engine.contract.protocol import AdapterWeight, GenerationParams
    from tests.engine.generation.lora_factory import make_lora
    from training.learning.trainer import TrainingRun

    adapters_dir = generator.config.path(generator.config.adapters.dir)
    make_lora(generator.pipe, adapters_dir / "te-style.safetensors", seed=4, kind="style", strength=3.0, text_encoders=True)
    generator.registry.reload()
    generator.generate(GenerationParams(prompt="1girl", steps=2, seed=1, adapters=[]), job_id="plain")
    run = TrainingRun(generator.pipe, tiny_options(dataset, steps=5, sample_every=1, sample_prompts=[TRIGGER]), tmp_path / "run")
    try:
        loss, samples = run.evaluate_loss(0), samples_of(run.checkpoint())
        styled = GenerationParams(prompt="1girl", steps=2, seed=1, adapters=[AdapterWeight(name="te-style", weight=1.0)])
        generator.generate(styled, job_id="styled")  # leaves the style LoRA (UNet + text encoders) active
        assert run.evaluate_loss(0) == loss
        for a, b in zip(samples, samples_of(run.checkpoint())):
            np.testing.assert_array_equal(a, b)
    finally:
        run.release()


def test_samples_are_what_imagine_makes_for_the_same_settings(dataset, generator, tmp_path):
    """At step 0 the adapter is the identity, so a sample must equal /imagine's image: same
    encoder (weights, escapes, long prompts, non-empty negative), sampler, seed and decode."""
    from engine.contract.protocol import GenerationParams
    from training.learning.trainer import TrainingRun

    prompts = [ESCAPED, LONG]
    options = tiny_options(dataset, steps=5, sample_prompts=prompts, sample_steps=3, sample_cfg=4.0, sample_sampler="DPM++ 2M")
    run = TrainingRun(generator.pipe, options, tmp_path / "run")
    try:
        run._write_samples(tmp_path / "run" / "s")
    finally:
        run.release()
    for i, prompt in enumerate(prompts):
        out = generator.generate(GenerationParams(
            prompt=prompt, negative_prompt=options.sample_negative, seed=options.seed + i, steps=3, cfg=4.0,
            sampler="DPM++ 2M", width=64, height=64, add_quality_tags=False,
        ), job_id=f"imagine{i}")
        np.testing.assert_array_equal(pixels(tmp_path / "run" / "s" / f"{i:02d}.png"), pixels(Path(out.images[0].path)))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert json.loads((tmp_path / "run" / "s" / "settings.json").read_text()) == record["report"]["sampling"]
    assert record["report"]["sampling"] == {
        "prompts": prompts, "negative_prompt": options.sample_negative, "sampler": "DPM++ 2M", "steps": 3,
        "cfg": 4.0, "width": 64, "height": 64, "seeds": [7, 8],
        "prompt_encoder": "engine.generation.prompts (A1111 weighting, 75-token chunks), as /imagine",
    }


class RecordingTokenizer:
    """The pipeline's real tokenizer, remembering every text it was asked to tokenize."""

    def __init__(self, inner):
        self.inner, self.texts = inner, []

    def __call__(self, text, *args, **kwargs):
        self.texts.extend([text] if isinstance(text, str) else list(text))
        return self.inner(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_escaped_tag_reaches_the_tokenizer_without_backslashes(dataset, tmp_path):
    from training.learning.trainer import TrainingRun

    pipe = tiny_pipeline()
    recorder = RecordingTokenizer(pipe.tokenizer)
    pipe.tokenizer = recorder
    run = TrainingRun(pipe, tiny_options(dataset, sample_prompts=[ESCAPED]), tmp_path / "run")
    try:
        run._write_samples(tmp_path / "run" / "s")
    finally:
        run.release()
    joined = " ".join(recorder.texts)
    assert "hikari" in joined and "(arcaea" in joined
    assert "\\" not in joined, recorder.texts


# ---------------------------------------------------------------------- 2. optimisers
def test_prodigy_gets_its_own_learning_rate_and_settings(dataset, tmp_path):
    from engine.contract.config import TrainingConfig
    from engine.contract.training_options import from_config, parse_options
    from training.learning.trainer import TrainingRun

    # [training] lr is AdamW's 1e-4: Prodigy must not inherit it.
    assert from_config(TrainingConfig(), dataset=dataset, kind="character", trigger="x", optimizer="prodigy").lr == 1.0
    assert from_config(TrainingConfig(), dataset=dataset, kind="character", trigger="x").lr == 1e-4
    assert parse_options(dict(dataset=dataset, kind="style", trigger="x", optimizer="prodigy", lr=0.5)).lr == 0.5
    pytest.importorskip("prodigyopt")
    options = tiny_options(dataset, optimizer="prodigy", lr=None, prodigy_d_coef=0.8, warmup=1, lr_scheduler="cosine")
    run = TrainingRun(tiny_pipeline(), options, tmp_path / "run")
    run.step()
    run.checkpoint()
    group = run.optimizer.param_groups[0]
    assert (group["lr"] > 0.5, group["d_coef"], group["safeguard_warmup"]) == (True, 0.8, True)
    report = json.loads((tmp_path / "run" / "run.json").read_text())["report"]
    assert report["optimizer"]["used"] == "prodigy" and report["optimizer"]["d_coef"] == 0.8
    assert report["effective_lr"]["unet"] == pytest.approx(group["lr"] * group["d"])
    from training.data.checkpoints import read_loss

    assert read_loss(tmp_path / "run")[0][2] < 1e-3  # loss.csv logs lr x d (d starts at 1e-6), not 1.0
    run.release()


def test_adamw8bit_fallback_is_said_in_the_report(dataset, tmp_path):
    from training.learning.trainer import TrainingRun

    try:
        import bitsandbytes  # noqa: F401
        import torch

        if torch.cuda.is_available():
            pytest.skip("bitsandbytes on CUDA: no fallback to report")
    except ImportError:
        pass
    run = TrainingRun(tiny_pipeline(), tiny_options(dataset, optimizer="adamw8bit"), tmp_path / "run")
    run.release()
    report = json.loads((tmp_path / "run" / "run.json").read_text())["report"]
    assert report["optimizer"]["requested"] == "adamw8bit" and report["optimizer"]["used"] == "adamw"
    assert any("fell back to adamw" in note for note in report["notes"])


@pytest.mark.cuda
def test_adamw8bit_is_8bit_with_bitsandbytes_on_cuda(dataset, tmp_path):
    import torch

    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from training.learning.trainer import TrainingRun

    pipe = tiny_pipeline().to("cuda")
    run = TrainingRun(pipe, tiny_options(dataset, optimizer="adamw8bit"), tmp_path / "run")
    run.step()
    assert isinstance(run.optimizer.optimizer, bnb.optim.AdamW8bit)
    run.release()


# ---------------------------------------------------------------------- 3. warm-up, LR stepping
def test_warmup_with_constant_scheduler_warms_up_and_says_so(dataset, tmp_path):
    from training.data.checkpoints import read_loss
    from training.learning.trainer import TrainingRun

    run = TrainingRun(tiny_pipeline(), tiny_options(dataset, steps=4, lr=1e-3, warmup=2, lr_scheduler="constant"), tmp_path / "run")
    while not run.done:
        run.step()
    rates = [lr for _, _, lr in read_loss(tmp_path / "run")]
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    report = json.loads((tmp_path / "run" / "run.json").read_text())["report"]
    assert report["lr_scheduler"] == "constant_with_warmup"
    assert any("constant_with_warmup" in note for note in report["notes"])


@pytest.mark.cuda
def test_lr_schedule_does_not_advance_when_fp16_skips_the_step(dataset, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from training.learning.trainer import TrainingRun

    pipe = tiny_pipeline().to("cuda", torch.float16)
    options = tiny_options(dataset, steps=10, lr=1e-3, lr_scheduler="linear", mixed_precision="fp16")
    run = TrainingRun(pipe, options, tmp_path / "run")
    # GradScaler starts at 2**16 (set lazily on first use): start it huge so the first step overflows.
    run.accelerator.scaler._init_scale = 2.0**60
    run.step()
    assert run.accelerator.optimizer_step_was_skipped
    assert run.lr_scheduler.last_epoch == 0
    run.release()


# ---------------------------------------------------------------------- 4. target presets
def _lora_module_names(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k.rsplit(".lora", 1)[0] for k in f.keys()}


@pytest.mark.parametrize("preset", ["kohya", "locon"])
def test_target_presets_train_what_kohya_trains_and_load_everywhere(dataset, generator, tmp_path, preset):
    import shutil

    from engine.contract.protocol import AdapterWeight, GenerationParams
    from training.learning.trainer import TrainingRun

    options = tiny_options(dataset, steps=2, lr=1e-2, sample_steps=1, train_text_encoders=True,
                           target_preset=preset if preset != "kohya" else None)
    run = TrainingRun(tiny_pipeline(), options, tmp_path / preset)
    while not run.done:
        run.step()
    names = _lora_module_names(tmp_path / preset / "adapter.safetensors")
    joined = "\n".join(names)
    for part in ("attn1.to_q", "attn2.to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "mlp.fc1", "mlp.fc2"):
        assert part in joined, part
    has_conv = any(n.endswith((".conv1", ".conv2")) for n in names) and "time_emb_proj" in joined
    assert has_conv == (preset == "locon")
    with Image.open(tmp_path / preset / "checkpoints" / "step-000002" / "grid.png"):
        pass
    from safetensors import safe_open

    with safe_open(str(tmp_path / preset / "adapter.kohya.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["arcae.target_preset"] == preset
    assert json.loads(meta["ss_network_args"]).get("conv_dim") == (4 if preset == "locon" else None)
    assert json.loads((tmp_path / preset / "run.json").read_text())["report"]["target_preset"] == preset

    # Plain diffusers: the peft file changes the image, the kohya file gives the same image.
    pipe = tiny_pipeline()
    plain = generate(pipe)
    pipe.load_lora_weights(str(tmp_path / preset), weight_name="adapter.safetensors", adapter_name="peft")
    from_peft = generate(pipe)
    pipe.load_lora_weights(str(tmp_path / preset), weight_name="adapter.kohya.safetensors", adapter_name="kohya")
    pipe.set_adapters(["kohya"], [1.0])
    assert np.abs(from_peft - plain).max() > 1e-3
    np.testing.assert_allclose(generate(pipe), from_peft, atol=1e-5)
    # Arcae's adapter registry loads both files, and they give the same image.
    adapters_dir = generator.config.path(generator.config.adapters.dir)
    for name in ("adapter.safetensors", "adapter.kohya.safetensors"):
        shutil.copy(tmp_path / preset / name, adapters_dir / f"{preset}-{name.split('.')[1]}.safetensors")
    generator.registry.reload()
    images = []
    for name in (f"{preset}-safetensors", f"{preset}-kohya", None):
        params = GenerationParams(prompt="hkr, 1girl", seed=3, steps=2, adapters=[AdapterWeight(name=name, weight=1.0)] if name else [])
        images.append(pixels(Path(generator.generate(params, job_id=f"p-{preset}-{name or 'none'}").images[0].path)))
    assert np.abs(images[0] - images[2]).max() > 0
    assert np.abs(images[0] - images[1]).max() <= 1


def test_attention_preset_is_attention_only(dataset, tmp_path):
    from training.learning.trainer import TrainingRun

    run = TrainingRun(tiny_pipeline(), tiny_options(dataset, steps=1, target_preset="attention"), tmp_path / "a")
    run.step()
    names = _lora_module_names(tmp_path / "a" / "adapter.safetensors")
    assert names and all(n.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for n in names), sorted(names)[:5]


def test_a_run_recorded_before_presets_resumes_only_as_attention(dataset, tmp_path):
    from engine.contract.training_errors import ResumeMismatch
    from training.data.run_record import read_run, update_run
    from training.learning.trainer import TrainingRun

    run = TrainingRun(tiny_pipeline(), tiny_options(dataset, steps=3, target_preset="attention"), tmp_path / "run")
    run.step()
    run.checkpoint()
    run.release()
    options = read_run(tmp_path / "run")["options"]
    for key in ("target_preset", "sample_sampler", "prodigy_d_coef", "prodigy_safeguard_warmup"):
        options.pop(key)  # what run.json held before these options existed
    update_run(tmp_path / "run", options=options)
    with pytest.raises(ResumeMismatch, match="target_preset"):
        TrainingRun(tiny_pipeline(), tiny_options(dataset, steps=3), tmp_path / "run", resume=True)
    resumed = TrainingRun(tiny_pipeline(), tiny_options(dataset, steps=3, target_preset="attention"), tmp_path / "run", resume=True)
    assert resumed.step_index == 1
    resumed.release()


# ---------------------------------------------------------------------- 5. metadata
def test_metadata_records_keep_tokens_used_and_repeats_trained(tmp_path):
    import shutil

    from safetensors import safe_open

    from tests.training.tiny_tagger import make_tiny_tagger
    from training.learning.trainer import TrainingRun

    source = make_dataset(tmp_path / "d", make_tiny_tagger(tmp_path / "tagger"))
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["keep_tokens"] = 3
    # kohya layout: the images in a "2_hkr" folder are trained twice per epoch.
    repeated = source / "2_hkr"
    repeated.mkdir()
    moved = {}
    for image in sorted(source.glob("*.png"))[:2]:
        shutil.move(image, repeated / image.name)
        shutil.move(image.with_suffix(".txt"), repeated / image.with_suffix(".txt").name)
        moved[image.name] = f"{repeated.name}/{image.name}"
    for entry in manifest["images"]:  # the training set takes exactly the manifest's images
        entry["file"] = moved.get(entry["file"], entry["file"])
    (source / "manifest.json").write_text(json.dumps(manifest))
    run = TrainingRun(tiny_pipeline(), tiny_options(source, steps=3, batch_size=2), tmp_path / "run")
    while not run.done:
        run.step()
    with safe_open(str(tmp_path / "run" / "adapter.kohya.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_keep_tokens"] == "3"
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert dirs["2_hkr"] == {"n_repeats": 2, "img_count": 2}
    assert dirs[source.name]["n_repeats"] == 1 and dirs[source.name]["img_count"] == len(list(source.glob("*.png")))
    assert meta["ss_num_train_images"] == str(2 * 2 + dirs[source.name]["img_count"])
    assert meta["ss_num_epochs"] == "1"  # 3 steps x 2 images < one epoch of 6


# ---------------------------------------------------------------------- 6. scaling, min-SNR, noise offset
def test_alpha_other_than_rank_reloads_with_the_same_scale_and_image(dataset, tmp_path):
    from peft.tuners.lora import LoraLayer

    from training.learning.trainer import TrainingRun

    pipe = tiny_pipeline()
    options = tiny_options(dataset, steps=3, rank=4, alpha=1.0, lr=1e-2, train_text_encoders=True)
    run = TrainingRun(pipe, options, tmp_path / "run")
    run.step()
    folder = run.checkpoint()
    run._switch.activate(options.adapter_name, train=False)
    try:
        live = generate(pipe)
    finally:
        run._switch.restore()
    run.release()
    assert np.abs(live - generate(pipe)).max() > 1e-3  # the adapter does something

    fresh = tiny_pipeline()
    fresh.load_lora_weights(str(folder), weight_name="adapter.safetensors", adapter_name="mine")
    scales = {m.scaling["mine"] for m in fresh.unet.modules() if isinstance(m, LoraLayer) and "mine" in m.scaling}
    assert scales == {0.25}
    np.testing.assert_array_equal(generate(fresh), live)


def _first_loss(dataset, tmp_path, name, **overrides) -> float:
    from training.learning.trainer import TrainingRun

    run = TrainingRun(tiny_pipeline(), tiny_options(dataset, batch_size=1, **overrides), tmp_path / name)
    try:
        return run.evaluate_loss(0)
    finally:
        run.release()


def test_min_snr_weight_is_applied(dataset, tmp_path):
    """Loss(gamma) / loss(off) must be min(snr, gamma) / snr at the drawn timestep."""
    import torch

    from training.learning.trainer import TrainingRun

    run = TrainingRun(tiny_pipeline(), tiny_options(dataset, batch_size=1), tmp_path / "probe")
    gen = torch.Generator("cpu")
    from training.learning.training_math import _seed

    gen.manual_seed(_seed(7, "noise", 0))
    latents = run.math.latent(run.dataset.micro_batch(0)[0])[0][None]
    torch.randn(latents.shape, generator=gen)
    torch.randn((1, latents.shape[1], 1, 1), generator=gen)  # the noise offset draw
    t = int(torch.randint(0, 1000, (1,), generator=gen))
    ac = float(run.math.noise_scheduler.alphas_cumprod[t])
    run.release()
    snr = ac / (1 - ac)
    gamma = snr / 4  # below the timestep's SNR: the weight is gamma / snr = 0.25
    off = _first_loss(dataset, tmp_path, "off", min_snr_gamma=0.0)
    on = _first_loss(dataset, tmp_path, "on", min_snr_gamma=gamma)
    assert on / off == pytest.approx(0.25, rel=1e-4)


def test_noise_offset_changes_the_noise(dataset, tmp_path):
    without = _first_loss(dataset, tmp_path, "n0", noise_offset=0.0, min_snr_gamma=0.0)
    with_offset = _first_loss(dataset, tmp_path, "n1", noise_offset=0.5, min_snr_gamma=0.0)
    assert abs(with_offset - without) > 1e-4 * without


# ---------------------------------------------------------------------- 7. refused schedules
@pytest.mark.parametrize(
    ("scheduler_options", "message"),
    [
        ({"rescale_betas_zero_snr": True}, "zero terminal SNR"),
        ({"prediction_type": "sample"}, "supports 'epsilon' and 'v_prediction' only"),
    ],
)
def test_unsupported_schedules_are_refused(dataset, tmp_path, scheduler_options, message):
    from diffusers import EulerDiscreteScheduler

    from engine.contract.training_errors import TrainingError
    from training.learning.trainer import TrainingRun

    pipe = tiny_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, **scheduler_options)
    with pytest.raises(TrainingError, match=message):
        TrainingRun(pipe, tiny_options(dataset), tmp_path / "run")


def test_v_prediction_with_zero_terminal_snr_trains(dataset, tmp_path):
    import math

    from diffusers import EulerDiscreteScheduler

    from training.learning.trainer import TrainingRun

    pipe = tiny_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True
    )
    run = TrainingRun(pipe, tiny_options(dataset, steps=2, batch_size=4), tmp_path / "run")
    assert all(math.isfinite(run.step().loss) for _ in range(2))
