"""The adapter registry: LoRA files of the adapters directory, loaded into one pipeline, mixed.

``AdapterRegistry`` owns everything LoRA on the engine's pipeline:

- ``scan()``/``list()``/``get()`` describe the directory (see ``engine.generation.lora_files``);
- ``apply_mix([(name, weight), ...])`` loads each named adapter on first use
  (``pipe.load_lora_weights(path, adapter_name=name)``; peft and kohya files, SGM block names,
  text-encoder keys) and makes exactly those active with those weights;
- ``reload()`` picks up new, removed and changed files between jobs;
- ``lora_hashes(names)`` gives the A1111 hashes for the PNG infotext.

Why ``apply_mix`` does not call ``pipe.set_adapters``: diffusers walks every module of the UNet
and both text encoders and, in each LoRA layer, every adapter ever loaded, so a mix change costs
more the more adapters were loaded (diffusers issue 11816; measured on the tiny model: 4 ms with
2 loaded, 53 ms with 50). Here the LoRA layers are indexed once per load (adapter name -> the
layers that carry it) and a mix change touches each layer's active list once and the scales of
only the adapters in the mix: the same state ``set_adapters`` produces (a test compares images),
at a cost independent of how many adapters are loaded. It does not flip ``requires_grad``
(inference runs without gradients; a training run calls ``unet.set_adapter`` before each step).

Not thread-safe for GPU work: only the engine's GPU worker calls ``apply_mix``/``reload``;
``list``/``get`` may be called from any thread.
"""

from __future__ import annotations

import difflib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.contract.errors import IncompatibleAdapter, InvalidRequest, UnknownAdapter
from engine.generation.pipe_state import pipe_state
from engine.generation.lora_files import AdapterEntry, HashCache, LoraFileError, adapter_name_problem, read_header, scan_directory
from engine.contract.protocol import AdapterInfo
from engine.generation.adapter_layers import (
    LayerIndex, LoadedAdapter, is_out_of_memory, quiet_loading, read_alphas, adapter_signature,
    describe_load_error,
)

log = logging.getLogger(__name__)

MAX_NAMES_IN_ERROR = 40


