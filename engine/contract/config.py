"""Arcae configuration: ``config.toml`` parsed once at start-up into frozen, typed objects.

This module imports only the standard library and pydantic, so the bot (which must never
import torch) can use it. Nothing reads configuration globals: ``load_config`` returns an
``ArcaeConfig`` that callers pass into constructors. Secrets never live in the file; they are
read from the environment into ``Secrets`` (``SecretStr`` values never print).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

CONFIG_ENV = "ARCAE_CONFIG"
DEFAULT_CONFIG_PATH = Path("config.toml")
CONFIG_HELP = "config file (default: $ARCAE_CONFIG, then ./config.toml if present, else built-in defaults)"


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid; the message says what to fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Size = tuple[int, int]


def _parse_size(value: Any) -> Any:
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            return (int(parts[0]), int(parts[1]))
        raise ValueError(f"expected a size like '1024x1024', got {value!r}")
    return value


class DiscordConfig(_Section):
    """The Discord front-end. The bot token comes from the environment variable named here."""

    token_env: str = "ARCAE_DISCORD_TOKEN"
    guild_ids: list[int] = []
    # Servers where admin commands exist and work; empty = the guild_ids (see ``home_guilds``).
    home_guild_ids: list[int] = []
    admin_role_ids: list[int] = []
    admin_user_ids: list[int] = []
    allowed_channel_ids: list[int] = []
    allowed_role_ids: list[int] = []
    add_character_triggers: bool = True
    progress_edit_interval_s: float = Field(2.0, ge=1.0, le=30.0)
    # For a REST proxy (e.g. a rate-limit-sharing proxy in front of discord.com); empty = Discord.
    api_base: str = ""
    # For a gateway proxy; empty = the URL Discord announces.
    gateway_url: str = ""

    @field_validator("guild_ids", "home_guild_ids")
    @classmethod
    def _server_ids(cls, value: list[int]) -> list[int]:
        bad = [v for v in value if v <= 0]
        if bad:
            raise ValueError(f"server ids are positive Discord ids (right-click the server, Copy Server ID); got {bad}")
        return value

    @property
    def home_guilds(self) -> frozenset[int]:
        """Arcae's home servers: ``home_guild_ids``, else ``guild_ids``; empty means admin commands are off."""
        return frozenset(self.home_guild_ids or self.guild_ids)


class EngineConfig(_Section):
    """The GPU engine process, and how the bot reaches it."""

    mode: Literal["local", "remote", "redis"] = "local"
    host: str = "127.0.0.1"
    port: int = Field(7861, ge=0, le=65535)
    secret_env: str = "ARCAE_ENGINE_SECRET"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    queue_limit: int = Field(64, ge=1, le=10_000)
    max_batch_jobs: int = Field(4, ge=1, le=8)
    rate_outputs: bool = True
    previews: bool = True
    restart_backoff_s: list[float] = [1.0, 2.0, 5.0, 10.0, 30.0]
    startup_timeout_s: float = Field(3600.0, gt=0)
    # TLS for the engine link (remote mode): the engine serves wss:// with its certificate and
    # key; the bot verifies that certificate against tls_ca_file (empty: the system's CAs).
    tls: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    # Optional mutual TLS: the engine accepts only clients with a certificate signed by
    # tls_client_ca_file; the bot presents tls_client_cert_file / tls_client_key_file.
    tls_client_ca_file: str = ""
    tls_client_cert_file: str = ""
    tls_client_key_file: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password_env: str = "ARCAE_REDIS_PASSWORD"
    worker_name: str = ""
    lease_ttl_s: float = Field(30.0, ge=2.0, le=3600.0)
    max_attempts: int = Field(3, ge=1, le=20)
    accepts_training: bool = True
    worker_capacity: int = Field(2, ge=1, le=2)
    # How LoRA runs: "fused" folds the active mix into the base weights (exact originals kept,
    # restored bit-identical before a training step); "unfused" runs each adapter per layer.
    lora_execution: Literal["fused", "unfused"] = "fused"
    # torch.compile of the UNet (channels_last; one warm-up per size preset at start-up).
    compile: Literal["off", "default", "max-autotune"] = "off"

    @model_validator(mode="after")
    def _tls_keys_agree(self) -> "EngineConfig":
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("[engine] tls_cert_file and tls_key_file go together: set both or neither")
        if bool(self.tls_client_cert_file) != bool(self.tls_client_key_file):
            raise ValueError("[engine] tls_client_cert_file and tls_client_key_file go together: set both or neither")
        tls_files = (self.tls_cert_file, self.tls_client_ca_file, self.tls_client_cert_file)
        if any(tls_files) and not self.tls:
            raise ValueError("[engine] TLS files are set but tls = false: set tls = true to use wss://")
        return self


