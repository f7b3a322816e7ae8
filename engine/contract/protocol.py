"""The one typed, versioned protocol between the bot and the engine.

Imports only the standard library and pydantic: the bot imports this module (and
``engine.contract.config``), never anything that pulls in torch. Messages travel as JSON objects with a
``type`` discriminator; never pickle. The same messages travel over the engine's websocket
(single machine) and over Redis Streams (scale-out).

Every job event carries ``job_id``, ``attempt`` and ``seq`` so that a receiver can apply
events idempotently and ignore events from an older attempt.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from engine.contract.training_options import TrainOverrides

# 2: challenge-response handshake (Hello / Challenge / HelloProof); the secret never travels.
PROTOCOL_VERSION = 2

# Adapter names are file stems: no path separators, no leading dot, bounded length.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
JOB_ID_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
# Handshake nonces: 32 random bytes as hex; proofs: HMAC-SHA256 as hex.
NONCE_PATTERN = r"^[0-9a-f]{64}$"
PROOF_PATTERN = r"^[0-9a-f]{64}$"
# Hard ceilings of the wire format; configured limits (engine.contract.config) are usually tighter.
MAX_PROMPT_CHARS = 20_000
MAX_ADAPTERS_PER_REQUEST = 32
MAX_COUNT = 8
MAX_SEED = 2**32 - 1
# A result image travels as base64 inside its Completed event (see ImageResult): at most this
# many bytes per image, so one Completed is at most MAX_COMPLETED_CHARS of JSON.
MAX_RESULT_IMAGE_BYTES = 32 << 20
MAX_RESULT_IMAGE_B64_CHARS = 4 * ((MAX_RESULT_IMAGE_BYTES + 2) // 3)
MAX_COMPLETED_CHARS = MAX_COUNT * MAX_RESULT_IMAGE_B64_CHARS + (1 << 20)


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdapterWeight(_Msg):
    """One adapter of a mix; ``weight`` None means the adapter's default weight."""

    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    weight: float | None = Field(None, ge=-4.0, le=4.0)


class GenerationParams(_Msg):
    """What a user asks for. None means 'the configured default'."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=500)
    cfg: float | None = Field(None, ge=0.0, le=50.0)
    width: int | None = Field(None, ge=8, le=8192)
    height: int | None = Field(None, ge=8, le=8192)
    count: int = Field(1, ge=1, le=MAX_COUNT)
    sampler: str | None = Field(None, max_length=64)
    adapters: list[AdapterWeight] = Field(default_factory=list, max_length=MAX_ADAPTERS_PER_REQUEST)
    fast: bool = False
    # Which few-step mode (a recipe such as "dmd2", or an adapter name; None = the best installed)
    # and its adapter weight (None = the mode's default). Setting fast_mode implies fast.
    fast_mode: str | None = Field(None, max_length=64)
    fast_weight: float | None = Field(None, ge=0.0, le=2.0)
    add_quality_tags: bool | None = None
    # img2img from a user's picture (Img2ImgRequest mode "image"): how far to move from it, 0-1.
    strength: float | None = Field(None, gt=0.0, le=1.0)


class ResolvedParams(_Msg):
    """Parameters after defaults and the adapter mix were applied: exactly what ran."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    count: int
    sampler: str
    adapters: list[AdapterWeight]
    fast: bool
    mode: Literal["txt2img", "variation", "upscale", "image"] = "txt2img"
    fast_mode: str | None = None  # the few-step recipe that ran ("lcm", "dmd2", ...)
    fast_distilled: str | None = None  # the few-step adapter distilled for this very mix that ran, if one did
    eta: float | None = None  # the recipe's eta (TCD's gamma), when it has one
    cfg_rescale: float = 0.0  # guidance_rescale applied (v-prediction bases with CFG)
    strength: float | None = None
    source_image: str | None = None


# ---------------------------------------------------------------- requests (bot -> engine)

Priority = Literal["interactive", "batch"]


