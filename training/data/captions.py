"""Caption recipes: from tagger output (or an uploaded ``.txt``) to a kohya-style caption line.

A caption is tags joined by ", ". Two recipes, after the workflow Arcae follows:

- ``character``: trigger word, then the character tags (optionally weighted, e.g.
  ``(hikari \\(arcaea\\):1.2)``), then general tags by descending confidence, at most
  ``max_tags`` of them (default 40). ``keep_tokens`` = trigger + character tags: the leading
  tags a trainer keeps in place when it shuffles the rest.
- ``style``: trigger word, then at most ``max_tags`` general tags (default 8) by confidence.
  Character tags are left out: a style adapter must not learn who is drawn.
  ``keep_tokens`` = 1 with a trigger, else 0.

Tags in ``blacklist`` or ``always_drop`` never reach a caption (both matched loosely: case,
underscores vs spaces, escaped parentheses do not matter); a tag appears at most once.
Parentheses are escaped (``\\(`` ``\\)``) because they are prompt-weighting syntax.

An override (a ``.txt`` uploaded beside an image) replaces the tagger's tags for that image: its
tags are kept as written and in order (only de-duplicated, the blacklists do not apply: the
uploader chose them); the trigger is put first if missing, and ``keep_tokens`` is 1 with a
trigger, else 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from training.data.tagger import KAOMOJIS, TagResult

if TYPE_CHECKING:  # pragma: no cover
    from engine.contract.config import TaggerConfig

CaptionKind = Literal["character", "style"]
KINDS: tuple[str, ...] = ("character", "style")
DEFAULT_MAX_TAGS = {"character": 40, "style": 8}

_WEIGHTED = re.compile(r"^\((.*):\s*[-+]?[0-9]*\.?[0-9]+\)$")


class CaptionError(ValueError):
    """A recipe setting is not allowed (bad kind, a trigger containing a comma, ...)."""


def escape_tag(tag: str) -> str:
    """Escape prompt-weighting parentheses: ``hikari (arcaea)`` -> ``hikari \\(arcaea\\)``."""
    return tag.replace("(", "\\(").replace(")", "\\)")


def normalize_tag(tag: str) -> str:
    """A tag's identity for matching: no weight, unescaped, lower case, spaces for underscores."""
    t = tag.strip()
    m = _WEIGHTED.fullmatch(t)
    if m:
        t = m.group(1).strip()
    t = t.replace("\\(", "(").replace("\\)", ")").lower()
    if t not in KAOMOJIS:
        t = t.replace("_", " ")
    return " ".join(t.split())


def parse_caption(text: str) -> list[str]:
    """The tags of a caption text (commas or new lines separate them)."""
    return [t.strip() for t in re.split(r"[,\n\r]", text) if t.strip()]


@dataclass(frozen=True)
class CaptionRecipe:
    """How captions are built for one dataset."""

    kind: CaptionKind = "character"
    trigger: str = ""
    max_tags: int | None = None  # None: 40 for character, 8 for style
    character_tag_weight: float = 1.0  # 1.0 writes character tags unweighted
    blacklist: tuple[str, ...] = ()
    always_drop: tuple[str, ...] = ()
    _dropped: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CaptionError(f"caption kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if "," in self.trigger or "\n" in self.trigger:
            raise CaptionError(f"a trigger word cannot contain a comma or a new line: {self.trigger!r}")
        if self.max_tags is not None and self.max_tags < 0:
            raise CaptionError(f"max_tags must be 0 or more, not {self.max_tags}")
        if not 0.1 <= self.character_tag_weight <= 3.0:
            raise CaptionError(f"character_tag_weight must be between 0.1 and 3.0, not {self.character_tag_weight}")
        object.__setattr__(self, "trigger", " ".join(self.trigger.split()))
        dropped = {normalize_tag(t) for t in (*self.blacklist, *self.always_drop)}
        object.__setattr__(self, "_dropped", frozenset(dropped))

    @classmethod
    def from_config(
        cls, config: "TaggerConfig", kind: CaptionKind, *, trigger: str = "", max_tags: int | None = None
    ) -> "CaptionRecipe":
        """The recipe ``[tagger]`` describes for ``kind``; explicit ``max_tags`` wins."""
        if max_tags is None:
            max_tags = config.character_max_tags if kind == "character" else config.style_max_tags
        return cls(
            kind=kind,
            trigger=trigger,
            max_tags=max_tags,
            character_tag_weight=config.character_tag_weight,
            blacklist=tuple(config.blacklist),
            always_drop=tuple(config.always_drop),
        )

    @property
    def tag_limit(self) -> int:
        return DEFAULT_MAX_TAGS[self.kind] if self.max_tags is None else self.max_tags

    def is_dropped(self, tag: str) -> bool:
        return normalize_tag(tag) in self._dropped


@dataclass(frozen=True)
class Caption:
    """A caption line, its tags as written, and how many leading tags stay fixed."""

    text: str
    tags: list[str]
    keep_tokens: int
    source: Literal["tagger", "override"] = "tagger"


def build_caption(result: TagResult, recipe: CaptionRecipe) -> Caption:
    """The caption for one image from its tagger result (see module doc for the recipes)."""
    seen: set[str] = set()
    tags: list[str] = []
    if recipe.trigger:
        tags.append(recipe.trigger)
        seen.add(normalize_tag(recipe.trigger))
    if recipe.kind == "character":
        for name, _score in sorted(result.character, key=lambda t: -t[1]):
            key = normalize_tag(name)
            if key in seen or recipe.is_dropped(name):
                continue
            seen.add(key)
            tags.append(_character_token(name, recipe.character_tag_weight))
    keep = len(tags)
    added = 0
    for name, _score in sorted(result.general, key=lambda t: -t[1]):
        if added >= recipe.tag_limit:
            break
        key = normalize_tag(name)
        if key in seen or recipe.is_dropped(name):
            continue
        seen.add(key)
        tags.append(escape_tag(name))
        added += 1
    return Caption(text=", ".join(tags), tags=tags, keep_tokens=keep, source="tagger")


def caption_from_override(text: str, recipe: CaptionRecipe) -> Caption:
    """The caption for an image whose uploaded ``.txt`` replaces the tagger (see module doc)."""
    tags: list[str] = []
    seen: set[str] = set()
    trigger_key = normalize_tag(recipe.trigger) if recipe.trigger else None
    for tag in parse_caption(text):
        key = normalize_tag(tag)
        if key in seen or key == trigger_key:
            continue
        seen.add(key)
        tags.append(tag)
    if recipe.trigger:
        tags.insert(0, recipe.trigger)
    return Caption(text=", ".join(tags), tags=tags, keep_tokens=1 if recipe.trigger else 0, source="override")


def _character_token(name: str, weight: float) -> str:
    escaped = escape_tag(name)
    if abs(weight - 1.0) < 1e-9:
        return escaped
    return f"({escaped}:{weight:g})"
