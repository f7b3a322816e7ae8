"""Which adapter mix a distilled few-step adapter was made for: one canonical form, torch-free.

A distilled fast adapter (``python -m training distill-fast``) is bound to the base + adapter mix
its teacher used. The binding travels in the safetensors header (``arcae.distilled_for``) and
the sidecar (``distilled_for``) as a JSON list of ``[name, weight]`` pairs; fast mode compares a
request's mix with it through ``mix_key``. Weights are compared to two decimals (what a user
types), order does not matter, few-step adapters never count as part of a mix.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

HEADER_KEY = "arcae.distilled_for"
SIDECAR_KEY = "distilled_for"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class MixError(ValueError):
    """A mix text or a stored binding that is not a list of adapter names with weights."""


def normalise_mix(pairs: Iterable[Any]) -> tuple[tuple[str, float], ...]:
    """``(name, weight)`` pairs (or objects with ``.name``/``.weight``) sorted by name, weights rounded to 0.01."""
    out: dict[str, float] = {}
    for item in pairs:
        name, weight = (item.name, item.weight) if hasattr(item, "name") else item
        if not isinstance(name, str) or not _NAME.match(name):
            raise MixError(f"adapter name {name!r} is not allowed (letters, digits, _ . - ; up to 100 characters)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -4.0 <= float(weight) <= 4.0:
            raise MixError(f"weight {weight!r} of adapter {name!r} must be a number from -4 to 4")
        if name in out:
            raise MixError(f"adapter {name!r} is named twice in the mix; name each adapter once")
        out[name] = round(float(weight), 2)
    return tuple(sorted(out.items()))


def mix_key(pairs: Iterable[Any]) -> str:
    """The canonical JSON text of a mix (what the header and sidecar store)."""
    return json.dumps([[n, w] for n, w in normalise_mix(pairs)])


def parse_mix_text(text: str) -> tuple[tuple[str, float], ...]:
    """``"style_a:0.8,char_b"`` (weight 1 when left out; empty text = the base alone) as a mix."""
    pairs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise MixError(f"weight {weight!r} of adapter {name.strip()!r} is not a number (write NAME:WEIGHT, e.g. style:0.8)") from None
        pairs.append((name.strip(), value))
    return normalise_mix(pairs)


def parse_stored(value: Any) -> tuple[tuple[str, float], ...] | None:
    """A stored binding (JSON text or list of pairs) as a mix; None when it is not a valid one."""
    try:
        data = json.loads(value) if isinstance(value, str) else value
        if not isinstance(data, list) or not all(isinstance(p, list) and len(p) == 2 for p in data):
            return None
        return normalise_mix((p[0], p[1]) for p in data)
    except (MixError, ValueError, TypeError):
        return None
