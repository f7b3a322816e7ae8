"""Few-step fast modes: each distilled SDXL adapter runs with the scheduler recipe its authors publish.

A fast mode is a LoRA distilled for few steps plus a sampling recipe; the wrong scheduler gives
blurred or burnt images without any error, so the recipe travels with the adapter:

- ``lcm``: LCM-LoRA (latent-consistency/lcm-lora-sdxl): LCMScheduler, 4-8 steps, CFG 1-2.
- ``tcd``: TCD-LoRA (h1t/TCD-SDXL-LoRA): TCDScheduler, 4 steps, no CFG, eta (the paper's gamma) 0.3.
- ``dmd2``: DMD2 4-step LoRA (tianweiy/DMD2): LCMScheduler at timesteps 999/749/499/249, no CFG.
- ``hyper-sd``: Hyper-SD SDXL n-step LoRAs (ByteDance/Hyper-SD): DDIM, trailing timesteps, no CFG.
- ``lightning``: SDXL-Lightning n-step LoRAs (ByteDance/SDXL-Lightning): Euler, trailing, no CFG.

``[adapters] fast`` names the installed adapters and their recipes; the configured LCM adapter is
always the ``lcm`` mode. Every published adapter was distilled from an epsilon-prediction SDXL base,
so on a v-prediction base a mode is refused unless its entry says ``prediction = "v"``.
This module imports no torch; ``make_fast_scheduler`` imports diffusers when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from engine.contract.config import AdaptersConfig, GenerationConfig
from engine.contract.errors import InvalidRequest, UnknownAdapter

# Which mode "fast" means when several are installed: the best quality at 4 steps first.
PREFERENCE = ("dmd2", "hyper-sd", "lightning", "tcd", "lcm")
# Per-request weights of a few-step adapter; far outside this range they stop being few-step models.
MIN_WEIGHT, MAX_WEIGHT = 0.1, 1.5
BEST = ("", "on", "auto", "best", "true")


@dataclass(frozen=True)
class FastRecipe:
    """A published few-step sampling recipe: scheduler, its options and the limits it works within."""

    name: str
    title: str
    source: str  # where the adapter and its recipe are published
    scheduler_class: str
    infotext_sampler: str  # A1111 sampler name written into the infotext
    schedule_type: str  # A1111 schedule type ("SGM Uniform" is A1111's trailing schedule)
    steps: tuple[int, int]
    default_steps: int
    cfg: tuple[float, float] = (0.0, 1.0)  # CFG <= 1 means no classifier-free guidance
    default_cfg: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # from_config overrides
    timesteps: tuple[int, ...] = ()  # fixed timesteps (DMD2)
    eta: float | None = None  # TCD's gamma


RECIPES: dict[str, FastRecipe] = {
    r.name: r
    for r in (
        FastRecipe("lcm", "LCM-LoRA", "latent-consistency/lcm-lora-sdxl", "LCMScheduler", "LCM", "Automatic",
                   steps=(1, 8), default_steps=6, cfg=(0.0, 2.0)),
        FastRecipe("tcd", "TCD-LoRA", "h1t/TCD-SDXL-LoRA", "TCDScheduler", "TCD", "Automatic",
                   steps=(1, 8), default_steps=4, eta=0.3),
        FastRecipe("dmd2", "DMD2 4-step LoRA", "tianweiy/DMD2", "LCMScheduler", "LCM", "SGM Uniform",
                   steps=(4, 4), default_steps=4, timesteps=(999, 749, 499, 249)),
        FastRecipe("hyper-sd", "Hyper-SD SDXL LoRA", "ByteDance/Hyper-SD", "DDIMScheduler", "DDIM", "SGM Uniform",
                   steps=(2, 8), default_steps=8, options={"timestep_spacing": "trailing"}),
        FastRecipe("lightning", "SDXL-Lightning LoRA", "ByteDance/SDXL-Lightning", "EulerDiscreteScheduler", "Euler",
                   "SGM Uniform", steps=(2, 8), default_steps=4, options={"timestep_spacing": "trailing"}),
    )
}


@dataclass(frozen=True)
class FastChoice:
    """One installed few-step adapter with its recipe and the defaults and limits a request gets."""

    adapter: str
    recipe: FastRecipe
    default_steps: int
    steps: tuple[int, int]
    default_cfg: float
    cfg: tuple[float, float]
    default_weight: float
    eta: float | None
    prediction: str  # "epsilon" or "v": the base the adapter was distilled from


def configured_modes(adapters: AdaptersConfig, gen: GenerationConfig) -> list[FastChoice]:
    """Every configured few-step adapter (``[adapters] fast`` plus the LCM adapter), in preference order."""
    modes: list[FastChoice] = []
    for entry in adapters.fast:
        recipe = RECIPES[entry.recipe]
        if entry.recipe == "lcm":
            modes.append(_lcm_choice(entry.name, gen, entry.steps, entry.weight, entry.prediction))
            continue
        steps = entry.steps if entry.steps is not None else recipe.default_steps
        low, high = recipe.steps
        if not low <= steps <= high:
            raise InvalidRequest(
                f"[adapters] fast {entry.name}: steps = {steps} is outside what {recipe.title} works with ({low}-{high})"
            )
        modes.append(FastChoice(
            adapter=entry.name, recipe=recipe, default_steps=steps, steps=recipe.steps,
            default_cfg=recipe.default_cfg, cfg=recipe.cfg,
            default_weight=entry.weight if entry.weight is not None else 1.0,
            eta=entry.eta if entry.eta is not None else recipe.eta, prediction=entry.prediction,
        ))
    if adapters.lcm_adapter and all(m.adapter != adapters.lcm_adapter for m in modes):
        modes.append(_lcm_choice(adapters.lcm_adapter, gen, None, None, "epsilon"))
    return sorted(modes, key=lambda m: PREFERENCE.index(m.recipe.name))


def _lcm_choice(name: str, gen: GenerationConfig, steps: int | None, weight: float | None, prediction: str) -> FastChoice:
    # LCM keeps the [generation] fast_* defaults it always had.
    return FastChoice(
        adapter=name, recipe=RECIPES["lcm"], default_steps=steps or gen.fast_steps,
        steps=(gen.min_steps, max(8, gen.fast_steps)), default_cfg=gen.fast_cfg,
        cfg=(gen.min_cfg, max(2.0, gen.fast_cfg)),
        default_weight=gen.fast_lcm_weight if weight is None else weight, eta=None, prediction=prediction,
    )


def choose_mode(
    modes: list[FastChoice],
    wanted: str | None,
    *,
    installed: Callable[[str], bool],
    base_prediction: str,
    missing_hint: str,
) -> FastChoice:
    """The fast mode a request gets: ``wanted`` (a recipe or adapter name) or the best installed one.

    Raises ``InvalidRequest`` for an unknown mode or one made for the other prediction type, and
    ``UnknownAdapter`` when the adapter file is not installed (``missing_hint`` says how to get it).
    """
    key = (wanted or "").strip().casefold()
    if key in BEST:
        ready = [m for m in modes if installed(m.adapter)]
        if not ready:
            raise UnknownAdapter(missing_hint)
        fitting = [m for m in ready if _fits(m, base_prediction)]
        if not fitting:
            raise InvalidRequest(mismatch_message(ready[0], base_prediction))
        return fitting[0]
    matches = [m for m in modes if key in (m.recipe.name, m.adapter.casefold())]
    if not matches:
        names = ", ".join(sorted({m.recipe.name for m in modes} | {m.adapter for m in modes}))
        raise InvalidRequest(f"unknown fast mode {wanted!r}; configured: {names} (or 'best' for the best installed)")
    ready = [m for m in matches if installed(m.adapter)]
    if not ready:
        m = matches[0]
        raise UnknownAdapter(
            f"fast mode {m.recipe.name} needs the adapter {m.adapter!r}, which is not installed; "
            f"download the {m.recipe.title} from {m.recipe.source} into the adapters directory as {m.adapter}.safetensors"
        )
    fitting = [m for m in ready if _fits(m, base_prediction)]
    if not fitting:
        raise InvalidRequest(mismatch_message(ready[0], base_prediction))
    return fitting[0]


def _fits(mode: FastChoice, base_prediction: str) -> bool:
    return (mode.prediction == "v") == (base_prediction == "v_prediction")


def mismatch_message(mode: FastChoice, base_prediction: str) -> str:
    """Why a few-step adapter cannot run on this base (epsilon-distilled on v-prediction or back)."""
    if base_prediction == "v_prediction":
        return (
            f"fast mode {mode.recipe.name} ({mode.adapter}) was distilled from an epsilon-prediction SDXL model and "
            "gives washed-out or broken images on this v-prediction base; use the standard mode, or install a "
            "few-step adapter made for v-prediction and list it under [adapters] fast with prediction = \"v\""
        )
    return (
        f"fast mode {mode.recipe.name} ({mode.adapter}) is made for v-prediction models and does not work on this "
        "epsilon-prediction base; use the standard mode or another fast mode"
    )


def check_weight(mode: FastChoice, weight: float | None) -> float:
    """The adapter weight a request runs with: its own (within bounds) or the mode's default."""
    if weight is None:
        return mode.default_weight
    high = max(MAX_WEIGHT, mode.default_weight)
    if not MIN_WEIGHT <= weight <= high:
        raise InvalidRequest(
            f"fast weight must be between {MIN_WEIGHT:g} and {high:g} for {mode.recipe.title} (got {weight:g})"
        )
    return float(weight)


