"""Generation limits, checked by this same code wherever untrusted input enters: the bot, the engine, the CLI.

The bot checks early, for a fast message in Discord's words; the engine checks again because
remote callers exist. Both use these functions, so a limit and its message are written once.
Each function returns a message that says what is allowed, or None when the value is fine.
"""

from __future__ import annotations

import unicodedata

from engine.contract.config import GenerationConfig
from engine.contract.protocol import MAX_SEED

# LCM-LoRA works at 4-8 steps and guidance 1-2; fast mode allows up to these unless configured higher.
FAST_MAX_STEPS = 8
FAST_MAX_CFG = 2.0
ADAPTER_WEIGHT_LIMIT = 4.0  # adapter weights lie in [-4, 4]


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def out_of_range(label: str, value: float, low: float, high: float, hint: str = "") -> str | None:
    """``"steps must be between 1 and 60 (got 500)"`` when ``value`` is outside [low, high]."""
    if low <= value <= high:
        return None
    return f"{label} must be between {_num(low)} and {_num(high)}{hint} (got {_num(value)})"


def too_long(gen: GenerationConfig, text: str, label: str = "prompt") -> str | None:
    """A prompt (or negative prompt) longer than ``[generation] max_prompt_chars``."""
    if len(text) <= gen.max_prompt_chars:
        return None
    return f"{label} must be at most {gen.max_prompt_chars} characters (it has {len(text)})"


# Characters that render as nothing: controls, format (zero-width space/joiners, word joiner, BOM),
# separators, combining marks alone, and the letters that are blank by design (Hangul fillers, the
# blank Braille pattern). A prompt made only of them is empty to a person.
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Cs", "Zs", "Zl", "Zp", "Mn", "Me"}
_BLANK_LETTERS = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"}


def has_visible_text(text: str) -> bool:
    """True when ``text`` has at least one character that renders as something."""
    return any(not ch.isspace() and ch not in _BLANK_LETTERS and unicodedata.category(ch) not in _INVISIBLE_CATEGORIES
               for ch in text)


def invisible_problem(text: str, label: str) -> str | None:
    """A text that is empty, or only spaces or invisible characters."""
    if has_visible_text(text):
        return None
    return (f"{label} must contain visible text (it is empty, or only spaces or invisible characters "
            "such as zero-width spaces)")


def prompt_problem(gen: GenerationConfig, prompt: str) -> str | None:
    """An empty, invisible or too long prompt."""
    return invisible_problem(prompt, "prompt") or too_long(gen, prompt)


def steps_range(gen: GenerationConfig, fast: bool) -> tuple[int, int]:
    return gen.min_steps, max(FAST_MAX_STEPS, gen.fast_steps) if fast else gen.max_steps


def cfg_range(gen: GenerationConfig, fast: bool) -> tuple[float, float]:
    return gen.min_cfg, max(FAST_MAX_CFG, gen.fast_cfg) if fast else gen.max_cfg


def steps_problem(gen: GenerationConfig, steps: int, fast: bool = False) -> str | None:
    return out_of_range("steps", steps, *steps_range(gen, fast), " in fast mode" if fast else "")


def cfg_problem(gen: GenerationConfig, cfg: float, fast: bool = False, label: str = "CFG") -> str | None:
    return out_of_range(label, cfg, *cfg_range(gen, fast), " in fast mode" if fast else "")


def count_problem(gen: GenerationConfig, count: int) -> str | None:
    return out_of_range("count", count, 1, gen.max_count)


def seed_problem(seed: int) -> str | None:
    return out_of_range("seed", seed, 0, MAX_SEED)


def size_problem(gen: GenerationConfig, width: int, height: int) -> str | None:
    """Sides multiples of 8 within [min_side, max_side], area within max_pixels."""
    if width % 8 or height % 8:
        return f"size {width}x{height}: width and height must be multiples of 8"
    if not all(gen.min_side <= side <= gen.max_side for side in (width, height)):
        return f"size {width}x{height}: each side must be between {gen.min_side} and {gen.max_side} pixels"
    if width * height > gen.max_pixels:
        return f"size {width}x{height}: at most {gen.max_pixels} pixels (width x height) allowed"
    return None


def weight_problem(label: str, weight: float) -> str | None:
    return out_of_range(label, weight, -ADAPTER_WEIGHT_LIMIT, ADAPTER_WEIGHT_LIMIT)
