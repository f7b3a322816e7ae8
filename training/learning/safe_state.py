"""Training state on disk in formats that cannot run code: safetensors for tensors, JSON for the rest.

A checkpoint's optimizer, LR-scheduler and loss-scaler state used to be a pickle
(``torch.save``), and loading a pickle runs whatever code it names. ``runs_dir`` may sit on
storage shared by several hosts, so a file in it is not trusted: ``save_state`` splits a nested
state (dicts, lists, tuples, tensors, numbers, strings, None) into ``NAME.safetensors`` (every
tensor, by a generated key) and ``NAME.json`` (the structure, with each tensor replaced by its
key). ``load_state`` reads them back with ``safetensors`` and ``json`` only. Anything else in
the state (a function, an arbitrary object) is refused when saving, not pickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from engine.contract.training_errors import TrainingError

STATE_STEM = "training_state"
TENSORS_SUFFIX = ".safetensors"
JSON_SUFFIX = ".json"
FORMAT = "arcae-training-state-1"
# Markers in the JSON structure; a plain dict whose keys are all strings is stored as is.
_TENSOR, _TUPLE, _PAIRS, _FLOAT = "__tensor__", "__tuple__", "__pairs__", "__float__"


def state_files(folder: Path) -> tuple[Path, Path]:
    """(tensors file, structure file) of the state in a checkpoint folder."""
    folder = Path(folder)
    return folder / f"{STATE_STEM}{TENSORS_SUFFIX}", folder / f"{STATE_STEM}{JSON_SUFFIX}"


def save_state(state: dict[str, Any], folder: Path) -> None:
    """Write ``state`` as the two files of ``state_files(folder)`` (the folder is a temp dir)."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    structure = _encode(state, tensors, "state")
    tensor_path, json_path = state_files(folder)
    save_file(tensors, str(tensor_path))
    json_path.write_text(json.dumps({"format": FORMAT, "state": structure}), encoding="utf-8")


def load_state(folder: Path) -> dict[str, Any]:
    """Read a state written by ``save_state``; ``TrainingError`` when missing or malformed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensor_path, json_path = state_files(folder)
    if not json_path.is_file() or not tensor_path.is_file():
        raise TrainingError(
            f"checkpoint {Path(folder).name} has no training state ({tensor_path.name} + {json_path.name}); "
            "a checkpoint from an older Arcae (training_state.pt, a pickle) is not loaded: start a new run"
        )
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
        tensors = load_file(str(tensor_path), device="cpu")
    except (ValueError, OSError, SafetensorError) as exc:
        raise TrainingError(f"training state of checkpoint {Path(folder).name} is unreadable ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise TrainingError(f"training state of checkpoint {Path(folder).name} has an unknown format")
    try:
        return _decode(document["state"], tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise TrainingError(f"training state of checkpoint {Path(folder).name} is malformed ({exc})") from None


def _encode(value: Any, tensors: dict[str, Any], path: str) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        # A copy of its own: safetensors refuses tensors that share memory.
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # JSON has no inf/nan; keep them exact as text.
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        for k in value:  # optimizer state is keyed by parameter index (int)
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TrainingError(f"cannot save training state: {path} has a key of type {type(k).__name__}")
        return {_PAIRS: [[k, _encode(v, tensors, f"{path}[{k!r}]")] for k, v in value.items()]}
    raise TrainingError(f"cannot save training state: {path} is a {type(value).__name__}, not data")


def _decode(value: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _FLOAT in value:
        return float(value[_FLOAT])
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _PAIRS in value:
        return {k: _decode(v, tensors) for k, v in value[_PAIRS]}
    return {k: _decode(v, tensors) for k, v in value.items()}
