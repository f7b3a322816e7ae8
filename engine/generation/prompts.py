"""AUTOMATIC1111-style prompts for SDXL: weighting syntax and 75-token chunks.

One module for inference and training, so a weighted caption such as
``(hikari \\(arcaea\\):1.2), 1girl`` means the same thing in both. It follows A1111's
``prompt_parser.parse_prompt_attention``, ``sd_hijack_clip`` and ``sd_emphasis`` ("Original"):

- ``(x)`` x1.1, ``[x]`` /1.1, ``(x:w)``; nesting multiplies; ``\\( \\) \\[ \\] \\\\`` are
  literal; unclosed brackets apply to the end of the prompt; ``BREAK`` starts a new chunk.
- Prompts are split into chunks of 75 tokens (BOS + 75 + EOS + padding = 77), so nothing is
  truncated; a chunk that fills moves the text after its last comma (within 20 tokens) on.
- Each chunk goes through both encoders (penultimate hidden states, concatenated on the
  feature axis); token embeddings are multiplied by their weight, then rescaled to the
  chunk's previous mean. Chunks are concatenated on the sequence axis. The pooled embedding
  is encoder 2's projection of the first chunk, as in A1111 and diffusers.
- Positive and negative prompts are padded with empty chunks to the same length (for CFG).

Deliberate differences from A1111: the mean rescale is per prompt and chunk, not over the
whole batch of a chunk (so batching never changes an image); ``BREAK`` inside brackets is the
literal word at the brackets' weight (A1111 also keeps the word, but weighted by minus the
brackets' weight); a malformed weight such as ``(x:1.2.3)`` is an ``InvalidRequest`` (A1111
fails with a ValueError). ``AND`` is ordinary text (no composable diffusion).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.contract.errors import InvalidRequest
from engine.generation.pipe_state import pipe_state
from engine.contract.prompt_syntax import BREAK_WEIGHT, parse_prompt_attention, prompt_schedule, text_at_step

CHUNK_LENGTH = 75  # prompt tokens per chunk; each chunk is BOS + 75 + EOS = 77
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
def _comma_id(tokenizer: Any) -> int | None:
    """The id of the word-final comma, or None (get_vocab would copy 49k entries per call)."""
    token_id = tokenizer.convert_tokens_to_ids(",</w>")
    return token_id if tokenizer.convert_ids_to_tokens(token_id) == ",</w>" else None


@dataclass(frozen=True)
class PromptChunk:
    """77 token ids (BOS + 75 + EOS/padding) and one weight per token."""

    tokens: list[int]
    weights: list[float]


def _finish_chunk(tokens: list[int], weights: list[float], tokenizer: Any) -> PromptChunk:
    """BOS + tokens + EOS, then the tokenizer's pad id (diffusers and A1111 pad the same way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fill = CHUNK_LENGTH - len(tokens)
    return PromptChunk(
        [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [pad] * fill,
        [1.0, *weights, 1.0] + [1.0] * fill,
    )


def tokenize_chunks(tokenizer: Any, text: str) -> list[PromptChunk]:
    """Tokenize a prompt with weights into 77-token chunks the way A1111's tokenize_line does."""
    parsed = parse_prompt_attention(text)
    token_lists = tokenizer([t for t, _ in parsed], add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    comma = _comma_id(tokenizer)
    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append(_finish_chunk(tokens, weights, tokenizer))
        tokens, weights, last_comma = [], [], -1

    for ids, (fragment, weight) in zip(token_lists, parsed):
        if weight == BREAK_WEIGHT and fragment == "BREAK":
            next_chunk()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_LENGTH and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                # The chunk is full: move the words after its last comma to the next chunk.
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                next_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK_LENGTH:
                next_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


@dataclass
class PromptEmbeddings:
    """Keyword arguments for StableDiffusionXLPipeline; treat the tensors as read-only."""

    prompt_embeds: Any
    negative_prompt_embeds: Any
    pooled_prompt_embeds: Any
    negative_pooled_prompt_embeds: Any

    def as_kwargs(self) -> dict[str, Any]:
        """The four tensors as pipeline keyword arguments."""
        return dict(self.__dict__)


class SDXLPromptEncoder:
    """Encode A1111-syntax prompts of any length with SDXL's two CLIP text encoders."""

    def __init__(self, tokenizer: Any, tokenizer_2: Any, text_encoder: Any, text_encoder_2: Any, *, cache_size: int = 16) -> None:
        self.tokenizers = (tokenizer, tokenizer_2)
        self.text_encoders = (text_encoder, text_encoder_2)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, PromptEmbeddings] = OrderedDict()
        self._first_params: tuple[Any, ...] | None = None

    def encode(self, prompt: str | Sequence[str], negative: str | Sequence[str] = "") -> PromptEmbeddings:
        """Embeddings for a prompt (or a batch) and its negative, padded to the same length."""
        import torch

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if not prompts or len(negatives) != len(prompts):
            raise InvalidRequest(f"need one or more prompts and as many negative prompts (got {len(prompts)} and {len(negatives)})")
        key = (tuple(prompts), tuple(negatives), self._encoder_state())
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with torch.no_grad():
            embeds, pooled = self._encode_texts(prompts + negatives)
        n = len(prompts)
        result = PromptEmbeddings(embeds[:n], embeds[n:], pooled[:n], pooled[n:])
        if self.cache_size > 0:
            self._cache[key] = result
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    def encode_scheduled(self, prompts: Sequence[str], negatives: Sequence[str], steps: int) -> "ScheduledEmbeddings":
        """Embeddings per sampling step for prompts with A1111 editing/alternation (``[a:b:when]``, ``[a|b]``).

        Without such syntax this is ``encode`` exactly. With it, every distinct text of every
        step is encoded once, in one batch (so all share one length), and cached.
        """
        import torch

        prompts, negatives = list(prompts), list(negatives)
        schedules = [prompt_schedule(t, steps) for t in prompts + negatives]
        if all(len(s) == 1 for s in schedules):
            return ScheduledEmbeddings(self.encode(prompts, negatives), None, schedules, len(prompts))
        texts = list(dict.fromkeys(text for s in schedules for _, text in s))
        key = ("scheduled", tuple(texts), self._encoder_state())
        if key in self._cache:
            self._cache.move_to_end(key)
            encoded = self._cache[key]
        else:
            with torch.no_grad():
                embeds, pooled = self._encode_texts(texts)
            encoded = (texts, embeds, pooled)
            if self.cache_size > 0:
                self._cache[key] = encoded  # type: ignore[assignment]
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return ScheduledEmbeddings(None, encoded, schedules, len(prompts))

    def encode_for_training(self, captions: Sequence[str], *, train_text_encoders: bool = False) -> tuple[Any, Any]:
        """(prompt_embeds, pooled) for captions; keeps gradients when the text encoders train."""
        import torch

        if not captions:
            raise InvalidRequest("need at least one caption to encode")
        with torch.set_grad_enabled(train_text_encoders):
            return self._encode_texts(list(captions))

    def _encoder_state(self) -> tuple:
        """What the embeddings depend on besides the text: the pipeline's weights version and the
        encoders' device and dtype.

        The version (``engine.generation.pipe_state``) grows whenever the mix, an adapter's weights
        or the loaded adapters change: a cache hit costs the same with 2 adapters loaded or 50.
        """
        state = pipe_state(self.text_encoders[1])
        if self._first_params is None:
            # One parameter per encoder stands for its device and dtype (``.to()`` changes
            # parameters in place); the models' own .device/.dtype walk their modules each call.
            self._first_params = tuple(next(e.parameters()) for e in self.text_encoders)
        return (state.weights_version, *((p.device, p.dtype) for p in self._first_params))

    def _encode_texts(self, texts: list[str]) -> tuple[Any, Any]:
        """(B, 77 * chunks, C1 + C2) embeddings and (B, P) pooled for already-validated texts.

        Every chunk of every text goes through each encoder in one batch (row = chunk * B + text).
        """
        import torch

        per_encoder = [[tokenize_chunks(tok, text) for text in texts] for tok in self.tokenizers]
        n_chunks = max(len(chunks) for batch in per_encoder for chunks in batch)
        n_texts = len(texts)
        hidden, pooled = [], None
        for tok, encoder, batch in zip(self.tokenizers, self.text_encoders, per_encoder):
            empty = _finish_chunk([], [], tok)  # pads shorter prompts, as A1111's empty_chunk
            rows = [chunks[i] if i < len(chunks) else empty for i in range(n_chunks) for chunks in batch]
            out = encoder(torch.tensor([r.tokens for r in rows], device=encoder.device), output_hidden_states=True)
            z = out.hidden_states[-2]
            z = _apply_emphasis(z, torch.tensor([r.weights for r in rows], device=z.device, dtype=torch.float32))
            # (chunks * B, 77, C) -> (B, chunks * 77, C)
            hidden.append(z.reshape(n_chunks, n_texts, *z.shape[1:]).transpose(0, 1).reshape(n_texts, -1, z.shape[-1]))
            if encoder is self.text_encoders[1]:
                pooled = out.text_embeds[:n_texts]  # projection at the first EOS of the first chunk
        dtype = self.text_encoders[1].dtype
        return torch.cat(hidden, dim=-1).to(dtype), pooled.to(dtype)


class ScheduledEmbeddings:
    """A batch's prompt embeddings at each sampling step (from ``SDXLPromptEncoder.encode_scheduled``)."""

    def __init__(self, fixed: PromptEmbeddings | None, encoded: Any, schedules: list[list[tuple[int, str]]], n: int) -> None:
        self._fixed = fixed
        self._encoded = encoded  # (texts, embeds, pooled) when some prompt is scheduled
        self._schedules = schedules  # prompts' schedules, then the negatives'
        self._n = n

    def texts_at(self, step: int) -> tuple[str, ...]:
        """Every row's text (prompts, then negatives) at the 0-based sampling step."""
        return tuple(text_at_step(s, step) for s in self._schedules)

    def changes_at(self, step: int) -> bool:
        """Whether step ``step`` uses other embeddings than step ``step - 1``."""
        return self._fixed is None and step > 0 and self.texts_at(step) != self.texts_at(step - 1)

    def at(self, step: int) -> PromptEmbeddings:
        """The embeddings of the 0-based sampling step ``step``."""
        if self._fixed is not None:
            return self._fixed
        import torch

        texts, embeds, pooled = self._encoded
        rows = torch.tensor([texts.index(t) for t in self.texts_at(step)], device=embeds.device)
        e, p, n = embeds[rows], pooled[rows.to(pooled.device)], self._n
        return PromptEmbeddings(e[:n], e[n:], p[:n], p[n:])

    def pipeline_kwargs(self, step: int, rows: list[int]) -> dict[str, Any]:
        """The pipeline's four embedding arguments at ``step``, one row per image (``rows``: prompt index)."""
        import torch

        return {k: v[torch.tensor(rows, device=v.device)] for k, v in self.at(step).as_kwargs().items()}

    def callback_outputs(self, step: int, rows: list[int], cfg: bool, current: dict[str, Any]) -> dict[str, Any]:
        """What ``callback_on_step_end`` returns to switch the SDXL pipeline to ``step``'s conditioning.

        With CFG the pipeline holds negatives first, then positives (as it concatenated them);
        ``current`` holds its present ``prompt_embeds`` and ``add_text_embeds`` (device, dtype).
        """
        import torch

        e = self.pipeline_kwargs(step, rows)
        cond, pooled = e["prompt_embeds"], e["pooled_prompt_embeds"]
        if cfg:
            cond = torch.cat([e["negative_prompt_embeds"], cond])
            pooled = torch.cat([e["negative_pooled_prompt_embeds"], pooled])
        old, old_pooled = current["prompt_embeds"], current["add_text_embeds"]
        return {
            "prompt_embeds": cond.to(device=old.device, dtype=old.dtype),
            "add_text_embeds": pooled.to(device=old_pooled.device, dtype=old_pooled.dtype),
        }


def _apply_emphasis(z: Any, weights: Any) -> Any:
    """A1111's "Original" emphasis: scale each token by its weight, keep each chunk's mean.

    Computed in float32 (A1111's multipliers are float32 too), so fp16 weights stay exact.
    """
    if bool((weights == 1.0).all()):
        return z  # no syntax: exactly the encoder's output, as diffusers gives it
    zf = z.float()
    original_mean = zf.mean(dim=(1, 2), keepdim=True)
    zf = zf * weights.unsqueeze(-1)
    return (zf * (original_mean / zf.mean(dim=(1, 2), keepdim=True))).to(z.dtype)


_PIPE_ENCODERS: "weakref.WeakKeyDictionary[Any, SDXLPromptEncoder]" = weakref.WeakKeyDictionary()


def pipe_encoder(pipe: Any) -> SDXLPromptEncoder:
    """The prompt encoder for an SDXL pipeline's text components.

    Kept per text encoder, so pipelines made with ``from_pipe`` (img2img) share one encoder
    and its cache.
    """
    parts = (pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2)
    encoder = _PIPE_ENCODERS.get(pipe.text_encoder_2)
    if encoder is None or any(a is not b for a, b in zip(encoder.tokenizers + encoder.text_encoders, parts)):
        encoder = SDXLPromptEncoder(*parts)
        _PIPE_ENCODERS[pipe.text_encoder_2] = encoder
    return encoder
