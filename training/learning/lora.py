"""The training adapter on a shared pipeline: add it, switch to it and back, save it, remove it.

The engine serves generations from the same UNet the run trains (one copy of the base), so the
training adapter must never leak into a generation and generations must never disturb training
(NOTES, "Train while serving"). ``AdapterSwitch`` records which adapters each model had active,
whether LoRA was disabled and the train/eval mode, activates only the training adapter for a
step, and puts everything back afterwards, whatever the inference side had set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FEED_FORWARD_TARGETS = ["ff.net.0.proj", "ff.net.2"]
CONV_TARGETS = ["conv1", "conv2"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# kohya's networks.lora: every Linear / 1x1 conv inside the UNet's Transformer2DModel blocks and
# the text encoders' CLIPAttention + CLIPMLP; LoCon (conv_dim) adds ResnetBlock2D, Downsample2D
# and Upsample2D, whose Linear (time_emb_proj) and 1x1 shortcut come along.
TRANSFORMER_PROJ_TARGETS = ["proj_in", "proj_out"]
TEXT_ENCODER_MLP_TARGETS = ["fc1", "fc2"]
RESNET_TARGETS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
PRESET_UNET_TARGETS = {
    "attention": ATTENTION_TARGETS,
    "kohya": ATTENTION_TARGETS + TRANSFORMER_PROJ_TARGETS + FEED_FORWARD_TARGETS,
    "locon": ATTENTION_TARGETS + TRANSFORMER_PROJ_TARGETS + FEED_FORWARD_TARGETS + RESNET_TARGETS,
}
PRESET_TEXT_ENCODER_TARGETS = {
    "attention": TEXT_ENCODER_TARGETS,
    "kohya": TEXT_ENCODER_TARGETS + TEXT_ENCODER_MLP_TARGETS,
    "locon": TEXT_ENCODER_TARGETS + TEXT_ENCODER_MLP_TARGETS,
}


def unet_targets(train_ff: bool, train_conv: bool, preset: str = "attention") -> list[str]:
    """peft ``target_modules`` for the UNet: the preset's, plus feed-forward / ResNet convs if asked."""
    extra = (FEED_FORWARD_TARGETS if train_ff else []) + (CONV_TARGETS if train_conv else [])
    base = PRESET_UNET_TARGETS[preset]
    return base + [t for t in extra if t not in base]


def text_encoder_targets(preset: str = "attention") -> list[str]:
    """peft ``target_modules`` for both CLIP text encoders under ``preset``."""
    return list(PRESET_TEXT_ENCODER_TARGETS[preset])


