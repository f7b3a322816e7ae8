"""GPU benchmark at full SDXL size with random weights (``python -m engine bench --gpu``).

The architecture is built from the SDXL base configuration (UNet 2.57 B parameters, CLIP-L and
OpenCLIP bigG text encoders, the SDXL VAE), so the compute is identical to animagine-xl's and
nothing is downloaded. Each case reports the median of repeated trials, peak VRAM and achieved
TFLOP/s against the device's peak, using FLOP counts measured with ``torch.utils.flop_counter``
on the SDXL base configuration (UNet 6.76 TFLOP per evaluation at 1024x1024 batch 1, VAE
decode 10.5 TFLOP). ``tiny=True`` runs the same code on the tiny model (CPU smoke test).
The production rows (``Arcae ...``, Arcae's own Generator end to end, eager / fused / compiled)
come from ``engine.benchmarks.generator_bench``, for the production dtype (bf16 when listed).
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

UNET_TFLOP_1024 = 6.76  # per UNet evaluation, batch 1, 1024x1024 (torch.utils.flop_counter)
VAE_DECODE_TFLOP_1024 = 10.5

# Dense bf16/fp16 tensor-core peaks (TFLOP/s), by device-name substring, most specific first.
DEVICE_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("4090", 165.0),
    ("A10G", 70.0),
]

SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
CLIP_L_CONFIG: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")
CLIP_G_CONFIG: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280, hidden_act="gelu")

ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# What LCM-LoRA SDXL adapts: attention, projections, feed-forward, resnet convs, time embeddings.
LCM_TARGETS = ATTN_TARGETS + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class CaseResult:
    name: str
    dtype: str
    batch: int
    seconds: float
    trials: list[float]
    unet_evals: int = 0
    decodes: int = 0
    peak_vram_gb: float | None = None
    tflops: float | None = None
    pct_of_peak: float | None = None
    note: str = ""


@dataclass
class BenchReport:
    device: str
    peak_tflops: float | None
    versions: dict[str, str]
    date: str
    size: int
    tiny: bool = False
    cases: list[CaseResult] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        head = f"{'case':44} {'dtype':5} {'b':>2} {'median s':>9} {'TFLOP/s':>8} {'% peak':>7} {'VRAM GB':>8}"
        rows = [head, "-" * len(head)]
        for c in self.cases:
            tf = f"{c.tflops:8.1f}" if c.tflops is not None else f"{'-':>8}"
            pct = f"{c.pct_of_peak:6.1f}%" if c.pct_of_peak is not None else f"{'-':>7}"
            vram = f"{c.peak_vram_gb:8.2f}" if c.peak_vram_gb is not None else f"{'-':>8}"
            rows.append(f"{c.name[:44]:44} {c.dtype:5} {c.batch:>2} {c.seconds:9.3f} {tf} {pct} {vram}" + (f"  {c.note}" if c.note else ""))
        return "\n".join(rows)


def peak_for(device_name: str) -> float | None:
    for key, peak in DEVICE_PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None


def build_pipeline(*, tiny: bool, dtype, device: str):
    """An SDXL pipeline with random weights: full SDXL base architecture, or the tiny model."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine.generation.tiny import build_tiny_components

    comps = build_tiny_components(0)
    if tiny:
        pipe = StableDiffusionXLPipeline(**comps)
        return pipe.to(device=device, dtype=dtype)
    tok = comps["tokenizer"]
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    # Initialise directly on the device: 3.5 B random parameters are slow to make on a CPU.
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(**common, **CLIP_L_CONFIG))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **CLIP_G_CONFIG))
    sched = EulerAncestralDiscreteScheduler.from_config(comps["scheduler"].config)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)
    pipe = pipe.to(device=device, dtype=dtype)
    # Random weights: keep the VAE in the pipeline dtype (upcasting would time an fp32 decode).
    pipe.vae.config.force_upcast = False
    return pipe


