"""Adapter lifecycle: promote (atomic, loads through the engine's registry), rollback, delete,
and runs that fail or are canceled never change what is live."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.training.train_helpers import TRIGGER, generate, make_dataset, tiny_options, tiny_pipeline
from engine.contract.training_errors import LifecycleError
from training.data.lifecycle import delete, promote, rollback, versions


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from tests.training.tiny_tagger import make_tiny_tagger

    root = tmp_path_factory.mktemp("lifecycle-data")
    return make_dataset(root, make_tiny_tagger(root / "tagger"), count=2)


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory) -> dict[str, Path]:
    """Two finished 2-step runs (different seeds, so different weights) on one shared pipeline."""
    from training.learning.trainer import TrainingRun

    root = tmp_path_factory.mktemp("lifecycle-runs")
    pipe = tiny_pipeline()
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        run = TrainingRun(pipe, tiny_options(dataset, steps=2, save_every=1, lr=1e-2, seed=seed, sample_steps=1), root / name)
        while not run.done:
            run.step()
        out[name] = root / name
    return out


def live_bytes(adapters: Path, name: str) -> bytes:
    return (adapters / f"{name}.safetensors").read_bytes()


def test_promote_rollback_delete(runs, tmp_path):
    from engine.generation.adapters import AdapterRegistry

    adapters = tmp_path / "adapters"
    first = promote(runs["a"], None, "hkr-char", adapters, default_weight=0.8)
    assert (first.version, first.previous) == (1, None)
    assert live_bytes(adapters, "hkr-char") == (runs["a"] / "adapter.safetensors").read_bytes()
    sidecar = json.loads((adapters / "hkr-char.json").read_text())
    assert sidecar["kind"] == "character" and sidecar["triggers"] == [TRIGGER] and sidecar["default_weight"] == 0.8

    # The engine's registry sees it with the sidecar's fields, and it changes generations.
    pipe = tiny_pipeline()
    registry = AdapterRegistry(adapters, pipe)
    info = registry.get("hkr-char")
    assert (info.kind, info.triggers, info.default_weight) == ("character", [TRIGGER], 0.8)
    registry.apply_mix([])
    plain = generate(pipe)
    registry.apply_mix([("hkr-char", None)])
    with_a = generate(pipe)
    assert np.abs(with_a - plain).max() > 1e-4

    # A checkpoint of another run replaces it; the registry picks the change up between jobs.
    second = promote(runs["b"], 1, "hkr-char", adapters)
    assert (second.version, second.previous) == (2, 1)
    assert live_bytes(adapters, "hkr-char") == (runs["b"] / "checkpoints" / "step-000001" / "adapter.safetensors").read_bytes()
    assert registry.reload()["changed"] == ["hkr-char"]
    registry.apply_mix([("hkr-char", None)])
    assert np.abs(generate(pipe) - with_a).max() > 1e-6

    back = rollback("hkr-char", adapters)
    assert (back.version, back.previous) == (1, 2)
    assert live_bytes(adapters, "hkr-char") == (runs["a"] / "adapter.safetensors").read_bytes()
    with pytest.raises(LifecycleError, match="no earlier version"):
        rollback("hkr-char", adapters)

    gone = delete("hkr-char", adapters)
    assert gone.version is None and not (adapters / "hkr-char.safetensors").exists()
    assert not (adapters / "hkr-char.json").exists()
    assert registry.reload()["removed"] == ["hkr-char"]
    rollback("hkr-char", adapters)  # undo the delete
    assert live_bytes(adapters, "hkr-char") == (runs["a"] / "adapter.safetensors").read_bytes()
    assert [(v.version, v.live) for v in versions("hkr-char", adapters)] == [(1, True), (2, False)]
    # Nothing half-written or hidden is visible to the registry: only the live pair.
    assert sorted(p.name for p in adapters.iterdir() if not p.name.startswith(".")) == ["hkr-char.json", "hkr-char.safetensors"]


def test_canceled_or_failed_runs_never_change_what_is_live(runs, dataset, tmp_path):
    import torch

    from engine.contract.training_errors import TrainingDiverged
    from training.learning.trainer import TrainingRun

    adapters = tmp_path / "adapters"
    promote(runs["a"], None, "hkr", adapters)
    live = live_bytes(adapters, "hkr")

    pipe = tiny_pipeline()
    canceled = TrainingRun(pipe, tiny_options(dataset, steps=3), tmp_path / "canceled")
    canceled.step()
    canceled.cancel()
    assert json.loads((tmp_path / "canceled" / "run.json").read_text())["status"] == "canceled"
    with pytest.raises(LifecycleError, match="canceled; only a completed run"):
        promote(tmp_path / "canceled", None, "hkr", adapters)

    failed = TrainingRun(pipe, tiny_options(dataset, steps=3, save_every=1), tmp_path / "failed")
    failed.step()
    with torch.no_grad():
        next(iter(failed.params.values())).fill_(float("nan"))
    with pytest.raises(TrainingDiverged):
        failed.step()
    with pytest.raises(LifecycleError, match="failed"):
        promote(tmp_path / "failed", 1, "hkr", adapters)
    assert live_bytes(adapters, "hkr") == live
    assert [v.version for v in versions("hkr", adapters)] == [1]


def test_refuses_bad_names_and_broken_files(runs, tmp_path):
    from safetensors.numpy import load_file, save_file

    adapters = tmp_path / "adapters"
    for name in ("train", "eval", "../evil", "", ".hidden", "a b"):
        with pytest.raises(LifecycleError, match="invalid adapter name"):
            promote(runs["a"], None, name, adapters)
    with pytest.raises(LifecycleError, match="kind must be one of"):
        promote(runs["a"], None, "x", adapters, kind="villain")

    # A run whose final weights hold NaN (however it got there) cannot go live.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text((runs["a"] / "run.json").read_text())
    weights = load_file(str(runs["a"] / "adapter.safetensors"))
    key = next(iter(weights))
    weights[key] = np.full_like(weights[key], np.nan)
    save_file(weights, str(broken / "adapter.safetensors"))
    with pytest.raises(LifecycleError, match="NaN or infinite"):
        promote(broken, None, "x", adapters)
    assert not (adapters / "x.safetensors").exists()
    with pytest.raises(LifecycleError, match="not live"):
        delete("x", adapters)


def test_set_default_weight_survives_a_rollback_and_refuses_what_is_not_live(runs, tmp_path):
    from training.data.lifecycle import set_default_weight

    adapters = tmp_path / "adapters"
    with pytest.raises(LifecycleError, match="not live"):
        set_default_weight("hkw", 0.5, adapters)
    promote(runs["a"], None, "hkw", adapters)
    set_default_weight("hkw", 0.5, adapters)
    with pytest.raises(LifecycleError, match="between -4 and 4"):
        set_default_weight("hkw", 9.0, adapters)
    assert json.loads((adapters / "hkw.json").read_text())["default_weight"] == 0.5
    promote(runs["b"], None, "hkw", adapters)
    assert json.loads((adapters / "hkw.json").read_text())["default_weight"] == 1.0
    rollback("hkw", adapters)  # v1 is live again, with the weight set on it
    assert json.loads((adapters / "hkw.json").read_text())["default_weight"] == 0.5
