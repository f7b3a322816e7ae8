"""Loading the SDXL base model: hub repository, local diffusers folder or single-file checkpoint.

``load_base_pipeline(config, secrets)`` returns a ``LoadedModel`` (pipeline on its device, dtype,
display name and A1111 model hash). Every failure to find or fetch the model becomes
``errors.ModelMissing`` with a message that says how to get it.

- Hub: ``huggingface_hub.snapshot_download`` into the hub cache (progress bar, optional pinned
  revision, token from the environment), fetching only the files a diffusers SDXL pipeline needs
  (not the single-file copy many repositories also carry). Offline mode is honoured.
- Local folder: a diffusers folder (``model_index.json``).
- Single file: a ``.safetensors`` checkpoint as model sites publish them. diffusers fetches the
  SDXL config files (a few KB) for it from the hub once, so offline mode needs them cached.

dtype: bf16 on CUDA where supported, else fp16 (see ``resolve_dtype``); fp32 on CPU unless bf16 is asked for.

Prediction type: a v-prediction base (NoobAI-XL V-Pred) is found from the checkpoint (a single
file's ``v_pred`` key, a folder's scheduler config) or ``[model] prediction``, and its scheduler
config then gets ``prediction_type="v_prediction"``, zero-terminal-SNR betas and trailing
timesteps. Every sampler, fast mode, img2img and training build their schedulers from that
config, so the setting reaches all of them; run with epsilon settings, such a model gives
washed-out images without any error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.contract.config import ArcaeConfig, Secrets
from engine.contract.errors import EngineError, ModelMissing

log = logging.getLogger(__name__)

# The SDXL repository diffusers takes single-file checkpoint configs from.
SDXL_CONFIG_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Small files of a diffusers SDXL repository: configs, scheduler, tokenizers, shard indexes.
_HUB_SMALL_FILES = ["model_index.json", "*/*.json", "*/*.txt", "tokenizer*/*"]


@dataclass
class LoadedModel:
    """A base pipeline ready to run, with what the infotext and status need to say about it."""

    pipe: Any  # diffusers.StableDiffusionXLPipeline
    device: str
    dtype: Any  # torch.dtype
    name: str
    model_hash: str  # A1111 "Model hash": first 10 hex of the checkpoint's (or UNet's) sha256
    source: str
    prediction: str = "epsilon"  # the scheduler's prediction_type: "epsilon" or "v_prediction"


def resolve_device(config: ArcaeConfig) -> str:
    """``cuda`` or ``cpu`` from ``[engine] device``; asking for CUDA without one is an error."""
    import torch

    wanted = config.engine.device
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise EngineError("[engine] device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return wanted


def resolve_dtype(config: ArcaeConfig, device: str) -> Any:
    """The compute dtype: ``auto`` is bf16 on CUDA devices that support it, else fp16; fp32 on CPU.

    Why bf16 by default: it has fp32's exponent range, so the SDXL VAE (whose activations
    overflow fp16 into NaN/black images) decodes safely without downloading the fp16-fix VAE,
    at fp16's speed on Ampere and newer. On CPU bf16 is honoured when asked for (the tests run
    it to catch dtype mismatches before a GPU does); fp16 on CPU is slow or missing: fp32.
    """
    import torch

    wanted = config.engine.dtype
    if device != "cuda":
        if wanted == "bf16":
            return torch.bfloat16
        if wanted not in ("auto", "fp32"):
            log.warning("[engine] dtype = %s ignored on CPU; using fp32", wanted)
        return torch.float32
    if wanted == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[wanted]


def model_display_name(config: ArcaeConfig) -> str:
    """The name written into the infotext's ``Model`` field: ``[model] name`` or the source's last part."""
    if config.model.name:
        return config.model.name
    source = config.model.source.rstrip("/\\")
    stem = re.split(r"[/\\]", source)[-1]
    return stem[: -len(".safetensors")] if stem.endswith(".safetensors") else stem


def looks_like_repo_id(source: str) -> bool:
    """True for ``owner/name`` (a hub repository id), False for anything path-like."""
    return bool(_REPO_ID.fullmatch(source)) and not source.startswith(".") and not source.endswith(".safetensors")


def load_base_pipeline(config: ArcaeConfig, secrets: Secrets | None = None) -> LoadedModel:
    """Load the configured base model onto its device (see the module docstring)."""
    import torch

    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    source = config.model.source.strip()
    if not source:
        raise ModelMissing("[model] source is empty; set it to a hub repository id, a diffusers folder or a .safetensors file")
    token = secrets.hub_token.get_secret_value() if secrets and secrets.hub_token else None
    local = config.path(source)
    if local.is_file() or source.endswith(".safetensors"):
        pipe, hash_file = _load_single_file(local, dtype, token)
    elif local.is_dir():
        pipe, hash_file = _load_folder(local, dtype)
    elif looks_like_repo_id(source):
        folder = _download_repo(config, source, token, prefer_fp16=dtype == torch.float16)
        pipe, hash_file = _load_folder(folder, dtype)
    else:
        raise ModelMissing(
            f"model {source!r} not found: no such file or folder ({local}); set [model] source (or --model) "
            "to a hub repository id like 'cagliostrolab/animagine-xl-3.1', a diffusers folder or a .safetensors file"
        )
    if config.model.vae:
        pipe.vae = _load_vae(config, config.model.vae, dtype, token)
    prediction = resolve_prediction(config.model.prediction, detect_prediction(pipe, hash_file))
    apply_prediction(pipe, prediction)
    pipe.set_progress_bar_config(disable=True)  # callers show their own progress
    pipe.to(device)
    return LoadedModel(
        pipe=pipe,
        device=device,
        dtype=dtype,
        name=model_display_name(config),
        model_hash=short_model_hash(hash_file),
        source=source,
        prediction=prediction,
    )


def checkpoint_has_v_pred_key(path: Path) -> bool:
    """True when a single-file SDXL checkpoint carries the ``v_pred`` marker key (read from its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "v_pred" in f.keys()
    except (OSError, ValueError, RuntimeError) as exc:  # not safetensors: diffusers already loaded it
        log.debug("cannot read the keys of %s: %s", path, exc)
        return False


def detect_prediction(pipe: Any, weight_files: list[Path]) -> str:
    """``v_prediction`` or ``epsilon``, from the checkpoint file or the pipeline's scheduler config."""
    if len(weight_files) == 1 and weight_files[0].parent.name != "unet":  # a single-file checkpoint
        if checkpoint_has_v_pred_key(weight_files[0]):
            return "v_prediction"
    return "v_prediction" if pipe.scheduler.config.get("prediction_type") == "v_prediction" else "epsilon"


def resolve_prediction(configured: str, detected: str) -> str:
    """``[model] prediction`` wins over what the checkpoint says (a mislabelled merge); auto takes the latter."""
    wanted = {"auto": detected, "epsilon": "epsilon", "v": "v_prediction"}[configured]
    if wanted != detected:
        log.warning("[model] prediction = %r overrides the checkpoint, which looks like %s", configured, detected)
    return wanted


def apply_prediction(pipe: Any, prediction: str) -> None:
    """Give the pipeline's scheduler the settings the prediction type needs (see the module docstring)."""
    config = dict(pipe.scheduler.config)
    if prediction == "v_prediction":
        wanted = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    elif config.get("prediction_type") == "v_prediction":  # forced to epsilon by [model] prediction
        wanted = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}
    else:
        return
    if all(config.get(k) == v for k, v in wanted.items()):
        return
    pipe.scheduler = type(pipe.scheduler).from_config({**config, **wanted})


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _weight_patterns(variant: str) -> list[str]:
    v = f".{variant}" if variant else ""
    return [
        f"*/diffusion_pytorch_model{v}.safetensors",
        f"*/diffusion_pytorch_model{v}-*.safetensors",
        f"*/model{v}.safetensors",
        f"*/model{v}-*.safetensors",
    ]


