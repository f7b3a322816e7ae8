"""img2img from a user's picture (mode "image") on the tiny SDXL model: no stored request needed,
the picture's aspect ratio at the default size's area, strength recorded in the PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.contract.errors import InvalidRequest
from engine.contract.protocol import GenerationParams
from tests.conftest import write_config


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    from engine.contract.config import load_config
    from engine.generation.generator import Generator

    root = tmp_path_factory.mktemp("picture")
    return Generator.from_config(load_config(write_config(root, tiny_model_dir)))


def test_picture_size_keeps_the_aspect_at_the_default_area():
    from engine.generation.img2img import picture_size

    assert picture_size((4000, 3000), (1024, 1024)) == (1184, 888)
    assert picture_size((300, 300), (1024, 1024)) == (1024, 1024)
    assert picture_size((640, 1280), (64, 64)) == (48, 88)
    # a long strip is squeezed into the allowed sides rather than refused
    assert picture_size((100, 2000), (1024, 1024), min_side=512, max_side=2048) == (512, 2048)


def test_image_mode_draws_from_a_picture_without_arcae_metadata(env):
    picture = env.outputs_dir / "upload-test.png"
    env.outputs_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (200, 100), (220, 30, 30)).save(picture)
    params = GenerationParams(prompt="1girl, solo", seed=4, steps=4)
    with pytest.raises(InvalidRequest, match="no Arcae request metadata"):
        env.img2img(picture.name, "variation", params, job_id="var-upload")  # a variation still needs one
    low = env.img2img(picture.name, "image", params, job_id="pic-low", strength=0.3)
    high = env.img2img(picture.name, "image", params.model_copy(update={"strength": 0.9}), job_id="pic-high")
    assert (low.params.mode, low.params.strength, low.params.source_image) == ("image", 0.3, picture.name)
    assert high.params.strength == 0.9, "the request's own strength applies when none is passed"
    assert (low.images[0].width, low.images[0].height) == (88, 48)  # 2:1 at the 64x64 default's area
    a = np.asarray(Image.open(low.images[0].path), dtype=np.int16)
    b = np.asarray(Image.open(high.images[0].path), dtype=np.int16)
    assert np.abs(a - b).mean() > 1.0
    assert "Denoising strength: 0.3" in Image.open(low.images[0].path).info["parameters"]
