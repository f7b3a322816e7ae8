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
    """A tiny SDXL pipeline on disk (diffusers format), seed 0."""
    from engine.generation.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-sdxl", seed=0)


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