def _tuner_layers(model: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(model: Any) -> set[str]:
    """Names of the adapters loaded into ``model`` (empty when it has no LoRA layers)."""
    config = getattr(model, "peft_config", None)
    return set(config) if isinstance(config, dict) else set()


@dataclass
class _ModelState:
    model: Any
    active: list[str] | None  # None: the model has no LoRA layers
    disabled: bool
    training: bool


# peft's per-adapter containers inside a LoRA layer: their entries belong to one adapter each.
_ADAPTER_CONTAINERS = frozenset({"lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B",
                                 "lora_magnitude_vector"})


@dataclass
class AdapterSwitch:
    """Activate one adapter on some models for a while, then restore what was there before.

    Flat in the number of loaded adapters: it writes each LoRA layer's active list directly
    (peft's ``set_adapter`` walks every adapter of every layer to flip ``requires_grad``) and
    sets train/eval mode only on the base modules and the named adapter's own modules
    (``model.train()`` walks every adapter's modules too). ``hold`` leaves the adapter active
    until the inference side claims the pipeline back (``engine.generation.pipe_state``).
    """

    models: list[Any]
    _saved: list[_ModelState] = field(default_factory=list)
    # model id -> (adapter names when walked, its LoRA layers): walking a full SDXL UNet's
    # modules costs ~10 ms, and a step switches twice; adding/deleting adapters changes the key.
    _layers: dict[int, tuple[tuple[str, ...], list[Any]]] = field(default_factory=dict)
    _modes: dict[tuple[int, str | None], tuple[tuple[str, ...], list[Any]]] = field(default_factory=dict)
    _held: tuple[str | None, bool] | None = None
    _prev_held: tuple[str | None, bool] | None = None

    def layers(self, model: Any) -> list[Any]:
        key = tuple(adapter_names_in_order(model))
        cached = self._layers.get(id(model))
        if cached is None or cached[0] != key:
            cached = (key, _tuner_layers(model))
            self._layers[id(model)] = cached
        return cached[1]

    def mode_modules(self, model: Any, name: str | None) -> list[Any]:
        """The modules whose train/eval mode matters while only ``name`` is active."""
        key = tuple(adapter_names_in_order(model))
        cached = self._modes.get((id(model), name))
        if cached is None or cached[0] != key:
            cached = (key, _modules_without_other_adapters(model, name))
            self._modes[(id(model), name)] = cached
        return cached[1]

    def set_mode(self, model: Any, train: bool, name: str | None = None) -> None:
        """``model.train(train)`` for ``mode_modules`` only."""
        for module in self.mode_modules(model, name):
            # nn.Module keeps ``training`` in its __dict__; its __setattr__ would cost ~20x more.
            module.__dict__["training"] = train

    def activate(self, name: str | None, *, train: bool, frozen: tuple[Any, ...] = ()) -> None:
        """Make ``name`` the only active adapter (None: none) and set train/eval mode (``frozen``
        models: eval always) until ``restore``."""
        self._saved = [self._capture(m) for m in self.models]
        self._prev_held = self._held
        for model in self.models:
            for layer in self.layers(model):
                # What peft's set_adapter stores, without its per-adapter requires_grad walk
                # (plain attributes: written to __dict__ as nn.Module.__setattr__ would, faster).
                layer.__dict__["_disable_adapters"] = False
                layer.__dict__["_active_adapter"] = [name] if name else []
            self.set_mode(model, train and model not in frozen, name)
        self._held = (name, train)

    def restore(self) -> None:
        """Put back the active adapters, the disabled flag and the mode captured by ``activate``."""
        self._put_back(self._saved, self._held[0] if self._held else None)
        self._saved = []
        self._held, self._prev_held = self._prev_held, None

    def _put_back(self, saved: list[_ModelState], name: str | None) -> None:
        for state in saved:
            if state.active is not None:
                for layer in self.layers(state.model):
                    layer.__dict__["_active_adapter"] = list(state.active)
                    layer.__dict__["_disable_adapters"] = state.disabled
            self.set_mode(state.model, state.training, name)

    def hold(self, name: str, *, train: bool, state: Any, frozen: tuple[Any, ...] = ()) -> bool:
        """``activate`` and leave it so until the inference side claims the pipeline (``state``, a
        ``PipeState``); True when anything had to switch (a generation ran since the last hold)."""
        ours = state.holder is self and self._still_active(name)
        if ours and self._held == (name, train):
            return False
        if ours:  # only train <-> eval (a step after samples)
            for model in self.models:
                self.set_mode(model, train and model not in frozen, name)
            self._held = (name, train)
            return True
        state.claim_for_inference()  # someone else's hold, or our own gone stale: undo it first
        state.claim_for_training()  # an inference mix fused into the base weights: restore the exact base
        self.activate(name, train=train, frozen=frozen)
        saved, self._saved, self._prev_held = self._saved, [], None

        def release() -> None:
            self._put_back(saved, name)
            self._held = None

        state.hold(self, release)
        return True

    def _still_active(self, name: str) -> bool:
        """Cheap check that nobody re-set the adapters behind the pipe state (e.g. ``set_adapters``)."""
        layers = self.layers(self.models[0])
        return not layers or (layers[0]._active_adapter == [name] and not layers[0]._disable_adapters)

    def _capture(self, model: Any) -> _ModelState:
        layers = self.layers(model)
        if not layers:
            return _ModelState(model, None, False, model.training)
        active = layers[0].active_adapter
        active = [active] if isinstance(active, str) else list(active)
        return _ModelState(model, active, bool(layers[0].disable_adapters), model.training)


def adapter_names_in_order(model: Any) -> list[str]:
    """``adapter_names`` in load order, without sorting (cheap enough to check on every switch)."""
    config = getattr(model, "peft_config", None)
    return list(config) if isinstance(config, dict) else []


def _modules_without_other_adapters(model: Any, keep: str | None) -> list[Any]:
    """Every module of ``model`` except those that belong to an adapter other than ``keep``."""
    out = []
    for qualified, module in model.named_modules():
        parts = qualified.split(".")
        if any(part in _ADAPTER_CONTAINERS and i + 1 < len(parts) and parts[i + 1] != keep for i, part in enumerate(parts)):
            continue
        out.append(module)
    return out


def add_training_adapter(model: Any, name: str, config: Any) -> dict[str, Any]:
    """Inject adapter ``name`` into ``model`` (diffusers UNet or transformers CLIP) and return its
    parameters by name, made trainable and kept in fp32 (the base may be fp16/bf16).

    The adapters that were active before stay active: adding must not change generations.
    """
    import torch

    switch = AdapterSwitch([model])
    switch._saved = [switch._capture(model)]
    if name in adapter_names(model):
        remove_adapter(model, name)  # left over from a run that crashed in this process
    model.add_adapter(config, adapter_name=name)
    params = {n: p for n, p in model.named_parameters() if f".{name}." in n}
    for p in params.values():
        p.data = p.data.to(torch.float32)
        p.requires_grad_(True)
    if switch._saved[0].active is not None:
        switch.restore()
    else:
        for layer in _tuner_layers(model):
            layer.set_adapter([])
    return params


def remove_adapter(model: Any, name: str) -> None:
    """Delete adapter ``name`` from ``model`` if present (frees its memory)."""
    if name not in adapter_names(model):
        return
    if hasattr(model, "delete_adapters"):  # diffusers models
        model.delete_adapters(name)
    else:  # transformers models
        model.delete_adapter(name)


def lora_state_dict(model: Any, name: str, *, to_cpu: bool = True) -> dict[str, Any]:
    """The adapter's weights with peft keys and no adapter name (raw ``get_peft_model_state_dict``)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=name)
    if not to_cpu:  # e.g. a model on the meta device, where only the names exist
        return dict(state)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _text_encoder_state(model: Any, name: str, to_cpu: bool) -> dict[str, Any]:
    """A text encoder's adapter weights under the module names other tools use (``text_model.`` level)."""
    from engine.generation.lora_files import standard_lora_key

    prefix = "text_encoder."  # any text-encoder prefix: only the part after it is rewritten
    return {standard_lora_key(prefix + k)[len(prefix):]: v for k, v in lora_state_dict(model, name, to_cpu=to_cpu).items()}


def adapter_file_tensors(
    unet: Any, name: str, text_encoders: dict[str, Any] | None = None, *, to_cpu: bool = True
) -> dict[str, Any]:
    """The tensors of the adapter file by key, as ``save_adapter_file`` writes them (``unet.…``,
    ``text_encoder.text_model.…``, ``text_encoder_2.text_model.…``)."""
    tensors = {f"unet.{k}": v for k, v in lora_state_dict(unet, name, to_cpu=to_cpu).items()}
    for component, model in (text_encoders or {}).items():
        tensors.update({f"{component}.{k}": v for k, v in _text_encoder_state(model, name, to_cpu).items()})
    return tensors


def save_adapter_file(path: Path, unet: Any, name: str, text_encoders: dict[str, Any] | None = None) -> None:
    """Write the adapter as a diffusers LoRA file that ``load_lora_weights`` loads as is.

    Saved from the raw peft state dict with the adapter config as metadata (NOTES: passing it
    through ``convert_state_dict_to_diffusers`` drops keys; without the metadata an alpha other
    than the rank reloads with the wrong scale). Text-encoder keys get the ``text_model.`` level
    that transformers 5 dropped from CLIP-L, so A1111 and ComfyUI find them; diffusers strips it
    again when loading into a model without that level.
    """
    from diffusers import StableDiffusionXLPipeline

    kwargs: dict[str, Any] = {
        "unet_lora_layers": lora_state_dict(unet, name),
        "unet_lora_adapter_metadata": unet.peft_config[name].to_dict(),
    }
    for component, model in (text_encoders or {}).items():
        kwargs[f"{component}_lora_layers"] = _text_encoder_state(model, name, True)
        kwargs[f"{component}_lora_adapter_metadata"] = model.peft_config[name].to_dict()
    path = Path(path)
    StableDiffusionXLPipeline.save_lora_weights(str(path.parent), weight_name=path.name, safe_serialization=True, **kwargs)
