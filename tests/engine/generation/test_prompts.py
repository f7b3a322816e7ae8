"""A1111-style prompts: the parser, 75-token chunking, and embeddings on the tiny SDXL model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.contract.errors import InvalidRequest
from engine.generation.prompts import (
    BREAK_WEIGHT,
    SDXLPromptEncoder,
    parse_prompt_attention,
    pipe_encoder,
    tokenize_chunks,
)

# Byte-level tiny tokenizer: one token per character, "," its own token: 20 items -> 119 tokens,
# and the 75th token falls inside a word, so A1111 moves that word to the next chunk.
LONG_PROMPT = ", ".join(f"a{i:03d}x" for i in range(20))
B = BREAK_WEIGHT


@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(tag:1.2), 1girl", [("tag", 1.2), (", 1girl", 1.0)]),
        ("(tag: 0.5 )", [("tag", 0.5)]),
        ("[tag]", [("tag", 1 / 1.1)]),
        ("((tag))", [("tag", 1.1 * 1.1)]),
        ("((tag:1.5))", [("tag", 1.5 * 1.1)]),
        ("[(tag)]", [("tag", 1.1 / 1.1)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("stray) and ]", [("stray) and ]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        (r"hikari \(arcaea\)", [("hikari (arcaea)", 1.0)]),
        (r"(hikari \(arcaea\):1.2), 1girl", [("hikari (arcaea)", 1.2), (", 1girl", 1.0)]),
        (r"back\\slash", [("back\\slash", 1.0)]),
        ("a:b (c:d)", [("a:b ", 1.0), ("c:d", 1.1)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", B), ("b", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), ("BREAK", B), ("BREAK", B), ("b", 1.0)]),
        ("(a BREAK b)", [("a BREAK b", 1.1)]),  # inside brackets BREAK is the word
        ("[a BREAK b", [("a BREAK b", 1 / 1.1)]),
        ("(a) BREAK b", [("a", 1.1), ("BREAK", B), ("b", 1.0)]),
        ("aBREAKb", [("aBREAKb", 1.0)]),
        ("", [("", 1.0)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)],
        ),
    ],
)
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize("text", ["(x:1.2.3), rest of the prompt", "a, (b:.), c", "((x:1..2))"])
def test_malformed_weight_is_a_clear_error(text):
    # A1111 raises here too; before, the "(" stayed open and weighted the rest of the prompt by 1.1.
    with pytest.raises(InvalidRequest, match=r"weight .* is not a number.*\(text:1\.2\)"):
        parse_prompt_attention(text)


def test_a_colon_without_brackets_is_text():
    assert parse_prompt_attention("ratio 1.2.3)") == [("ratio 1.2.3)", 1.0)]


def test_break_inside_brackets_is_one_chunk(pipe):
    assert len(tokenize_chunks(pipe.tokenizer, "(a BREAK b)")) == 1
    assert len(tokenize_chunks(pipe.tokenizer, "(a) BREAK b")) == 2


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def encoder(pipe):
    return pipe_encoder(pipe)


def _image(pipe, embeds) -> np.ndarray:
    gen = torch.Generator("cpu").manual_seed(7)
    return pipe(**embeds.as_kwargs(), num_inference_steps=1, guidance_scale=5.0, height=64, width=64, generator=gen, output_type="np").images


def _diffusers_image(pipe, prompt: str, negative: str) -> np.ndarray:
    gen = torch.Generator("cpu").manual_seed(7)
    return pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=1, guidance_scale=5.0, height=64, width=64, generator=gen, output_type="np").images


def _plain_tokens(tokenizer, text):
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def test_chunks_keep_every_token_and_break_at_a_comma(pipe):
    tok = pipe.tokenizer
    assert len(_plain_tokens(tok, LONG_PROMPT)) == 119
    chunks = tokenize_chunks(tok, LONG_PROMPT)
    assert len(chunks) == 2
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    body = [[t for t in c.tokens if t not in special] for c in chunks]
    for c in chunks:
        assert len(c.tokens) == len(c.weights) == 77
        assert c.tokens[0] == tok.bos_token_id and tok.eos_token_id in c.tokens
    assert body[0] + body[1] == _plain_tokens(tok, LONG_PROMPT)  # nothing truncated or lost
    comma = tok.get_vocab()[",</w>"]
    assert body[0][-1] == comma and len(body[0]) == 72  # the cut word moved to chunk 2
    assert len(tokenize_chunks(tok, "a BREAK b")) == 2
    assert len(tokenize_chunks(tok, "x" * 150)) == 2  # no comma: a hard cut at 75


def test_weights_follow_tokens(pipe):
    (chunk,) = tokenize_chunks(pipe.tokenizer, "ab (cd:1.5) [e]")
    assert chunk.weights[:8] == pytest.approx([1.0, 1.0, 1.0, 1.5, 1.5, 1 / 1.1, 1.0, 1.0])  # BOS a b c d e EOS pad


def test_plain_prompt_equals_diffusers_encode_prompt(pipe, encoder):
    ours = encoder.encode("1girl, solo, looking at viewer", "lowres, bad anatomy")
    pe, npe, pooled, npooled = pipe.encode_prompt(
        "1girl, solo, looking at viewer", negative_prompt="lowres, bad anatomy", device="cpu", do_classifier_free_guidance=True
    )
    for a, b in [(ours.prompt_embeds, pe), (ours.negative_prompt_embeds, npe), (ours.pooled_prompt_embeds, pooled), (ours.negative_pooled_prompt_embeds, npooled)]:
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_escaped_parens_are_literal(pipe, encoder):
    ours = encoder.encode(r"hikari \(arcaea\)")
    pe, *_ = pipe.encode_prompt("hikari (arcaea)", device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(ours.prompt_embeds, pe, rtol=1e-5, atol=1e-5)


def test_long_prompt_is_not_truncated(pipe, encoder):
    long = encoder.encode(LONG_PROMPT, "lowres")
    assert long.prompt_embeds.shape == (1, 154, 64)
    assert long.negative_prompt_embeds.shape == (1, 154, 64)  # negative padded to match
    empty = encoder.encode("").prompt_embeds
    torch.testing.assert_close(long.negative_prompt_embeds[:, 77:], empty)  # padding = empty chunk
    # The pooled embedding comes from the first chunk: the 12 items before the comma cut.
    first_chunk = ", ".join(f"a{i:03d}x" for i in range(12)) + ","
    _, _, pooled, _ = pipe.encode_prompt(first_chunk, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(long.pooled_prompt_embeds, pooled, rtol=1e-5, atol=1e-5)

    # diffusers truncates at 77 tokens; ours keeps the rest, and the image shows it.
    # (The tiny random UNet reacts weakly to text; batching noise is ~1e-6, so 1e-3 is a real change.)
    assert np.abs(_image(pipe, long) - _diffusers_image(pipe, LONG_PROMPT, "lowres")).max() > 1e-3


def test_weighting_changes_embeddings_and_image(pipe, encoder):
    plain = encoder.encode("1girl, red hair", "lowres")
    weighted = encoder.encode("1girl, (red hair:1.5)", "lowres")
    neutral = encoder.encode("1girl, (red hair:1.0)", "lowres")
    assert torch.equal(neutral.prompt_embeds, plain.prompt_embeds)
    assert not torch.allclose(weighted.prompt_embeds, plain.prompt_embeds, atol=1e-3)
    # The mean rescale keeps each encoder's mean; pooled ignores weights, as in A1111.
    torch.testing.assert_close(weighted.prompt_embeds[..., :32].mean(), plain.prompt_embeds[..., :32].mean())
    torch.testing.assert_close(weighted.pooled_prompt_embeds, plain.pooled_prompt_embeds)
    plain_image = _image(pipe, plain)
    np.testing.assert_array_equal(_image(pipe, neutral), plain_image)  # CPU: same embeds, same pixels
    assert np.abs(_image(pipe, weighted) - plain_image).max() > 1e-4  # the tiny UNet reacts weakly


def test_batches_pad_and_match_single_prompts(encoder):
    batch = encoder.encode([LONG_PROMPT, "(solo:1.3)"], ["lowres", "bad hands, " * 18])
    assert batch.prompt_embeds.shape == batch.negative_prompt_embeds.shape == (2, 231, 64)
    assert batch.pooled_prompt_embeds.shape == (2, 32)
    single = encoder.encode("(solo:1.3)", "lowres")
    torch.testing.assert_close(batch.prompt_embeds[1:, :77], single.prompt_embeds, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidRequest, match="as many negative"):
        encoder.encode(["a", "b"], ["c"])
    with pytest.raises(InvalidRequest):
        encoder.encode([])


def test_cache_returns_same_result_and_notices_weight_changes():
    from engine.generation.pipe_state import pipe_state
    from engine.generation.tiny import build_tiny_components

    c = build_tiny_components(seed=3)
    enc = SDXLPromptEncoder(c["tokenizer"], c["tokenizer_2"], c["text_encoder"], c["text_encoder_2"])
    first = enc.encode("1girl", "lowres")
    assert enc.encode("1girl", "lowres") is first
    with torch.no_grad():
        c["text_encoder"].get_input_embeddings().weight.mul_(1.5)
    pipe_state(c["text_encoder_2"]).bump()  # whoever changes weights says so (the registry, a training run)
    changed = enc.encode("1girl", "lowres")
    assert not torch.allclose(changed.prompt_embeds, first.prompt_embeds)


def test_pipe_encoder_is_shared_with_from_pipe(pipe, encoder):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    assert pipe_encoder(pipe) is encoder
    assert pipe_encoder(StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)) is encoder


def test_training_encoding_matches_inference_and_trains_lora():
    from peft import LoraConfig

    from engine.generation.tiny import build_tiny_components

    c = build_tiny_components(seed=1)
    enc = SDXLPromptEncoder(c["tokenizer"], c["tokenizer_2"], c["text_encoder"], c["text_encoder_2"], cache_size=0)
    caption = r"(hikari \(arcaea\):1.2), 1girl"
    frozen, pooled = enc.encode_for_training([caption, "1girl"])
    assert not frozen.requires_grad
    torch.testing.assert_close(frozen[:1], enc.encode(caption).prompt_embeds)

    for te in (c["text_encoder"], c["text_encoder_2"]):
        te.requires_grad_(False)
        te.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights="gaussian"))
    embeds, pooled = enc.encode_for_training([caption, LONG_PROMPT], train_text_encoders=True)
    assert embeds.shape == (2, 154, 64) and embeds.requires_grad
    (embeds.square().mean() + pooled.square().mean()).backward()
    for te in (c["text_encoder"], c["text_encoder_2"]):
        # The penultimate hidden state does not depend on encoder 1's last layer: check layer 0.
        # lora_B starts at zero, so only it gets a non-zero gradient on the first step.
        grads = {n: p.grad for n, p in te.named_parameters() if "lora_" in n and "layers.0." in n}
        assert len(grads) == 8 and all(g is not None for g in grads.values())
        assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
