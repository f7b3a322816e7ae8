"""A tiny WD-tagger-v3 stand-in: an ONNX model and ``selected_tags.csv`` with the real contract.

Tests, demos and CPU benchmarks (engine and bot included) point ``[tagger] model`` at the folder
this writes; it loads through exactly the same code path as SmilingWolf's taggers:

- input ``input``: float32 NHWC ``[batch, S, S, 3]``, BGR, 0-255 (S = ``TINY_TAGGER_SIZE``, read
  from the model by the loader, like the real 448);
- output ``output``: float32 ``[batch, T]`` probabilities (the sigmoid is inside the graph, as in
  the real models, so the loader must not apply another one).

The graph is ``sigmoid(mean_colour(image) / 255 @ W + b)``: every tag's logit is a linear function
of the image's mean red, green and blue (0-1). ``TINY_TAGS`` lists those weights, so a test can
paint an image of a known colour, know which tags it triggers, and compute the exact expected
probabilities with ``expected_probabilities``. Roughly: every image is ``1girl``/``solo``; red
images are ``hikari (arcaea)``, ``red theme``, ``long hair``, rated general; blue images are
``tairitsu (arcaea)``, ``blue theme``, ``^_^``, rated questionable; green images are rated
sensitive; magenta images explicit; grey, white and black images are rated general.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from engine.fsutil import write_bytes_atomic

TINY_TAGGER_SIZE = 32
RATING, GENERAL, CHARACTER = 9, 0, 4


class TinyTag(NamedTuple):
    """One tag of the tiny tagger: its csv row and its logit = bias + r*wr + g*wg + b*wb."""

    name: str
    category: int
    bias: float
    wr: float
    wg: float
    wb: float


# The designed tags. Channel values are an image's mean colour in 0-1.
TINY_TAGS: tuple[TinyTag, ...] = (
    TinyTag("general", RATING, 1.0, 0.0, 0.0, 0.0),
    TinyTag("sensitive", RATING, -2.0, -2.0, 4.0, -2.0),
    TinyTag("questionable", RATING, -2.0, -2.0, -2.0, 4.0),
    TinyTag("explicit", RATING, -4.0, 3.0, -4.0, 3.0),
    TinyTag("1girl", GENERAL, 3.0, 0.0, 0.0, 0.0),
    TinyTag("solo", GENERAL, 1.0, 0.0, 0.0, 0.0),
    TinyTag("long_hair", GENERAL, -1.0, 2.0, 0.0, 0.0),
    TinyTag("red_theme", GENERAL, -3.5, 6.0, -3.0, -3.0),
    TinyTag("green_theme", GENERAL, -3.5, -3.0, 6.0, -3.0),
    TinyTag("blue_theme", GENERAL, -3.5, -3.0, -3.0, 6.0),
    TinyTag("white_background", GENERAL, -5.0, 2.0, 2.0, 2.0),
    TinyTag("simple_background", GENERAL, -1.0, 1.0, 1.0, 1.0),
    TinyTag("^_^", GENERAL, -2.0, 0.0, 0.0, 4.0),
    TinyTag("open_mouth", GENERAL, -0.5, 0.0, 0.0, 0.0),
    TinyTag("smile", GENERAL, -1.0, 0.0, 0.0, 0.0),
    TinyTag("hikari_(arcaea)", CHARACTER, -4.0, 6.0, -2.0, -2.0),
    TinyTag("tairitsu_(arcaea)", CHARACTER, -4.0, -2.0, -2.0, 6.0),
)
# Filler general tags whose random weights depend on the seed; their logits stay below -3
# (probability < 0.05) for every image, so they never change which designed tags fire.
FILLER_TAGS = 4


def _all_tags(seed: int) -> list[TinyTag]:
    import numpy as np

    rng = np.random.default_rng(seed)
    tags = list(TINY_TAGS)
    for i in range(FILLER_TAGS):
        w = rng.uniform(-1.0, 1.0, size=3)
        tags.append(TinyTag(f"filler_tag_{i}", GENERAL, -6.0, *(float(x) for x in w)))
    return tags


def expected_probabilities(rgb: tuple[float, float, float], seed: int = 0) -> dict[str, float]:
    """The probabilities the tiny model gives an image whose mean colour is ``rgb`` (0-255)."""
    r, g, b = (c / 255.0 for c in rgb)
    out = {}
    for t in _all_tags(seed):
        logit = t.bias + t.wr * r + t.wg * g + t.wb * b
        out[t.name] = 1.0 / (1.0 + math.exp(-logit))
    return out


def make_tiny_tagger(dir: str | Path, seed: int = 0) -> Path:
    """Write ``model.onnx`` and ``selected_tags.csv`` into ``dir`` and return ``dir``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dest = Path(dir)
    dest.mkdir(parents=True, exist_ok=True)
    tags = _all_tags(seed)
    # The input is BGR, so the weight rows are ordered blue, green, red.
    weights = np.array([[t.wb for t in tags], [t.wg for t in tags], [t.wr for t in tags]], dtype=np.float32)
    bias = np.array([t.bias for t in tags], dtype=np.float32)
    s = TINY_TAGGER_SIZE
    nodes = [
        # axes as an attribute: valid up to opset 17, hence the pinned opset/IR below.
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["mean", "inv255"], ["unit"]),
        helper.make_node("MatMul", ["unit", "weights"], ["logits0"]),
        helper.make_node("Add", ["logits0", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-wd-tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", s, s, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(tags)])],
        initializer=[
            numpy_helper.from_array(np.array([1.0 / 255.0], dtype=np.float32), "inv255"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="arcae")
    model.ir_version = 8
    onnx.checker.check_model(model)
    write_bytes_atomic(dest / "model.onnx", model.SerializeToString())
    rows = ["tag_id,name,category,count"]
    for i, t in enumerate(tags):
        rows.append(f"{100000 + i},{t.name},{t.category},{1000 - i}")
    write_bytes_atomic(dest / "selected_tags.csv", ("\n".join(rows) + "\n").encode("utf-8"))
    return dest


