"""AUTOMATIC1111 sampler names, as users type them and as the infotext writes them (torch-free).

Users know samplers by their A1111 names ("Euler a", "DPM++ 2M Karras"); A1111 (1.9+) writes
them into the infotext as a sampler plus a "Schedule type" ("DPM++ 2M" + "Karras"), and
Civitai and prompt readers expect that split. This table is the contract: the bot and the
training options check names against it; ``engine.generation.samplers`` builds the diffusers
scheduler for each. Samplers whose scheduler needs an optional package (LMS needs scipy,
DPM++ SDE needs torchsde) are offered only when that package is installed.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from engine.contract.errors import InvalidRequest

DEFAULT_SAMPLER = "Euler a"
FAST_SAMPLER = "LCM"


@dataclass(frozen=True)
class SamplerSpec:
    """One A1111 sampler: the diffusers scheduler class and the options that make it that sampler."""

    name: str  # the A1111 name a user types ("DPM++ 2M Karras")
    infotext_sampler: str  # "Sampler:" in the infotext ("DPM++ 2M")
    schedule_type: str  # "Schedule type:" in the infotext ("Karras" / "Automatic")
    scheduler_class: str  # diffusers class name
    options: dict[str, Any] = field(default_factory=dict)
    requires: str = ""  # an optional package the scheduler imports


_SPECS = (
    SamplerSpec("Euler a", "Euler a", "Automatic", "EulerAncestralDiscreteScheduler"),
    SamplerSpec("Euler", "Euler", "Automatic", "EulerDiscreteScheduler"),
    SamplerSpec(
        "DPM++ 2M", "DPM++ 2M", "Automatic", "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    SamplerSpec(
        "DPM++ 2M Karras", "DPM++ 2M", "Karras", "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    SamplerSpec(
        "DPM++ SDE Karras", "DPM++ SDE", "Karras", "DPMSolverSDEScheduler",
        {"use_karras_sigmas": True}, requires="torchsde",
    ),
    SamplerSpec("DDIM", "DDIM", "Automatic", "DDIMScheduler"),
    SamplerSpec("UniPC", "UniPC", "Automatic", "UniPCMultistepScheduler"),
    SamplerSpec("Heun", "Heun", "Automatic", "HeunDiscreteScheduler"),
    SamplerSpec("LMS", "LMS", "Automatic", "LMSDiscreteScheduler", requires="scipy"),
    SamplerSpec("LCM", "LCM", "Automatic", "LCMScheduler"),
)


@functools.lru_cache(maxsize=None)  # a filesystem search each time; every request's check asks
def _installed(package: str) -> bool:
    return not package or importlib.util.find_spec(package) is not None


def available_samplers() -> dict[str, SamplerSpec]:
    """The samplers usable in this environment, by A1111 name, in menu order."""
    return {s.name: s for s in _SPECS if _installed(s.requires)}


def get_sampler(name: str) -> SamplerSpec:
    """The sampler called ``name`` (case-insensitive); ``InvalidRequest`` lists the allowed names."""
    samplers = available_samplers()
    wanted = name.strip().casefold()
    for spec in samplers.values():
        if spec.name.casefold() == wanted:
            return spec
    raise InvalidRequest(f"unknown sampler {name!r}; allowed: {', '.join(samplers)}")


def sampler_from_infotext(sampler: str, schedule_type: str = "Automatic") -> str:
    """The A1111 name for an infotext's Sampler + Schedule type ("DPM++ 2M" + "Karras")."""
    for spec in available_samplers().values():
        if spec.infotext_sampler == sampler and spec.schedule_type.casefold() == (schedule_type or "Automatic").casefold():
            return spec.name
    return get_sampler(sampler).name