def add_bench_loras(unet, *, tiny: bool) -> list[str]:
    """Two rank-32 attention LoRAs (style, character) and a rank-64 LCM-style LoRA on all targets."""
    from peft import LoraConfig

    r_small, r_big = (4, 8) if tiny else (32, 64)
    specs = [("style", r_small, ATTN_TARGETS), ("character", r_small, ATTN_TARGETS), ("lcm", r_big, LCM_TARGETS)]
    for name, rank, targets in specs:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian"), adapter_name=name)
    unet.set_adapters(["style", "character", "lcm"], [0.8, 0.7, 1.0])
    return [s[0] for s in specs]


def _lora_layers(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def fused(unet):
    """Merge the active LoRAs into the base weights for the duration (peft merge/unmerge)."""
    layers = _lora_layers(unet)
    for m in layers:
        m.merge()
    try:
        yield
    finally:
        for m in layers:
            m.unmerge()


class Timer:
    """Median wall time of repeated calls, synchronising the device around each."""

    def __init__(self, device: str, trials: int, warmup: int) -> None:
        self.device, self.trials, self.warmup = device, trials, warmup

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def run(self, fn: Callable[[], Any]) -> tuple[float, list[float], float | None]:
        import torch

        cuda = self.device.startswith("cuda")
        for _ in range(self.warmup):
            fn()
        if cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(self.trials):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        return statistics.median(times), times, peak


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__, "transformers": transformers.__version__, "cuda": str(torch.version.cuda), "python": platform.python_version()}


def _record(report: BenchReport, name: str, dtype: str, batch: int, result, *, evals: int, decodes: int, size: int, note: str = "") -> None:
    seconds, trials, peak = result
    scale = (size / 1024) ** 2
    flop = (evals * UNET_TFLOP_1024 + decodes * VAE_DECODE_TFLOP_1024) * scale * batch
    # The FLOP counts are those of the real SDXL architecture; they mean nothing for the tiny model.
    tflops = flop / seconds if seconds > 0 and not report.tiny else None
    pct = 100 * tflops / report.peak_tflops if tflops and report.peak_tflops else None
    report.cases.append(CaseResult(name, dtype, batch, seconds, trials, evals, decodes, peak, tflops, pct, note))
    print(report.table().splitlines()[-1], flush=True)


