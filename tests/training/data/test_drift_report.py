"""The drift maths on synthetic images: colour statistics, white fog, SSIM, tag recall, the scoring
rule, the recommendation and the written report (table, JSON, chart)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from training.data import drift_report as dr


def _scene(seed: int = 0, size: int = 64) -> Image.Image:
    """A colourful, contrasty test picture: smooth gradients plus random blocks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 1 - x * y], axis=2)
    blocks = rng.uniform(0, 1, size=(size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)
    return Image.fromarray((255 * (0.5 * rgb + 0.5 * blocks)).astype(np.uint8))


def _washed_out(image: Image.Image, amount: float = 0.5) -> Image.Image:
    """The seed's white fog: the picture blended towards white."""
    a = np.asarray(image, dtype=np.float64)
    return Image.fromarray((a * (1 - amount) + 255 * amount).astype(np.uint8))


def test_a_washed_out_image_is_brighter_flatter_and_paler():
    base = _scene()
    fog = _washed_out(base)
    s, f = dr.colour_stats(base), dr.colour_stats(fog)
    assert f.luminance > s.luminance + 0.2
    assert f.contrast < s.contrast * 0.6
    assert f.saturation < s.saturation
    c = dr.compare(base, fog)
    assert c.d_luminance > 0 and c.d_contrast < 0 and dr.is_fog(c.d_luminance, c.d_contrast)
    assert not dr.is_fog(-c.d_luminance, c.d_contrast)  # darker and flatter is no fog


def test_colour_stats_of_known_colours():
    white, black = Image.new("RGB", (16, 16), "white"), Image.new("RGB", (16, 16), "black")
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    assert dr.colour_stats(white) == dr.ColourStats(pytest.approx(1.0), 0.0, 0.0)
    assert dr.colour_stats(black) == dr.ColourStats(0.0, 0.0, 0.0)
    assert dr.colour_stats(red).saturation == pytest.approx(1.0)
    assert dr.colour_stats(red).luminance == pytest.approx(0.2126)
    half = Image.fromarray(np.concatenate([np.zeros((8, 16, 3)), np.full((8, 16, 3), 255)]).astype(np.uint8))
    assert dr.colour_stats(half).contrast == pytest.approx(0.5)


def test_ssim_is_one_for_identical_images_and_falls_with_damage():
    base = _scene()
    assert dr.ssim(base, base) == pytest.approx(1.0)
    assert dr.ssim(base, base.copy()) == pytest.approx(1.0)
    noisy = Image.fromarray(np.clip(np.asarray(base, float) + np.random.default_rng(1).normal(0, 40, (64, 64, 3)),
                                    0, 255).astype(np.uint8))
    other = _scene(seed=5)
    assert dr.ssim(base, _washed_out(base, 0.2)) > dr.ssim(base, noisy) > dr.ssim(base, other)
    assert dr.ssim(base, other) == pytest.approx(dr.ssim(other, base))
    assert -1.0 <= dr.ssim(base, other) < 0.5


def test_ssim_works_on_tiny_images_and_refuses_different_sizes():
    small = _scene(size=8)
    assert dr.ssim(small, small) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one size"):
        dr.ssim(small, _scene(size=16))


def test_prompt_tags_and_recall():
    tags = dr.prompt_tags("(1girl:1.2), solo, long_hair, [smile] <lora:style:0.8>, hikari \\(arcaea\\)")
    assert tags == ["1girl", "solo", "long hair", "smile", "hikari (arcaea)"]
    assert dr.tag_recall({"1girl": 0.9, "long_hair": 0.5}, tags) == pytest.approx(2 / 5)
    assert dr.tag_recall({}, []) == 1.0


def _row(mode, steps, keep, weight=1.0, fog=False):
    return dr.DriftRow(mode, mode + "-lora", weight, steps, keep, 0.0, 0.0, 0.0, None, None, None, fog, keep, 2)


def test_recommendation_takes_the_fewest_steps_that_keep_nearly_the_best():
    rows = [_row("lcm", 8, 0.90), _row("lcm", 4, 0.70), _row("dmd2", 4, 0.87), _row("tcd", 5, 0.89)]
    assert dr.recommend(rows).mode == "dmd2"  # 4 steps, within 0.05 of the best (0.90)
    rows = [_row("lcm", 8, 0.90), _row("lcm", 4, 0.70)]
    assert dr.recommend(rows).steps == 8  # 4 steps lose too much
    assert dr.recommend([]) is None


def test_keep_score_rewards_faithful_images_and_punishes_drift():
    assert dr.keep_score(1.0, 1.0, 0.0) == pytest.approx(1.0)
    assert dr.keep_score(1.0, None, 0.0) == pytest.approx(1.0)  # no tagger: rescaled
    assert dr.keep_score(0.8, 1.0, 0.1) > dr.keep_score(0.8, 0.5, 0.1) > dr.keep_score(0.8, 0.5, 0.5)
    base = _scene()
    faithful = dr.summarise("lcm", "lcm-lora", 1.0, 4, [dr.compare(base, base, 1.0, 1.0)])
    foggy = dr.summarise("lcm", "lcm-lora", 0.25, 4, [dr.compare(base, _washed_out(base), 0.5, 1.0)])
    assert faithful.keep == pytest.approx(1.0) and not faithful.fog
    assert foggy.fog and foggy.keep < faithful.keep and foggy.recall_kept == pytest.approx(0.5)


def test_report_writes_json_and_chart_and_reads_back(tmp_path):
    base = _scene()
    rows = [dr.summarise("lcm", "lcm-lora", w, s, [dr.compare(base, _washed_out(base, 0.4 * (1 - w)), 1.0, 1.0)])
            for w in (0.25, 1.0) for s in (4, 6)]
    report = dr.DriftReport("tiny", [{"name": "style", "weight": 0.8}], ["1girl"], [1],
                            {"sampler": "Euler a", "steps": 28, "cfg": 6.0}, rows, tagger="tiny")
    json_path, png_path = dr.write_report(tmp_path, report)
    data = json.loads(json_path.read_text())
    assert data["recommended"]["weight"] == 1.0 and data["recommended"]["steps"] == 4
    assert "fewest steps" in data["scoring"]["recommend"]
    with Image.open(png_path) as chart:
        assert chart.format == "PNG" and chart.width > 400
    again = dr.read_report(tmp_path)
    assert again.rows == rows and again.recommended == report.recommended
    table = dr.format_table(report)
    lines = table.splitlines()
    assert any(line.startswith("*  lcm") and "1.00" in line for line in lines)  # recommended, no fog
    assert any(line.startswith(" F lcm") and "0.25" in line for line in lines)  # weight 0.25: white fog
    assert "recommended: lcm (lcm-lora) at weight 1, 4 steps" in dr.summary_line(report)


@pytest.mark.parametrize("text, message", [("0.3,abc", "not a number"), ("2", "outside 0.1-1.5")])
def test_bad_weights_say_what_is_allowed(text, message):
    with pytest.raises(ValueError, match=message):
        dr.parse_floats(text, "LCM weights", 0.1, 1.5)


def test_steps_ranges():
    assert dr.parse_steps("4-8") == [4, 5, 6, 7, 8]
    assert dr.parse_steps("4,6,8") == [4, 6, 8]
    with pytest.raises(ValueError, match="outside 1-8"):
        dr.parse_steps("4-12")
