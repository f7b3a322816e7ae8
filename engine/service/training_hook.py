"""Build a ``TrainingRun`` for a ``TrainRequest`` on the pipeline a worker already holds.

Used by the scale-out worker (``python -m engine worker``). A run lives in
``[storage] runs_dir / <job_id>``; attempt 2 and later (a reclaimed run, re-dispatched by the
bot's dispatcher after its worker died) resume from the run's newest checkpoint when that
directory is reachable from this host (same host, or runs_dir on shared storage); otherwise
the run starts from step 0 here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from engine.contract import protocol
from engine.contract.config import ArcaeConfig
from engine.contract.errors import InvalidRequest


def training_factory(config: ArcaeConfig, generator: Any) -> Callable[[protocol.TrainRequest], Any]:
    """A ``GpuWorker.train_factory`` that trains on ``generator.pipe`` (no second copy of the base)."""

    def make_run(request: protocol.TrainRequest) -> Any:
        from engine.contract.training_errors import TrainingError
        from engine.contract.training_options import from_config
        from training.learning.trainer import TrainingRun

        try:
            options = from_config(config.training, **request.options.model_dump(exclude_none=True))
        except TrainingError as exc:
            raise InvalidRequest(f"training options: {exc}") from None
        except Exception as exc:  # pydantic's or a bad key: say which
            raise InvalidRequest(f"training options: {exc}") from None
        run_dir = Path(config.path(config.storage.runs_dir)) / request.job_id
        resume = request.attempt > 1 or run_dir.exists()
        try:
            return TrainingRun(
                generator.pipe, options, run_dir, resume=resume, base_model=getattr(generator.model, "name", ""),
                job_id=request.job_id, attempt=request.attempt,
                prompt_encoder=_caption_encoder(generator, options.train_text_encoders),
            )
        except TrainingError as exc:
            raise InvalidRequest(str(exc)) from None

    return make_run


def _caption_encoder(generator: Any, train_text_encoders: bool) -> Callable[[list[str]], Any] | None:
    """``captions -> (prompt_embeds, pooled)`` from the generator's prompt encoder (the trainer calls
    it as a function); None lets the trainer build its own on the same pipeline."""
    encoder = getattr(generator, "encoder", None)
    if encoder is None or not hasattr(encoder, "encode_for_training"):
        return None
    return lambda captions: encoder.encode_for_training(captions, train_text_encoders=train_text_encoders)
