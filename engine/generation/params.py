"""Request defaults and limits: a user's ``GenerationParams`` becomes the ``ResolvedParams`` that run.

Pure functions over the config (no torch), so the command line can reject bad input before it
spends time loading a model, and the Generator applies exactly the same rules. Every rejection is
``errors.InvalidRequest`` with a message that says what is allowed.
"""

from __future__ import annotations

import math
import re
import secrets as _secrets
from typing import Callable, Literal

from engine.contract import limits
from engine.contract.config import GenerationConfig
from engine.contract.errors import InvalidRequest
from engine.contract.protocol import MAX_SEED, AdapterWeight, GenerationParams, ResolvedParams
from engine.contract.sizes import SIZES_BY_NAME
from engine.generation.samplers import DEFAULT_SAMPLER, FAST_SAMPLER, get_sampler
from engine.generation.fast_modes import FastChoice
from engine.contract.prompt_syntax import LoraTag, check_no_lora_tags, extract_lora_tags, parse_prompt_attention, prompt_schedule

# SDXL's trained aspect-ratio buckets by name (one table with the bot's aspect labels).
SIZE_PRESETS = SIZES_BY_NAME
LCM_LORA_REPO = "latent-consistency/lcm-lora-sdxl"

Mode = Literal["txt2img", "variation", "upscale", "image"]
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """``"832x1216"`` or a preset name (``"portrait"``) as (width, height)."""
    key = text.strip().lower()
    if key in SIZE_PRESETS:
        return SIZE_PRESETS[key]
    match = _SIZE.fullmatch(text)
    if not match:
        presets = ", ".join(f"{n} ({w}x{h})" for n, (w, h) in SIZE_PRESETS.items())
        raise InvalidRequest(f"bad size {text!r}: use WIDTHxHEIGHT (e.g. 832x1216) or a preset: {presets}")
    return int(match.group(1)), int(match.group(2))


def check_size(gen: GenerationConfig, width: int, height: int) -> None:
    """Sides multiples of 8 within [min_side, max_side], area within max_pixels (``limits.size_problem``)."""
    problem = limits.size_problem(gen, width, height)
    if problem:
        raise InvalidRequest(problem)


def fast_lcm_missing_message(lcm_adapter: str, adapters_dir: str) -> str:
    """How to install the LCM-LoRA adapter fast mode needs."""
    return (
        f"fast mode needs the LCM-LoRA adapter {lcm_adapter!r}, which is not installed; install it with "
        f"`hf download {LCM_LORA_REPO} pytorch_lora_weights.safetensors --local-dir /tmp/lcm` and "
        f"`mv /tmp/lcm/pytorch_lora_weights.safetensors {adapters_dir}/{lcm_adapter}.safetensors`"
    )


def random_seed(count: int = 1) -> int:
    """A random seed such that seed + count - 1 still fits the protocol's range."""
    return _secrets.randbelow(MAX_SEED - count + 2)


def _check(problem: str | None) -> None:
    if problem:
        raise InvalidRequest(problem)


def _prompt(gen: GenerationConfig, params: GenerationParams) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<lora:...>`` tags (quality tags added) and those tags."""
    _check(limits.prompt_problem(gen, params.prompt))
    prompt, lora_tags = extract_lora_tags(params.prompt)
    add_tags = gen.add_quality_tags if params.add_quality_tags is None else params.add_quality_tags
    tags = gen.quality_tags.strip()
    if add_tags and tags and not prompt.lstrip().startswith(tags):
        return (f"{tags}, {prompt.strip()}" if prompt.strip() else tags), lora_tags
    return prompt, lora_tags


def _negative(gen: GenerationConfig, params: GenerationParams, *, no_cfg: bool, extra: str) -> str:
    if params.negative_prompt is not None:
        _check(limits.too_long(gen, params.negative_prompt, "negative prompt"))
    if params.negative_prompt is not None:
        check_no_lora_tags(params.negative_prompt)
        negative = params.negative_prompt.strip()
    else:
        # Without CFG the default negative prompt would do nothing: leave it out of the record.
        negative = "" if no_cfg else gen.negative_prompt
    extra = extra.strip()
    if extra and extra not in negative:
        negative = f"{negative}, {extra}" if negative else extra
    return negative


def _adapters(
    params: GenerationParams,
    lora_tags: list[LoraTag],
    warnings: list[str],
    *,
    max_active: int,
    default_weight: Callable[[str], float],
    fast_adapter: tuple[str, float] | None,
) -> list[AdapterWeight]:
    names = [a.name for a in params.adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidRequest(f"adapter {duplicates[0]!r} is named more than once; give each adapter once")
    mix = [
        AdapterWeight(name=a.name, weight=a.weight if a.weight is not None else default_weight(a.name))
        for a in params.adapters
    ]
    for tag in lora_tags:
        default_weight(tag.name)  # raises UnknownAdapter (with close names) for a name not installed
        _check(limits.weight_problem(f"weight of <lora:{tag.name}>", tag.weight))
        if tag.name in names:
            # The tag is the more specific request (a pasted PNG prompt): it sets the weight.
            i = names.index(tag.name)
            if mix[i].weight != tag.weight:
                warnings.append(f"adapter {tag.name!r} runs at the prompt tag's weight {tag.weight:g}")
            mix[i] = AdapterWeight(name=tag.name, weight=tag.weight)
        else:
            names.append(tag.name)
            mix.append(AdapterWeight(name=tag.name, weight=tag.weight))
    if len(mix) > max_active:
        raise InvalidRequest(f"{len(mix)} adapters requested; at most {max_active} can be mixed")
    if fast_adapter and fast_adapter[0] not in names:
        mix.append(AdapterWeight(name=fast_adapter[0], weight=fast_adapter[1]))
    return mix


def _steps_and_cfg(gen: GenerationConfig, params: GenerationParams, mode: FastChoice | None = None) -> tuple[int, float]:
    """Steps and CFG with defaults applied, within the normal or the fast mode's range."""
    if mode is not None:
        steps = params.steps if params.steps is not None else mode.default_steps
        cfg = params.cfg if params.cfg is not None else mode.default_cfg
        hint = f" in fast mode {mode.recipe.name}"
        _check(limits.out_of_range("steps", steps, *mode.steps, hint))
        _check(limits.out_of_range("CFG", cfg, *mode.cfg, hint + (" (it runs without CFG)" if mode.cfg[1] <= 1.0 else "")))
        return steps, cfg
    fast = params.fast
    steps = params.steps if params.steps is not None else (gen.fast_steps if fast else gen.steps)
    cfg = params.cfg if params.cfg is not None else (gen.fast_cfg if fast else gen.cfg)
    _check(limits.steps_problem(gen, steps, fast))
    _check(limits.cfg_problem(gen, cfg, fast))
    return steps, cfg


