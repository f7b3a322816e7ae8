"""/train uploads from a hostile admin of a home server, on the real bot over the Discord double.

The bot process, the real engine (tiny model) and the double: /train captions refuses files that
are not captions before it downloads anything, /train start refuses options over the configured
caps with what is allowed, and /train add-images counts only the new images against the caps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio

from tests.bot.conftest import running_stack
from tests.bot.test_training_commands import answer, invoke, png

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir, tmp_path_factory):
    """Double + engine + bot with the tiny tagger, 32 px images and at most 3 images per upload."""
    from tests.training.tiny_tagger import make_tiny_tagger

    tmp = tmp_path_factory.mktemp("train-uploads")
    tagger_dir = make_tiny_tagger(tmp / "tagger")
    extra = f'\n[tagger]\nmodel = "{tagger_dir.as_posix()}"\n\n[intake]\nmin_side = 32\nmax_files = 3\n'
    async with running_stack(tmp, tiny_model_dir, extra=extra) as s:
        s.tagger_dir = tagger_dir
        yield s


def make_dataset(stack, name: str) -> Path:
    """A captioned 3-image dataset in the bot's datasets folder, as /train start would leave it."""
    from training.data.captions import CaptionRecipe
    from training.data.dataset_folder import import_dataset
    from training.data.intake import IntakeLimits
    from training.data.tagger import WDTagger

    files = [(f"a{i}.png", png((200, 20 + 40 * i, 30), 4 + 2 * i)) for i in range(3)]
    return import_dataset(files, name=name, datasets_dir=stack.tmp / "data" / "datasets",
                          tagger=WDTagger.load(stack.tagger_dir), recipe=CaptionRecipe(kind="character", trigger="hk"),
                          limits=IntakeLimits(min_side=32)).path


async def test_train_captions_refuses_other_files_before_downloading_them(stack):
    d = stack.double
    folder = make_dataset(stack, "capset")
    fetched = len(d.cdn_fetches)
    inter = await invoke(d, d.admin, "train captions", {"dataset": "capset"},
                         files={"file1": ("a0.txt", b"hk, red hair"), "file2": ("payload.exe", b"MZ" + b"\0" * 4096)})
    text = (await answer(d, inter))["content"]
    assert "payload.exe is not a .txt file" in text and "NAME.txt" in text, text
    inter = await invoke(d, d.admin, "train captions", {"dataset": "capset"},
                         files={"file1": ("a0.txt", b"hk, " + b"x" * (200 * 1024))})
    text = (await answer(d, inter))["content"]
    assert "a0.txt is over 64 KiB" in text and "at most 64 KiB" in text, text
    assert len(d.cdn_fetches) == fetched, "refused uploads were downloaded"
    assert "red hair" not in (folder / "a0.txt").read_text()
    # A real caption file still goes through (and is downloaded).
    inter = await invoke(d, d.admin, "train captions", {"dataset": "capset"}, files={"file1": ("a0.txt", b"hk, red hair")})
    assert "Updated 1 caption(s)" in (await answer(d, inter))["content"]
    assert len(d.cdn_fetches) == fetched + 1
    assert (folder / "a0.txt").read_text() == "hk, red hair\n"


async def test_train_start_refuses_options_over_the_configured_caps(stack):
    d = stack.double
    make_dataset(stack, "capped")
    inter = await invoke(d, d.admin, "train start", {"name": "capped", "kind": "character", "trigger": "hk",
                                                     "steps": 50_000, "rank": 256, "save_every": 1})
    text = (await answer(d, inter))["content"]
    for part in ("steps must be at most 10000 (got 50000; [training] max_steps)",
                 "rank must be at most 128 (got 256; [training] max_rank)",
                 "save_every must be at least 50 (got 1; [training] min_save_every)"):
        assert part in text, text
    assert not (stack.tmp / "data" / "runs").exists() or not any((stack.tmp / "data" / "runs").iterdir())


async def test_add_images_counts_only_the_new_images_against_the_caps(stack):
    d = stack.double
    folder = make_dataset(stack, "grow")  # already 3 images: as many as one upload may hold
    before = {p.name: p.read_bytes() for p in folder.glob("a*.png")}
    inter = await invoke(d, d.admin, "train add-images", {"dataset": "grow"},
                         files={"image1": ("b0.png", png((30, 200, 30), 6)), "image2": ("a0.png", png((30, 30, 200), 8))})
    text = (await answer(d, inter, timeout=60))["content"]
    assert "Added 2 image(s) to dataset `grow` (now 5)" in text, text
    assert sorted(p.name for p in folder.glob("*.png") if p.name != "tag_frequency.png") == \
        ["a0.png", "a0_2.png", "a1.png", "a2.png", "b0.png"]
    assert all((folder / n).read_bytes() == data for n, data in before.items()), "old images were re-encoded"
