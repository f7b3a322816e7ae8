"""Shared fixtures: the tiny SDXL model (built once per session) and test configurations."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# One thread per process: tests run the engine, the bot and the test process side by side on
# 2 cores, and oversubscribed torch threads made single steps 100x slower (measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# Tests never reach the network: the hub client fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline on disk (diffusers format), seed 0; tests only read it."""
    from engine.generation.tiny import make_tiny_model

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-sdxl", seed=0)
    # Under pytest-xdist the workers share one copy in the run's common temp dir: the first to
    # need it builds it, the others wait on the lock instead of building their own.
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent
    dest = shared / "tiny-model" / "tiny-sdxl"
    with FileLock(str(shared / "tiny-model.lock")):
        if not (dest / "model_index.json").exists():
            make_tiny_model(dest, seed=0)
    return dest


def write_config(tmp_path: Path, model_dir: Path | str, extra: str = "") -> Path:
    """Write a config.toml for tests: tiny model, CPU, 64 px images, data under tmp_path.

    ``extra`` is TOML appended verbatim; use sections not already present below, or
    build your own file from this text.
    """
    text = f"""
[engine]
device = "cpu"
port = 0

[model]
source = "{Path(model_dir).as_posix()}"
name = "tiny-sdxl"

[adapters]
dir = "adapters"

[generation]
size = "64x64"
steps = 4
fast_steps = 4
min_side = 32
max_side = 256
max_pixels = 65536
add_quality_tags = false

[storage]
database = "data/arcae.sqlite3"
outputs_dir = "data/outputs"
datasets_dir = "data/datasets"
runs_dir = "data/runs"
""" + extra
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


# The slowest test files (setup + calls, measured with --durations=0 on 2 cores), slowest first.
# They are collected first so that pytest-xdist (addopts: --dist loadfile --no-loadscope-reorder)
# starts them early instead of leaving one running alone at the end; the order is otherwise kept.
SLOW_FILES_FIRST = (
    "tests/engine/benchmarks/test_worker_bench.py",
    "tests/training/learning/test_distill.py",
    "tests/engine/scaleout/test_redis_scaleout.py",
    "tests/engine/benchmarks/test_bench.py",
    "tests/engine/service/test_engine_process.py",
    "tests/bot/test_redis_restart_notice.py",
    "tests/bot/test_distill_command.py",
    "tests/bot/test_imagine_picture_restart.py",
    "tests/bot/test_languages_admin_e2e.py",
    "tests/engine/generation/test_compile.py",
    "tests/bot/test_hostile_limits.py",
    "tests/training/learning/test_training_trust.py",
    "tests/training/learning/test_trainer.py",
    "tests/engine/generation/test_vpred.py",
    "tests/engine/generation/test_lora_formats.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {path: i for i, path in enumerate(SLOW_FILES_FIRST)}
    # A stable sort on the file alone: each file's tests stay together and in their order.
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
