"""Safe intake of training images: Discord attachments, a .zip archive, or a local folder.

Every image is checked by its content, never its name: it must decode as PNG, JPEG, WebP, GIF or
BMP (other decoders are never tried), stay under a pixel cap before it is decoded
(decompression bombs), decode completely (truncated/corrupt files), be at least ``min_side`` on
each side and not repeat an earlier image's pixels (duplicates). Accepted images get their EXIF
orientation applied, alpha flattened onto white, and are stored as PNG: lossless (no second JPEG
generation loss before training), one format every trainer reads, and re-encoding the decoded
pixels drops whatever else the upload carried (EXIF GPS position, appended payloads).

Two levels of refusal, by design:

- The whole import is refused (``IntakeRefused``; nothing is kept) when the container itself is
  unsafe or over a limit: an upload over ``max_upload_bytes``, a file that is not a readable zip,
  more entries than ``max_files`` allows (read from the end record and the raw directory before
  ``zipfile`` parses it: ``training.data.upload_checks``),
  a zip entry with an absolute path or ``..`` (zip-slip), a symlink entry, an encrypted entry,
  more than ``max_files`` images (or caption files), a declared total over
  ``max_uncompressed_bytes``, an entry whose compression ratio is over ``max_compression_ratio``
  (checked for entries over 64 KiB; smaller ones cannot bomb), or an entry that inflates past its
  declared size or the caps while it is read (sizes are counted, not trusted).
- Single files are refused and reported one by one (``IntakeReport.refused``), the rest accepted:
  non-images, corrupt or truncated images, decompression bombs, too-small images, duplicates,
  symlinks inside a local folder, unreadable caption files.

Intake writes only into the private staging folder it is given; ``training.data.dataset_folder`` captions the
staged images and moves the finished folder into place with one rename, so a half-imported dataset
is never visible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import stat
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from training.data.upload_checks import TruncatedData, ZipRefused, check_png_complete, precheck_zip

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from engine.contract.config import IntakeConfig

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
CAPTION_SUFFIX = ".txt"
RATIO_CHECK_MIN_BYTES = 64 * 1024
MAX_CAPTION_BYTES = 64 * 1024
_CHUNK = 1 << 20
# Files an Arcae dataset folder holds besides its pairs; re-importing a dataset skips them.
DATASET_METADATA_FILES = frozenset({"manifest.json", "tag_frequency.png", "dataset.toml"})


class IntakeRefused(Exception):
    """The whole import is refused; ``reason`` says why and nothing was kept."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ImageRefused(Exception):
    """One image is refused; the message says why."""


@dataclass(frozen=True)
class IntakeLimits:
    """Caps for one import (see ``[intake]`` in config.toml)."""

    max_files: int = 200
    max_image_pixels: int = 40_000_000
    min_side: int = 256
    max_upload_bytes: int = 200 * 1024 * 1024
    max_uncompressed_bytes: int = 1024 * 1024 * 1024
    max_compression_ratio: float = 100.0

    @classmethod
    def from_config(cls, config: "IntakeConfig") -> "IntakeLimits":
        return cls(
            max_files=config.max_files,
            max_image_pixels=config.max_image_pixels,
            min_side=config.min_side,
            max_upload_bytes=config.max_upload_bytes,
            max_uncompressed_bytes=config.max_uncompressed_bytes,
            max_compression_ratio=config.max_compression_ratio,
        )


