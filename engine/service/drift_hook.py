"""Build a ``DriftRun`` for a ``DriftRequest`` on the Generator a worker already holds.

The run makes its images through the worker's own ``Generator`` (the loaded base and adapters;
no second copy), one image per worker step, between users' jobs. Its report goes to
``[storage] runs_dir / drift / <job_id>`` (a training run's checkpoint: that run's ``drift`` folder); the WD tagger of ``[tagger]`` measures tag recall
(without one the run measures SSIM and colour only, and its report says so).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from engine.contract import protocol
from engine.contract.config import ArcaeConfig

log = logging.getLogger(__name__)


def drift_factory(config: ArcaeConfig, generator: Any) -> Callable[[protocol.DriftRequest], Any]:
    """A ``GpuWorker.drift_factory``: ``DriftRequest`` -> a steppable ``DriftRun``."""
    tagger: dict[str, Any] = {}

    def tag_fn() -> tuple[Any, str]:
        if "fn" not in tagger:  # loaded once, on the worker thread, the first time a drift run needs it
            from training.data.checkpoints import tagger_tag_fn
            from training.data.tagger import WDTagger

            try:
                tagger["fn"] = tagger_tag_fn(WDTagger.from_config(config.tagger, base_dir=config.base_dir))
            except Exception as exc:  # no tagger: the other measures still run
                log.warning("drift measurement without the WD tagger (%s): %s", config.tagger.model, exc)
                tagger["fn"] = None
        return tagger["fn"], config.tagger.model if tagger["fn"] else ""

    def make_run(request: protocol.DriftRequest) -> Any:
        from training.data import drift_report as dr
        from training.learning.drift import DriftRun, checkpoint_run

        o = request.options
        fn, name = tag_fn()
        runs_dir = Path(config.path(config.storage.runs_dir))
        settings = dict(
            mix=[(a.name, a.weight) for a in o.adapters],
            seeds=o.seeds or dr.DEFAULT_SEEDS, modes=o.modes,
            lcm_weights=o.lcm_weights or dr.LCM_WEIGHTS, steps=o.steps or dr.STEPS,
            tag_fn=fn, tagger_name=name, job_id=request.job_id, attempt=request.attempt,
        )
        if o.prompts:
            settings["prompts"] = o.prompts
        if o.checkpoint_run:  # a training run's report: RUN_DIR/drift and run.json
            return checkpoint_run(generator, runs_dir / o.checkpoint_run, o.checkpoint_step, **settings)
        return DriftRun(generator, runs_dir / "drift" / request.job_id, **settings)

    return make_run
