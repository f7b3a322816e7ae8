"""Fused LoRA execution: the active mix folded into the base weights, undone exactly.

Unfused, every LoRA layer runs its base layer plus one small matmul pair per active adapter:
with LCM (all targets) and two style LoRAs a full SDXL UNet launches ~1,900 extra small kernels
per evaluation, which makes a 4-step LCM image host-bound. Fused, each touched layer runs only
its base layer, with ``W + sum(scale_i * B_i @ A_i)`` as its weight.

Why not peft's ``merge``/``unmerge`` (or diffusers' ``fuse_lora``): unmerging subtracts the
delta again, and ``(W + d) - d != W`` in floating point, so the base drifts a little with every
mix change (~1e-8 each; see NOTES.md). The base is shared with training, which must see it
bit-identical. Here the original of every touched tensor is kept (a copy of only those
tensors, on their device) and each fuse computes ``original + deltas`` from that copy;
restoring copies the original back. Weights change in place (``copy_`` into the same
``Parameter``), so a compiled UNet, which takes its parameters as inputs, does not recompile.

The fused state is keyed by the mix (names, weights, the adapters' load generation): the same
mix on the next job costs nothing. Only the engine's GPU worker thread uses this.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Hashable, Sequence

log = logging.getLogger(__name__)

EXECUTIONS = ("fused", "unfused")


def _base_weight(layer: Any) -> Any:
    return layer.get_base_layer().weight


class LoraFusion:
    """Folds a mix into the base weights of peft LoRA layers, keeping the exact originals."""

    def __init__(self) -> None:
        # id(layer) -> (layer, the base weight as it was before any fuse)
        self._originals: dict[int, tuple[Any, Any]] = {}
        self._key: Hashable | None = None

    @property
    def fused_layers(self) -> int:
        """How many layers carry a fused weight now (each holds one kept original)."""
        return len(self._originals)

    def fuse(self, layers: Sequence[Any], by_name: dict[str, list[Any]], mix: Sequence[tuple[str, float]],
             key: Hashable) -> None:
        """Make ``layers`` run ``mix`` (scales already set on them) as fused base weights.

        ``by_name``: adapter name -> the layers that carry it. ``key`` identifies the mix and
        the adapters' weights; an unchanged key only switches the adapter branches off again.
        """
        if key != self._key:
            started = time.perf_counter()
            active = [name for name, weight in mix if weight != 0.0]
            touched: dict[int, Any] = {}
            for name in active:
                for layer in by_name.get(name, ()):
                    touched[id(layer)] = layer
            # Layers fused for the previous mix that this one leaves alone get their original back.
            for layer_id in [i for i in self._originals if i not in touched]:
                self._restore_one(layer_id)
            import torch

            with torch.no_grad():
                for layer_id, layer in touched.items():
                    self._fuse_one(layer_id, layer, [n for n in active if n in layer.lora_A])
            self._key = key
            log.debug("fused %d adapters into %d layers in %.3f s", len(active), len(touched),
                      time.perf_counter() - started)
        for layer in layers:
            layer._active_adapter = []  # the fused weight already holds every adapter of the mix

    def _fuse_one(self, layer_id: int, layer: Any, names: list[str]) -> None:
        import torch

        weight = _base_weight(layer)
        if layer_id not in self._originals:
            self._originals[layer_id] = (layer, weight.detach().clone())
        original = self._originals[layer_id][1]
        # Summed in fp32 from the kept original: the result never depends on earlier mixes.
        # (copy=True: for an fp32 weight .float() is the original itself, and += would corrupt it.)
        fused = original.to(dtype=torch.float32, copy=True)
        for name in names:
            fused += layer.get_delta_weight(name).float()
        weight.copy_(fused)

    def _restore_one(self, layer_id: int) -> None:
        import torch

        layer, original = self._originals.pop(layer_id)
        with torch.no_grad():
            _base_weight(layer).copy_(original)

    def restore(self) -> None:
        """Put every fused layer's original weight back (bit-identical) and forget the mix."""
        for layer_id in list(self._originals):
            self._restore_one(layer_id)
        self._key = None
