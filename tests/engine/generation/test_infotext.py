"""The A1111 ``parameters`` text, the Arcae request chunk, atomic PNG writes and LoRA hashes."""

from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image

from engine.generation.infotext import (
    addnet_hash,
    build_infotext,
    generation_fields,
    parse_infotext,
    parse_lora_hashes,
    quote,
    read_png_metadata,
    write_png_atomic,
)


def _fields(**over):
    values = dict(
        steps=28, sampler="Euler a", schedule_type="Automatic", cfg=6.0, seed=123, width=832, height=1216,
        model_hash="abcdef1234", model_name="animagine-xl-3.1", lora_hashes={"name1": "0123456789ab", "name2": "ba9876543210"},
        version="arcae-0.1.0",
    )
    values.update(over)
    return generation_fields(**values)


def test_infotext_is_written_like_a1111_create_infotext():
    text = build_infotext("1girl, solo", "lowres, bad anatomy", _fields())
    assert text == (
        "1girl, solo\n"
        "Negative prompt: lowres, bad anatomy\n"
        "Steps: 28, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6, Seed: 123, Size: 832x1216, "
        'Model hash: abcdef1234, Model: animagine-xl-3.1, Lora hashes: "name1: 0123456789ab, name2: ba9876543210", '
        "Version: arcae-0.1.0"
    )
    # no negative prompt: no line; no LoRA: no field; fractional CFG keeps its digits
    bare = build_infotext("1girl", "", _fields(lora_hashes={}, cfg=5.5))
    assert bare.splitlines()[0] == "1girl" and len(bare.splitlines()) == 2
    assert "Lora hashes" not in bare and "CFG scale: 5.5," in bare


def test_values_with_separators_are_json_quoted_and_parse_back():
    assert quote("plain") == "plain"
    assert quote("a, b") == '"a, b"' and quote("k: v") == '"k: v"' and quote('say "hi"\nnow') == '"say \\"hi\\"\\nnow"'
    fields = _fields(model_name='my "model", v2: final')
    text = build_infotext("line one\nline two, (tag:1.2)", "neg one\nneg two", fields)
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two, (tag:1.2)"
    assert parsed["Negative prompt"] == "neg one\nneg two"
    assert parsed["Model"] == 'my "model", v2: final'
    assert parse_lora_hashes(parsed["Lora hashes"]) == {"name1": "0123456789ab", "name2": "ba9876543210"}
    assert (parsed["Size-1"], parsed["Size-2"], parsed["Seed"], parsed["CFG scale"]) == ("832", "1216", "123", "6")


def test_parses_a_real_a1111_infotext():
    text = (
        "masterpiece, 1girl, <lora:detail:0.6>\n"
        "Negative prompt: (worst quality:1.4), lowres\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3456789012, Size: 832x1216, "
        'Model hash: 1449e5b0b9, Model: animagine-xl-3.1, Lora hashes: "detail: 62b2a3e8c1f0", Version: v1.10.1'
    )
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "masterpiece, 1girl, <lora:detail:0.6>"
    assert parsed["Negative prompt"] == "(worst quality:1.4), lowres"
    assert (parsed["Sampler"], parsed["Schedule type"], parsed["Steps"]) == ("DPM++ 2M", "Karras", "25")
    assert parsed["Lora hashes"] == "detail: 62b2a3e8c1f0" and parsed["Version"] == "v1.10.1"


def test_addnet_hash_covers_tensors_not_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {"lora_unet_x.lora_down.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, str(a), metadata={"ss_output_name": "a"})
    save_file(tensors, str(b), metadata={"ss_output_name": "a much longer name that moves the data"})
    raw = a.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert addnet_hash(a) == hashlib.sha256(raw[8 + header_len:]).hexdigest()
    assert addnet_hash(a) == addnet_hash(b) and a.read_bytes() != b.read_bytes()


def test_png_written_atomically_with_both_chunks(tmp_path):
    image = Image.new("RGB", (16, 8), (10, 200, 30))
    text = build_infotext("少女, smile", "", _fields(lora_hashes={}))  # non-latin-1 prompt: iTXt
    request = {"params": {"prompt": "少女, smile", "seed": 123}, "model": "m"}
    path = tmp_path / "out" / "job-0.png"
    digest = write_png_atomic(path, image, text, request)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["job-0.png"]  # no temp file left behind
    read_text, read_request = read_png_metadata(path)
    assert read_text == text and read_request == request
    with Image.open(path) as im:
        assert im.size == (16, 8) and im.getpixel((0, 0)) == (10, 200, 30)
    # rewriting replaces the file whole
    write_png_atomic(path, Image.new("RGB", (4, 4)), "x\nSteps: 1, Sampler: Euler, Seed: 1", json.dumps({"a": 1}))
    assert read_png_metadata(path)[1] == {"a": 1}


def test_failed_write_leaves_no_partial_file(tmp_path):
    class Broken:
        def save(self, *a, **k):
            raise OSError("disk full")

    with pytest.raises(OSError):
        write_png_atomic(tmp_path / "x.png", Broken(), "t", {})
    assert list(tmp_path.iterdir()) == []