class Hello(_Msg):
    """First message on a connection: the client's protocol version and a fresh random nonce.

    The shared secret never travels: the engine answers with ``Challenge`` (its own nonce and
    its proof that it knows the secret), the client checks it and answers ``HelloProof``.
    """

    type: Literal["hello"] = "hello"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    version: int = PROTOCOL_VERSION
    nonce: str = Field(pattern=NONCE_PATTERN)
    client: str = Field("", max_length=200)


class HelloProof(_Msg):
    """The client's answer to ``Challenge``: HMAC proof that it knows the shared secret."""

    type: Literal["hello_proof"] = "hello_proof"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    proof: str = Field(pattern=PROOF_PATTERN)


class GenerateRequest(_Msg):
    type: Literal["generate"] = "generate"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    owner: str = Field(min_length=1, max_length=64)
    priority: Priority = "interactive"
    attempt: int = Field(1, ge=1, le=100)
    params: GenerationParams


class Img2ImgRequest(_Msg):
    """A variation (same prompt, new seed) or an upscale (hires fix) of an existing image, or
    ``image``: img2img from a user's uploaded picture (no stored request; ``params`` is the whole request)."""

    type: Literal["img2img"] = "img2img"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    owner: str = Field(min_length=1, max_length=64)
    priority: Priority = "interactive"
    attempt: int = Field(1, ge=1, le=100)
    mode: Literal["variation", "upscale", "image"]
    # File name (not a path) of an image in the engine's outputs directory.
    source: str = Field(pattern=r"^[A-Za-z0-9_\-.]{1,128}\.png$")
    strength: float | None = Field(None, gt=0.0, le=1.0)
    params: GenerationParams


class CancelRequest(_Msg):
    type: Literal["cancel"] = "cancel"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    job_id: str = Field(pattern=JOB_ID_PATTERN)


class ListAdaptersRequest(_Msg):
    type: Literal["list_adapters"] = "list_adapters"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply


class ReloadAdaptersRequest(_Msg):
    type: Literal["reload_adapters"] = "reload_adapters"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply


class StatusRequest(_Msg):
    type: Literal["status"] = "status"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply


class TrainRequest(_Msg):
    """Start (or resume) a LoRA training run on the engine's GPU worker."""

    type: Literal["train"] = "train"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    owner: str = Field(min_length=1, max_length=64)
    attempt: int = Field(1, ge=1, le=100)
    # Training options as the training CLI names them; unset ones come from the engine's [training].
    options: TrainOverrides = Field(default_factory=TrainOverrides)


class DriftOptions(_Msg):
    """What a drift measurement compares (empty lists: the defaults of ``training.data.drift_report``)."""

    adapters: list[AdapterWeight] = Field(default_factory=list, max_length=MAX_ADAPTERS_PER_REQUEST)
    prompts: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(default_factory=list, max_length=8)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=list, max_length=4)
    modes: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=8)
    lcm_weights: list[Annotated[float, Field(ge=0.1, le=1.5)]] = Field(default_factory=list, max_length=8)
    steps: list[Annotated[int, Field(ge=1, le=8)]] = Field(default_factory=list, max_length=8)
    # A training run's checkpoint to measure in the mix (the run's job id, never a path; step None:
    # the chosen, else the recommended one): the report goes to the run's folder and run.json.
    checkpoint_run: str | None = Field(None, pattern=JOB_ID_PATTERN)
    checkpoint_step: int | None = Field(None, ge=0)


class DriftRequest(_Msg):
    """Measure each installed few-step mode against the standard mode, on the engine's GPU worker.

    Runs in the training slot (one step = one image, between generation jobs); ``Completed.result``
    carries the table, the recommendation and the chart (``chart_png_b64``).
    """

    type: Literal["drift"] = "drift"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    owner: str = Field(min_length=1, max_length=64)
    attempt: int = Field(1, ge=1, le=100)
    options: DriftOptions = Field(default_factory=DriftOptions)


