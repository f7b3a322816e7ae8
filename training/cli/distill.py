"""``python -m training distill-fast``: distil a few-step LoRA for a base + adapter mix (standalone)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.contract.config import CONFIG_HELP

HELP = "distil a few-step (LCM-style) LoRA that keeps the style of a base + adapter mix"

# CLI flag -> DistillOptions field, passed through unchanged when given.
_PASS_THROUGH = ("steps", "lr", "rank", "batch_size", "resolution", "teacher_cfg", "solver_steps", "teacher_steps",
                 "student_steps", "huber_c", "negative_prompt", "init", "seed", "save_every")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--name", help="name of the distilled adapter (its file: NAME.safetensors)")
    p.add_argument("--mix", default=None, help='the teacher\'s adapters, e.g. "style:0.8,char_a:1" (empty: the base alone)')
    p.add_argument("--dataset", help="folder whose captions the teacher samples (default: [storage] datasets_dir/ADAPTER for the mix's adapters)")
    p.add_argument("--out", help="run directory (default: [storage] runs_dir/distill-NAME)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--stock", help="few-step adapter to start from and to judge against (default: [adapters] lcm_adapter when installed)")
    p.add_argument("--no-install", action="store_true", help="leave the result in the run directory only")
    g = p.add_argument_group("distillation")
    g.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    g.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    g.add_argument("--rank", type=int, help="LoRA rank when starting from scratch (default 64)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--resolution", type=int, help="square side in px (default 1024)")
    g.add_argument("--teacher-cfg", type=float, help="the teacher's CFG, baked into the student (default 6)")
    g.add_argument("--solver-steps", type=int, help="DDIM skipping-step schedule length (default 50)")
    g.add_argument("--teacher-steps", type=int, help="DDIM steps of the teacher's samples (default 25)")
    g.add_argument("--student-steps", type=int, help="steps the student is judged at (default 4)")
    g.add_argument("--huber-c", type=float, help="pseudo-Huber constant; 0 = mean squared error (default 0.001)")
    g.add_argument("--negative-prompt", help="the teacher's negative prompt (default: none)")
    g.add_argument("--init", choices=["auto", "scratch"], help="auto: start from the stock adapter when there is one")
    g.add_argument("--seed", type=int)
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (default 250)")


def _captions(args: argparse.Namespace, config: Any, mix: tuple[tuple[str, float], ...]) -> list[str]:
    from engine.contract.training_errors import TrainingError
    from training.cli import CliError
    from training.data.distill_setup import dataset_captions

    if args.dataset:
        folders = [Path(args.dataset)]
    else:
        root = Path(config.path(config.storage.datasets_dir))
        folders = [root / name for name, _ in mix if (root / name).is_dir()]
        if not folders:
            raise CliError(f"--dataset DIR required: no dataset named after the mix's adapters in {root}")
    try:
        return [c for folder in folders for c in dataset_captions(folder)]
    except TrainingError as exc:
        raise CliError(str(exc)) from None


def build(args: argparse.Namespace, config: Any) -> tuple[Any, Path, bool]:
    """The validated options, the run directory and whether to resume (raises ``CliError``)."""
    from engine.contract.distilled_mix import MixError, parse_mix_text
    from engine.contract.training_errors import TrainingError
    from training.cli import CliError
    from training.data.distill_setup import DistillOptions
    from training.data.run_record import read_run

    given = {k: getattr(args, k) for k in _PASS_THROUGH if getattr(args, k, None) is not None}
    try:
        if args.resume:
            saved = read_run(Path(args.resume)).get("options", {})
            saved = {**saved, "captions": tuple(saved.get("captions", ())), "eval_seeds": tuple(saved.get("eval_seeds", ())),
                     "mix": tuple(tuple(p) for p in saved.get("mix", ()))}
            return DistillOptions(**{**saved, **given}), Path(args.resume), True
        if not args.name:
            raise CliError("--name required (or --resume RUN_DIR)")
        mix = parse_mix_text(args.mix or "")
        options = DistillOptions(name=args.name, mix=mix, captions=tuple(_captions(args, config, mix)), **given)
    except (MixError, TrainingError, TypeError) as exc:
        raise CliError(str(exc)) from None
    run_dir = Path(args.out) if args.out else Path(config.path(config.storage.runs_dir)) / f"distill-{options.name}"
    return options, run_dir, False


def _stock(args: argparse.Namespace, config: Any, adapters_dir: Path) -> Path | None:
    from training.cli import CliError

    if args.stock:
        path = Path(args.stock)
        path = path if path.suffix == ".safetensors" else adapters_dir / f"{args.stock}.safetensors"
        if not path.is_file():
            raise CliError(f"--stock {args.stock}: no such adapter file ({path})")
        return path
    default = adapters_dir / f"{config.adapters.lcm_adapter}.safetensors"
    return default if config.adapters.lcm_adapter and default.is_file() else None


def run(args: argparse.Namespace) -> int:
    from engine.contract.training_errors import TrainingError
    from engine.generation.adapters import AdapterRegistry
    from training.cli import CliError
    from training.cli.train import _load_pipeline, run_to_end
    from training.learning.distill import DistillRun

    from engine.cli import load_cli_config

    config = load_cli_config(args.config)
    options, run_dir, resume = build(args, config)
    adapters_dir = Path(config.path(config.adapters.dir))
    stock = _stock(args, config, adapters_dir)
    loaded = _load_pipeline(config, "")
    loaded.pipe.set_progress_bar_config(disable=True)
    registry = AdapterRegistry(adapters_dir, loaded.pipe, lcm_adapter=config.adapters.lcm_adapter,
                               max_active=config.adapters.max_active)
    try:
        registry.resolve_mix(list(options.mix))  # unknown names answer before any step
        distill = DistillRun(loaded.pipe, options, run_dir, mixer=registry, stock=stock, resume=resume, base_model=loaded.name)
    except TrainingError as exc:
        raise CliError(str(exc)) from None
    except Exception as exc:  # UnknownAdapter / InvalidRequest from the registry
        raise CliError(getattr(exc, "message", str(exc))) from None
    code = run_to_end(distill, run_dir)
    if code is not None:
        return code
    r = distill.report
    print(f"done: {run_dir / 'adapter.safetensors'} (started from {'the stock adapter ' + str(stock) if distill.stock else 'scratch'})")
    print(judge_line(r, options.student_steps))
    if not args.no_install:
        print(f"installed: {distill.install(adapters_dir)}")
    return 0


def judge_line(r: Any, steps: int) -> str:
    """The judge's numbers: distances to the teacher before / with the stock adapter / after, and the verdict."""
    stock = f", stock adapter {r.stock:.4f}" if r.stock is not None else ""
    if r.recommended:
        verdict = "recommended"
    elif r.gain is not None and r.gain >= 1:
        verdict = "NOT recommended: no closer than before"
    else:
        verdict = "NOT recommended: the stock adapter keeps more of the standard output"
    return (f"distance to the teacher at {steps} steps: before {r.before:.4f}{stock}, after {r.after:.4f}, "
            f"distill_gain {r.gain:.3f} ({verdict})")
