"""Diffusers schedulers for the A1111 sampler names of ``engine.contract.samplers``.

Each scheduler is built from the pipeline's own scheduler config, so the model's training
schedule (betas, prediction type) is kept.
"""

from __future__ import annotations

from typing import Any

from engine.contract.samplers import (  # noqa: F401  (re-exported: the generation library's sampler API)
    DEFAULT_SAMPLER,
    FAST_SAMPLER,
    SamplerSpec,
    available_samplers,
    get_sampler,
    sampler_from_infotext,
)


def sampler_supports_zero_snr(name: str) -> bool:
    """Whether the sampler's diffusers scheduler can rescale betas to zero terminal SNR (v-prediction bases)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, get_sampler(name).scheduler_class)
    return "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler for sampler ``name`` built from a pipeline's scheduler config.

    A new object per job: schedulers carry per-run state (step index, multistep history), and
    the img2img pipeline shares components with the text-to-image one.
    """
    import diffusers

    spec = get_sampler(name)
    cls = getattr(diffusers, spec.scheduler_class)
    return cls.from_config(dict(base_config), **spec.options)
