"""Dataset folders: intake -> tagger -> captions -> a kohya-style folder, made visible atomically.

A dataset is one folder ``<datasets_dir>/<name>/`` holding, flat:

- ``NAME.png`` + ``NAME.txt`` pairs: the image and its caption line (kohya sd-scripts reads
  this with ``--dataset_config dataset.toml`` or as a fine-tuning folder; OneTrainer takes the
  folder as a concept with "from text file per sample" captions);
- ``manifest.json``: see ``build_manifest`` (hashes, per-image tags with scores, rating,
  keep_tokens, kind, trigger, tag statistics, signature tags); its ``images`` are exactly the
  images a training run takes (``training.data.training_set``);
- ``dataset.toml``: a kohya dataset config pointing at the folder, with keep_tokens.

Reports for admins live beside the dataset, never in it, since kohya, OneTrainer and any tool that
takes "every image in the folder" would train them: ``<datasets_dir>/.reports/NAME/tag_frequency.png``
(a bar chart of the most frequent tags; ``chart_path``; the manifest's ``chart`` is that path
relative to the dataset folder).

The folder is built in a hidden staging folder beside it (``.staging-NAME-*``) and renamed into
place only once everything is written and synced: a reader sees no dataset or a whole one, never
a half-imported one. Names starting with "." in ``datasets_dir`` are staging or trash: skip them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from engine.fsutil import fsync_dir
from training.data.captions import Caption, CaptionRecipe, build_caption, caption_from_override, normalize_tag
from training.data.intake import (
    DATASET_METADATA_FILES,
    IMAGE_SUFFIXES,
    ImageRefused,
    IntakeLimits,
    IntakeRefused,
    IntakeReport,
    Refusal,
    StagedImage,
    open_image_checked,
    stage_attachments,
    stage_path,
)
from training.data.tag_stats import draw_tag_chart, signature_tags, tag_counts, top_tags
from training.data.tagger import TagResult

if TYPE_CHECKING:  # pragma: no cover
    from engine.contract.config import ArcaeConfig
    from training.data.tagger import WDTagger

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHART = "tag_frequency.png"
KOHYA_CONFIG = "dataset.toml"
assert {MANIFEST, CHART, KOHYA_CONFIG} == DATASET_METADATA_FILES  # intake skips these on re-import
MANIFEST_VERSION = 1
REPORTS_DIR = ".reports"  # in datasets_dir; a "." name is never a dataset (skipped, and not a valid name)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class DatasetResult:
    """A finished dataset: its folder, its manifest, and the intake report (refusals)."""

    path: Path
    manifest: dict[str, Any]
    report: IntakeReport


def check_dataset_name(name: str) -> str:
    """``name`` if it is a safe folder name, else ``ValueError`` saying what is allowed."""
    if not NAME_RE.fullmatch(name) or name.endswith("."):
        raise ValueError(
            f"invalid dataset name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def import_dataset(
    source: Path | Sequence[tuple[str, bytes]],
    *,
    name: str,
    datasets_dir: Path,
    tagger: "WDTagger",
    recipe: CaptionRecipe,
    limits: IntakeLimits = IntakeLimits(),
    replace: bool = False,
) -> DatasetResult:
    """Import a zip/folder path or Discord attachments into a new dataset; atomic (see module doc).

    Raises ``IntakeRefused`` (nothing kept) for a refused upload, an existing name without
    ``replace``, or an upload in which no image was accepted.
    """
    check_dataset_name(name)
    datasets_dir = Path(datasets_dir)
    datasets_dir.mkdir(parents=True, exist_ok=True)
    final = datasets_dir / name
    if final.exists() and not replace:
        raise IntakeRefused(f"a dataset named {name!r} already exists; choose another name or replace it")
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=datasets_dir))
    try:
        if isinstance(source, (str, os.PathLike)):
            report = stage_path(Path(source), staging, limits)
        else:
            report = stage_attachments(source, staging, limits)
        if not report.images:
            reasons = "; ".join(f"{r.name}: {r.reason}" for r in report.refused[:10]) or "the upload holds no files"
            raise IntakeRefused(f"no image was accepted ({reasons})")
        results = tag_files([staging / im.file for im in report.images], tagger)
        captions = [_caption_for(im, res, recipe) for im, res in zip(report.images, results)]
        for im, cap in zip(report.images, captions):
            (staging / im.file).with_suffix(".txt").write_text(cap.text + "\n", encoding="utf-8")
        manifest = build_manifest(name, report, results, captions, recipe, tagger)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _write_kohya_config(staging, final, manifest)
        _commit(staging, final, replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_chart(final, manifest, results)
    log.info("dataset %s: %d images accepted, %d refused", name, len(report.images), len(report.refused))
    return DatasetResult(path=final, manifest=manifest, report=report)


def import_with_config(
    config: "ArcaeConfig",
    source: Path | Sequence[tuple[str, bytes]],
    *,
    name: str,
    kind: str = "character",
    trigger: str = "",
    tagger: "WDTagger | None" = None,
    replace: bool = False,
) -> DatasetResult:
    """``import_dataset`` with ``[tagger]``, ``[intake]`` and ``storage.datasets_dir`` from the config.

    Pass the engine's already-loaded ``tagger`` to avoid loading a second copy.
    """
    from training.data.tagger import WDTagger

    if tagger is None:
        tagger = WDTagger.from_config(config.tagger, base_dir=config.base_dir)
    return import_dataset(
        source,
        name=name,
        datasets_dir=config.path(config.storage.datasets_dir),
        tagger=tagger,
        recipe=CaptionRecipe.from_config(config.tagger, kind, trigger=trigger),  # type: ignore[arg-type]
        limits=IntakeLimits.from_config(config.intake),
        replace=replace,
    )


def tag_files(paths: Sequence[Path], tagger: "WDTagger") -> list[TagResult]:
    """Tag image files in the tagger's batch size (only one batch of images is open at a time)."""
    from PIL import Image

    results: list[TagResult] = []
    for start in range(0, len(paths), tagger.batch_size):
        images = []
        for p in paths[start : start + tagger.batch_size]:
            with Image.open(p) as im:
                im.load()
                images.append(im.copy())
        results.extend(tagger.predict(images))
    return results