class AdapterRegistry:
    """LoRA adapters of one directory, loaded once each into ``pipe`` and mixed per request."""

    def __init__(
        self,
        adapters_dir: Path | str,
        pipe: Any,
        *,
        lcm_adapter: str = "",
        default_weight: float = 1.0,
        max_active: int = 8,
        write_sidecars: bool = True,
        lora_execution: str = "unfused",
    ) -> None:
        from engine.generation.lora_fusion import EXECUTIONS, LoraFusion

        if lora_execution not in EXECUTIONS:
            raise ValueError(f"lora_execution must be one of {', '.join(EXECUTIONS)}, not {lora_execution!r}")
        self.adapters_dir = Path(adapters_dir)
        self.pipe = pipe
        self.lcm_adapter = lcm_adapter
        self.default_weight = default_weight
        self.max_active = max_active
        self.write_sidecars = write_sidecars
        self._hashes = HashCache()
        self._lock = threading.Lock()  # guards _entries for list()/get() from other threads
        self._entries: dict[str, AdapterEntry] = {}
        self._loaded: dict[str, LoadedAdapter] = {}
        self._index: LayerIndex | None = None
        self._mix: list[tuple[str, float]] = []  # the mix the pipeline has now
        self._extra: dict[str, AdapterEntry] = {}  # files outside the directory (add_file), kept by rescans
        # "fused": the mix runs as base weights (engine.generation.lora_fusion); bumped whenever an
        # adapter's weights may have changed, so a fused mix is never reused across a reload.
        self._fusion = LoraFusion() if lora_execution == "fused" else None
        self._weights_generation = 0
        self.scan()

    @classmethod
    def from_config(cls, config: Any, pipe: Any) -> "AdapterRegistry":
        """Build from an ``ArcaeConfig`` (its ``[adapters]`` section)."""
        a = config.adapters
        return cls(
            config.path(a.dir), pipe, lcm_adapter=a.lcm_adapter, default_weight=a.default_weight, max_active=a.max_active,
            lora_execution=config.engine.lora_execution,
        )

    # ------------------------------------------------------------ the directory

    def scan(self) -> dict[str, AdapterEntry]:
        """Read the directory (hashing only files that changed); does not touch the pipeline."""
        entries = scan_directory(
            self.adapters_dir,
            default_weight=self.default_weight,
            lcm_adapter=self.lcm_adapter,
            hashes=self._hashes,
            write_sidecars=self.write_sidecars,
        )
        with self._lock:
            entries.update(self._extra)
            self._entries = entries
        return dict(entries)

    def add_file(self, name: str, path: Path) -> AdapterInfo:
        """Make a LoRA file outside the directory (a training checkpoint being measured) usable as
        ``name`` until ``remove_file``; users never see it unless they know the name. A name already
        in use is refused."""
        import dataclasses

        from engine.generation.lora_files import scan_entry

        problem = adapter_name_problem(name)
        if problem:
            raise InvalidRequest(f"adapter name {name!r}: {problem}")
        entry = scan_entry(Path(path), default_weight=1.0, lcm_adapter="", hashes=self._hashes, write_sidecars=False)
        entry = dataclasses.replace(entry, name=name)
        with self._lock:
            if name in self._entries:
                raise InvalidRequest(f"adapter name {name!r} is already in use")
            self._extra[name] = self._entries[name] = entry
        return entry.to_info()

    def remove_file(self, name: str) -> None:
        """Undo ``add_file``: unload the adapter and forget it (idempotent)."""
        if name not in self._extra:
            return
        self.unload(name)
        with self._lock:
            self._extra.pop(name, None)
            self._entries.pop(name, None)

    def list(self) -> list[AdapterInfo]:
        """Every adapter of the directory, sorted by name."""
        with self._lock:
            return [e.to_info() for e in self._entries.values()]

    def get(self, name: str) -> AdapterInfo:
        """One adapter's description; raises ``UnknownAdapter`` listing the known names."""
        return self.entry(name).to_info()

    def entry(self, name: str) -> AdapterEntry:
        """One adapter's scanned entry; raises ``UnknownAdapter`` listing the known names."""
        with self._lock:
            entry = self._entries.get(name)
            known = list(self._entries)
        if entry is None:
            raise UnknownAdapter(self._unknown_message(name, known))
        return entry

    @staticmethod
    def _unknown_message(name: str, known: list[str]) -> str:
        why = adapter_name_problem(name) if isinstance(name, str) else "names are strings"
        head = f"unknown adapter {name!r}" + (f" ({why})" if why else "")
        if not known:
            return f"{head}; no adapters are installed"
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6) if isinstance(name, str) else []
        if close:
            head += f"; did you mean {' or '.join(close)}?"
        shown = ", ".join(known[:MAX_NAMES_IN_ERROR])
        more = f" and {len(known) - MAX_NAMES_IN_ERROR} more" if len(known) > MAX_NAMES_IN_ERROR else ""
        return f"{head}; known adapters: {shown}{more}"

    def lora_hashes(self, names: Sequence[str]) -> dict[str, str]:
        """``{name: 12-hex A1111 addnet hash}`` for the infotext's ``Lora hashes`` field."""
        return {n: self.entry(n).addnet_hash[:12] for n in names}

    @property
    def loaded(self) -> list[str]:
        """Names of the adapters loaded into the pipeline, in load order."""
        return list(self._loaded)

    @property
    def active_mix(self) -> list[tuple[str, float]]:
        """The mix the pipeline has now (as last set by ``apply_mix``)."""
        return list(self._mix)

    # ------------------------------------------------------------ the mix

    def resolve_mix(self, mix: Sequence[Any]) -> list[tuple[str, float]]:
        """Check names, weights and limits; None weights become the adapter's default weight."""
        resolved: list[tuple[str, float]] = []
        seen: set[str] = set()
        for item in mix:
            # (name, weight) pairs, or protocol.AdapterWeight objects.
            name, weight = (item.name, item.weight) if hasattr(item, "name") else item
            entry = self.entry(name)
            if name in seen:
                raise InvalidRequest(f"adapter {name!r} is named twice in the mix; name each adapter once")
            seen.add(name)
            w = entry.default_weight if weight is None else float(weight)
            if not -4.0 <= w <= 4.0:
                raise InvalidRequest(f"weight {w} for adapter {name!r} is out of range; allowed: -4 to 4")
            resolved.append((name, w))
        counted = [n for n, _ in resolved if self.entry(n).kind != "lcm"]
        if len(counted) > self.max_active:
            raise InvalidRequest(f"{len(counted)} adapters in one mix; at most {self.max_active} are allowed")
        return resolved

    def apply_mix(self, mix: Sequence[Any]) -> list[tuple[str, float]]:
        """Make exactly these adapters active with these weights (empty = no LoRA); return the mix.

        ``mix``: ``(name, weight)`` pairs or ``protocol.AdapterWeight``; a None weight means the
        adapter's default weight. Loads adapters on first use. On any error the pipeline keeps its previous mix.
        """
        resolved = self.resolve_mix(mix)
        for name, _ in resolved:
            self.load(name)
        self._activate(resolved)
        return resolved

    def _activate(self, mix: list[tuple[str, float]], *, changed: bool = False) -> None:
        state = pipe_state(self.pipe)
        # A training run may have left its adapter active (and the UNet in train mode) after its
        # last step: put the inference state back first (once; see engine.generation.pipe_state).
        changed = state.claim_for_inference() or changed or mix != self._mix
        index = self._current_index()
        # Zero-weight adapters would add exactly 0 to every output: leave them out (saves work).
        active = [n for n, w in mix if w != 0.0]
        for layer in index.layers:
            # What peft's BaseTunerLayer.set_adapter stores, without its per-adapter requires_grad walk.
            layer._active_adapter = list(active)
            if layer._disable_adapters:  # pipe.disable_lora() would otherwise silently void the mix
                layer._disable_adapters = False
        for name, weight in mix:
            if weight != 0.0:
                for layer in index.by_name.get(name, ()):
                    layer.set_scale(name, weight)
        self._mix = list(mix)
        if self._fusion is not None:
            key = (tuple(mix), index.signature, self._weights_generation)
            self._fusion.fuse(index.layers, index.by_name, mix, key)
            if self._fusion.fused_layers:  # whatever trains next must get the exact base back first
                state.fused(self.restore_base)
        if changed:  # the prompt encoder's cache keys on this: a same-mix job keeps its hits
            state.bump()

    @property
    def lora_execution(self) -> str:
        return "fused" if self._fusion is not None else "unfused"

    def set_lora_execution(self, execution: str) -> None:
        """Switch between fused and unfused execution (base weights restored first); the mix stays."""
        from engine.generation.lora_fusion import EXECUTIONS, LoraFusion

        if execution not in EXECUTIONS:
            raise ValueError(f"lora_execution must be one of {', '.join(EXECUTIONS)}, not {execution!r}")
        self.restore_base()
        self._fusion = LoraFusion() if execution == "fused" else None
        self._restore_mix()

    def restore_base(self) -> None:
        """Give the base weights back bit-identical, the mix running unfused (before a training step).

        Training shares the base with generation and must never see a fused weight; the next
        ``apply_mix`` fuses again.
        """
        if self._fusion is None or not self._fusion.fused_layers:
            return
        self._fusion.restore()
        pipe_state(self.pipe).bump()  # the text encoders' weights changed (exactly back to the base)
        active = [n for n, w in self._mix if w != 0.0]
        for layer in self._current_index().layers:
            layer._active_adapter = list(active)

    def _weights_changing(self) -> None:
        """An adapter is about to be loaded, replaced or removed: unfuse first, refuse afterwards."""
        self._weights_generation += 1
        if self._fusion is not None:
            self._fusion.restore()

    def _current_index(self) -> LayerIndex:
        # Rebuilt only when adapters were added or deleted (by us or by a training run).
        if self._index is None or self._index.signature != adapter_signature(self.pipe):
            self._index = LayerIndex(self.pipe)
        return self._index

    def _restore_mix(self) -> None:
        """Put back the mix the pipeline had (loads and deletions change peft's active adapters)."""
        self._activate([(n, w) for n, w in self._mix if n in self._loaded], changed=True)

    # ------------------------------------------------------------ loading

    def load(self, name: str) -> None:
        """Load an adapter into the pipeline if it is not loaded yet.

        Raises ``IncompatibleAdapter`` (naming the file and the reason) with the pipeline
        exactly as before when the file is missing, unreadable, or does not fit the base model.
        """
        if name in self._loaded:
            return
        entry = self._fresh_entry(self.entry(name))
        path = entry.path
        if entry.problem:
            raise IncompatibleAdapter(f"adapter {name!r} ({path.name}) cannot be used: {entry.problem}")
        if any(name in names for names in adapter_signature(self.pipe)):
            raise IncompatibleAdapter(
                f"adapter {name!r} ({path.name}) cannot be loaded: the pipeline already has an adapter of that "
                "name that this registry did not load (a training run?)"
            )
        header = read_header(path)
        captured: list[str] = []
        started = time.perf_counter()
        self._weights_changing()
        try:
            with quiet_loading(captured):
                self.pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:
            self._discard(name)
            if is_out_of_memory(exc):
                raise
            raise IncompatibleAdapter(
                f"adapter {name!r} ({path.name}) does not fit the base model: {describe_load_error(exc)}"
            ) from exc
        layers = len(self._current_index().by_name.get(name, ()))
        if layers == 0:
            self._discard(name)
            raise IncompatibleAdapter(
                f"adapter {name!r} ({path.name}) does not fit the base model: none of its layers exist in it"
            )
        has_te = any(name in names for names in adapter_signature(self.pipe)[1:])
        alphas = read_alphas(path, header.shapes)
        self._loaded[name] = LoadedAdapter(entry.sha256, dict(header.shapes), dict(header.metadata), has_te, alphas)
        self._restore_mix()
        for message in captured:
            # Keys of the file that matched no layer matter; the rest is per-load chatter.
            level = logging.WARNING if "unexpected" in message.lower() else logging.DEBUG
            log.log(level, "adapter %s: %s", name, message)
        log.info(
            "loaded adapter %s (%s, %d layers) in %.2f s", name, entry.format, layers, time.perf_counter() - started
        )

    def _fresh_entry(self, entry: AdapterEntry) -> AdapterEntry:
        """Re-check the file right before loading: it may have changed or vanished since the scan."""
        path = entry.path
        if not path.is_file():
            raise IncompatibleAdapter(
                f"adapter {entry.name!r}: its file {path.name} is missing (removed since the last scan? "
                "reload the adapters)"
            )
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) == (entry.size, entry.mtime_ns):
            return entry
        from engine.generation.lora_files import scan_entry

        fresh = scan_entry(
            path,
            default_weight=self.default_weight,
            lcm_adapter=self.lcm_adapter,
            hashes=self._hashes,
            write_sidecars=self.write_sidecars,
        )
        with self._lock:
            self._entries[entry.name] = fresh
        return fresh

    def _discard(self, name: str) -> None:
        """Remove every trace of ``name`` from the pipeline (a failed or partial load) and restore the mix."""
        self._weights_changing()
        if any(name in names for names in adapter_signature(self.pipe)):
            with quiet_loading([]):
                self.pipe.delete_adapters([name])
        self._loaded.pop(name, None)
        self._restore_mix()

    def unload(self, name: str) -> None:
        """Delete an adapter from the pipeline (its next use loads the file again)."""
        if name in self._loaded:
            self._mix = [(n, w) for n, w in self._mix if n != name]
            self._discard(name)

    # ------------------------------------------------------------ reload

    def reload(self) -> dict[str, list[str]]:
        """Rescan the directory between jobs: ``{"added": [...], "removed": [...], "changed": [...]}``.

        Removed adapters are unloaded; a loaded adapter whose file changed is hot-swapped in
        place when the new file has the same layers and shapes, otherwise unloaded so that its
        next use loads the new file.
        """
        with self._lock:
            old = dict(self._entries)
        new = self.scan()
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        changed = sorted(n for n in set(new) & set(old) if new[n].sha256 != old[n].sha256)
        for name in removed:
            self.unload(name)
        for name, loaded in list(self._loaded.items()):
            entry = new.get(name)
            if entry is not None and entry.sha256 != loaded.sha256:
                if name not in changed:
                    changed.append(name)
                if not self._hotswap(entry, loaded):
                    self.unload(name)
        if added or removed or changed:
            log.info("adapters reloaded: added %s, removed %s, changed %s", added, removed, changed)
        return {"added": added, "removed": removed, "changed": sorted(changed)}

    def _hotswap(self, entry: AdapterEntry, loaded: LoadedAdapter) -> bool:
        """Replace a loaded adapter's weights in place; False when it cannot be done safely."""
        try:
            header = read_header(entry.path)
        except LoraFileError:
            return False
        # diffusers cannot hotswap text-encoder LoRA; differing alphas would keep the old scale.
        if loaded.has_text_encoder or header.shapes != loaded.shapes or entry.problem:
            return False
        if header.metadata.get("lora_adapter_metadata") != loaded.metadata.get("lora_adapter_metadata"):
            return False
        alphas = read_alphas(entry.path, header.shapes)
        if alphas != loaded.alphas:
            return False
        started = time.perf_counter()
        self._weights_changing()
        try:
            with quiet_loading([]):
                self.pipe.load_lora_weights(str(entry.path), adapter_name=entry.name, hotswap=True)
        except Exception as exc:
            log.info("hotswap of adapter %s failed (%s); it will be loaded again on next use", entry.name, exc)
            return False
        self._loaded[entry.name] = LoadedAdapter(entry.sha256, dict(header.shapes), dict(header.metadata), False, alphas)
        self._restore_mix()
        log.info("hot-swapped adapter %s in %.2f s", entry.name, time.perf_counter() - started)
        return True
