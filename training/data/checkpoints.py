"""Checkpoints chosen by measurement, plus the run's pictures (sample grid, loss plot).

Scoring. For every checkpoint, its fixed-seed samples (one per sample prompt; the prompts leave
the signature tags out, see ``TrainingDataset.default_sample_prompts``) are tagged by the WD
tagger, and two numbers are computed:

- recall: the mean over samples of the fraction of the dataset's signature tags the tagger
  finds in the sample (score >= its threshold). It rises as the LoRA learns the subject.
- collapse: the mean pairwise cosine similarity of the samples' tag vectors, built from every
  tag the tagger reported *except* the signature tags and the trigger (those should be shared
  by every sample; the rest should follow the different prompts). It rises as the LoRA overfits
  and every prompt gives the same picture. Without a tagger, ``pixel_collapse`` gives the same
  measure on 32x32 greyscale thumbnails (centred per image).

score = recall - COLLAPSE_WEIGHT * max(0, collapse - COLLAPSE_FREE). Some similarity between
samples is normal (same subject, same seeds), so only collapse above COLLAPSE_FREE costs. The
recommendation is the highest score; within SCORE_TIE of the best, the earliest step wins (an
earlier checkpoint that is as good is less overfit).
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from engine.contract.training_errors import DiskSpaceLow, RunNotFound, TrainingError
from training.data.run_record import list_checkpoints, read_run, update_run, write_atomic
from training.data.training_set import normalize_tag

COLLAPSE_WEIGHT = 1.0
COLLAPSE_FREE = 0.5
SCORE_TIE = 0.02
LOSS_FILE = "loss.csv"
LOSS_PLOT = "loss.png"

# A tagger as scoring needs it: images -> per image {tag: score} of the tags it reports.
TagFn = Callable[[list[Image.Image]], list[dict[str, float]]]


@dataclass(frozen=True)
class CheckpointScore:
    """One checkpoint's measurement."""

    step: int
    recall: float
    collapse: float
    score: float
    samples: int


# ---------------------------------------------------------------------- scoring maths
def signature_recall(tag_sets: Sequence[dict[str, float]], signature: Sequence[str]) -> float:
    """Mean fraction of ``signature`` tags present in each sample's tags (normalized names)."""
    wanted = {normalize_tag(t) for t in signature}
    if not wanted or not tag_sets:
        return 0.0
    found = [len(wanted & {normalize_tag(t) for t in tags}) / len(wanted) for tags in tag_sets]
    return sum(found) / len(found)


def _cosine(a: dict[str, float], b: dict[str, float]) -> float:
    dot = sum(v * b.get(k, 0.0) for k, v in a.items())
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0  # two empty tag sets are alike
    return dot / (na * nb)


