"""Adapter registry on the tiny SDXL model: formats, mixes, bad files, reload, hashes, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.contract.errors import IncompatibleAdapter, InvalidRequest, UnknownAdapter
from tests.conftest import write_config
from tests.engine.generation.lora_factory import make_lora, make_sd15_like_lora


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    import torch
    from diffusers import StableDiffusionXLPipeline

    # One intra-op thread: on a busy 2-core machine torch's spinning worker threads made each
    # 64 px image ~20x slower (12 s instead of 0.5 s measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    p.set_progress_bar_config(disable=True)
    yield p
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_image(pipe):
    return render(pipe)


@pytest.fixture
def adapters_dir(tmp_path) -> Path:
    d = tmp_path / "adapters"
    d.mkdir()
    return d


@pytest.fixture
def registry(pipe, adapters_dir):
    """A registry on the shared pipeline; every adapter it loaded is deleted afterwards."""
    from engine.generation.adapters import AdapterRegistry

    reg = AdapterRegistry(adapters_dir, pipe, lcm_adapter="lcm", default_weight=0.9, max_active=3)
    yield reg
    names = {n for names in pipe.get_list_adapters().values() for n in names}
    if names:
        pipe.delete_adapters(sorted(names))


def render(pipe) -> np.ndarray:
    import torch

    out = pipe(
        "a cat in a hat",
        negative_prompt="blurry",
        num_inference_steps=2,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    )
    return out.images[0]


def loaded_names(pipe) -> dict[str, list[str]]:
    return {k: list(v) for k, v in pipe.get_list_adapters().items()}


def assert_differs(a: np.ndarray, b: np.ndarray) -> None:
    assert np.abs(a - b).mean() > 1e-3, "the adapter did not change the image"


# ------------------------------------------------------------------ formats and mixes


def test_kohya_and_sgm_files_give_the_same_image_as_peft(pipe, registry, adapters_dir, base_image):
    for fmt in ("peft", "kohya", "kohya_sgm"):
        # alpha != rank and text-encoder layers: both must survive every format.
        make_lora(pipe, adapters_dir / f"s_{fmt}.safetensors", fmt=fmt, seed=3, rank=4, alpha=2, text_encoders=True)
    registry.scan()
    assert {i.name: i.format for i in registry.list()} == {"s_peft": "peft", "s_kohya": "kohya", "s_kohya_sgm": "kohya-sgm"}
    images = {}
    for fmt in ("peft", "kohya", "kohya_sgm"):
        registry.apply_mix([(f"s_{fmt}", 1.0)])
        images[fmt] = render(pipe)
    assert_differs(images["peft"], base_image)
    np.testing.assert_array_equal(images["kohya"], images["peft"])
    np.testing.assert_array_equal(images["kohya_sgm"], images["peft"])
    assert set(registry.loaded) == {"s_peft", "s_kohya", "s_kohya_sgm"}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        assert sorted(loaded_names(pipe)[component]) == ["s_kohya", "s_kohya_sgm", "s_peft"]


def test_weight_zero_and_empty_mix_give_the_base_image(pipe, registry, adapters_dir, base_image):
    make_lora(pipe, adapters_dir / "style.safetensors", seed=1, text_encoders=True)
    registry.scan()
    registry.apply_mix([("style", 1.0)])
    assert_differs(render(pipe), base_image)
    registry.apply_mix([("style", 0.0)])
    np.testing.assert_array_equal(render(pipe), base_image)
    registry.apply_mix([("style", 0.5)])
    half = render(pipe)
    assert_differs(half, base_image)
    registry.apply_mix([])
    np.testing.assert_array_equal(render(pipe), base_image)
    assert registry.active_mix == []


def test_mix_equals_diffusers_set_adapters(pipe, registry, adapters_dir):
    for i, name in enumerate(("a", "b", "c")):
        make_lora(pipe, adapters_dir / f"{name}.safetensors", seed=10 + i, alpha=3, text_encoders=(name != "b"))
    registry.scan()
    registry.load("c")  # loaded but never in the mix
    for mix in ([("a", 0.7), ("b", -0.4)], [("b", 1.3), ("a", 0.0)], [("c", 0.5), ("a", 1.0), ("b", 0.25)]):
        registry.apply_mix(mix)
        ours = render(pipe)
        names, weights = zip(*mix)
        pipe.set_adapters(list(names), list(weights))
        np.testing.assert_array_equal(ours, render(pipe))


def test_only_the_named_adapters_are_active(pipe, registry, adapters_dir):
    make_lora(pipe, adapters_dir / "a.safetensors", seed=21, text_encoders=True)
    make_lora(pipe, adapters_dir / "b.safetensors", seed=22, text_encoders=True)
    registry.scan()
    registry.apply_mix([("a", 1.0)])
    only_a = render(pipe)
    registry.apply_mix([("b", 1.0)])  # loads b: diffusers would now leave only b active
    only_b = render(pipe)
    registry.apply_mix([("a", 1.0)])
    np.testing.assert_array_equal(render(pipe), only_a)
    registry.apply_mix([("a", 1.0), ("b", 1.0)])
    both = render(pipe)
    assert_differs(both, only_a)
    assert_differs(both, only_b)
    assert registry.active_mix == [("a", 1.0), ("b", 1.0)]


def test_adapters_added_outside_the_registry_stay_inactive(pipe, registry, adapters_dir):
    """A training run adds and activates its own adapter on the same UNet between jobs."""
    from peft import LoraConfig

    make_lora(pipe, adapters_dir / "a.safetensors", seed=23)
    registry.scan()
    registry.apply_mix([("a", 1.0)])
    only_a = render(pipe)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v", "proj_in"])
    pipe.unet.add_adapter(config, adapter_name="arcae_training")
    pipe.unet.set_adapter("arcae_training")
    pipe.disable_lora()
    registry.apply_mix([("a", 1.0)])
    np.testing.assert_array_equal(render(pipe), only_a)
    with pytest.raises(IncompatibleAdapter, match="already has an adapter of that name"):
        (adapters_dir / "arcae_training.safetensors").write_bytes((adapters_dir / "a.safetensors").read_bytes())
        registry.scan()
        registry.apply_mix([("arcae_training", 1.0)])
    assert "arcae_training" in loaded_names(pipe)["unet"]


def test_default_weight_kind_and_limits(pipe, registry, adapters_dir):
    make_lora(pipe, adapters_dir / "a.safetensors", seed=1, default_weight=0.6, kind="character", triggers=["alice"])
    make_lora(pipe, adapters_dir / "b.safetensors", seed=2, sidecar=False)
    for name in ("c", "d", "lcm"):
        make_lora(pipe, adapters_dir / f"{name}.safetensors", seed=3, sidecar=False)
    registry.scan()
    assert registry.get("a").kind == "character" and registry.get("a").triggers == ["alice"]
    assert registry.get("b").kind == "other" and registry.get("b").default_weight == 0.9
    assert registry.get("lcm").kind == "lcm"
    assert registry.resolve_mix([("a", None), ("b", None)]) == [("a", 0.6), ("b", 0.9)]
    with pytest.raises(InvalidRequest, match="at most 3"):
        registry.apply_mix([("a", 1), ("b", 1), ("c", 1), ("d", 1)])
    # The LCM adapter does not count against the limit.
    assert len(registry.resolve_mix([("a", 1), ("b", 1), ("c", 1), ("lcm", 1)])) == 4
    with pytest.raises(InvalidRequest, match="twice"):
        registry.apply_mix([("a", 1), ("a", 0.5)])
    assert registry.loaded == []  # nothing loaded for a rejected mix


def test_unknown_adapter_lists_known_names(pipe, registry, adapters_dir):
    make_lora(pipe, adapters_dir / "alpha.safetensors", seed=1)
    make_lora(pipe, adapters_dir / "beta.safetensors", seed=2)
    registry.scan()
    with pytest.raises(UnknownAdapter) as err:
        registry.apply_mix([("gamma", 1.0)])
    assert "gamma" in err.value.message and "alpha, beta" in err.value.message
    with pytest.raises(UnknownAdapter, match="letters, digits"):
        registry.get("../alpha")


# ------------------------------------------------------------------ bad files


def _write_bad(kind: str, d: Path, pipe) -> Path:
    from safetensors.torch import save_file
    import torch

    path = d / f"bad_{kind}.safetensors"
    if kind == "sd15":
        make_sd15_like_lora(path)
    elif kind == "nokeys":
        save_file({"model.weight": torch.zeros(4, 4)}, str(path))
    elif kind == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    elif kind == "truncated":
        make_lora(pipe, path, seed=5, sidecar=False)
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "foreign":  # LoRA keys for modules this UNet does not have
        save_file({
            "lora_unet_nonexistent_block_proj.lora_down.weight": torch.randn(4, 32),
            "lora_unet_nonexistent_block_proj.lora_up.weight": torch.randn(32, 4),
            "lora_unet_nonexistent_block_proj.alpha": torch.tensor(4.0),
        }, str(path))
    elif kind == "te_mismatch":  # the UNet part fits, a text-encoder layer does not: diffusers loads half
        from safetensors.torch import load_file

        make_lora(pipe, path, seed=6, fmt="kohya", text_encoders=True, sidecar=False)
        tensors = load_file(str(path))
        key = next(k for k in sorted(tensors) if k.startswith("lora_te2_") and k.endswith("lora_down.weight"))
        tensors[key] = torch.randn(4, 48)
        save_file(tensors, str(path))
    elif kind == "missing":
        make_lora(pipe, path, seed=5, sidecar=False)
    return path


@pytest.mark.parametrize("kind", ["sd15", "nokeys", "corrupt", "truncated", "foreign", "te_mismatch", "missing"])
def test_bad_file_is_rejected_and_pipeline_unchanged(kind, pipe, registry, adapters_dir):
    make_lora(pipe, adapters_dir / "good.safetensors", seed=30, text_encoders=True)
    path = _write_bad(kind, adapters_dir, pipe)
    registry.scan()
    registry.apply_mix([("good", 0.8)])
    before_names, before_image = loaded_names(pipe), render(pipe)
    if kind == "missing":
        path.unlink()
    with pytest.raises(IncompatibleAdapter) as err:
        registry.apply_mix([("good", 1.0), (path.stem, 1.0)])
    assert path.name in err.value.message
    assert loaded_names(pipe) == before_names
    assert registry.loaded == ["good"]
    assert registry.active_mix == [("good", 0.8)]
    np.testing.assert_array_equal(render(pipe), before_image)
    if kind == "sd15":
        assert "wrong shapes" in err.value.message


# ------------------------------------------------------------------ reload


def test_reload_picks_up_new_changed_and_removed_files(pipe, registry, adapters_dir, base_image):
    a = make_lora(pipe, adapters_dir / "a.safetensors", seed=40)
    te = make_lora(pipe, adapters_dir / "te.safetensors", seed=41, text_encoders=True)
    registry.scan()
    registry.apply_mix([("a", 1.0), ("te", 1.0)])
    old_mix_image = render(pipe)
    assert registry.reload() == {"added": [], "removed": [], "changed": []}

    make_lora(pipe, adapters_dir / "new.safetensors", seed=42)
    # Same shapes (hot-swapped in place) and a text-encoder LoRA with another rank (reloaded).
    make_lora(pipe, a, seed=43)
    make_lora(pipe, te, seed=44, rank=2, text_encoders=True)
    changes = registry.reload()
    assert changes == {"added": ["new"], "removed": [], "changed": ["a", "te"]}
    assert "new" in [i.name for i in registry.list()]
    assert "a" in registry.loaded and "te" not in registry.loaded
    registry.apply_mix([("a", 1.0), ("te", 1.0)])
    swapped = render(pipe)
    assert_differs(swapped, old_mix_image)

    # Reference: the same files loaded fresh under other names.
    shutil.copy(a, adapters_dir / "a_ref.safetensors")
    shutil.copy(te, adapters_dir / "te_ref.safetensors")
    registry.reload()
    registry.apply_mix([("a_ref", 1.0), ("te_ref", 1.0)])
    np.testing.assert_array_equal(render(pipe), swapped)

    for name in ("a", "a_ref", "te", "te_ref", "new"):
        (adapters_dir / f"{name}.safetensors").unlink()
    changes = registry.reload()
    assert changes["removed"] == ["a", "a_ref", "new", "te", "te_ref"]
    assert registry.loaded == [] and loaded_names(pipe).get("unet", []) == []
    np.testing.assert_array_equal(render(pipe), base_image)
    with pytest.raises(UnknownAdapter):
        registry.apply_mix([("a", 1.0)])


# ------------------------------------------------------------------ files, hashes, sidecars (no pipeline)


def test_lora_hashes_are_a1111_addnet_hashes(pipe, registry, adapters_dir):
    path = make_lora(pipe, adapters_dir / "h.safetensors", seed=50, fmt="kohya")
    registry.scan()
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    expected = hashlib.sha256(raw[8 + n :]).hexdigest()[:12]
    assert registry.lora_hashes(["h"]) == {"h": expected}
    assert registry.get("h").sha256 == hashlib.sha256(raw).hexdigest()
    # Editing only the header metadata keeps the addnet hash and changes the file hash.
    make_lora(pipe, path, seed=50, fmt="kohya", metadata={"ss_output_name": "renamed"})
    registry.reload()
    assert registry.lora_hashes(["h"]) == {"h": expected}
    assert registry.get("h").sha256 != hashlib.sha256(raw).hexdigest()


def test_sidecars_metadata_and_names(pipe, adapters_dir, caplog):
    from engine.generation.lora_files import scan_directory

    make_lora(pipe, adapters_dir / "side.safetensors", seed=1, kind="character", triggers=["alice", "blue hair"],
              default_weight=0.7, description="Alice", base_model="animagine")
    tags = {"ds": {"1girl": 50, "solo": 40, "smile": 3}, "ds2": {"smile": 60}}
    make_lora(pipe, adapters_dir / "kohya_meta.safetensors", seed=2, fmt="kohya", sidecar=False,
              metadata={"ss_tag_frequency": json.dumps(tags), "ss_output_name": "kohya meta", "ss_base_model_version": "sdxl_base_v1-0"})
    make_lora(pipe, adapters_dir / "spec.safetensors", seed=3, fmt="kohya", sidecar=False,
              metadata={"modelspec.title": "Spec", "modelspec.trigger_phrase": "spc, style"})
    shutil.copy(adapters_dir / "spec.safetensors", adapters_dir / "bad name.safetensors")
    (adapters_dir / "badside.safetensors").write_bytes((adapters_dir / "spec.safetensors").read_bytes())
    (adapters_dir / "badside.json").write_text('{"kind": "villain", "default_weight": 0.5}')

    with caplog.at_level("WARNING"):
        entries = scan_directory(adapters_dir, default_weight=1.0, write_sidecars=True)
    assert sorted(entries) == ["badside", "kohya_meta", "side", "spec"]
    assert "bad name.safetensors" in caplog.text and "letters, digits" in caplog.text
    assert "kind = 'villain' ignored" in caplog.text

    side = entries["side"]
    assert (side.kind, side.triggers, side.default_weight, side.description, side.base_model) == (
        "character", ("alice", "blue hair"), 0.7, "Alice", "animagine")
    recorded = json.loads((adapters_dir / "side.json").read_text())
    assert recorded["sha256"] == side.sha256 == hashlib.sha256((adapters_dir / "side.safetensors").read_bytes()).hexdigest()
    meta = entries["kohya_meta"]
    assert meta.triggers == ("smile", "1girl", "solo") and meta.description == "kohya meta"
    assert meta.base_model == "sdxl_base_v1-0" and meta.kind == "other"
    assert entries["spec"].triggers == ("spc", "style") and entries["spec"].description == "Spec"
    badside = entries["badside"]  # invalid sidecar field ignored; header metadata fills the rest
    assert (badside.kind, badside.default_weight, badside.description) == ("other", 0.5, "Spec")

    # A file that changed after its sidecar recorded a sha256 is noticed and hashed again.
    make_lora(pipe, adapters_dir / "side.safetensors", seed=9, sidecar=False)
    caplog.clear()
    with caplog.at_level("WARNING"):
        entries = scan_directory(adapters_dir, write_sidecars=True)
    assert "file changed since its sidecar was written" in caplog.text
    changed = hashlib.sha256((adapters_dir / "side.safetensors").read_bytes()).hexdigest()
    assert entries["side"].sha256 == changed != side.sha256


def test_cli_lists_adapters(pipe, adapters_dir, tmp_path, tiny_model_dir, capsys):
    from engine.cli import main

    make_lora(pipe, adapters_dir / "inkwash.safetensors", seed=1, kind="style", triggers=["ink wash"], default_weight=0.8)
    make_lora(pipe, adapters_dir / "alice.safetensors", seed=2, fmt="kohya", kind="character", triggers=["alice"])
    make_lora(pipe, adapters_dir / "sgm.safetensors", seed=3, fmt="kohya_sgm", sidecar=False)
    (adapters_dir / "broken.safetensors").write_bytes(b"nope")
    config = write_config(tmp_path, tiny_model_dir)  # [adapters] dir = "adapters" under tmp_path

    assert main(["adapters", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "TRIGGERS", "WEIGHT", "FORMAT", "HASH", "A1111"]
    rows = {line.split()[0]: line for line in lines[1:]}
    raw = (adapters_dir / "inkwash.safetensors").read_bytes()
    sha = hashlib.sha256(raw).hexdigest()[:10]
    a1111 = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()[:12]  # A1111/Civitai hash
    assert rows["inkwash"].split() == ["inkwash", "style", "ink", "wash", "0.8", "peft", sha, a1111]
    assert rows["alice"].split()[1:5] == ["character", "alice", "1", "kohya"]
    assert rows["sgm"].split()[1:5] == ["other", "-", "1", "kohya-sgm"]
    assert "broken" in rows and "broken.safetensors" in err and "cannot be used" in err

    assert main(["adapters", "--adapters-dir", str(adapters_dir), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in listed] == ["alice", "broken", "inkwash", "sgm"]
    inkwash = next(a for a in listed if a["name"] == "inkwash")
    assert (inkwash["sha256"][:10], inkwash["a1111_hash"]) == (sha, a1111)

    assert main(["adapters", "--adapters-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
