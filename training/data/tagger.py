"""The WD tagger v3 (SmilingWolf's ONNX models) on onnxruntime: tags and ratings for images.

Captions for training come from ``WDTagger.predict``; the engine rates generated images for the
bot's content rules with ``WDTagger.rate``. The contract with the model is SmilingWolf's own
(his ``wd-tagger`` Space), exactly:

- the input name and square size are read from the model (448 for the v3 taggers);
- alpha is composited onto white, the image padded to a centred white square, resized bicubic
  to the model size, turned RGB -> BGR, fed as float32 0-255 NHWC with a batch axis;
- the outputs are already probabilities (no sigmoid here);
- ``selected_tags.csv`` has columns tag_id,name,category,count: category 9 are ratings (the
  argmax is the image's rating), 0 general tags, 4 character tags.

Tag names come out as caption text, unescaped: underscores become spaces except in kaomoji
(``^_^`` stays). Escaping parentheses is the caption writer's job (``training.data.captions``).
"""

from __future__ import annotations

import csv
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from engine.contract.errors import ModelMissing

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from engine.contract.config import TaggerConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
RATING_CATEGORY, GENERAL_CATEGORY, CHARACTER_CATEGORY = 9, 0, 4
RATINGS = ("general", "sensitive", "questionable", "explicit")
CHARACTER_MCUT_FLOOR = 0.15

# The kaomoji whose underscores are part of the face; the list the reference taggers use
# (SmilingWolf's wd-tagger Space, kohya's tag_images_by_wd14_tagger).
KAOMOJIS = frozenset(
    {
        "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<",
        "3_3", "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
    }
)


class TaggerError(Exception):
    """The tagger cannot run: unusable model files or images it cannot read."""


class TaggerModelMissing(TaggerError, ModelMissing):
    """The tagger's model files are neither in the hub cache nor downloadable; says how to get them."""


def tag_text(name: str) -> str:
    """A csv tag name as caption text: underscores become spaces, except in kaomoji."""
    return name if name in KAOMOJIS else name.replace("_", " ")


def mcut_threshold(probs: Sequence[float] | np.ndarray) -> float:
    """Maximum Cut Thresholding: the midpoint of the largest gap between sorted probabilities.

    Largeron et al. 2012, as in SmilingWolf's tagger: tags strictly above it are kept.
    """
    p = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    if p.size < 2:
        return 0.0 if p.size == 0 else float(p[0]) / 2.0
    gaps = p[:-1] - p[1:]
    t = int(gaps.argmax())
    return float((p[t] + p[t + 1]) / 2.0)


@dataclass(frozen=True)
class TagResult:
    """One image's tags: rating (argmax) with all rating scores, and tags above threshold.

    ``general`` and ``character`` are (caption text, probability) sorted by descending score.
    """

    rating: str
    ratings: dict[str, float]
    general: list[tuple[str, float]] = field(default_factory=list)
    character: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class TagLabels:
    """``selected_tags.csv``: caption-text names and the column indices of each category."""

    names: list[str]
    rating: np.ndarray
    general: np.ndarray
    character: np.ndarray


def load_labels(path: Path) -> TagLabels:
    """Read ``selected_tags.csv`` (tag_id,name,category,count)."""
    names: list[str] = []
    cats: list[int] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"name", "category"} <= set(reader.fieldnames):
                raise TaggerError(f"{path}: expected columns tag_id,name,category,count, got {reader.fieldnames}")
            for row in reader:
                names.append(tag_text(row["name"]))
                cats.append(int(row["category"]))
    except (OSError, ValueError, csv.Error) as exc:
        raise TaggerError(f"cannot read tag list {path}: {exc}") from None
    c = np.asarray(cats)
    labels = TagLabels(
        names=names,
        rating=np.flatnonzero(c == RATING_CATEGORY),
        general=np.flatnonzero(c == GENERAL_CATEGORY),
        character=np.flatnonzero(c == CHARACTER_CATEGORY),
    )
    if labels.rating.size == 0:
        raise TaggerError(f"{path}: no rating tags (category 9); is this a WD tagger tag list?")
    return labels


