"""WD tagger v3 on onnxruntime: the input contract, probabilities, thresholds, MCut, ratings."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from engine.contract.errors import ModelMissing
from training.data.tagger import (
    KAOMOJIS,
    RATINGS,
    TaggerModelMissing,
    WDTagger,
    mcut_threshold,
    preprocess,
    tag_text,
)
from tests.training.tiny_tagger import TINY_TAGGER_SIZE, expected_probabilities, make_tiny_tagger

S = TINY_TAGGER_SIZE


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return make_tiny_tagger(tmp_path_factory.mktemp("tagger") / "tiny-wd", seed=0)


@pytest.fixture(scope="module")
def tagger(tagger_dir):
    return WDTagger.load(tagger_dir)


def solid(rgb, size=(40, 40)):
    return Image.new("RGB", size, rgb)


def test_tiny_tagger_has_the_real_contract_and_is_deterministic(tagger_dir, tmp_path):
    again = make_tiny_tagger(tmp_path / "again", seed=0)
    other = make_tiny_tagger(tmp_path / "other", seed=1)
    assert (again / "model.onnx").read_bytes() == (tagger_dir / "model.onnx").read_bytes()
    assert (other / "model.onnx").read_bytes() != (tagger_dir / "model.onnx").read_bytes()
    with open(tagger_dir / "selected_tags.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["tag_id", "name", "category", "count"]
    by_cat = {c: [r["name"] for r in rows if r["category"] == c] for c in ("9", "0", "4")}
    assert by_cat["9"] == list(RATINGS)
    assert "hikari_(arcaea)" in by_cat["4"] and "^_^" in by_cat["0"]


def test_loader_reads_input_name_and_size_from_the_model(tagger):
    assert tagger.input_name == "input"
    assert tagger.input_size == S  # not the real 448: the size really comes from the model
    assert tagger.providers == ["CPUExecutionProvider"]


def test_preprocess_pads_a_non_square_image_with_white_and_turns_it_bgr():
    im = solid((10, 20, 30), (S, 13))  # already S wide: no resize, so the array is exact
    arr = preprocess(im, S)
    expected = np.full((S, S, 3), 255.0, dtype=np.float32)
    top = (S - 13) // 2
    expected[top : top + 13, :, :] = [30, 20, 10]  # BGR
    assert arr.dtype == np.float32 and arr.shape == (S, S, 3)
    np.testing.assert_array_equal(arr, expected)


def test_preprocess_resizes_bicubic_to_the_model_size():
    im = solid((10, 20, 30), (64, 40))  # padded to 64x64 (12 white rows above), then halved
    arr = preprocess(im, S)
    assert arr.shape == (S, S, 3)
    np.testing.assert_array_equal(arr[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(arr[S - 1, S // 2], [255, 255, 255])
    np.testing.assert_array_equal(arr[S // 2, S // 2], [30, 20, 10])


def test_preprocess_composites_a_transparent_png_onto_white():
    rgba = Image.new("RGBA", (S, S), (0, 0, 0, 0))  # transparent black: must become white
    rgba.paste(Image.new("RGBA", (S // 2, S), (10, 20, 30, 255)), (S // 2, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 128))  # half-transparent black over white: mid grey
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    im = Image.open(io.BytesIO(buf.getvalue()))
    arr = preprocess(im, S)
    expected = np.full((S, S, 3), 255.0, dtype=np.float32)
    expected[:, S // 2 :, :] = [30, 20, 10]
    expected[0, 0] = arr[0, 0]
    np.testing.assert_array_equal(arr, expected)
    assert abs(arr[0, 0, 0] - 127) <= 1

    palette = Image.new("P", (S, S), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0  # palette index 0 transparent
    np.testing.assert_array_equal(preprocess(palette, S), np.full((S, S, 3), 255.0, dtype=np.float32))


def test_outputs_are_used_as_probabilities_without_another_sigmoid(tagger):
    for rgb in [(255, 0, 0), (0, 0, 255), (128, 128, 128)]:
        got = tagger.probabilities([solid(rgb)])[0]
        want = list(expected_probabilities(rgb).values())
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_predict_tags_rating_and_tag_text(tagger):
    red, blue = tagger.predict([solid((255, 0, 0)), solid((0, 0, 255))])
    assert red.rating == "general" and blue.rating == "questionable"
    assert set(red.ratings) == set(RATINGS)
    assert [t for t, _ in red.character] == ["hikari (arcaea)"]
    assert [t for t, _ in red.general] == ["1girl", "red theme", "solo", "long hair", "simple background", "open mouth"]
    scores = [s for _, s in red.general]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0.35
    # kaomoji keep their underscore, other tags get spaces; ratings are never tags
    assert "^_^" in dict(blue.general) and "blue theme" in dict(blue.general)
    assert [t for t, _ in blue.character] == ["tairitsu (arcaea)"]
    assert not set(RATINGS) & {t for r in (red, blue) for t, _ in r.general + r.character}


def test_thresholds_are_configurable(tagger, tagger_dir):
    red = solid((255, 0, 0))
    strict = tagger.predict([red], general_threshold=0.4, character_threshold=0.9)[0]
    assert "open mouth" not in dict(strict.general)  # 0.378
    assert strict.character == []  # hikari is 0.881
    loose = WDTagger.load(tagger_dir, general_threshold=0.25, character_threshold=0.5).predict([red])[0]
    assert "smile" in dict(loose.general)  # 0.269


def test_mcut_threshold_on_known_probabilities():
    # sorted 0.9 0.85 | 0.4 0.35 0.1: the largest gap is between 0.85 and 0.4
    assert mcut_threshold([0.1, 0.85, 0.35, 0.9, 0.4]) == pytest.approx(0.625)
    assert mcut_threshold(np.array([0.99, 0.02, 0.01])) == pytest.approx(0.505)
    assert mcut_threshold([0.5]) == pytest.approx(0.25)
    assert mcut_threshold([]) == 0.0


def test_mcut_decoding_and_the_character_floor(tagger):
    names = tagger.labels.names
    row = np.zeros(len(names), dtype=np.float32)

    def put(name, p):
        row[names.index(name)] = p

    put("general", 0.9)
    for name, p in [("1girl", 0.95), ("solo", 0.9), ("long hair", 0.5), ("smile", 0.45), ("open mouth", 0.1)]:
        put(name, p)
    put("hikari (arcaea)", 0.12)  # above its MCut (0.06) but below the 0.15 floor
    result = tagger.decode(row, general_threshold=0.35, character_threshold=0.85, mcut=True)
    assert [t for t, _ in result.general] == ["1girl", "solo"]  # gap 0.9 -> 0.5 is the largest
    assert result.character == []
    put("hikari (arcaea)", 0.3)
    result = tagger.decode(row, general_threshold=0.35, character_threshold=0.85, mcut=True)
    assert [t for t, _ in result.character] == ["hikari (arcaea)"]  # no fixed 0.85 with MCut
    plain = tagger.decode(row, general_threshold=0.35, character_threshold=0.85, mcut=False)
    assert [t for t, _ in plain.general] == ["1girl", "solo", "long hair", "smile"] and plain.character == []


def test_mcut_end_to_end_on_a_red_image(tagger_dir):
    mcut_tagger = WDTagger.load(tagger_dir, mcut=True)
    red = mcut_tagger.predict([solid((255, 0, 0))])[0]
    assert [t for t, _ in red.general] == ["1girl", "red theme", "solo", "long hair"]
    assert [t for t, _ in red.character] == ["hikari (arcaea)"]


def test_rate_returns_argmax_rating_with_all_scores(tagger):
    cases = {(255, 0, 255): "explicit", (0, 255, 0): "sensitive", (0, 0, 255): "questionable", (90, 90, 90): "general"}
    for rgb, want in cases.items():
        rating, scores = tagger.rate(solid(rgb))
        assert rating == want
        assert set(scores) == set(RATINGS) and scores[want] == max(scores.values())


def test_batches_give_the_same_results_as_single_images(tagger_dir):
    images = [solid((i * 50, 255 - i * 40, i * 20), (30 + i, 40)) for i in range(5)]
    batched = WDTagger.load(tagger_dir, batch_size=2)
    single = WDTagger.load(tagger_dir, batch_size=1)
    np.testing.assert_allclose(batched.probabilities(images), single.probabilities(images), atol=1e-6)
    assert batched.predict([]) == []


def test_tag_text_keeps_kaomoji():
    assert tag_text("long_hair") == "long hair"
    assert tag_text("hikari_(arcaea)") == "hikari (arcaea)"
    for k in ("^_^", ">_<", "o_o", "=_=", "||_||", "(o)_(o)"):
        assert k in KAOMOJIS and tag_text(k) == k


def test_missing_model_says_how_to_get_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaggerModelMissing, match="model.onnx"):
        WDTagger.load(tmp_path / "empty")
    # tests run with HF_HUB_OFFLINE=1 and an empty cache: the hub path fails fast, with the fix
    with pytest.raises(ModelMissing, match="hf download SmilingWolf/wd-vit-tagger-v3"):
        WDTagger.load("SmilingWolf/wd-vit-tagger-v3", cache_dir=str(tmp_path / "cache"))
