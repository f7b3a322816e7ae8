"""``python -m training train``: train a LoRA on a dataset folder, standalone (outside the engine)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from engine.contract.config import CONFIG_HELP

HELP = "train a LoRA (character or style) on a captioned dataset folder"

log = logging.getLogger(__name__)

# CLI flag -> option name, for the flags whose value is passed through unchanged.
_PASS_THROUGH = (
    "model", "dataset", "kind", "trigger", "steps", "rank", "alpha", "lr", "text_encoder_lr", "resolution",
    "batch_size", "grad_accum", "optimizer", "lr_scheduler", "warmup", "min_snr_gamma", "noise_offset",
    "caption_dropout", "tag_dropout", "shuffle_tags", "keep_tokens", "save_every", "sample_every",
    "sample_steps", "train_text_encoders", "train_ff", "train_conv", "gradient_checkpointing",
    "mixed_precision", "seed", "target_preset", "sample_sampler", "sample_cfg", "prodigy_d_coef",
    "prodigy_safeguard_warmup",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--model", help="base model: diffusers folder, .safetensors file or hub id (default: [model] source)")
    p.add_argument("--dataset", help="dataset folder (images + .txt captions, optional manifest.json)")
    p.add_argument("--kind", choices=["character", "style"])
    p.add_argument("--trigger", help="trigger word (one tag) that calls the LoRA")
    p.add_argument("--out", help="run directory (created); holds checkpoints, samples, loss and the adapter")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    g = p.add_argument_group("training (defaults from [training] in the config)")
    g.add_argument("--steps", type=int)
    g.add_argument("--rank", type=int)
    g.add_argument("--alpha", type=float)
    g.add_argument("--lr", type=float)
    g.add_argument("--text-encoder-lr", type=float)
    g.add_argument("--resolution", type=int, help="training side in px; buckets keep the area within its square")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--grad-accum", type=int)
    g.add_argument("--optimizer", help="adamw | adamw8bit (CUDA + bitsandbytes, else adamw) | prodigy (prodigyopt; lr 1.0 unless --lr)")
    g.add_argument("--lr-scheduler", help="constant, constant_with_warmup, cosine, cosine_with_restarts, linear, polynomial")
    g.add_argument("--warmup", type=int, help="LR warm-up steps")
    g.add_argument("--min-snr-gamma", type=float, help="min-SNR loss weighting; 0 = off")
    g.add_argument("--noise-offset", type=float)
    g.add_argument("--caption-dropout", type=float, help="probability of training an image with an empty caption")
    g.add_argument("--tag-dropout", type=float, help="probability of dropping each tag after the kept ones")
    g.add_argument("--shuffle-tags", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--keep-tokens", type=int, help="leading tags never shuffled (default: manifest, else 1)")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps")
    g.add_argument("--sample-every", type=int, help="samples at checkpoints whose step is a multiple of N, and at the end (default: every checkpoint)")
    g.add_argument("--sample-prompts", metavar="FILE", help="one sample prompt per line")
    g.add_argument("--sample-steps", type=int)
    g.add_argument("--train-text-encoders", action="store_true", default=None)
    g.add_argument("--train-ff", action="store_true", default=None, help="LoRA also on feed-forward layers")
    g.add_argument("--train-conv", action="store_true", default=None, help="LoRA also on ResNet convolutions")
    g.add_argument("--target-preset", choices=["attention", "kohya", "locon"],
                   help="LoRA layers: attention only | kohya (all transformer Linear + text encoder MLP; default) | locon (kohya + ResNet convs)")
    g.add_argument("--sample-sampler", help="A1111 sampler name for checkpoint samples (default: Euler a)")
    g.add_argument("--sample-cfg", type=float, help="CFG scale of checkpoint samples")
    g.add_argument("--prodigy-d-coef", type=float, help="Prodigy's d_coef (default 1.0)")
    g.add_argument("--prodigy-safeguard-warmup", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--mixed-precision", help="auto | no | fp16 | bf16")
    g.add_argument("--seed", type=int)
    p.add_argument("--tagger", help="WD tagger (hub id or folder) to score checkpoints at the end (default: [tagger] model of the config file)")
    p.add_argument("--no-score", action="store_true", help="do not score checkpoints at the end")


def build_options(args: argparse.Namespace, config: Any) -> tuple[Any, Path, bool]:
    """The validated options, the run dir and whether to resume (raises ``CliError``)."""
    from training.cli import CliError
    from engine.contract.training_errors import TrainingError
    from training.data.run_record import read_run
    from engine.contract.training_options import from_config

    given = {name: getattr(args, name) for name in _PASS_THROUGH if getattr(args, name, None) is not None}
    if args.sample_prompts:
        given["sample_prompts"] = _read_prompts(Path(args.sample_prompts))
    if args.resume:
        run_dir = Path(args.resume)
        try:
            saved = read_run(run_dir).get("options", {})
        except TrainingError as exc:
            raise CliError(str(exc)) from None
        merged = {**saved, **given}
        try:
            return from_config(config.training, enforce_caps=False, **merged), run_dir, True
        except TrainingError as exc:
            raise CliError(str(exc)) from None
    missing = [f"--{n}" for n in ("dataset", "kind", "trigger", "out") if not getattr(args, n)]
    if missing:
        raise CliError(f"{', '.join(missing)} required (or --resume RUN_DIR)")
    if not given.get("model") and config.model.source:
        given["model"] = config.model.source
    try:
        return from_config(config.training, enforce_caps=False, **given), Path(args.out), False
    except TrainingError as exc:
        raise CliError(str(exc)) from None


def _read_prompts(path: Path) -> list[str]:
    from training.cli import CliError

    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise CliError(f"cannot read --sample-prompts {path}: {exc.strerror}") from None
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise CliError(f"--sample-prompts {path} holds no prompt (one per line)")
    return prompts


def _load_config(args: argparse.Namespace) -> Any:
    from engine.cli import load_cli_config

    return load_cli_config(args.config)


def _load_pipeline(config: Any, model: str) -> Any:
    """The base model through the engine's loader (same code path as serving)."""
    import torch

    from engine.contract.config import Secrets
    from engine.contract.errors import EngineError
    from engine.generation.models import load_base_pipeline
    from training.cli import CliError

    engine = config.engine
    updates: dict[str, Any] = {}
    if engine.dtype == "auto" and torch.cuda.is_available() and engine.device != "cpu" and torch.cuda.is_bf16_supported():
        updates["engine"] = engine.model_copy(update={"dtype": "bf16"})  # bf16 trains without loss scaling
    if model:
        updates["model"] = config.model.model_copy(update={"source": model})
    config = config.model_copy(update=updates)
    try:
        return load_base_pipeline(config, Secrets.from_env(config))
    except EngineError as exc:
        raise CliError(exc.message) from None


