"""Adding images to an existing dataset: only the new files go through intake and count against the caps.

The dataset's images and captions are copied byte for byte (never decoded and re-encoded again),
its manifest entries (tags, captions, edits) are kept, and only the new images are checked,
captioned and appended. The result replaces the old folder with one rename, as ``import_dataset``
does, so a reader sees the old dataset or the new one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from training.data.captions import Caption, CaptionRecipe, parse_caption
from training.data.dataset_folder import (
    MANIFEST, DatasetResult, _caption_for, _commit, _write_chart, _write_kohya_config, build_manifest,
    check_dataset_name, read_manifest, tag_files,
)
from training.data.intake import IntakeLimits, IntakeRefused, IntakeReport, Refusal, StagedImage, stage_attachments
from training.data.tagger import TagResult

if TYPE_CHECKING:  # pragma: no cover
    from training.data.tagger import WDTagger

# What intake names its files; a manifest naming anything else (a path, a link) is not trusted.
_STAGED_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}\.png")


def add_images(
    files: Sequence[tuple[str, bytes]],
    *,
    name: str,
    datasets_dir: Path,
    tagger: "WDTagger",
    recipe: CaptionRecipe,
    limits: IntakeLimits = IntakeLimits(),
) -> DatasetResult:
    """Append the accepted images of ``files`` to dataset ``name``; ``report`` covers the new files only.

    Raises ``IntakeRefused`` (nothing changes) for a refused upload or one without a new image.
    """
    check_dataset_name(name)
    final = Path(datasets_dir) / name
    try:
        manifest = read_manifest(final)
    except ValueError as exc:
        raise IntakeRefused(str(exc)) from None
    old = [e for e in manifest.get("images", []) if _STAGED_NAME.fullmatch(str(e.get("file", "")))
           and (final / e["file"]).is_file() and not (final / e["file"]).is_symlink()]
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=datasets_dir))
    try:
        report = _stage_new(files, staging, old, limits)
        for entry in old:  # byte for byte: no second decode and encode of the old images
            for file in (entry["file"], Path(entry["file"]).with_suffix(".txt").name):
                if (final / file).is_file() and not (final / file).is_symlink():
                    shutil.copyfile(final / file, staging / file)
        results = tag_files([staging / im.file for im in report.images], tagger)
        captions = [_caption_for(im, res, recipe) for im, res in zip(report.images, results)]
        for im, cap in zip(report.images, captions):
            (staging / im.file).with_suffix(".txt").write_text(cap.text + "\n", encoding="utf-8")
        whole = IntakeReport(images=[_staged(e) for e in old] + report.images, refused=report.refused)
        new_manifest = build_manifest(name, whole, [_tag_result(e) for e in old] + results,
                                      [_caption(e) for e in old] + captions, recipe, tagger)
        (staging / MANIFEST).write_text(json.dumps(new_manifest, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
        _write_chart(staging, new_manifest, [_tag_result(e) for e in old] + results)
        _write_kohya_config(staging, final, new_manifest)
        _commit(staging, final, replace=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DatasetResult(path=final, manifest=new_manifest, report=report)


def _stage_new(files: Sequence[tuple[str, bytes]], staging: Path, old: list[dict[str, Any]],
               limits: IntakeLimits) -> IntakeReport:
    """Intake of the new files alone, renamed clear of the dataset's names; duplicates refused."""
    new_dir = staging / ".new"
    new_dir.mkdir()
    staged = stage_attachments(files, new_dir, limits)  # caps count the new files only
    known = {e.get("sha256"): e["file"] for e in old}
    used = {Path(e["file"]).stem.lower() for e in old}
    report = IntakeReport(refused=list(staged.refused))
    for im in staged.images:
        if im.sha256 in known:
            report.refused.append(Refusal(im.source, f"duplicate of {known[im.sha256]} (same pixels)"))
            continue
        stem = unique = Path(im.file).stem
        n = 1
        while unique.lower() in used:
            n += 1
            unique = f"{stem}_{n}"
        used.add(unique.lower())
        os.replace(new_dir / im.file, staging / f"{unique}.png")
        report.images.append(dataclasses.replace(im, file=f"{unique}.png"))
    shutil.rmtree(new_dir)
    if not report.images:
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in report.refused[:10]) or "the upload holds no files"
        raise IntakeRefused(f"no new image was accepted ({reasons})")
    return report


def _staged(entry: dict[str, Any]) -> StagedImage:
    return StagedImage(file=entry["file"], source=str(entry.get("source", entry["file"])),
                       sha256=str(entry.get("sha256", "")), width=int(entry.get("width", 0)),
                       height=int(entry.get("height", 0)))


def _tag_result(entry: dict[str, Any]) -> TagResult:
    tags = entry.get("tags") or {}
    return TagResult(rating=str(entry.get("rating", "general")), ratings=dict(entry.get("ratings") or {}),
                     general=list((tags.get("general") or {}).items()),
                     character=list((tags.get("character") or {}).items()))


def _caption(entry: dict[str, Any]) -> Caption:
    text = str(entry.get("caption", ""))
    return Caption(text=text, tags=parse_caption(text), keep_tokens=int(entry.get("keep_tokens", 0)),
                   source=entry.get("caption_source", "tagger"))
