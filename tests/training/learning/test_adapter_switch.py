"""Training while serving: the training adapter is switched in only when a generation ran since
the last step, and the generation's claim puts the serving side's mix and eval mode back."""

from __future__ import annotations

import numpy as np

from tests.training.train_helpers import generate, tiny_pipeline

NAME = "arcae_training"


def test_the_switch_happens_only_after_a_generation_and_leaks_nothing(tmp_path):
    from peft import LoraConfig

    from engine.generation.adapters import AdapterRegistry
    from engine.generation.pipe_state import pipe_state
    from tests.engine.generation.lora_factory import make_lora
    from training.learning.lora import AdapterSwitch, add_training_adapter

    serving, reference = tiny_pipeline(), tiny_pipeline()
    for model in (serving.unet, serving.text_encoder, serving.text_encoder_2):
        model.eval()  # as from_pretrained leaves a loaded pipeline
    registries = []
    for i, pipe in enumerate((serving, reference)):
        folder = tmp_path / f"adapters{i}"
        folder.mkdir()
        for seed in (1, 2):
            make_lora(tiny_pipeline(), folder / f"s{seed}.safetensors", seed=seed, text_encoders=True)
        registries.append(AdapterRegistry(folder, pipe, write_sidecars=False))
    registry, reference_registry = registries
    add_training_adapter(serving.unet, NAME, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                                        target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    switch = AdapterSwitch([serving.unet, serving.text_encoder, serving.text_encoder_2])
    state = pipe_state(serving)

    assert switch.hold(NAME, train=True, state=state)  # first step: switch
    assert serving.unet.training
    assert not switch.hold(NAME, train=True, state=state)  # no generation since: nothing to do
    assert not switch.hold(NAME, train=True, state=state)

    mix = [("s1", 0.7), ("s2", 0.4)]
    registry.apply_mix(mix)  # a generation claims the pipeline back
    reference_registry.apply_mix(mix)
    assert not serving.unet.training
    np.testing.assert_array_equal(generate(serving), generate(reference))
    assert switch.hold(NAME, train=True, state=state)  # the next step switches again
    assert serving.unet.training and all(
        layer.active_adapters == [NAME] for layer in switch.layers(serving.unet)
    )
    registry.apply_mix(mix)
    np.testing.assert_array_equal(generate(serving), generate(reference))
