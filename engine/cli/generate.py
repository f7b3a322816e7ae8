"""``python -m engine generate PROMPT ...``: generate images from the command line.

Prints each written file's path on its own line on stdout; a progress bar goes to stderr. Bad
input (unknown adapter, bad size, steps/CFG out of range, missing model) exits 2 with one line
that says what is allowed, checked before the model loads where possible.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from engine.cli import CliError
from engine.contract.config import CONFIG_HELP

HELP = "generate images from a prompt (prints the written PNG paths)"
_ADAPTER = re.compile(r"^(?P<name>[^:]+?)(?::(?P<weight>[-+]?\d+(?:\.\d+)?))?$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (A1111 syntax: (tag:1.2), [tag], BREAK)")
    p.add_argument("--model", help="hub repository id, diffusers folder or .safetensors file (default: [model] source)")
    p.add_argument("--negative", help="negative prompt (default: [generation] negative_prompt)")
    p.add_argument("--seed", type=int, help="seed of the first image (default: random; always printed in the PNG)")
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--cfg", type=float, help="CFG scale")
    p.add_argument("--size", help="WIDTHxHEIGHT or a preset (square, portrait, landscape, ...)")
    p.add_argument("--count", type=int, default=1, help="images in one batch (seeds seed..seed+count-1)")
    p.add_argument("--sampler", help="A1111 sampler name (default: [generation] sampler)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME[:WEIGHT]", help="add a LoRA to the mix (repeatable)")
    p.add_argument("--adapters-dir", help="adapter directory (default: [adapters] dir)")
    p.add_argument("--fast", action="store_true", help="fast mode: the best installed few-step adapter, few steps")
    p.add_argument("--fast-mode", metavar="MODE", help="fast mode with this recipe (dmd2, hyper-sd, lightning, tcd, lcm) or adapter")
    p.add_argument("--fast-weight", type=float, metavar="W", help="weight of the fast-mode adapter (0.1-1.5)")
    p.add_argument("--no-quality-tags", action="store_true", help="do not prepend the configured quality tags")
    p.add_argument("--out", help="output directory (default: [storage] outputs_dir)")
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)


def _load_config(args: argparse.Namespace) -> Any:
    """The config file (when given or present) with the command-line overrides applied."""
    from engine.cli import load_cli_config

    config = load_cli_config(args.config)

    def section(name: str, **values: Any) -> None:
        nonlocal config
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            updated = getattr(config, name).model_copy(update=values)
            config = config.model_copy(update={name: updated})

    cwd = Path.cwd()
    section("model", source=str(cwd / args.model) if args.model and (cwd / args.model).exists() else args.model)
    section("adapters", dir=cwd / args.adapters_dir if args.adapters_dir else None)
    section("storage", outputs_dir=cwd / args.out if args.out else None)
    return config


def _adapter_mix(values: list[str]) -> list[Any]:
    from engine.contract.protocol import AdapterWeight

    mix = []
    for value in values:
        match = _ADAPTER.fullmatch(value.strip())
        if not match:
            raise CliError(f"bad --adapter {value!r}: use NAME or NAME:WEIGHT (e.g. mystyle:0.8)")
        weight = match.group("weight")
        try:
            mix.append(AdapterWeight(name=match.group("name"), weight=float(weight) if weight is not None else None))
        except ValueError:
            raise CliError(f"bad --adapter {value!r}: names are letters, digits, '.', '_', '-'; weights -4 to 4") from None
    return mix


def _range_message(config: Any, field: str, value: Any, fast: bool) -> str | None:
    """The configured range for steps/CFG/count, for values beyond even the protocol's bounds."""
    from engine.contract import limits

    gen = config.generation
    if field == "steps":
        return limits.steps_problem(gen, value, fast)
    if field == "cfg":
        return limits.cfg_problem(gen, value, fast)
    return limits.count_problem(gen, value) if field == "count" else None


def _request(args: argparse.Namespace, config: Any) -> Any:
    from pydantic import ValidationError

    from engine.contract.errors import InvalidRequest
    from engine.generation.params import parse_size
    from engine.contract.protocol import GenerationParams

    width = height = None
    try:
        if args.size:
            width, height = parse_size(args.size)
        return GenerationParams(
            prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, steps=args.steps, cfg=args.cfg,
            width=width, height=height, count=args.count, sampler=args.sampler,
            adapters=_adapter_mix(args.adapter), fast=args.fast or bool(args.fast_mode),
            fast_mode=args.fast_mode, fast_weight=args.fast_weight,
            add_quality_tags=False if args.no_quality_tags else None,
        )
    except InvalidRequest as exc:
        raise CliError(exc.message) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err.get("loc", ()))
        message = _range_message(config, field, err.get("input"), args.fast)
        raise CliError(message or f"bad value for {field}: {err.get('msg')} (got {err.get('input')!r})") from None


def _precheck(config: Any, params: Any) -> None:
    """Reject bad values before spending time on loading the model."""
    from engine.contract.errors import EngineError
    from engine.generation.params import fast_lcm_missing_message, resolve_params
    from engine.generation.fast_modes import check_weight

    adapters_dir = config.path(config.adapters.dir)
    known = sorted(p.stem for p in adapters_dir.glob("*.safetensors")) if adapters_dir.is_dir() else []
    for adapter in params.adapters:
        if adapter.name not in known:
            listed = ", ".join(known) if known else f"none installed in {adapters_dir}"
            raise CliError(f"unknown adapter {adapter.name!r}; known adapters: {listed}")
    try:
        mode = _fast_mode(config, params, known) if params.fast else None
        fast_adapter = (mode.adapter, check_weight(mode, params.fast_weight)) if mode else None
        resolve_params(config.generation, params, max_active=config.adapters.max_active,
                       fast_mode=mode, fast_adapter=fast_adapter)
    except EngineError as exc:
        raise CliError(exc.message) from None


def _fast_mode(config: Any, params: Any, known: list[str]) -> Any:
    """The fast mode a request will get; whether it fits the base is checked once the model is loaded."""
    from engine.contract.errors import InvalidRequest
    from engine.generation.fast_modes import choose_mode, configured_modes
    from engine.generation.params import fast_lcm_missing_message

    modes = configured_modes(config.adapters, config.generation)
    missing = fast_lcm_missing_message(config.adapters.lcm_adapter, str(config.path(config.adapters.dir)))
    failure: InvalidRequest | None = None
    for prediction in ("epsilon", "v_prediction"):
        try:
            return choose_mode(modes, params.fast_mode, installed=known.__contains__, base_prediction=prediction,
                               missing_hint=missing)
        except InvalidRequest as exc:
            failure = failure or exc
    raise failure


def run(args: argparse.Namespace) -> int:
    config = _load_config(args)
    params = _request(args, config)
    _precheck(config, params)

    from tqdm import tqdm

    from engine.contract.errors import EngineError
    from engine.generation.generator import Generator

    try:
        generator = Generator.from_config(config)
    except EngineError as exc:
        raise CliError(exc.message) from None
    bar = tqdm(total=1, desc="sampling", unit="step", file=sys.stderr, leave=False)

    def on_step(step: int, total: int, preview: Any) -> None:
        bar.total = total
        bar.n = step
        bar.refresh()

    on_step.wants_preview = lambda step, total: False  # type: ignore[attr-defined]  # a bar shows no image
    job_id = f"cli-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1_000_000:06d}"
    try:
        output = generator.generate(params, job_id=job_id, on_step=on_step)
    except EngineError as exc:
        raise CliError(exc.message) from None
    finally:
        bar.close()
    for warning in output.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for image in output.images:
        print(image.path, flush=True)
    return 0
