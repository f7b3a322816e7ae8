"""Latents to pictures: VAE decoding with the fp16 NaN/black fallback, and cheap step previews.

SDXL's original VAE overflows in fp16 and decodes to NaN, which becomes an all-black image. The
Generator decodes latents itself (the pipeline runs with ``output_type="latent"``) so it can check
every decoded image and decode again in fp32 when the fp16 result is broken, instead of handing a
user a black square.
"""

from __future__ import annotations

from typing import Any

# Approximate SDXL latent -> RGB projection (the factors ComfyUI and A1111 use for "approx"
# previews): good enough to show composition while sampling, for the cost of one small matmul.
_SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)
LATENT_PREVIEW_MAX_SIDE = 256


def is_broken_decode(image: Any, *, black_counts: bool = True) -> bool:
    """True when a decoded image (values in [-1, 1]) has NaN/inf, or (``black_counts``) is all black.

    An fp16 overflow shows up as NaN or, after clamping, as an image that is -1 everywhere; a real
    picture is never exactly black in every pixel.
    """
    import torch

    if not bool(torch.isfinite(image).all()):
        return True
    return black_counts and bool((image <= -0.99).all())


def _unscale(vae: Any, latents: Any) -> Any:
    """Undo the VAE's latent scaling (and mean/std normalisation where the VAE config has them)."""
    import torch

    cfg = vae.config
    mean = getattr(cfg, "latents_mean", None)
    std = getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return latents * std_t / cfg.scaling_factor + mean_t
    return latents / cfg.scaling_factor


def decode_latents(vae: Any, latents: Any, *, force_fp32: bool = False) -> tuple[Any, bool]:
    """Decode one image's latents (batch 1); return (image tensor in [-1, 1], fell_back_to_fp32).

    In fp16/bf16 a broken result (NaN/inf or all black) is decoded again with the VAE upcast to
    fp32. A result that is still NaN in fp32 raises ``EngineError``: never a silent black image.
    """
    import torch

    from engine.contract.errors import EngineError

    low_precision = vae.dtype in (torch.float16, torch.bfloat16)
    with torch.no_grad():
        if low_precision and not force_fp32:
            image = vae.decode(_unscale(vae, latents.to(vae.dtype)), return_dict=False)[0]
            if not is_broken_decode(image):
                return image, False
        original = vae.dtype
        try:
            if original != torch.float32:
                vae.to(dtype=torch.float32)
            image = vae.decode(_unscale(vae, latents.to(torch.float32)), return_dict=False)[0]
        finally:
            if original != torch.float32:
                vae.to(dtype=original)
    if is_broken_decode(image, black_counts=False):
        raise EngineError("the VAE produced an invalid (NaN) image even in fp32; try another seed or sampler")
    return image, low_precision and not force_fp32


def to_pil(image: Any) -> Any:
    """A decoded image tensor (1, 3, H, W) in [-1, 1] as an RGB PIL image (diffusers' rounding)."""
    from PIL import Image

    return Image.fromarray(to_array(image))


def to_array(image: Any) -> Any:
    """``to_pil``'s pixels as an (H, W, 3) uint8 array, computed where the tensor lives.

    The same float32 maths as numpy would do (x * 255, round half to even), on the device: a GPU
    copies a quarter of the bytes and the GPU worker's thread does no per-pixel work.
    """
    import torch

    with torch.no_grad():
        array = (image[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).float()
        return (array * 255).round().to(torch.uint8).cpu().numpy()


def latent_preview(latents: Any, max_side: int = LATENT_PREVIEW_MAX_SIDE) -> Any:
    """A cheap RGB approximation of the first image in ``latents`` (no VAE), at most ``max_side`` px."""
    import torch
    from PIL import Image

    with torch.no_grad():
        first = latents[0].float()
        if first.shape[0] != len(_SDXL_LATENT_RGB):
            return None  # not SDXL-shaped latents: no cheap preview
        factors = torch.tensor(_SDXL_LATENT_RGB, device=first.device)
        bias = torch.tensor(_SDXL_LATENT_RGB_BIAS, device=first.device)
        rgb = torch.einsum("chw,cr->hwr", first, factors) + bias
        rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().byte().cpu().numpy()
    preview = Image.fromarray(rgb)
    if max(preview.size) > max_side:
        preview.thumbnail((max_side, max_side))
    return preview
