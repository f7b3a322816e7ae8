"""The pieces under the adapter registry: peft's LoRA layers indexed by adapter, quiet loading, load errors.

``engine.generation.adapters.AdapterRegistry`` uses them; nothing here holds registry state.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoadedAdapter:
    """An adapter loaded into the pipeline, and the file state it was loaded from."""

    sha256: str
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    has_text_encoder: bool
    alphas: dict[str, float]  # kohya ``.alpha`` values (a hotswap keeps the old scale)


def read_alphas(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    keys = [k for k in shapes if k.endswith(".alpha")]
    if not keys:
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: float(f.get_tensor(k)) for k in keys}


class LayerIndex:
    """Every LoRA layer of the pipeline and, per adapter name, the layers that carry it."""

    def __init__(self, pipe: Any) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.signature = adapter_signature(pipe)
        self.layers: list[Any] = []
        self.by_name: dict[str, list[Any]] = {}
        for component in LORA_COMPONENTS:
            model = getattr(pipe, component, None)
            if model is None:
                continue
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    self.layers.append(module)
                    for name in getattr(module, "scaling", {}):
                        self.by_name.setdefault(name, []).append(module)


def adapter_signature(pipe: Any) -> tuple[tuple[str, ...], ...]:
    """The adapter names per LoRA-capable component: cheap, changes whenever one is added or deleted."""
    return tuple(tuple(getattr(getattr(pipe, c, None), "peft_config", None) or ()) for c in LORA_COMPONENTS)


@contextlib.contextmanager
def quiet_loading(captured: list[str]) -> Iterator[None]:
    """Silence the per-load noise of transformers/peft/diffusers; keep their warnings in ``captured``.

    (transformers prints a progress bar and a "LOAD REPORT" of every other adapter's keys as
    "missing" for each text-encoder load; peft warns that a model already has adapters.)
    """
    import transformers

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING and "LOAD REPORT" not in record.getMessage():
                captured.append(record.getMessage().strip().splitlines()[0][:300])

    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    # These libraries log through their own handlers: swap those out for the collector.
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    handler = _Collect()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = False
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved):
            lg.handlers = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        if bars:
            transformers.utils.logging.enable_progress_bar()


_SIZE_MISMATCH = re.compile(
    r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def describe_load_error(exc: BaseException) -> str:
    """A one-line reason for a failed ``load_lora_weights``."""
    text = str(exc)
    m = _SIZE_MISMATCH.search(text)
    if m:
        module = re.sub(r"\.lora_[AB]\.[^.]+\.weight$", "", m[1])
        count = len(_SIZE_MISMATCH.findall(text))
        return (
            f"its layers have the wrong shapes for this base model ({count} mismatched, e.g. {module}: "
            f"file {m[2]}, model {m[3]}); is it a LoRA for another architecture, such as SD 1.5?"
        )
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if isinstance(exc, OSError) or "SafetensorError" in type(exc).__name__ or "deserializ" in text.lower():
        return f"the file cannot be read as safetensors ({first[:200]})"
    return f"{type(exc).__name__}: {first[:300]}"


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