def make_fast_scheduler(recipe: FastRecipe, base_config: Any) -> Any:
    """A fresh scheduler for ``recipe`` from the model's scheduler config (betas, prediction type kept)."""
    import diffusers

    cls = getattr(diffusers, recipe.scheduler_class)
    return cls.from_config(dict(base_config), **recipe.options)


def pipeline_kwargs(recipe: FastRecipe, eta: float | None) -> dict[str, Any]:
    """What the recipe adds to the pipeline call: fixed timesteps (DMD2), eta (TCD)."""
    extra: dict[str, Any] = {}
    if recipe.timesteps:
        extra["timesteps"] = list(recipe.timesteps)
    if eta is not None:
        extra["eta"] = eta
    return extra


def stored_fast_request(base: dict[str, Any], modes: list[FastChoice]) -> dict[str, Any]:
    """A stored fast request (a variation's source) as a new request: the mode adds its adapter itself."""
    fast_names = {m.adapter for m in modes}
    stored = base.get("adapters", [])
    weights = [a.get("weight") for a in stored if a.get("name") in fast_names]
    out = {k: v for k, v in base.items() if k != "sampler"}  # the recipe decides it (TCD is no standard sampler)
    out["adapters"] = [a for a in stored if a.get("name") not in fast_names]
    out["fast_mode"] = base.get("fast_mode") or "lcm"  # images from before fast modes ran LCM
    if weights and weights[0] is not None:
        out["fast_weight"] = weights[0]
    return out