class ModelConfig(_Section):
    """The base model: a hub repository id, a local diffusers folder or a single .safetensors file."""

    source: str = "cagliostrolab/animagine-xl-3.1"
    revision: str = ""
    vae: str = ""
    name: str = ""
    hub_token_env: str = "HF_TOKEN"
    cache_dir: str = ""
    # What the UNet predicts: "auto" reads the checkpoint (a single file's ``v_pred`` key, a
    # diffusers folder's scheduler config); "v" serves a v-prediction base (NoobAI-XL V-Pred).
    prediction: Literal["auto", "epsilon", "v"] = "auto"
    # CFG rescale (guidance_rescale) used on a v-prediction base; 0 turns it off.
    cfg_rescale: float = Field(0.7, ge=0.0, le=1.0)


FastRecipeName = Literal["lcm", "tcd", "dmd2", "hyper-sd", "lightning"]


class FastAdapterConfig(_Section):
    """One installed few-step adapter (an ``[adapters] fast`` entry) and the recipe its authors publish."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    recipe: FastRecipeName
    steps: int | None = Field(None, ge=1, le=16)  # default steps (an n-step LoRA: n); None = the recipe's
    weight: float | None = Field(None, ge=0.0, le=2.0)  # default weight; None = the recipe's
    eta: float | None = Field(None, ge=0.0, le=1.0)  # TCD's gamma (eta); None = the recipe's
    # The base the adapter was distilled from predicts noise (all published SDXL ones do).
    prediction: Literal["epsilon", "v"] = "epsilon"


class AdaptersConfig(_Section):
    """LoRA adapters: where they live, which one is LCM-LoRA, and the other few-step adapters."""

    dir: Path = Path("data/adapters")
    lcm_adapter: str = "lcm-lora-sdxl"
    max_active: int = Field(8, ge=1, le=32)
    default_weight: float = Field(1.0, ge=-4.0, le=4.0)
    fast: list[FastAdapterConfig] = []

    @model_validator(mode="after")
    def _fast_names_unique(self) -> "AdaptersConfig":
        names = [f.name for f in self.fast]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"few-step adapter {twice[0]!r} is listed twice in [adapters] fast; list it once")
        return self


class GenerationConfig(_Section):
    """Defaults a user's explicit values override, and the limits they must stay within."""

    quality_tags: str = "masterpiece, best quality, very aesthetic, absurdres"
    add_quality_tags: bool = True
    negative_prompt: str = (
        "lowres, (bad), text, error, fewer, extra, missing, worst quality, jpeg artifacts, "
        "low quality, watermark, unfinished, displeasing, oldest, early, chromatic aberration, "
        "signature, extra digits, artistic error, username, scan, [abstract]"
    )
    steps: int = Field(28, ge=1, le=150)
    cfg: float = Field(6.0, ge=0.0, le=30.0)
    sampler: str = "Euler a"
    size: Size = (832, 1216)
    fast_steps: int = Field(6, ge=1, le=16)
    fast_cfg: float = Field(1.0, ge=0.0, le=3.0)
    fast_lcm_weight: float = Field(1.0, ge=0.0, le=2.0)
    variation_strength: float = Field(0.5, gt=0.0, le=1.0)
    # Vary (Subtle) under a result; Vary (Strong) takes variation_strength.
    subtle_variation_strength: float = Field(0.25, gt=0.0, le=1.0)
    upscale_factor: float = Field(1.5, ge=1.0, le=4.0)
    upscale_strength: float = Field(0.35, gt=0.0, le=1.0)
    min_steps: int = Field(1, ge=1)
    max_steps: int = Field(60, ge=1, le=500)
    min_cfg: float = Field(0.0, ge=0.0)
    max_cfg: float = Field(20.0, ge=0.0, le=50.0)
    min_side: int = Field(512, ge=8)
    max_side: int = Field(2048, ge=8)
    max_pixels: int = Field(2048 * 2048, ge=64)
    max_count: int = Field(4, ge=1, le=8)
    max_prompt_chars: int = Field(2000, ge=1, le=20_000)

    _size_from_text = field_validator("size", mode="before")(_parse_size)


class TaggerConfig(_Section):
    """WD tagger v3 (onnxruntime): captions for training and ratings for content rules."""

    model: str = "SmilingWolf/wd-swinv2-tagger-v3"
    revision: str = ""
    general_threshold: float = Field(0.35, ge=0.0, le=1.0)
    character_threshold: float = Field(0.85, ge=0.0, le=1.0)
    mcut: bool = False
    batch_size: int = Field(8, ge=1, le=256)
    style_max_tags: int = Field(8, ge=0, le=200)
    character_max_tags: int = Field(40, ge=0, le=500)
    character_tag_weight: float = Field(1.2, ge=0.1, le=3.0)
    blacklist: list[str] = []
    always_drop: list[str] = []


