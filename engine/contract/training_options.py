"""Typed options of one LoRA training run, validated once with messages that say what is allowed.

The CLI, the engine's ``TrainRequest.options`` and the Discord cog all build a ``TrainOptions``
through ``parse_options``; defaults come from ``[training]`` in config.toml (``from_config``)
and suit ~50 images at 1024 px on a 24 GB card. Imports only the standard library and pydantic,
so the bot can validate options before it sends them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from engine.contract.training_errors import InvalidTrainingOptions

# diffusers.optimization.SchedulerType values (listed here to keep this module torch-free).
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "cosine",
    "cosine_with_restarts",
    "linear",
    "polynomial",
)
# Adapter names that collide with nn.Module methods (NOTES: "Train while serving").
RESERVED_ADAPTER_NAMES = ("train", "eval")
TRAINING_ADAPTER_NAME = "arcae_training"

DEFAULT_SAMPLE_NEGATIVE = "lowres, worst quality, low quality, jpeg artifacts"
# LoRA target presets as kohya users know them (training.learning.lora.PRESET_TARGETS lists the layers).
TARGET_PRESETS = ("attention", "kohya", "locon")
DEFAULT_TARGET_PRESET = "kohya"
# Prodigy estimates the step size itself; its authors' examples use lr 1.0.
PRODIGY_DEFAULT_LR = 1.0


class TrainOptions(BaseModel):
    """Everything that decides what a run does. Frozen; stored in run.json as is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = ""  # base model folder / hub id; the engine trains on the pipeline it holds
    dataset: Path
    kind: Literal["character", "style"]
    trigger: str = Field(min_length=1, max_length=100)
    steps: int = Field(1600, ge=1, le=1_000_000)
    rank: int = Field(16, ge=1, le=512)
    alpha: float = Field(8.0, gt=0, le=4096)
    lr: float = Field(1e-4, gt=0, le=1.0)
    text_encoder_lr: float | None = Field(None, gt=0, le=1.0)
    resolution: int = Field(1024, ge=64, le=4096)
    batch_size: int = Field(1, ge=1, le=64)
    grad_accum: int = Field(1, ge=1, le=256)
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw8bit"
    lr_scheduler: Literal[LR_SCHEDULERS] = "cosine"  # type: ignore[valid-type]
    warmup: int = Field(0, ge=0)
    min_snr_gamma: float = Field(5.0, ge=0.0, le=100.0)  # 0 = off
    noise_offset: float = Field(0.0357, ge=0.0, le=1.0)
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    tag_dropout: float = Field(0.0, ge=0.0, le=1.0)
    shuffle_tags: bool = True
    keep_tokens: int | None = Field(None, ge=0, le=100)  # None = the dataset manifest's, else 1
    save_every: int = Field(200, ge=1)
    keep_checkpoints: int | None = Field(None, ge=1)  # None = keep every checkpoint
    min_free_disk_mb: int = Field(0, ge=0)  # free disk needed before the run and each checkpoint
    sample_every: int | None = Field(None, ge=1)  # None = with every checkpoint
    sample_prompts: list[str] = Field(default_factory=list, max_length=32)
    sample_steps: int = Field(20, ge=1, le=150)
    sample_cfg: float = Field(6.0, ge=0.0, le=30.0)
    sample_negative: str = DEFAULT_SAMPLE_NEGATIVE
    sample_tag_sets: int = Field(3, ge=0, le=16)
    train_text_encoders: bool = False
    train_ff: bool = False  # LoRA also on the transformer feed-forward layers
    train_conv: bool = False  # LoRA also on the ResNet convolutions
    target_preset: Literal["attention", "kohya", "locon"] | None = None  # None = DEFAULT_TARGET_PRESET
    sample_sampler: str = "Euler a"  # an A1111 sampler name, as /imagine takes it
    prodigy_d_coef: float = Field(1.0, gt=0, le=100)
    prodigy_safeguard_warmup: bool = True
    gradient_checkpointing: bool | None = None  # None = on with CUDA
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    # Debugging aid: every step trains the same micro-batch with the same noise; a healthy setup
    # drives that loss down fast (what the tests check).
    fixed_batch: bool = False
    adapter_name: str = TRAINING_ADAPTER_NAME

    @field_validator("trigger")
    @classmethod
    def _trigger_is_one_tag(cls, value: str) -> str:
        value = value.strip()
        if not value or "," in value:
            raise ValueError("must be one non-empty tag without commas")
        return value

    @field_validator("adapter_name")
    @classmethod
    def _adapter_name_not_reserved(cls, value: str) -> str:
        if value in RESERVED_ADAPTER_NAMES or not value.isidentifier():
            raise ValueError(f"must be a Python identifier other than {RESERVED_ADAPTER_NAMES}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _optimizer_default_lr(cls, data: Any) -> Any:
        # A learning rate meant for AdamW (1e-4) makes Prodigy's steps ~10^4 times too small.
        if isinstance(data, dict) and data.get("optimizer") == "prodigy" and data.get("lr") is None:
            data = {**data, "lr": PRODIGY_DEFAULT_LR}
        return data

    @field_validator("sample_sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        from engine.contract.errors import InvalidRequest
        from engine.contract.samplers import get_sampler

        try:
            return get_sampler(value).name
        except InvalidRequest as exc:
            raise ValueError(str(exc)) from None

    @property
    def effective_target_preset(self) -> str:
        return self.target_preset or DEFAULT_TARGET_PRESET

    @property
    def effective_sample_every(self) -> int:
        return self.sample_every or self.save_every


def _overrides_model() -> type[BaseModel]:
    """``TrainOverrides``: every ``TrainOptions`` field, optional, with the same type and limits."""
    fields: dict[str, Any] = {
        # Annotated keeps the field's limits (ge/le/...) on the value when one is given.
        name: (Optional[Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation], None)
        for name, info in TrainOptions.model_fields.items()
    }
    return create_model(
        "TrainOverrides",
        __config__=ConfigDict(extra="forbid", frozen=True),
        __doc__="Options a ``TrainRequest`` sets; the rest (None) come from the engine's ``[training]``.",
        **fields,
    )


# What crosses the wire in ``TrainRequest.options``: typed and limited per option here, checked as a
# whole (required options, cross-field rules) by ``from_config`` on the engine, as the bot did first.
TrainOverrides = _overrides_model()


def from_config(training_config: Any, *, enforce_caps: bool = True, **overrides: Any) -> TrainOptions:
    """Options with defaults from ``[training]`` (an ``engine.contract.config.TrainingConfig``) and overrides.

    The caps (``check_caps``) hold for everything that arrives from Discord or the engine link;
    the operator's own CLI passes ``enforce_caps=False``.
    """
    base = {
        key: getattr(training_config, key)
        for key in (
            "steps", "rank", "alpha", "lr", "resolution", "batch_size", "grad_accum", "optimizer",
            "lr_scheduler", "warmup", "min_snr_gamma", "noise_offset", "save_every",
            "keep_checkpoints", "min_free_disk_mb",
        )
        if hasattr(training_config, key)
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    explicit = "lr" in getattr(training_config, "model_fields_set", ()) and getattr(training_config, "optimizer", "") == "prodigy"
    if base.get("optimizer") == "prodigy" and overrides.get("lr") is None and not explicit:
        base.pop("lr", None)  # [training] lr is AdamW's unless set for prodigy there: Prodigy's default
    options = parse_options(base)
    if enforce_caps:
        check_caps(options, training_config)
    return options


# (option, cap key in [training], the cap's direction); the caps keep one admin's run from
# filling the disk or holding the GPU for days.
CAPS = (
    ("steps", "max_steps", "at most"),
    ("rank", "max_rank", "at most"),
    ("resolution", "max_resolution", "at most"),
    ("sample_steps", "max_sample_steps", "at most"),
    ("save_every", "min_save_every", "at least"),
)


def check_caps(options: TrainOptions, training_config: Any) -> None:
    """Raise ``InvalidTrainingOptions`` naming each option outside the ``[training]`` caps."""
    problems = []
    for name, cap_key, word in CAPS:
        cap = getattr(training_config, cap_key, None)
        value = getattr(options, name)
        if cap is None or (value <= cap if word == "at most" else value >= cap):
            continue
        problems.append(f"--{name.replace('_', '-')} must be {word} {cap} (got {value}; [training] {cap_key})")
    if problems:
        raise InvalidTrainingOptions("; ".join(problems))


def parse_options(data: dict[str, Any]) -> TrainOptions:
    """Validate options; raise ``InvalidTrainingOptions`` naming each bad option and the rule."""
    try:
        return TrainOptions.model_validate(data)
    except ValidationError as exc:
        raise InvalidTrainingOptions("; ".join(_describe(e) for e in exc.errors())) from None


def _describe(err: dict[str, Any]) -> str:
    name = ".".join(str(p) for p in err.get("loc", ())) or "options"
    flag = "--" + name.replace("_", "-")
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "missing":
        return f"{flag} is required"
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(TrainOptions.model_fields))
        return f"unknown option {name!r}; allowed: {allowed}"
    if kind == "literal_error":
        return f"{flag} must be one of {ctx.get('expected', '')} (got {value!r})"
    for bound, word in (("ge", "at least"), ("gt", "greater than"), ("le", "at most"), ("lt", "less than")):
        if bound in ctx:
            return f"{flag} must be {word} {ctx[bound]} (got {value!r})"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{flag} {msg} (got {value!r})"
