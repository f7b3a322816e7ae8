"""A run directory's record (run.json) and the atomic file writes every training module uses.

run.json is the one place a run's state lives: options, status (pending, running, completed,
failed, canceled), steps done, checkpoints, scores and the chosen checkpoint. Writers replace it
atomically so a reader (the bot's /train status, a crash) never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from engine.fsutil import fsync_dir, write_atomic  # noqa: F401  (re-exported for training modules)
from engine.fsutil import write_json_atomic as _write_json_atomic
from engine.contract.training_errors import RunNotFound

RUN_FILE = "run.json"
CHECKPOINTS_DIR = "checkpoints"
RUN_RECORD_VERSION = 1

RunStatus = Literal["pending", "running", "completed", "failed", "canceled"]
TERMINAL_STATUSES = ("completed", "failed", "canceled")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """``RUN_DIR/checkpoints/step-NNNNNN``."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, (step, dir), oldest first (temp dirs are skipped)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit() and (d / "adapter.safetensors").is_file():
                found.append((int(d.name[5:]), d))
    return sorted(found)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically (sorted keys: run records diff cleanly)."""
    _write_json_atomic(path, data, sort_keys=True)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``final``; on success it is renamed to ``final`` (replacing it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=str(final.parent)))
    try:
        yield tmp
        if final.exists():
            _remove_tree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            _remove_tree(tmp)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def read_run(run_dir: Path) -> dict[str, Any]:
    """The run's record; ``RunNotFound`` when the directory has none."""
    path = Path(run_dir) / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunNotFound(f"no training run in {run_dir} (no {RUN_FILE})") from None
    except ValueError as exc:
        raise RunNotFound(f"{path} is not valid JSON: {exc}") from None


def update_run(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into run.json (creating it) and stamp ``updated_at``; return the record."""
    path = Path(run_dir) / RUN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        record = {"version": RUN_RECORD_VERSION, "created_at": time.time()}
    record.update(fields)
    record["updated_at"] = time.time()
    write_json_atomic(path, record)
    return record