class IntakeConfig(_Section):
    """Limits for uploaded training images and archives."""

    max_files: int = Field(200, ge=1, le=100_000)
    max_image_pixels: int = Field(40_000_000, ge=1)
    min_side: int = Field(256, ge=1)
    max_upload_bytes: int = Field(200 * 1024 * 1024, ge=1)
    max_uncompressed_bytes: int = Field(1024 * 1024 * 1024, ge=1)
    max_compression_ratio: float = Field(100.0, ge=1.0)


class TrainingConfig(_Section):
    """LoRA training defaults (suited to ~50 images at 1024 on a 24 GB card) and scheduling."""

    exclusive: bool = False
    steps: int = Field(1600, ge=1, le=1_000_000)
    rank: int = Field(16, ge=1, le=512)
    alpha: float = Field(8.0, gt=0)
    lr: float = Field(1e-4, gt=0, le=1.0)
    resolution: int = Field(1024, ge=64, le=4096)
    batch_size: int = Field(1, ge=1, le=64)
    grad_accum: int = Field(1, ge=1, le=256)
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw8bit"
    lr_scheduler: str = "cosine"
    warmup: int = Field(0, ge=0)
    min_snr_gamma: float = Field(5.0, ge=0.0)
    noise_offset: float = Field(0.0357, ge=0.0, le=1.0)
    save_every: int = Field(200, ge=1)
    # Caps on what an admin may ask for from Discord (or any TrainRequest); the defaults above must fit.
    max_steps: int = Field(10_000, ge=1, le=1_000_000)
    max_rank: int = Field(128, ge=1, le=512)
    max_resolution: int = Field(2048, ge=64, le=4096)
    max_sample_steps: int = Field(50, ge=1, le=150)
    min_save_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(5, ge=1, le=1000)  # the newest K, plus the recommended/chosen ones
    min_free_disk_mb: int = Field(2048, ge=0)  # checked before a run and before each checkpoint
    # The run's live message in Discord edits itself at most this often (Discord rate-limits edits).
    status_edit_interval_s: float = Field(10.0, ge=1.0, le=600.0)
    # After a run is scored, measure its recommended checkpoint against the standard mode in every
    # installed fast mode (training.learning.drift); the summary lands in the run's run.json.
    drift_report: bool = False

    @model_validator(mode="after")
    def _defaults_within_caps(self) -> "TrainingConfig":
        for name, cap, word in (("steps", "max_steps", "over"), ("rank", "max_rank", "over"),
                                ("resolution", "max_resolution", "over"), ("save_every", "min_save_every", "under")):
            value, limit = getattr(self, name), getattr(self, cap)
            if (value > limit) if word == "over" else (value < limit):
                raise ValueError(f"{name} = {value} is {word} {cap} = {limit}; change one of them")
        return self


class StorageConfig(_Section):
    """Where Arcae keeps its database and files. Relative paths are relative to the config file."""

    database: Path = Path("data/arcae.sqlite3")
    outputs_dir: Path = Path("data/outputs")
    datasets_dir: Path = Path("data/datasets")
    runs_dir: Path = Path("data/runs")


class GalleryConfig(_Section):
    """The gallery channel where finished images are posted."""

    channel_id: int = 0
    post: Literal["all", "shared", "off"] = "shared"
    star_emoji: str = "⭐"
    top_count: int = Field(10, ge=1, le=25)
    # Starboard: a post with this many stars (0 = never) is promoted: posted in the highlight
    # channel promote_to, or pinned in the gallery channel when promote_to = 0. It is demoted
    # again when removed stars bring it below the threshold.
    promote_at: int = Field(0, ge=0, le=10_000)
    promote_to: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _highlights_elsewhere(self) -> "GalleryConfig":
        if self.promote_to and self.promote_to == self.channel_id:
            raise ValueError(f"promote_to = {self.promote_to} is the gallery channel itself; name another channel "
                             "for highlights, or 0 to pin promoted posts in the gallery channel")
        return self


class LimitsConfig(_Section):
    """Per-user and global limits the bot enforces (admins are exempt)."""

    max_queued_per_user: int = Field(3, ge=1, le=1000)
    cooldown_s: float = Field(5.0, ge=0.0, le=3600.0)
    global_max_queued: int = Field(50, ge=1, le=100_000)