class DistillSettings(_Msg):
    """A distillation run's settings, named as ``training.data.distill_setup.DistillOptions`` (None: its default)."""

    name: str = Field(pattern=ADAPTER_NAME_PATTERN)  # the distilled adapter's name
    mix: list[AdapterWeight] = Field(default_factory=list, max_length=MAX_ADAPTERS_PER_REQUEST)
    # The teacher's captions: a dataset NAME in [storage] datasets_dir (never a path), or the captions.
    dataset: str | None = Field(None, pattern=ADAPTER_NAME_PATTERN)
    captions: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(default_factory=list, max_length=256)
    steps: int | None = Field(None, ge=1, le=100_000)
    teacher_cfg: float | None = Field(None, ge=1.0, le=30.0)
    teacher_steps: int | None = Field(None, ge=1, le=150)
    student_steps: int | None = Field(None, ge=1, le=8)
    lr: float | None = Field(None, ge=1e-7, le=1e-1)
    rank: int | None = Field(None, ge=1, le=256)
    resolution: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    save_every: int | None = Field(None, ge=1, le=100_000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    init: Literal["auto", "scratch"] | None = None
    # Make the result live: only when the run's judge recommends it, always, or never (run folder only).
    install: Literal["recommended", "always", "never"] = "recommended"


class DistillRequest(_Msg):
    """Distil a few-step (``lcm``) adapter for a mix in the GPU worker's training slot, like a ``TrainRequest``;
    ``Completed.result`` carries the judge's numbers and whether it was installed."""

    type: Literal["distill"] = "distill"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    owner: str = Field(min_length=1, max_length=64)
    attempt: int = Field(1, ge=1, le=100)
    options: DistillSettings


Request = Annotated[
    Union[
        Hello,
        HelloProof,
        GenerateRequest,
        Img2ImgRequest,
        CancelRequest,
        ListAdaptersRequest,
        ReloadAdaptersRequest,
        StatusRequest,
        TrainRequest,
        DriftRequest,
        DistillRequest,
    ],
    Field(discriminator="type"),
]

# ---------------------------------------------------------------- events (engine -> bot)


class _JobEvent(_Msg):
    job_id: str
    attempt: int = 1
    seq: int = 0


class Challenge(_Msg):
    """The engine's answer to ``Hello``: its nonce and its HMAC proof that it knows the secret."""

    type: Literal["challenge"] = "challenge"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    version: int = PROTOCOL_VERSION
    nonce: str = Field(pattern=NONCE_PATTERN)
    proof: str = Field(pattern=PROOF_PATTERN)


class HelloOk(_Msg):
    type: Literal["hello_ok"] = "hello_ok"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    version: int = PROTOCOL_VERSION
    engine: str = ""


class Queued(_JobEvent):
    type: Literal["queued"] = "queued"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    position: int = Field(ge=0)
    # Queued again because the worker running it stopped (Redis scale-out reclaimed its lease):
    # the bot shows the same "engine restarting" notice as when its one engine restarts.
    restarted: bool = False


class Started(_JobEvent):
    type: Literal["started"] = "started"
    worker: str = ""


class Progress(_JobEvent):
    type: Literal["progress"] = "progress"
    step: int = Field(ge=0)
    total: int = Field(ge=1)
    # Optional cheap preview: base64 JPEG, small.
    preview_jpeg_b64: str | None = None
    # Training progress carries loss.
    loss: float | None = None


class ImageResult(_Msg):
    """One output image. ``data_b64`` is the image itself (PNG or JPEG, base64): the bot keeps
    only those bytes, after checking them, and never reads ``path`` (the engine's own file,
    informational; it may be on another host)."""

    path: str = Field(max_length=4096)
    seed: int
    width: int
    height: int
    sha256: str
    rating: Literal["general", "sensitive", "questionable", "explicit"] | None = None
    rating_scores: dict[str, float] | None = None
    data_b64: str | None = Field(None, max_length=MAX_RESULT_IMAGE_B64_CHARS, repr=False)


class Completed(_JobEvent):
    type: Literal["completed"] = "completed"
    images: list[ImageResult] = Field(default_factory=list)
    params: ResolvedParams | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    # Training runs report their run directory and recommended checkpoint.
    result: dict[str, Any] = Field(default_factory=dict)


class Failed(_JobEvent):
    type: Literal["failed"] = "failed"
    error: str  # one of ErrorCode
    message: str
    retryable: bool = False


class Canceled(_JobEvent):
    type: Literal["canceled"] = "canceled"


class AdapterInfo(_Msg):
    name: str
    kind: Literal["style", "character", "lcm", "other"] = "other"
    triggers: list[str] = Field(default_factory=list)
    default_weight: float = 1.0
    description: str = ""
    base_model: str = ""
    format: str = ""
    sha256: str = ""
    preview: str | None = None


class AdapterList(_Msg):
    type: Literal["adapters"] = "adapters"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    adapters: list[AdapterInfo]


class EngineStatus(_Msg):
    type: Literal["status"] = "status"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    model: str
    device: str
    dtype: str = ""
    vram_used_mb: float | None = None
    vram_total_mb: float | None = None
    queue_length: int = 0
    running_job: str | None = None
    loaded_adapters: list[str] = Field(default_factory=list)
    worker: str = ""
    training_run: str | None = None
    # Whether outputs get a content rating (WD tagger); None: not said (an older engine).
    rates_outputs: bool | None = None


class Ack(_Msg):
    """Reply to a request that has no other answer (cancel, reload)."""

    type: Literal["ack"] = "ack"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    request: str
    detail: str = ""


ErrorCode = Literal[
    "bad_request",  # failed validation
    "unknown_adapter",
    "queue_full",
    "unauthorized",
    "version_mismatch",
    "not_found",
    "out_of_memory",
    "engine_error",
    "engine_unavailable",
    "canceled",
    "incompatible_adapter",
    "model_missing",
]


class ErrorResponse(_Msg):
    type: Literal["error"] = "error"
    rid: str | None = Field(None, max_length=64)  # request id, echoed by the reply
    code: ErrorCode
    message: str
    job_id: str | None = None


Event = Annotated[
    Union[
        Challenge,
        HelloOk,
        Queued,
        Started,
        Progress,
        Completed,
        Failed,
        Canceled,
        AdapterList,
        EngineStatus,
        Ack,
        ErrorResponse,
    ],
    Field(discriminator="type"),
]

JOB_EVENT_TYPES = (Queued, Started, Progress, Completed, Failed, Canceled)
TERMINAL_EVENT_TYPES = (Completed, Failed, Canceled)

_request_adapter: TypeAdapter[Any] = TypeAdapter(Request)
_event_adapter: TypeAdapter[Any] = TypeAdapter(Event)


class ProtocolError(ValueError):
    """A message could not be decoded; ``message`` is safe to send back to the peer."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _decode(adapter: TypeAdapter[Any], data: str | bytes | dict[str, Any]) -> Any:
    try:
        if isinstance(data, (str, bytes, bytearray)):
            return adapter.validate_json(data)
        return adapter.validate_python(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{loc or 'message'}: {err.get('msg')}")
        raise ProtocolError("invalid message: " + "; ".join(parts)) from None
    except json.JSONDecodeError as exc:  # pragma: no cover - pydantic wraps JSON errors
        raise ProtocolError(f"invalid JSON: {exc}") from None


def decode_request(data: str | bytes | dict[str, Any]) -> Any:
    """Parse and validate one request; raise ``ProtocolError`` with a short reason."""
    return _decode(_request_adapter, data)


def decode_event(data: str | bytes | dict[str, Any]) -> Any:
    """Parse and validate one event; raise ``ProtocolError`` with a short reason."""
    return _decode(_event_adapter, data)


def new_nonce() -> str:
    """A fresh handshake nonce (32 random bytes, hex)."""
    return secrets.token_hex(32)


def handshake_proof(secret: str, role: Literal["engine", "client"], client_nonce: str, engine_nonce: str) -> str:
    """HMAC-SHA256 over both nonces, labelled by who proves: a proof never serves the other side."""
    text = f"arcae-engine-link v{PROTOCOL_VERSION} {role} {client_nonce} {engine_nonce}"
    return hmac.new(secret.encode("utf-8"), text.encode("ascii"), hashlib.sha256).hexdigest()


def proof_matches(expected: str, given: str) -> bool:
    """Constant-time comparison of two proofs."""
    return hmac.compare_digest(expected.encode("ascii", "replace"), given.encode("ascii", "replace"))


def encode(message: BaseModel) -> str:
    """Serialise a message to its JSON wire form."""
    return message.model_dump_json()
