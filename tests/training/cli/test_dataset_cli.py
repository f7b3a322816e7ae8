"""Dataset folders (kohya-style pairs, manifest, chart) and the caption / dataset import commands."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import zipfile

import pytest
from PIL import Image

from tests.conftest import REPO
from training.data.captions import CaptionRecipe
from training.cli import main
from training.data.dataset_folder import import_dataset, list_datasets, read_manifest
from training.data.intake import IntakeLimits, IntakeRefused
from training.data.tagger import WDTagger
from tests.training.tiny_tagger import make_tiny_tagger

LIMITS = IntakeLimits(min_side=32)


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return make_tiny_tagger(tmp_path_factory.mktemp("tagger") / "wd")


@pytest.fixture(scope="module")
def tagger(tagger_dir):
    return WDTagger.load(tagger_dir)


def png(rgb, size=(48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def red_blue_attachments():
    # three red images (hikari) and one blue (tairitsu), all slightly different
    return [(f"red{i}.png", png((255, i, 0))) for i in range(3)] + [("blue.png", png((0, 0, 255)))]


def test_dataset_folder_manifest_and_chart(tmp_path, tagger):
    recipe = CaptionRecipe(kind="character", trigger="hkr", character_tag_weight=1.2, always_drop=("simple background",))
    result = import_dataset(
        red_blue_attachments(), name="hikari", datasets_dir=tmp_path, tagger=tagger, recipe=recipe, limits=LIMITS
    )
    folder = tmp_path / "hikari"
    assert result.path == folder and list_datasets(tmp_path) == ["hikari"]
    # kohya-style: every image has a same-name caption
    pngs = sorted(p.stem for p in folder.glob("*.png"))
    assert pngs == ["blue", "red0", "red1", "red2"]
    assert all((folder / f"{s}.txt").is_file() for s in pngs)
    assert (folder / "red0.txt").read_text() == (
        "hkr, (hikari \\(arcaea\\):1.2), 1girl, red theme, solo, long hair, open mouth\n"
    )
    m = read_manifest(folder)
    assert m == result.manifest
    assert (m["name"], m["kind"], m["trigger"], m["keep_tokens"]) == ("hikari", "character", "hkr", 2)
    for im in m["images"]:
        assert hashlib.sha256((folder / im["file"]).read_bytes()).hexdigest() == im["sha256"]
        assert (folder / im["caption_file"]).read_text().strip() == im["caption"]
        assert set(im["ratings"]) == {"general", "sensitive", "questionable", "explicit"}
    blue = next(im for im in m["images"] if im["file"] == "blue.png")
    assert blue["rating"] == "questionable" and "questionable" not in blue["caption"]
    assert blue["tags"]["general"]["^_^"] == pytest.approx(0.8808, abs=1e-3)
    assert blue["keep_tokens"] == 2
    stats = m["stats"]
    assert stats["top_tags"]["character"] == [["hikari (arcaea)", 3], ["tairitsu (arcaea)", 1]]
    assert stats["top_tags"]["rating"] == [["general", 3], ["questionable", 1]]
    assert stats["tags_per_caption"]["min"] >= 6
    # signature: in >= half the images, not generic (1girl, solo, open mouth ...), not dropped
    assert m["signature_tags"] == ["hikari (arcaea)", "long hair", "red theme"]
    chart = Image.open(folder / m["chart"])  # a report beside the dataset (the bot opens it this way)
    assert chart.format == "PNG" and chart.width == 820 and chart.height > 200
    assert 'keep_tokens = 2' in (folder / "dataset.toml").read_text()


def test_existing_name_is_refused_unless_replaced(tmp_path, tagger):
    recipe = CaptionRecipe(kind="style", trigger="st")
    kw = dict(name="set", datasets_dir=tmp_path, tagger=tagger, recipe=recipe, limits=LIMITS)
    import_dataset([("a.png", png((255, 0, 0)))], **kw)
    with pytest.raises(IntakeRefused, match="already exists"):
        import_dataset([("b.png", png((0, 0, 255)))], **kw)
    assert sorted(p.name for p in (tmp_path / "set").glob("*.png")) == ["a.png"]
    import_dataset([("b.png", png((0, 0, 255)))], replace=True, **kw)
    assert sorted(p.name for p in (tmp_path / "set").glob("*.png")) == ["b.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".reports", "set"]  # no staging or trash left
    assert list_datasets(tmp_path) == ["set"]
    # re-importing a dataset folder keeps its captions and skips its metadata files
    again = import_dataset(tmp_path / "set", **{**kw, "name": "set2", "datasets_dir": tmp_path / "more"})
    assert [(i["file"], i["caption_source"]) for i in again.manifest["images"]] == [("b.png", "override")]
    assert sorted(r.name for r in again.report.refused) == ["dataset.toml", "manifest.json"]


def test_dataset_folder_holds_only_images_and_captions_and_training_takes_the_manifest(tmp_path, tagger):
    """The tag chart is a report beside the dataset, never a training item; stray files are not trained."""
    from engine.contract.training_errors import DatasetError
    from training.data.training_set import TrainingDataset

    recipe = CaptionRecipe(kind="character", trigger="hkr")
    result = import_dataset(red_blue_attachments(), name="hikari", datasets_dir=tmp_path, tagger=tagger,
                            recipe=recipe, limits=LIMITS)
    folder = result.path
    images = sorted(e["file"] for e in result.manifest["images"])
    captions = [f.rsplit(".", 1)[0] + ".txt" for f in images]
    assert sorted(p.name for p in folder.iterdir()) == sorted(images + captions + ["dataset.toml", "manifest.json"])
    chart = (folder / result.manifest["chart"]).resolve()
    assert chart.is_file() and folder.resolve() not in chart.parents
    assert Image.open(chart).format == "PNG"

    def trained_images() -> list[str]:
        data = TrainingDataset(folder, trigger="hkr", resolution=64, batch_size=2, seed=0)
        assert int(data.manifest["stats"]["images"]) == len(data.items)
        return sorted(i.image_path.name for i in data.items)

    assert trained_images() == images
    # An image that is not in the manifest (an old in-folder chart, a file copied in by hand) is not trained.
    Image.new("RGB", (64, 64), (255, 255, 255)).save(folder / "tag_frequency.png")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(folder / "stray.png")
    assert trained_images() == images
    (folder / images[0]).unlink()
    with pytest.raises(DatasetError, match=images[0]):
        trained_images()


def test_caption_command_writes_txt_beside_images(tmp_path, tagger_dir, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (60, 30), (0, 0, 255)).save(folder / "blue.jpg")
    (folder / "broken.png").write_bytes(b"not really a png")
    argv = ["caption", str(folder), "--kind", "style", "--trigger", "arcstyle", "--tagger", str(tagger_dir)]
    assert main(argv + ["--max-tags", "2"]) == 0
    out = capsys.readouterr().out
    assert (folder / "red.txt").read_text() == "arcstyle, 1girl, red theme\n"
    assert "captioned 2 images" in out and "tags per caption: mean 3.0" in out
    assert "top tags: 1girl (2)" in out and "refused broken.png: not an image" in out
    (folder / "red.txt").write_text("hand written\n")
    (folder / "blue.txt").unlink()
    assert main(argv + ["--mcut", "--skip-existing"]) == 0
    assert (folder / "red.txt").read_text() == "hand written\n"
    blue = (folder / "blue.txt").read_text()  # padded with white: a mixed colour, many tags
    assert blue.startswith("arcstyle, 1girl, ") and "blue theme" in blue and "tairitsu" not in blue
    out = capsys.readouterr().out
    assert "captioned 1 images" in out and "skipped 1 images" in out
    assert main(argv + ["--general-threshold", "1.5"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err


def test_dataset_import_command_end_to_end(tmp_path, tagger_dir):
    zpath = tmp_path / "upload.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for name, data in red_blue_attachments():
            zf.writestr(name, data)
        zf.writestr("readme.png", b"<html>not an image</html>")
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[tagger]\nmodel = "{tagger_dir.as_posix()}"\n\n[intake]\nmin_side = 32\n\n'
        '[storage]\ndatasets_dir = "data/datasets"\n',
        encoding="utf-8",
    )
    cmd = [sys.executable, "-m", "training", "dataset", "import", str(zpath), "--name", "hk", "--trigger", "hkr", "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "4 images accepted, 1 refused" in proc.stdout
    assert "refused readme.png: not an image" in proc.stdout
    assert "signature tags: hikari (arcaea), long hair, red theme" in proc.stdout
    assert json.loads((tmp_path / "data/datasets/hk/manifest.json").read_text())["trigger"] == "hkr"
    # the same name again: refused with the reason, exit 2, the first dataset untouched
    assert main(["dataset", "import", str(zpath), "--name", "hk", "--config", str(cfg)]) == 2
    assert len(list((tmp_path / "data/datasets/hk").glob("red*.png"))) == 3


def test_import_with_config_uses_the_config_sections(tmp_path, tagger_dir):
    from engine.contract.config import load_config
    from tests.conftest import write_config
    from training.data.dataset_folder import import_with_config

    extra = (
        f'\n[tagger]\nmodel = "{tagger_dir.as_posix()}"\nstyle_max_tags = 2\nalways_drop = ["1girl"]\n'
        "\n[intake]\nmin_side = 32\n"
    )
    config = load_config(write_config(tmp_path, tmp_path / "no-model", extra))
    result = import_with_config(config, [("r.png", png((255, 0, 0)))], name="st", kind="style", trigger="st")
    assert result.path == tmp_path / "data" / "datasets" / "st"
    assert result.manifest["images"][0]["caption"] == "st, red theme, solo"