def run(args: argparse.Namespace) -> int:
    from training.cli import CliError
    from engine.contract.training_errors import TrainingError
    from training.data.training_set import TrainingDataset

    config = _load_config(args)
    options, run_dir, resume = build_options(args, config)
    try:  # dataset problems answer before the model loads
        TrainingDataset(options.dataset, trigger=options.trigger, resolution=options.resolution,
                        batch_size=options.batch_size, seed=options.seed)
        if options.optimizer == "prodigy":
            import importlib.util

            if importlib.util.find_spec("prodigyopt") is None:
                raise CliError("--optimizer prodigy needs the prodigyopt package (pip install prodigyopt); use adamw or adamw8bit")
    except TrainingError as exc:
        raise CliError(str(exc)) from None
    if options.resolution % 64:
        raise CliError(f"--resolution must be a multiple of 64 (got {options.resolution})")

    loaded = _load_pipeline(config, options.model)
    from training.learning.trainer import TrainingRun

    try:
        training_run = TrainingRun(loaded.pipe, options, run_dir, resume=resume, base_model=loaded.name)
    except TrainingError as exc:
        raise CliError(str(exc)) from None
    code = run_to_end(training_run, run_dir)
    if code is not None:
        return code
    print(f"done: {run_dir / 'adapter.safetensors'} and {run_dir / 'adapter.kohya.safetensors'}")
    if not args.no_score:
        _score(run_dir, args, config)
    return 0


def run_to_end(run: Any, run_dir: Path) -> int | None:
    """Step a training or distillation run to its end with a progress bar: None when it completed, else
    the exit code (130 after Ctrl-C, which cancels it and keeps its checkpoints; 1 when it diverged)."""
    from tqdm import tqdm

    from engine.contract.training_errors import TrainingCanceled, TrainingDiverged

    try:
        with tqdm(total=run.total_steps, initial=run.step_index, unit="step", dynamic_ncols=True) as bar:
            while not run.done:
                result = run.step()
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")
                if result.checkpoint is not None:
                    bar.write(f"checkpoint {result.checkpoint}")
    except KeyboardInterrupt:
        run.cancel()
        print(f"canceled at step {run.step_index}; checkpoints kept in {run_dir}")
        return 130
    except (TrainingDiverged, TrainingCanceled) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return None


def _score(run_dir: Path, args: argparse.Namespace, config: Any) -> None:
    from training.data.checkpoints import format_table, score_run, tagger_tag_fn

    source = args.tagger or (config.tagger.model if args.config else "")
    tag_fn = None
    if source:
        try:
            from training.data.tagger import WDTagger

            t = config.tagger
            tag_fn = tagger_tag_fn(WDTagger.load(source, general_threshold=t.general_threshold,
                                                 character_threshold=t.character_threshold))
        except Exception as exc:  # scoring is a bonus: the run itself succeeded
            log.warning("tagger %s unavailable (%s): scoring by pixel similarity only", source, exc)
    if tag_fn is None:
        print("no tagger (--tagger or --config): checkpoints scored by pixel similarity only, recall not measured")
    scores = score_run(run_dir, tag_fn)
    if scores:
        from training.data.checkpoints import recommend

        print(format_table(scores, recommend(scores).step))