def tag_collapse(tag_sets: Sequence[dict[str, float]], exclude: Sequence[str]) -> float:
    """Mean pairwise cosine similarity of the samples' tag vectors without ``exclude`` tags."""
    skip = {normalize_tag(t) for t in exclude}
    vectors = [{normalize_tag(k): v for k, v in tags.items() if normalize_tag(k) not in skip} for tags in tag_sets]
    pairs = [(i, j) for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
    if not pairs:
        return 0.0
    return sum(_cosine(vectors[i], vectors[j]) for i, j in pairs) / len(pairs)


def pixel_collapse(images: Sequence[Image.Image]) -> float:
    """Mean pairwise cosine similarity of centred 32x32 greyscale thumbnails (tagger-free)."""
    import numpy as np

    vecs = []
    for im in images:
        v = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
        v = v - v.mean()
        vecs.append(v)
    sims = []
    for i in range(len(vecs)):
        for j in range(i + 1, len(vecs)):
            na, nb = np.linalg.norm(vecs[i]), np.linalg.norm(vecs[j])
            sims.append(1.0 if na == 0 or nb == 0 else float(vecs[i] @ vecs[j] / (na * nb)))
    return float(np.mean(sims)) if sims else 0.0


def combined_score(recall: float, collapse: float) -> float:
    """The documented formula (module docstring)."""
    return recall - COLLAPSE_WEIGHT * max(0.0, collapse - COLLAPSE_FREE)


def recommend(scores: Sequence[CheckpointScore]) -> CheckpointScore:
    """The best checkpoint: highest score; within ``SCORE_TIE`` of it, the earliest step."""
    if not scores:
        raise TrainingError("no scored checkpoints to choose from")
    best = max(s.score for s in scores)
    return min((s for s in scores if s.score >= best - SCORE_TIE), key=lambda s: s.step)


# ---------------------------------------------------------------------- scoring a run
def tagger_tag_fn(tagger: Any) -> TagFn:
    """Adapt a ``training.data.tagger.WDTagger`` (``predict`` -> TagResult list) to ``TagFn``."""

    def tag(images: list[Image.Image]) -> list[dict[str, float]]:
        return [dict(list(r.general) + list(r.character)) for r in tagger.predict(images)]

    return tag


def sample_images(checkpoint: Path) -> list[Image.Image]:
    folder = Path(checkpoint) / "samples"
    paths = sorted(folder.glob("*.png")) if folder.is_dir() else []
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return images


def score_run(run_dir: Path, tag_fn: TagFn | None) -> list[CheckpointScore]:
    """Score every checkpoint with samples, record scores + recommendation in run.json."""
    record = read_run(run_dir)
    signature = record.get("signature_tags") or []
    exclude = list(signature) + [record.get("trigger", "")]
    scores = []
    for step, folder in list_checkpoints(run_dir):
        images = sample_images(folder)
        if not images:
            continue
        if tag_fn is None:
            recall, collapse = 0.0, pixel_collapse(images)
        else:
            tags = tag_fn(images)
            recall, collapse = signature_recall(tags, signature), tag_collapse(tags, exclude)
        scores.append(CheckpointScore(step, round(recall, 4), round(collapse, 4), round(combined_score(recall, collapse), 4), len(images)))
    if scores:
        update_run(run_dir, scores=[asdict(s) for s in scores], recommended_checkpoint=recommend(scores).step,
                   scored_with="tagger" if tag_fn else "pixels")
    keep = (record.get("options") or {}).get("keep_checkpoints")
    if keep:
        prune_checkpoints(run_dir, int(keep))
    return scores


def prune_checkpoints(run_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` checkpoints and the recommended and chosen ones; return
    the steps deleted. The newest stays, so a resume always finds its state."""
    try:
        record = read_run(run_dir)
    except RunNotFound:
        record = {}
    found = list_checkpoints(run_dir)
    spared = {s for s, _ in found[-keep:]} if keep > 0 else set()
    spared |= {record.get("recommended_checkpoint"), record.get("chosen_checkpoint")}
    deleted = []
    for step, folder in found:
        if step not in spared:
            # Renamed away first: list_checkpoints never sees a half-deleted checkpoint.
            trash = folder.with_name(f".{folder.name}.{os.getpid()}.deleted")
            shutil.rmtree(trash, ignore_errors=True)  # left by a crash mid-delete
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
            deleted.append(step)
    return deleted


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def check_free_disk(where: Path, min_free_mb: int, when: str, extra_bytes: int = 0) -> None:
    """``DiskSpaceLow`` unless ``where``'s disk has ``min_free_mb`` MiB free beyond ``extra_bytes``."""
    if min_free_mb <= 0 and extra_bytes <= 0:
        return
    free = shutil.disk_usage(where).free
    needed = min_free_mb * 2**20 + extra_bytes
    if free < needed:
        raise DiskSpaceLow(
            f"not enough free disk {when}: {free / 2**20:,.0f} MiB free where training runs are written, "
            f"{needed / 2**20:,.0f} MiB needed ([training] min_free_disk_mb = {min_free_mb} plus the checkpoint); "
            "earlier checkpoints are kept"
        )


def choose_checkpoint(run_dir: Path, step: int) -> None:
    """Record the admin's choice (must be an existing checkpoint) in run.json."""
    steps = [s for s, _ in list_checkpoints(run_dir)]
    if step not in steps:
        raise RunNotFound(f"run {Path(run_dir).name} has no checkpoint at step {step}; checkpoints: {steps or 'none'}")
    update_run(run_dir, chosen_checkpoint=step)


def format_table(scores: Sequence[CheckpointScore], recommended: int | None, chosen: int | None = None) -> str:
    """A fixed-width table of the scores, marking the recommended (*) and chosen (>) rows."""
    lines = [f"{'':2}{'step':>8} {'recall':>7} {'collapse':>9} {'score':>7} {'samples':>7}"]
    for s in scores:
        mark = (">" if s.step == chosen else " ") + ("*" if s.step == recommended else " ")
        lines.append(f"{mark}{s.step:>8} {s.recall:>7.3f} {s.collapse:>9.3f} {s.score:>7.3f} {s.samples:>7}")
    lines.append(f"score = recall - {COLLAPSE_WEIGHT} * max(0, collapse - {COLLAPSE_FREE}); * recommended, > chosen")
    return "\n".join(lines)


# ---------------------------------------------------------------------- pictures
def make_grid(images: Sequence[Image.Image], captions: Sequence[str] = (), columns: int | None = None) -> Image.Image:
    """Images side by side (wrapping after ``columns``) with a caption strip under each."""
    if not images:
        raise ValueError("no images for a grid")
    cols = columns or min(4, len(images))
    rows = math.ceil(len(images) / cols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    strip = 14
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        grid.paste(im.convert("RGB"), (x, y))
        text = captions[i] if i < len(captions) else ""
        max_chars = max(4, w // 6)
        draw.text((x + 2, y + h + 1), text if len(text) <= max_chars else text[: max_chars - 1] + "…", fill="black", font=font)
    return grid


def append_loss(run_dir: Path, step: int, loss: float, lr: float) -> None:
    """Add one row to RUN_DIR/loss.csv (created with a header)."""
    path = Path(run_dir) / LOSS_FILE
    new = not path.exists()
    with open(path, "a", encoding="utf-8", newline="") as fh:
        if new:
            fh.write("step,loss,lr\n")
        fh.write(f"{step},{loss!r},{lr!r}\n")


def read_loss(run_dir: Path) -> list[tuple[int, float, float]]:
    path = Path(run_dir) / LOSS_FILE
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(fh)]


def truncate_loss(run_dir: Path, step: int) -> None:
    """Keep only rows up to ``step`` (a resumed run rewrites what came after)."""
    rows = [r for r in read_loss(run_dir) if r[0] <= step]
    buf = io.StringIO()
    buf.write("step,loss,lr\n")
    for s, loss, lr in rows:
        buf.write(f"{s},{loss!r},{lr!r}\n")
    write_atomic(Path(run_dir) / LOSS_FILE, lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8"))


def plot_loss(run_dir: Path, size: tuple[int, int] = (640, 320)) -> Path | None:
    """Draw loss.csv as RUN_DIR/loss.png: raw loss in grey, a moving average in blue."""
    rows = read_loss(run_dir)
    if not rows:
        return None
    width, height = size
    margin = 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps = [r[0] for r in rows]
    losses = [r[1] for r in rows if math.isfinite(r[1])] or [0.0]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-9
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step: int, loss: float) -> tuple[float, float]:
        x = margin + (step - s0) / (s1 - s0) * (width - 2 * margin)
        y = height - margin - (loss - lo) / (hi - lo) * (height - 2 * margin)
        return x, y

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    points = [xy(s, l) for s, l, _ in rows if math.isfinite(l)]
    if len(points) > 1:
        draw.line(points, fill=(170, 170, 170), width=1)
    window = max(1, len(rows) // 20)
    smooth = []
    for i in range(len(rows)):
        chunk = [r[1] for r in rows[max(0, i - window + 1) : i + 1] if math.isfinite(r[1])]
        if chunk:
            smooth.append(xy(rows[i][0], sum(chunk) / len(chunk)))
    if len(smooth) > 1:
        draw.line(smooth, fill=(30, 90, 200), width=2)
    font = ImageFont.load_default()
    draw.text((margin, 8), f"loss  steps {s0}-{steps[-1]}  last {rows[-1][1]:.4f}", fill="black", font=font)
    draw.text((4, margin - 12), f"{hi:.4f}", fill="black", font=font)
    draw.text((4, height - margin), f"{lo:.4f}", fill="black", font=font)
    path = Path(run_dir) / LOSS_PLOT
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
    return path
