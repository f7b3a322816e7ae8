"""A tiny, randomly initialised SDXL pipeline in diffusers format.

Tests, demos and CPU benchmarks use it; it is written to disk and loaded back through exactly
the same code path as a real model. The architecture keeps every SDXL feature that matters to
Arcae: two CLIP text encoders (penultimate hidden states, pooled projection from the second),
the UNet's ``text_time`` added conditions, cross-attention over both encoders, a VAE.

Facts this relies on (see shared/NOTES.md): a byte-level CLIP vocabulary with no merges makes a
working ``CLIPTokenizer``; ``cross_attention_dim`` is the sum of both encoders' hidden sizes;
``projection_class_embeddings_input_dim`` is 6 x ``addition_time_embed_dim`` + encoder 2's
projection dim; the text config's ``eos_token_id`` must equal the tokenizer's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

TINY_SIZE = 64  # native resolution of the tiny model (latents 32x32 with a 2-block VAE)

_ENC1 = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, projection_dim=32)
_ENC2 = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, projection_dim=32)
_TIME_EMBED = 8


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _byte_vocab() -> dict[str, int]:
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _write_tokenizer(dest: Path) -> int:
    """Write a byte-level CLIP tokenizer (no merges) to ``dest``; return its vocab size."""
    from transformers import CLIPTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    vocab = _byte_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")
    tok.save_pretrained(str(dest))
    return len(vocab)


def build_tiny_components(seed: int = 0, prediction: str = "epsilon") -> dict:
    """Build the tiny pipeline's components in memory, deterministically for ``seed``.

    ``prediction="v"`` gives a v-prediction model: its scheduler config says so the way a
    v-prediction diffusers repository does (zero-terminal-SNR betas, trailing timesteps).
    """
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = _write_tokenizer(Path(tmp) / "tok")
        tokenizer = CLIPTokenizer.from_pretrained(str(Path(tmp) / "tok"))
    tokenizer_2 = tokenizer
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(**common, **_ENC1))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **_ENC2))

    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=TINY_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * _TIME_EMBED + _ENC2["projection_dim"],
        cross_attention_dim=_ENC1["hidden_size"] + _ENC2["hidden_size"],
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=TINY_SIZE,
        scaling_factor=0.13025,
    )
    v_pred = _check_prediction(prediction) == "v"
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="trailing" if v_pred else "leading",
        prediction_type="v_prediction" if v_pred else "epsilon",
        rescale_betas_zero_snr=v_pred,
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    )


def _check_prediction(prediction: str) -> str:
    key = {"epsilon": "epsilon", "eps": "epsilon", "v": "v", "v_prediction": "v"}.get(prediction)
    if key is None:
        raise ValueError(f"prediction {prediction!r}: use 'epsilon' (or 'eps') or 'v'")
    return key


def make_tiny_model(dest: str | Path, seed: int = 0, prediction: str = "epsilon") -> Path:
    """Write a tiny SDXL pipeline (epsilon or ``"v"``-prediction) in diffusers format to ``dest``; return the path."""
    from diffusers import StableDiffusionXLPipeline

    dest = Path(dest)
    components = build_tiny_components(seed, prediction)
    pipe = StableDiffusionXLPipeline(**components)
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(dest), safe_serialization=True)
    return dest


def write_tiny_config(root: Path, model_dir: Path, name: str = "config.toml") -> Path:
    """Write a config for the tiny model: CPU, 64 px images, data under ``root``; return its path.

    Demos (``make-tiny-model`` writes one beside the model) and the CPU benchmark use it.
    """
    text = f"""
[engine]
device = "cpu"
port = 0
rate_outputs = false
previews = false
queue_limit = 500

[model]
source = "{model_dir.as_posix()}"
name = "tiny-sdxl"

[adapters]
dir = "adapters"

[generation]
size = "64x64"
min_side = 32
max_side = 256
max_pixels = 65536
add_quality_tags = false
fast_steps = 4
max_steps = 60

[training]
optimizer = "adamw"
resolution = 64
rank = 4
save_every = 1000

[storage]
database = "data/arcae.sqlite3"
outputs_dir = "data/outputs"
datasets_dir = "data/datasets"
runs_dir = "data/runs"
"""
    path = Path(root) / name
    path.write_text(text, encoding="utf-8")
    return path