def resolve_model_files(source: str, *, revision: str = "", cache_dir: str | None = None) -> tuple[Path, Path]:
    """``(model.onnx, selected_tags.csv)`` from a local folder, a .onnx path or a hub repo id."""
    local = Path(source).expanduser()
    if local.is_dir() or local.suffix == ".onnx" or source.startswith((".", "/", "~")):
        folder = local if local.suffix != ".onnx" else local.parent
        model = local if local.suffix == ".onnx" else folder / MODEL_FILE
        tags = folder / TAGS_FILE
        missing = [str(p) for p in (model, tags) if not p.is_file()]
        if missing:
            raise TaggerModelMissing(
                f"tagger folder {folder} lacks {', '.join(missing)}; it needs {MODEL_FILE} and {TAGS_FILE} "
                "(e.g. from https://huggingface.co/SmilingWolf/wd-swinv2-tagger-v3)"
            )
        return model, tags
    return _download(source, revision=revision, cache_dir=cache_dir)


def _download(repo_id: str, *, revision: str, cache_dir: str | None) -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download

    paths = []
    for filename in (MODEL_FILE, TAGS_FILE):
        try:
            paths.append(Path(hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache_dir)))
        except Exception as exc:  # offline, unknown repo, network, disk: all mean "not available"
            raise TaggerModelMissing(
                f"WD tagger {repo_id!r} ({filename}) is not in the Hugging Face cache and could not be "
                f"downloaded ({type(exc).__name__}). With network access run: "
                f"hf download {repo_id} {MODEL_FILE} {TAGS_FILE}  (or unset HF_HUB_OFFLINE), "
                f"or set [tagger] model to a local folder holding {MODEL_FILE} and {TAGS_FILE}."
            ) from None
    return paths[0], paths[1]


