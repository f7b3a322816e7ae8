"""What one pipeline call runs: the jobs in it, their progress callbacks, and the job-id rule.

Shared by ``engine.generation.generator`` and ``engine.generation.img2img``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from engine.contract.errors import InvalidRequest
from engine.contract.protocol import JOB_ID_PATTERN, ResolvedParams

# on_step(step, total, preview PIL image or None). A callback with a ``wants_preview(step, total)``
# attribute gets a preview only at the steps where it returns True (previews cost a GPU sync).
OnStep = Callable[[int, int, Any], None]
ShouldCancel = Callable[[], bool]
_JOB_ID = re.compile(JOB_ID_PATTERN)


@dataclass
class BatchItem:
    """One job inside a pipeline call: its id, what runs, its warnings and progress callback."""

    job_id: str
    resolved: ResolvedParams
    warnings: list[str]
    on_step: OnStep | None = None


def check_job_id(job_id: str) -> None:
    # The job id becomes a file name: keep it to the protocol's safe characters.
    if not _JOB_ID.fullmatch(job_id or ""):
        raise InvalidRequest(f"job id {job_id!r} must be 1-64 letters, digits, '_' or '-'")
