"""How far each few-step mode drifts from the standard mode: the maths, the scoring rule, the report.

Torch-free (numpy and PIL): the bot reads and draws reports, ``training.learning.drift`` makes the
images. For one base + adapter mix, every fast-mode configuration (mode, adapter weight, steps) is
compared with the standard-mode image of the same prompt and seed:

- ``recall``: the fraction of the prompt's tags the WD tagger finds in the image (``None`` without
  a tagger); ``recall_kept`` = 1 - max(0, standard recall - fast recall): only lost tags cost.
- colour statistics on sRGB 0-1: mean luminance (Rec. 709 luma), RMS contrast (standard deviation
  of the luma), saturation (mean HSV saturation). The deltas are fast minus standard; "white fog",
  what the seed saw when it lowered the LCM-LoRA weight, is luminance up (> FOG_LUMINANCE) together
  with contrast down (< -FOG_CONTRAST).
- ``ssim``: structural similarity of the lumas (Wang et al. 2004: Gaussian window 11 x 11,
  sigma 1.5, K1 0.01, K2 0.03, valid region only), 1.0 for identical images.

Scoring rule (per configuration, averaged over prompts and seeds):

    keep = W_SSIM * ssim + W_RECALL * recall_kept + W_COLOUR * (1 - min(1, colour_drift / COLOUR_SCALE))
    colour_drift = |d luminance| + |d contrast| + |d saturation|

(without a tagger the recall term is dropped and the other weights are rescaled to sum to 1).
The recommendation for the mix is, among the configurations whose ``keep`` is within KEEP_TIE of
the best one, the one with the fewest steps; ties go to the higher ``keep``. So a configuration
that is as faithful as the best at fewer steps wins, one that saves steps but loses more is not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

W_SSIM, W_RECALL, W_COLOUR = 0.4, 0.4, 0.2
COLOUR_SCALE = 0.3  # a colour drift this large (sum of the three deltas, 0-1 units) scores 0
KEEP_TIE = 0.05
FOG_LUMINANCE, FOG_CONTRAST = 0.02, 0.02
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
REPORT_JSON, REPORT_PNG = "drift.json", "drift.png"
LCM_WEIGHTS = (0.25, 0.5, 0.75, 1.0)
STEPS = (4, 5, 6, 7, 8)
# A fixed set of prompts a few-step mode must keep: a character, another subject, two people, scenery.
DEFAULT_PROMPTS = (
    "1girl, solo, long hair, smile, school uniform, cherry blossoms, outdoors",
    "1boy, solo, short hair, jacket, city, night, neon lights",
    "2girls, holding hands, dress, flower field, blue sky",
    "no humans, scenery, mountain, lake, sunset, clouds",
)
DEFAULT_SEEDS = (1, 2)

# A tagger as drift needs it: images -> per image {tag: score} of the tags it reports.
TagFn = Callable[[list[Image.Image]], list[dict[str, float]]]


# ---------------------------------------------------------------------- image metrics
def _rgb01(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def luma(image: Image.Image) -> np.ndarray:
    """Rec. 709 luma of an image, 0-1, shape (H, W)."""
    rgb = _rgb01(image)
    return rgb @ np.array([0.2126, 0.7152, 0.0722])


@dataclass(frozen=True)
class ColourStats:
    """An image's mean luminance, RMS contrast and mean saturation (all 0-1)."""

    luminance: float
    contrast: float
    saturation: float


def colour_stats(image: Image.Image) -> ColourStats:
    """Mean luminance, RMS contrast (std of the luma) and mean HSV saturation of ``image``."""
    rgb = _rgb01(image)
    y = rgb @ np.array([0.2126, 0.7152, 0.0722])
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(high > 0, (high - low) / np.where(high > 0, high, 1.0), 0.0)
    return ColourStats(float(y.mean()), float(y.std()), float(sat.mean()))


