"""What a few-step distillation run needs before any torch: its options, checked, and its captions.

``DistillOptions`` is the run's settings (validated here with messages that say what is allowed);
``dataset_captions`` reads the captions the teacher is sampled over (``NAME.txt`` beside each
image, or ``captions.txt`` with one caption per line). The maths and the run live in
``training.learning.consistency`` and ``training.learning.distill``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.contract.distilled_mix import MixError, normalise_mix
from engine.contract.training_errors import TrainingError

MAX_CAPTIONS = 10_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Options that may change on --resume: they do not change what the saved state means.
RESUMABLE = {"steps", "save_every", "eval_seeds"}


@dataclass(frozen=True)
class DistillOptions:
    """Settings of one distillation run (defaults: the diffusers LCD-LoRA research example's, scaled)."""

    name: str  # the distilled adapter's name (its file: NAME.safetensors)
    captions: tuple[str, ...]
    mix: tuple[tuple[str, float], ...] = ()  # the teacher's adapters and weights (empty = the base alone)
    steps: int = 1000
    lr: float = 1e-4
    rank: int = 64  # for a student started from scratch (a stock adapter keeps its own rank)
    batch_size: int = 1
    resolution: int = 1024  # square, pixels
    teacher_cfg: float = 6.0  # the server's CFG: the teacher's guidance the student learns to include
    solver_steps: int = 50  # DDIM skipping-step schedule of the consistency objective
    teacher_steps: int = 25  # DDIM steps of the teacher's own samples (training targets and judging)
    student_steps: int = 4  # steps the student is judged at
    variants: int = 4  # teacher samples per caption (different seeds): the clean latents it learns from
    huber_c: float = 0.001
    negative_prompt: str = ""
    init: str = "auto"  # "auto" (a stock few-step adapter when given), "scratch"
    seed: int = 0
    save_every: int = 250
    eval_seeds: tuple[int, ...] = (1001, 1002)
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        problems = check_options(self)
        if problems:
            raise TrainingError("distill-fast: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mix"] = [list(p) for p in self.mix]
        data["captions"] = list(self.captions)
        data["eval_seeds"] = list(self.eval_seeds)
        return data

    def replace(self, **changes: Any) -> "DistillOptions":
        return dataclasses.replace(self, **changes)


def _range(problems: list[str], name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        problems.append(f"{name} = {value!r} is out of range; allowed: {low:g} to {high:g}")


def check_options(o: DistillOptions) -> list[str]:
    """One message per bad option, naming it and what is allowed."""
    problems: list[str] = []
    if not isinstance(o.name, str) or not _NAME.match(o.name):
        problems.append(f"name {o.name!r} is not allowed (letters, digits, _ . - ; up to 64 characters)")
    if not o.captions:
        problems.append("no captions: give a dataset folder with NAME.txt captions (or captions.txt)")
    elif len(o.captions) > MAX_CAPTIONS:
        problems.append(f"{len(o.captions)} captions; at most {MAX_CAPTIONS}")
    try:
        normalise_mix(o.mix)
    except MixError as exc:
        problems.append(str(exc))
    for name, low, high in (("steps", 1, 100_000), ("rank", 1, 256), ("batch_size", 1, 16),
                            ("solver_steps", 1, 1000), ("teacher_steps", 1, 150), ("student_steps", 1, 8),
                            ("save_every", 1, 100_000), ("variants", 1, 64)):
        _range(problems, name, getattr(o, name), low, high)
        if not isinstance(getattr(o, name), int):
            problems.append(f"{name} must be a whole number")
    _range(problems, "lr", o.lr, 1e-7, 1e-1)
    _range(problems, "teacher_cfg", o.teacher_cfg, 1.0, 30.0)
    _range(problems, "huber_c", o.huber_c, 0.0, 1.0)
    _range(problems, "resolution", o.resolution, 64, 2048)
    if isinstance(o.resolution, int) and o.resolution % 8:
        problems.append(f"resolution = {o.resolution} must be a multiple of 8")
    if o.init not in ("auto", "scratch"):
        problems.append(f"init = {o.init!r}; allowed: auto, scratch")
    if not o.eval_seeds or len(o.eval_seeds) > 16:
        problems.append("eval_seeds: give 1 to 16 held-out seeds")
    return problems


def dataset_captions(folder: Path) -> list[str]:
    """The captions of a dataset folder (``*.txt`` beside images, sorted), or its ``captions.txt`` lines."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"dataset {folder} is not a folder")
    listed = folder / "captions.txt"
    if listed.is_file():
        lines = listed.read_text(encoding="utf-8").splitlines()
    else:
        lines = [p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*.txt")) if p.name != "captions.txt"]
    captions = [" ".join(c.split()) for c in lines]
    captions = [c for c in captions if c]
    if not captions:
        raise TrainingError(f"dataset {folder} has no captions (NAME.txt beside images, or captions.txt)")
    return captions[:MAX_CAPTIONS]


@dataclass
class DistillReport:
    """Trajectory distance of the student to the teacher on held-out seeds, before and after."""

    before: float | None = None
    after: float | None = None
    stock: float | None = None  # the stock few-step adapter (with the mix), when one was given
    notes: list[str] = field(default_factory=list)

    @property
    def gain(self) -> float | None:
        """distance after / distance before (below 1: the student got closer to its teacher)."""
        if self.before is None or self.after is None or self.before <= 0:
            return None
        return self.after / self.before

    @property
    def recommended(self) -> bool | None:
        """Closer to the teacher than before and, when a stock few-step adapter was measured, than it
        (the judge of the issue: keep more of the standard output than the stock adapter at the same steps)."""
        if self.gain is None:
            return None
        return self.gain < 1.0 and (self.stock is None or self.after < self.stock)

    @property
    def stock_ratio(self) -> float | None:
        """distance after / the stock adapter's distance (below 1: the distilled adapter keeps more of the style)."""
        if self.after is None or not self.stock:
            return None
        return self.after / self.stock
