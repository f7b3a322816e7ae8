"""Decoded images to results: PNG files with metadata, hashes, ratings; runs on any thread.

The Generator decodes on the GPU thread and hands back ``PendingOutput``s (pixels, infotext and
request per image, nothing written yet); ``finish_outputs`` does the CPU work: PNG encoding,
the atomic write with fsync, sha256, the content rating (one batch for all images of a call)
and the base64 copy the ``Completed`` event carries. The GPU worker runs it on a small pool
while the next job already uses the GPU (``engine.service.gpu_worker``); the library's own
``generate`` runs it inline. Nothing here touches the pipeline.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from engine.contract.protocol import ImageResult, ResolvedParams
from engine.fsutil import write_bytes_atomic
from engine.generation import infotext

# zlib level for output PNGs, chosen by measurement (``python -m engine bench --only worker``, row
# ``png_level_4_vs_6``, on an 832x1216 image with flat shading, outlines and grain): level 4 writes
# files within ~1% of PIL's default 6 in about half the time; level 1 is faster again but ~15%
# larger, and every byte also travels to the bot and to Discord.
PNG_COMPRESS_LEVEL = 4

Rater = Callable[[Any], tuple[str, dict[str, float]]]


@dataclass
class GenerationOutput:
    """What one request produced: the written images, the parameters that ran, timings, warnings."""

    images: list[ImageResult]
    params: ResolvedParams
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PendingImage:
    """One decoded image and what goes into its file."""

    path: Path
    seed: int
    pixels: Any  # (H, W, 3) uint8 array
    infotext: str
    request: dict[str, Any]


@dataclass
class PendingOutput:
    """A job's decoded images, not written yet (``finish_outputs`` turns it into a GenerationOutput)."""

    images: list[PendingImage]
    params: ResolvedParams
    timings: dict[str, float]
    warnings: list[str]


def rate_all(rater: Rater | None, pictures: Sequence[Any]) -> list[tuple[Any, Any]]:
    """(rating, scores) per picture; one model batch when the rater's tagger offers ``rate_many``."""
    if rater is None:
        return [(None, None)] * len(pictures)
    many = getattr(rater, "rate_many", None) or getattr(getattr(rater, "__self__", None), "rate_many", None)
    if many is not None and pictures:
        return list(many(list(pictures)))
    return [rater(picture) for picture in pictures]


def _write(image: PendingImage, picture: Any) -> tuple[str, bytes]:
    """Encode and write one PNG atomically; (sha256, the bytes)."""
    data = infotext.encode_png(picture, image.infotext, image.request, compress_level=PNG_COMPRESS_LEVEL)
    write_bytes_atomic(image.path, data)
    return hashlib.sha256(data).hexdigest(), data


def finish_outputs(pending: Sequence[PendingOutput], rater: Rater | None) -> list[GenerationOutput]:
    """Write, hash and rate every image of ``pending`` (one pipeline call's jobs), in order."""
    from PIL import Image

    t0 = time.perf_counter()
    pictures = [[Image.fromarray(image.pixels) for image in job.images] for job in pending]
    digests = [[_write(im, pic) for im, pic in zip(job.images, pics)] for job, pics in zip(pending, pictures)]
    t1 = time.perf_counter()
    ratings = iter(rate_all(rater, [pic for pics in pictures for pic in pics]))
    t2 = time.perf_counter()
    total_images = max(1, sum(len(job.images) for job in pending))
    outputs = []
    for job, pics, written in zip(pending, pictures, digests):
        images = []
        for im, pic, (digest, data) in zip(job.images, pics, written):
            rating, scores = next(ratings)
            # The bytes travel in the event: the bot may be on another host, and never reads a path.
            images.append(ImageResult(
                path=str(im.path), seed=im.seed, width=pic.width, height=pic.height, sha256=digest,
                rating=rating, rating_scores=scores, data_b64=base64.b64encode(data).decode("ascii"),
            ))
        timings = dict(job.timings)
        share = len(job.images) / total_images  # this job's part of the call's writing and rating
        timings["save_s"] = (t1 - t0) * share
        timings["rate_s"] = (t2 - t1) * share
        timings["total_s"] = timings.get("total_s", 0.0) + (time.perf_counter() - t0) * share
        outputs.append(GenerationOutput(images=images, params=job.params, timings=timings, warnings=job.warnings))
    return outputs