def _unet_weights(folder: Path, variant: str) -> list[Path]:
    v = f".{variant}" if variant else ""
    single = folder / "unet" / f"diffusion_pytorch_model{v}.safetensors"
    if single.is_file():
        return [single]
    return sorted((folder / "unet").glob(f"diffusion_pytorch_model{v}-*.safetensors"))


def _download_repo(config: ArcaeConfig, repo_id: str, token: str | None, *, prefer_fp16: bool) -> Path:
    """Fetch a diffusers SDXL repository into the hub cache; return its snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    revision = config.model.revision or None
    cache_dir = str(config.path(config.model.cache_dir)) if config.model.cache_dir else None
    get_it = (
        f"download it with `hf download {repo_id}` while online "
        "or point [model] source at a local folder or .safetensors file"
    )
    # Prefer the fp16 weight variant for fp16 inference (half the download), else the full files.
    for variant in (["fp16", ""] if prefer_fp16 else ["", "fp16"]):
        try:
            folder = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    token=token,
                    allow_patterns=_HUB_SMALL_FILES + _weight_patterns(variant),
                )
            )
        except LocalEntryNotFoundError:
            if _offline():
                raise ModelMissing(f"model {repo_id} is not in the cache and offline mode is on; {get_it}") from None
            raise ModelMissing(f"model {repo_id} could not be downloaded (network error?); {get_it}") from None
        except (RepositoryNotFoundError, GatedRepoError) as exc:
            raise ModelMissing(
                f"hub repository {repo_id} not found or access denied ({type(exc).__name__}); check [model] source, "
                f"and for a gated/private repository set the token in ${config.model.hub_token_env}"
            ) from None
        except RevisionNotFoundError:
            raise ModelMissing(f"revision {revision!r} of {repo_id} not found; check [model] revision") from None
        if _unet_weights(folder, variant):
            return folder
    raise ModelMissing(f"hub repository {repo_id} has no diffusers UNet weights (unet/*.safetensors); {get_it}")


def _load_folder(folder: Path, dtype: Any) -> tuple[Any, list[Path]]:
    from diffusers import StableDiffusionXLPipeline

    if not (folder / "model_index.json").is_file():
        raise ModelMissing(f"{folder} is not a diffusers model folder (no model_index.json)")
    variant = "" if _unet_weights(folder, "") else "fp16"
    weights = _unet_weights(folder, variant)
    if not weights:
        raise ModelMissing(f"{folder} has no UNet weights (unet/diffusion_pytorch_model*.safetensors)")
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            str(folder), dtype=dtype, variant=variant or None, use_safetensors=True, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelMissing(f"cannot load the diffusers model in {folder}: {exc}") from None
    return pipe, weights


def _load_single_file(path: Path, dtype: Any, token: str | None) -> tuple[Any, list[Path]]:
    from diffusers import StableDiffusionXLPipeline
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not path.is_file():
        raise ModelMissing(
            f"checkpoint {path} not found; download the .safetensors file (e.g. from the model's hub or "
            "Civitai page) to that path, or set [model] source to a hub repository id"
        )
    try:
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), dtype=dtype, token=token)
    except LocalEntryNotFoundError:
        raise ModelMissing(
            f"loading {path.name} needs the SDXL config files from {SDXL_CONFIG_REPO} (a few KB), which are not "
            "in the cache and offline mode is on (or the hub is unreachable); fetch them once with "
            f"`hf download {SDXL_CONFIG_REPO} --include '*.json' '*.txt'` while online"
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise ModelMissing(f"cannot load checkpoint {path}: {exc}") from None
    return pipe, [path]


def _load_vae(config: ArcaeConfig, source: str, dtype: Any, token: str | None) -> Any:
    """The ``[model] vae`` override: a hub repository id, a diffusers VAE folder or a .safetensors file."""
    from diffusers import AutoencoderKL
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    local = config.path(source)
    try:
        if local.is_file():
            return AutoencoderKL.from_single_file(str(local), dtype=dtype, token=token)
        if local.is_dir():
            return AutoencoderKL.from_pretrained(str(local), dtype=dtype)
        if not looks_like_repo_id(source):
            raise ModelMissing(f"VAE {source!r} not found; set [model] vae to a hub repository id, a folder or a file")
        folder = snapshot_download(
            source, token=token, allow_patterns=["config.json", "diffusion_pytorch_model.safetensors"],
            cache_dir=str(config.path(config.model.cache_dir)) if config.model.cache_dir else None,
        )
        return AutoencoderKL.from_pretrained(folder, dtype=dtype)
    except LocalEntryNotFoundError:
        raise ModelMissing(
            f"VAE {source} is not in the cache and offline mode is on; download it with "
            f"`hf download {source}` while online or point [model] vae at a local folder"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelMissing(f"cannot load VAE {source}: {exc}") from None


def short_model_hash(files: list[Path]) -> str:
    """A1111's model hash: the first 10 hex digits of the sha256 of the weights (shards in order)."""
    return file_sha256(files)[:10]


def file_sha256(files: list[Path]) -> str:
    """sha256 over ``files`` in order, cached in a sidecar next to the first so it is computed once."""
    first = files[0]
    blob = first.resolve()
    if len(files) == 1 and blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return blob.name  # a hub-cache LFS blob is named by its sha256: no need to read 5 GB
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    sidecar = first.with_name(first.name + ".sha256.json")
    try:
        cached = json.loads(sidecar.read_text(encoding="utf-8"))
        if cached.get("files") == [list(s) for s in stats] and re.fullmatch(r"[0-9a-f]{64}", cached.get("sha256", "")):
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""):
                digest.update(chunk)
    value = digest.hexdigest()
    try:
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(json.dumps({"files": stats, "sha256": value}), encoding="utf-8")
        os.replace(tmp, sidecar)
    except OSError as exc:  # a read-only model folder: hash again next start
        log.debug("cannot write hash sidecar %s: %s", sidecar, exc)
    return value
