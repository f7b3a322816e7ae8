"""A1111 prompt syntax above the weighting: ``<lora:...>`` tags and prompt editing/alternation,
parsed alone and run on the tiny SDXL model (what the UNet sees, what the PNG records)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.contract.errors import InvalidRequest, UnknownAdapter
from engine.contract.prompt_syntax import LoraTag, extract_lora_tags, prompt_schedule, text_at_step
from engine.contract.protocol import AdapterWeight, GenerationParams
from tests.conftest import write_config

STYLE = "inkstyle"
OTHER = "watercolor_v2"


@pytest.mark.parametrize(
    "prompt, steps, expected",
    [
        ("a [cat:dog:0.5]", 10, [(5, "a cat"), (10, "a dog")]),  # "." = fraction of the steps
        ("a [cat:dog:3]", 10, [(3, "a cat"), (10, "a dog")]),  # no "." = step number
        ("a [cat:dog:0.25]", 20, [(5, "a cat"), (20, "a dog")]),
        ("[to:4]", 10, [(4, ""), (10, "to")]),
        ("[from::4]", 10, [(4, "from"), (10, "")]),
        ("[a|b|c]", 4, [(1, "a"), (2, "b"), (3, "c"), (4, "a")]),
        ("[a|]", 3, [(1, "a"), (2, ""), (3, "a")]),
        ("(x [a:b:2]:1.2)", 10, [(2, "(x a:1.2)"), (10, "(x b:1.2)")]),  # nested inside a weight
        ("[[a:b:2]:c:0.8]", 10, [(2, "a"), (8, "b"), (10, "c")]),
        ("[(red:1.3) hair:blue hair:5]", 10, [(5, "(red:1.3) hair"), (10, "blue hair")]),
        ("a [cat:dog:20]", 10, [(10, "a cat")]),  # past the last step: never switches
        ("a [cat:dog:1.0]", 10, [(10, "a cat")]),  # 1.0 is the whole run, as in A1111
        ("(a:b:c), [x:y:5]", 10, [(5, "(a:b:c), x"), (10, "(a:b:c), y")]),  # stray brackets are text
        ("plain (w:1.2) [x] BREAK y", 10, [(10, "plain (w:1.2) [x] BREAK y")]),
        (r"\[a:b:2\]", 10, [(10, r"\[a:b:2\]")]),  # escaped: literal
        ("[a:b:c]", 10, [(10, "[a:b:c]")]),  # not a number: weighting syntax, as written
        ("a|b [x:y:2]", 10, [(10, "a|b [x:y:2]")]),  # the grammar fails: used as written (A1111)
    ],
)
def test_prompt_schedule_cases(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


def test_text_at_step_follows_a1111_step_rule():
    # A1111 compares the 0-based step with the 1-based end step: "cat" runs steps 0..3 here.
    schedule = prompt_schedule("[cat:dog:3]", 6)
    assert [text_at_step(schedule, i) for i in range(6)] == ["cat"] * 4 + ["dog"] * 2
    assert [text_at_step(prompt_schedule("[a|b]", 5), i) for i in range(5)] == ["a", "a", "b", "a", "b"]


@pytest.mark.parametrize(
    "prompt, text, tags",
    [
        ("1girl, <lora:inkstyle:0.8>, smile", "1girl, , smile", [LoraTag("inkstyle", 0.8)]),
        ("<lora:inkstyle>1girl", "1girl", [LoraTag("inkstyle", 1.0)]),
        ("1girl <lyco:a:-0.5> <lora:b:1.2:1.2>", "1girl", [LoraTag("a", -0.5), LoraTag("b", 1.2)]),
        ("1girl <lora:b:0.7:unet=0.7>", "1girl", [LoraTag("b", 0.7)]),
        ("no tags, (x:1.2)", "no tags, (x:1.2)", []),
    ],
)
def test_lora_tags_leave_the_text(prompt, text, tags):
    assert extract_lora_tags(prompt) == (text, tags)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("<lora:a:0.8:0.5>", "separate text-encoder and UNet weights"),
        ("<lora:a:te=1:unet=0.5>", "separate text-encoder and UNet weights"),
        ("<lora:a:lots>", "'lots' is not a number"),
        ("<lora:a:0.5:dyn=4>", "dyn= is not supported"),
        ("<hypernet:h:1>", "only <lora:NAME:WEIGHT> tags"),
        ("<lora:a:1> <lora:a:0.5>", "more than once"),
    ],
)
def test_bad_lora_tags_say_what_is_allowed(prompt, message):
    with pytest.raises(InvalidRequest, match=message):
        extract_lora_tags(prompt)


# ------------------------------------------------------------------ on the tiny model


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    """A Generator on the tiny model with two style LoRAs installed."""
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from tests.engine.generation.lora_factory import make_lora

    root = tmp_path_factory.mktemp("syntax")
    config = load_config(write_config(root, tiny_model_dir))
    generator = Generator.from_config(config)
    adapters = config.path(config.adapters.dir)
    make_lora(generator.pipe, adapters / f"{STYLE}.safetensors", seed=1, kind="style", strength=2.0)
    make_lora(generator.pipe, adapters / f"{OTHER}.safetensors", seed=5, kind="style", strength=2.0)
    generator.registry.reload()
    return generator


def _run(generator, job_id, prompt, **params):
    params.setdefault("steps", 2)
    params.setdefault("seed", 11)
    params.setdefault("add_quality_tags", False)
    return generator.generate(GenerationParams(prompt=prompt, **params), job_id=job_id)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_lora_tag_applies_the_adapter_and_the_png_records_it(env):
    from engine.generation.infotext import addnet_hash, parse_infotext, parse_lora_hashes, read_png_metadata

    tagged = _run(env, "tagged", "1girl, solo <lora:inkstyle:0.7>")
    option = _run(env, "option", "1girl, solo", adapters=[AdapterWeight(name=STYLE, weight=0.7)])
    plain = _run(env, "plain", "1girl, solo")
    assert tagged.params.prompt == "1girl, solo"  # the tag is not encoded as text
    assert [(a.name, a.weight) for a in tagged.params.adapters] == [(STYLE, 0.7)]
    np.testing.assert_array_equal(_pixels(tagged.images[0].path), _pixels(option.images[0].path))
    assert np.abs(_pixels(tagged.images[0].path) - _pixels(plain.images[0].path)).max() > 0

    text, _ = read_png_metadata(tagged.images[0].path)
    fields = parse_infotext(text)
    assert fields["Prompt"] == "1girl, solo <lora:inkstyle:0.7>"  # the tag written once
    path = env.config.path(env.config.adapters.dir) / f"{STYLE}.safetensors"
    assert parse_lora_hashes(fields["Lora hashes"]) == {STYLE: addnet_hash(path)[:12]}


def test_pasting_a_png_prompt_line_back_reproduces_the_mix(env):
    from engine.generation.infotext import parse_infotext, read_png_metadata

    first = _run(env, "mixed", "1girl, (smile:1.2)", adapters=[AdapterWeight(name=STYLE, weight=0.5)],
                 negative_prompt="lowres")
    fields = parse_infotext(read_png_metadata(first.images[0].path)[0])
    again = _run(env, "pasted", fields["Prompt"], negative_prompt=fields["Negative prompt"])
    assert [(a.name, a.weight) for a in again.params.adapters] == [(STYLE, 0.5)]
    assert again.params.prompt == first.params.prompt
    np.testing.assert_array_equal(_pixels(again.images[0].path), _pixels(first.images[0].path))


def test_lora_tag_weight_wins_over_the_option(env):
    out = _run(env, "both", "1girl <lora:inkstyle:0.3> <lora:watercolor_v2:0.6>",
               adapters=[AdapterWeight(name=STYLE, weight=1.0)])
    assert [(a.name, a.weight) for a in out.params.adapters] == [(STYLE, 0.3), (OTHER, 0.6)]
    assert any("prompt tag's weight 0.3" in w for w in out.warnings)


def test_unknown_lora_tag_lists_close_names(env):
    with pytest.raises(UnknownAdapter, match=r"unknown adapter 'inkstyl'; did you mean inkstyle\?"):
        _run(env, "unknown", "1girl <lora:inkstyl:1>")
    with pytest.raises(InvalidRequest, match="between -4 and 4"):
        _run(env, "heavy", "1girl <lora:inkstyle:7>")
    with pytest.raises(InvalidRequest, match="put LoRA tags in the prompt"):
        _run(env, "neg", "1girl", negative_prompt="<lora:inkstyle:1>")
    assert not list(env.outputs_dir.glob("unknown-*"))


class _Conditioning:
    """The text conditioning the real UNet gets at each call (a forward pre-hook)."""

    def __init__(self, unet):
        self.calls: list[torch.Tensor] = []
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append(kwargs["encoder_hidden_states"].detach().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def test_prompt_editing_switches_the_conditioning_at_its_step(env):
    encoded: list[list[str]] = []
    real = env.encoder._encode_texts
    env.encoder._encode_texts = lambda texts: (encoded.append(list(texts)), real(texts))[1]
    try:
        with _Conditioning(env.pipe.unet) as seen:
            out = _run(env, "edit", "1girl, [red:blue:2] hair", steps=4, cfg=5.0, negative_prompt="lowres")
        with _Conditioning(env.pipe.unet) as red:
            _run(env, "red", "1girl, red hair", steps=4, cfg=5.0, negative_prompt="lowres")
        with _Conditioning(env.pipe.unet) as blue:
            _run(env, "blue", "1girl, blue hair", steps=4, cfg=5.0, negative_prompt="lowres")
    finally:
        env.encoder._encode_texts = real
    assert out.params.prompt == "1girl, [red:blue:2] hair"  # recorded as written, re-runs the same
    # A1111's rule: steps 0-2 use "red" (end step 2 compared with the 0-based step), step 3 "blue".
    assert len(seen.calls) == 4
    for i in range(3):
        torch.testing.assert_close(seen.calls[i], red.calls[i])
    torch.testing.assert_close(seen.calls[3], blue.calls[3])
    assert not torch.allclose(seen.calls[0], seen.calls[3])
    # Each distinct text was encoded once, in one batch, not once per step.
    assert sorted(encoded[0]) == sorted(["1girl, red hair", "1girl, blue hair", "lowres"])


def test_alternation_changes_the_conditioning_every_step(env):
    with _Conditioning(env.pipe.unet) as seen:
        _run(env, "alt", "[cat|dog], 1girl", steps=4, cfg=1.0)
    # cat, cat, dog, cat (A1111's order); without CFG one UNet call per step.
    assert len(seen.calls) == 4
    torch.testing.assert_close(seen.calls[0], seen.calls[1])
    assert not torch.allclose(seen.calls[1], seen.calls[2])
    torch.testing.assert_close(seen.calls[0], seen.calls[3])


def test_scheduled_prompt_image_reproduces_and_differs_from_either_text(env):
    a = _run(env, "s1", "1girl, [red:blue:0.5] hair", steps=4)
    b = _run(env, "s2", "1girl, [red:blue:0.5] hair", steps=4)
    red = _run(env, "s3", "1girl, red hair", steps=4)
    np.testing.assert_array_equal(_pixels(a.images[0].path), _pixels(b.images[0].path))
    assert a.params.prompt == "1girl, [red:blue:0.5] hair"
    assert np.abs(_pixels(a.images[0].path) - _pixels(red.images[0].path)).max() > 0
    assert Path(a.images[0].path).exists()


def test_a_scheduled_and_a_plain_prompt_batch_like_they_run_alone(env):
    scheduled = GenerationParams(prompt="1girl, [red:blue:0.5] hair", steps=4, seed=3, add_quality_tags=False)
    plain = GenerationParams(prompt="1girl, green hair", steps=4, seed=4, add_quality_tags=False)
    assert env.batch_key(scheduled) == env.batch_key(plain)
    with _Conditioning(env.pipe.unet) as seen:
        both = env.generate_batch([("b-sched", scheduled), ("b-plain", plain)])
    assert len(seen.calls) == 4 and seen.calls[0].shape[0] == 4  # one call per step: 2 jobs x CFG
    alone = [env.generate(p, job_id=j) for j, p in (("a-sched", scheduled), ("a-plain", plain))]
    for batched, single in zip(both, alone):
        # Batched matmuls may round differently by one 8-bit level (see Generator.generate_batch).
        assert np.abs(_pixels(batched.images[0].path) - _pixels(single.images[0].path)).max() <= 1
    # The plain job's conditioning never changed; the scheduled one's did, at A1111's step.
    torch.testing.assert_close(seen.calls[0][[1, 3]], seen.calls[3][[1, 3]])
    assert not torch.allclose(seen.calls[0][[0, 2]], seen.calls[3][[0, 2]])


def test_a_variation_of_a_scheduled_image_keeps_switching(env):
    first = _run(env, "v-src", "1girl, [red:blue:1] hair", steps=4, cfg=5.0)
    with _Conditioning(env.pipe.unet) as seen:
        out = env.img2img(Path(first.images[0].path).name, "variation", job_id="v-var", strength=1.0)
    assert out.params.prompt == "1girl, [red:blue:1] hair"
    # Steps 0-1 "red", then "blue" (A1111's rule over the full step count).
    assert len(seen.calls) == 4
    torch.testing.assert_close(seen.calls[0], seen.calls[1])
    assert not torch.allclose(seen.calls[1], seen.calls[2])


def test_a_malformed_weight_is_refused_when_the_request_is_resolved(env):
    bad = GenerationParams(prompt="1girl, [(smile:1.2.3):frown:2]", steps=4)
    with pytest.raises(InvalidRequest, match=r"weight '1\.2\.3' .* is not a number"):
        env.resolve(bad)  # what the engine checks before it queues a job
    with pytest.raises(InvalidRequest, match="is not a number"):
        env.resolve(GenerationParams(prompt="1girl", negative_prompt="(lowres:1..2)", steps=4))
