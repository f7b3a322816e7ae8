"""Hostile uploads and training input, each with a crafted file: what a bad actor sends is refused.

Covers the "Training and uploads" items of issue #11: a zip with a huge entry count, a PNG whose
pixel data ends early, names with a trailing newline, a pickle planted in a checkpoint,
add-images counting only the new images, training option caps, checkpoint pruning and the
free-disk check.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.intake import IntakeLimits, IntakeRefused, open_image_checked, stage_attachments

LIMITS = IntakeLimits(max_files=10, max_image_pixels=2_000_000, min_side=32)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def short_png(width: int = 1000, height: int = 1000, rows: int = 10) -> bytes:
    """A valid-looking RGB PNG whose compressed pixel data holds only ``rows`` rows."""
    raw = b"".join(b"\x00" + bytes([120, 60, 200]) * width for _ in range(rows))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def noise_png(size=(64, 64), seed=0, **save) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return buf.getvalue()


def many_entries_zip(count: int) -> bytes:
    """A zip of ``count`` empty stored entries: only a central directory and its end record
    (zipfile reads nothing else when it opens an archive)."""
    entries = []
    for i in range(count):
        name = f"{i:07d}".encode()
        entries.append(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0,
                                   len(name), 0, 0, 0, 0, 0, 0) + name)
    directory = b"".join(entries)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                      len(directory), 0, 0)
    return directory + end


# ---------------------------------------------------------------------- zip entry count

def test_a_zip_with_300k_entries_is_refused_from_its_end_record(tmp_path):
    data = many_entries_zip(300_000)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(IntakeRefused, match=r"holds [0-9,]+ entries; at most 46 \(10 images"):
            stage_attachments([("many.zip", data)], tmp_path, LIMITS)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # zipfile's own parse of this directory took 254 MiB and 2.8 s (without tracemalloc).
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB used before the refusal"
    assert elapsed < 1.0, elapsed


def test_a_zip_end_record_that_understates_its_entries_is_refused_too(tmp_path):
    data = bytearray(many_entries_zip(3_000))
    end = len(data) - 22
    data[end + 8 : end + 12] = struct.pack("<HH", 3, 3)  # claims 3 entries, holds 3,000
    tracemalloc.start()
    try:
        with pytest.raises(IntakeRefused, match="more than 46 entries"):
            stage_attachments([("liar.zip", bytes(data))], tmp_path, LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, f"{peak / 2**20:.1f} MiB used before the refusal"


# ---------------------------------------------------------------------- truncated images

def test_a_png_whose_pixel_data_ends_early_is_refused():
    with pytest.raises(Exception, match="truncated image: its pixel data ends after about 10 of 1000 rows"):
        open_image_checked(short_png(), IntakeLimits())


def test_truncated_pngs_are_refused_one_by_one_and_whole_ones_kept(tmp_path):
    whole = noise_png(seed=1)
    interlaced = noise_png(seed=2, optimize=False)
    im = Image.open(io.BytesIO(noise_png(seed=3)))
    buf = io.BytesIO()
    im.save(buf, format="PNG", interlace=1)  # Adam7: its own row arithmetic
    report = stage_attachments([("whole.png", whole), ("short.png", short_png(200, 200, 3)),
                                ("interlaced.png", buf.getvalue()), ("plain.png", interlaced)], tmp_path, LIMITS)
    assert sorted(i.source for i in report.images) == ["interlaced.png", "plain.png", "whole.png"]
    assert [(r.name, r.reason.split(":")[0]) for r in report.refused] == [("short.png", "truncated image")]


# ---------------------------------------------------------------------- names

def test_names_with_a_trailing_newline_are_refused():
    from engine.generation.lora_files import adapter_name_problem
    from training.data.dataset_folder import check_dataset_name
    from engine.contract.training_errors import LifecycleError
    from training.data.lifecycle import check_name

    with pytest.raises(ValueError, match="invalid dataset name"):
        check_dataset_name("hikari\n")
    with pytest.raises(LifecycleError, match="invalid adapter name"):
        check_name("hikari\n")
    assert adapter_name_problem("hikari\n") is not None
    assert adapter_name_problem("hikari") is None


# ---------------------------------------------------------------------- add-images

@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    from training.data.tagger import WDTagger
    from tests.training.tiny_tagger import make_tiny_tagger

    return WDTagger.load(make_tiny_tagger(tmp_path_factory.mktemp("tagger") / "wd"))


def test_add_images_counts_only_the_new_images_and_keeps_the_old_files(tmp_path, tagger):
    from training.data.captions import CaptionRecipe
    from training.data.dataset_folder import import_dataset
    from training.data.dataset_add import add_images

    limits = IntakeLimits(max_files=3, min_side=32)
    recipe = CaptionRecipe(kind="character", trigger="hkr")
    first = [(f"a{i}.png", noise_png(seed=10 + i)) for i in range(3)]
    result = import_dataset(first, name="set", datasets_dir=tmp_path, tagger=tagger, recipe=recipe, limits=limits)
    folder = result.path
    (folder / "a0.txt").write_text("hkr, my edited caption\n", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in folder.glob("a*.png")}

    new = [("a0.png", noise_png(seed=20)), ("b.png", noise_png(seed=21)), ("dup.png", noise_png(seed=11))]
    added = add_images(new, name="set", datasets_dir=tmp_path, tagger=tagger, recipe=recipe, limits=limits)
    assert [im.source for im in added.report.images] == ["a0.png", "b.png"]
    assert [(r.name, r.reason) for r in added.report.refused] == [("dup.png", "duplicate of a1.png (same pixels)")]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [e["file"] for e in manifest["images"]] == ["a0.png", "a1.png", "a2.png", "a0_2.png", "b.png"]
    for name, data in before.items():  # the old images are not decoded and encoded again
        assert (folder / name).read_bytes() == data
    assert (folder / "a0.txt").read_text() == "hkr, my edited caption\n"
    with pytest.raises(IntakeRefused, match="too many files"):  # the caps still hold for the new files
        add_images([(f"c{i}.png", noise_png(seed=30 + i)) for i in range(4)], name="set", datasets_dir=tmp_path,
                   tagger=tagger, recipe=recipe, limits=limits)
    assert len(json.loads((folder / "manifest.json").read_text())["images"]) == 5


# ---------------------------------------------------------------------- training options

def training_section(**values):
    """A ``[training]`` section as ``load_config`` parses it."""
    from engine.contract.config import TrainingConfig

    return TrainingConfig(**values)


def test_training_options_over_the_configured_caps_are_refused_with_what_is_allowed(tmp_path):
    from engine.contract.training_errors import InvalidTrainingOptions
    from engine.contract.training_options import from_config

    caps = training_section(max_steps=3000, max_rank=64, max_resolution=1536, max_sample_steps=40, min_save_every=100)
    base = {"dataset": tmp_path, "kind": "style", "trigger": "x"}
    assert from_config(caps, **base, steps=3000, rank=64, resolution=1536, sample_steps=40, save_every=100)
    with pytest.raises(InvalidTrainingOptions) as err:
        from_config(caps, **base, steps=900_000, rank=512, resolution=4096, sample_steps=150, save_every=1)
    message = str(err.value)
    for part in ("--steps must be at most 3000 (got 900000; [training] max_steps)",
                 "--rank must be at most 64 (got 512; [training] max_rank)",
                 "--resolution must be at most 1536 (got 4096; [training] max_resolution)",
                 "--sample-steps must be at most 40 (got 150; [training] max_sample_steps)",
                 "--save-every must be at least 100 (got 1; [training] min_save_every)"):
        assert part in message, message


def test_a_config_whose_defaults_break_its_own_caps_is_refused(tmp_path):
    from tests.conftest import write_config

    from engine.contract.config import ConfigError, load_config

    path = write_config(tmp_path, tmp_path, "[training]\nsteps = 5000\nmax_steps = 4000\n")
    with pytest.raises(ConfigError, match="steps = 5000 is over max_steps = 4000"):
        load_config(path)


# ---------------------------------------------------------------------- training state, pruning, disk

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from tests.training.train_helpers import make_dataset
    from tests.training.tiny_tagger import make_tiny_tagger

    root = tmp_path_factory.mktemp("hostile-data")
    return make_dataset(root, make_tiny_tagger(root / "tagger"))


class _Plant:
    """Unpickling this creates ``marker``: what a hostile state file would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_planted_in_a_checkpoint_never_runs(dataset, tmp_path):
    from tests.training.train_helpers import tiny_options, tiny_pipeline
    from engine.contract.training_errors import TrainingError
    from training.learning.trainer import TrainingRun

    options = tiny_options(dataset, steps=4, save_every=2, sample_every=1000, batch_size=1)
    run = TrainingRun(tiny_pipeline(), options, tmp_path / "run")
    run.step(), run.step()
    run.cancel()
    folder = tmp_path / "run" / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"step": _Plant(marker)})
    names = {p.name for p in folder.iterdir() if p.name.startswith("training_state")} | {"training_state.pt"}
    for name in names:  # today's files and the pickle file older versions wrote
        (folder / name).write_bytes(payload)
    with pytest.raises(TrainingError, match="training state of checkpoint step-000002 is unreadable"):
        TrainingRun(tiny_pipeline(), options, tmp_path / "run", resume=True)
    assert not marker.exists(), "loading a checkpoint ran code from it"


