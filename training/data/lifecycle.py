"""Adapter lifecycle: promote a run's checkpoint to a live adapter, roll back, delete (and undo).

Layout in the adapters directory (the one ``engine.generation.adapters.AdapterRegistry`` scans; it skips
hidden names, so the history is invisible to it)::

    NAME.safetensors, NAME.json          the live adapter and its sidecar
    .versions/NAME/v0001.safetensors     every version ever promoted, complete and synced
    .versions/NAME/v0001.json
    .versions/NAME/history.json          {"live": 3, "previous": [1, 2]}
    .versions/.lock                      one lifecycle change at a time (flock)

A change first writes the complete version into ``.versions`` (temp file, fsync, rename), then
installs it live with two atomic renames: the sidecar first, the weights last, so a reader
sees the old file or the new one, never a partial one (for a moment the new sidecar may sit
beside the old weights; its sha256 tells them apart). ``previous`` is a stack of the versions
that were live before: promote pushes, rollback pops. delete pushes the deleted version, so a
rollback right after a delete undoes it. The engine picks any change up with
``AdapterRegistry.reload()`` between jobs. Training never writes here: a failed or canceled
run cannot change what is live.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.contract.training_errors import LifecycleError, RunNotFound
from training.data.run_record import checkpoint_dir, fsync_dir, read_run, write_atomic, write_json_atomic
from engine.contract.training_options import RESERVED_ADAPTER_NAMES

VERSIONS_DIR = ".versions"
SUFFIX = ".safetensors"
# Same rule as engine.contract.protocol.ADAPTER_NAME_PATTERN (kept here so this module stays torch- and engine-free).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
KINDS = ("style", "character", "lcm", "other")


@dataclass(frozen=True)
class AdapterVersion:
    """One promoted version of an adapter."""

    name: str
    version: int
    sha256: str
    source: dict[str, Any]
    promoted_at: float
    live: bool


@dataclass(frozen=True)
class LifecycleResult:
    """What a lifecycle change left live: ``version`` None means the adapter is not live."""

    name: str
    version: int | None
    previous: int | None
    path: Path | None


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name or "") or name.endswith(".") or name in RESERVED_ADAPTER_NAMES:
        raise LifecycleError(
            f"invalid adapter name {name!r}: 1-64 letters, digits, '_', '.', '-', starting with a letter "
            f"or digit, not {' or '.join(RESERVED_ADAPTER_NAMES)}"
        )
    return name


# ---------------------------------------------------------------------- public API
def promote(
    run_dir: Path,
    checkpoint_step: int | None,
    name: str,
    adapters_dir: Path,
    *,
    kind: str | None = None,
    triggers: list[str] | None = None,
    default_weight: float = 1.0,
    description: str = "",
    base_model: str | None = None,
) -> LifecycleResult:
    """Make a run's adapter live as ``name``; the previous live version stays for rollback.

    ``checkpoint_step`` None takes the checkpoint chosen in run.json, else the final adapter.
    Refused (nothing changes): a failed or unfinished run without an explicit checkpoint step,
    a file with NaN/inf weights or no LoRA weights, a bad name, kind or weight.
    """
    check_name(name)
    if kind is not None and kind not in KINDS:
        raise LifecycleError(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    if not (-4.0 <= default_weight <= 4.0):
        raise LifecycleError(f"default weight must be between -4 and 4 (got {default_weight})")
    run_dir = Path(run_dir)
    record = read_run(run_dir)
    source_file, step = _source_file(run_dir, record, checkpoint_step)
    data = source_file.read_bytes()
    _check_weights(source_file, data)
    sha = hashlib.sha256(data).hexdigest()
    sidecar = {
        "kind": kind or record.get("kind", "other"),
        "triggers": list(triggers) if triggers is not None else [t for t in [record.get("trigger")] if t],
        "default_weight": float(default_weight),
        "description": description or f"trained by Arcae: {record.get('kind', '')} LoRA, step {step}",
        "base_model": base_model if base_model is not None else str(record.get("base_model", "")),
        "sha256": sha,
        "source": {"run_dir": str(run_dir.resolve()), "step": step},
        "promoted_at": time.time(),
    }
    adapters_dir = Path(adapters_dir)
    with _locked(adapters_dir):
        history = _read_history(adapters_dir, name)
        version = max(_version_numbers(adapters_dir, name), default=0) + 1
        sidecar["version"] = version
        vdir = _versions_dir(adapters_dir, name)
        write_atomic(vdir / f"v{version:04d}{SUFFIX}", lambda tmp: tmp.write_bytes(data))
        write_json_atomic(vdir / f"v{version:04d}.json", sidecar)
        previous = history["live"]
        _install(adapters_dir, name, version)
        if previous is not None:
            history["previous"].append(previous)
        history["live"] = version
        _write_history(adapters_dir, name, history)
    return LifecycleResult(name, version, previous, adapters_dir / f"{name}{SUFFIX}")


def rollback(name: str, adapters_dir: Path) -> LifecycleResult:
    """Make the version that was live before the current one live again (undoes a delete too)."""
    check_name(name)
    adapters_dir = Path(adapters_dir)
    with _locked(adapters_dir):
        history = _read_history(adapters_dir, name)
        if not history["previous"]:
            raise LifecycleError(f"adapter {name!r} has no earlier version to roll back to")
        current = history["live"]
        target = history["previous"][-1]
        _install(adapters_dir, name, target)
        history["previous"].pop()
        history["live"] = target
        _write_history(adapters_dir, name, history)
    return LifecycleResult(name, target, current, adapters_dir / f"{name}{SUFFIX}")


def delete(name: str, adapters_dir: Path) -> LifecycleResult:
    """Take ``name`` off the live adapters; its versions stay (``rollback`` brings it back)."""
    check_name(name)
    adapters_dir = Path(adapters_dir)
    weights, sidecar = adapters_dir / f"{name}{SUFFIX}", adapters_dir / f"{name}.json"
    with _locked(adapters_dir):
        history = _read_history(adapters_dir, name)
        if not weights.exists():
            raise LifecycleError(f"adapter {name!r} is not live in {adapters_dir}")
        current = history["live"]
        if current is None:  # an adapter copied in by hand: keep a version of it for undo
            current = max(_version_numbers(adapters_dir, name), default=0) + 1
            vdir = _versions_dir(adapters_dir, name)
            data = weights.read_bytes()
            write_atomic(vdir / f"v{current:04d}{SUFFIX}", lambda tmp: tmp.write_bytes(data))
            meta = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
            write_json_atomic(vdir / f"v{current:04d}.json", {**meta, "version": current, "source": {"manual": True}})
        weights.unlink()  # weights first: a sidecar without weights is ignored by the registry
        sidecar.unlink(missing_ok=True)
        fsync_dir(adapters_dir)
        history["previous"].append(current)
        history["live"] = None
        _write_history(adapters_dir, name, history)
    return LifecycleResult(name, None, current, None)


def set_default_weight(name: str, weight: float, adapters_dir: Path) -> None:
    """Rewrite the live sidecar's ``default_weight``, and its stored version's (so a rollback keeps it)."""
    check_name(name)
    if not (-4.0 <= weight <= 4.0):
        raise LifecycleError(f"default weight must be between -4 and 4 (got {weight})")
    adapters_dir = Path(adapters_dir)
    if not (adapters_dir / f"{name}{SUFFIX}").is_file():
        raise LifecycleError(f"Adapter `{name}` is not live.")
    with _locked(adapters_dir):
        sidecar = adapters_dir / f"{name}.json"
        meta = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
        write_json_atomic(sidecar, {**meta, "default_weight": float(weight)})
        live = _read_history(adapters_dir, name)["live"]
        stored = _versions_dir(adapters_dir, name) / f"v{int(live):04d}.json" if live is not None else None
        if stored is not None and stored.is_file():
            data = json.loads(stored.read_text(encoding="utf-8"))
            write_json_atomic(stored, {**data, "default_weight": float(weight)})


def versions(name: str, adapters_dir: Path) -> list[AdapterVersion]:
    """Every stored version of ``name``, oldest first."""
    check_name(name)
    adapters_dir = Path(adapters_dir)
    history = _read_history(adapters_dir, name)
    out = []
    for v in sorted(_version_numbers(adapters_dir, name)):
        meta_path = _versions_dir(adapters_dir, name) / f"v{v:04d}.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        out.append(AdapterVersion(name, v, meta.get("sha256", ""), meta.get("source", {}),
                                  float(meta.get("promoted_at", 0.0)), history["live"] == v))
    return out


# ---------------------------------------------------------------------- internals
def _source_file(run_dir: Path, record: dict[str, Any], step: int | None) -> tuple[Path, int]:
    status = record.get("status")
    if step is None:
        step = record.get("chosen_checkpoint")
    if step is None:
        if status != "completed":
            raise LifecycleError(
                f"run {run_dir.name} is {status}; only a completed run can be promoted without naming a checkpoint"
            )
        return run_dir / "adapter.safetensors", int(record.get("step", 0))
    if status == "failed":
        raise LifecycleError(f"run {run_dir.name} failed ({record.get('error', 'unknown error')}); it cannot be promoted")
    path = checkpoint_dir(run_dir, int(step)) / "adapter.safetensors"
    if not path.is_file():
        raise RunNotFound(f"run {run_dir.name} has no checkpoint at step {step}")
    return path, int(step)


def _check_weights(path: Path, raw: bytes) -> None:
    """Refuse a file (``raw``, read from ``path``) that is not safetensors, has no LoRA keys, or
    holds NaN/inf weights.

    Parsed by hand with numpy (bf16 included) so that the torch-free bot can promote too.
    """
    import struct

    import numpy as np

    dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
    try:
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
    except (OSError, ValueError, struct.error) as exc:
        raise LifecycleError(f"{path} is not a readable safetensors file: {exc}") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not any("lora" in k for k in tensors):
        raise LifecycleError(f"{path} holds no LoRA weights")
    base = 8 + header_len
    for key, info in tensors.items():
        kind = dtypes.get(info.get("dtype"))
        if kind is None:
            continue
        begin, end = info["data_offsets"]
        array = np.frombuffer(raw[base + begin : base + end], dtype=kind)
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        if array.size and not np.isfinite(array).all():
            raise LifecycleError(f"{path} has NaN or infinite weights ({key}); it cannot go live")


def _versions_dir(adapters_dir: Path, name: str) -> Path:
    return adapters_dir / VERSIONS_DIR / name


def _version_numbers(adapters_dir: Path, name: str) -> list[int]:
    vdir = _versions_dir(adapters_dir, name)
    return [int(p.stem[1:]) for p in vdir.glob(f"v*{SUFFIX}") if p.stem[1:].isdigit()] if vdir.is_dir() else []


def _read_history(adapters_dir: Path, name: str) -> dict[str, Any]:
    path = _versions_dir(adapters_dir, name) / "history.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {"live": data.get("live"), "previous": list(data.get("previous", []))}
    except (FileNotFoundError, ValueError):
        return {"live": None, "previous": []}


def _write_history(adapters_dir: Path, name: str, history: dict[str, Any]) -> None:
    write_json_atomic(_versions_dir(adapters_dir, name) / "history.json", history)


def _install(adapters_dir: Path, name: str, version: int) -> None:
    """Copy a stored version live: sidecar first, weights last, each by atomic rename."""
    vdir = _versions_dir(adapters_dir, name)
    weights = (vdir / f"v{version:04d}{SUFFIX}").read_bytes()
    meta_path = vdir / f"v{version:04d}.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    write_json_atomic(adapters_dir / f"{name}.json", meta)
    write_atomic(adapters_dir / f"{name}{SUFFIX}", lambda tmp: tmp.write_bytes(weights))


@contextmanager
def _locked(adapters_dir: Path) -> Iterator[None]:
    lock_dir = adapters_dir / VERSIONS_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
