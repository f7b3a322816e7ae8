"""Tag statistics of a dataset: counts per category, signature tags, a tag-frequency bar chart.

Signature tags are what makes this dataset this dataset; the trainer tags its sample images and
checks how many signature tags come back to judge checkpoints. The rule:

- a tagger tag (general or character; ratings are not tags) that was above threshold in at least
  ``SIGNATURE_SHARE`` (half) of the images, and in at least 2 images when there are 2 or more;
- minus generic tags nearly every anime picture carries (``GENERIC_TAGS``: head counts, framing,
  plain backgrounds, common expressions), which would reward any checkpoint, and minus the
  recipe's blacklist/always-drop tags;
- by descending share (ties by name), at most ``MAX_SIGNATURE_TAGS``.

Tags are compared in the tagger's caption text form (``hikari (arcaea)``, unescaped).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

SIGNATURE_SHARE = 0.5
MAX_SIGNATURE_TAGS = 20
TOP_TAGS = 30
CHART_TAGS = 25

GENERIC_TAGS = frozenset(
    {
        "1girl", "2girls", "3girls", "multiple girls", "1boy", "2boys", "multiple boys", "solo",
        "solo focus", "male focus", "looking at viewer", "simple background", "white background",
        "grey background", "transparent background", "upper body", "full body", "cowboy shot",
        "portrait", "close-up", "standing", "sitting", "smile", "open mouth", "closed mouth",
        "blush", "parted lips", "looking to the side", "looking back", "facing viewer",
    }
)


def tag_counts(per_image: Iterable[Sequence[str]]) -> Counter[str]:
    """How many images carry each tag (a tag counts once per image)."""
    counts: Counter[str] = Counter()
    for tags in per_image:
        counts.update(set(tags))
    return counts


def top_tags(counts: Counter[str], n: int = TOP_TAGS) -> list[tuple[str, int]]:
    """The ``n`` most frequent tags, by descending count then name."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def signature_tags(counts: Counter[str], n_images: int, *, excluded: Iterable[str] = ()) -> dict[str, float]:
    """Signature tags with their share of images (see module doc for the rule)."""
    if n_images <= 0:
        return {}
    skip = GENERIC_TAGS | {t.lower() for t in excluded}
    min_count = 2 if n_images >= 2 else 1
    picked = [
        (tag, count / n_images)
        for tag, count in counts.items()
        if count >= min_count and count / n_images >= SIGNATURE_SHARE and tag.lower() not in skip
    ]
    picked.sort(key=lambda ts: (-ts[1], ts[0]))
    return {tag: round(share, 4) for tag, share in picked[:MAX_SIGNATURE_TAGS]}


def draw_tag_chart(
    general: Counter[str], character: Counter[str], n_images: int, path: Path, *, title: str = "", n: int = CHART_TAGS
) -> Path:
    """A horizontal bar chart PNG of the most frequent tags (character tags in their own colour)."""
    from PIL import Image, ImageDraw, ImageFont

    rows = sorted(
        [(t, c, "character") for t, c in character.items()] + [(t, c, "general") for t, c in general.items()],
        key=lambda r: (-r[1], r[0]),
    )[:n]
    font = ImageFont.load_default(size=14)
    label_w = max([int(font.getlength(r[0])) for r in rows] + [80]) + 16
    bar_h, gap, top, width = 20, 6, 44, 820
    height = top + max(1, len(rows)) * (bar_h + gap) + 30
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((12, 10), title or f"Tag frequency ({n_images} images)", fill=(20, 20, 20), font=font)
    scale = (width - label_w - 70) / max(1, n_images)
    colours = {"general": (70, 130, 200), "character": (220, 110, 60)}
    for i, (tag, count, category) in enumerate(rows):
        y = top + i * (bar_h + gap)
        draw.text((8, y + 2), tag, fill=(30, 30, 30), font=font)
        x0 = label_w
        draw.rectangle([x0, y, x0 + max(2, int(count * scale)), y + bar_h], fill=colours[category])
        draw.text((x0 + int(count * scale) + 6, y + 2), f"{count}", fill=(60, 60, 60), font=font)
    legend_y = height - 24
    for j, (category, colour) in enumerate(colours.items()):
        x = 12 + j * 130
        draw.rectangle([x, legend_y + 3, x + 12, legend_y + 15], fill=colour)
        draw.text((x + 18, legend_y), category, fill=(30, 30, 30), font=font)
    img.save(path, format="PNG")
    return path
