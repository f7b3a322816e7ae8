"""The training side of a dataset: items, caption augmentation and a deterministic batch plan.

Reads a kohya-style folder (images with same-stem ``.txt`` captions, optionally in ``N_name``
sub-folders repeated N times, and ``manifest.json`` with ``signature_tags`` and ``keep_tokens``
as written by ``training.data.dataset_folder``). When the manifest lists its images, exactly those are the
training items: any other picture in the folder (an old tag chart, a file copied in by hand) is
not trained. Without a manifest every image in the folder is. Every random choice (batch order, tag shuffle, dropout) is
derived from (seed, epoch) or (seed, step) rather than from a running generator, so a resumed or
interleaved run draws exactly what an uninterrupted one draws, with no RNG state to save.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from training.data.buckets import Bucket, assign_bucket, make_buckets
from engine.contract.training_errors import DatasetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MANIFEST_NAME = "manifest.json"
_REPEATS_DIR = re.compile(r"^(\d+)_")


@dataclass(frozen=True)
class DatasetItem:
    """One training image and its caption split into tags (weights syntax kept)."""

    image_path: Path
    tags: tuple[str, ...]
    size: tuple[int, int]  # (width, height) of the file
    bucket: Bucket


def split_tags(caption: str) -> list[str]:
    """Split a caption at commas outside parentheses/brackets: ``(a, b:1.2)`` stays one tag."""
    tags, depth, current = [], 0, []
    escaped = False
    for ch in caption.replace("\n", ","):
        if escaped:
            current.append(ch)
            escaped = False
            continue
        if ch == "\\":
            escaped = True
            current.append(ch)
        elif ch in "([":
            depth += 1
            current.append(ch)
        elif ch in ")]":
            depth = max(0, depth - 1)
            current.append(ch)
        elif ch == "," and depth == 0:
            tags.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    tags.append("".join(current).strip())
    return [t for t in tags if t]


def normalize_tag(tag: str) -> str:
    """A tag as compared across captions and tagger output (``training.data.captions.normalize_tag``:
    no weight syntax, unescaped, lower case, spaces for underscores except in kaomoji)."""
    from training.data.captions import normalize_tag as caption_normalize

    t = tag.strip()
    while len(t) > 2 and t[0] == "[" and t[-1] == "]":  # [x] de-emphasis
        t = t[1:-1].strip()
    if len(t) > 2 and t[0] == "(" and t[-1] == ")" and not t.endswith("\\)") and ":" not in t:
        t = t[1:-1].strip()  # (x) emphasis without a weight
    return caption_normalize(t)


def augment_caption(
    tags: tuple[str, ...],
    *,
    keep_tokens: int,
    shuffle: bool,
    tag_dropout: float,
    caption_dropout: float,
    rng: random.Random,
) -> str:
    """Caption for one use of an image: keep the first ``keep_tokens`` tags, shuffle/drop the rest.

    Caption dropout returns "" (trains the unconditional case). The same ``rng`` draws are made
    whatever the options, so changing one option does not reshuffle everything else.
    """
    drop_caption = rng.random() < caption_dropout
    fixed, rest = list(tags[:keep_tokens]), list(tags[keep_tokens:])
    order = list(range(len(rest)))
    rng.shuffle(order)
    if shuffle:
        rest = [rest[i] for i in order]
    keep = [rng.random() >= tag_dropout for _ in rest]
    rest = [t for t, k in zip(rest, keep) if k]
    return "" if drop_caption else ", ".join(fixed + rest)


class TrainingDataset:
    """The items of a dataset folder, their buckets and the plan of which batch trains when."""

    def __init__(self, root: Path, *, trigger: str, resolution: int, batch_size: int, seed: int) -> None:
        self.root = Path(root)
        self.trigger = trigger
        self.batch_size = batch_size
        self.seed = seed
        self.manifest = _read_manifest(self.root)
        self.buckets = make_buckets(resolution)
        self.items, self.repeats = self._load_items()
        self._epoch_cache: dict[int, list[list[int]]] = {}

    # ------------------------------------------------------------------ loading
    def _load_items(self) -> tuple[list[DatasetItem], list[int]]:
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder not found: {self.root}")
        paths = self._manifest_images()
        if paths is None:
            paths = sorted(
                p for p in self.root.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
            )
        if not paths:
            raise DatasetError(f"dataset folder {self.root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        items, repeats, any_caption = [], [], False
        trigger_norm = normalize_tag(self.trigger)
        for path in paths:
            caption_path = path.with_suffix(".txt")
            caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else ""
            tags = split_tags(caption)
            any_caption = any_caption or bool(tags)
            if trigger_norm not in {normalize_tag(t) for t in tags}:
                tags.insert(0, self.trigger)  # the trigger always leads (and is kept fixed)
            size = _image_size(path)
            items.append(DatasetItem(path, tuple(tags), size, assign_bucket(*size, self.buckets)))
            match = _REPEATS_DIR.match(path.parent.name) if path.parent != self.root else None
            repeats.append(max(1, int(match.group(1))) if match else 1)
        if not any_caption:
            raise DatasetError(
                f"every caption in {self.root} is empty: caption the images first "
                "(python -m training caption) or write .txt files next to them"
            )
        return items, repeats

    def _manifest_images(self) -> list[Path] | None:
        """The manifest's images (sorted), or None when it lists none; a listed file that is
        missing, or outside the folder, is an error naming it."""
        listed = self.manifest.get("images")
        if not isinstance(listed, list) or not listed:
            return None
        root = self.root.resolve()
        paths = []
        for entry in listed:
            name = entry.get("file") if isinstance(entry, dict) else None
            path = (self.root / name) if isinstance(name, str) and name else None
            if path is None or not path.resolve().is_relative_to(root):
                raise DatasetError(f"{self.root / MANIFEST_NAME}: bad image entry {str(entry)[:100]!r} (expected a file in the folder)")
            if not path.is_file():
                raise DatasetError(
                    f"image {name} listed in {self.root / MANIFEST_NAME} is missing; put it back or re-import the dataset"
                )
            paths.append(path)
        return sorted(paths)

    # ------------------------------------------------------------------ what the captions say
    def keep_tokens(self, override: int | None) -> int:
        """Leading tags kept in place: the option, else the manifest's, else 1 (the trigger)."""
        if override is not None:
            return override
        value = self.manifest.get("keep_tokens")
        return max(1, int(value)) if isinstance(value, int) else 1

    def tag_frequency(self) -> dict[str, int]:
        """Normalized tag -> number of images whose caption has it (for signature tags; the exported
        ``ss_tag_frequency`` keeps tags as written: ``training.learning.kohya_export.kohya_tag_frequency``)."""
        counts: Counter[str] = Counter()
        for item in self.items:
            counts.update({normalize_tag(t) for t in item.tags})
        return dict(counts.most_common())

    def signature_tags(self) -> list[str]:
        """Tags that define the subject: the manifest's, else those in at least half the captions."""
        listed = self.manifest.get("signature_tags")
        trigger = normalize_tag(self.trigger)
        if isinstance(listed, list) and listed:
            return [normalize_tag(str(t)) for t in listed if normalize_tag(str(t)) != trigger]
        half = len(self.items) / 2
        return [t for t, n in self.tag_frequency().items() if n >= half and t != trigger]

    def default_sample_prompts(self, tag_sets: int) -> list[str]:
        """The trigger alone, then trigger + the non-signature tags of evenly spaced images.

        Signature tags are left out on purpose: a sample shows them only if the LoRA learned
        them, which is what checkpoint scoring measures.
        """
        prompts = [self.trigger]
        signature = set(self.signature_tags()) | {normalize_tag(self.trigger)}
        n = len(self.items)
        for i in range(min(tag_sets, n)):
            item = self.items[(i * n) // max(1, tag_sets)]
            extra = [t for t in item.tags if normalize_tag(t) not in signature][:8]
            prompt = ", ".join([self.trigger, *extra])
            if prompt not in prompts:
                prompts.append(prompt)
        return prompts

    # ------------------------------------------------------------------ the batch plan
    @property
    def batches_per_epoch(self) -> int:
        return len(self._epoch_batches(0))

    def micro_batch(self, index: int) -> list[int]:
        """Item indices of the ``index``-th micro-batch of the run (0-based), same bucket each."""
        per_epoch = self.batches_per_epoch
        return self._epoch_batches(index // per_epoch)[index % per_epoch]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_cache:
            rng = random.Random(f"arcae-epoch-{self.seed}-{epoch}")
            by_bucket: dict[Bucket, list[int]] = {}
            for idx, (item, reps) in enumerate(zip(self.items, self.repeats)):
                by_bucket.setdefault(item.bucket, []).extend([idx] * reps)
            batches: list[list[int]] = []
            for bucket in sorted(by_bucket, key=lambda b: (b.width, b.height)):
                indices = by_bucket[bucket]
                rng.shuffle(indices)
                batches.extend(indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size))
            rng.shuffle(batches)
            self._epoch_cache = {epoch: batches}  # only the current epoch is needed
        return self._epoch_cache[epoch]


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None


def load_image_rgb(path: Path) -> Image.Image:
    """An image as RGB, transparency composited on white (as the tagger sees it)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return im.convert("RGB")