def check_prompt_texts(text: str, steps: int) -> None:
    """Parse every text a step will encode: a malformed weight fails here, not halfway into the queue."""
    # Each distinct text once: [a|b] repeats the same few texts across all the steps.
    for step_text in dict.fromkeys(t for _, t in prompt_schedule(text, steps)):
        parse_prompt_attention(step_text)


def resolve_params(
    gen: GenerationConfig,
    params: GenerationParams,
    *,
    mode: Mode = "txt2img",
    max_active: int = 8,
    default_weight: Callable[[str], float] = lambda name: 1.0,
    fast_adapter: tuple[str, float] | None = None,
    extra_negative: str = "",
    strength: float | None = None,
    source_image: str | None = None,
    fast_mode: FastChoice | None = None,
    cfg_rescale: float = 0.0,
) -> tuple[ResolvedParams, list[str]]:
    """Apply defaults and check limits; return what will run and warnings for the caller.

    ``default_weight(name)`` gives an adapter's default weight (and raises ``UnknownAdapter``);
    ``fast_adapter`` is the few-step adapter (name, weight) fast mode adds to the mix and
    ``fast_mode`` its recipe (steps, CFG and sampler); ``cfg_rescale`` applies when CFG is on.
    """
    warnings: list[str] = []
    fast = params.fast or fast_mode is not None
    steps, cfg = _steps_and_cfg(gen, params, fast_mode)
    width = params.width if params.width is not None else gen.size[0]
    height = params.height if params.height is not None else gen.size[1]
    check_size(gen, width, height)
    _check(limits.count_problem(gen, params.count))

    sampler = get_sampler(params.sampler or gen.sampler or DEFAULT_SAMPLER).name
    if fast:
        fast_sampler = fast_mode.recipe.infotext_sampler if fast_mode is not None else FAST_SAMPLER
        if params.sampler and sampler != fast_sampler:
            warnings.append(f"sampler {sampler!r} is replaced by {fast_sampler} in fast mode")
        sampler = fast_sampler
    no_cfg = cfg <= 1.0
    negative = _negative(gen, params, no_cfg=no_cfg, extra=extra_negative)
    if no_cfg and negative:
        warnings.append(
            "negative prompt has no effect in fast mode (CFG 1 = no classifier-free guidance)"
            if fast else "negative prompt has no effect at CFG <= 1"
        )
    if strength is not None:
        _check(limits.out_of_range("strength", strength, 0.01, 1.0))
        if int(steps * strength) < 1:
            # img2img runs int(steps * strength) steps: at least one must run.
            steps = math.ceil(1 / strength - 1e-9)
            warnings.append(f"steps raised to {steps} so that one denoising step runs at strength {strength:g}")
    prompt, lora_tags = _prompt(gen, params)
    for text in (prompt, negative):
        check_prompt_texts(text, steps)
    adapters = _adapters(
        params, lora_tags, warnings, max_active=max_active, default_weight=default_weight, fast_adapter=fast_adapter if fast else None
    )
    resolved = ResolvedParams(
        prompt=prompt,
        negative_prompt=negative,
        seed=params.seed if params.seed is not None else random_seed(params.count),
        steps=steps,
        cfg=float(cfg),
        width=width,
        height=height,
        count=params.count,
        sampler=sampler,
        adapters=adapters,
        fast=fast,
        mode=mode,
        strength=strength,
        source_image=source_image,
        fast_mode=fast_mode.recipe.name if fast_mode is not None else None,
        eta=fast_mode.eta if fast_mode is not None else None,
        cfg_rescale=cfg_rescale if cfg > 1.0 else 0.0,
    )
    return resolved, warnings
