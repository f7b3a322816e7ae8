"""Safe intake: every refusal with a crafted file, and nothing partial ever left behind."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.captions import CaptionRecipe
from training.data.dataset_folder import import_dataset
from training.data.intake import IntakeLimits, IntakeRefused, stage_attachments, stage_path
from training.data.tagger import WDTagger
from tests.training.tiny_tagger import make_tiny_tagger

LIMITS = IntakeLimits(
    max_files=5,
    max_image_pixels=1_000_000,
    min_side=32,
    max_upload_bytes=6 * 1024 * 1024,
    max_uncompressed_bytes=2 * 1024 * 1024,
    max_compression_ratio=50.0,
)
RECIPE = CaptionRecipe(kind="character", trigger="hkr")


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return WDTagger.load(make_tiny_tagger(tmp_path_factory.mktemp("tagger") / "wd"))


def png(rgb=(255, 0, 0), size=(48, 48), mode="RGB", fmt="PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, rgb).save(buf, format=fmt, **save)
    return buf.getvalue()


def noise_png(size=(64, 64), seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(path: Path, entries, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in entries:
            if isinstance(name, zipfile.ZipInfo):
                zf.writestr(name, data)
            else:
                zf.writestr(name, data)
    return path


def bomb_png(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def run_import(source, tmp_path, tagger, limits=LIMITS, name="ds"):
    datasets = tmp_path / "datasets"
    return datasets, import_dataset(source, name=name, datasets_dir=datasets, tagger=tagger, recipe=RECIPE, limits=limits)


def refused_whole(source, tmp_path, tagger, match, limits=LIMITS):
    datasets = tmp_path / "datasets"
    with pytest.raises(IntakeRefused, match=match):
        import_dataset(source, name="ds", datasets_dir=datasets, tagger=tagger, recipe=RECIPE, limits=limits)
    assert list(datasets.iterdir()) == []  # no dataset, no staging folder, nothing partial


GOOD = [("a.png", png((255, 0, 0))), ("b.png", png((0, 0, 255)))]


def test_zip_slip_and_absolute_paths_refuse_the_archive(tmp_path, tagger):
    for i, bad in enumerate(["../evil.png", "imgs/../../evil.png", "..\\evil.png", "/etc/evil.png", "C:/evil.png"]):
        z = make_zip(tmp_path / f"slip{i}.zip", GOOD + [(bad, png())])
        refused_whole(z, tmp_path, tagger, "zip-slip")


def test_symlink_entry_refuses_the_archive(tmp_path, tagger):
    link = zipfile.ZipInfo("link.png")
    link.external_attr = (0o120777 << 16)  # S_IFLNK
    z = make_zip(tmp_path / "link.zip", GOOD + [(link, b"/etc/passwd")])
    refused_whole(z, tmp_path, tagger, "symlink")


def test_zip_bomb_by_ratio_and_by_total_size(tmp_path, tagger):
    ratio = make_zip(tmp_path / "ratio.zip", GOOD + [("zeros.png", b"\x00" * (1024 * 1024))])
    refused_whole(ratio, tmp_path, tagger, r"expands \d+x .*zip bomb")
    chunk = os.urandom(800 * 1024)  # incompressible: ratio ~1, but 3 x 800 KiB > the 2 MiB cap
    total = make_zip(tmp_path / "total.zip", GOOD + [(f"r{i}.bin", chunk) for i in range(3)], zipfile.ZIP_STORED)
    refused_whole(total, tmp_path, tagger, "would expand to")


def test_entry_inflating_past_its_declared_size_is_refused(tmp_path, tagger):
    z = make_zip(tmp_path / "liar.zip", GOOD + [("big.png", b"\x00" * 200_000)])
    data = bytearray(z.read_bytes())
    central = data.rfind(b"PK\x01\x02")  # the last entry's central directory record
    struct.pack_into("<I", data, central + 24, 1000)  # declare 1000 bytes uncompressed
    z.write_bytes(bytes(data))
    refused_whole(z, tmp_path, tagger, "corrupt|inflates")


def test_too_many_files_and_too_large_uploads(tmp_path, tagger):
    many = [(f"{i}.png", png((i * 40, 0, 0))) for i in range(6)]
    refused_whole(make_zip(tmp_path / "many.zip", many), tmp_path, tagger, "too many files")
    refused_whole(many, tmp_path, tagger, "too many files")
    small = IntakeLimits(**{**LIMITS.__dict__, "max_upload_bytes": 200})
    refused_whole(GOOD, tmp_path, tagger, "more than the limit", limits=small)
    refused_whole(make_zip(tmp_path / "big.zip", GOOD), tmp_path, tagger, "more than the limit", limits=small)
    (tmp_path / "fake.zip").write_bytes(b"this is not a zip")
    refused_whole(tmp_path / "fake.zip", tmp_path, tagger, "not a readable zip")
    refused_whole([("only.txt", b"no images")], tmp_path, tagger, "no image was accepted")


def test_bad_images_are_refused_one_by_one_with_reasons(tmp_path, tagger):
    truncated = noise_png()
    flipped = bytearray(noise_png(seed=1))
    flipped[len(flipped) // 2] ^= 0xFF  # one bad byte inside IDAT: the chunk CRC no longer matches
    entries = GOOD + [
        ("flipped.png", bytes(flipped)),
        ("evil.png", b"#!/bin/sh\necho pwned\n"),
        ("notes.pdf", b"%PDF-1.4 not an image"),
        ("cut.png", truncated[: len(truncated) // 2]),
        ("tiny.png", png(size=(16, 40))),
        ("bomb.png", bomb_png(5_000, 5_000)),  # under PIL's own guard, over our cap
        ("copy.png", GOOD[0][1]),
        ("copy2.bmp", png((255, 0, 0), fmt="BMP")),  # same pixels, other encoding
    ]
    limits = IntakeLimits(**{**LIMITS.__dict__, "max_files": 20})
    datasets, result = run_import(entries, tmp_path, tagger, limits=limits)
    reasons = {r.name: r.reason for r in result.report.refused}
    assert reasons["evil.png"].startswith("not an image") and "despite its .png name" in reasons["evil.png"]
    assert reasons["notes.pdf"].startswith("not an image")
    assert "truncated" in reasons["cut.png"] or "corrupt" in reasons["cut.png"]
    assert reasons["flipped.png"].startswith("corrupt")
    assert reasons["tiny.png"].startswith("too small: 16x40")
    assert reasons["bomb.png"].startswith("decompression bomb") and "25,000,000" in reasons["bomb.png"]
    assert reasons["copy.png"] == "duplicate of a.png (same pixels)"
    assert reasons["copy2.bmp"] == "duplicate of a.png (same pixels)"
    files = sorted(p.name for p in (datasets / "ds").iterdir())
    assert files == ["a.png", "a.txt", "b.png", "b.txt", "dataset.toml", "manifest.json"]  # the chart is a report
    assert sorted(p.name for p in datasets.iterdir()) == [".reports", "ds"]


def test_pil_own_bomb_guard_is_a_refusal_too(tmp_path):
    huge = IntakeLimits(**{**LIMITS.__dict__, "max_image_pixels": 10**12})  # our cap off: PIL's still holds
    report = stage_attachments([("bomb.png", bomb_png(100_000, 100_000))] + GOOD, tmp_path, huge)
    assert report.refused[0].reason.startswith("decompression bomb")
    assert len(report.images) == 2


def test_exif_orientation_alpha_and_png_storage(tmp_path):
    # stored 64x48: top half red, bottom half blue; EXIF 6 = rotate 90 degrees clockwise to display
    im = Image.new("RGB", (64, 48), (255, 0, 0))
    im.paste(Image.new("RGB", (64, 24), (0, 0, 255)), (0, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (20, 40), (0, 255, 0, 255)), (20, 0))
    abuf = io.BytesIO()
    rgba.save(abuf, format="PNG")
    report = stage_attachments([("photo.jpg", buf.getvalue()), ("alpha.png", abuf.getvalue())], tmp_path, LIMITS)
    assert report.refused == []
    photo = Image.open(tmp_path / "photo.png")
    assert photo.format == "PNG" and photo.size == (48, 64)  # rotated upright
    left, right = photo.getpixel((4, 32)), photo.getpixel((44, 32))
    assert right[0] > 200 and right[2] < 60  # the red top half is now on the right
    assert left[2] > 200 and left[0] < 60
    assert "exif" not in photo.info
    flat = Image.open(tmp_path / "alpha.png")
    assert flat.mode == "RGB" and flat.getpixel((2, 2)) == (255, 255, 255) and flat.getpixel((30, 2)) == (0, 255, 0)


def test_folder_symlinks_are_refused_and_not_followed(tmp_path, tagger):
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "a.png").write_bytes(GOOD[0][1])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png((0, 255, 0)))
    os.symlink(outside / "secret.png", folder / "link.png")
    os.symlink(outside, folder / "linkdir")
    datasets, result = run_import(folder, tmp_path, tagger)
    reasons = {r.name: r.reason for r in result.report.refused}
    assert reasons == {"link.png": "symlink: not followed", "linkdir": "symlink: not followed"}
    assert [im["source"] for im in result.manifest["images"]] == ["a.png"]


def test_caption_txt_beside_an_image_overrides_the_tagger(tmp_path, tagger):
    z = make_zip(
        tmp_path / "captions.zip",
        [
            ("set/a.png", GOOD[0][1]),
            ("set/a.txt", "my caption, blue_hair\n".encode()),
            ("set/b.png", GOOD[1][1]),
            ("set/orphan.txt", b"x"),
            ("__MACOSX/set/._a.png", b"junk"),
        ],
    )
    datasets, result = run_import(z, tmp_path, tagger)
    images = {im["file"]: im for im in result.manifest["images"]}
    assert images["a.png"]["caption"] == "hkr, my caption, blue_hair"
    assert images["a.png"]["caption_source"] == "override"
    assert images["a.png"]["tags"]["character"] == {"hikari (arcaea)": pytest.approx(0.8808, abs=1e-3)}
    assert images["b.png"]["caption_source"] == "tagger" and "tairitsu" in images["b.png"]["caption"]
    assert (datasets / "ds" / "a.txt").read_text() == "hkr, my caption, blue_hair\n"
    reasons = {r.name: r.reason for r in result.report.refused}
    assert "without an accepted image" in reasons["set/orphan.txt"]
    assert "metadata" in reasons["__MACOSX/set/._a.png"]


def test_a_failure_while_captioning_leaves_nothing(tmp_path, tagger):
    class BrokenTagger(WDTagger):
        def predict(self, images, **kw):
            raise RuntimeError("onnxruntime died")

    broken = BrokenTagger(tagger.session, tagger.labels, source="broken")
    datasets = tmp_path / "datasets"
    with pytest.raises(RuntimeError):
        import_dataset(GOOD, name="ds", datasets_dir=datasets, tagger=broken, recipe=RECIPE, limits=LIMITS)
    assert list(datasets.iterdir()) == []


def test_a_zip_attachment_is_unpacked_beside_plain_attachments(tmp_path):
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("x/c.png", png((0, 255, 0)))
        zf.writestr("x/c.txt", b"green thing")
    report = stage_attachments(GOOD + [("more.zip", zbuf.getvalue())], tmp_path, LIMITS)
    assert [(i.file, i.caption_override) for i in report.images] == [
        ("a.png", None),
        ("b.png", None),
        ("c.png", "green thing"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]


def test_stage_path_reads_a_zip_from_disk(tmp_path):
    z = make_zip(tmp_path / "ok.zip", GOOD)
    out = tmp_path / "out"
    out.mkdir()
    report = stage_path(z, out, LIMITS)
    assert [i.file for i in report.images] == ["a.png", "b.png"]
    assert all(len(i.sha256) == 64 for i in report.images)