@dataclass(frozen=True)
class Refusal:
    """A file that was not imported, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class StagedImage:
    """An accepted image, stored as ``file`` (PNG) in the staging folder."""

    file: str
    source: str
    sha256: str
    width: int
    height: int
    caption_override: str | None = None


@dataclass
class IntakeReport:
    """What an import accepted and what it refused."""

    images: list[StagedImage] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)


@dataclass
class _Entry:
    """One file of an upload: its name inside the upload and how to read its bytes."""

    name: str
    read: Callable[[], bytes]


def open_image_checked(data: bytes, limits: IntakeLimits) -> "Image.Image":
    """Decode ``data`` as a training image (RGB, oriented, alpha on white) or raise ``ImageRefused``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    with warnings.catch_warnings():
        # PIL only warns between its own cap and twice it; make that a refusal too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRefused(f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise ImageRefused("not an image: the content is not PNG, JPEG, WebP, GIF or BMP") from None
        except Exception as exc:  # PIL raises many types for malformed headers
            raise ImageRefused(f"corrupt image header ({type(exc).__name__})") from None
        w, h = im.size
        if w * h > limits.max_image_pixels:
            raise ImageRefused(
                f"decompression bomb: the header claims {w}x{h} = {w * h:,} pixels, "
                f"more than the cap of {limits.max_image_pixels:,}"
            )
        if min(w, h) < limits.min_side:
            raise ImageRefused(f"too small: {w}x{h}; images need at least {limits.min_side} px on each side")
        try:
            im.verify()  # chunk CRCs and structure, without decoding pixels
            im = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            im.load()
        except Exception as exc:  # truncated data, bad CRC, zlib errors, ...
            raise ImageRefused(f"corrupt or truncated image ({exc})") from None
        if im.format == "PNG":
            # PIL stops quietly where a PNG's compressed pixel data ends, and fills the rest.
            try:
                check_png_complete(data, w, h)
            except TruncatedData as exc:
                raise ImageRefused(str(exc)) from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # unreadable EXIF: keep the pixels as stored, as most viewers do
        pass
    return flatten_on_white(im)