def test_checkpoints_are_pruned_to_the_newest_and_the_recommended(dataset, tmp_path):
    from tests.training.train_helpers import tiny_options, tiny_pipeline
    from training.data.run_record import list_checkpoints, update_run
    from training.learning.trainer import TrainingRun

    options = tiny_options(dataset, steps=5, save_every=1, sample_every=1000, batch_size=1, keep_checkpoints=2)
    run = TrainingRun(tiny_pipeline(), options, tmp_path / "run")
    run.step(), run.step()
    update_run(tmp_path / "run", recommended_checkpoint=1)  # e.g. scored, then resumed
    for _ in range(3):
        run.step()
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1, 4, 5]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [c["step"] for c in record["checkpoints"]] == [1, 4, 5]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_low_disk_stops_a_run_before_it_starts_and_before_a_checkpoint(dataset, tmp_path):
    import shutil

    from tests.training.train_helpers import tiny_options, tiny_pipeline
    from engine.contract.training_errors import DiskSpaceLow
    from training.data.run_record import list_checkpoints
    from training.learning.trainer import TrainingRun

    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    huge = tiny_options(dataset, steps=2, save_every=1, min_free_disk_mb=free_mb * 4)
    with pytest.raises(DiskSpaceLow, match="not enough free disk before the run starts"):
        TrainingRun(tiny_pipeline(), huge, tmp_path / "never")
    run = TrainingRun(tiny_pipeline(), tiny_options(dataset, steps=2, save_every=1, sample_every=1000,
                                                    min_free_disk_mb=1), tmp_path / "run")
    run.step()
    # The operator's margin now exceeds what is free (another process filled the disk).
    run.options = run.options.model_copy(update={"min_free_disk_mb": free_mb * 4})
    with pytest.raises(DiskSpaceLow, match="not enough free disk before checkpoint 2"):
        run.step()
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed" and "min_free_disk_mb" in record["error"]