def _gaussian_filter(a: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Separable Gaussian filter over the valid region (no padding): shape shrinks by size - 1."""
    x = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    rows = np.lib.stride_tricks.sliding_window_view(a, size, axis=1) @ g
    return np.lib.stride_tricks.sliding_window_view(rows, size, axis=0) @ g


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Mean structural similarity of two same-size images' lumas (see the module docstring)."""
    if a.size != b.size:
        raise ValueError(f"SSIM needs images of one size, got {a.size} and {b.size}")
    x, y = luma(a), luma(b)
    size = min(SSIM_WINDOW, *x.shape)
    if size % 2 == 0:
        size -= 1
    sigma = SSIM_SIGMA * size / SSIM_WINDOW
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    mx, my = _gaussian_filter(x, size, sigma), _gaussian_filter(y, size, sigma)
    sxx = _gaussian_filter(x * x, size, sigma) - mx * mx
    syy = _gaussian_filter(y * y, size, sigma) - my * my
    sxy = _gaussian_filter(x * y, size, sigma) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return float(np.mean(num / den))


def prompt_tags(prompt: str) -> list[str]:
    """The tags of a prompt as the tagger names them: LoRA tags and weight syntax removed."""
    from engine.contract.prompt_syntax import extract_lora_tags
    from training.data.training_set import normalize_tag, split_tags

    text, _ = extract_lora_tags(prompt)
    tags = [normalize_tag(t) for t in split_tags(text.replace("BREAK", ","))]
    return list(dict.fromkeys(t for t in tags if t))


def tag_recall(found: dict[str, float], wanted: Sequence[str]) -> float:
    """Fraction of ``wanted`` (normalised prompt tags) among the tagger's ``found`` tags."""
    from training.data.training_set import normalize_tag

    if not wanted:
        return 1.0
    have = {normalize_tag(t) for t in found}
    return sum(1 for t in wanted if t in have) / len(wanted)


# ---------------------------------------------------------------------- one comparison
@dataclass(frozen=True)
class Comparison:
    """One fast image against the standard image of the same prompt and seed."""

    ssim: float
    d_luminance: float
    d_contrast: float
    d_saturation: float
    recall: float | None  # the fast image's prompt-tag recall (None: no tagger)
    standard_recall: float | None


def compare(standard: Image.Image, fast: Image.Image, recall: float | None = None,
            standard_recall: float | None = None) -> Comparison:
    """SSIM and colour deltas (fast minus standard) of two images; recalls as measured."""
    s, f = colour_stats(standard), colour_stats(fast)
    return Comparison(ssim(standard, fast), f.luminance - s.luminance, f.contrast - s.contrast,
                      f.saturation - s.saturation, recall, standard_recall)


def is_fog(d_luminance: float, d_contrast: float) -> bool:
    """The seed's "white fog": brighter and flatter than the standard image."""
    return d_luminance > FOG_LUMINANCE and d_contrast < -FOG_CONTRAST


# ---------------------------------------------------------------------- rows and scoring
@dataclass(frozen=True)
class DriftRow:
    """One fast-mode configuration, averaged over the prompts and seeds."""

    mode: str  # the recipe ("lcm", "dmd2", ...)
    adapter: str
    weight: float
    steps: int
    ssim: float
    d_luminance: float
    d_contrast: float
    d_saturation: float
    recall: float | None
    standard_recall: float | None
    recall_kept: float | None
    fog: bool
    keep: float
    images: int


def keep_score(ssim_value: float, recall_kept: float | None, colour_drift: float) -> float:
    """The documented scoring rule (module docstring)."""
    colour = 1.0 - min(1.0, colour_drift / COLOUR_SCALE)
    if recall_kept is None:
        total = W_SSIM + W_COLOUR
        return (W_SSIM * ssim_value + W_COLOUR * colour) / total
    return W_SSIM * ssim_value + W_RECALL * recall_kept + W_COLOUR * colour


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(values) else None


def summarise(mode: str, adapter: str, weight: float, steps: int, comparisons: Sequence[Comparison]) -> DriftRow:
    """One row from a configuration's comparisons (means; fog judged on the mean deltas)."""
    if not comparisons:
        raise ValueError(f"no images measured for {mode} weight {weight} at {steps} steps")
    n = len(comparisons)
    mean = lambda attr: sum(getattr(c, attr) for c in comparisons) / n  # noqa: E731
    s, dl, dc, ds = mean("ssim"), mean("d_luminance"), mean("d_contrast"), mean("d_saturation")
    recall, std_recall = _mean([c.recall for c in comparisons]), _mean([c.standard_recall for c in comparisons])
    kept = None
    if recall is not None and std_recall is not None:
        kept = _mean([1.0 - max(0.0, c.standard_recall - c.recall) for c in comparisons])  # type: ignore[operator]
    keep = keep_score(s, kept, abs(dl) + abs(dc) + abs(ds))
    r4 = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return DriftRow(mode, adapter, float(weight), int(steps), round(s, 4), round(dl, 4), round(dc, 4), round(ds, 4),
                    r4(recall), r4(std_recall), r4(kept), is_fog(dl, dc), round(keep, 4), n)


def recommend(rows: Sequence[DriftRow]) -> DriftRow | None:
    """Fewest steps among the rows within KEEP_TIE of the best ``keep``; ties: higher keep."""
    if not rows:
        return None
    best = max(r.keep for r in rows)
    near = [r for r in rows if r.keep >= best - KEEP_TIE]
    return min(near, key=lambda r: (r.steps, -r.keep, r.mode, -r.weight))


@dataclass
class DriftReport:
    """Everything one drift measurement found, as written to drift.json."""

    base_model: str
    mix: list[dict[str, Any]]  # the adapter mix every image ran with: [{"name", "weight"}]
    prompts: list[str]
    seeds: list[int]
    standard: dict[str, Any]  # the standard mode's sampler, steps, CFG
    rows: list[DriftRow] = field(default_factory=list)
    tagger: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def recommended(self) -> DriftRow | None:
        return recommend(self.rows)

    def to_json(self) -> dict[str, Any]:
        best = self.recommended
        return {
            "base_model": self.base_model, "mix": self.mix, "prompts": self.prompts, "seeds": self.seeds,
            "standard": self.standard, "tagger": self.tagger, "notes": self.notes,
            "scoring": {"keep": f"{W_SSIM}*ssim + {W_RECALL}*recall_kept + {W_COLOUR}*(1 - min(1, colour_drift/{COLOUR_SCALE}))",
                        "recommend": f"fewest steps within {KEEP_TIE} of the best keep",
                        "fog": f"d_luminance > {FOG_LUMINANCE} and d_contrast < -{FOG_CONTRAST}"},
            "rows": [asdict(r) for r in self.rows],
            "recommended": asdict(best) if best else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DriftReport":
        rows = [DriftRow(**r) for r in data.get("rows", [])]
        return cls(data.get("base_model", ""), list(data.get("mix", [])), list(data.get("prompts", [])),
                   list(data.get("seeds", [])), dict(data.get("standard", {})), rows, data.get("tagger", ""),
                   list(data.get("notes", [])))


def format_table(report: DriftReport) -> str:
    """A fixed-width table of the rows; * marks the recommendation, F the white-fog rows."""
    best = report.recommended
    lines = [f"   {'mode':<10} {'weight':>6} {'steps':>5} {'keep':>6} {'ssim':>6} {'recall':>6} {'dLum':>7} {'dContr':>7} {'dSat':>7}"]
    for r in report.rows:
        mark = ("*" if r == best else " ") + ("F" if r.fog else " ") + " "
        recall = f"{r.recall:6.2f}" if r.recall is not None else f"{'-':>6}"
        lines.append(f"{mark}{r.mode:<10} {r.weight:6.2f} {r.steps:5d} {r.keep:6.3f} {r.ssim:6.3f} {recall} "
                     f"{r.d_luminance:+7.3f} {r.d_contrast:+7.3f} {r.d_saturation:+7.3f}")
    lines.append("* recommended (fewest steps within %.2f of the best keep), F white fog (brighter and flatter)" % KEEP_TIE)
    return "\n".join(lines)


def summary_line(report: DriftReport) -> str:
    """One sentence for a chat message: the recommendation for the mix."""
    best = report.recommended
    if best is None:
        return "no fast mode measured"
    fog = " (white fog: brighter and flatter than standard)" if best.fog else ""
    return (f"recommended: {best.mode} ({best.adapter}) at weight {best.weight:g}, {best.steps} steps: "
            f"keeps {best.keep:.2f} of the standard image (SSIM {best.ssim:.2f}){fog}")


# ---------------------------------------------------------------------- chart and files
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _series(rows: Sequence[DriftRow]) -> dict[str, list[DriftRow]]:
    out: dict[str, list[DriftRow]] = {}
    for r in rows:
        out.setdefault(f"{r.mode} w{r.weight:g}", []).append(r)
    return {k: sorted(v, key=lambda r: r.steps) for k, v in out.items()}


def draw_chart(report: DriftReport, size: tuple[int, int] = (900, 380)) -> Image.Image:
    """Left: keep vs steps, one line per mode and weight (the recommendation circled). Right: the
    colour drift of every row, contrast change across, luminance change up; the white-fog corner
    (brighter and flatter) is shaded."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    m, half = 44, width // 2
    left = (m, 30, half - 20, height - m)
    right = (half + m, 30, width - 150, height - m)
    series = _series(report.rows)
    steps = sorted({r.steps for r in report.rows}) or [4]
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def lx(step: float) -> float:
        return left[0] + (step - s0) / (s1 - s0) * (left[2] - left[0])

    def ly(keep: float) -> float:
        return left[3] - max(0.0, min(1.0, keep)) * (left[3] - left[1])

    span = max([0.05] + [abs(v) for r in report.rows for v in (r.d_luminance, r.d_contrast)]) * 1.1

    def rx(dc: float) -> float:
        return (right[0] + right[2]) / 2 + dc / span * (right[2] - right[0]) / 2

    def ry(dl: float) -> float:
        return (right[1] + right[3]) / 2 - dl / span * (right[3] - right[1]) / 2

    draw.rectangle([right[0], right[1], rx(0), ry(0)], fill=(238, 238, 238))  # fog: contrast down, luminance up
    for box in (left, right):
        draw.rectangle(box, outline="black")
    draw.line([rx(0), right[1], rx(0), right[3]], fill=(160, 160, 160))
    draw.line([right[0], ry(0), right[2], ry(0)], fill=(160, 160, 160))
    draw.text((left[0], 10), "keep (1 = like standard) vs steps", fill="black", font=font)
    draw.text((right[0], 10), "colour drift: d contrast (x) vs d luminance (y)", fill="black", font=font)
    draw.text((right[0] + 4, right[1] + 4), "white fog", fill=(90, 90, 90), font=font)
    for s in steps:
        draw.text((lx(s) - 3, left[3] + 4), str(s), fill="black", font=font)
    for v in (0.0, 0.5, 1.0):
        draw.text((left[0] - 26, ly(v) - 6), f"{v:.1f}", fill="black", font=font)
    draw.text((right[0], right[3] + 4), f"{-span:+.2f}", fill="black", font=font)
    draw.text((right[2] - 30, right[3] + 4), f"{span:+.2f}", fill="black", font=font)
    best = report.recommended
    for i, (name, rows) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        keep_points = [(lx(r.steps), ly(r.keep)) for r in rows]
        colour_points = [(rx(r.d_contrast), ry(r.d_luminance)) for r in rows]
        _plot_series(draw, colour, keep_points, colour_points, [r == best for r in rows])
        draw.text((width - 140, 34 + 14 * i), f"- {name}", fill=colour, font=font)
    if best is not None:
        draw.text((left[0], height - 16), summary_line(report)[:140], fill="black", font=font)
    return image


def _plot_series(draw: ImageDraw.ImageDraw, colour: tuple[int, int, int], keep_points: list[tuple[float, float]],
                 colour_points: list[tuple[float, float]], marked: list[bool]) -> None:
    """One mode and weight: its keep line (the recommendation circled) and its colour-drift dots."""
    if len(keep_points) > 1:
        draw.line(keep_points, fill=colour, width=2)
    for (x, y), (px, py), mark in zip(keep_points, colour_points, marked):
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if mark:
            draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline="black", width=2)
        draw.rectangle([px - 2, py - 2, px + 2, py + 2], fill=colour)


def write_report(folder: Path, report: DriftReport) -> tuple[Path, Path]:
    """Write ``drift.json`` and ``drift.png`` into ``folder`` (each atomically); return both paths."""
    from engine.fsutil import write_bytes_atomic
    import io

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, png_path = folder / REPORT_JSON, folder / REPORT_PNG
    write_bytes_atomic(json_path, json.dumps(report.to_json(), indent=2).encode("utf-8"))
    buf = io.BytesIO()
    draw_chart(report).save(buf, format="PNG")
    write_bytes_atomic(png_path, buf.getvalue())
    return json_path, png_path


def read_report(folder: Path) -> DriftReport:
    """The report in ``folder`` (``drift.json``)."""
    return DriftReport.from_json(json.loads((Path(folder) / REPORT_JSON).read_text(encoding="utf-8")))


def parse_floats(text: str, what: str, low: float, high: float) -> list[float]:
    """``"0.25,0.5"`` -> [0.25, 0.5]; a bad or out-of-range value raises ``ValueError`` saying what is allowed."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not a number; give comma-separated numbers {low:g}-{high:g}") from None
        if not (low <= value <= high and math.isfinite(value)):
            raise ValueError(f"{what}: {value:g} is outside {low:g}-{high:g}")
        out.append(value)
    return sorted(set(out))


def parse_steps(text: str, low: int = 1, high: int = 8) -> list[int]:
    """``"4-8"`` or ``"4,6,8"`` -> step counts within ``low``-``high`` (``ValueError`` says what is allowed)."""
    steps: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        a, sep, b = part.partition("-")
        try:
            first, last = int(a), int(b) if sep else int(a)
        except ValueError:
            raise ValueError(f"steps: {part!r} is not a step count or range like 4-8 ({low}-{high})") from None
        if not (low <= first <= last <= high):
            raise ValueError(f"steps: {part} is outside {low}-{high} (few-step modes run {low}-{high} steps)")
        steps.update(range(first, last + 1))
    return sorted(steps)
