"""Base-model loading: local folders, the hub path up to the network boundary, single files, hashes."""

from __future__ import annotations

import hashlib
import json

import pytest

from engine.contract.config import parse_config
from engine.contract.errors import ModelMissing
from engine.generation.models import file_sha256, load_base_pipeline, looks_like_repo_id, model_display_name, resolve_dtype


def _config(source: str, **model):
    return parse_config({"engine": {"device": "cpu"}, "model": {"source": source, **model}})


def test_local_folder_loads_in_fp32_on_cpu_with_unet_hash_and_vae_override(tiny_model_dir, tmp_path):
    import torch
    from diffusers import AutoencoderKL

    other_vae = AutoencoderKL.from_pretrained(str(tiny_model_dir / "vae"))
    with torch.no_grad():
        other_vae.decoder.conv_out.bias.fill_(0.25)
    other_vae.save_pretrained(str(tmp_path / "vae"))

    loaded = load_base_pipeline(_config(str(tiny_model_dir), name="tiny", vae=str(tmp_path / "vae")))
    unet_file = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert loaded.model_hash == hashlib.sha256(unet_file.read_bytes()).hexdigest()[:10]
    assert (loaded.device, loaded.dtype, loaded.name) == ("cpu", torch.float32, "tiny")
    assert loaded.pipe.unet.dtype == torch.float32
    assert bool((loaded.pipe.vae.decoder.conv_out.bias == 0.25).all())  # the override, not the model's VAE


def test_hash_is_cached_in_a_sidecar(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    assert file_sha256([weights]) == hashlib.sha256(weights.read_bytes()).hexdigest()
    sidecar = tmp_path / "model.safetensors.sha256.json"
    cached = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**cached, "sha256": "0" * 64}))
    assert file_sha256([weights]) == "0" * 64  # read from the sidecar, not recomputed
    weights.write_bytes(b"other" * 10)  # the file changed: hashed again
    assert file_sha256([weights]) == hashlib.sha256(b"other" * 10).hexdigest()


def test_hub_cache_blob_name_is_its_hash(tmp_path):
    data = b"unet weights" * 100
    blob = tmp_path / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir()
    blob.write_bytes(data)
    link = tmp_path / "snapshots" / "abc" / "unet" / "diffusion_pytorch_model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert file_sha256([link]) == blob.name
    assert not list(link.parent.glob("*.sha256.json"))  # nothing read or written


def test_hub_model_not_cached_in_offline_mode_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _config("cagliostrolab/animagine-xl-3.1", cache_dir=str(tmp_path / "empty-cache"))
    with pytest.raises(ModelMissing) as info:
        load_base_pipeline(config)
    message = info.value.message
    assert "cagliostrolab/animagine-xl-3.1 is not in the cache and offline mode is on" in message
    assert "hf download cagliostrolab/animagine-xl-3.1" in message and "local folder" in message


def test_hub_model_in_the_cache_loads_offline(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "cache" / "models--someone--tiny-sdxl"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("*.sha256.json"))
    loaded = load_base_pipeline(_config("someone/tiny-sdxl", cache_dir=str(tmp_path / "cache")))
    assert loaded.name == "tiny-sdxl" and loaded.source == "someone/tiny-sdxl"
    assert loaded.pipe.unet.config.cross_attention_dim == 64


def test_missing_local_paths_raise_model_missing(tmp_path):
    with pytest.raises(ModelMissing, match="not found"):
        load_base_pipeline(_config(str(tmp_path / "no-such-model")))
    with pytest.raises(ModelMissing, match="checkpoint .* not found"):
        load_base_pipeline(_config(str(tmp_path / "model.safetensors")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelMissing, match="no model_index.json"):
        load_base_pipeline(_config(str(tmp_path / "empty")))


def test_single_file_offline_without_configs_says_what_to_fetch(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(ckpt))
    with pytest.raises(ModelMissing, match="stabilityai/stable-diffusion-xl-base-1.0"):
        load_base_pipeline(_config(str(ckpt)))


def test_names_and_dtypes():
    import torch

    assert looks_like_repo_id("cagliostrolab/animagine-xl-3.1")
    assert not looks_like_repo_id("./models/x") and not looks_like_repo_id("/abs/path") and not looks_like_repo_id("a/b/c")
    assert model_display_name(_config("cagliostrolab/animagine-xl-3.1")) == "animagine-xl-3.1"
    assert model_display_name(_config("/models/ponyXL_v6.safetensors")) == "ponyXL_v6"
    assert model_display_name(_config("x/y", name="shown")) == "shown"
    fp16 = parse_config({"engine": {"device": "cpu", "dtype": "fp16"}})
    assert resolve_dtype(fp16, "cpu") == torch.float32  # no fp16 on CPU
    assert resolve_dtype(parse_config({"engine": {"dtype": "bf16"}}), "cpu") == torch.bfloat16  # bf16 is honoured
    assert resolve_dtype(parse_config({}), "cpu") == torch.float32
    assert resolve_dtype(fp16, "cuda") == torch.float16
    assert resolve_dtype(parse_config({"engine": {"dtype": "bf16"}}), "cuda") == torch.bfloat16
