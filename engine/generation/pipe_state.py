"""Who holds a shared pipeline's adapters, and a counter of every change that alters its outputs.

One pipeline serves generations and a training run at once (NOTES, "Train while serving").
Walking every parameter or LoRA layer to learn whether something changed costs more the more
adapters are loaded, so the code that changes things says so instead:

- ``weights_version`` grows whenever the adapter mix, an adapter's weights, or the loaded
  adapters change (the prompt encoder's cache keys on it; see ``bump``);
- ``holder``/``release``: a training run that activated its adapter leaves it active between
  steps and registers how to put the inference state back; the next generation calls
  ``claim_for_inference`` (through ``AdapterRegistry.apply_mix``), which runs that once. So a
  training run switches adapters only when a generation ran since its last step;
- ``fused``/``claim_for_training``: the other direction. An inference mix folded into the base
  weights (``lora_execution = "fused"``) registers how to restore the exact base; whatever trains
  next (a training step, or the GPU worker before any steppable run) calls
  ``claim_for_training``, which runs that once. Training never sees a fused weight.
"""

from __future__ import annotations

from typing import Any, Callable

_ATTR = "_arcae_pipe_state"


class PipeState:
    """The shared state of one pipeline's components (see the module docstring)."""

    def __init__(self) -> None:
        self.weights_version = 0
        self.holder: object | None = None  # the training switch whose adapter is active now
        self._release: Callable[[], None] | None = None
        self._unfuse: Callable[[], None] | None = None

    def bump(self) -> None:
        """Say that the outputs may differ from before (mix, adapter weights or adapters changed)."""
        self.weights_version += 1

    def hold(self, holder: object, release: Callable[[], None]) -> None:
        """``holder`` changed the active adapters; ``release`` puts the inference state back."""
        self.holder, self._release = holder, release
        self.bump()

    def claim_for_inference(self) -> bool:
        """Undo a training run's hold (once); True when there was one."""
        release, self._release, self.holder = self._release, None, None
        if release is None:
            return False
        release()
        self.bump()
        return True


    def fused(self, unfuse: Callable[[], None]) -> None:
        """The inference side folded its mix into the base weights; ``unfuse`` restores them exactly."""
        self._unfuse = unfuse

    def claim_for_training(self) -> bool:
        """Restore the exact base weights if an inference mix is fused into them (once); True when it was."""
        unfuse, self._unfuse = self._unfuse, None
        if unfuse is None:
            return False
        unfuse()
        return True


def pipe_state(component: Any) -> PipeState:
    """The state shared by every pipeline over these components (kept on the text encoder 2 or
    the UNet, which ``from_pipe`` pipelines and a training run on the same pipe share)."""
    anchor = getattr(component, "text_encoder_2", None) or getattr(component, "unet", None) or component
    state = anchor.__dict__.get(_ATTR)
    if state is None:
        state = PipeState()
        anchor.__dict__[_ATTR] = state  # plain attribute: nn.Module's __setattr__ is not involved
    return state