class ContentConfig(_Section):
    """Rules applied in channels that are not age-restricted."""

    blocked_tags: list[str] = ["nsfw", "nude", "nudity", "explicit", "sex", "naked", "nipples", "pussy", "penis"]
    safety_negative: str = "nsfw, nude, explicit, sexual, nipples"
    sfw_action: Literal["spoiler", "withhold"] = "withhold"
    flagged_ratings: list[Literal["general", "sensitive", "questionable", "explicit"]] = ["questionable", "explicit"]
    # Outputs without a rating (rating off, or the tagger failed to load): fail closed by default.
    unrated_action: Literal["withhold", "spoiler", "show"] = "withhold"


class ArcaeConfig(_Section):
    """The whole configuration. Build it with ``load_config``."""

    discord: DiscordConfig = DiscordConfig()
    engine: EngineConfig = EngineConfig()
    model: ModelConfig = ModelConfig()
    adapters: AdaptersConfig = AdaptersConfig()
    generation: GenerationConfig = GenerationConfig()
    tagger: TaggerConfig = TaggerConfig()
    intake: IntakeConfig = IntakeConfig()
    training: TrainingConfig = TrainingConfig()
    storage: StorageConfig = StorageConfig()
    gallery: GalleryConfig = GalleryConfig()
    limits: LimitsConfig = LimitsConfig()
    content: ContentConfig = ContentConfig()
    # Directory of the config file; relative paths resolve against it. Not a TOML key.
    base_dir: Path = Field(default=Path("."), exclude=True)

    def path(self, p: Path | str) -> Path:
        """Resolve a configured path against the config file's directory."""
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


class Secrets(BaseModel):
    """Secrets from the environment. ``SecretStr`` keeps them out of reprs and logs."""

    model_config = ConfigDict(frozen=True)

    discord_token: SecretStr | None = None
    engine_secret: SecretStr | None = None
    hub_token: SecretStr | None = None
    redis_password: SecretStr | None = None

    @classmethod
    def from_env(cls, config: ArcaeConfig, environ: dict[str, str] | None = None) -> "Secrets":
        env = os.environ if environ is None else environ

        def get(name: str) -> SecretStr | None:
            value = env.get(name, "").strip() if name else ""
            return SecretStr(value) if value else None

        return cls(
            discord_token=get(config.discord.token_env),
            engine_secret=get(config.engine.secret_env),
            hub_token=get(config.model.hub_token_env),
            redis_password=get(config.engine.redis_password_env),
        )


def _describe_error(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = [str(x) for x in err.get("loc", ())]
    key = ".".join(loc) if loc else "(top level)"
    section, _, name = key.partition(".")
    shown = f"[{section}] {name}" if name else key
    value = err.get("input")
    if err.get("type") == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        return f"unknown key {shown!s}; allowed keys here: {', '.join(allowed)}"
    msg = err.get("msg", "invalid value")
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        msg = f"{msg}"
    return f"{shown} = {value!r}: {msg}"


def _allowed_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            break
        current = field.annotation
    fields = getattr(current, "model_fields", {})
    return [n for n, f in fields.items() if not f.exclude]


def parse_config(data: dict[str, Any], *, base_dir: Path = Path("."), source: str = "config") -> ArcaeConfig:
    """Validate a parsed TOML mapping; raise ``ConfigError`` naming each bad key, value and rule."""
    if "base_dir" in data:
        raise ConfigError(f"{source}: 'base_dir' is not a configuration key")
    try:
        return ArcaeConfig.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        lines = [_describe_error(e, ArcaeConfig) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def locate_config(cli_value: str | os.PathLike[str] | None = None) -> Path | None:
    """The one config-finding rule of every command: ``--config``, then ``$ARCAE_CONFIG``, then
    ./config.toml when it exists; None means the documented defaults (``ArcaeConfig``'s)."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get(CONFIG_ENV, "").strip()
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_command_config(cli_value: str | os.PathLike[str] | None = None) -> ArcaeConfig:
    """The configuration a command runs on: the file ``locate_config`` finds, else the defaults.

    A file named by ``--config`` or ``$ARCAE_CONFIG`` must exist (``ConfigError`` if not)."""
    path = locate_config(cli_value)
    if path is None:
        return parse_config({}, base_dir=Path.cwd(), source="built-in defaults")
    return load_config(path)


def load_config(path: str | os.PathLike[str] | None = None) -> ArcaeConfig:
    """Read and validate one config file (by default the one ``locate_config`` finds)."""
    p = Path(path) if path else (locate_config(None) or DEFAULT_CONFIG_PATH)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file not found: {p} (pass --config FILE or set {CONFIG_ENV}; "
            "the repository's config.toml is a complete example)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(data, base_dir=p.resolve().parent, source=str(p))