def sampling_for(resolved: Any, base_config: Any) -> tuple[Any, dict[str, Any]]:
    """The scheduler and extra pipeline arguments a resolved request runs with (standard or fast mode)."""
    from engine.generation.samplers import make_scheduler

    if resolved.fast_mode:
        recipe = RECIPES[resolved.fast_mode]
        scheduler, extra = make_fast_scheduler(recipe, base_config), pipeline_kwargs(recipe, resolved.eta)
    else:
        scheduler, extra = make_scheduler(resolved.sampler, base_config), {}
    if resolved.cfg_rescale:  # v-prediction bases with CFG on
        extra["guidance_rescale"] = resolved.cfg_rescale
    return scheduler, extra


# ------------------------------------------------------------------ distilled fast adapters


def wants_distilled(wanted: str | None) -> bool:
    """Whether a fast request may run a mix's own distilled adapter: 'best' (the default) or 'lcm'."""
    return (wanted or "").strip().casefold() in BEST + ("lcm",)


def find_distilled(entries: list[Any], mix: list[Any]) -> Any | None:
    """The adapter entry distilled for exactly ``mix`` (few-step adapters left out), or None.

    ``entries``: scanned ``AdapterEntry`` objects; a binding matches on names and weights to 0.01.
    """
    from engine.contract.distilled_mix import MixError, normalise_mix

    try:
        wanted = normalise_mix(mix)
    except MixError:
        return None
    for entry in sorted(entries, key=lambda e: e.name):
        # Distilled on this server's base (whichever prediction type it has): no prediction check.
        if entry.kind == "lcm" and entry.distilled_for == wanted and entry.problem is None:
            return entry
    return None


def distilled_choice(name: str, prediction: str = "epsilon", default_steps: int = 4) -> FastChoice:
    """The ``lcm`` recipe with a distilled adapter: 4 steps, no CFG (the teacher's CFG is baked in)."""
    recipe = RECIPES["lcm"]
    return FastChoice(
        adapter=name, recipe=recipe, default_steps=default_steps, steps=(1, 8), default_cfg=1.0, cfg=(1.0, 2.0),
        default_weight=1.0, eta=None, prediction=prediction,
    )