def flatten_on_white(im: "Image.Image") -> "Image.Image":
    """RGB with any transparency composited onto white."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


def stage_attachments(attachments: Sequence[tuple[str, bytes]], dest: Path, limits: IntakeLimits) -> IntakeReport:
    """Import Discord attachments ``(filename, bytes)``; a ``.zip`` attachment is unpacked."""
    total = sum(len(b) for _, b in attachments)
    if total > limits.max_upload_bytes:
        raise IntakeRefused(f"the upload is {_mib(total)}, more than the limit of {_mib(limits.max_upload_bytes)}")
    archives = [(n, b) for n, b in attachments if n.lower().endswith(".zip")]
    plain = [_Entry(_base_name(n), (lambda b=b: b)) for n, b in attachments if not n.lower().endswith(".zip")]
    if not archives:
        _check_counts([e.name for e in plain], limits)
        return _stage_entries(plain, dest, limits)
    # Zips are read while open; entries of all archives and plain files are staged together.
    opened = [_open_zip(io.BytesIO(b), n, limits) for n, b in archives]
    try:
        entries = list(plain)
        for zf, name in zip(opened, (n for n, _ in archives)):
            entries.extend(_zip_entries(zf, name, limits))
        _check_counts([e.name for e in entries], limits)
        return _stage_entries(entries, dest, limits)
    finally:
        for zf in opened:
            zf.close()


def stage_path(source: Path, dest: Path, limits: IntakeLimits) -> IntakeReport:
    """Import a ``.zip`` file or a local folder."""
    source = Path(source)
    if source.is_dir():
        return stage_folder(source, dest, limits)
    if not source.is_file():
        raise IntakeRefused(f"{source} is neither a folder nor a file")
    size = source.stat().st_size
    if size > limits.max_upload_bytes:
        raise IntakeRefused(f"{source.name} is {_mib(size)}, more than the limit of {_mib(limits.max_upload_bytes)}")
    with open(source, "rb") as f:
        zf = _open_zip(f, source.name, limits)
        with zf:
            entries = _zip_entries(zf, source.name, limits)
            _check_counts([e.name for e in entries], limits)
            return _stage_entries(entries, dest, limits)


def stage_folder(folder: Path, dest: Path, limits: IntakeLimits) -> IntakeReport:
    """Import the files under ``folder`` (recursively; symlinks are refused, never followed)."""
    entries: list[_Entry] = []
    refused: list[Refusal] = []
    total = 0
    for rel, path in _walk(folder, refused):
        total += path.stat().st_size
        if total > limits.max_uncompressed_bytes:
            raise IntakeRefused(
                f"{folder} holds more than {_mib(limits.max_uncompressed_bytes)} of files, over the import cap"
            )
        entries.append(_Entry(rel, path.read_bytes))
        if len(entries) > 2 * limits.max_files:  # stop walking a huge tree early
            _check_counts([e.name for e in entries], limits)
    _check_counts([e.name for e in entries], limits)
    report = _stage_entries(entries, dest, limits)
    report.refused[:0] = refused
    return report


def _walk(folder: Path, refused: list[Refusal]) -> Iterator[tuple[str, Path]]:
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root)
        for d in sorted(dirs):
            if (base / d).is_symlink():
                refused.append(Refusal(_rel(base / d, folder), "symlink: not followed"))
        dirs[:] = sorted(d for d in dirs if not (base / d).is_symlink())
        for name in sorted(files):
            path = base / name
            if path.is_symlink():
                refused.append(Refusal(_rel(path, folder), "symlink: not followed"))
            elif path.is_file():
                yield _rel(path, folder), path


def _rel(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def _open_zip(fileobj, label: str, limits: IntakeLimits) -> zipfile.ZipFile:
    try:
        precheck_zip(fileobj, label, limits.max_files)  # before zipfile builds one object per entry
    except ZipRefused as exc:
        raise IntakeRefused(str(exc)) from None
    try:
        zf = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise IntakeRefused(f"{label} is not a readable zip archive") from None
    try:
        _check_zip(zf, label, limits)
    except BaseException:
        zf.close()
        raise
    return zf


def _check_zip(zf: zipfile.ZipFile, label: str, limits: IntakeLimits) -> None:
    """Refuse hostile or oversized archives from their central directory, before reading data."""
    total = 0
    for info in zf.infolist():
        name = info.filename
        if _is_unsafe_name(name):
            raise IntakeRefused(f"{label}: entry {name!r} has an absolute path or '..' (zip-slip); archive refused")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise IntakeRefused(f"{label}: entry {name!r} is a symlink; archive refused")
        if info.flag_bits & 0x1:
            raise IntakeRefused(f"{label}: entry {name!r} is encrypted; archive refused")
        total += info.file_size
        if info.file_size > limits.max_upload_bytes:
            raise IntakeRefused(
                f"{label}: entry {name!r} is {_mib(info.file_size)}, more than a whole upload may be "
                f"({_mib(limits.max_upload_bytes)}); archive refused"
            )
        if (
            info.file_size > RATIO_CHECK_MIN_BYTES
            and info.file_size / max(1, info.compress_size) > limits.max_compression_ratio
        ):
            ratio = info.file_size / max(1, info.compress_size)
            raise IntakeRefused(
                f"{label}: entry {name!r} expands {ratio:.0f}x (the limit is {limits.max_compression_ratio:g}x): "
                "looks like a zip bomb; archive refused"
            )
    if total > limits.max_uncompressed_bytes:
        raise IntakeRefused(
            f"{label} would expand to {_mib(total)}, more than the limit of {_mib(limits.max_uncompressed_bytes)}; "
            "archive refused"
        )


def _is_unsafe_name(name: str) -> bool:
    if "\x00" in name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return ".." in re.split(r"[\\/]", name)


def _zip_entries(zf: zipfile.ZipFile, label: str, limits: IntakeLimits) -> list[_Entry]:
    """Entries of a checked archive whose reads count bytes against the declared size and caps."""
    budget = {"left": limits.max_uncompressed_bytes}

    def reader(info: zipfile.ZipInfo) -> Callable[[], bytes]:
        def read() -> bytes:
            chunks, size = [], 0
            try:
                with zf.open(info) as f:
                    while chunk := f.read(_CHUNK):
                        size += len(chunk)
                        budget["left"] -= len(chunk)
                        if size > info.file_size or budget["left"] < 0:
                            raise IntakeRefused(
                                f"{label}: entry {info.filename!r} inflates past its declared size or the "
                                "archive's size cap; archive refused"
                            )
                        chunks.append(chunk)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
                # zipfile stops at the declared size and then fails the CRC: a lying or corrupt entry.
                raise IntakeRefused(f"{label}: entry {info.filename!r} is corrupt ({exc}); archive refused") from None
            return b"".join(chunks)

        return read

    return [_Entry(i.filename, reader(i)) for i in zf.infolist() if not i.is_dir()]


def _check_counts(names: Sequence[str], limits: IntakeLimits) -> None:
    captions = sum(1 for n in names if n.lower().endswith(CAPTION_SUFFIX))
    others = len(names) - captions
    if others > limits.max_files or captions > limits.max_files:
        raise IntakeRefused(
            f"too many files: {others} images/other files and {captions} captions; at most "
            f"{limits.max_files} images per import"
        )


def _stage_entries(entries: Sequence[_Entry], dest: Path, limits: IntakeLimits) -> IntakeReport:
    """Check and store each image entry in ``dest``; attach ``.txt`` captions with the same stem."""
    report = IntakeReport()
    captions: dict[str, _Entry] = {}
    images: list[_Entry] = []
    for e in entries:
        if _is_hidden(e.name):
            report.refused.append(Refusal(e.name, "hidden or system metadata file: skipped"))
        elif _base_name(e.name) in DATASET_METADATA_FILES:
            report.refused.append(Refusal(e.name, "an Arcae dataset's own metadata file: skipped"))
        elif e.name.lower().endswith(CAPTION_SUFFIX):
            captions[_stem_key(e.name)] = e
        else:
            images.append(e)
    seen_pixels: dict[str, str] = {}
    used_names: set[str] = set()
    matched: set[str] = set()
    for e in images:
        try:
            staged = _stage_image(e, dest, limits, seen_pixels, used_names)
        except ImageRefused as exc:
            report.refused.append(Refusal(e.name, _with_name_hint(str(exc), e.name)))
            continue
        key = _stem_key(e.name)
        caption = captions.get(key)
        if caption is not None:
            matched.add(key)
            try:
                staged = _with_caption(staged, caption)
            except ImageRefused as exc:
                report.refused.append(Refusal(caption.name, str(exc)))
        report.images.append(staged)
    for key, caption in captions.items():
        if key not in matched:
            report.refused.append(Refusal(caption.name, "caption without an accepted image of the same name: ignored"))
    return report


def _stage_image(
    entry: _Entry, dest: Path, limits: IntakeLimits, seen_pixels: dict[str, str], used_names: set[str]
) -> StagedImage:
    im = open_image_checked(entry.read(), limits)
    pixel_hash = hashlib.sha256(f"{im.size}".encode() + im.tobytes()).hexdigest()
    if pixel_hash in seen_pixels:
        raise ImageRefused(f"duplicate of {seen_pixels[pixel_hash]} (same pixels)")
    seen_pixels[pixel_hash] = entry.name
    stem = _unique_stem(_safe_stem(entry.name), used_names)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    data = buf.getvalue()
    (dest / f"{stem}.png").write_bytes(data)
    return StagedImage(
        file=f"{stem}.png",
        source=entry.name,
        sha256=hashlib.sha256(data).hexdigest(),
        width=im.width,
        height=im.height,
    )


def _with_caption(staged: StagedImage, caption: _Entry) -> StagedImage:
    data = caption.read()
    if len(data) > MAX_CAPTION_BYTES:
        raise ImageRefused(f"caption file over {MAX_CAPTION_BYTES // 1024} KiB: ignored, the tagger captions the image")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ImageRefused("caption file is not UTF-8 text: ignored, the tagger captions the image") from None
    if not text.strip():
        return staged
    return dataclasses.replace(staged, caption_override=text.strip())


def _with_name_hint(reason: str, name: str) -> str:
    suffix = PurePosixPath(name.replace("\\", "/")).suffix.lower()
    if reason.startswith("not an image") and suffix in IMAGE_SUFFIXES:
        return f"{reason} (despite its {suffix} name)"
    return reason


def _is_hidden(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts if p)


def _base_name(name: str) -> str:
    """An attachment's file name without any directory part a client may have sent."""
    return name.replace("\\", "/").rsplit("/", 1)[-1] or "upload"


def _stem_key(name: str) -> str:
    p = PurePosixPath(name.replace("\\", "/"))
    return str(p.with_suffix("")) if p.suffix else str(p)


def _safe_stem(name: str) -> str:
    stem = PurePosixPath(name.replace("\\", "/")).stem
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:60] or "image"


def _unique_stem(stem: str, used: set[str]) -> str:
    candidate, n = stem, 1
    while candidate.lower() in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate.lower())
    return candidate


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