def _caption_for(image: StagedImage, result: TagResult, recipe: CaptionRecipe) -> Caption:
    if image.caption_override is not None:
        return caption_from_override(image.caption_override, recipe)
    return build_caption(result, recipe)


def build_manifest(
    name: str,
    report: IntakeReport,
    results: Sequence[TagResult],
    captions: Sequence[Caption],
    recipe: CaptionRecipe,
    tagger: "WDTagger",
) -> dict[str, Any]:
    """The dataset's ``manifest.json`` content."""
    stats = dataset_stats(results, captions, recipe)
    images = []
    for im, res, cap in zip(report.images, results, captions):
        images.append(
            {
                "file": im.file,
                "caption_file": Path(im.file).with_suffix(".txt").name,
                "source": im.source,
                "sha256": im.sha256,
                "width": im.width,
                "height": im.height,
                "rating": res.rating,
                "ratings": _rounded(res.ratings),
                "tags": {"general": _rounded(dict(res.general)), "character": _rounded(dict(res.character))},
                "caption": cap.text,
                "caption_source": cap.source,
                "keep_tokens": cap.keep_tokens,
            }
        )
    return {
        "version": MANIFEST_VERSION,
        "name": name,
        "kind": recipe.kind,
        "trigger": recipe.trigger,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # The fixed leading tags every caption shares (the per-image value may be larger).
        "keep_tokens": min(c.keep_tokens for c in captions),
        "tagger": {
            "model": tagger.source,
            "general_threshold": tagger.general_threshold,
            "character_threshold": tagger.character_threshold,
            "mcut": tagger.mcut,
        },
        "recipe": {
            "max_tags": recipe.tag_limit,
            "character_tag_weight": recipe.character_tag_weight,
            "blacklist": list(recipe.blacklist),
            "always_drop": list(recipe.always_drop),
        },
        "chart": f"../{REPORTS_DIR}/{name}/{CHART}",
        "images": images,
        "refused": [{"name": r.name, "reason": r.reason} for r in report.refused],
        "stats": stats,
        # Read by the trainer (training.data.training_set) to judge checkpoints; rule in training.data.tag_stats.
        "signature_tags": list(stats["signature_tag_shares"]),
    }


def dataset_stats(results: Sequence[TagResult], captions: Sequence[Caption], recipe: CaptionRecipe) -> dict[str, Any]:
    """Counts per category, tags per caption, and signature tags (rule in ``training.data.tag_stats``)."""
    general = tag_counts([t for t, _ in r.general] for r in results)
    character = tag_counts([t for t, _ in r.character] for r in results)
    ratings = tag_counts([r.rating] for r in results)
    n = len(results)
    signature = signature_tags(general + character, n, excluded=[normalize_tag(t) for t in (*recipe.blacklist, *recipe.always_drop)])
    per_caption = [len(c.tags) for c in captions]
    return {
        "images": n,
        "tags_per_caption": {
            "mean": round(sum(per_caption) / max(1, n), 2),
            "min": min(per_caption, default=0),
            "max": max(per_caption, default=0),
        },
        # [tag, count] lists, as JSON reads them back
        "top_tags": {
            "general": [list(tc) for tc in top_tags(general)],
            "character": [list(tc) for tc in top_tags(character)],
            "rating": [list(tc) for tc in top_tags(ratings)],
        },
        "signature_tag_shares": signature,
    }


