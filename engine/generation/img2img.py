"""Image-to-image on the Generator's pipeline: variations and upscales of Arcae PNGs, and pictures users upload.

``Img2ImgMixin`` is mixed into ``engine.generation.generator.Generator`` (it uses the generator's
config, model, pipeline and run loop; it does not import the generator). A variation or an upscale
starts from the request embedded in an Arcae PNG; a picture (``mode="image"``) carries no request,
so the caller's parameters are the whole request and the picture is drawn at its own aspect ratio.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from engine.contract.errors import InvalidRequest
from engine.contract.protocol import GenerationParams
from engine.generation import infotext
from engine.generation.fast_modes import configured_modes, distilled_choice, stored_fast_request
from engine.generation.postprocess import PendingOutput
from engine.generation.run_items import BatchItem, OnStep, ShouldCancel, check_job_id


class Img2ImgMixin:
    """``img2img`` and its helpers (state and the run loop live on the Generator)."""

    def img2img(
        self,
        source: str | Path,
        mode: Literal["variation", "upscale", "image"],
        params: GenerationParams | None = None,
        *,
        job_id: str,
        strength: float | None = None,
        on_step: OnStep | None = None,
        should_cancel: ShouldCancel | None = None,
        extra_negative: str = "",
        deferred: bool = False,
    ) -> Any:
        """A variation (same request, new seed) or an upscale (hires fix) of an Arcae PNG, or
        ``image``: img2img from any picture (a user's upload) with ``params`` as the whole request.

        For a variation or an upscale the request embedded in ``source`` is the starting point;
        fields set explicitly in ``params`` override it. ``source`` is a path or a file name in
        the outputs directory.
        """
        from PIL import Image

        check_job_id(job_id)
        if mode not in ("variation", "upscale", "image"):
            raise InvalidRequest(f"img2img mode must be 'variation', 'upscale' or 'image', not {mode!r}")
        if mode == "image":
            pending = self._from_picture(source, params, job_id=job_id, strength=strength, on_step=on_step,
                                         should_cancel=should_cancel, extra_negative=extra_negative)
            return self._outputs(pending, deferred, single=True)
        path, base = self._source_request(source)
        gen = self.config.generation
        with Image.open(path) as im:
            image = im.convert("RGB")
        # Only values that differ from "use the default" override the stored request: a client
        # that serialises every field (None, count 1, no adapters) must not erase the source's.
        overrides = params.model_dump(exclude_defaults=True) if params is not None else {}
        if "prompt" in overrides and overrides["prompt"] != base.get("prompt"):
            base.pop("add_quality_tags", None)  # a new prompt gets the configured quality tags
        if mode == "variation":
            strength = gen.variation_strength if strength is None else strength
            width, height = image.size
            # A variation is the same request with a new seed (a client echoing the source's
            # seed back still gets a new one; only a different explicit seed is kept).
            if overrides.get("seed") == base.pop("seed", None):
                overrides.pop("seed", None)
        else:
            strength = gen.upscale_strength if strength is None else strength
            width = max(8, round(image.width * gen.upscale_factor / 8) * 8)
            height = max(8, round(image.height * gen.upscale_factor / 8) * 8)
        merged = {**base, **overrides, "width": width, "height": height}
        merged.setdefault("count", 1)
        request = GenerationParams.model_validate(merged)
        resolved, warnings = self._resolve(
            request, mode, extra_negative=extra_negative, strength=strength, source_image=path.name
        )
        init = image.resize((width, height), Image.LANCZOS) if image.size != (width, height) else image
        item = BatchItem(job_id, resolved, warnings, on_step)
        pending = self._run(self._img2img(), [item], should_cancel=should_cancel, image=init)
        return self._outputs(pending, deferred, single=True)

    def _from_picture(self, source: str | Path, params: GenerationParams | None, *, job_id: str,
                      strength: float | None, on_step: OnStep | None, should_cancel: ShouldCancel | None,
                      extra_negative: str) -> list[PendingOutput]:
        """img2img from a picture that carries no Arcae request: its pixels, the request's everything else."""
        from PIL import Image

        if params is None:
            raise InvalidRequest("img2img from a picture needs the request's parameters (at least a prompt)")
        path = self._source_path(source)
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except OSError:
            raise InvalidRequest(f"source image {path.name} is not a readable image") from None
        strength = strength if strength is not None else params.strength
        strength = self.config.generation.variation_strength if strength is None else strength
        width, height = params.width, params.height
        if width is None or height is None:
            gen = self.config.generation
            width, height = picture_size(image.size, gen.size, min_side=gen.min_side, max_side=gen.max_side)
        request = params.model_copy(update={"width": width, "height": height})
        resolved, warnings = self._resolve(
            request, "image", extra_negative=extra_negative, strength=strength, source_image=path.name
        )
        init = image.resize((resolved.width, resolved.height), Image.LANCZOS)
        item = BatchItem(job_id, resolved, warnings, on_step)
        return self._run(self._img2img(), [item], should_cancel=should_cancel, image=init)

    def _img2img(self) -> Any:
        """The img2img pipeline over the same components (built once; no second copy of the model)."""
        if self._img2img_pipe is None:
            from diffusers import StableDiffusionXLImg2ImgPipeline

            # from_pipe casts the shared modules to its dtype (fp32 by default): pass ours.
            self._img2img_pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(self.pipe, dtype=self.model.dtype)
            self._img2img_pipe.set_progress_bar_config(disable=True)
        return self._img2img_pipe

    def _source_path(self, source: str | Path) -> Path:
        """The source image's file (a relative name is in the outputs directory); refused when missing."""
        path = Path(source)
        if not path.is_absolute():
            path = self.outputs_dir / path
        if not path.is_file():
            raise InvalidRequest(f"source image {Path(source).name} not found in the outputs directory")
        return path

    def _source_request(self, source: str | Path) -> tuple[Path, dict[str, Any]]:
        """The source PNG's path and the GenerationParams fields of its embedded request."""
        path = self._source_path(source)
        try:
            _, request = infotext.read_png_metadata(path)
        except OSError:
            raise InvalidRequest(f"source image {path.name} is not a readable PNG") from None
        if not request or not isinstance(request.get("params"), dict):
            raise InvalidRequest(f"source image {path.name} has no Arcae request metadata (not made by Arcae?)")
        p = request["params"]
        keys = ("prompt", "negative_prompt", "seed", "steps", "cfg", "sampler", "adapters", "fast", "fast_mode")
        base = {k: p[k] for k in keys if k in p}
        base["add_quality_tags"] = False  # the stored prompt already has them
        if base.get("fast"):
            distilled = [distilled_choice(e.name) for e in self._distilled_entries()]
            base = stored_fast_request(base, configured_modes(self.config.adapters, self.config.generation) + distilled)
        return path, base


def picture_size(size: tuple[int, int], default: tuple[int, int], *, min_side: int = 8,
                 max_side: int = 8192) -> tuple[int, int]:
    """A picture's aspect ratio at the configured default size's area, in multiples of 8, sides within limits.

    An upload of any size (a 4000x3000 photo, a 300 px sketch) is drawn at the area the model
    was made for, so it neither runs out of memory nor comes out as mush; a very long strip is
    squeezed into the allowed sides rather than refused.
    """
    w, h = max(1, size[0]), max(1, size[1])
    scale = math.sqrt(default[0] * default[1] / (w * h))
    low, high = -(-max(8, min_side) // 8) * 8, max(8, max_side // 8 * 8)
    return (min(high, max(low, round(w * scale / 8) * 8)), min(high, max(low, round(h * scale / 8) * 8)))