def preprocess(image: "Image.Image", size: int) -> np.ndarray:
    """One image as the WD v3 input row: ``[size, size, 3]`` float32 BGR 0-255 (see module doc)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        rgb = canvas.convert("RGB")
    else:
        rgb = image.convert("RGB")
    w, h = rgb.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - w) // 2, (side - h) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(arr[:, :, ::-1])


class WDTagger:
    """A loaded WD v3 tagger. ``predict`` and ``rate`` may be called from any one thread at a time."""

    def __init__(
        self,
        session,
        labels: TagLabels,
        *,
        source: str = "",
        batch_size: int = 8,
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        mcut: bool = False,
    ) -> None:
        inp = session.get_inputs()[0]
        shape = inp.shape
        if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] != shape[2] or shape[3] != 3:
            raise TaggerError(f"tagger {source}: expected an NHWC [batch, S, S, 3] input, got {shape}")
        n_out = session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(labels.names):
            raise TaggerError(f"tagger {source}: model has {n_out} outputs but {TAGS_FILE} lists {len(labels.names)} tags")
        self.session = session
        self.labels = labels
        self.source = source
        self.input_name: str = inp.name
        self.output_name: str = session.get_outputs()[0].name
        self.input_size: int = int(shape[1])
        self.batch_size = max(1, int(batch_size))
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self.mcut = mcut
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        source: str | Path = "SmilingWolf/wd-swinv2-tagger-v3",
        *,
        revision: str = "",
        batch_size: int = 8,
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        mcut: bool = False,
        providers: Sequence[str] | None = None,
        cache_dir: str | None = None,
    ) -> "WDTagger":
        """Load a tagger from a hub repo id (cached download) or a local folder."""
        import onnxruntime as ort

        model_path, tags_path = resolve_model_files(str(source), revision=revision, cache_dir=cache_dir)
        labels = load_labels(tags_path)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # onnxruntime's provider warnings are noise here
        try:
            session = ort.InferenceSession(str(model_path), sess_options=opts, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise TaggerError(f"cannot load tagger model {model_path}: {exc}") from None
        log.info("WD tagger %s loaded (%s, input %s)", source, session.get_providers()[0], session.get_inputs()[0].shape)
        return cls(
            session,
            labels,
            source=str(source),
            batch_size=batch_size,
            general_threshold=general_threshold,
            character_threshold=character_threshold,
            mcut=mcut,
        )

    @classmethod
    def from_config(cls, config: "TaggerConfig", *, base_dir: Path | None = None) -> "WDTagger":
        """Load the tagger ``[tagger]`` describes; a relative local folder resolves against ``base_dir``."""
        source = config.model
        if base_dir is not None and not Path(source).is_absolute():
            candidate = base_dir / source
            if candidate.is_dir() or source.startswith("."):
                source = str(candidate.resolve())
        return cls.load(
            source,
            revision=config.revision,
            batch_size=config.batch_size,
            general_threshold=config.general_threshold,
            character_threshold=config.character_threshold,
            mcut=config.mcut,
        )

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def probabilities(self, images: Sequence["Image.Image"]) -> np.ndarray:
        """Raw model outputs ``[len(images), n_tags]`` (probabilities), run in batches."""
        rows: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([preprocess(im, self.input_size) for im in images[start : start + self.batch_size]])
            with self._lock:
                (out,) = self.session.run([self.output_name], {self.input_name: batch})
            rows.append(np.asarray(out, dtype=np.float32))
        if not rows:
            return np.zeros((0, len(self.labels.names)), dtype=np.float32)
        return np.concatenate(rows)

    def predict(
        self,
        images: Sequence["Image.Image"],
        *,
        general_threshold: float | None = None,
        character_threshold: float | None = None,
        mcut: bool | None = None,
    ) -> list[TagResult]:
        """Tags and rating for each image; thresholds default to the tagger's own."""
        probs = self.probabilities(images)
        return [
            self.decode(
                row,
                general_threshold=self.general_threshold if general_threshold is None else general_threshold,
                character_threshold=self.character_threshold if character_threshold is None else character_threshold,
                mcut=self.mcut if mcut is None else mcut,
            )
            for row in probs
        ]

    def decode(self, row: np.ndarray, *, general_threshold: float, character_threshold: float, mcut: bool) -> TagResult:
        """Turn one row of probabilities into a ``TagResult``."""
        names = self.labels.names
        ratings = {names[i]: float(row[i]) for i in self.labels.rating}
        rating = names[self.labels.rating[int(np.argmax(row[self.labels.rating]))]]
        gen_p = row[self.labels.general]
        chr_p = row[self.labels.character]
        if mcut:
            general_threshold = mcut_threshold(gen_p)
            character_threshold = max(CHARACTER_MCUT_FLOOR, mcut_threshold(chr_p))
        return TagResult(
            rating=rating,
            ratings=ratings,
            general=_above(names, self.labels.general, gen_p, general_threshold),
            character=_above(names, self.labels.character, chr_p, character_threshold),
        )

    def rate(self, image: "Image.Image") -> tuple[str, dict[str, float]]:
        """The image's rating (general/sensitive/questionable/explicit) and every rating's score."""
        return self.rate_many([image])[0]

    def rate_many(self, images: Sequence["Image.Image"]) -> list[tuple[str, dict[str, float]]]:
        """``rate`` for several images, run through the model ``batch_size`` at a time."""
        names = self.labels.names
        rated = []
        for row in self.probabilities(images):
            scores = {names[i]: float(row[i]) for i in self.labels.rating}
            rated.append((max(scores, key=scores.__getitem__), scores))
        return rated


def _above(names: list[str], idx: np.ndarray, probs: np.ndarray, threshold: float) -> list[tuple[str, float]]:
    """(name, score) strictly above ``threshold``, by descending score (csv order breaks ties)."""
    picked = [(names[i], float(p)) for i, p in zip(idx, probs) if p > threshold]
    return sorted(picked, key=lambda t: -t[1])