def run_gpu_bench(*, tiny: bool = False, dtypes=("fp16", "bf16"), batches=(1, 4), compile_unet: bool = True, trials: int = 3, out: Path | None = None, device: str | None = None, compile_backend: str = "inductor") -> BenchReport:
    """Run the suite and return the report (also written as JSON to ``out``).

    ``compile_backend``: the production rows' compile backend (the CPU tests use ``aot_eager``).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    size = 64 if tiny else 1024
    report = BenchReport(device=name, peak_tflops=None if tiny else peak_for(name), versions=_versions(), date=time.strftime("%Y-%m-%d"), size=size, tiny=tiny)
    timer = Timer(device, trials=trials, warmup=1)
    std_steps, lcm_steps = (4, 2) if tiny else (28, 4)
    print(report.table().splitlines()[0], flush=True)
    for dt in dtypes:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
        pipe = build_pipeline(tiny=tiny, dtype=dtype, device=device)
        pipe.set_progress_bar_config(disable=True)
        _bench_dtype(pipe, report, timer, dt, size, batches, std_steps, lcm_steps, compile_unet=compile_unet and not tiny, tiny=tiny)
        if dt == ("bf16" if "bf16" in dtypes else dtypes[0]):  # the production dtype: Arcae's own Generator
            from engine.benchmarks.generator_bench import bench_generator

            bench_generator(pipe, lambda *a, **k: _record(report, *a, **k), timer, dt, tiny=tiny, lcm_targets=LCM_TARGETS,
                            compile_mode="default" if compile_unet else "off", compile_backend=compile_backend)
        del pipe
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.to_json(), encoding="utf-8")
    return report


def _generate(pipe, *, steps: int, cfg: float, batch: int, size: int, decode: bool = False):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    out = "np" if decode else "latent"
    return lambda: pipe(prompt=["1girl, solo, masterpiece"] * batch, negative_prompt=["lowres"] * batch if cfg > 1 else None, num_inference_steps=steps, guidance_scale=cfg, height=size, width=size, generator=gen, output_type=out)


def _bench_dtype(pipe, report, timer, dt, size, batches, std_steps, lcm_steps, *, compile_unet: bool, tiny: bool) -> None:
    import torch

    for b in batches:
        _record(report, f"std {std_steps} steps CFG, no LoRA", dt, b, timer.run(_generate(pipe, steps=std_steps, cfg=6.0, batch=b, size=size)), evals=2 * std_steps, decodes=0, size=size)
    _record(report, f"std {std_steps} steps CFG + VAE decode (end to end)", dt, 1, timer.run(_generate(pipe, steps=std_steps, cfg=6.0, batch=1, size=size, decode=True)), evals=2 * std_steps, decodes=1, size=size)
    latents = torch.randn(1, 4, size // 8 if not tiny else size // 2, size // 8 if not tiny else size // 2, device=pipe.device, dtype=pipe.vae.dtype)
    with torch.no_grad():
        _record(report, "VAE decode", dt, 1, timer.run(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor)), evals=0, decodes=1, size=size)
    _bench_train(pipe, report, timer, dt, size, tiny)
    add_bench_loras(pipe.unet, tiny=tiny)
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    for b in batches:
        _record(report, f"LCM {lcm_steps} steps, 3 LoRAs unfused", dt, b, timer.run(_generate(pipe, steps=lcm_steps, cfg=1.0, batch=b, size=size)), evals=lcm_steps, decodes=0, size=size)
        with fused(pipe.unet):
            _record(report, f"LCM {lcm_steps} steps, 3 LoRAs fused", dt, b, timer.run(_generate(pipe, steps=lcm_steps, cfg=1.0, batch=b, size=size)), evals=lcm_steps, decodes=0, size=size)
            if b == 1:
                _record(report, f"LCM {lcm_steps} fused + VAE decode (end to end)", dt, 1, timer.run(_generate(pipe, steps=lcm_steps, cfg=1.0, batch=1, size=size, decode=True)), evals=lcm_steps, decodes=1, size=size)
    if compile_unet:
        with fused(pipe.unet):
            original = pipe.unet.forward
            pipe.unet.forward = torch.compile(pipe.unet.forward, mode="max-autotune-no-cudagraphs")
            try:
                t0 = time.perf_counter()
                _generate(pipe, steps=lcm_steps, cfg=1.0, batch=1, size=size)()
                note = f"compile+first call {time.perf_counter() - t0:.0f}s"
                _record(report, f"LCM {lcm_steps} steps fused + torch.compile", dt, 1, timer.run(_generate(pipe, steps=lcm_steps, cfg=1.0, batch=1, size=size)), evals=lcm_steps, decodes=0, size=size, note=note)
            finally:
                pipe.unet.forward = original
    pipe.unet.delete_adapters(["style", "character", "lcm"])


def _bench_train(pipe, report, timer, dt: str, size: int, tiny: bool) -> None:
    """One LoRA training step (rank 32 on attention) at ``size``, batch 1, gradient checkpointing."""
    import torch
    from peft import LoraConfig

    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=4 if tiny else 32, lora_alpha=16, target_modules=ATTN_TARGETS), adapter_name="bench_lora")
    params = [p for n, p in unet.named_parameters() if "bench_lora" in n]
    for p in params:
        p.data = p.data.float()  # trainable LoRA weights in fp32, base in the bench dtype
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    lat = size // 8 if not tiny else size // 2
    dev, dtype = pipe.device, unet.dtype
    x = torch.randn(1, 4, lat, lat, device=dev, dtype=dtype)
    ehs = torch.randn(1, 77, unet.config.cross_attention_dim, device=dev, dtype=dtype)
    proj = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, proj, device=dev, dtype=dtype), "time_ids": torch.tensor([[size, size, 0, 0, size, size]], device=dev, dtype=dtype)}
    t = torch.tensor([500], device=dev)

    def step() -> None:
        with torch.autocast(device_type=dev.type, dtype=dtype, enabled=dev.type == "cuda"):
            pred = unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), x.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    unet.train()
    unet.enable_gradient_checkpointing()
    try:
        _record(report, "train step LoRA r32, grad ckpt", dt, 1, timer.run(step), evals=3, decodes=0, size=size, note="fwd+bwd ~ 3 evals")
    finally:
        unet.disable_gradient_checkpointing()
        unet.eval()
        unet.delete_adapters(["bench_lora"])