def read_manifest(dataset_dir: Path) -> dict[str, Any]:
    """A dataset's manifest (``ValueError`` if missing or unreadable)."""
    path = Path(dataset_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable dataset manifest ({exc})") from None


def list_datasets(datasets_dir: Path) -> list[str]:
    """Names of the finished datasets in ``datasets_dir`` (staging and trash folders skipped)."""
    root = Path(datasets_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file())


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in scores.items()}


def chart_path(dataset_dir: Path) -> Path:
    """Where the tag-frequency chart of the dataset in ``dataset_dir`` is (beside it, not in it)."""
    dataset_dir = Path(dataset_dir)
    return dataset_dir.parent / REPORTS_DIR / dataset_dir.name / CHART


def _write_chart(dataset_dir: Path, manifest: dict[str, Any], results: Sequence[TagResult]) -> None:
    """Draw the chart into the reports folder, atomically; a failure costs the chart, not the dataset."""
    general = tag_counts([t for t, _ in r.general] for r in results)
    character = tag_counts([t for t, _ in r.character] for r in results)
    title = f"{manifest['name']}: tag frequency ({len(results)} images)"
    path = chart_path(dataset_dir)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_tag_chart(general, character, len(results), tmp, title=title)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("dataset %s: tag chart not written (%s)", manifest["name"], exc)


def _write_kohya_config(staging: Path, final: Path, manifest: dict[str, Any]) -> None:
    """kohya sd-scripts ``--dataset_config``: the folder, .txt captions, the shared keep_tokens."""
    text = (
        "# kohya sd-scripts dataset config (train_network.py --dataset_config this file)\n"
        "[general]\n"
        'caption_extension = ".txt"\n'
        "shuffle_caption = true\n"
        f"keep_tokens = {manifest['keep_tokens']}\n\n"
        "[[datasets]]\n\n"
        "  [[datasets.subsets]]\n"
        f"  image_dir = {json.dumps(str(final.resolve()))}\n"
        "  num_repeats = 1\n"
    )
    (staging / KOHYA_CONFIG).write_text(text, encoding="utf-8")


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def _commit(staging: Path, final: Path, *, replace: bool) -> None:
    """Rename the finished staging folder to its final name (replacing an old one if allowed)."""
    _fsync_tree(staging)
    os.chmod(staging, 0o755)  # mkdtemp makes it private (0700); a dataset is shared data
    if final.exists():
        if not replace:
            raise IntakeRefused(f"a dataset named {final.name!r} already exists; choose another name or replace it")
        trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)
        try:
            os.rename(staging, final)
        except BaseException:
            os.rename(trash, final)  # put the old dataset back: it stays live until the new one is
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, final)
    fsync_dir(final.parent)


@dataclass
class CaptionSummary:
    """What ``caption_folder`` wrote: captions and tagger results by image, refusals, skips."""

    captions: dict[str, Caption]
    results: dict[str, TagResult]
    refused: list[Refusal]
    skipped: list[str]


def caption_folder(
    folder: Path,
    tagger: "WDTagger",
    recipe: CaptionRecipe,
    *,
    skip_existing: bool = False,
    limits: IntakeLimits = IntakeLimits(min_side=1),
) -> CaptionSummary:
    """Write ``NAME.txt`` beside each image in ``folder`` (not recursive); each file atomically."""
    folder = Path(folder)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    summary = CaptionSummary(captions={}, results={}, refused=[], skipped=[])
    todo = []
    for p in paths:
        if p.is_symlink():
            summary.refused.append(Refusal(p.name, "symlink: not followed"))
        elif skip_existing and p.with_suffix(".txt").exists():
            summary.skipped.append(p.name)
        else:
            todo.append(p)
    for start in range(0, len(todo), tagger.batch_size):
        batch: list[tuple[Path, Any]] = []
        for p in todo[start : start + tagger.batch_size]:
            try:
                batch.append((p, open_image_checked(p.read_bytes(), limits)))
            except ImageRefused as exc:
                summary.refused.append(Refusal(p.name, str(exc)))
        for (p, _), result in zip(batch, tagger.predict([im for _, im in batch])):
            caption = build_caption(result, recipe)
            _write_text_atomic(p.with_suffix(".txt"), caption.text + "\n")
            summary.captions[p.name] = caption
            summary.results[p.name] = result
    return summary


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
